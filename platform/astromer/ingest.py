"""The ingest pipeline: raw survey files -> the lake, with Dask, in four resumable stages.

    plan    list the inputs of a source, checksum them (on the workers), derive the ingest id
            (a hash of survey, output name, reader version, options, part size and every input's key
            and sha256)
    map     parse each input into shards (one Arrow IPC file per band) under
            ``_ingest/runs/<id>/shards/`` and write its marker (small inputs share a Dask task,
            :func:`input_groups`; shards and markers stay per input);
            inputs whose marker exists are skipped, so a killed run resumes where it stopped
    reduce  compact the shards, band by band, into parts of about ``part_bytes``, streamed row group
            by row group into ``_ingest/runs/<id>/staging/``; a part's shards are deleted once it is
            staged (a resumed run finds the staged part), so the shards of a whole survey never sit on
            disk at once
    finish  verify the counts, write the publish plan (``publish.json``), publish every part with an
            atomic rename into ``lightcurves/survey=<s>/band=<b>/``, write ``labels``, the manifest
            (inputs + sha256), the quarantine report and the run record; print the summary table

``_ingest/`` holds, per survey, ``survey=<s>/manifest.parquet`` (input, url, size, sha256, curves,
observations, status, ingest_id), ``survey=<s>/quarantine.parquet`` (input, reason, detail; the
reasons are named in ``astromer.lake.schema.QUARANTINE_REASONS``) and, while an ingest of the survey runs,
its lock ``survey=<s>/lock.json`` (:mod:`astromer.lake.locks`), and per run
``runs/<ingest_id>/``: ``map/<n>.json`` markers (one per finished input), ``record.json`` (the run
record: counts, stage timings, source, options) and, while the run is in flight, its shards and
staged parts.

The same inputs give the same ingest id, the same files and the same rows, so re-running a finished
ingest changes nothing (it is recognised from its run record, the manifest naming it and every part of
the survey being its own, and skipped). A publish killed half-way resumes with the parts it had moved while
they are still its own; a run whose record or moved parts no longer match the survey runs afresh
(:func:`moved_parts_are_ours`). An ingest publishes a whole
survey: it owns ``lightcurves/survey=<s>/`` and the ``part-*`` files of ``labels/survey=<s>/``, and what
a previous run left there and this one did not write is removed after publishing. So an ingest whose
source lacks inputs that the published survey holds curves from is refused before it maps anything,
unless ``replace=True`` (``--replace``): a second batch of files given alone would otherwise silently
take the first batch's place. Label files of other names (a user's own labels) are never touched.
"""
from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import math
import os
import sys
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from astromer.lake import schema
from astromer.lake.catalog import published_inputs
from astromer.lake.locks import survey_lock
from astromer.lake.paths import LakePaths, _protocols, check_bucket, validate_survey
from astromer.lake.writers import (
    ParquetPartWriter,
    publish,
    read_arrow,
    read_json,
    write_arrow,
    write_json,
    write_parquet,
)
from astromer.surveys import get_reader
from astromer.surveys.base import ArchiveError, Batch, Input

#: part of the ingest id: a change to what the readers or the shards hold makes a new run, which never
#: mixes its shards with those of a run killed under the previous code, and an ingest of unchanged files
#: under new code writes the survey again (2: the observations' list elements are non-null,
#: schema.observations; 3: a duplicate time repeats an earlier usable row, schema.quality_flags; 4: a star's rows
#: from several inputs are merged into one curve, merge_split_curves; 5: the flags judge the stored float32
#: values, and the merge's buckets are cut by observations)
READER_VERSION = "5"
ROW_GROUP_CURVES = 2048
DEFAULT_PART_BYTES = 192 << 20   # Arrow bytes per part: about 128 MB of Parquet (times barely compress)

log = logging.getLogger("astromer.ingest")


@dataclass
class IngestResult:
    ingest_id: str
    survey: str
    lake: str
    status: str                       # "done", "unchanged" or "failed"
    inputs: int = 0
    inputs_bytes: int = 0
    curves: int = 0
    observations: int = 0
    labels: int = 0
    quarantined_inputs: int = 0
    resumed_inputs: int = 0           # inputs a killed run of the same ingest had mapped already
    quarantine: list = field(default_factory=list)   # (input, reason, detail)
    bands: dict = field(default_factory=dict)
    seconds: float = 0.0
    stage_seconds: dict = field(default_factory=dict)
    stage_cpu: dict = field(default_factory=dict)     # CPU seconds of this process (all its threads)
    report: str = ""                                   # where the quarantine report was written
    split_objects: int = 0            # (object, band) with rows from several inputs (merged into one curve)
    split_example: str = ""

    @property
    def exit_code(self) -> int:
        return 0 if self.status in ("done", "unchanged") and self.curves > 0 else 1

    def summary(self) -> str:
        rate = self.observations / self.seconds if self.seconds else 0.0
        mb_rate = self.inputs_bytes / self.seconds / 1e6 if self.seconds else 0.0
        rows = [
            ("survey", self.survey), ("lake", self.lake), ("ingest id", self.ingest_id),
            ("status", self.status + (f" (resumed: {self.resumed_inputs:,} inputs mapped by an earlier run)"
                                      if self.resumed_inputs else "")),
            ("inputs", f"{self.inputs:,} ({self.inputs_bytes / 1e6:,.1f} MB)"),
            ("curves", f"{self.curves:,}"), ("observations", f"{self.observations:,}"),
            ("labels from the source", f"{self.labels:,}"),
            ("bands", ", ".join(f"{b}: {n:,}" for b, n in sorted(self.bands.items())) or "-"),
        ]
        if self.split_objects:
            rows.append(("objects in several inputs", f"{self.split_objects:,} (object, band): merged into one "
                                                      f"curve each, e.g. {self.split_example}"))
        rows.append(("quarantined inputs", f"{self.quarantined_inputs:,} whole"))
        reasons = Counter(r for _, r, _ in self.quarantine)
        rows.append(("quarantine records", f"{len(self.quarantine):,} (inputs and rows)"
                     + (f", report: {self.report}" if self.report else "")))
        first = {}
        for key, reason, detail in self.quarantine:
            first.setdefault(reason, f"{key}: {detail}")
        rows += [(f"  quarantine: {reason}", f"{count:,}, e.g. {first[reason]}"[:160])
                 for reason, count in sorted(reasons.items())]
        rows += [("time", f"{self.seconds:,.2f} s (" + ", ".join(f"{k} {v:.2f}" for k, v in
                                                               self.stage_seconds.items()) + ")"),
                 ("rate", "- (unchanged: nothing read)" if self.status == "unchanged" else
                  f"{rate:,.0f} obs/s, {mb_rate:,.1f} MB/s")]
        width = max(len(k) for k, _ in rows)
        line = "-" * (width + 3 + max(len(str(v)) for _, v in rows))
        body = "\n".join(f"{k:<{width}} | {v}" for k, v in rows)
        return f"{line}\n{body}\n{line}"


# ---------------------------------------------------------------------------------------------------
# tasks (run on Dask workers; plain functions of picklable arguments)


def checksum_task(item: Input, reader_name: str) -> str:
    reader = get_reader(reader_name)
    if hasattr(reader, "checksum"):
        return reader.checksum(item)
    fs, path = fsspec.core.url_to_fs(item.url)
    if "file" in _protocols(fs):
        # hashlib's own loop reads into one 256 KiB buffer that stays in the cache: 0.72 CPU-s for 860 MB,
        # as fast as hashing a memory map (0.71), where 4 MiB reads took 1.1-1.2. A memory map ended the whole
        # job with SIGBUS when an input was truncated while it was hashed; a short read cannot.
        with open(path, "rb", buffering=0) as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest()
    digest = hashlib.sha256()
    with fs.open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


#: small inputs share a map task (and a checksum task) up to these bounds: Dask's cost per task, a few
#: milliseconds, would otherwise outweigh the work of a survey shipped as one small archive per object
TASK_INPUT_BYTES = 32 << 20
TASK_MAX_INPUTS = 256
#: a checksum task reads and hashes (about 1.5 GB/s), nothing more: it takes more bytes than a map task.
#: Measured, the in-process cluster leaves a thread idle for 2 to 4 ms between two tasks.
CHECKSUM_TASK_BYTES = 256 << 20


def input_groups(inputs: list[Input], threads: int, max_bytes: int = TASK_INPUT_BYTES) -> list[list[int]]:
    """Consecutive inputs (plan order) grouped into tasks of at most ``max_bytes`` and
    :data:`TASK_MAX_INPUTS` inputs, and few enough per task that every thread gets about four tasks. An
    input of unknown size (a simulated partition, say) gets a task of its own.

    A group also closes where its inputs reach the next quarter of a thread's share of the bytes, so that
    the groups are even: cut by count alone, 50 archives made seven groups of 7 and one of 1, and at the
    end of the plan one thread hashed for 100 ms while the other waited."""
    want = 4 * max(1, threads)
    cap = max(1, min(TASK_MAX_INPUTS, -(-len(inputs) // want)))
    share = sum(int(item.size or 0) for item in inputs) / want
    groups: list[list[int]] = []
    current: list[int] = []
    size = done = 0
    boundary = share
    for index, item in enumerate(inputs):
        item_size = int(item.size or 0)
        # a group of size 0 holds one unsized input: it takes no other
        if current and (not item_size or not size or size + item_size > max_bytes or len(current) >= cap):
            groups.append(current)
            current, size = [], 0
        current.append(index)
        size += item_size
        done += item_size
        if item_size and done >= boundary:
            groups.append(current)
            current, size = [], 0
            boundary = share * (int(done / share) + 1)
    if current:
        groups.append(current)
    return groups


def checksum_group(items: list[Input], reader_name: str) -> list[str]:
    return [checksum_task(item, reader_name) for item in items]


def map_group(reader_name: str, entries: list[tuple[int, Input, str]], context: dict, lake_url: str,
              ingest_id: str) -> list[dict]:
    """:func:`map_task` for each ``(index, input, sha256)`` of a group, in order; markers stay per input."""
    return [map_task(reader_name, item, index, sha, context, lake_url, ingest_id) for index, item, sha in entries]


_HEAP_STEADY = False


def keep_freed_memory() -> None:
    """Let glibc's allocator keep freed memory for the next task instead of returning it at once.

    A map task allocates and frees buffers of tens of MB per input (the archive, the joined bodies,
    the parsed columns, the shard). By default glibc maps each such buffer afresh and unmaps it when
    freed, so every input pays again for the kernel faulting in and zeroing its pages: measured, 10 to
    30% of the map's CPU time. Fixing the mmap threshold at 32 MB and trimming the heap only above
    1 GB keeps those pages in the process for reuse. At most two heaps (arenas): with one per thread,
    each thread keeps its own high-water mark and the peak memory grew with the survey (x1.08-1.16
    when it doubled, against x1.02-1.06 with two). glibc fixes its arena limit when a second thread
    first allocates, so :func:`run_ingest` calls this before it starts the local cluster (a caller
    that starts threads of its own first, as the benchmark's memory sampler does, calls it earlier);
    the tasks call it for worker processes. Once per process; a no-op off glibc."""
    global _HEAP_STEADY
    if _HEAP_STEADY:
        return
    _HEAP_STEADY = True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8        # from glibc's malloc.h
        libc.mallopt(m_arena_max, 2)
        libc.mallopt(m_mmap_threshold, 32 << 20)
        libc.mallopt(m_trim_threshold, 1 << 30)
    except (OSError, AttributeError):
        pass


def map_task(reader_name: str, item: Input, index: int, sha256: str, context: dict, lake_url: str,
             ingest_id: str) -> dict:
    """Parse one input into a shard (+ labels) and write its marker last. Returns the marker."""
    keep_freed_memory()
    paths = LakePaths(lake_url)
    fs = paths.fs
    run = paths.run(ingest_id)
    marker_path = f"{run}/map/{index:06d}.json"
    if fs.exists(marker_path):
        return read_json(fs, marker_path)
    reader = get_reader(reader_name)
    try:
        batch = reader.read(item, context)
    except ArchiveError as exc:
        batch = Batch(quarantine=[(item.key, "truncated_archive", str(exc)[:500])])
    except (FileNotFoundError, PermissionError, UnicodeDecodeError) as exc:
        batch = Batch(quarantine=[(item.key, "unreadable", f"{type(exc).__name__}: {exc}"[:500])])
    except Exception as exc:  # noqa: BLE001 - a reader bug must quarantine the input, not stop the job
        batch = Batch(quarantine=[(item.key, "reader_error", f"{type(exc).__name__}: {exc}"[:500])])
    whole_input_bad = any(q[0] == item.key and q[1] in ("truncated_archive", "unreadable", "reader_error")
                          for q in batch.quarantine)
    if batch.n_curves == 0 and not whole_input_bad and not batch.quarantine:
        batch.quarantine.append((item.key, "no_curves", "the input yielded no light curve"))
    table = batch.to_table(source_sha256=sha256, ingest_id=ingest_id)
    bands = {}
    if table.num_rows:
        band_names = sorted(set(batch.band))
        band_counts = Counter(batch.band)
        start = 0
        for band in band_names:       # to_table groups the curves by band: each band is a slice
            part = table.slice(start, band_counts[band]).drop_columns(["band"])
            start += band_counts[band]
            bands[band] = {"curves": part.num_rows, "observations": int(pc.sum(part.column("n_obs")).as_py()),
                           "nbytes": int(part.nbytes)}
            write_arrow(fs, part, shard_path(run, index, band))
    if batch.labels:
        labels = pa.table({"object_id": [x[0] for x in batch.labels], "label_set": [x[1] for x in batch.labels],
                           "label": [x[2] for x in batch.labels]}, schema=schema.LABELS)
        write_parquet(fs, labels, labels_shard_path(run, index))
    marker = {
        "index": index, "input": item.key, "url": item.url, "size": item.size, "sha256": sha256,
        "curves": int(table.num_rows), "observations": int(table.column("n_obs").to_numpy().sum()),
        "labels": len(batch.labels), "bands": bands,
        "quarantine": [list(q) for q in batch.quarantine],
        "status": "quarantined" if batch.n_curves == 0 else ("partial" if batch.quarantine else "ok"),
    }
    write_json(fs, marker, marker_path)
    return marker


def shard_path(run: str, index: int, band: str) -> str:
    # flat, beside the labels shards: a folder per input cost a mkdir per input (0.4 ms for a small archive)
    return f"{run}/shards/{index:06d}.band={band}.arrow"


def labels_shard_path(run: str, index: int) -> str:
    return f"{run}/shards/{index:06d}.labels.parquet"


def publish_plan_path(run: str) -> str:
    """The parts a run is about to publish, written before the first moves (a killed publish resumes from it)."""
    return f"{run}/publish.json"


def part_ingest_ids(fs, path: str) -> set[str]:
    """The ingest ids of a Parquet part's rows, from its footer's statistics (the column itself without them)."""
    with fs.open(path, "rb") as handle:
        meta = pq.ParquetFile(handle).metadata
        column = meta.schema.names.index("ingest_id")
        ids = set()
        for g in range(meta.num_row_groups):
            stats = meta.row_group(g).column(column).statistics
            if stats is None or not stats.has_min_max:
                handle.seek(0)
                return set(pq.read_table(handle, columns=["ingest_id"]).column(0).unique().to_pylist())
            ids |= {stats.min, stats.max}
    return {i.decode() if isinstance(i, bytes) else i for i in ids}


def survey_ingest_ids(paths: LakePaths, survey: str) -> set[str]:
    """The ingest ids of every part of the survey's curves: one id when a single ingest wrote them all."""
    paths.fs.invalidate_cache(paths.lightcurves(survey))   # an object store's listing may predate a publish
    parts = paths.fs.glob(f"{paths.lightcurves(survey)}/*/*.parquet")
    return set().union(*(part_ingest_ids(paths.fs, p) for p in parts)) if parts else set()


def moved_parts_are_ours(paths: LakePaths, survey: str, ingest_id: str) -> bool:
    """Whether the parts a killed publish of ``ingest_id`` moved into the survey are still its own (another
    ingest, finished or killed in turn, may have written over them); True when it moved none."""
    fs, run = paths.fs, paths.run(ingest_id)
    if not fs.exists(publish_plan_path(run)):
        return True
    for part in read_json(fs, publish_plan_path(run))["parts"]:
        if fs.exists(f"{run}/staging/band={part['band']}/{LakePaths.part_name(part['part'])}"):
            continue     # not moved yet
        final = f"{paths.lightcurves(survey, part['band'])}/{LakePaths.part_name(part['part'])}"
        if not fs.exists(final) or part_ingest_ids(fs, final) != {ingest_id}:
            return False
    return True


def staged_part_path(run: str, band: str, part: int) -> str:
    return f"{run}/staging/band={band}/{LakePaths.part_name(part)}"


def staged_or_published(fs, run: str, band: str, part: int) -> dict | None:
    """A part that a killed run of this ingest staged already, or that its killed publish moved into the
    survey's folder (``curves`` from its publish plan); None when it is still to be written."""
    out = staged_part_path(run, band, part)
    if fs.exists(out):
        with fs.open(out, "rb") as handle:
            return {"band": band, "part": part, "curves": pq.read_metadata(handle).num_rows, "path": out}
    if fs.exists(publish_plan_path(run)):
        for planned in read_json(fs, publish_plan_path(run))["parts"]:
            if (planned["band"], planned["part"]) == (band, part):
                return {**planned, "path": out}
    return None


def reduce_task(lake_url: str, ingest_id: str, band: str, shard_indices: list[int], part: int) -> dict:
    """Stream the ``band`` rows of some shards into one staged part file."""
    keep_freed_memory()
    paths = LakePaths(lake_url)
    fs = paths.fs
    run = paths.run(ingest_id)
    out = staged_part_path(run, band, part)
    done = staged_or_published(fs, run, band, part)
    if done is not None:
        return done
    writer = ParquetPartWriter(fs, out, schema.LIGHTCURVES)
    try:
        # row groups of ROW_GROUP_CURVES curves across shard boundaries: a survey of one small input per
        # object (MACHO's archives) would otherwise get a row group per curve
        pending: list[pa.Table] = []
        pending_rows = 0
        for index in shard_indices:
            shard = read_arrow(fs, shard_path(run, index, band))
            pending.append(shard)
            pending_rows += shard.num_rows
            if pending_rows >= ROW_GROUP_CURVES:
                table = pa.concat_tables(pending)
                full = pending_rows - pending_rows % ROW_GROUP_CURVES
                writer.write(table.slice(0, full), row_group_size=ROW_GROUP_CURVES)
                pending, pending_rows = [table.slice(full)], pending_rows - full
        if pending_rows:
            writer.write(pa.concat_tables(pending), row_group_size=ROW_GROUP_CURVES)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    fs.rm([shard_path(run, index, band) for index in shard_indices])
    return {"band": band, "part": part, "curves": writer.rows, "path": out}


# ---------------------------------------------------------------------------------------------------
# merge: one curve per object and band, whatever number of inputs its rows came in
#
# A star whose rows sit in several inputs (a season per file) comes out of the map as one curve per input,
# and the reduce puts them in whichever parts their inputs fall in. The merge finds them (plan), moves their
# rows out of the staged parts into spill files by bucket, a bucket being a range of the sorted object
# ids (split), and writes one curve per object per bucket into parts after the band's last (merge_task).
# Each step is resumable: the plan is written once; a part still holding split rows spills them again
# (the same files) before it is written without them; a bucket's part is written whole or not at all.

#: the flag kept from the map: how its input listed an observation (the others are computed again from the
#: lake's values, as the map computed them)
SOURCE_ORDER_FLAG = int(schema.Quality.UNSORTED_SOURCE)


def merge_folder(run: str) -> str:
    return f"{run}/merge"


def merge_keys_path(run: str, band: str) -> str:
    return f"{merge_folder(run)}/keys.band={band}.arrow"


def plan_merge(fs, run: str, parts: list[dict], part_bytes: int) -> dict:
    """Per band, how many objects have rows from several inputs, how many rows they have, the buckets
    their merged curves go in (about ``part_bytes`` each) and the first part number of those; the objects
    themselves, sorted, in :func:`merge_keys_path`. Written to ``merge/plan.json``. It reads the parts' ids
    and file names: 0.1 s for a survey of 400,000 curves in 50 inputs with nothing to merge (2 cores)."""
    plan = {"bands": {}}
    for band in sorted({p["band"] for p in parts}):
        band_parts = [p for p in parts if p["band"] == band]
        names, nbytes = [], 0
        for p in band_parts:
            with fs.open(p["path"], "rb") as handle:
                part = pq.ParquetFile(handle)
                names.append(part.read(columns=["object_id", "n_obs"]))
                meta = part.metadata
                nbytes += sum(meta.row_group(g).total_byte_size for g in range(meta.num_row_groups))
        names = pa.concat_tables(names)
        per_object = names.group_by("object_id").aggregate([("n_obs", "sum"), ("n_obs", "count")])
        several = per_object.filter(pc.greater(per_object.column("n_obs_count"), 1))
        if not several.num_rows:
            continue
        several = several.sort_by("object_id")
        keys = several.column("object_id").combine_chunks()
        observations = several.column("n_obs_sum").to_numpy().astype(np.int64)
        split_rows = int(pc.sum(several.column("n_obs_count")).as_py())
        # buckets of about part_bytes, cut by observations (a bucket of as many objects as another could hold a
        # field of long curves several times over); a bucket in which no object starts stays empty
        total = int(observations.sum())
        per_observation = nbytes / max(int(pc.sum(names.column("n_obs")).as_py()), 1)
        buckets = int(min(max(1, math.ceil(total * per_observation / part_bytes)), len(keys)))
        before = np.cumsum(observations) - observations
        write_arrow(fs, pa.table({"object_id": keys, "bucket": pa.array(before * buckets // max(total, 1),
                                                                        type=pa.int64())}),
                    merge_keys_path(run, band))
        files = []
        for p in band_parts:
            with fs.open(p["path"], "rb") as handle:
                files += pq.read_table(handle, columns=["source_file"],
                                       filters=[("object_id", "=", keys[0].as_py())]).column(0).to_pylist()
        shown = list(dict.fromkeys(files))
        plan["bands"][band] = {"objects": len(keys), "rows": split_rows, "buckets": buckets,
                               "first_part": max(p["part"] for p in band_parts) + 1,
                               "example": f"{keys[0].as_py()} {band} ({', '.join(shown[:3])}"
                                          f"{', ...' if len(shown) > 3 else ''})"}
    write_json(fs, plan, f"{merge_folder(run)}/plan.json")
    return plan


def split_task(lake_url: str, ingest_id: str, band: str, part: int) -> dict:
    """Move the rows of the band's split objects out of one staged part into the spill files of their
    buckets (``merge/band=<b>/bucket=<k>/<part>.arrow``), then write the part again without them."""
    fs = LakePaths(lake_url).fs
    run = LakePaths(lake_url).run(ingest_id)
    path = staged_part_path(run, band, part)
    keys = read_arrow(fs, merge_keys_path(run, band))
    with fs.open(path, "rb") as handle:
        table = pq.read_table(handle)
    rank = pc.index_in(table.column("object_id"), value_set=keys.column("object_id"))
    split = pc.is_valid(rank)
    if not pc.any(split).as_py():
        return {"band": band, "part": part, "curves": table.num_rows, "path": path}
    moved = table.filter(split).append_column("input_order", pa.array(
        np.flatnonzero(split.to_numpy(zero_copy_only=False)).astype(np.int64) + (int(part) << 32)))
    bucket = keys.column("bucket").to_numpy()[rank.filter(split).to_numpy()]
    for b in np.unique(bucket):
        write_arrow(fs, moved.filter(pa.array(bucket == b)),
                    f"{merge_folder(run)}/band={band}/bucket={int(b)}/{part:05d}.arrow")
    kept = table.filter(pc.invert(split))
    _write_part(fs, path, kept)
    return {"band": band, "part": part, "curves": kept.num_rows, "path": path}


def _write_part(fs, path: str, curves: pa.Table) -> None:
    """A whole table of curves as one part, in row groups of ROW_GROUP_CURVES, published atomically."""
    writer = ParquetPartWriter(fs, path, schema.LIGHTCURVES)
    try:
        writer.write(curves, row_group_size=ROW_GROUP_CURVES)
        writer.close()
    except BaseException:
        writer.abort()
        raise


def merge_task(lake_url: str, ingest_id: str, band: str, bucket: int, part: int) -> dict:
    """Write one part of merged curves: those of the objects of one bucket (:func:`merged_curves`)."""
    fs = LakePaths(lake_url).fs
    run = LakePaths(lake_url).run(ingest_id)
    done = staged_or_published(fs, run, band, part)
    if done is not None:
        return done
    spilled = [read_arrow(fs, f) for f in sorted(fs.glob(f"{merge_folder(run)}/band={band}/bucket={bucket}/*.arrow"))]
    if not spilled:     # no object starts in this bucket's range of rows (one before it holds more than a bucket)
        return {"band": band, "part": part, "curves": 0, "path": staged_part_path(run, band, part)}
    curves = merged_curves(pa.concat_tables(spilled))
    _write_part(fs, staged_part_path(run, band, part), curves)
    return {"band": band, "part": part, "curves": curves.num_rows, "path": staged_part_path(run, band, part)}


def merged_curves(rows: pa.Table) -> pa.Table:
    """One curve per object of ``rows`` (curves of one band, with their ``input_order``): the observations
    of all its rows sorted by time (a time seen twice keeps input order, so the later one is the duplicate),
    flagged afresh over the whole curve from the stored values, as the map flags (duplicate times, magnitude
    percentiles), the first known position, and the inputs joined by `` + ``."""
    rows = rows.take(pc.sort_indices(rows, [("object_id", "ascending"), ("input_order", "ascending")]))
    ids = rows.column("object_id").to_numpy(zero_copy_only=False)
    first = np.r_[True, ids[1:] != ids[:-1]] if len(ids) else np.zeros(0, dtype=bool)
    starts = np.flatnonzero(first)
    curve_of_row = np.cumsum(first) - 1
    row_lengths = pc.list_value_length(rows.column("mjd")).to_numpy(zero_copy_only=False).astype(np.int64)
    lengths = np.add.reduceat(row_lengths, starts) if len(starts) else np.zeros(0, dtype=np.int64)
    offsets = np.r_[0, np.cumsum(lengths)].astype(np.int64)

    def flat(name, dtype):
        return pc.list_flatten(rows.column(name)).to_numpy(zero_copy_only=False).astype(dtype)

    mjd, mag, err, old = flat("mjd", np.float64), flat("mag", np.float64), flat("err", np.float64), \
        flat("quality", np.uint8)
    order = np.lexsort((np.arange(len(mjd)), mjd, np.repeat(curve_of_row, row_lengths)))
    mjd, mag, err, old = mjd[order], mag[order], err[order], old[order]
    mjd, mag, err, flags = schema.quality_flags(mjd, mag, err, offsets)
    flags = (flags & np.uint8(~SOURCE_ORDER_FLAG & 0xFF)) | (old & np.uint8(SOURCE_ORDER_FLAG))

    def first_known(name):
        values = rows.column(name).to_numpy(zero_copy_only=False).astype(np.float64)   # null -> NaN
        known = np.where(np.isfinite(values), np.arange(len(values)), len(values))
        pick = np.minimum.reduceat(known, starts) if len(starts) else known[:0]
        return pa.array([float(values[i]) if i < len(values) else None for i in pick], type=pa.float64())

    # each input once, in input order, its file and its sha256 side by side
    files, shas = rows.column("source_file").to_pylist(), rows.column("source_sha256").to_pylist()
    inputs = [[pair for pair in dict.fromkeys(zip(files[a:b], shas[a:b])) if pair[0]]
              for a, b in zip(starts, np.r_[starts[1:], len(files)])]

    def joined(position):
        return pa.array([" + ".join(str(pair[position] or "") for pair in pairs) for pairs in inputs],
                        type=pa.string())

    n = len(starts)
    return pa.table({
        "object_id": pa.array(ids[starts], type=pa.string()),
        "ra": first_known("ra"), "dec": first_known("dec"),
        "mjd": schema.observation_lists(offsets, mjd, pa.float64()),
        "mag": schema.observation_lists(offsets, mag.astype(np.float32), pa.float32()),
        "err": schema.observation_lists(offsets, err.astype(np.float32), pa.float32()),
        "n_obs": pa.array(lengths.astype(np.int32), type=pa.int32()),
        "quality": schema.observation_lists(offsets, flags, pa.uint8()),
        "source_file": joined(0), "source_sha256": joined(1),
        "ingest_id": rows.column("ingest_id").take(pa.array(starts, type=pa.int64())) if n else
        pa.array([], type=pa.string()),
    }, schema=schema.LIGHTCURVES)


def merge_split_curves(client, lake: str, paths: LakePaths, ingest_id: str, parts: list[dict], part_bytes: int,
                       attempt: str) -> tuple[list[dict], dict]:
    """The merge (see above), after the reduce: the parts as they are now, the merged ones appended, and the
    merge plan. A run that began publishing merged before. (An object with two curves of a band in one input,
    such as two archive members of one star, is merged as well.)"""
    fs, run = paths.fs, paths.run(ingest_id)
    plan_path = f"{merge_folder(run)}/plan.json"
    publishing = fs.exists(publish_plan_path(run))
    if fs.exists(plan_path):
        plan = read_json(fs, plan_path)
    elif publishing:
        return parts, {"bands": {}}
    else:
        plan = plan_merge(fs, run, parts, part_bytes)
    if not publishing:
        split = client.gather([client.submit(split_task, lake, ingest_id, p["band"], p["part"], pure=False,
                                             key=f"split-{attempt}-{p['band']}-{p['part']}")
                               for p in parts if p["band"] in plan["bands"]])
        now = {(p["band"], p["part"]): p for p in split}
        parts = [now.get((p["band"], p["part"]), p) for p in parts]
    merged = client.gather([client.submit(merge_task, lake, ingest_id, band, b, info["first_part"] + b, pure=False,
                                          key=f"merge-{attempt}-{band}-{b}")
                            for band, info in sorted(plan["bands"].items()) for b in range(info["buckets"])])
    return parts + merged, plan


# ---------------------------------------------------------------------------------------------------
# the driver


def ingest_id_of(survey: str, out_survey: str, options: dict, keys_and_shas: list[tuple[str, str]],
                 part_bytes: int = DEFAULT_PART_BYTES) -> str:
    """The ingest's identity: what is read and how, and the part size (a resume cuts the same parts)."""
    spec = {"survey": survey, "as": out_survey, "reader_version": READER_VERSION, "options": options,
            "inputs": keys_and_shas, "part_bytes": int(part_bytes)}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


@contextlib.contextmanager
def dask_client(scheduler: str | None = None, workers: int | None = None, threads_per_worker: int | None = None,
                processes: bool = False):
    """A client of an existing scheduler, or of a local ``distributed`` cluster started here.

    The local default is one in-process worker with a thread per core: the parsers spend their time
    in pyarrow and numpy (which release the GIL), and a 2-core machine saves the seconds that
    starting and stopping worker processes cost. ``processes=True`` starts ``workers`` worker
    processes of ``threads_per_worker`` threads instead (for Python-heavy readers such as the
    simulator at millions of curves).
    """
    from distributed import Client, LocalCluster

    if scheduler:
        try:
            client = Client(scheduler, timeout="10s")
        except (OSError, TimeoutError) as exc:
            raise ConnectionError(f"cannot reach the Dask scheduler at {scheduler}: {exc}") from exc
        try:
            yield client
        finally:
            client.close()
        return
    import dask

    cores = max(1, os.cpu_count() or 1)
    if processes:
        n_workers, threads = workers or min(cores, 4), threads_per_worker or 1
    else:
        n_workers, threads = 1, threads_per_worker or workers or cores
    # Background work of the local cluster, which competes with the tasks for the interpreter: the
    # workers' statistical profiler samples every thread's stack every 10 ms (the ingest reports its own
    # stage timings: off); the event loop's watchdog wakes every 20 ms and the memory monitor every
    # 100 ms. Idle, the in-process cluster used 5.1% of a core with the defaults and 0.9% with both at
    # 1 s (the watchdog still reports a loop blocked for its 3 s limit).
    with dask.config.set({"distributed.worker.profile.enabled": False, "distributed.admin.tick.interval": "1s",
                          "distributed.worker.memory.monitor-interval": "1s"}):
        cluster = LocalCluster(n_workers=n_workers, threads_per_worker=threads, processes=processes,
                               dashboard_address=":0", silence_logs=logging.ERROR)
    client = Client(cluster)
    try:
        yield client
    finally:
        client.close()
        cluster.close()


#: a local cluster runs worker processes instead of threads for a survey of at least this many inputs whose
#: median size is at most SMALL_INPUT_BYTES (MACHO ships one archive of about 15 kB per object): for such
#: inputs the map is Python and small file operations, and two threads wait for each other's interpreter.
#: Measured on 2 cores, 2,000 archives of one object: map 5.2-5.9 s in two processes against 7.7-8.8 s in
#: two threads, 7.9-9.1 s against 9.5-10.7 s in all with the processes' start (about 1.5 s). Archives of
#: thousands of curves spend their time in compiled code that releases the interpreter; threads stay.
MANY_INPUTS = 1000
SMALL_INPUT_BYTES = 1 << 20


def many_small_inputs(inputs: list[Input]) -> bool:
    """Whether a local cluster should run worker processes for these inputs (see :data:`MANY_INPUTS`)."""
    sizes = sorted(int(item.size or 0) for item in inputs)
    return len(sizes) >= MANY_INPUTS and 0 < sizes[len(sizes) // 2] <= SMALL_INPUT_BYTES


def run_ingest(survey: str, source: str, lake: str, *, options: dict | None = None, out_survey: str | None = None,
               scheduler: str | None = None, client=None, workers: int | None = None,
               threads_per_worker: int | None = None, processes: bool | None = None, progress: bool = True,
               part_bytes: int = DEFAULT_PART_BYTES, stream=None, replace: bool = False,
               break_lock: bool = False) -> IngestResult:
    """Ingest ``source`` (an fsspec URL) of ``survey`` into ``lake``; see the module docstring.

    ``replace``: publish even when the source lacks inputs that the survey now published in the lake holds
    curves from (those curves go); without it such an ingest raises :class:`DropsPublishedInputs`.

    The run holds the survey's ingest lock from its plan to its end (:func:`astromer.lake.locks.survey_lock`):
    while another ingest of the survey runs, it raises :class:`~astromer.lake.locks.SurveyLocked` before
    reading anything. ``break_lock`` takes the lock whoever holds it (a holder killed on another machine).

    Uses ``client`` if given, else a client of ``scheduler``, else a local cluster (:func:`dask_client`)
    of threads, or of worker processes when ``processes`` is True or, left None, when the plan finds many
    small inputs (:func:`many_small_inputs`). memory:// sources and lakes live in one process, so they
    always use threads.
    """
    options = dict(options or {})
    out_survey = validate_survey(out_survey or survey)
    stream = stream or sys.stderr
    paths = LakePaths(lake)
    check_bucket(paths.fs, paths.root, "--lake")
    if paths.fs.isfile(paths.root):
        raise ValueError(f"lake {lake} is a file, not a folder")
    with survey_lock(lake, out_survey, source=source, break_lock=break_lock, stream=stream):
        return _locked_ingest(survey, source, lake, options, out_survey, scheduler, client, workers,
                              threads_per_worker, processes, progress, part_bytes, stream, replace)


def _locked_ingest(survey, source, lake, options, out_survey, scheduler, client, workers, threads_per_worker,
                   processes, progress, part_bytes, stream, replace) -> IngestResult:
    plan, listed = None, None
    if any(str(u).startswith("memory://") for u in (source, lake)):
        processes = False
    elif client is None and scheduler is None and processes is None:
        t0, c0 = time.perf_counter(), time.process_time()
        plan = get_reader(survey).plan(source, options)      # listed once: _run takes it as it is
        listed = (time.perf_counter() - t0, time.process_time() - c0)
        processes = many_small_inputs(plan.inputs)
        if processes:
            print(f"{len(plan.inputs):,} small inputs: the local cluster runs worker processes "
                  "(--no-processes for threads)", file=stream)
    keep_freed_memory()
    with contextlib.ExitStack() as stack:
        if client is None:
            client = stack.enter_context(dask_client(scheduler, workers, threads_per_worker, bool(processes)))
        stack.enter_context(long_lived_frozen())
        return _run(survey, source, lake, options, out_survey, client, progress, part_bytes, stream, plan, listed,
                    replace)


@contextlib.contextmanager
def long_lived_frozen():
    """Keep the objects that exist now (the modules, the cluster) out of the garbage collector's full
    passes while the ingest runs. Without it the benchmark's ingest made one full pass over about 100,000
    objects, 60 to 80 ms during which no thread of the in-process cluster runs Python; with it, none
    (all passes: 0.08-0.15 s against 0.05 s, read from gc.callbacks). They are handed back at the end."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _progress_bar(total, desc, enabled, stream):
    """A tqdm bar of ``total`` inputs to update by hand, or None when progress is off."""
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, file=stream, unit="input", leave=False)


def _run(survey, source, lake, options, out_survey, client, progress, part_bytes, stream, plan=None,
         listed=None, replace=False) -> IngestResult:
    """The four stages. ``plan``: the source already listed by :func:`run_ingest`, in ``listed`` (wall clock
    and CPU seconds, counted in the plan stage and the run's time; the cluster's start between is not)."""
    from distributed import as_completed

    listed = listed or (0.0, 0.0)
    started = time.perf_counter() - listed[0]
    stages, stage_cpu = {}, {}
    paths = LakePaths(lake)
    fs = paths.fs
    reader = get_reader(survey)

    # plan ----------------------------------------------------------------------------------------
    t0, c0 = time.perf_counter() - listed[0], time.process_time() - listed[1]
    plan = plan if plan is not None else reader.plan(source, options)
    if not plan.inputs:
        raise NoInputs(no_inputs_message(reader, survey, source))
    keys = [i.key for i in plan.inputs]
    if len(set(keys)) != len(keys):
        raise ValueError("the plan has duplicate input keys")
    published = published_inputs(paths, out_survey)     # read once: for this check and the re-run's below
    if not replace:
        check_keeps_published(published, out_survey, source, set(keys) | {i.url for i in plan.inputs})
    threads = sum(client.nthreads().values()) or 1
    shas = [sha for group_shas in client.gather(client.map(
        checksum_group, [[plan.inputs[i] for i in group]
                         for group in input_groups(plan.inputs, threads, CHECKSUM_TASK_BYTES)],
        reader_name=survey, pure=False)) for sha in group_shas]
    ingest_id = ingest_id_of(survey, out_survey, options, list(zip(keys, shas)), part_bytes)
    run = paths.run(ingest_id)
    stages["plan"] = time.perf_counter() - t0
    stage_cpu["plan"] = time.process_time() - c0
    record_path = f"{run}/record.json"
    published_id = published[0]["ingest_id"] if published else None
    record = read_json(fs, record_path) if fs.exists(record_path) else None
    if (record is not None and record.get("status") == "done" and published_id == ingest_id
            and survey_ingest_ids(paths, out_survey) == {ingest_id}):
        result = IngestResult(**{**record["result"], "status": "unchanged", "lake": lake, "resumed_inputs": 0,
                                 "seconds": time.perf_counter() - started, "stage_seconds": stages})
        print(result.summary(), file=stream)
        return result
    if record is not None or not moved_parts_are_ours(paths, out_survey, ingest_id):
        # this ingest ran to its end before, or was killed while publishing and another ingest has written over
        # the parts it had moved: its shards and staged parts are gone, so its markers say nothing any more
        print(f"ingest {ingest_id} ran before and {out_survey} has changed since (its staged files are gone): "
              "running it afresh", file=stream)
        fs.rm(run, recursive=True)

    # map, and reduce as soon as it can ------------------------------------------------------------
    # A part compacts consecutive shards of one band; it is cut from the markers in input order, so
    # its reduce task is submitted the moment its last shard is mapped and runs beside the remaining
    # map tasks (the parts are the same as if every map task had finished first).
    t0, c0 = time.perf_counter(), time.process_time()
    mapped_before = len(fs.glob(f"{run}/map/*.json"))   # a killed run of this ingest: its markers are kept
    if mapped_before:
        print(f"resuming ingest {ingest_id}: {mapped_before:,} of {len(plan.inputs):,} inputs mapped already",
              file=stream)
    context = client.scatter(plan.context, broadcast=True) if plan.context else {}
    # task keys name this attempt: a failed attempt's keys may still be held (a notebook keeps the traceback,
    # and with it the futures) and would hand their errors to a retry under the same client
    attempt = f"{ingest_id}-{uuid.uuid4().hex[:8]}"
    groups = input_groups(plan.inputs, threads)
    futures = [client.submit(map_group, survey, [(i, plan.inputs[i], shas[i]) for i in group], context, lake,
                             ingest_id, pure=False, key=f"map-{attempt}-{group[0]}")
               for group in groups]
    markers = [None] * len(plan.inputs)
    group_of = {f.key: group for f, group in zip(futures, groups)}
    cutter = PartCutter(part_bytes)
    reduce_futures = []

    def submit_reduce(groups):
        reduce_futures.extend(client.submit(reduce_task, lake, ingest_id, band, indices, part, pure=False,
                                            key=f"reduce-{attempt}-{band}-{part}")
                              for band, part, indices in groups)

    in_order = 0
    bar = _progress_bar(len(markers), f"map {out_survey}", progress, stream)
    for future in as_completed(futures):
        group = group_of[future.key]
        for index, marker in zip(group, future.result()):
            markers[index] = marker
        if bar is not None:
            bar.update(len(group))
        while in_order < len(markers) and markers[in_order] is not None:
            submit_reduce(cutter.add(markers[in_order]))
            in_order += 1
    if bar is not None:
        bar.close()
    submit_reduce(cutter.flush())
    stages["map"] = time.perf_counter() - t0
    stage_cpu["map"] = time.process_time() - c0

    # reduce (what is left of it), then merge the curves of a star split across inputs -----------------
    t0, c0 = time.perf_counter(), time.process_time()
    parts = client.gather(reduce_futures)
    parts, merged = merge_split_curves(client, lake, paths, ingest_id, parts, part_bytes, attempt)
    stages["reduce"] = time.perf_counter() - t0
    stage_cpu["reduce"] = time.process_time() - c0

    # finish ----------------------------------------------------------------------------------------
    t0, c0 = time.perf_counter(), time.process_time()
    result = _finish(paths, out_survey, survey, ingest_id, plan, markers, parts, lake, merged)
    result.resumed_inputs = mapped_before
    stages["finish"] = time.perf_counter() - t0
    stage_cpu["finish"] = time.process_time() - c0
    result.seconds = time.perf_counter() - started
    result.stage_seconds = stages
    result.stage_cpu = stage_cpu
    record = {"status": result.status, "result": {k: v for k, v in asdict(result).items()
                                                  if k not in ("seconds", "stage_seconds", "stage_cpu", "lake")},
              "source": source, "options": options, "seconds": result.seconds, "stages": stages,
              "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    record["result"]["quarantine"] = [list(q) for q in result.quarantine]
    write_json(fs, record, record_path)
    for folder in ("shards", "staging", "merge"):
        if fs.exists(f"{run}/{folder}"):
            fs.rm(f"{run}/{folder}", recursive=True)
    print(result.summary(), file=stream)
    return result


class PartCutter:
    """Cuts the shards of each band, in input order, into parts of about ``part_bytes`` (Arrow bytes).

    Fed the map markers one by one in input order; :meth:`add` returns the ``(band, part, shard
    indices)`` parts that the marker closes, :meth:`flush` the last part of every band.
    """

    def __init__(self, part_bytes: int):
        self.part_bytes = part_bytes
        self.open: dict[str, tuple[list[int], int]] = {}   # band -> (shard indices, Arrow bytes)
        self.next_part: Counter = Counter()

    def add(self, marker: dict) -> list[tuple[str, int, list[int]]]:
        closed = []
        for band, info in sorted(marker["bands"].items()):
            indices, size = self.open.get(band, ([], 0))
            if indices and size + info["nbytes"] > self.part_bytes:
                closed.append(self._close(band, indices))
                indices, size = [], 0
            self.open[band] = (indices + [marker["index"]], size + info["nbytes"])
        return closed

    def flush(self) -> list[tuple[str, int, list[int]]]:
        closed = [self._close(band, indices) for band, (indices, _) in sorted(self.open.items()) if indices]
        self.open.clear()
        return closed

    def _close(self, band: str, indices: list[int]) -> tuple[str, int, list[int]]:
        part = self.next_part[band]
        self.next_part[band] += 1
        return band, part, indices


class NoInputs(ValueError):
    """The source holds no file that the survey's reader reads."""


class DropsPublishedInputs(ValueError):
    """The ingest would remove curves of the published survey that its source does not hold."""


def no_inputs_message(reader, survey: str, source: str) -> str:
    patterns = getattr(reader, "patterns", ())
    looked = f" (files named {', '.join(patterns)})" if patterns else ""
    return (f"no input of the {survey} reader found at {source}{looked}: a folder is searched with its "
            "subfolders, a glob only as written (use **/ to reach into subfolders)")


def check_keeps_published(published: list[dict], survey: str, source: str, held: set[str]) -> None:
    """Raise :class:`DropsPublishedInputs` when the published survey (:func:`published_inputs`) holds curves
    from inputs that the new source does not hold. ``held``: the new inputs' keys and URLs. A published input
    is held when either matches: its URL when the new source is a folder above the old one (its key, relative
    to the source, then changes), its key when the same files moved elsewhere."""
    dropped = [row for row in published if row["curves"] and row["input"] not in held and row["url"] not in held]
    if dropped:
        shown = ", ".join(row["input"] for row in dropped[:3]) + (", ..." if len(dropped) > 3 else "")
        raise DropsPublishedInputs(
            f"survey {survey!r} in the lake holds {sum(r['curves'] for r in dropped):,} curves from "
            f"{len(dropped):,} input(s) that {source} does not have ({shown}). An ingest publishes the whole "
            "survey, so these would be removed. Give one source that holds every file (a folder or a glob), "
            "pass --replace to replace the survey, or --as NAME to ingest this source as another survey")


def _finish(paths, out_survey, survey, ingest_id, plan, markers, parts, lake, merged) -> IngestResult:
    fs = paths.fs
    run = paths.run(ingest_id)
    expected = Counter()
    for m in markers:
        for band, info in m["bands"].items():
            expected[band] += info["curves"]
    for band, info in merged["bands"].items():      # the rows of a split object became one curve
        expected[band] -= info["rows"] - info["objects"]
    staged = Counter()
    for p in parts:
        staged[p["band"]] += p["curves"]
    if staged != expected:
        raise RuntimeError(f"reduce lost rows: shards hold {dict(expected)}, parts {dict(staged)}")

    quarantine = [tuple(q) for m in markers for q in m["quarantine"]]
    curves = sum(expected.values())
    result = IngestResult(
        ingest_id=ingest_id, survey=out_survey, lake=lake, status="done" if curves else "failed",
        inputs=len(markers), inputs_bytes=sum(int(m["size"] or 0) for m in markers), curves=curves,
        observations=sum(m["observations"] for m in markers), labels=0,
        quarantined_inputs=sum(1 for m in markers if m["status"] == "quarantined"),
        quarantine=quarantine, bands=dict(sorted(expected.items())))

    # publish parts: each file appears complete under its final name, stale files go afterwards. The plan
    # is written first: a publish killed half-way resumes with the parts it had moved (or runs afresh when
    # another ingest has written over them since, see moved_parts_are_ours)
    # a part whose every curve the merge moved out stays in staging: an empty file has no footer statistics to
    # say whose it is (moved_parts_are_ours), and readers gain nothing from it
    parts = sorted((p for p in parts if p["curves"]), key=lambda p: (p["band"], p["part"]))
    if not fs.exists(publish_plan_path(run)):
        write_json(fs, {"parts": [{k: p[k] for k in ("band", "part", "curves")} for p in parts]},
                   publish_plan_path(run))
    published = set()
    for p in parts:
        final = f"{paths.lightcurves(out_survey, p['band'])}/{LakePaths.part_name(p['part'])}"
        if fs.exists(p["path"]):     # else moved by the killed attempt
            fs.makedirs(os.path.dirname(final), exist_ok=True)
            publish(fs, p["path"], final)
        published.add(final)
    if curves:
        _remove_stale(fs, paths.lightcurves(out_survey), published)

    # labels: one file per survey, first label per (object, label set) in input order
    label_tables = []
    for m in markers:
        path = labels_shard_path(run, m["index"])
        if m["labels"] and fs.exists(path):
            with fs.open(path, "rb") as handle:
                label_tables.append(pq.read_table(handle))
    labels_dir = paths.labels(out_survey)
    if label_tables:
        labels = pa.concat_tables(label_tables)
        seen, keep = set(), []
        for i, key in enumerate(zip(labels.column("object_id").to_pylist(), labels.column("label_set").to_pylist())):
            if key not in seen:
                seen.add(key)
                keep.append(i)
        labels = labels.take(pa.array(keep, type=pa.int64()))
        final = f"{labels_dir}/{LakePaths.part_name(0)}"
        write_parquet(fs, labels, final)
        result.labels = labels.num_rows
        _remove_stale(fs, labels_dir, {final}, only=LakePaths.is_part_name)
    elif curves:
        _remove_stale(fs, labels_dir, set(), only=LakePaths.is_part_name)

    # manifest and quarantine report
    # a run that ingested nothing leaves the survey's published reports alone (they describe
    # the lake as it is) and keeps its own under its run folder
    report_dir = paths.ingest(out_survey)
    if not curves and fs.exists(f"{report_dir}/manifest.parquet"):
        report_dir = run
    result.report = paths.url_of(f"{report_dir}/quarantine.parquet")   # a URL on an object store
    manifest = pa.table({
        "input": [m["input"] for m in markers], "url": [m["url"] for m in markers],
        "size": pa.array([int(m["size"] or 0) for m in markers], type=pa.int64()),
        "sha256": [m["sha256"] for m in markers],
        "curves": pa.array([m["curves"] for m in markers], type=pa.int64()),
        "observations": pa.array([m["observations"] for m in markers], type=pa.int64()),
        "status": [m["status"] for m in markers], "ingest_id": [ingest_id] * len(markers),
    }, schema=schema.MANIFEST)
    write_parquet(fs, manifest, f"{report_dir}/manifest.parquet")
    write_parquet(fs, pa.table({"input": [q[0] for q in quarantine], "reason": [q[1] for q in quarantine],
                                "detail": [q[2] for q in quarantine]}, schema=schema.QUARANTINE),
                  f"{report_dir}/quarantine.parquet")
    result.split_objects = sum(info["objects"] for info in merged["bands"].values())
    result.split_example = next((info["example"] for _, info in sorted(merged["bands"].items())), "")
    return result


def _remove_stale(fs, folder: str, keep: set[str], only=None) -> None:
    """Remove the Parquet files under ``folder`` not in ``keep`` (of those, with ``only``, the files
    whose name it accepts), then the folders left empty."""
    if not fs.exists(folder):
        return
    keep = {fs._strip_protocol(k) for k in keep}
    for path in fs.find(folder):
        if (fs._strip_protocol(path) not in keep and path.endswith(".parquet")
                and (only is None or only(os.path.basename(path)))):
            fs.rm(path)
    for sub in fs.ls(folder, detail=False):     # band folders left empty
        if fs.isdir(sub) and not fs.find(sub):
            fs.rm(sub, recursive=True)
