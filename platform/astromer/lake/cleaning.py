"""The paper's cleaning as a reader-side filter over the lake's quality flags (never a deletion).

Per observation (from :class:`astromer.lake.schema.Quality`, computed at ingest): drop non-finite
values, errors outside (0, 1], duplicate times, and magnitudes outside the curve's 1st/99th
percentile (computed over the observations that pass the previous checks).

Per curve, on the observations that remain:

- fewer than ``min_obs`` observations -> unusable (``too_few_observations``);
- the noise criteria |kurtosis| > 10, |skewness| > 1, std > 0.1 mag. How we read them: the paper
  uses them to reject *noisy* curves from the unlabelled pretraining corpus, i.e. a curve that meets
  ANY of the three is rejected (reason ``noisy_kurtosis``, ``noisy_skewness`` or ``noisy_std``):
  heavy tails and strong asymmetry that survive percentile clipping are the signature of
  photometric artefacts (blends, bad frames), and std > 0.1 mag of a field star is mostly noise.
  The same rule would throw away most catalogued variables (a Cepheid's or RR Lyrae's std is
  0.2-0.4 mag): for labelled sets pass ``drop_noisy=False`` and keep the observation-level cleaning
  only. Kurtosis is the excess (Fisher) kurtosis, skewness the Fisher-Pearson coefficient, std the
  population standard deviation, all on the kept magnitudes.

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


def clean_curve(mjd, mag, err, quality=None, *, drop_noisy: bool = True, min_obs: int = MIN_OBS) -> CleanResult:
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
        values = mag[keep]
        centred = values - values.mean()
        std = float(np.sqrt(np.mean(centred ** 2)))
        if std > STD_MAX:
            return CleanResult(keep, False, "noisy_std")
        if std > 0:
            skew = float(np.mean(centred ** 3) / std ** 3)
            kurt = float(np.mean(centred ** 4) / std ** 4 - 3.0)
            if abs(kurt) > KURTOSIS_MAX:
                return CleanResult(keep, False, "noisy_kurtosis")
            if abs(skew) > SKEWNESS_MAX:
                return CleanResult(keep, False, "noisy_skewness")
    return CleanResult(keep, True, None)
