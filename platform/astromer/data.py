"""Ray Data pipelines for pretraining: lake ``lightcurves`` -> cleaned curves -> windows -> masked batches.

Stages, each a ``map_batches`` over Arrow/numpy batches, so the data set streams and is never held whole:

    read     the Parquet row groups of the survey/band partitions, one at a time per read task
             (train: dealt across surveys and read in a new order on every pass; val/test: lake order)
    split    train / val / test by a hash of (survey, object_id): deterministic and disjoint
    clean    the paper's cleaning (astromer.lake.cleaning.clean_curve) as a reader-side filter
    window   train: a fresh random window per curve per pass, fresh probe selection (new entropy each pass,
             or in a reproducible run draws seeded by the seed and the pass), the windows in random order;
             val/test: a window and selection seeded by the curve's hash, identical on every pass
    batch    columns times, mags_in, target, errs (float32 [L]); padding, hidden, probed (bool [L])

Workers pull their share through ``ray.train.get_dataset_shard(...)`` and :func:`iter_batches` (training:
batches drawn from a local shuffle buffer).
"""
from __future__ import annotations

import hashlib
import json
import os
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from astromer.config import MaskConfig
from astromer.windows import probe, random_window, random_windows

READ_COLUMNS = ["object_id", "mjd", "mag", "err", "quality"]
BATCH_COLUMNS = ("times", "mags_in", "target", "errs", "padding", "hidden", "probed")
SPLITS = ("train", "val", "test")


@dataclass
class DataSpec:
    """What to read and how to cut it (the data part of a TrainConfig)."""

    lake: str
    surveys: list[str] | None = None      # None = every survey in the lake
    bands: list[str] | None = None        # None = every band
    window_length: int = 200
    mask: MaskConfig = field(default_factory=MaskConfig)
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 0                         # seeds the fixed validation/test windows and the split
    clean: bool = True
    drop_noisy: bool = True               # the paper's noise criteria (off for catalogued variable stars)
    min_observations: int = 10            # shorter curves carry too little to reconstruct
    label_set: str | None = None          # finetuning: keep only curves with a label in this set
    labels: list[str] | None = None       # ... and (optionally) only these labels
    data_cpus: float = 0.25               # CPUs reserved per data task (leave room for the trainers)
    read_tasks: int = 0                   # tasks that read and window the curves; 0: half the cluster's CPUs
    pass_clock: str | None = None         # a reproducible run's PassClock (its actor name): the training
                                          # draws are seeded by (seed, pass) instead of fresh entropy

    def __post_init__(self):
        if isinstance(self.mask, dict):
            self.mask = MaskConfig(**self.mask)
        if not (0 <= self.val_fraction < 1 and 0 <= self.test_fraction < 1
                and self.val_fraction + self.test_fraction < 1):
            raise ValueError(f"val_fraction={self.val_fraction} and test_fraction={self.test_fraction} must be "
                             "fractions that leave some training curves")


# --------------------------------------------------------------------------- split

def curve_hash(survey: str, band: str, object_id: str, seed: int = 0) -> int:
    """A stable 64-bit hash of one light curve's identity (independent of Python's hash seed)."""
    key = f"{seed}\x1f{survey}\x1f{band}\x1f{object_id}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")


def split_of(survey: str, band: str, object_id: str, *, val_fraction: float, test_fraction: float,
             seed: int = 0) -> str:
    """'train', 'val' or 'test' for one curve. The split is by *object* (all bands of an object land in the
    same split), so no object seen in training is ever in the test set."""
    u = curve_hash(survey, "", object_id, seed) / 2.0**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


# --------------------------------------------------------------------------- read

def partitions(lake: str, surveys: list[str] | None = None, bands: list[str] | None = None) -> list[tuple[str, str]]:
    """(survey, band) of the existing ``lightcurves/survey=S/band=B`` folders for the selection."""
    from astromer.lake.paths import LakePaths

    paths = LakePaths(lake)
    root = paths.lightcurves()
    if not paths.fs.exists(root):
        raise FileNotFoundError(f"{lake}: no lightcurves table (expected {root})")
    wanted_surveys = set(surveys) if surveys else None
    wanted_bands = set(bands) if bands else None
    out = []
    for survey_dir in sorted(paths.fs.ls(root, detail=False)):
        name = survey_dir.rstrip("/").rsplit("/", 1)[-1]
        if not name.startswith("survey="):
            continue
        survey = name.split("=", 1)[1]
        if wanted_surveys is not None and survey not in wanted_surveys:
            continue
        for band_dir in sorted(paths.fs.ls(survey_dir, detail=False)):
            bname = band_dir.rstrip("/").rsplit("/", 1)[-1]
            if not bname.startswith("band="):
                continue
            if wanted_bands is not None and bname.split("=", 1)[1] not in wanted_bands:
                continue
            out.append((survey, bname.split("=", 1)[1]))
    if not out:
        present = {}
        for survey_dir in sorted(paths.fs.ls(root, detail=False)):
            name = survey_dir.rstrip("/").rsplit("/", 1)[-1]
            if name.startswith("survey="):
                present[name.split("=", 1)[1]] = [b.rstrip("/").rsplit("=", 1)[-1]
                                                  for b in sorted(paths.fs.ls(survey_dir, detail=False))]
        held = "; ".join(f"{s} (bands {', '.join(b)})" for s, b in present.items()) or "nothing"
        raise FileNotFoundError(f"{lake}: no lightcurves for surveys={surveys} bands={bands}; the lake holds {held}")
    return out


def partition_paths(lake: str, surveys: list[str] | None = None, bands: list[str] | None = None) -> list[str]:
    """The existing ``lightcurves/survey=S/band=B`` folders for the selection (names validated), as URLs."""
    from astromer.lake.paths import LakePaths

    paths = LakePaths(lake)
    return [paths.url_of(paths.lightcurves(survey, band)) for survey, band in partitions(lake, surveys, bands)]


def quiet_progress() -> None:
    """Ray Data's progress bars flood job logs (one line per operator per refresh); the jobs log their own."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


def row_groups(spec: DataSpec) -> list[dict]:
    """The read units of the selection: one per Parquet row group of every ``lightcurves`` file, with the
    survey and band of its partition folder and its number of curves (``rows``). Only the files' footers
    are read, several at a time (an object store answers each after a round trip), and each file's once per
    process while it stays the same size and age: the job counts the curves, then lists the units again
    to train on them."""
    from concurrent.futures import ThreadPoolExecutor

    from astromer.lake.paths import LakePaths

    paths = LakePaths(spec.lake)
    files = []
    for survey, band in partitions(spec.lake, spec.surveys, spec.bands):
        folder = paths.lightcurves(survey, band)
        paths.fs.invalidate_cache(folder)   # an object store's listing is kept by fsspec: ask afresh, stamps too
        found = paths.fs.glob(folder + "/*.parquet", detail=True)
        files += [(name, info, survey, band) for name, info in sorted(found.items())]
    with ThreadPoolExecutor(max_workers=8) as pool:
        counts = list(pool.map(lambda f: _row_group_rows(paths.fs, f[0], f[1]), files))
    units = [{"url": paths.url_of(name), "row_group": g, "rows": rows, "survey": survey, "band": band}
             for (name, _, survey, band), per_group in zip(files, counts) for g, rows in enumerate(per_group)]
    if not units:
        raise FileNotFoundError(f"{spec.lake}: no lightcurves files for surveys={spec.surveys} bands={spec.bands}")
    return units


_FOOTERS: dict[tuple, tuple[int, ...]] = {}
_FOOTERS_KEPT = 100_000
# what tells a rewritten file apart, as fsspec's file systems name it (local, S3, GCS, Azure)
_STAMPS = ("mtime", "LastModified", "last_modified", "ETag", "etag", "md5Hash", "generation", "created")


def _row_group_rows(fs, name: str, info: dict) -> tuple[int, ...]:
    """Curves per row group of one Parquet file, from its footer; kept while the file keeps its size and
    every modification stamp its file system gives (a rewritten file is read again; a file system that
    gives no stamp is never kept)."""
    import pyarrow.parquet as pq

    stamps = tuple((k, str(info[k])) for k in _STAMPS if info.get(k))
    key = (getattr(fs, "protocol", None), name, info.get("size"), stamps)
    if stamps and key in _FOOTERS:
        return _FOOTERS[key]
    with fs.open(name, "rb") as handle:
        meta = pq.ParquetFile(handle).metadata
    rows = tuple(meta.row_group(g).num_rows for g in range(meta.num_row_groups))
    if stamps:
        if len(_FOOTERS) >= _FOOTERS_KEPT:
            _FOOTERS.clear()
        _FOOTERS[key] = rows
    return rows


def read_row_group(unit: dict):
    """One read unit as an Arrow table of READ_COLUMNS plus survey and band (the body of the read tasks)."""
    import fsspec
    import pyarrow as pa
    import pyarrow.parquet as pq

    from astromer.lake.schema import LIGHTCURVES

    url = str(unit["url"])
    with fsspec.open(url, "rb") as handle:
        parquet = pq.ParquetFile(handle)
        present = [c for c in READ_COLUMNS if c in parquet.schema_arrow.names]
        # one thread: a read task is one core's worth, and several run at once; Arrow's pool of threads
        # in each task cost CPU and, on 2 cores, 13 to 23% of the stream (docs/performance.md)
        table = parquet.read_row_group(int(unit["row_group"]), columns=present, use_threads=False)
    if "quality" not in present:      # a lake written without flags: the cleaning computes them
        table = table.append_column("quality", pa.nulls(table.num_rows, LIGHTCURVES.field("quality").type))
    for name in ("survey", "band"):
        table = table.append_column(name, pa.array([str(unit[name])] * table.num_rows, pa.string()))
    table = table.select(READ_COLUMNS + ["survey", "band"])
    # every unit in the lake's types, whatever wrote its file (parts written before the observations'
    # elements were declared non-null): Ray Data may put the units of several files in one block
    return table.cast(pa.schema([pa.field(f.name, LIGHTCURVES.field(f.name).type if f.name in LIGHTCURVES.names
                                          else f.type) for f in table.schema]))


#: Ray Data's block size for the curve and window streams. Its default (128 MiB) holds a task's output back
#: until about 33,000 windows are made, so the trainers got the first batch of an epoch only then, and in
#: bursts after it; 8 MiB is about one row group's windows (2,048 curves).
STREAM_BLOCK_BYTES = 8 << 20


def read_task_count(spec: DataSpec, units: int) -> int:
    """How many tasks read the lake: ``spec.read_tasks``, or half the Ray cluster's CPUs (the other half is
    left to the trainers and to the collation of their batches), at least 1 and at most one per row group."""
    tasks = spec.read_tasks
    if tasks <= 0:
        import ray

        cpus = ray.cluster_resources().get("CPU", 1) if ray.is_initialized() else (os.cpu_count() or 1)
        tasks = int(cpus) // 2
    return max(1, min(int(tasks), units))


def split_units(units: list[dict], tasks: int) -> list[list[dict]]:
    """``units`` cut into ``tasks`` runs of consecutive row groups (a task reads neighbouring row groups of
    the same files) of about equal row counts: a run closes once it reaches its share of the rows, or when
    each run still to come needs one of the units left."""
    tasks = max(1, min(tasks, len(units)))
    total = sum(int(u["rows"]) for u in units)
    runs: list[list[dict]] = []
    current: list[dict] = []
    done = 0
    for i, unit in enumerate(units):
        current.append(unit)
        done += int(unit["rows"])
        runs_to_come = tasks - len(runs) - 1
        if runs_to_come and (done * tasks >= total * (len(runs) + 1) or len(units) - i - 1 == runs_to_come):
            runs.append(current)
            current = []
    return runs + [current] if current else runs


def read_lightcurves(spec: DataSpec, shuffle: bool = False, units: list[dict] | None = None):
    """A lazy Ray Dataset of the selected curves with columns object_id, mjd, mag, err, quality, survey, band.

    The read units are the Parquet row groups (about two thousand curves each), listed once in the driver
    from the files' footers, and cut into :func:`read_task_count` runs of consecutive row groups. Each task
    streams through its run one row group at a time, and Ray Data fuses the cleaning and windowing that
    follow into the same task, so a task holds one row group's curves and windows at a time, and its
    windows leave in blocks of :data:`STREAM_BLOCK_BYTES`.

    On 2 cores, streaming alone at batch 512 from a lake of 224 row groups (docs/performance.md): two tasks
    gave 1.3 to 2.0 times what one did. Before, Ray Data bundled up to 256 row groups (the window map's batch
    size) into a single task, which sent its windows in 128 MiB blocks. Ray Data's own Parquet reader lists
    the folders again on every pass and hands the windowing whole 128 MiB blocks, after the read of each
    has finished.

    ``shuffle`` (training): the row groups are dealt to the tasks across surveys and bands
    (:func:`deal_units`), and each task reads its share in a new random order on every pass. Consecutive
    row groups hold one survey and band: read in lake order, each task, and so the batches of the worker it
    fed, kept to the same surveys, in the same order, pass after pass."""
    import ray.data

    quiet_progress()
    units = row_groups(spec) if units is None else units     # (``units``: the row groups, already listed)
    tasks = read_task_count(spec, len(units))
    shares = deal_units(units, tasks) if shuffle else split_units(units, tasks)
    ds = ray.data.from_items([{"share": k, "units": share} for k, share in enumerate(shares)],
                             override_num_blocks=len(shares))
    ds.context.target_max_block_size = STREAM_BLOCK_BYTES      # this dataset and those derived from it
    clock = spec.pass_clock if shuffle else None
    ds = ds.map_batches(_read_units, fn_kwargs={"shuffle": shuffle, "seed": spec.seed, "clock": clock},
                        batch_size=1, batch_format="pyarrow", num_cpus=spec.data_cpus)
    if spec.label_set:
        ds = _join_labels(ds, spec)
    return ds


def _read_units(batch, shuffle: bool = False, seed: int = 0, clock: str | None = None):
    """Yield the row groups of a share one at a time (the task never holds more than one); with ``shuffle``
    in a new random order on every call (every pass over the data).

    With a ``clock`` (a reproducible run) the order is drawn from (seed, pass, share), and every table
    carries the pass in a ``pass`` column, from which the windowing seeds its draws."""
    import pyarrow as pa

    epoch = current_pass(clock) if clock else None
    for number, share in zip(batch.column("share").to_pylist(), batch.column("units").to_pylist()):
        rng = np.random.default_rng(None if epoch is None else [seed, epoch, number])
        order = rng.permutation(len(share)).tolist() if shuffle else range(len(share))
        for k in order:
            table = read_row_group(share[k])
            yield table if epoch is None else table.append_column(
                PASS_COLUMN, pa.array(np.full(table.num_rows, epoch, np.int64)))


# --------------------------------------------------------------------------- reproducible passes

#: the column of a reproducible run's training curves that holds the pass (epoch) they were read for
PASS_COLUMN = "pass"


class PassClock:
    """The pass (epoch) a reproducible run's training stream is on. Rank 0 sets it before each pass (Ray
    Data starts a pass only once every worker has asked for it); the read tasks read it and seed their
    draws with it, so the same pass draws the same windows and masks in every run, and a resumed run draws
    its pass again. A named Ray actor, owned by the job's driver."""

    def __init__(self, value: int = 0):
        self.value = int(value)

    def set(self, value: int) -> None:
        self.value = int(value)

    def get(self) -> int:
        return self.value


def start_pass_clock(name: str):
    """Create the named PassClock actor on this (the driver's) node, whose loss ends the job anyway: placed
    elsewhere, the loss of that node would leave the workers' restarts without their clock."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0)(PassClock).options(name=name, scheduling_strategy=here).remote()


def units_digest(units: list[dict]) -> str:
    """A digest of the selected row groups (file, row group, curves): another lake, or an ingest since, gives
    another (a reproducible run resumed over it no longer repeats itself)."""
    key = json.dumps(sorted((str(u["url"]), int(u["row_group"]), int(u["rows"])) for u in units))
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def validation_digest(spec: DataSpec, units: list[dict]) -> str:
    """A digest of everything that decides the validation windows and masks: the selected row groups (by their
    place in the lake, not the lake's address), the ingest each selected survey holds now (its content), the
    cleaning, the split, the window and probe settings and the seed. Two runs with the same digest scored their
    validation RMSE on the same windows, so the figures compare."""
    from dataclasses import asdict

    from astromer.lake.catalog import published_ingest_id

    groups = sorted((u["survey"], u["band"], posixpath.basename(str(u["url"])), int(u["row_group"]), int(u["rows"]))
                    for u in units)
    surveys = sorted({u["survey"] for u in units})
    key = {"row_groups": groups, "ingests": {s: published_ingest_id(spec.lake, s) for s in surveys},
           **{k: v for k, v in asdict(spec).items()
              if k not in ("lake", "surveys", "bands", "data_cpus", "read_tasks", "pass_clock")}}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def set_pass(clock: str, value: int) -> None:
    import ray

    ray.get(ray.get_actor(clock).set.remote(value))


def current_pass(clock: str) -> int:
    import ray

    try:
        actor = ray.get_actor(clock)
    except ValueError as exc:
        raise RuntimeError(f"reproducible run: its pass clock {clock!r} is gone (was the job's driver "
                           "stopped?)") from exc
    return int(ray.get(actor.get.remote()))


def deal_units(units: list[dict], tasks: int) -> list[list[dict]]:
    """``units`` dealt to ``tasks`` shares of about equal row counts, largest first, each to the share with
    the fewest rows so far: row groups of similar size (every survey's full ones) go round the tasks, so each
    share mixes the surveys and bands instead of holding a run of neighbours."""
    tasks = max(1, min(tasks, len(units)))
    shares: list[list[dict]] = [[] for _ in range(tasks)]
    rows = [0] * tasks
    for unit in sorted(units, key=lambda u: -int(u["rows"])):     # a stable sort keeps the lake order in ties
        k = rows.index(min(rows))
        shares[k].append(unit)
        rows[k] += int(unit["rows"])
    return shares


def label_lookup(spec: DataSpec) -> dict[tuple[str, str], str]:
    """(survey, object_id) -> label for ``spec.label_set`` (among ``spec.labels`` when given) in the selected
    surveys; an empty selection raises ValueError naming the label sets, or the labels, that there are."""
    import pyarrow.parquet as pq

    from astromer.lake.paths import LakePaths

    paths = LakePaths(spec.lake)
    if not paths.fs.exists(paths.labels()):
        raise ValueError(f"{spec.lake}: no labels table (the ingest of a labelled survey writes it)")
    table = pq.read_table(paths.labels(), filesystem=None if paths.is_local else paths.fs)
    frame = everything = table.to_pandas()
    if spec.surveys:
        frame = frame[frame["survey"].isin(spec.surveys)]
    in_set = frame[frame["label_set"] == spec.label_set]
    chosen = in_set[in_set["label"].isin(spec.labels)] if spec.labels else in_set
    where = f"surveys {spec.surveys}" if spec.surveys else "the lake"
    if frame.empty:
        raise ValueError(f"{spec.lake}: no labels in {where}; the labelled surveys are "
                         f"{sorted(set(everything['survey']))}")
    if in_set.empty:
        raise ValueError(f"{spec.lake}: no label set {spec.label_set!r} in {where}; there are "
                         f"{sorted(set(frame['label_set']))}")
    # every label asked for must be there: a misspelt one would otherwise drop its class without a word
    there = set(in_set["label"])
    missing = [label for label in spec.labels or [] if label not in there]
    if missing:
        raise ValueError(f"{spec.lake}: {'none of the labels' if chosen.empty else 'no curve has the label(s)'} "
                         f"{missing} in label set {spec.label_set!r} of {where}; there are {sorted(there)}")
    return {(s, o): lab for s, o, lab in zip(chosen["survey"], chosen["object_id"], chosen["label"])}


def count_selected_curves(spec: DataSpec) -> int:
    """Curves of the selection, before cleaning: from the Parquet footers, or with a label set, the curves
    whose object has one of the chosen labels (their ids read, nothing else)."""
    units = row_groups(spec)
    if not spec.label_set:
        return sum(unit["rows"] for unit in units)
    import pyarrow.parquet as pq

    from astromer.lake.paths import LakePaths

    lookup = label_lookup(spec)
    fs = LakePaths(spec.lake).fs
    count = 0
    for url, survey in {unit["url"]: unit["survey"] for unit in units}.items():   # a file per row groups
        with fs.open(url, "rb") as handle:
            ids = pq.read_table(handle, columns=["object_id"]).column("object_id").to_pylist()
        count += sum((survey, object_id) in lookup for object_id in ids)
    return count


def _join_labels(ds, spec: DataSpec):
    """Keep curves that have a label in ``spec.label_set`` (and among ``spec.labels`` when given); adds a
    ``label`` column. The label table is small (one string per object), so it travels with the task."""
    lookup = label_lookup(spec)

    def attach(batch):
        # Arrow in and out: the curves keep their list columns for the windowing's flat path
        import pyarrow as pa

        labels = [lookup.get((s, o)) for s, o in zip(batch.column("survey").to_pylist(),
                                                      batch.column("object_id").to_pylist())]
        keep = pa.array([lab is not None for lab in labels], pa.bool_())
        return batch.filter(keep).append_column("label", pa.array([lab for lab in labels if lab is not None],
                                                                  pa.string()))

    return ds.map_batches(attach, batch_format="pyarrow", batch_size=None, num_cpus=spec.data_cpus)


# --------------------------------------------------------------------------- clean + window

def _clean_curve(batch: dict, i: int, spec: DataSpec):
    """Row ``i`` of a batch as (mjd, mag, err), the quality flags that count, and the cleaning verdict:
    the paper's cleaning (or, with ``clean=False``, finite values only), then ``min_observations``."""
    from astromer.lake.cleaning import CleanResult, clean_curve
    from astromer.lake.schema import quality_flags

    mjd = np.asarray(batch["mjd"][i], np.float64)
    mag = np.asarray(batch["mag"][i], np.float32)
    err = np.asarray(batch["err"][i], np.float32)
    if spec.clean:
        quality = batch["quality"][i]
        if quality is None:     # a lake written without flags: compute them as the ingest does
            *_, quality = quality_flags(mjd.copy(), mag.astype(np.float64), err.astype(np.float64),
                                        np.array([0, len(mjd)]))
        quality = np.asarray(quality, np.uint8)
        result = clean_curve(mjd, mag, err, quality, drop_noisy=spec.drop_noisy)
    else:
        quality = np.zeros(len(mjd), np.uint8)            # nothing is dropped by a flag
        result = CleanResult(np.isfinite(mjd) & np.isfinite(mag) & np.isfinite(err), True, None)
    if result.usable and int(result.keep.sum()) < spec.min_observations:
        result = CleanResult(result.keep, False, "fewer_than_min_observations")
    return mjd, mag, err, quality, result


def _clean_rows(batch: dict, spec: DataSpec, rows) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
    """(row, mjd, mag, err) of each usable curve among ``rows`` of a batch, with the paper's cleaning."""
    for i in rows:
        mjd, mag, err, _, result = _clean_curve(batch, i, spec)
        if result.usable:
            yield i, mjd[result.keep], mag[result.keep], err[result.keep]


def count_cleaning(batch, spec: DataSpec) -> dict:
    """What the cleaning does to one batch of curves (a dict of numpy columns or an Arrow table), per split:
    one row per split holding the :class:`astromer.lake.cleaning.CleaningStats` counts as JSON (merged by
    :func:`cleaning_report`). An Arrow batch is counted for all its curves at once where it can be."""
    from astromer.lake.cleaning import CleaningStats

    flat, columns = _flat_or_columns(batch)
    if flat is not None:
        return _count_cleaning_flat(batch, flat, spec)
    batch = columns
    stats: dict[str, CleaningStats] = {}
    for i in range(len(batch["object_id"])):
        split = split_of(batch["survey"][i], batch["band"][i], batch["object_id"][i],
                         val_fraction=spec.val_fraction, test_fraction=spec.test_fraction, seed=spec.seed)
        *_, quality, result = _clean_curve(batch, i, spec)
        stats.setdefault(split, CleaningStats()).add(quality, result)
    splits = sorted(stats)
    return {"split": np.asarray(splits, dtype=str),
            "stats": np.asarray([json.dumps(stats[s].as_dict()) for s in splits], dtype=str)}


def _count_cleaning_flat(table, flat: tuple[dict, np.ndarray], spec: DataSpec) -> dict:
    """:func:`count_cleaning` for all the curves of an Arrow batch at once (the same counts)."""
    from astromer.lake.cleaning import MIN_OBS, CleaningStats, segment_sums
    from astromer.lake.schema import CLEANING_MASK, Quality

    values, offsets = flat
    splits = _splits(spec, *_identities(table))
    lengths = np.diff(offsets)
    _, n_kept, usable = _clean_flat(values["mjd"], values["mag"], values["err"], values["quality"], offsets, spec)
    if spec.clean:
        quality = np.asarray(values["quality"], np.uint8)
        reason = np.where(usable, "", np.where(n_kept < MIN_OBS, "too_few_observations", "noisy"))
        hits = {flag.name: segment_sums((quality & flag.value) != 0, offsets, np.int64)
                for flag in Quality if flag.value & CLEANING_MASK}
    else:      # finite values only; no flag drops anything
        reason, hits = np.full(len(lengths), "", dtype=object), {}
    short = usable & (n_kept < spec.min_observations)
    reason = np.where(short, "fewer_than_min_observations", reason)
    usable = usable & ~short
    names = sorted(set(splits.tolist()))
    stats = []
    for split in names:
        mine = splits == split
        rejected = reason[mine & ~usable]
        stats.append(CleaningStats(
            curves=int(mine.sum()), usable_curves=int((mine & usable).sum()), observations=int(lengths[mine].sum()),
            kept_observations=int(n_kept[mine & usable].sum()),
            dropped_by_flag={name: int(h[mine].sum()) for name, h in hits.items() if h[mine].any()},
            rejected_curves={str(r): int((rejected == r).sum()) for r in sorted(set(rejected.tolist()))}))
    return {"split": np.asarray(names, dtype=str),
            "stats": np.asarray([json.dumps(s.as_dict()) for s in stats], dtype=str)}


def cleaning_report(spec: DataSpec, source=None) -> dict:
    """The effect of the cleaning on the selected curves, per split (train/val/test) and in total, counted
    over one read of the lake: curves, usable curves, observations and kept observations, observations
    carrying each dropping flag, curves rejected per reason."""
    source = read_lightcurves(spec) if source is None else source
    rows = source.map_batches(count_cleaning, fn_kwargs={"spec": spec}, batch_format="pyarrow", batch_size=None,
                              num_cpus=spec.data_cpus).take_all()
    report: dict[str, dict] = {}
    for row in rows:
        for key in (str(row["split"]), "all"):
            _merge_counts(report.setdefault(key, {}), json.loads(str(row["stats"])))
    return report


def _merge_counts(into: dict, counts: dict) -> None:
    for key, value in counts.items():
        if isinstance(value, dict):
            _merge_counts(into.setdefault(key, {}), value)
        else:
            into[key] = into.get(key, 0) + value


def make_windows(batch, spec: DataSpec, split: str, fixed: bool) -> dict:
    """Curves of one split -> one window each with its probe selection.

    ``fixed=False`` (training): new entropy on every call, so every pass over the data (every epoch) draws
    new windows and new selections. ``fixed=True`` (validation, test): each curve's generator is seeded by
    its hash, so every pass sees the same windows and selections.

    ``batch`` is a dict of numpy columns or an Arrow table (what the stream passes). The windows of an Arrow
    batch are cut for all its curves at once (:func:`_windows_flat`); a batch that path declines goes curve
    by curve.
    """
    rng = None if fixed else _training_rng(spec, batch)
    flat, columns = _flat_or_columns(batch)
    if flat is not None:
        return _windows_flat(batch, flat, spec, split, rng)
    batch = columns
    length = spec.window_length
    in_split = [i for i in range(len(batch["object_id"]))
                if split_of(batch["survey"][i], batch["band"][i], batch["object_id"][i],
                            val_fraction=spec.val_fraction, test_fraction=spec.test_fraction,
                            seed=spec.seed) == split]
    rows, times, mags, errs, padding, seeds = [], [], [], [], [], []
    for i, mjd, mag, err in _clean_rows(batch, spec, in_split):
        if fixed:
            seed = curve_hash(batch["survey"][i], batch["band"][i], batch["object_id"][i], spec.seed + 1)
            curve_rng = np.random.default_rng(seed)
            seeds.append(seed)
        else:
            curve_rng = rng
        w = random_window(mjd, mag, err, length=length, rng=curve_rng)
        rows.append(i)
        times.append(w.times[0])
        mags.append(w.mags[0])
        errs.append(w.errs[0])
        padding.append(w.padding[0])
    n = len(rows)
    if n == 0:
        return _empty_batch(length, with_label="label" in batch)
    times, mags, errs, padding = (np.stack(a) for a in (times, mags, errs, padding))
    if fixed:
        # one seeded generator per window keeps each window's selection independent of batch composition
        parts = [probe(mags[k:k + 1], padding[k:k + 1], rng=np.random.default_rng(seeds[k] ^ 0x5EED),
                       config=spec.mask) for k in range(n)]
        mags_in = np.concatenate([p.mags_in for p in parts])
        hidden = np.concatenate([p.hidden for p in parts])
        probed = np.concatenate([p.probed for p in parts])
    else:
        p = probe(mags, padding, rng=rng, config=spec.mask)
        mags_in, hidden, probed = p.mags_in, p.hidden, p.probed
    out = {"times": times, "mags_in": mags_in, "target": mags, "errs": errs, "padding": padding,
           "hidden": hidden, "probed": probed,
           "object_id": np.asarray([batch["object_id"][i] for i in rows]).astype(str)}
    if "label" in batch:
        out["label"] = np.asarray([batch["label"][i] for i in rows]).astype(str)
    return out if fixed else _shuffled(out, rng)


FLAT_COLUMNS = ("mjd", "mag", "err", "quality")


def flat_curves(table, columns=FLAT_COLUMNS) -> tuple[dict, np.ndarray] | None:
    """The list ``columns`` of an Arrow batch of curves as flat numpy arrays with one offsets array
    ({name: values}, offsets: curve ``i`` is ``values[name][offsets[i]:offsets[i + 1]]``), or None where a
    curve is null, a value is null (a lake written without flags, say) or the columns disagree on a curve's
    length: the curve-by-curve paths handle those."""
    import pyarrow as pa

    values, offsets = {}, None
    for name in columns:
        column = table.column(name)
        array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        if not (pa.types.is_list(array.type) or pa.types.is_large_list(array.type)) or array.null_count:
            return None
        own = np.asarray(array.offsets, np.int64)
        child = array.values.slice(int(own[0]), int(own[-1] - own[0]))
        if child.null_count:
            return None
        own = own - own[0]
        if offsets is None:
            offsets = own
        elif not np.array_equal(offsets, own):
            return None
        values[name] = child.to_numpy(zero_copy_only=False)
    return values, offsets


def _flat_or_columns(batch) -> tuple[tuple[dict, np.ndarray] | None, dict | None]:
    """(the flat curves of an Arrow batch, None) where the all-at-once paths take it, else (None, the dict of
    numpy columns the curve-by-curve paths take): a numpy batch as it is, an Arrow one converted."""
    import pyarrow as pa

    if not isinstance(batch, pa.Table):
        return None, batch
    flat = flat_curves(batch)
    return (flat, None) if flat is not None else (None, _numpy_columns(batch))


def _numpy_columns(table) -> dict:
    """An Arrow batch as the dict of numpy columns the curve-by-curve paths take."""
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}


def _identities(table) -> tuple[list, list, list]:
    """(object ids, surveys, bands) of the curves of an Arrow batch."""
    return tuple(table.column(name).to_pylist() for name in ("object_id", "survey", "band"))


def _splits(spec: DataSpec, ids: list, surveys: list, bands: list) -> np.ndarray:
    """The split ('train', 'val' or 'test') of every curve."""
    return np.array([split_of(s, b, o, val_fraction=spec.val_fraction, test_fraction=spec.test_fraction,
                              seed=spec.seed) for o, s, b in zip(ids, surveys, bands)])


def _clean_flat(mjd, mag, err, quality, offsets: np.ndarray, spec: DataSpec):
    """(keep, n_kept, usable) of flat curves, as :func:`_clean_curve` decides them one by one (before its
    ``min_observations`` check): the paper's cleaning, or with ``clean=False`` finite values only."""
    from astromer.lake.cleaning import clean_curves, segment_sums

    if spec.clean:
        return clean_curves(np.asarray(mag, np.float32), quality, offsets, drop_noisy=spec.drop_noisy)
    keep = np.isfinite(np.asarray(mjd, np.float64)) & np.isfinite(np.asarray(mag, np.float32)) \
        & np.isfinite(np.asarray(err, np.float32))
    return keep, segment_sums(keep, offsets, np.int64), np.ones(len(offsets) - 1, bool)


def _windows_flat(table, flat: tuple[dict, np.ndarray], spec: DataSpec, split: str,
                  rng: np.random.Generator | None) -> dict:
    """:func:`make_windows` for all the curves of one Arrow batch at once: the split, the cleaning
    (:func:`astromer.lake.cleaning.clean_curves`, the same decisions), the windows (one gather) and the
    probe selection. Training windows are drawn as the curve-by-curve path draws them (windows of the same
    law), in a fifth to a quarter of the time (docs/performance.md). Fixed windows take their start and
    selection from the same per-curve generators as the curve-by-curve path (the same windows, centred up
    to the last bit of the means). ``rng``: the training batch's generator; None for fixed windows."""
    from astromer.windows import seeded_probe, windows_at

    fixed = rng is None
    values, offsets = flat
    length = spec.window_length
    ids, surveys, bands = _identities(table)
    in_split = _splits(spec, ids, surveys, bands) == split
    # only the split's curves go on (a tenth of the batch for validation)
    lengths = np.diff(offsets)
    members = np.flatnonzero(in_split)                                          # [S] rows of the batch
    observations = np.repeat(in_split, lengths)
    offsets = np.concatenate([[0], np.cumsum(lengths[members])])
    mjd, mag, err, quality = (np.asarray(values[name])[observations] for name in FLAT_COLUMNS)
    keep, n_kept, usable = _clean_flat(mjd, mag, err, quality, offsets, spec)
    chosen = usable & (n_kept >= max(spec.min_observations, 1))                # [S]
    if not chosen.any():
        return _empty_batch(length, with_label="label" in table.column_names)
    take = keep & np.repeat(chosen, np.diff(offsets))                            # kept rows of chosen curves
    packed = np.concatenate([[0], np.cumsum(n_kept[chosen])])
    n_kept, rows = n_kept[chosen], members[chosen]                               # rows: of the batch
    if fixed:
        # each curve's own generator, seeded by its hash: the draws random_window and probe make for it
        seeds = [curve_hash(surveys[i], bands[i], ids[i], spec.seed + 1) for i in rows.tolist()]
        start = [int(np.random.default_rng(seed).integers(0, n - length + 1)) if n > length else 0
                 for seed, n in zip(seeds, n_kept.tolist())]
        w = windows_at(mjd[take], mag[take], err[take], packed, np.asarray(start, np.int64), length=length)
        p = seeded_probe(w.mags, w.padding, [seed ^ 0x5EED for seed in seeds], config=spec.mask)
    else:
        w = random_windows(mjd[take], mag[take], err[take], packed, length=length, rng=rng)
        p = probe(w.mags, w.padding, rng=rng, config=spec.mask)
    out = {"times": w.times, "mags_in": p.mags_in, "target": w.mags, "errs": w.errs, "padding": w.padding,
           "hidden": p.hidden, "probed": p.probed, "object_id": np.asarray([ids[i] for i in rows]).astype(str)}
    if "label" in table.column_names:
        labels = table.column("label").to_pylist()
        out["label"] = np.asarray([labels[i] for i in rows]).astype(str)
    return out if fixed else _shuffled(out, rng)


def _training_rng(spec: DataSpec, batch) -> np.random.Generator:
    """The generator of a batch of training curves: fresh entropy, or in a reproducible run (a batch with
    the ``pass`` column) seeded by the seed, the pass and the batch's first curve and size, so that the
    same pass of the same run draws the same windows and masks."""
    columns = batch.column_names if hasattr(batch, "column_names") else list(batch)
    if PASS_COLUMN not in columns:
        return np.random.default_rng()
    rows = batch.num_rows if hasattr(batch, "num_rows") else len(batch[PASS_COLUMN])
    if not rows:
        return np.random.default_rng(spec.seed)
    first = {name: (batch.column(name)[0].as_py() if hasattr(batch, "column") else batch[name][0])
             for name in (PASS_COLUMN, "survey", "band", "object_id")}
    return np.random.default_rng([spec.seed, int(first[PASS_COLUMN]), rows,
                                  curve_hash(first["survey"], first["band"], first["object_id"], spec.seed)])


def _shuffled(batch: dict, rng: np.random.Generator) -> dict:
    """The windows of a training batch in random order (a row group holds its curves sorted by object)."""
    order = rng.permutation(len(batch["times"]))
    return {k: v[order] for k, v in batch.items()}


def _empty_batch(length: int, with_label: bool = False) -> dict:
    f = np.zeros((0, length), np.float32)
    b = np.zeros((0, length), bool)
    out = {"times": f, "mags_in": f, "target": f, "errs": f, "padding": b, "hidden": b, "probed": b,
           "object_id": np.zeros(0, dtype=str)}
    if with_label:
        out["label"] = np.zeros(0, dtype=str)
    return out


def window_dataset(spec: DataSpec, split: str, source=None):
    """Lazy Ray Dataset of masked windows of ``split`` ('train': fresh each pass; 'val'/'test': fixed)."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: expected one of {SPLITS}")
    source = read_lightcurves(spec) if source is None else source
    return source.map_batches(_windows_block, fn_kwargs={"spec": spec, "split": split, "fixed": split != "train"},
                              batch_format="pyarrow", batch_size=None, num_cpus=spec.data_cpus)


def _windows_block(batch, spec: DataSpec, split: str, fixed: bool):
    """:func:`make_windows` for Ray Data. A batch with no window goes back as an Arrow table of the usual
    column types: Ray stores an empty 2-D array as pickled Python objects (with a warning), and that block's
    schema would then differ from the others'."""
    out = make_windows(batch, spec=spec, split=split, fixed=fixed)
    if len(out["times"]):
        return out
    import pyarrow as pa
    from ray.data.extensions import ArrowTensorArray

    return pa.table({k: ArrowTensorArray.from_numpy(v) if v.ndim == 2 else pa.array(v) for k, v in out.items()})


def make_datasets(spec: DataSpec, units: list[dict] | None = None) -> dict:
    """{'train', 'val', 'test'} lazy datasets over the row groups ``units`` (listed here when not given):
    training over a shuffled read (new row group orders on every pass), validation and test in lake order."""
    units = row_groups(spec) if units is None else units
    fixed = read_lightcurves(spec, units=units)
    return {split: window_dataset(spec, split, read_lightcurves(spec, shuffle=True, units=units)
                                  if split == "train" else fixed) for split in SPLITS}


TORCH_COLUMNS = list(BATCH_COLUMNS)


def iter_batches(dataset_or_shard, batch_size: int, *, drop_last: bool = False, device="cpu",
                 prefetch_batches: int = 2, shuffle_buffer: int = 0, shuffle_seed: int | None = None):
    """Torch batches (dict of tensors, the BATCH_COLUMNS) from a Dataset or a worker's DataIterator.

    ``shuffle_buffer`` (training): each batch is drawn at random from a buffer of at least this many
    windows (Ray Data's local shuffle), so that one batch mixes the row groups, and so the surveys and
    bands, that reached this worker lately; without it a batch holds neighbouring curves of one row group.
    ``shuffle_seed`` seeds that draw (reproducible runs)."""
    return dataset_or_shard.iter_torch_batches(
        batch_size=batch_size, drop_last=drop_last, device=device, prefetch_batches=prefetch_batches,
        local_shuffle_buffer_size=shuffle_buffer or None, local_shuffle_seed=shuffle_seed if shuffle_buffer else None,
        collate_fn=_collate_fn())


def _collate_fn():
    from ray.data.collate_fn import NumpyBatchCollateFn

    class TensorColumns(NumpyBatchCollateFn):
        """Keep the numeric columns (object ids and labels stay behind) as torch tensors."""

        def __call__(self, batch: dict):
            import torch

            # np.array copies: Arrow-backed numpy views are read-only and torch wants writable memory
            return {k: torch.from_numpy(np.array(batch[k])) for k in TORCH_COLUMNS}

    return TensorColumns()


def numpy_windows(curves, spec: DataSpec, rng: np.random.Generator) -> dict:
    """In-process version of the training windows for a small list of curves (mjd, mag, err): what
    ``fit_windows`` and the benchmark's in-memory ceiling use. No Ray, no cleaning."""
    length = spec.window_length
    times, mags, errs, padding = [], [], [], []
    for curve in curves:
        mjd, mag = curve[0], curve[1]
        err = curve[2] if len(curve) > 2 and curve[2] is not None else np.zeros(len(mjd), np.float32)
        w = random_window(np.asarray(mjd, np.float64), np.asarray(mag, np.float32), np.asarray(err, np.float32),
                          length=length, rng=rng)
        times.append(w.times[0])
        mags.append(w.mags[0])
        errs.append(w.errs[0])
        padding.append(w.padding[0])
    times, mags, errs, padding = (np.stack(a) for a in (times, mags, errs, padding))
    p = probe(mags, padding, rng=rng, config=spec.mask)
    return {"times": times, "mags_in": p.mags_in, "target": mags, "errs": errs, "padding": padding,
            "hidden": p.hidden, "probed": p.probed}
