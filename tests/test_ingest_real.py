"""The four real survey samples ingest with their exact counts, and DuckDB returns them from the lake."""
from __future__ import annotations

import hashlib
import io
import tarfile
from collections import Counter
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest
from astromer.ingest import dask_client, run_ingest
from astromer.lake import LakePaths, Quality, connect
from conftest import shared_path

SOURCES = {
    "macho": ("data", "macho_sample"),
    "ogle": ("data", "ogle4_lmc_cepheids"),
    "asas": ("data", "asas_richards2012"),
    "sdss-stripe82": ("data", "sdss_stripe82_rrlyrae"),
}


@pytest.fixture(scope="module")
def client():
    with dask_client(workers=1, threads_per_worker=2, processes=False) as c:
        yield c


@pytest.fixture(scope="module")
def lake(tmp_path_factory, client):
    """All four samples in one lake (OGLE's 2.58 million observations are ingested once here)."""
    root = tmp_path_factory.mktemp("lake") / "lake"
    results = {}
    for survey, parts in SOURCES.items():
        source = shared_path(*parts)
        results[survey] = run_ingest(survey, str(source), str(root), client=client, progress=False)
    return root, results


def test_results_report_exact_counts(lake):
    _, results = lake
    assert (results["macho"].curves, results["macho"].observations) == (19, 15_118)
    assert (results["ogle"].curves, results["ogle"].observations) == (4_647, 2_579_048)
    assert (results["asas"].curves, results["asas"].observations, results["asas"].labels) == (810, 490_855, 810)
    assert (results["sdss-stripe82"].curves, results["sdss-stripe82"].observations) == (483 * 5, 136_196)
    assert all(r.exit_code == 0 and not r.quarantine for r in results.values())


def test_duckdb_returns_the_counts(lake):
    root, _ = lake
    con = connect(str(root))
    counts = dict((s, (c, o)) for s, c, o in con.execute(
        "SELECT survey, count(*), sum(n_obs) FROM lightcurves GROUP BY survey").fetchall())
    assert counts == {"macho": (19, 15_118), "ogle": (4_647, 2_579_048), "asas": (810, 490_855),
                      "sdss-stripe82": (2_415, 136_196)}
    # n_obs agrees with the lists, and every curve is in time order
    bad = con.execute("SELECT count(*) FROM lightcurves WHERE len(mjd) <> n_obs OR len(mag) <> n_obs "
                      "OR len(err) <> n_obs OR len(quality) <> n_obs OR mjd <> list_sort(mjd)").fetchone()[0]
    assert bad == 0
    bands = con.execute("SELECT band, count(DISTINCT object_id) FROM lightcurves "
                        "WHERE survey = 'sdss-stripe82' GROUP BY band ORDER BY band").fetchall()
    assert bands == [(b, 483) for b in "giruz"]
    macho = con.execute("SELECT band, count(*) FROM lightcurves WHERE survey = 'macho' "
                        "GROUP BY band ORDER BY band").fetchall()
    assert macho == [("B", 9), ("R", 10)]
    # lc_1.4418.1930 has R only
    assert con.execute("SELECT list(band) FROM lightcurves WHERE object_id = '1.4418.1930'").fetchone()[0] == ["R"]


def test_macho_errors_above_one_are_flagged_not_dropped(lake):
    root, _ = lake
    con = connect(str(root))
    above, flagged = con.execute(
        "SELECT count(*) FILTER (WHERE e > 1), count(*) FILTER (WHERE q & 4 <> 0) FROM ("
        "SELECT unnest(err) AS e, unnest(quality) AS q FROM lightcurves WHERE survey = 'macho')").fetchone()
    assert above == flagged == 73
    assert int(Quality.ERR_ABOVE_ONE) == 4
    # RA hours in the header become degrees; magnitudes are MACHO's negative instrumental ones
    ra, dec, mag0 = con.execute("SELECT ra, dec, mag[1] FROM lightcurves WHERE object_id = '1.3444.614' "
                                "AND band = 'B'").fetchone()
    assert ra == pytest.approx(5.02878 * 15) and dec == pytest.approx(-69.171) and mag0 < 0


def test_labels_and_coordinates(lake):
    root, _ = lake
    con = connect(str(root))
    modes = dict(con.execute("SELECT label, count(*) FROM labels WHERE survey = 'ogle' AND label_set = 'mode' "
                             "GROUP BY label").fetchall())
    # ident.dat lists 4,704 stars (F 2,476, 1O 1,775); 4,647 of them have I-band photometry
    ident = {line.split()[0]: line.split()[1] for line in
             shared_path("data", "ogle4_lmc_cepheids", "ident.dat").read_text().splitlines() if line.strip()}
    with tarfile.open(shared_path("data", "ogle4_lmc_cepheids", "phot_I.tar.gz")) as tar:
        ids = [Path(m.name).stem for m in tar.getmembers() if m.isfile()]
    assert modes == dict(Counter(ident[i] for i in ids)) and sum(modes.values()) == 4647
    assert modes["F"] == 2429 and modes["1O"] == 1766
    types = dict(con.execute("SELECT label, count(*) FROM labels WHERE survey = 'sdss-stripe82' "
                             "GROUP BY label").fetchall())
    assert types == {"ab": 379, "c": 104}
    asas = dict(con.execute("SELECT label, count(*) FROM labels WHERE survey = 'asas' GROUP BY label").fetchall())
    assert asas["Mira"] == 91 and asas["Classical_Cepheid"] == 89 and len(asas) == 28
    # OGLE-LMC-CEP-0001 04:30:57.72 -69:03:37.4 ; first epoch 5262.50650 (HJD-2450000) -> 55262.0065
    ra, dec, t0 = con.execute("SELECT ra, dec, mjd[1] FROM lightcurves WHERE object_id = 'OGLE-LMC-CEP-0001'").fetchone()
    assert ra == pytest.approx(15 * (4 + 30 / 60 + 57.72 / 3600))
    assert dec == pytest.approx(-(69 + 3 / 60 + 37.4 / 3600))
    assert t0 == pytest.approx(5262.50650 + 49999.5)
    # a class's curves joined with their labels
    n = con.execute("SELECT count(*) FROM lightcurves l JOIN labels b USING (survey, object_id) "
                    "WHERE b.label = 'c' AND l.band = 'r'").fetchone()[0]
    assert n == 104


def test_files_are_plain_hive_partitioned_zstd_parquet_with_split_floats(lake):
    root, _ = lake
    paths = LakePaths(str(root))
    files = sorted(Path(paths.lightcurves()).rglob("*"))
    parquet = [f for f in files if f.is_file()]
    assert parquet and all(f.name.startswith("part-") and f.suffix == ".parquet" for f in parquet)
    meta = pq.ParquetFile(parquet[0]).metadata
    columns = {meta.row_group(0).column(i).path_in_schema: meta.row_group(0).column(i)
               for i in range(meta.num_columns)}
    assert {c.compression for c in columns.values()} == {"ZSTD"}
    # the float lists are byte-stream split, the flags and the strings are not
    assert all("BYTE_STREAM_SPLIT" in columns[f"{name}.list.element"].encodings for name in ("mjd", "mag", "err"))
    assert "BYTE_STREAM_SPLIT" not in columns["quality.list.element"].encodings
    # row groups can be pruned by object and length; the observation lists carry no statistics
    assert columns["object_id"].is_stats_set and columns["n_obs"].statistics.has_min_max
    assert not any(columns[f"{name}.list.element"].is_stats_set for name in ("mjd", "mag", "err", "quality"))
    # and DuckDB, which every lake user queries through, reads the encodings
    encodings = duckdb.sql(f"SELECT DISTINCT encodings FROM parquet_metadata('{parquet[0]}') "
                           "WHERE path_in_schema LIKE 'mag%'").fetchall()
    assert encodings and all("BYTE_STREAM_SPLIT" in e for (e,) in encodings)
    names = pq.read_schema(parquet[0]).names
    assert names[:4] == ["object_id", "ra", "dec", "mjd"] and "survey" not in names and "band" not in names
    manifest = pq.read_table(Path(paths.ingest("ogle")) / "manifest.parquet").to_pylist()
    sha = hashlib.sha256(Path(shared_path("data", "ogle4_lmc_cepheids", "phot_I.tar.gz")).read_bytes()).hexdigest()
    assert manifest[0]["sha256"] == sha and manifest[0]["curves"] == 4647


def test_rerun_changes_nothing(lake, client):
    root, results = lake
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in Path(root).rglob("*.parquet")}
    again = run_ingest("macho", str(shared_path("data", "macho_sample")), str(root), client=client, progress=False)
    assert again.status == "unchanged" and again.ingest_id == results["macho"].ingest_id
    assert "obs/s" not in again.summary() and "unchanged: nothing read" in again.summary()
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in Path(root).rglob("*.parquet")}
    assert after == before


def test_same_inputs_give_identical_files_in_a_fresh_lake(lake, client, tmp_path):
    root, _ = lake
    fresh = tmp_path / "fresh"
    run_ingest("sdss-stripe82", str(shared_path(*SOURCES["sdss-stripe82"])), str(fresh), client=client,
               progress=False)
    rel = "lightcurves/survey=sdss-stripe82"
    a = {p.relative_to(root): p.read_bytes() for p in (Path(root) / rel).rglob("*.parquet")}
    b = {p.relative_to(fresh): p.read_bytes() for p in (fresh / rel).rglob("*.parquet")}
    assert a == b and len(a) == 5


def test_query_command_prints_a_table(lake, capsys):
    from astromer.cli import main

    root, _ = lake
    rc = main(["lake", "query", "--lake", str(root),
               "SELECT survey, count(*) AS curves FROM lightcurves GROUP BY survey ORDER BY survey"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "ogle          | 4647" in out and "(4 rows)" in out
    assert main(["lake", "query", "--lake", str(root), "SELEC nonsense"]) == 2


def test_one_light_curve_unnested(lake):
    root, _ = lake
    con = connect(str(root))
    rows = con.execute("SELECT unnest(mjd) AS mjd, unnest(mag) AS mag, unnest(err) AS err FROM lightcurves "
                       "WHERE survey = 'macho' AND object_id = '2.4907.2086' AND band = 'R'").fetchall()
    times = np.array([r[0] for r in rows])
    assert len(rows) == 45 and np.all(np.diff(times) > 0)   # the file has 45 rows after 3 header lines


def test_an_existing_scheduler_is_used_by_address(lake, client, tmp_path):
    root, _ = lake
    result = run_ingest("sdss-stripe82", str(shared_path(*SOURCES["sdss-stripe82"])), str(tmp_path / "lake"),
                        scheduler=client.scheduler.address, progress=False)
    assert (result.curves, result.observations, result.labels) == (2_415, 136_196, 483)


def test_worker_processes_give_the_same_lake(lake, tmp_path, monkeypatch):
    """A survey of many small archives gets a cluster of worker processes by itself (here "many" is lowered to
    the sample's 10 archives), and they write byte-identical files."""
    import io

    from astromer import ingest
    from astromer.surveys.base import Input

    assert not ingest.many_small_inputs([Input(key="a", url="a", size=15_000)] * (ingest.MANY_INPUTS - 1))
    assert ingest.many_small_inputs([Input(key="a", url="a", size=15_000)] * ingest.MANY_INPUTS)
    assert not ingest.many_small_inputs([Input(key="a", url="a", size=7 << 20)] * ingest.MANY_INPUTS)
    assert not ingest.many_small_inputs([Input(key="a", url="a", size=0)] * ingest.MANY_INPUTS)   # unsized
    monkeypatch.setattr(ingest, "MANY_INPUTS", 10)
    root, _ = lake
    fresh = tmp_path / "procs"
    stream = io.StringIO()
    result = run_ingest("macho", str(shared_path(*SOURCES["macho"])), str(fresh), workers=2, progress=False,
                        stream=stream)
    assert "10 small inputs: the local cluster runs worker processes" in stream.getvalue()
    assert (result.curves, result.observations) == (19, 15_118)
    rel = "lightcurves/survey=macho"
    a = {p.relative_to(root): p.read_bytes() for p in (Path(root) / rel).rglob("*.parquet")}
    b = {p.relative_to(fresh): p.read_bytes() for p in (fresh / rel).rglob("*.parquet")}
    assert a == b and len(a) == 2


def test_a_new_ingest_of_a_survey_replaces_what_it_no_longer_has(tmp_path, client):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.csv").write_text("object,band,time,mag,err\nA,g,1,10,0.1\nA,r,1,10,0.1\nB,g,2,11,0.1\n")
    lake = tmp_path / "lake"
    first = run_ingest("csv", str(src), str(lake), client=client, progress=False)
    assert first.bands == {"g": 2, "r": 1}
    (src / "a.csv").write_text("object,band,time,mag,err\nA,g,1,10,0.1\nA,g,2,10.2,0.1\n")
    second = run_ingest("csv", str(src), str(lake), client=client, progress=False)
    assert second.ingest_id != first.ingest_id and second.bands == {"g": 1}
    assert not (lake / "lightcurves" / "survey=csv" / "band=r").exists()
    con = connect(str(lake))
    assert con.execute("SELECT object_id, band, n_obs FROM lightcurves").fetchall() == [("A", "g", 2)]


def test_readme_example_queries_run_on_the_real_lake(lake, capsys):
    from astromer.cli import main
    from astromer.lake.catalog import EXAMPLE_QUERIES

    root, _ = lake
    for title, sql in EXAMPLE_QUERIES.items():
        assert main(["lake", "query", "--lake", str(root), sql]) == 0, title
    rows = [[cell.strip() for cell in line.split("|")] for line in capsys.readouterr().out.splitlines()]
    assert ["ogle", "I", "4647", "2579048"] in rows
    assert ["asas", "class", "Mira", "91"] in rows
    assert ["55262.0065", "17.639", "0.018", "0"] in rows   # OGLE-LMC-CEP-0001's first epoch on the MJD scale
    assert ["macho", "15118", "73", "0", "0", "316"] in rows   # 73 errors above 1, flagged


def test_row_groups_hold_many_curves_even_from_one_object_per_input(lake, client, tmp_path, monkeypatch):
    # MACHO ships one archive per object: its shards hold a curve or two, and the reduce gathers them into
    # row groups of ROW_GROUP_CURVES (here 4, to see the cut on the 19-curve sample)
    root, _ = lake
    paths = LakePaths(str(root))
    for band, curves in (("B", 9), ("R", 10)):
        meta = pq.ParquetFile(Path(paths.lightcurves("macho", band)) / "part-00000.parquet").metadata
        assert (meta.num_rows, meta.num_row_groups) == (curves, 1)
    import astromer.ingest as ingest_module

    monkeypatch.setattr(ingest_module, "ROW_GROUP_CURVES", 4)
    small = tmp_path / "lake"
    run_ingest("macho", str(shared_path("data", "macho_sample")), str(small), client=client, progress=False)
    for band, sizes in (("B", [4, 4, 1]), ("R", [4, 4, 2])):
        meta = pq.ParquetFile(Path(LakePaths(str(small)).lightcurves("macho", band)) / "part-00000.parquet").metadata
        assert [meta.row_group(g).num_rows for g in range(meta.num_row_groups)] == sizes
    same = [pq.read_table(Path(p.lightcurves("macho", b)) / "part-00000.parquet") for p in (paths, LakePaths(str(small)))
            for b in ("B", "R")]
    assert same[0].equals(same[2]) and same[1].equals(same[3])


def test_a_staged_part_frees_its_shards_and_a_resumed_reduce_finds_it(tmp_path):
    # the shards of a whole survey never sit on disk at once: a reduce deletes a part's shards once the
    # part is staged, and the same reduce run again (a resumed run) returns the staged part
    from astromer.ingest import map_task, reduce_task, shard_path
    from astromer.surveys import get_reader

    lake = str(tmp_path / "lake")
    plan = get_reader("macho").plan(str(shared_path("data", "macho_sample")), {})
    markers = [map_task("macho", item, i, "0" * 64, plan.context, lake, "run1") for i, item in enumerate(plan.inputs)]
    run = LakePaths(lake).run("run1")
    indices = [m["index"] for m in markers if "R" in m["bands"]]
    shards = [Path(shard_path(run, i, "R")) for i in indices]
    assert len(shards) == 10 and all(p.exists() for p in shards)
    staged = reduce_task(lake, "run1", "R", indices, 0)
    assert staged["curves"] == 10 and Path(staged["path"]).exists()
    assert not any(p.exists() for p in shards)
    assert all(Path(shard_path(run, i, "B")).exists() for i in indices if "B" in markers[i]["bands"])
    assert reduce_task(lake, "run1", "R", indices, 0) == staged


def test_ogle_cut_into_two_seasons_merges_back_to_the_same_curves(lake, client, tmp_path):
    """The real OGLE-IV sample cut in time into two archives (each star's rows before and after its median
    time): ingested together, every star's two pieces merge back into the curve the one archive gives."""
    root, _ = lake
    source = shared_path("data", "ogle4_lmc_cepheids")
    seasons = tmp_path / "seasons"
    seasons.mkdir()
    (seasons / "ident.dat").write_bytes((source / "ident.dat").read_bytes())
    with tarfile.open(source / "phot_I.tar.gz") as whole, \
            tarfile.open(seasons / "phot_I_early.tar.gz", "w:gz") as early, \
            tarfile.open(seasons / "phot_I_late.tar.gz", "w:gz") as late:
        for member in whole.getmembers():
            if not member.isfile():
                continue
            lines = whole.extractfile(member).read().decode().splitlines(keepends=True)
            rows = [line for line in lines if line.strip() and not line.startswith("#")]
            cut = float(np.median([float(r.split()[0]) for r in rows]))
            for archive, later in ((early, False), (late, True)):
                body = "".join(r for r in rows if (float(r.split()[0]) >= cut) == later).encode()
                info = tarfile.TarInfo(member.name)
                info.size = len(body)
                archive.addfile(info, io.BytesIO(body))
    cut_lake = tmp_path / "lake"
    result = run_ingest("ogle", str(seasons), str(cut_lake), client=client, progress=False)
    assert (result.curves, result.observations, result.split_objects) == (4_647, 2_579_048, 4_647)
    query = ("SELECT object_id, n_obs, mjd, mag, err, list_transform(quality, lambda q: q & ~32::UTINYINT), ra, dec "
             "FROM lightcurves WHERE survey = 'ogle' ORDER BY object_id")
    assert connect(str(cut_lake)).execute(query).fetchall() == connect(str(root)).execute(query).fetchall()
