"""Windowing, centring, padding and the pretraining probe selection: the one place for this logic.

Two windowing rules exist:

* ``"astromer1"`` reproduces the ASTROMER 0.1.8 library bit for bit (a parity switch): windows start at
  multiples of the length, the last one is shifted back to end at the last observation (so it overlaps
  the previous one, and a curve whose length is a multiple of the window length gets a duplicate last
  window), and every column is centred in float32 with a *sequential* float32 sum, as TensorFlow did.
* ``"astromer2"`` (the default): consecutive non-overlapping windows, the last one zero-padded, and
  centring in float64 before the cast to float32 (MJD ~5e4 in float32 loses ~4 ms, and the sequential
  float32 mean is off by up to 0.08 days).

Times stay float64 until a window is centred. Errors are not centred: the weighted loss uses them.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from astromer.config import WINDOW_RULES, MaskConfig


@dataclass
class Windows:
    """A batch of windows, one row per window (numpy arrays)."""

    times: np.ndarray    # float32 [W, L] centred days, 0 on padding
    mags: np.ndarray     # float32 [W, L] centred magnitudes, 0 on padding
    errs: np.ndarray     # float32 [W, L] observation errors (not centred), 0 on padding
    padding: np.ndarray  # bool [W, L] True = padding
    n_valid: np.ndarray  # int32 [W] real observations per window
    start: np.ndarray    # int64 [W] index in its curve of the window's first observation
    curve: np.ndarray    # int64 [W] index of the curve the window belongs to

    def __len__(self) -> int:
        return int(self.times.shape[0])

    @property
    def length(self) -> int:
        return int(self.times.shape[1])

    def take(self, rows) -> Windows:
        """A subset of the windows (an int, slice, index array or bool mask; always keeps [W, L])."""
        if isinstance(rows, (int, np.integer)):
            rows = [rows]
        return Windows(*(getattr(self, name)[rows] for name in _FIELDS))

    @staticmethod
    def concat(parts: list[Windows], length: int) -> Windows:
        if not parts:
            return Windows.empty(length)
        return Windows(*(np.concatenate([getattr(p, name) for p in parts]) for name in _FIELDS))

    @staticmethod
    def empty(length: int) -> Windows:
        z = np.zeros((0, length), np.float32)
        return Windows(z, z.copy(), z.copy(), np.zeros((0, length), bool), np.zeros(0, np.int32),
                       np.zeros(0, np.int64), np.zeros(0, np.int64))


_FIELDS = ("times", "mags", "errs", "padding", "n_valid", "start", "curve")


#: significand bits of the floating types that lose MJDs (float64 keeps them to microseconds)
_SIGNIFICAND_BITS = {"float16": 10, "bfloat16": 7, "float32": 23}


def precision_hint(dtype_name: str, value: float) -> str:
    """Why two distinct times may have become equal: a floating type too short for MJDs (a hint for the
    duplicate-time errors; ``dtype_name`` as numpy or torch writes it, e.g. ``float32`` or ``torch.bfloat16``)."""
    name = str(dtype_name).removeprefix("torch.")
    bits = _SIGNIFICAND_BITS.get(name)
    if bits is None or not math.isfinite(value) or value == 0:
        return ""
    spacing = 2.0 ** (math.floor(math.log2(abs(value))) - bits)
    if spacing < 1e-4:     # finer than 9 seconds: the duplicate is more likely in the data
        return ""
    shown = f"{spacing:.2g}" if spacing < 100 else f"{spacing:.0f}"
    return (f"; these times are {name}, which resolves values near {abs(value):.0f} only to {shown} days: "
            "pass float64 times, or subtract an offset first")


def validate_curve(mjd, mag, err=None, *, where: str = "curve") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Check one light curve and return it as (float64 mjd, float32 mag, float32 err).

    Raises TypeError for non-numeric input and ValueError for empty curves, mismatched lengths, NaN or
    infinite values and unsorted or duplicate times, naming the field and the first bad row.
    """
    arrays = {}
    for field, value in (("mjd", mjd), ("mag", mag), ("err", err)):
        if value is None:
            continue
        arr = np.asarray(value)
        if arr.dtype == object or not (np.issubdtype(arr.dtype, np.floating)
                                       or np.issubdtype(arr.dtype, np.integer)):
            raise TypeError(f"{where}: {field} must be a numeric array, got dtype {arr.dtype}")
        if arr.ndim != 1:
            raise ValueError(f"{where}: {field} must be 1-D, got shape {arr.shape}")
        arrays[field] = arr
    t = arrays["mjd"]
    n = t.shape[0]
    if n == 0:
        raise ValueError(f"{where}: empty light curve (no observations)")
    for field, arr in arrays.items():
        if arr.shape[0] != n:
            raise ValueError(f"{where}: {field} has {arr.shape[0]} values but mjd has {n}")
        bad = ~np.isfinite(arr.astype(np.float64, copy=False))
        if bad.any():
            row = int(np.argmax(bad))
            raise ValueError(f"{where}: {field} is not finite ({arr[row]}) at row {row}")
    given = t.dtype
    t = t.astype(np.float64, copy=False)
    if n > 1:
        step = np.diff(t)
        if (step <= 0).any():
            row = int(np.argmax(step <= 0)) + 1
            kind = "duplicate" if step[row - 1] == 0 else "unsorted"
            raise ValueError(f"{where}: {kind} times: mjd[{row}]={float(t[row])!r} after mjd[{row - 1}]={float(t[row - 1])!r}"
                             " (times must be strictly increasing" + precision_hint(given.name, t[row]) + ")")
    m = arrays["mag"].astype(np.float32, copy=False)
    e = arrays["err"].astype(np.float32, copy=False) if "err" in arrays else np.zeros(n, np.float32)
    return t, m, e


def window_starts(n: int, length: int, rule: str) -> np.ndarray:
    """First-observation index of each window of a curve of n observations."""
    if rule == "astromer1":
        # get_windows of ASTROMER 0.1.8: floor(n/L)+1 windows, pivots clipped to end at row n.
        n_win = n // length + 1
        return np.maximum(0, np.minimum(n - length, length * np.arange(n_win))).astype(np.int64)
    if rule == "astromer2":
        return np.arange(0, n, length, dtype=np.int64)
    raise ValueError(f"unknown window rule {rule!r}: expected one of {WINDOW_RULES}")


def _centre_astromer1(block: np.ndarray) -> np.ndarray:
    """The official float32 centring: a sequential float32 sum divided by the row count."""
    block = block.astype(np.float32)
    mean = np.cumsum(block, axis=0, dtype=np.float32)[-1] / np.float32(block.shape[0])
    return block - mean


def curve_windows(mjd, mag, err=None, *, length: int = 200, rule: str = "astromer2",
                  validate: bool = True) -> Windows:
    """All windows of one light curve, centred and padded to ``length``."""
    if validate:
        t, m, e = validate_curve(mjd, mag, err)
    else:
        t = np.asarray(mjd, np.float64)
        m = np.asarray(mag, np.float32)
        e = np.zeros(len(t), np.float32) if err is None else np.asarray(err, np.float32)
    n = t.shape[0]
    starts = window_starts(n, length, rule)
    w = len(starts)
    out = Windows(times=np.zeros((w, length), np.float32), mags=np.zeros((w, length), np.float32),
                  errs=np.zeros((w, length), np.float32), padding=np.ones((w, length), bool),
                  n_valid=np.zeros(w, np.int32), start=starts, curve=np.zeros(w, np.int64))
    for k, p in enumerate(starts):
        stop = min(n, p + length)
        m_k = stop - p
        if rule == "astromer1":
            # The official pipeline casts (time, mag, err) to float32 first, then centres each column.
            centred = _centre_astromer1(np.stack([t[p:stop], m[p:stop], e[p:stop]], axis=1))
            out.times[k, :m_k] = centred[:, 0]
            out.mags[k, :m_k] = centred[:, 1]
        else:
            tt = t[p:stop]
            mm = m[p:stop].astype(np.float64)
            out.times[k, :m_k] = tt - tt.mean()
            out.mags[k, :m_k] = mm - mm.mean()
        out.errs[k, :m_k] = e[p:stop]
        out.padding[k, :m_k] = False
        out.n_valid[k] = m_k
    return out


def curves_windows(curves: Iterable, *, length: int = 200, rule: str = "astromer2",
                   validate: bool = True) -> Windows:
    """Windows of many curves; ``curves`` is an iterable of (mjd, mag) or (mjd, mag, err)."""
    parts = []
    for i, curve in enumerate(curves):
        if not isinstance(curve, (tuple, list)) or len(curve) not in (2, 3):
            raise TypeError(f"curve {i}: expected a tuple (mjd, mag) or (mjd, mag, err), got {type(curve).__name__}")
        if validate:
            t, m, e = validate_curve(*curve, where=f"curve {i}")
        else:
            t, m = curve[0], curve[1]
            e = curve[2] if len(curve) == 3 else None
        part = curve_windows(t, m, e, length=length, rule=rule, validate=False)
        part.curve[:] = i
        parts.append(part)
    return Windows.concat(parts, length)


def random_window(mjd, mag, err, *, length: int = 200, rng: np.random.Generator,
                  validate: bool = False) -> Windows:
    """One random contiguous slice of ``length`` observations (all of a shorter curve), centred in float64."""
    if validate:
        mjd, mag, err = validate_curve(mjd, mag, err)
    n = len(mjd)
    start = int(rng.integers(0, n - length + 1)) if n > length else 0
    stop = min(n, start + length)
    window = curve_windows(np.asarray(mjd, np.float64)[start:stop], np.asarray(mag)[start:stop],
                           None if err is None else np.asarray(err)[start:stop],
                           length=length, rule="astromer2", validate=False)
    window.start[:] = start
    return window


def _gather_windows(times, mags, errs, first: np.ndarray, n_valid: np.ndarray, length: int):
    """Windows of flat columns: window ``w`` holds rows ``first[w] : first[w] + n_valid[w]``, centred in
    float64 (times and magnitudes) and zero-padded to ``length``. Returns (times, mags, errs, padding)."""
    cols = np.arange(length)
    padding = cols[None, :] >= n_valid[:, None]                                  # [W, L]
    index = np.where(padding, 0, first[:, None] + cols[None, :])                 # [W, L] flat rows
    t = np.where(padding, 0.0, np.asarray(times, np.float64)[index])             # [W, L] float64
    m = np.where(padding, 0.0, np.asarray(mags, np.float32)[index].astype(np.float64))
    count = np.maximum(n_valid, 1)[:, None]
    out_t = np.where(padding, 0.0, t - t.sum(axis=1, keepdims=True) / count).astype(np.float32)
    out_m = np.where(padding, 0.0, m - m.sum(axis=1, keepdims=True) / count).astype(np.float32)
    out_e = np.where(padding, np.float32(0), np.asarray(errs, np.float32)[index])
    return out_t, out_m, out_e, padding


def random_windows(times: np.ndarray, mags: np.ndarray, errs: np.ndarray, offsets: np.ndarray, *,
                   length: int = 200, rng: np.random.Generator) -> Windows:
    """One random window per curve, for many curves at once: the vectorised twin of :func:`random_window`.

    The curves are given flat: curve ``i`` is ``times[offsets[i]:offsets[i + 1]]`` (and the same of
    ``mags`` and ``errs``), each with at least one observation. Each window is a uniformly drawn contiguous
    slice of ``length`` observations (all of a shorter curve), centred in float64 as ``random_window``
    centres it (the means may differ from its pairwise sums in the last bit). One gather over a
    [curves, length] index matrix instead of a few numpy calls per curve (docs/performance.md).
    """
    offsets = np.asarray(offsets, np.int64)
    n = np.diff(offsets)                                          # [B] observations per curve
    if (n <= 0).any():
        raise ValueError(f"random_windows: curve {int(np.argmax(n <= 0))} has no observation")
    return windows_at(times, mags, errs, offsets, rng.integers(0, np.maximum(n - length + 1, 1)), length=length)


def windows_at(times: np.ndarray, mags: np.ndarray, errs: np.ndarray, offsets: np.ndarray, start: np.ndarray, *,
               length: int = 200) -> Windows:
    """The window of each curve (given flat, as in :func:`random_windows`) that begins at its observation
    ``start[i]``: ``length`` observations, or all from there to the curve's end, centred in float64."""
    offsets = np.asarray(offsets, np.int64)
    start = np.asarray(start, np.int64)
    n = np.diff(offsets)
    if ((start < 0) | (start >= np.maximum(n, 1))).any():
        raise ValueError("windows_at: a window starts outside its curve")
    n_valid = np.minimum(n - start, length)                       # [B]
    t, m, e, padding = _gather_windows(times, mags, errs, offsets[:-1] + start, n_valid, length)
    return Windows(times=t, mags=m, errs=e, padding=padding, n_valid=n_valid.astype(np.int32), start=start,
                   curve=np.arange(len(n), dtype=np.int64))


def flat_windows(times: np.ndarray, mags: np.ndarray, errs: np.ndarray, offsets: np.ndarray, *,
                 length: int = 200, rule: str = "astromer2") -> Windows:
    """Every window of many curves given flat (curve ``i`` is ``times[offsets[i]:offsets[i + 1]]``, in time
    order): the vectorised twin of :func:`curves_windows` without its validation, ``Windows.curve`` giving
    each window's curve. The ``astromer2`` rule is one gather (centred in float64 as ``curve_windows``
    centres, up to the last bit of the means); the ``astromer1`` rule, a parity switch bit for bit with
    the official float32 centring, goes curve by curve."""
    offsets = np.asarray(offsets, np.int64)
    n = np.diff(offsets)                                                         # [B]
    if rule == "astromer1":
        parts = []
        for i, (a, b) in enumerate(zip(offsets[:-1], offsets[1:])):
            if a == b:            # an empty curve has no window (this rule would give it one)
                continue
            part = curve_windows(times[a:b], mags[a:b], errs[a:b], length=length, rule=rule, validate=False)
            part.curve[:] = i
            parts.append(part)
        return Windows.concat(parts, length)
    if rule != "astromer2":
        raise ValueError(f"unknown window rule {rule!r}: expected one of {WINDOW_RULES}")
    per_curve = -(-n // length)                                                  # [B] windows of each curve
    curve = np.repeat(np.arange(len(n), dtype=np.int64), per_curve)             # [W]
    start = (np.arange(len(curve)) - np.repeat(np.cumsum(per_curve) - per_curve, per_curve)) * length
    n_valid = np.minimum(n[curve] - start, length)                               # [W]
    t, m, e, padding = _gather_windows(times, mags, errs, offsets[curve] + start, n_valid, length)
    return Windows(times=t, mags=m, errs=e, padding=padding, n_valid=n_valid.astype(np.int32),
                   start=start.astype(np.int64), curve=curve)


@dataclass
class Probe:
    """The pretraining selection for a batch of windows."""

    mags_in: np.ndarray  # float32 [B, L] magnitudes fed to the model (random-replaced ones changed)
    hidden: np.ndarray   # bool [B, L] replaced by [MASK] and hidden from attention keys
    probed: np.ndarray   # bool [B, L] where the loss is computed (hidden + same + random)


def probe_counts(n_valid: np.ndarray, config: MaskConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(probed, same, random) counts per window with the official rounding."""
    n = np.asarray(n_valid, np.int64)
    n_probed = np.floor(config.probed * n + 1e-9).astype(np.int64)
    n_same = np.ceil(config.same * n_probed - 1e-9).astype(np.int64)
    n_random = np.ceil(config.random * (n_probed - n_same) - 1e-9).astype(np.int64)
    return n_probed, n_same, n_random


def shortest_probed_window(config: MaskConfig) -> int:
    """The fewest observations a window needs for ``config`` to probe one of them: a window with fewer has no
    loss term, and a batch of such windows a NaN gradient."""
    n = max(1, math.ceil((1 - 1e-9) / config.probed))
    while probe_counts(np.array([n]), config)[0][0] < 1:     # the rounding's guard, should it fall short
        n += 1
    return n


def probe(mags: np.ndarray, padding: np.ndarray, *, rng: np.random.Generator,
          config: MaskConfig = MaskConfig()) -> Probe:
    """Draw the probed / same / random / hidden observations of each window (vectorised).

    Per window of n real observations: floor(probed*n) probed uniformly without replacement; of those
    ceil(same*count) keep their value, then ceil(random*remaining) take the magnitude of a random other
    real observation of the same window; the rest are hidden.
    """
    mags, padding = _probe_inputs(mags, padding)
    return _probe(mags, padding, rng.random(mags.shape), rng.random, config)


def seeded_probe(mags: np.ndarray, padding: np.ndarray, seeds, config: MaskConfig = MaskConfig()) -> Probe:
    """:func:`probe` of each window with a generator of its own: window ``k`` gets exactly the selection of
    ``probe(mags[k:k+1], padding[k:k+1], rng=np.random.default_rng(seeds[k]))``, so that a fixed window's
    selection does not depend on the batch it is cut in. Only the draws go window by window."""
    mags, padding = _probe_inputs(mags, padding)
    b, length = mags.shape
    seeds = list(seeds)
    if len(seeds) != b:
        raise ValueError(f"seeded_probe: {len(seeds)} seeds for {b} windows")
    _, _, n_random = probe_counts((~padding).sum(axis=1), config)
    keys, picks = np.empty((b, length)), []
    for k, seed in enumerate(seeds):
        generator = np.random.default_rng(seed)
        keys[k] = generator.random(length)                  # the draws probe makes, in its order
        picks.append(generator.random(int(n_random[k])))
    picks = np.concatenate(picks) if picks else np.zeros(0)
    return _probe(mags, padding, keys, lambda count: picks[:count], config)


def _probe_inputs(mags, padding) -> tuple[np.ndarray, np.ndarray]:
    mags = np.asarray(mags, np.float32)
    padding = np.asarray(padding, bool)
    if mags.shape != padding.shape or mags.ndim != 2:
        raise ValueError(f"probe: mags {mags.shape} and padding {padding.shape} must both be [B, L]")
    return mags, padding


def _probe(mags: np.ndarray, padding: np.ndarray, keys: np.ndarray, draw, config: MaskConfig) -> Probe:
    """The selection from ``keys`` (uniforms [B, L]) and ``draw(count)`` (the uniforms that pick the random
    replacements, in row-major order of the replaced positions)."""
    b, length = mags.shape
    real = ~padding
    n_valid = real.sum(axis=1)
    n_probed, n_same, n_random = probe_counts(n_valid, config)

    # A random rank for every real observation (padding ranks last): the first n_probed are probed.
    keys[padding] = np.inf
    order = np.argsort(keys, axis=1)
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(length)[None, :].repeat(b, 0), axis=1)
    probed = rank < n_probed[:, None]
    is_random = probed & (rank >= n_same[:, None]) & (rank < (n_same + n_random)[:, None])
    hidden = probed & (rank >= (n_same + n_random)[:, None])

    mags_in = mags.copy()
    rows, cols = np.nonzero(is_random)
    if rows.size:
        # Source = a uniformly drawn *other* real observation of the same window.
        real_positions = np.argsort(padding, axis=1, kind="stable")  # real positions first, in order
        own_rank = np.cumsum(real, axis=1) - 1                        # index of each real obs among reals
        n_other = n_valid[rows] - 1
        pick = np.floor(draw(rows.size) * n_other).astype(np.int64)
        pick = pick + (pick >= own_rank[rows, cols])
        mags_in[rows, cols] = mags[rows, real_positions[rows, pick]]
    return Probe(mags_in=mags_in, hidden=hidden, probed=probed)
