"""A labelled simulator of MACHO-like surveys, deterministic from a seed, generated in partitions.

``synthetic://?n=2000&seed=0[&per_partition=500&years=7&bands=BR]`` plans ``ceil(n/per_partition)``
inputs; each map task generates its own partition, so a survey of millions of curves never passes
through one process. Object ``i`` depends only on ``(seed, i)``: the partitioning does not change it.

Cadence: a survey of ``years`` seasons starting at MJD 48800; the field is observable for about
240 nights a year; each object's field is visited on a fraction of those nights (weather, scheduling:
15-60%), with 1-3 exposures a night, an hour or two apart; both bands are observed at every exposure.

Classes (the ``class`` label) and their light curves (R-band amplitudes; B is 1.25x for pulsators):

- ``RRab``: period 0.45-0.85 d, amplitude 0.5-1.1 mag, saw-tooth (fast rise, slow decline)
- ``RRc``: period 0.24-0.42 d, amplitude 0.2-0.5 mag, nearly sinusoidal
- ``Cepheid``: period 2-60 d (log-uniform), amplitude 0.2-0.9 mag growing with period, a softer
  saw-tooth than RR ab (rise over about a quarter to a third of the cycle)
- ``EB``: period 0.3-15 d (log-uniform), primary eclipse 0.1-1.0 mag, secondary 10-90% of it,
  eclipse width 3-12% of the phase, ellipsoidal variation for periods under 1.5 d
- ``LPV``: period 80-700 d, amplitude 0.5-2.5 mag, semi-regular (drifting amplitude, red noise)

Magnitudes are MACHO-like instrumental ones (mean -10 to -5, negative); errors are heteroscedastic:
a floor plus a photon term growing with magnitude, times a per-night seeing factor; 0.3% of the
points are bad measurements with errors above 1 mag (what the cleaning must remove).
"""
from __future__ import annotations

import hashlib
import json
import math
from urllib.parse import parse_qs, urlparse

import numpy as np

from astromer.surveys.base import Batch, Input, Plan

#: bumped whenever the simulated curves or labels change: part of each partition's checksum (and ingest id)
#: (3: the ``period`` label set)
SIMULATOR_VERSION = 3
CLASSES = ("RRab", "RRc", "Cepheid", "EB", "LPV")
CLASS_WEIGHTS = (0.3, 0.15, 0.2, 0.25, 0.1)
LABEL_SET = "class"
#: each object's true period in days, as text (the label set the classification figures fold curves by)
PERIOD_LABEL_SET = "period"
MJD_START = 48800.0


#: the source's settings: their types and defaults
SPEC = {"n": (int, 1000), "seed": (int, 0), "per_partition": (int, 500), "years": (float, 7.0), "bands": (str, "BR")}


def parse_spec(source: str, options: dict | None = None) -> dict:
    query = {k: v[-1] for k, v in parse_qs(urlparse(source).query, keep_blank_values=True).items()}
    unknown = sorted(set(query) - set(SPEC))
    if unknown:
        raise ValueError(f"{source}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(SPEC)}")
    query.update({k: v for k, v in (options or {}).items() if k in SPEC})
    spec = {}
    for key, (kind, default) in SPEC.items():
        try:
            spec[key] = kind(query.get(key, default))
        except ValueError:
            raise ValueError(f"{source}: {key}={query[key]!r} is not {'a whole number' if kind is int else 'a number'}"
                             ) from None
    if spec["n"] < 1 or spec["per_partition"] < 1 or not 0 < spec["years"] <= 30 or not spec["bands"]:
        raise ValueError(f"{source}: n and per_partition must be at least 1, years in (0, 30] and bands not empty "
                         f"(got {spec})")
    return spec


class SyntheticReader:
    name = "synthetic"

    def plan(self, source: str, options: dict) -> Plan:
        spec = parse_spec(source, options)
        n, per = spec["n"], spec["per_partition"]
        inputs = [Input(key=f"synthetic-seed{spec['seed']}-part-{p:05d}", url=source, size=0,
                        options={**spec, "start": p * per, "stop": min(n, (p + 1) * per)})
                  for p in range(math.ceil(n / per))]
        return Plan(inputs=inputs, label_sets=(LABEL_SET, PERIOD_LABEL_SET))

    def checksum(self, item: Input) -> str:
        spec = {**item.options, "simulator_version": SIMULATOR_VERSION}
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()

    def read(self, item: Input, context: dict) -> Batch:
        spec = item.options
        batch = Batch()
        for index in range(spec["start"], spec["stop"]):
            obj = simulate_object(index, spec["seed"], years=spec["years"], bands=spec["bands"])
            for band, (mjd, mag, err) in obj["bands"].items():
                batch.add_curve(obj["object_id"], band, mjd, mag, err, source_file=item.key,
                                ra=obj["ra"], dec=obj["dec"])
            batch.labels.append((obj["object_id"], LABEL_SET, obj["class"]))
            batch.labels.append((obj["object_id"], PERIOD_LABEL_SET, f"{obj['period']:.6f}"))
        return batch


def object_id(seed: int, index: int) -> str:
    return f"SIM{seed}.{index:09d}"


def cadence(rng: np.random.Generator, years: float) -> np.ndarray:
    """Observation times (MJD) of one field: seasons, nights, exposures within a night."""
    nights = np.arange(MJD_START, MJD_START + 365.25 * years)
    season_phase = ((nights - MJD_START) / 365.25 + rng.uniform(0, 0.05)) % 1.0
    observable = season_phase < rng.uniform(0.6, 0.72)          # ~220-260 nights a year
    visited = observable & (rng.random(nights.size) < rng.uniform(0.15, 0.6))
    nights = nights[visited]
    per_night = rng.choice([1, 2, 3], size=nights.size, p=[0.55, 0.3, 0.15])
    times = np.repeat(nights, per_night)
    first = np.repeat(np.cumsum(per_night) - per_night, per_night)
    exposure = np.arange(times.size) - first          # 0, 1, 2 within each night
    times = times + 0.1 + rng.uniform(0, 0.25, times.size) + exposure * rng.uniform(0.04, 0.09, times.size)
    return np.unique(np.round(times, 6))   # sorted, and no two exposures at the same time


def _fourier(phase: np.ndarray, amps, phases) -> np.ndarray:
    shape = sum(a * np.sin(2 * np.pi * (k + 1) * phase + p) for k, (a, p) in enumerate(zip(amps, phases)))
    return shape


def _normalise(curve: np.ndarray, amplitude: float) -> np.ndarray:
    span = curve.max() - curve.min()
    return (curve - curve.mean()) * (amplitude / span if span > 0 else 0.0)


def variability(cls: str, rng: np.random.Generator, t: np.ndarray) -> tuple[np.ndarray, float, dict]:
    """Magnitude offsets (R band, brighter = negative) at times t, the B/R amplitude ratio and params."""
    fine = np.linspace(0, 1, 256, endpoint=False)
    t0 = rng.uniform(0, 10)
    if cls == "RRab":
        period, amp = rng.uniform(0.45, 0.85), rng.uniform(0.5, 1.1)
        k = np.arange(1, 7)
        amps, phases = ((-1.0) ** k) / k * rng.uniform(0.85, 1.15, 6), rng.normal(0, 0.15, 6)
        ratio = 1.25
    elif cls == "RRc":
        period, amp = rng.uniform(0.24, 0.42), rng.uniform(0.2, 0.5)
        amps, phases = [1.0, rng.uniform(0.05, 0.2), rng.uniform(0.0, 0.08)], rng.normal(0, 0.3, 3)
        ratio = 1.25
    elif cls == "Cepheid":
        period = math.exp(rng.uniform(math.log(2), math.log(60)))
        amp = float(np.clip(0.25 + 0.35 * math.log10(period) + rng.normal(0, 0.1), 0.2, 0.9))
        k = np.arange(1, 5)      # a softer saw-tooth than RR ab: fewer, faster-decaying harmonics
        amps = ((-1.0) ** k) / k * rng.uniform(0.45, 0.7) ** (k - 1)
        phases = rng.normal(0, 0.2, 4)
        ratio = 1.4
    elif cls == "EB":
        period = math.exp(rng.uniform(math.log(0.3), math.log(15)))
        depth1 = rng.uniform(0.1, 1.0)
        depth2 = depth1 * rng.uniform(0.1, 0.9)
        width = rng.uniform(0.03, 0.12)
        phase = ((t - t0) / period) % 1.0
        dist1 = np.minimum(phase, 1 - phase)
        dist2 = np.abs(phase - 0.5)
        mags = depth1 * np.exp(-0.5 * (dist1 / (width / 2.355)) ** 2) + depth2 * np.exp(
            -0.5 * (dist2 / (width / 2.355)) ** 2)
        if period < 1.5:
            mags = mags + rng.uniform(0.02, 0.15) * (1 - np.cos(4 * np.pi * phase)) / 2
        return mags, 1.0, {"period": period, "amplitude": depth1}
    elif cls == "LPV":
        period, amp = rng.uniform(80, 700), rng.uniform(0.5, 2.5)
        phase = (t - t0) / period
        drift = 1 + 0.25 * np.sin(2 * np.pi * (t - t0) / (period * rng.uniform(5, 15)))
        red = np.cumsum(rng.normal(0, 0.01, t.size)) if t.size else t
        mags = -0.5 * amp * drift * np.sin(2 * np.pi * phase) + 0.15 * amp * np.sin(4 * np.pi * phase + 1) + red
        return mags, 1.3, {"period": period, "amplitude": amp}
    else:
        raise ValueError(f"unknown class {cls!r}")
    # pulsators: the template over one cycle, scaled to the amplitude, then sampled at the phases
    template = _normalise(-_fourier(fine, amps, phases), amp)
    phase = ((t - t0) / period) % 1.0
    mags = np.interp(phase, np.append(fine, 1.0), np.append(template, template[0]))
    return mags, ratio, {"period": period, "amplitude": amp}


def simulate_object(index: int, seed: int = 0, *, years: float = 7.0, bands: str = "BR") -> dict:
    """One labelled object: {object_id, class, period, amplitude, ra, dec, bands: {band: (mjd, mag, err)}}."""
    # Philox keyed by (seed, index): independent streams per object without SeedSequence's cost
    rng = np.random.Generator(np.random.Philox(key=(int(seed) << 40) + int(index)))
    cls = CLASSES[rng.choice(len(CLASSES), p=CLASS_WEIGHTS)]
    t = cadence(rng, years)
    offsets, ratio, params = variability(cls, rng, t)
    base = rng.uniform(-10.0, -5.0)
    colour = rng.uniform(-0.3, 1.5)
    seeing = np.exp(rng.normal(0, 0.3, t.size))
    out = {}
    for band in bands:
        scale = ratio if band == "B" else 1.0
        true = base + (colour if band == "B" else 0.0) + scale * offsets
        err = np.sqrt(0.004 ** 2 + (0.012 * 10 ** (0.4 * (true + 7.0))) ** 2) * seeing
        err = np.clip(err, 0.001, None)
        bad = rng.random(t.size) < 0.003
        err[bad] = rng.uniform(1.0, 3.0, int(bad.sum())) + 0.001
        mag = true + rng.normal(0, 1, t.size) * np.where(bad, err, err)
        out[band] = (t, np.round(mag, 3), np.round(err, 3))
    return {"object_id": object_id(seed, index), "class": cls, "ra": float(rng.uniform(70, 90)),
            "dec": float(rng.uniform(-72, -66)), "bands": out, **params}


def macho_text(object_id: str, band: str, ra_deg: float, dec_deg: float, mag_mean: float) -> bytes:
    """The MACHO ``.mjd`` header for one curve (the body rows are ``MJD Mag Err``)."""
    field_, tile, seq = (object_id.split(".") + ["0", "0"])[:3]
    return (f"#Field Tile Seq RA(hour) Dec(deg) Filter mean_Mag med_Mag mean_(B-R) med_(B-R)\n"
            f"#{field_} {tile} {seq} {ra_deg / 15:.5f} {dec_deg:.4f} {band} {mag_mean:.3f} {mag_mean:.3f} "
            f"0.000 0.000\n#MJD Mag Err\n").encode()
