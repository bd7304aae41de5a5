"""Arrow schemas of the lake tables and the per-observation quality bit flags.

``lightcurves`` (one row per single-band light curve; ``survey`` and ``band`` are hive partition
columns taken from the folder names ``survey=<s>/band=<b>``, not stored in the files):

================  ======================  ==========================================================
column            type                    meaning
================  ======================  ==========================================================
object_id         string                  the survey's own identifier (``1.3444.614``, ``OGLE-LMC-CEP-0001``)
ra, dec           float64, nullable       degrees (J2000) where the source gives them
mjd               list<float64>           observation times, ascending (HJD-2450000 sources are shifted
                                          by +49999.5 onto the MJD scale; no barycentric correction)
mag               list<float32>           magnitude
err               list<float32>           magnitude uncertainty
n_obs             int32                   length of the lists
quality           list<uint8>             bit flags of :class:`Quality`, one per observation
source_file       string                  ``<input>`` or ``<input>::<archive member>``; ``<a> + <b>`` for a curve
                                          merged from the rows of several inputs
source_sha256     string                  sha256 of the input file (or of a simulator partition's spec); those
                                          of the inputs joined by `` + `` for a merged curve
ingest_id         string                  the ingest run that wrote the row (deterministic from inputs)
================  ======================  ==========================================================

Every parseable observation is kept; the paper's cleaning is a filter over ``quality``
(:mod:`astromer.lake.cleaning`), never a deletion.
"""
from __future__ import annotations

import enum

import numpy as np
import pyarrow as pa

from astromer.kernels import compiled_kernels


class Quality(enum.IntFlag):
    """Per-observation flags (uint8). Zero means a clean observation."""

    NONFINITE = 1          # time, magnitude or error is NaN/inf (or an empty CSV field)
    ERR_NONPOSITIVE = 2    # err <= 0: the weighted loss divides by it
    ERR_ABOVE_ONE = 4      # err > 1 mag: the paper drops these
    DUPLICATE_TIME = 8     # same time as an earlier usable observation of the curve (the first usable one stays clean)
    MAG_PERCENTILE = 16    # magnitude outside the curve's [1st, 99th] percentile, computed over the
                           # observations without any of the flags above
    UNSORTED_SOURCE = 32   # the source listed this observation out of time order (informational only)


#: flags that the paper's cleaning removes (UNSORTED_SOURCE is informational: the lake is sorted)
CLEANING_MASK = int(Quality.NONFINITE | Quality.ERR_NONPOSITIVE | Quality.ERR_ABOVE_ONE
                    | Quality.DUPLICATE_TIME | Quality.MAG_PERCENTILE)


def observations(value_type: pa.DataType) -> pa.ListType:
    """A curve's observations: a list whose elements are never null (a value that could not be read is a
    NaN with its NONFINITE flag). Declared so, the Parquet writer has one definition level less to
    compute and encode per observation: 10% less time to encode a part (136 against 151 ms for 16,384
    MACHO-like curves). Lakes written before, with nullable elements, read the same beside them."""
    return pa.list_(pa.field("element", value_type, nullable=False))


LIGHTCURVES = pa.schema([
    pa.field("object_id", pa.string(), nullable=False),
    pa.field("ra", pa.float64()),
    pa.field("dec", pa.float64()),
    pa.field("mjd", observations(pa.float64()), nullable=False),
    pa.field("mag", observations(pa.float32()), nullable=False),
    pa.field("err", observations(pa.float32()), nullable=False),
    pa.field("n_obs", pa.int32(), nullable=False),
    pa.field("quality", observations(pa.uint8()), nullable=False),
    pa.field("source_file", pa.string()),
    pa.field("source_sha256", pa.string()),
    pa.field("ingest_id", pa.string()),
])

#: map-stage shards carry the band as a column; the published files carry it in the folder name
SHARD = LIGHTCURVES.append(pa.field("band", pa.string(), nullable=False))

#: labels/survey=<s>/part-<n>.parquet (survey from the folder name)
LABELS = pa.schema([
    pa.field("object_id", pa.string(), nullable=False),
    pa.field("label_set", pa.string(), nullable=False),
    pa.field("label", pa.string(), nullable=False),
])

#: _ingest/survey=<s>/quarantine.parquet
QUARANTINE = pa.schema([
    pa.field("input", pa.string(), nullable=False),
    pa.field("reason", pa.string(), nullable=False),
    pa.field("detail", pa.string()),
])

#: _ingest/survey=<s>/manifest.parquet
MANIFEST = pa.schema([
    pa.field("input", pa.string(), nullable=False),
    pa.field("url", pa.string()),
    pa.field("size", pa.int64()),
    pa.field("sha256", pa.string()),
    pa.field("curves", pa.int64()),
    pa.field("observations", pa.int64()),
    pa.field("status", pa.string()),
    pa.field("ingest_id", pa.string()),
])

#: named quarantine reasons (the ``reason`` column); a row-level reason keeps the rest of its file
QUARANTINE_REASONS = {
    "empty": "the file or curve holds no observation",
    "wrong_column_count": "a row has more or fewer fields than the format (row dropped)",
    "non_numeric": "a numeric field holds text (row dropped)",
    "non_utf8": "a row holds bytes that are not UTF-8 (row dropped)",
    "bad_header": "a header line could not be read (the file name is used instead)",
    "invalid_object_id": "the object name is empty, too long or holds path separators/control characters",
    "invalid_band": "the band name is not a plain short token",
    "truncated_archive": "the archive ends early or is corrupt (whole input quarantined)",
    "unreadable": "the input could not be opened or decoded",
    "no_curves": "the input yielded no light curve",
    "missing_column": "a mapped column is absent from the file",
    "wrong_type": "a mapped column holds values of another kind than numbers (lists, dates)",
    "reader_error": "an unexpected error in the reader (type and message in detail)",
}


def observation_lists(offsets: np.ndarray, values: np.ndarray, value_type: pa.DataType) -> pa.Array:
    """The :func:`observations` lists of concatenated ``values``, curve ``i`` being ``[offsets[i], offsets[i+1])``."""
    values = pa.array(values, type=value_type)
    if offsets[-1] < 2**31:
        return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), values, type=observations(value_type))
    return pa.LargeListArray.from_arrays(pa.array(offsets), values).cast(observations(value_type))


def quality_flags(mjd: np.ndarray, mag: np.ndarray, err: np.ndarray,
                  offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Sort every curve by time and compute its quality flags, vectorised over a whole shard.

    ``mjd``, ``mag``, ``err`` are the concatenated observations of all curves; curve ``i`` is
    ``[offsets[i], offsets[i+1])``. Returns sorted (mjd, mag, err) and the uint8 flags. Magnitudes and errors
    are judged as the lake stores them, as float32: an error of 1.00000001 is 1.0 there, not above one, and a
    curve flagged again from the lake's values (a merge of several inputs' rows, a reader's cleaning) gets
    the same flags.
    """
    n = len(mjd)
    lengths = np.diff(offsets)
    if n == 0:
        return mjd, mag, err, np.zeros(0, dtype=np.uint8)
    flags = _flags_compiled(mjd, mag, err, offsets)
    if flags is not None:
        return mjd, mag, err, flags
    mag, err = _as_stored(mag), _as_stored(err)
    # inner[i]: observations i and i+1 belong to the same curve
    inner = np.ones(n - 1, dtype=bool)
    last = offsets[1:-1] - 1
    inner[last[(last >= 0) & (last < n - 1)]] = False

    # sort by time inside each curve; only curves that need it pay for the sort
    step = np.diff(mjd)
    backwards = (step < 0) & inner
    moved_rows = None
    if backwards.any():
        bad_curves = np.unique(np.searchsorted(offsets, np.flatnonzero(backwards), side="right") - 1)
        moved_rows = np.zeros(n, dtype=bool)
        for c in bad_curves:
            lo, hi = offsets[c], offsets[c + 1]
            order = np.argsort(mjd[lo:hi], kind="stable")
            moved_rows[lo:hi] = order != np.arange(hi - lo)
            mjd[lo:hi], mag[lo:hi], err[lo:hi] = mjd[lo:hi][order], mag[lo:hi][order], err[lo:hi][order]
        step = np.diff(mjd)

    def bits(mask, flag):   # a boolean mask as uint8 flag bits (a view, no branch per row)
        return mask.view(np.uint8) * np.uint8(flag)

    finite = np.isfinite(mjd)
    finite &= np.isfinite(mag)
    finite &= np.isfinite(err)
    with np.errstate(invalid="ignore"):
        flags = bits(~finite, Quality.NONFINITE)
        flags |= bits(err <= 0, Quality.ERR_NONPOSITIVE)
        flags |= bits(err > 1, Quality.ERR_ABOVE_ONE)
    # a duplicate repeats the time of an earlier usable row (no value flag) of the curve: the first usable
    # row of a time stays clean, even after a row of that time whose value was bad
    same_time = np.zeros(n, dtype=bool)
    same_time[1:] = (step == 0) & inner
    run = np.cumsum(~same_time) - 1                       # rows of one time in one curve share a run
    usable = flags == 0
    first_usable = np.full(int(run[-1]) + 1, n, dtype=np.int64)          # n > 0 here
    runs_with_usable, first_row = np.unique(run[usable], return_index=True)
    first_usable[runs_with_usable] = np.flatnonzero(usable)[first_row]
    flags |= bits(first_usable[run] < np.arange(n), Quality.DUPLICATE_TIME)
    if moved_rows is not None:
        flags |= bits(moved_rows, Quality.UNSORTED_SOURCE)

    # per-curve 1st/99th magnitude percentiles (numpy's linear interpolation) over the clean rows
    good = (flags & np.uint8(CLEANING_MASK)) == 0   # UNSORTED_SOURCE is informational
    lo_q, hi_q = _curve_percentiles(mag, good, offsets, lengths, (0.01, 0.99))
    with np.errstate(invalid="ignore"):
        outside = (mag < np.repeat(lo_q, lengths)) | (mag > np.repeat(hi_q, lengths))
    flags |= bits(good & outside, Quality.MAG_PERCENTILE)
    return mjd, mag, err, flags


def _as_stored(values: np.ndarray) -> np.ndarray:
    """``values`` rounded to float32, as float64 (what the compiled kernel compares)."""
    return values.astype(np.float32).astype(np.float64)


def _flags_compiled(mjd, mag, err, offsets) -> np.ndarray | None:
    """The flags by the compiled kernel (one pass per curve), or None where it is not built, the columns
    are not float64, or a curve is out of time order (the numpy path sorts it and says so)."""
    kernels = compiled_kernels()
    columns = (mjd, mag, err)
    if kernels is None or not all(c.dtype == np.float64 and c.flags.c_contiguous for c in columns):
        return None
    flags = np.empty(len(mjd), dtype=np.uint8)
    if kernels.flag_curves(mjd, mag, err, np.ascontiguousarray(offsets, dtype=np.int64), flags, 0.01, 0.99,
                           int(Quality.NONFINITE), int(Quality.ERR_NONPOSITIVE), int(Quality.ERR_ABOVE_ONE),
                           int(Quality.DUPLICATE_TIME), int(Quality.MAG_PERCENTILE)):
        return flags
    return None


def _curve_percentiles(mag, good, offsets, lengths, quantiles):
    """Per curve, the ``quantiles`` of its good magnitudes (numpy's linear interpolation); -inf/+inf
    (nothing outside) for a curve without any good row."""
    n_curves = len(lengths)
    starts = offsets[:-1]
    values = np.where(good, mag, np.inf)
    n_good = np.add.reduceat(good.astype(np.int64), starts) if n_curves and (lengths > 0).all() \
        else np.bincount(np.repeat(np.arange(n_curves), lengths)[good], minlength=n_curves)
    ranks = [_percentile_ranks(n_good, q) for q in quantiles]
    pairs = _selected_pairs(values, starts, lengths, ranks) if n_curves else None
    if pairs is None:
        width = int(lengths.max()) if n_curves else 0
        if n_curves and width * n_curves <= 2 * len(mag) + 4096:
            # curves of similar lengths: one row each in a padded matrix, sorted row by row
            # (many short sorts are several times faster than one sort of everything)
            padded = np.full(n_curves * width, np.inf)
            padded[np.arange(len(mag)) + np.repeat(np.arange(n_curves) * width - starts, lengths)] = values
            padded = padded.reshape(n_curves, width)
            padded.sort(axis=1)
            flat, row_starts = padded.ravel(), np.arange(n_curves) * width
        else:
            flat, row_starts = _sorted_within_curves(mag, good, offsets, lengths), starts
        pairs = [_pair_at(flat, row_starts, lo, hi) for lo, hi, _ in ranks]
    return [np.where(n_good > 0, _interpolate(a, b, fraction), -np.inf if q < 0.5 else np.inf)
            for q, (_, _, fraction), (a, b) in zip(quantiles, ranks, pairs)]


def _percentile_ranks(counts, q):
    """numpy's linear interpolation: the two ranks the ``q`` quantile of ``counts`` values lies between,
    and the fraction of the way from the first to the second."""
    counts = np.maximum(counts, 1)
    position = (counts - 1) * q
    lo = np.floor(position).astype(np.int64)
    return lo, np.minimum(lo + 1, counts - 1), position - lo


def _pair_at(sorted_values, starts, lo, hi):
    """The values of ranks ``lo`` and ``hi`` of each segment of ``sorted_values`` starting at ``starts``."""
    n = len(sorted_values)
    return sorted_values[np.minimum(starts + lo, n - 1)], sorted_values[np.minimum(starts + hi, n - 1)]


def _interpolate(a, b, fraction):
    with np.errstate(invalid="ignore"):
        return a + (b - a) * fraction


def _selected_pairs(values, starts, lengths, ranks):
    """:func:`_pair_at` for every ``(lo, hi, fraction)`` of ``ranks`` by the compiled rank selection,
    without sorting (the values of those ranks are what the sort puts there), or None where the kernels
    are not built or decline."""
    kernels = compiled_kernels()
    if kernels is None:
        return None
    wanted = np.ascontiguousarray(np.stack([r for lo, hi, _ in ranks for r in (lo, hi)], axis=1), dtype=np.int64)
    picked = np.empty(wanted.shape)
    if not kernels.select_ranks(np.ascontiguousarray(values, dtype=np.float64),
                                np.ascontiguousarray(starts, dtype=np.int64),
                                np.ascontiguousarray(lengths, dtype=np.int64), wanted, picked):
        return None
    return [(picked[:, 2 * j], picked[:, 2 * j + 1]) for j in range(len(ranks))]


def _sorted_within_curves(mag, good, offsets, lengths):
    """Magnitudes sorted inside each curve, the rows that are not ``good`` last (one argsort).

    The sort key is ``curve + 0.5 * (mag - min) / (max - min)`` for good rows and ``curve + 0.75``
    for the others: one float64 quicksort instead of a two-key lexsort.
    """
    curve = np.repeat(np.arange(len(lengths)), lengths)
    if len(lengths) == 0 or (lengths == 0).any():
        return np.where(good, mag, np.inf)[np.lexsort((np.where(good, mag, np.inf), curve))]
    starts = offsets[:-1]
    with np.errstate(invalid="ignore"):
        low = np.minimum.reduceat(np.where(good, mag, np.inf), starts)
        high = np.maximum.reduceat(np.where(good, mag, -np.inf), starts)
        span = np.where(np.isfinite(high - low) & (high > low), high - low, 1.0)
        low = np.where(np.isfinite(low), low, 0.0)
        norm = (mag - np.repeat(low, lengths)) / np.repeat(span, lengths)
    key = curve + np.where(good, 0.5 * np.clip(np.nan_to_num(norm), 0.0, 1.0), 0.75)
    order = np.argsort(key)
    return np.where(good, mag, np.inf)[order]


def _segment_percentile(sorted_values, starts, counts, q):
    lo, hi, fraction = _percentile_ranks(counts, q)
    return _interpolate(*_pair_at(sorted_values, starts, lo, hi), fraction)
