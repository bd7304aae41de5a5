"""Embeddings at survey scale, and similarity search over them with DuckDB.

The embed job is four stages:

* plan: resolve the model (registered name + version, or a folder), list the survey's bands;
* map: one Ray Data pipeline reads ``lightcurves/survey=<s>/band=<b>`` of the chosen bands and an actor
  pool of :class:`CurveEmbedder` (one model per actor, CPU or GPU) embeds every window of every curve;
  the per-curve rows are written as Parquet into a staging folder outside ``embeddings/``;
* reduce: the staging folder gets the new files plus the published rows of bands not re-embedded;
* finish: the survey folder ``embeddings/model=<m>/version=<v>/survey=<s>/`` is swapped for the staged one,
  so a re-run for the same model version replaces rows and never duplicates them, and readers never
  see a half-written folder.

Rows (one per single-band curve): ``object_id``, ``band``, ``n_obs`` (observations used after cleaning),
``n_windows``, ``embedding`` (``FLOAT[D]``: the last block's mean over the real observations of all
windows) and ``layer_means`` (``FLOAT[D][n_layers + 1]``: the input embedding and every block, the
inputs of the ``skip`` classifier). A curve that cannot be embedded (no usable observation after
cleaning, or an embedding that is not finite) gets no row: it is listed with its reason in
``embeddings/model=<m>/version=<v>/_reports/survey=<s>.json``.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

READ_COLUMNS = ["object_id", "mjd", "mag", "err", "quality"]


# ----------------------------------------------------------------------------------------------
# schema and rows


def embeddings_schema(d_model: int, n_layers_in: int) -> pa.Schema:
    """Arrow schema of an embeddings file (fixed-size lists, so DuckDB sees ``FLOAT[D]`` after a cast)."""
    vector = pa.list_(pa.float32(), d_model)
    return pa.schema([
        pa.field("object_id", pa.string(), nullable=False),
        pa.field("band", pa.string(), nullable=False),
        pa.field("n_obs", pa.int32(), nullable=False),
        pa.field("n_windows", pa.int32(), nullable=False),
        pa.field("embedding", vector),
        pa.field("layer_means", pa.list_(vector, n_layers_in)),
    ])


def usable_curve(mjd, mag, err, quality=None, clean: bool = True) -> tuple[tuple | None, str | None]:
    """The observations a model may see: the lake's cleaning as a filter (``clean``), then strictly
    increasing finite times. Returns ((mjd, mag, err), None) or (None, reason)."""
    mjd = np.asarray(mjd, np.float64)
    mag = np.asarray(mag, np.float32)
    err = np.asarray(err, np.float32) if err is not None else np.zeros_like(mag)
    if clean and quality is not None:
        from astromer.lake.cleaning import clean_curve

        # observation-level cleaning only: the curve-level noise criteria are for pretraining corpora,
        # and every variable star still deserves an embedding
        keep = clean_curve(mjd, mag, err, quality, drop_noisy=False, min_obs=1).keep.copy()
    else:
        keep = np.ones(len(mjd), bool)
    keep &= np.isfinite(mjd) & np.isfinite(mag)
    mjd, mag, err = mjd[keep], mag[keep], err[keep]
    if len(mjd) and (np.diff(mjd) <= 0).any():  # duplicates the cleaning did not flag: keep the first
        order = np.argsort(mjd, kind="stable")
        mjd, mag, err = mjd[order], mag[order], err[order]
        first = np.concatenate([[True], np.diff(mjd) > 0])
        mjd, mag, err = mjd[first], mag[first], err[first]
    if len(mjd) == 0:
        return None, "no usable observation after cleaning"
    return (mjd, mag, err), None


PRECISIONS = ("bf16", "float32")


def check_precision(precision: str) -> str:
    """``bf16`` (autocast on a GPU: faster) or ``float32`` (what the CPU computes). On an H100 bf16 put the
    official Astromer 1 5.0% away from its reference reconstruction, float32 within 2e-4
    (tests/test_gpu.py)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {PRECISIONS}")
    return precision


class CurveEmbedder:
    """Ray Data callable class: loads the model once per actor, embeds a batch of curves.

    Input batch (pyarrow): ``object_id, mjd, mag, err, quality``; output: rows of
    :func:`embeddings_schema`. Curves that cannot be embedded are written, with their reason, as a small
    Parquet file under ``skipped_dir`` (the job's staging folder) and get no output row.
    """

    def __init__(self, model_dir: str, skipped_dir: str, band: str | None = None, batch_size: int = 256,
                 clean: bool = True, device: str | None = None, threads: int | None = None,
                 precision: str = "bf16", counter=None):
        import torch

        from astromer.weights import load_model_dir

        if threads:
            torch.set_num_threads(int(threads))
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_model_dir(model_dir).to(self.device).eval()
        self.model.bf16_on_cuda = check_precision(precision) == "bf16"   # no effect on a CPU
        self.band, self.batch_size, self.clean = band, batch_size, clean
        self.skipped_dir, self.counter = skipped_dir, counter
        cfg = self.model.config
        self.schema = embeddings_schema(cfg.d_model, cfg.n_layers + 1)

    def __call__(self, batch: pa.Table) -> pa.Table:
        if "path" in batch.schema.names:  # lightcurves/survey=<s>/band=<b>/part-<n>.parquet
            bands = [band_of_path(p) for p in batch.column("path").to_pylist()]
        else:
            bands = [self.band] * batch.num_rows
        table, skipped = embed_table(self.model, batch, bands, self.schema, self.batch_size, self.clean)
        if skipped.num_rows:
            from astromer.lake.paths import LakePaths
            from astromer.lake.writers import write_parquet

            paths = LakePaths(self.skipped_dir)
            write_parquet(paths.fs, skipped, paths.join(f"{uuid.uuid4().hex}.parquet"))
        if self.counter is not None and batch.num_rows:   # not awaited: the count is for the progress lines
            ends = [batch.column(c)[i].as_py() for c in ("path", "object_id") if c in batch.schema.names
                    for i in (0, batch.num_rows - 1)]
            self.counter.add.remote((*ends, batch.num_rows), batch.num_rows)
        return table


class CurveCounter:
    """A Ray actor counting the curves the embedding actors are done with (Ray Data's own progress counts
    blocks, and a survey is often a single block: it said 0/? until the end).

    Each batch is counted under a key (its first and last rows' files and objects, and its size): when an
    actor is lost, Ray Data runs its block again and the same batches come a second time; keyed, they count
    once.
    """

    def __init__(self):
        self.batches: set[int] = set()   # hashes of the batches' keys (hashed here: one process, one salt)
        self.curves = 0

    def add(self, key: tuple, n: int) -> None:
        key_hash = hash(key)
        if key_hash not in self.batches:
            self.batches.add(key_hash)
            self.curves += int(n)

    def count(self) -> int:
        return self.curves


@contextlib.contextmanager
def logged_progress(what: str, total: int, every: float):
    """Yields a :class:`CurveCounter` actor for the embedding actors to add to, and logs ``what: N of TOTAL
    curves (P%), R curves/s`` every ``every`` seconds while the block runs; the actor ends with the block."""
    import ray

    counter = ray.remote(num_cpus=0)(CurveCounter).remote()
    started, stop = time.perf_counter(), threading.Event()

    def report():
        while not stop.wait(every):
            try:
                done = ray.get(counter.count.remote(), timeout=every)
            except Exception:   # a late answer or a busy actor: skip a line, never the job
                continue
            elapsed = time.perf_counter() - started
            log.info("%s: %s of %s curves (%.0f%%), %.0f curves/s", what, f"{done:,}", f"{total:,}",
                     100 * done / max(total, 1), done / elapsed)

    thread = threading.Thread(target=report, name="embed-progress", daemon=True)
    thread.start()
    try:
        yield counter
    finally:
        stop.set()
        thread.join()
        ray.kill(counter)


SKIPPED_SCHEMA = pa.schema([pa.field("object_id", pa.string()), pa.field("band", pa.string()),
                            pa.field("reason", pa.string())])


def band_of_path(path: str) -> str:
    for part in reversed(str(path).split("/")):
        if part.startswith("band="):
            return part[len("band="):]
    raise ValueError(f"{path}: not under a band=<b> partition folder")


def embed_table(model, batch: pa.Table, bands: Sequence[str] | str, schema: pa.Schema, batch_size: int = 256,
                clean: bool = True) -> tuple[pa.Table, pa.Table]:
    """Embed the curves of one Arrow batch (the body of the Ray map stage, usable without Ray).

    ``bands``: the band of every row (or one band for all). Returns the embedded rows and the skipped curves
    (object_id, band, reason). The curves are cleaned and cut into windows all at once
    (:func:`_flat_embedding`); a batch that path declines (null values, times out of order after the
    cleaning) goes curve by curve (:func:`usable_curve`)."""
    bands = [bands] * batch.num_rows if isinstance(bands, str) else list(bands)
    ids = np.array(batch.column("object_id").to_pylist(), dtype=object)
    done = _flat_embedding(model, batch, batch_size, clean)
    rows, reasons, n_obs, n_windows, layers = done if done is not None else \
        _curve_by_curve_embedding(model, batch, batch_size, clean)
    # a NaN or infinite embedding is never published (similarity search would rank it as nan): the curve is
    # listed as skipped with its reason
    finite = np.isfinite(layers).all(axis=tuple(range(1, layers.ndim)))
    if not finite.all():
        for j in np.flatnonzero(~finite):
            reasons[rows[j]] = "the model's embedding is not finite (NaN or infinite values)"
        rows = [row for row, ok in zip(rows, finite) if ok]
        layers = layers[finite]
    d, k = model.config.d_model, model.config.n_layers + 1
    # fixed-size lists without nulls (Parquet readers mishandle null fixed-size lists)
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(layers.reshape(-1), pa.float32()), d)
    layer_means = pa.FixedSizeListArray.from_arrays(vectors, k)
    last = pa.FixedSizeListArray.from_arrays(pa.array(layers[:, -1].reshape(-1), pa.float32()), d)
    table = pa.Table.from_arrays([
        pa.array(ids[rows].tolist() if rows else [], pa.string()), pa.array([bands[i] for i in rows], pa.string()),
        pa.array(n_obs[rows]), pa.array(n_windows[rows]), last, layer_means,
    ], schema=schema)
    bad = [i for i in range(batch.num_rows) if reasons[i] is not None]
    skipped = pa.Table.from_pylist([{"object_id": ids[i], "band": bands[i], "reason": reasons[i]} for i in bad],
                                   schema=SKIPPED_SCHEMA)
    return table, skipped


def _flat_embedding(model, batch: pa.Table, batch_size: int, clean: bool):
    """(rows, reasons, n_obs, n_windows, layers) of :func:`embed_table` for all the curves at once: the
    observations :func:`usable_curve` keeps (the lake's flags, finite values) taken from the flat columns,
    every window cut in one gather (:func:`astromer.windows.flat_windows`), then the encoder. None where the
    curve-by-curve path must decide: null values, or kept times that do not strictly increase."""
    from astromer.data import flat_curves
    from astromer.lake.cleaning import segment_sums
    from astromer.lake.schema import CLEANING_MASK
    from astromer.windows import flat_windows

    names = [c for c in ("mjd", "mag", "err", "quality") if c in batch.schema.names]
    flat = flat_curves(batch, names) if {"mjd", "mag"} <= set(names) else None
    if flat is None:
        return None
    values, offsets = flat
    mjd, mag = np.asarray(values["mjd"], np.float64), np.asarray(values["mag"], np.float32)
    err = np.asarray(values["err"], np.float32) if "err" in values else np.zeros_like(mag)
    keep = np.isfinite(mjd) & np.isfinite(mag)
    if clean and "quality" in values:
        keep &= (np.asarray(values["quality"], np.uint8) & CLEANING_MASK) == 0
    n_kept = segment_sums(keep, offsets)                                         # [B]
    packed = np.concatenate([[0], np.cumsum(n_kept)])
    mjd, mag, err = mjd[keep], mag[keep], err[keep]
    first = np.zeros(len(mjd), bool)                         # the step into a curve's first value does not count
    first[packed[:-1][n_kept > 0]] = True
    if ((np.diff(mjd) <= 0) & ~first[1:]).any():
        return None
    windows = flat_windows(mjd, mag, err, packed, length=model.config.window_length, rule=model.config.window_rule)
    rows = np.flatnonzero(n_kept > 0)
    layers = model.embed_windows(windows, len(n_kept), batch_size=batch_size, all_layers=True)
    reasons = [None if n else "no usable observation after cleaning" for n in n_kept.tolist()]
    n_windows = np.bincount(windows.curve, minlength=len(n_kept)).astype(np.int32)
    return rows.tolist(), reasons, n_kept.astype(np.int32), n_windows, layers[rows].astype(np.float32)


def _curve_by_curve_embedding(model, batch: pa.Table, batch_size: int, clean: bool):
    """(rows, reasons, n_obs, n_windows, layers) of :func:`embed_table`, one curve at a time."""
    from astromer.windows import window_starts

    cols = {name: batch.column(name) for name in READ_COLUMNS if name in batch.schema.names}
    n = batch.num_rows
    curves, rows, reasons = [], [], [None] * n
    n_obs = np.zeros(n, np.int32)
    n_windows = np.zeros(n, np.int32)
    for i in range(n):
        quality = cols["quality"][i].values.to_numpy(zero_copy_only=False) if "quality" in cols else None
        curve, reason = usable_curve(cols["mjd"][i].values.to_numpy(zero_copy_only=False),
                                     cols["mag"][i].values.to_numpy(zero_copy_only=False),
                                     cols["err"][i].values.to_numpy(zero_copy_only=False)
                                     if "err" in cols else None, quality, clean)
        if curve is None:
            reasons[i] = reason
            continue
        curves.append(curve)
        rows.append(i)
        n_obs[i] = len(curve[0])
        n_windows[i] = len(window_starts(len(curve[0]), model.config.window_length, model.config.window_rule))
    d, k = model.config.d_model, model.config.n_layers + 1
    layers = np.zeros((len(rows), k, d), np.float32)
    if curves:
        layers = model.embed(curves, batch_size=batch_size, all_layers=True).astype(np.float32)
    return rows, reasons, n_obs, n_windows, layers


# ----------------------------------------------------------------------------------------------
# the job


@dataclass
class ModelRef:
    """What the embed job writes under: registered name + version, and the local folder of the files."""

    name: str
    version: str
    model_dir: Path


def resolve_model(model: str, name: str | None = None, *, check: bool = True) -> ModelRef:
    """``models:/NAME@ALIAS`` / ``models:/NAME/VERSION`` -> the registered name and version; a model folder
    -> ``name`` (default: the folder's name) and version ``local-<sha256 of the weights, 12 hex>``. With
    ``check``, the model is loaded once here: a damaged one is refused (ValueError naming the file) before any
    actor starts (a caller that has loaded it already passes ``check=False``)."""
    import hashlib

    from astromer.lake.paths import validate_name
    from astromer.registry import resolve_model_dir, resolve_version

    if str(model).startswith("models:/"):
        reg_name, version = resolve_version(model)
        return ModelRef(reg_name, str(version), resolve_model_dir(model, check=check))
    folder = resolve_model_dir(model, check=check)
    digest = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()[:12]
    return ModelRef(validate_name(name or folder.resolve().name, "model"), f"local-{digest}", folder)


def survey_bands(lake: str, survey: str) -> list[str]:
    """Bands present under ``lightcurves/survey=<s>/`` (from the partition folder names); a survey the lake
    lacks raises FileNotFoundError naming the surveys and bands it holds."""
    from astromer.data import partitions
    from astromer.lake.paths import validate_band, validate_survey

    return sorted(validate_band(band) for _, band in partitions(lake, [validate_survey(survey)]))


def check_selection(lake: str, survey: str, bands: Sequence[str] | None) -> list[str]:
    """The bands to embed for ``survey`` (all, or ``bands``), or an error naming what is missing."""
    from astromer.lake.paths import validate_band

    all_bands = survey_bands(lake, survey)
    bands = [validate_band(b) for b in (bands or all_bands)]
    missing = sorted(set(bands) - set(all_bands))
    if missing:
        raise FileNotFoundError(f"survey {survey!r} has no band(s) {missing} in lake {lake}; it has {all_bands}")
    return bands


def check_gpus(needed: float) -> None:
    """Fail when a Ray this process started lacks the GPUs the actors ask for (they would wait forever);
    on a cluster the autoscaler may still add GPU nodes, so there it is only said."""
    import ray

    from astromer import settings

    have = ray.cluster_resources().get("GPU", 0)
    if needed <= have:
        return
    if settings.ray_address() == "local":
        raise ValueError(f"the actors ask for {needed:g} GPU(s) and this machine's Ray has {have:g}: "
                         "--gpus-per-actor 0 embeds on the CPU")
    log.warning("the actors ask for %g GPU(s) and the cluster has %g now: waiting for its autoscaler to add "
                "GPU nodes", needed, have)


def _parquet_files(fs, folder: str) -> list[str]:
    fs.invalidate_cache(folder)    # an object store's cached listing predates what Ray's workers wrote
    if not fs.exists(folder):
        return []
    return sorted(p for p in fs.ls(folder, detail=False) if p.endswith(".parquet"))


def embed_survey(lake: str, model: str | ModelRef, survey: str, bands: Sequence[str] | None = None, *,
                 name: str | None = None, batch_size: int = 256, curves_per_batch: int = 128,
                 actors: int = 1, cpus_per_actor: float = 1.0, gpus_per_actor: float = 0.0,
                 threads: int | None = None, clean: bool = True, detail_objects: Sequence[str] = (),
                 precision: str = "bf16", progress_every: float = 30.0) -> dict:
    """Embed every curve of ``survey`` (all bands, or ``bands``) into the lake; returns a report dict.

    ``actors`` model replicas each reserve ``cpus_per_actor`` Ray CPUs (leave one for the Parquet reads on a
    small machine) and run ``threads`` torch threads (default: the machine's cores shared by the actors).
    ``precision`` applies on GPUs (see :func:`check_precision`). The curves embedded so far are logged every
    ``progress_every`` seconds (0: never).
    """
    import ray

    from astromer.data import DataSpec, quiet_progress, row_groups
    from astromer.lake.paths import LakePaths, validate_survey
    from astromer.lake.writers import replace_folder, write_json, write_parquet

    started = time.perf_counter()
    counts = {"actors": actors, "batch_size": batch_size, "curves_per_batch": curves_per_batch, "threads": threads}
    for setting, value in {**counts, "cpus_per_actor": cpus_per_actor, "gpus_per_actor": gpus_per_actor}.items():
        least = 1 if setting in counts else 0   # before Ray starts: a pool of 0 actors or a batch of 0 fails in it
        if value is not None and not value >= least:
            raise ValueError(f"{setting}={value!r}: expected {'a positive whole number' if least else 'a number >= 0'}")
    validate_survey(survey)
    check_precision(precision)
    ref = model if isinstance(model, ModelRef) else resolve_model(model, name)   # a job resolves it once
    paths = LakePaths(lake)
    fs = paths.fs
    bands = check_selection(lake, survey, bands)
    final = paths.embeddings(ref.name, ref.version, survey)
    staging = paths.join("_embed", f"{ref.name}-{ref.version}-{survey}-{uuid.uuid4().hex[:12]}")
    new_dir = posixpath.join(staging, "survey")
    fs.makedirs(new_dir, exist_ok=True)
    if not ray.is_initialized():
        from astromer import settings

        ray.init(address=settings.ray_address(), ignore_reinit_error=True, include_dashboard=False,
                 configure_logging=False, log_to_driver=False)
    if gpus_per_actor > 0:
        check_gpus(gpus_per_actor * actors)
    device = "cuda" if gpus_per_actor > 0 else "cpu"
    report = {"model": ref.name, "version": ref.version, "survey": survey, "bands": {}, "device": device,
              "precision": precision if device == "cuda" else "float32"}
    try:
        # the ingest the curves come from, read before them: an ingest of the survey after it makes them stale
        from astromer.lake.catalog import published_ingest_id

        source = published_ingest_id(paths, survey)
        # map: one Ray Data pipeline over the chosen bands (the band comes from each file's partition folder)
        sources = [paths.url_of(paths.lightcurves(survey, band)) for band in bands]
        out = posixpath.join(staging, "new")
        skipped_dir = posixpath.join(staging, "skipped")
        quiet_progress()   # its 14 lines every 10 s said "0/?" until the end; the job logs its own count
        total = sum(unit["rows"] for unit in row_groups(DataSpec(lake=lake, surveys=[survey], bands=list(bands)))
                    ) if progress_every else 0
        with logged_progress(f"embedding {survey}", total, progress_every) if progress_every \
                else contextlib.nullcontext() as counter:
            ds = ray.data.read_parquet(sources, partitioning=None, include_paths=True).select_columns(
                READ_COLUMNS + ["path"])
            ds = ds.map_batches(
                CurveEmbedder, batch_size=curves_per_batch, batch_format="pyarrow",
                fn_constructor_kwargs=dict(model_dir=str(ref.model_dir), skipped_dir=paths.url_of(skipped_dir),
                                           batch_size=batch_size, clean=clean,
                                           threads=threads or max(1, (os.cpu_count() or 1) // max(1, actors)),
                                           device=device, precision=precision, counter=counter),
                compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=cpus_per_actor,
                num_gpus=gpus_per_actor or None)
            ds.write_parquet(paths.url_of(out), min_rows_per_file=50_000, compression=EMBEDDING_COMPRESSION)
        report["bands"] = {band: {"rows": 0, "windows": 0, "skipped": [], "ingest_id": source} for band in bands}
        part = 0
        for src in _parquet_files(fs, out):
            with fs.open(src, "rb") as handle:
                meta = pq.read_table(handle, columns=["band", "n_windows"])
            for band, n_win in zip(meta.column("band").to_pylist(), meta.column("n_windows").to_pylist()):
                report["bands"][band]["rows"] += 1
                report["bands"][band]["windows"] += int(n_win)
            fs.mv(src, posixpath.join(new_dir, LakePaths.part_name(part)))
            part += 1
        for src in _parquet_files(fs, skipped_dir):
            with fs.open(src, "rb") as handle:
                for row in pq.read_table(handle).to_pylist():
                    report["bands"][row["band"]]["skipped"].append(row)
        for band, info in report["bands"].items():
            info["skipped"].sort(key=lambda r: r["object_id"])
            log.info("embedded %s band %s: %d curves (%d skipped), %d windows", survey, band, info["rows"],
                     len(info["skipped"]), info["windows"])
        # reduce: keep the published rows of bands this run did not touch
        for old in _parquet_files(fs, final):
            with fs.open(old, "rb") as handle:
                kept = pq.read_table(handle)
            kept = kept.filter(pc.invert(pc.is_in(kept.column("band"), pa.array(bands))))
            if kept.num_rows:
                write_parquet(fs, kept, posixpath.join(new_dir, LakePaths.part_name(part)),
                              compression=EMBEDDING_COMPRESSION)
                part += 1
        # finish: swap the survey folder (locally readers see the old or the new one, never a mixture)
        replace_folder(fs, new_dir, final, trash=posixpath.join(staging, "replaced"))
    finally:
        if fs.exists(staging):
            fs.rm(staging, recursive=True)
    report_path = paths.embedding_report(ref.name, ref.version, survey)
    if fs.exists(report_path):   # the bands this run kept as they were keep their entries
        with fs.open(report_path, "r") as handle:
            earlier = json.load(handle).get("bands", {})
        report["bands"] = {**{b: info for b, info in earlier.items() if b not in bands}, **report["bands"]}
        report["bands"] = dict(sorted(report["bands"].items()))
    report["rows"] = sum(b["rows"] for b in report["bands"].values())
    report["windows"] = sum(b["windows"] for b in report["bands"].values())
    report["seconds"] = round(time.perf_counter() - started, 3)
    report["path"] = paths.url_of(final)
    if detail_objects:
        report["detail"] = write_detail(lake, ref, survey, list(detail_objects), clean=clean)
    write_json(fs, report, report_path)
    return report


# ----------------------------------------------------------------------------------------------
# per-observation detail (Zarr) for chosen objects


def detail_path(lake: str, ref: ModelRef, survey: str) -> str:
    from astromer.lake.paths import LakePaths

    paths = LakePaths(lake)
    return posixpath.join(paths.embeddings(ref.name, ref.version), "_detail", f"survey={survey}.zarr")


def observation_detail(model, mjd, mag, err) -> dict[str, np.ndarray]:
    """Per-observation embeddings (last block) and the attention weights of every block for one curve.

    For overlapping windows (Astromer 1's rule) an observation takes its values from the first window
    that holds it. ``attention``: [n_layers, W, H, L, L] (query, key); ``attention_received``: first
    block, mean over heads and real queries of the weight each observation receives, [n_obs].
    """
    import torch

    from astromer.windows import curve_windows

    cfg = model.config
    w = curve_windows(mjd, mag, err, length=cfg.window_length, rule=cfg.window_rule)
    with torch.inference_mode():
        # the encoder itself, like Astromer.embed: encode() rejects windows whose float32-centred times
        # collide (Astromer 1's rule does that to sub-second spacings near MJD 5e4)
        h, maps = model.encoder(torch.from_numpy(w.times), torch.from_numpy(w.mags), torch.from_numpy(w.padding),
                                need_weights=True, fast=False)
    h = h.numpy()                                       # [W, L, D]
    att = torch.stack(maps, 0).numpy()                  # [n_layers, W, H, L, L]
    n = len(mjd)
    emb = np.zeros((n, cfg.d_model), np.float32)
    received = np.zeros(n, np.float32)
    filled = np.zeros(n, bool)
    real = ~w.padding                                   # [W, L]
    first = att[0].mean(1)                              # [W, L, L] mean over heads
    for k, start in enumerate(w.start):
        m = int(w.n_valid[k])
        idx = np.arange(start, start + m)
        new = ~filled[idx]
        emb[idx[new]] = h[k, :m][new]
        recv = first[k][real[k]][:, :m].mean(0)         # weight received by each real key
        received[idx[new]] = recv[new]
        filled[idx] = True
    return {"mjd": np.asarray(mjd, np.float64), "mag": np.asarray(mag, np.float32), "embedding": emb,
            "attention": att.astype(np.float16), "attention_received": received,
            "window_start": w.start.astype(np.int64), "n_valid": w.n_valid.astype(np.int32)}


def write_detail(lake: str, ref: ModelRef, survey: str, object_ids: list[str], clean: bool = True) -> dict:
    """Zarr group ``<object_id>/<band>/{mjd, mag, embedding, attention, ...}`` for the chosen objects,
    built aside and put in place whole (:func:`astromer.lake.writers.folder_to_build`)."""
    import pyarrow.dataset as pads
    import zarr

    from astromer.lake.paths import LakePaths, validate_object_id
    from astromer.lake.writers import folder_to_build
    from astromer.weights import load_model_dir

    for oid in object_ids:
        validate_object_id(oid)
    paths = LakePaths(lake)
    model = load_model_dir(ref.model_dir).eval()
    dataset = pads.dataset(paths.lightcurves(survey), filesystem=paths.fs, format="parquet", partitioning="hive")
    table = dataset.to_table(columns=READ_COLUMNS + ["band"], filter=pads.field("object_id").isin(object_ids))
    if table.num_rows == 0:  # the objects may belong to another survey of the same job
        log.warning("detail: none of %s is in survey %s", object_ids, survey)
        return {"path": None, "curves": [], "missing": sorted(object_ids)}
    final = detail_path(lake, ref, survey)
    written = []
    with folder_to_build(paths.fs, final) as tmp:     # put in place when the block ends; removed if it fails
        root = zarr.open_group(tmp, mode="w")
        root.attrs.update({"model": ref.name, "version": ref.version, "survey": survey,
                           "window_rule": model.config.window_rule, "window_length": model.config.window_length})
        for row in table.to_pylist():
            curve, reason = usable_curve(row["mjd"], row["mag"], row["err"], row["quality"], clean)
            if curve is None:
                log.warning("detail: %s band %s skipped: %s", row["object_id"], row["band"], reason)
                continue
            detail = observation_detail(model, *curve)
            group = root.require_group(row["object_id"]).require_group(str(row["band"]))
            for key, value in detail.items():
                group.create_array(key, data=value, overwrite=True)
            written.append(f"{row['object_id']}/{row['band']}")
    missing = sorted(set(object_ids) - {w.split("/")[0] for w in written})
    return {"path": paths.url_of(final), "curves": written, "missing": missing}


# ----------------------------------------------------------------------------------------------
# similarity search


# Embedding files are written without compression: float vectors shrink by only ~9% under zstd, and a
# similarity search scans every vector, which reads ~1.6x faster from uncompressed pages (1M x 256-d:
# 0.89 s against 1.43 s for the top 10 in DuckDB on 2 cores).
EMBEDDING_COMPRESSION = "none"

SIMILAR_SQL = """
SELECT survey, object_id, band, array_cosine_similarity(embedding::FLOAT[{dim}], $query::FLOAT[{dim}]) AS similarity
FROM embeddings
WHERE model = $model AND CAST(version AS VARCHAR) = $version AND object_id <> $object_id
ORDER BY similarity DESC
LIMIT $k
"""

QUERY_VECTOR_SQL = """
SELECT survey, band, embedding FROM embeddings
WHERE model = $model AND CAST(version AS VARCHAR) = $version AND object_id = $object_id
  AND ($band IS NULL OR band = $band) AND ($survey IS NULL OR survey = $survey)
ORDER BY survey, band
"""


#: the README's example: the curves closest to one object (itself first), for a 256-d model;
#: parameters: model, version, object_id, k
README_SQL = """
WITH q AS (
    SELECT model, version, embedding::FLOAT[256] AS v
    FROM embeddings
    WHERE model = ? AND version = ? AND object_id = ? AND embedding IS NOT NULL
    LIMIT 1
)
SELECT e.survey, e.object_id, e.band, array_cosine_similarity(e.embedding::FLOAT[256], q.v) AS similarity
FROM embeddings AS e JOIN q USING (model, version)
WHERE e.embedding IS NOT NULL
ORDER BY similarity DESC
LIMIT ?
"""


def embeddings_connection(lake: str):
    """A DuckDB connection with the ``embeddings`` view (the lake's catalog when it provides one)."""
    try:
        from astromer.lake import connect
    except ImportError:
        connect = None
    con = None
    if connect is not None:
        con = connect(lake)
        views = {r[0] for r in con.execute("SELECT view_name FROM duckdb_views()").fetchall()}
        if "embeddings" in views:
            return con
    import duckdb

    from astromer.lake.paths import LakePaths

    paths = LakePaths(lake)
    base = paths.embeddings()
    files = paths.fs.glob(posixpath.join(base, "model=*", "version=*", "survey=*", "*.parquet"))
    if not files:
        raise FileNotFoundError(f"lake {lake} has no embeddings yet: run jobs/embed.py first")
    con = con or duckdb.connect()
    glob = paths.url_of(posixpath.join(base, "model=*", "version=*", "survey=*", "*.parquet"))
    con.execute("CREATE OR REPLACE TEMP VIEW embeddings AS SELECT * FROM read_parquet(?, hive_partitioning = true,"
                " hive_types_autocast = false)", [glob])
    return con


def model_versions(lake: str) -> dict[tuple[str, str], str]:
    """(model, version) -> one of its Parquet files, from the folder names (no table scan)."""
    from astromer.lake.paths import LakePaths

    paths = LakePaths(lake)
    found: dict[tuple[str, str], str] = {}
    for path in sorted(paths.fs.glob(posixpath.join(paths.embeddings(), "model=*", "version=*", "survey=*",
                                                    "*.parquet"))):
        parts = path.split("/")
        key = (parts[-4][len("model="):], parts[-3][len("version="):])
        found.setdefault(key, path)
    return found


def similar(lake: str, object_id: str, k: int = 10, model: str | None = None, version: str | None = None,
            band: str | None = None, survey: str | None = None, used: dict | None = None) -> list[dict]:
    """The ``k`` curves most similar (cosine) to ``object_id``'s embedding, across all surveys embedded by
    the same model version. Without ``model``/``version`` the only model in the lake (or the newest
    version of ``model``) is used; without ``band`` the object's first band in name order. An identifier
    that several surveys use needs ``survey``. Returns dicts: survey, object_id, band, similarity; ``used``
    (a dict), when given, receives the model, version, survey and band that the query took."""
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    available = model_versions(lake)
    if not available:
        raise FileNotFoundError(f"lake {lake} has no embeddings yet: run jobs/embed.py first")
    if model is None:
        names = sorted({m for m, _ in available})
        if len(names) != 1:
            raise ValueError(f"lake {lake} holds embeddings of several models {names}: choose one (--model, model=)")
        model = names[0]
    versions = [v for m, v in available if m == model]
    if not versions:
        raise LookupError(f"no embeddings of model {model!r} in lake {lake}; there are {sorted(available)}")
    if version is None:
        version = max(versions, key=lambda v: (v.isdigit(), int(v) if v.isdigit() else 0, v))
    elif str(version) not in versions:
        raise LookupError(f"no embeddings of {model} version {version} in lake {lake}; versions: {versions}")
    from astromer.lake.paths import LakePaths

    paths = LakePaths(lake)
    with paths.fs.open(available[(model, str(version))], "rb") as handle:
        dim = int(pq.read_schema(handle).field("embedding").type.list_size)
    con = embeddings_connection(lake)
    params = {"model": model, "version": str(version), "object_id": object_id}
    found = con.execute(QUERY_VECTOR_SQL, {**params, "band": band, "survey": survey}).fetchall()
    if not found:
        which = "".join(f", {name} {value}" for name, value in (("survey", survey), ("band", band)) if value)
        raise LookupError(f"object {object_id!r}{which} has no embedding from {model} version {version} in lake {lake}")
    surveys = sorted({row[0] for row in found})
    if len(surveys) > 1:
        raise ValueError(f"object {object_id!r} is in surveys {surveys}: choose one (--survey, survey=)")
    query_survey, query_band, vector = found[0]
    if used is not None:
        used.update(model=model, version=str(version), survey=query_survey, band=query_band)
    # the dimension (an integer read from the file schema) is the only thing formatted into the SQL
    rows = con.execute(SIMILAR_SQL.format(dim=dim), {**params, "query": vector, "k": k}).fetchall()
    return [{"survey": s, "object_id": o, "band": b, "similarity": float(sim)} for s, o, b, sim in rows]
