"""The paper's cleaning as a reader-side filter over the lake's quality flags (never a deletion).

Per observation (from :class:`astromer.lake.schema.Quality`, computed at ingest): drop non-finite
values, errors outside (0, 1], duplicate times, and magnitudes outside the curve's 1st/99th
percentile (computed over the observations that pass the previous checks).

Per curve, on the observations that remain:

- fewer than ``min_obs`` observations -> unusable (``too_few_observations``);
- the noise criteria |kurtosis| > 10, |skewness| > 1, std > 0.1 mag. How we read them: a curve is
  *noisy*, and rejected (reason ``noisy``), when it meets ALL THREE: a large scatter that is made by
  a few extreme, one-sided points which survived the percentile clipping -- the signature of
  photometric artefacts (blends, bad frames, cosmic rays). Each criterion alone describes ordinary
  variable stars (std > 0.1 is any RR Lyrae or Cepheid, |skewness| > 1 any detached eclipsing
  binary, |kurtosis| > 10 one with narrow eclipses), so rejecting on ANY of them would remove the
  variability the model is meant to learn: on the four real samples that reading rejects 46% of
  the OGLE Cepheids, 82% of the ASAS variables and 89% of the Stripe 82 RR Lyrae curves.
  ``noise_rule="any"`` applies that stricter reading where it is wanted (e.g. to select quiet
  field stars), ``drop_noisy=False`` switches the curve-level criteria off. Kurtosis is the excess
  (Fisher) kurtosis, skewness the Fisher-Pearson coefficient, std the population standard
  deviation, all over the kept magnitudes.

:class:`CleaningStats` counts what the filter did, so that a job can report it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from astromer.lake.schema import CLEANING_MASK, Quality, quality_flags

KURTOSIS_MAX = 10.0
SKEWNESS_MAX = 1.0
STD_MAX = 0.1
MIN_OBS = 5


@dataclass
class CleanResult:
    keep: np.ndarray          # bool [n]: observations that pass the observation-level cleaning
    usable: bool              # whether the curve as a whole passes
    reason: str | None        # why it does not


@dataclass
class CleaningStats:
    curves: int = 0
    usable_curves: int = 0
    observations: int = 0
    kept_observations: int = 0
    dropped_by_flag: dict = field(default_factory=dict)     # flag name -> observations carrying it
    rejected_curves: dict = field(default_factory=dict)     # reason -> curves

    def add(self, quality: np.ndarray, result: CleanResult) -> None:
        self.curves += 1
        self.observations += len(quality)
        if result.usable:
            self.usable_curves += 1
            self.kept_observations += int(result.keep.sum())
        else:
            self.rejected_curves[result.reason] = self.rejected_curves.get(result.reason, 0) + 1
        for flag in Quality:
            if flag.value & CLEANING_MASK:
                hits = int(np.count_nonzero(quality & flag.value))
                if hits:
                    self.dropped_by_flag[flag.name] = self.dropped_by_flag.get(flag.name, 0) + hits

    def as_dict(self) -> dict:
        return {"curves": self.curves, "usable_curves": self.usable_curves, "observations": self.observations,
                "kept_observations": self.kept_observations, "dropped_by_flag": dict(self.dropped_by_flag),
                "rejected_curves": dict(self.rejected_curves)}


def clean_curve(mjd, mag, err, quality=None, *, drop_noisy: bool = True, noise_rule: str = "all",
                min_obs: int = MIN_OBS) -> CleanResult:
    """Which observations of one curve the paper's cleaning keeps, and whether the curve is usable.

    ``quality`` are the lake's flags; without them they are computed here (the curve must be in
    time order, as the lake stores it).
    """
    mag = np.asarray(mag, dtype=np.float64)
    if quality is None:
        offsets = np.array([0, len(mag)])
        *_, quality = quality_flags(np.array(mjd, dtype=np.float64), mag.copy(),
                                    np.array(err, dtype=np.float64), offsets)
    quality = np.asarray(quality, dtype=np.uint8)
    keep = (quality & CLEANING_MASK) == 0
    n = int(keep.sum())
    if n < min_obs:
        return CleanResult(keep, False, "too_few_observations")
    if drop_noisy:
        reason = noise_reason(mag[keep], noise_rule)
        if reason:
            return CleanResult(keep, False, reason)
    return CleanResult(keep, True, None)


def segment_sums(values: np.ndarray, offsets: np.ndarray, dtype=None) -> np.ndarray:
    """Sum of ``values[offsets[i]:offsets[i + 1]]`` for every i (0 for an empty segment), in one pass;
    booleans are counted (int64) unless ``dtype`` says otherwise."""
    values = np.asarray(values)
    if dtype is None and values.dtype == bool:
        dtype = np.int64
    offsets = np.asarray(offsets, np.int64)
    lengths = np.diff(offsets)
    out = np.zeros(len(lengths), dtype or values.dtype)
    full = lengths > 0
    if full.any():      # reduceat reads an empty segment as one value: leave those out (their sum is 0)
        out[full] = np.add.reduceat(values, offsets[:-1][full], dtype=dtype)
    return out


def clean_curves(mag: np.ndarray, quality: np.ndarray, offsets: np.ndarray, *, drop_noisy: bool = True,
                 min_obs: int = MIN_OBS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`clean_curve` for many curves at once, given flat: curve ``i`` is ``mag[offsets[i]:offsets[i + 1]]``
    with its flags ``quality[...]``. Returns ``keep`` (bool, per observation), ``n_kept`` and ``usable`` (per
    curve): the decisions :func:`clean_curve` makes (rule ``"all"``).

    The noise moments come from segment sums, whose rounding differs from the per-curve means; a curve
    whose statistics lie within a relative 1e-9 of a threshold is decided by :func:`noise_reason` itself,
    so the decisions are the same."""
    offsets = np.asarray(offsets, np.int64)
    keep = (np.asarray(quality, np.uint8) & CLEANING_MASK) == 0                 # [N]
    n_kept = segment_sums(keep, offsets, np.int64)                             # [B]
    usable = n_kept >= min_obs
    if not drop_noisy or not usable.any():
        return keep, n_kept, usable
    # population moments of the kept magnitudes of each curve, over the kept values packed curve by curve
    values = np.asarray(mag, np.float64)[keep]                                 # [K]
    packed = np.concatenate([[0], np.cumsum(n_kept)])
    count = np.maximum(n_kept, 1).astype(np.float64)
    mean = segment_sums(values, packed) / count
    centred = values - np.repeat(mean, n_kept)
    square = centred * centred
    m2 = segment_sums(square, packed) / count
    m3 = segment_sums(square * centred, packed) / count
    m4 = segment_sums(square * square, packed) / count
    std = np.sqrt(m2)
    with np.errstate(divide="ignore", invalid="ignore"):
        skew = np.where(std > 0, m3 / std ** 3, 0.0)
        kurt = np.where(std > 0, m4 / std ** 4 - 3.0, 0.0)
    noisy = (std > STD_MAX) & (np.abs(skew) > SKEWNESS_MAX) & (np.abs(kurt) > KURTOSIS_MAX)
    close = ((np.abs(std - STD_MAX) <= 1e-9 * STD_MAX) | (np.abs(np.abs(skew) - SKEWNESS_MAX) <= 1e-9 * SKEWNESS_MAX)
             | (np.abs(np.abs(kurt) - KURTOSIS_MAX) <= 1e-9 * KURTOSIS_MAX) | (std < 1e-12)) & usable
    for i in np.flatnonzero(close):
        a, b = offsets[i], offsets[i + 1]
        noisy[i] = noise_reason(np.asarray(mag[a:b], np.float64)[keep[a:b]]) is not None
    return keep, n_kept, usable & ~noisy


def noise_statistics(values: np.ndarray) -> tuple[float, float, float]:
    """(std, skewness, excess kurtosis) of magnitudes (population moments)."""
    centred = values - values.mean()
    std = float(np.sqrt(np.mean(centred ** 2)))
    if std == 0:
        return 0.0, 0.0, 0.0
    return std, float(np.mean(centred ** 3) / std ** 3), float(np.mean(centred ** 4) / std ** 4 - 3.0)


def noise_reason(values: np.ndarray, rule: str = "all") -> str | None:
    """``"noisy"`` (rule ``all``) or ``"noisy_<criterion>"`` (rule ``any``) when the curve is rejected."""
    std, skew, kurt = noise_statistics(np.asarray(values, dtype=np.float64))
    hits = {"std": std > STD_MAX, "skewness": abs(skew) > SKEWNESS_MAX, "kurtosis": abs(kurt) > KURTOSIS_MAX}
    if rule == "all":
        return "noisy" if all(hits.values()) else None
    if rule == "any":
        return next((f"noisy_{name}" for name, hit in hits.items() if hit), None)
    raise ValueError(f"noise_rule must be 'all' or 'any', got {rule!r}")
