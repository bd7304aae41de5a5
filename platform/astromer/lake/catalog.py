"""DuckDB over the lake: one connection with a view per table, and the small-job curve iterator."""
from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from astromer.lake.cleaning import CleaningStats, clean_curve
from astromer.lake.paths import LakePaths, validate_band, validate_survey

if TYPE_CHECKING:
    import duckdb

_HIVE = "hive_partitioning = true, hive_types_autocast = false, union_by_name = true"


def _sql_string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _has_files(paths: LakePaths, pattern: str) -> bool:
    return bool(paths.fs.glob(pattern))


def published_inputs(paths: LakePaths, survey: str) -> list[dict]:
    """The rows of the survey's published manifest (input, url, curves, ingest_id); none before its first
    ingest."""
    manifest = f"{paths.ingest(survey)}/manifest.parquet"
    if not paths.fs.exists(manifest):
        return []
    with paths.fs.open(manifest, "rb") as handle:
        return pq.read_table(handle, columns=["input", "url", "curves", "ingest_id"]).to_pylist()


def published_ingest_id(lake: str | LakePaths, survey: str) -> str | None:
    """The ingest whose curves the survey's folder holds now (None for a lake the ingest did not write)."""
    rows = published_inputs(lake if isinstance(lake, LakePaths) else LakePaths(lake), survey)
    return rows[0]["ingest_id"] if rows else None


def connect(lake: str | LakePaths, database: str = ":memory:", *, sandbox: bool = False) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with views ``lightcurves``, ``labels``, ``embeddings`` (when present),
    and ``ingest_manifest`` / ``ingest_quarantine`` over ``_ingest``. A table without files yet
    has no view.

    ``sandbox=True`` (what ``astromer lake query`` uses for SQL typed by users): on a local lake,
    DuckDB may then read only below the lake root, may not write files, and the setting is locked.
    """
    import duckdb  # here, not at the top: Ray Data workers import the lake package and never query

    paths = lake if isinstance(lake, LakePaths) else LakePaths(lake)
    if not paths.fs.exists(paths.root):   # a mistyped path would give a connection without a single table
        raise FileNotFoundError(f"there is no lake at {paths.url_of(paths.root)}")
    con = duckdb.connect(database)
    if not paths.is_local:
        paths.fs.invalidate_cache()                   # the views below are made from fresh listings
        con.register_filesystem(paths.uncached_fs())  # and its queries list afresh each time
    views = {
        "lightcurves": paths.lightcurves() + "/*/*/*.parquet",
        "labels": paths.labels() + "/*/*.parquet",
        "embeddings": paths.embeddings() + "/*/*/*/*.parquet",
        "ingest_manifest": paths.ingest() + "/*/manifest.parquet",
        "ingest_quarantine": paths.ingest() + "/*/quarantine.parquet",
    }
    for name, pattern in views.items():
        if _has_files(paths, pattern):
            con.execute(f"CREATE VIEW {name} AS SELECT * FROM read_parquet("
                        f"{_sql_string(paths.url_of(pattern))}, {_HIVE})")
    if sandbox and paths.is_local:
        con.execute(f"SET allowed_directories = [{_sql_string(paths.root.rstrip('/') + '/')}]")
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
    return con


def iter_curves(lake: str | LakePaths, surveys=None, bands=None, clean: bool = True, *, drop_noisy: bool = True,
                noise_rule: str = "all",
                columns=("object_id", "ra", "dec", "mjd", "mag", "err", "quality"), batch_size: int = 1024,
                stats: CleaningStats | None = None, limit: int | None = None) -> Iterator[dict]:
    """Yield one dict per curve (numpy arrays for mjd/mag/err/quality, plus survey and band).

    With ``clean=True`` the paper's cleaning (:func:`astromer.lake.cleaning.clean_curve`) is applied:
    unusable curves are skipped and the kept observations only are returned; ``stats`` counts it.
    For small jobs; Ray Data jobs read ``LakePaths(lake).lightcurves()`` directly.
    """
    paths = lake if isinstance(lake, LakePaths) else LakePaths(lake)
    root = paths.lightcurves()
    if not paths.fs.exists(root):
        return
    dataset = ds.dataset(root, filesystem=paths.fs, format="parquet", partitioning="hive")
    predicate = None
    if surveys:
        surveys = [validate_survey(s) for s in ([surveys] if isinstance(surveys, str) else surveys)]
        predicate = ds.field("survey").isin(surveys)
    if bands:
        bands = [validate_band(b) for b in ([bands] if isinstance(bands, str) else bands)]
        expr = ds.field("band").isin(bands)
        predicate = expr if predicate is None else predicate & expr
    wanted = list(dict.fromkeys([*columns, "mjd", "mag", "err", "quality", "survey", "band"]))
    produced = 0
    for batch in dataset.to_batches(columns=wanted, filter=predicate, batch_size=batch_size):
        cols = {name: batch.column(name) for name in batch.schema.names}
        for i in range(batch.num_rows):
            curve = {}
            for name, col in cols.items():
                value = col[i]
                if name in ("mjd", "mag", "err", "quality"):
                    curve[name] = value.values.to_numpy(zero_copy_only=False)
                else:
                    curve[name] = value.as_py()
            if clean:
                result = clean_curve(curve["mjd"], curve["mag"], curve["err"], curve["quality"],
                                     drop_noisy=drop_noisy, noise_rule=noise_rule)
                if stats is not None:
                    stats.add(curve["quality"], result)
                if not result.usable:
                    continue
                for name in ("mjd", "mag", "err", "quality"):
                    curve[name] = curve[name][result.keep]
            curve["mjd"] = np.asarray(curve["mjd"], dtype=np.float64)
            yield curve
            produced += 1
            if limit is not None and produced >= limit:
                return


#: README-ready queries (``astromer lake query "..."``); each runs against the real samples in the tests
EXAMPLE_QUERIES = {
    "curves and observations per survey and band": (
        "SELECT survey, band, count(*) AS curves, sum(n_obs) AS observations "
        "FROM lightcurves GROUP BY ALL ORDER BY ALL"),
    "the longest curves of a class": (
        "SELECT l.survey, l.object_id, l.band, l.n_obs FROM lightcurves AS l "
        "JOIN labels AS b USING (survey, object_id) "
        "WHERE b.label_set = 'class' AND b.label = 'Mira' ORDER BY l.n_obs DESC LIMIT 5"),
    "labels per class": (
        "SELECT survey, label_set, label, count(*) AS objects FROM labels GROUP BY ALL ORDER BY objects DESC LIMIT 10"),
    "one object's light curve, one row per observation": (
        "SELECT unnest(mjd) AS mjd, unnest(mag) AS mag, unnest(err) AS err, unnest(quality) AS quality "
        "FROM lightcurves WHERE survey = 'ogle' AND object_id = 'OGLE-LMC-CEP-0001' AND band = 'I' LIMIT 5"),
    "observations flagged by each cleaning rule": (
        "SELECT survey, count(*) AS observations, count(*) FILTER (WHERE q & 4 <> 0) AS err_above_1, "
        "count(*) FILTER (WHERE q & 2 <> 0) AS err_not_positive, count(*) FILTER (WHERE q & 8 <> 0) AS duplicate_time, "
        "count(*) FILTER (WHERE q & 16 <> 0) AS outside_1st_99th "
        "FROM (SELECT survey, unnest(quality) AS q FROM lightcurves) GROUP BY survey ORDER BY survey"),
    "what the last ingest of each survey quarantined": (
        "SELECT survey, reason, count(*) AS n FROM ingest_quarantine GROUP BY ALL ORDER BY ALL"),
}
