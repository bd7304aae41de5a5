"""``windows/<name>.zarr``: fixed-length windows of the lake's curves, built on request.

Arrays (one row per window, chunked along the rows, zstd):

    mjd      float64 (N, L)   raw times (not centred; 0 on padding)
    mag      float32 (N, L)   raw magnitudes (not centred; 0 on padding)
    err      float32 (N, L)   errors (0 on padding)
    n_valid  int32   (N,)     real observations in the window (the rest is padding at the end)
    start    int64   (N,)     index of the window's first observation in the (cleaned) curve
    curve    int64   (N,)     back-reference: row of the curve in the scan order of the build
    object_id, survey, band   string (N,)  back-reference to the lake row

Window starts come from :func:`astromer.windows.window_starts` (the one place for the windowing rule;
``astromer2``: consecutive, non-overlapping windows, the last one zero-padded; ``astromer1``: the
official library's rule). Values are stored raw so that every consumer centres them the same way
(``astromer.windows``). The store is written under a temporary name and renamed into place; for a lake on
an object store it is built in a local temporary folder, uploaded beside its final name, then put in place
(:func:`astromer.lake.writers.replace_folder`).
"""
from __future__ import annotations

import time

import numpy as np
import zarr

from astromer.lake.catalog import iter_curves
from astromer.lake.cleaning import CleaningStats
from astromer.lake.paths import LakePaths
from astromer.lake.writers import folder_to_build
from astromer.windows import window_starts

CHUNK_ROWS = 4096


def build_windows(lake: str, name: str, *, surveys=None, bands=None, length: int = 200, rule: str = "astromer2",
                  clean: bool = True, drop_noisy: bool = True, overwrite: bool = False,
                  chunk_rows: int = CHUNK_ROWS) -> dict:
    """Write ``windows/<name>.zarr`` from the lake's curves; returns a summary dict."""
    paths = LakePaths(lake)
    if not isinstance(length, int) or length < 1:
        raise ValueError(f"the window length (--length) must be a whole number of observations, at least 1: got {length}")
    final = paths.windows(name)
    if paths.fs.exists(final) and not overwrite:
        raise FileExistsError(f"{paths.url_of(final)} exists (use overwrite=True / --overwrite)")
    from astromer.data import partitions

    partitions(lake, [surveys] if isinstance(surveys, str) else surveys,
               [bands] if isinstance(bands, str) else bands)   # a selection the lake lacks fails here, naming what it holds
    started = time.perf_counter()
    stats = CleaningStats()
    with folder_to_build(paths.fs, final) as tmp:     # put in place when the block ends; removed if it fails
        group, arrays = _new_store(tmp, length, chunk_rows)
        buffer: dict[str, list] = {k: [] for k in arrays}
        n_windows = n_curves = 0

        def flush():
            nonlocal buffer
            if not buffer["n_valid"]:
                return
            for key, parts in buffer.items():
                if key in ("object_id", "survey", "band"):
                    arrays[key].append(np.asarray(parts, dtype=str))
                else:
                    arrays[key].append(np.concatenate(parts) if parts[0].ndim else np.asarray(parts))
            buffer = {k: [] for k in arrays}

        pending = 0
        for index, curve in enumerate(iter_curves(lake, surveys=surveys, bands=bands, clean=clean,
                                                  drop_noisy=drop_noisy, stats=stats if clean else None)):
            n = len(curve["mjd"])
            if n == 0:
                continue
            starts = window_starts(n, length, rule)
            w = len(starts)
            block = {k: np.zeros((w, length), dtype=dt) for k, dt in
                     (("mjd", np.float64), ("mag", np.float32), ("err", np.float32))}
            valid = np.zeros(w, dtype=np.int32)
            for row, s in enumerate(starts):
                e = min(s + length, n)
                valid[row] = e - s
                block["mjd"][row, : e - s] = curve["mjd"][s:e]
                block["mag"][row, : e - s] = curve["mag"][s:e]
                block["err"][row, : e - s] = curve["err"][s:e]
            for key in ("mjd", "mag", "err"):
                buffer[key].append(block[key])
            buffer["n_valid"].append(valid)
            buffer["start"].append(starts.astype(np.int64))
            buffer["curve"].append(np.full(w, index, dtype=np.int64))
            buffer["object_id"].extend([curve["object_id"]] * w)
            buffer["survey"].extend([curve["survey"]] * w)
            buffer["band"].extend([curve["band"]] * w)
            n_windows += w
            n_curves += 1
            pending += w
            if pending >= chunk_rows:
                flush()
                pending = 0
        flush()
        info = {"name": name, "path": paths.url_of(final), "windows": n_windows, "curves": n_curves, "length": length,
                "rule": rule, "clean": clean, "drop_noisy": drop_noisy,
                "surveys": list(surveys) if surveys else None, "bands": list(bands) if bands else None,
                "centred": False, "padding": "zeros after n_valid", "window_rule_source": "astromer.windows",
                "cleaning": stats.as_dict() if clean else None, "seconds": round(time.perf_counter() - started, 3)}
        group.attrs.update(info)
    return info


def _new_store(path: str, length: int, chunk_rows: int):
    """An empty Zarr group of window arrays at ``path``, and its arrays by name."""
    group = zarr.open_group(path, mode="w")
    compressors = zarr.codecs.ZstdCodec(level=3)
    arrays = {
        "mjd": group.create_array("mjd", shape=(0, length), chunks=(chunk_rows, length), dtype="float64",
                                  compressors=compressors, fill_value=0.0),
        "mag": group.create_array("mag", shape=(0, length), chunks=(chunk_rows, length), dtype="float32",
                                  compressors=compressors, fill_value=0.0),
        "err": group.create_array("err", shape=(0, length), chunks=(chunk_rows, length), dtype="float32",
                                  compressors=compressors, fill_value=0.0),
        "n_valid": group.create_array("n_valid", shape=(0,), chunks=(chunk_rows,), dtype="int32",
                                      compressors=compressors),
        "start": group.create_array("start", shape=(0,), chunks=(chunk_rows,), dtype="int64", compressors=compressors),
        "curve": group.create_array("curve", shape=(0,), chunks=(chunk_rows,), dtype="int64", compressors=compressors),
    }
    for key in ("object_id", "survey", "band"):
        arrays[key] = group.create_array(key, shape=(0,), chunks=(chunk_rows,), dtype=str)
    return group, arrays


def open_windows(lake: str, name: str) -> zarr.Group:
    return zarr.open_group(LakePaths(lake).windows(name), mode="r")
