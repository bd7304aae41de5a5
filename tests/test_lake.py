"""Lake paths and names, quality flags, the paper's cleaning, DuckDB views, iter_curves and Zarr windows."""
from __future__ import annotations

import glob
import os

import fsspec
import numpy as np
import pytest
from astromer.ingest import dask_client, run_ingest
from astromer.lake import CleaningStats, InvalidName, LakePaths, Quality, clean_curve, connect, iter_curves
from astromer.lake.schema import quality_flags
from astromer.lake.windows import build_windows, open_windows
from conftest import shared_path


@pytest.fixture(scope="module")
def client():
    with dask_client(workers=1, threads_per_worker=2, processes=False) as c:
        yield c


@pytest.fixture(scope="module")
def small_lake(tmp_path_factory, client):
    root = tmp_path_factory.mktemp("small") / "lake"
    run_ingest("macho", str(shared_path("data", "macho_sample")), str(root), client=client, progress=False)
    run_ingest("synthetic", "synthetic://?n=60&seed=3&per_partition=25&years=2", str(root), client=client,
               progress=False)
    return str(root)


@pytest.mark.parametrize("maker, name", [
    ("lightcurves", "../etc"), ("lightcurves", "Macho"), ("labels", "a/b"), ("windows", "x/../y"),
    ("windows", ".hidden"), ("embeddings", "m\\n"), ("ingest", ""), ("lightcurves", "a\x00b"),
])
def test_names_are_validated_before_they_become_paths(maker, name):
    paths = LakePaths("/tmp/lake")
    with pytest.raises(InvalidName):
        getattr(paths, maker)(name)


def test_paths_layout():
    paths = LakePaths("/data/lake")
    assert paths.lightcurves("ogle", "I") == "/data/lake/lightcurves/survey=ogle/band=I"
    assert paths.labels("asas") == "/data/lake/labels/survey=asas"
    assert paths.windows("pretrain") == "/data/lake/windows/pretrain.zarr"
    assert paths.embeddings("astromer2-macho", "3", "ogle") == \
        "/data/lake/embeddings/model=astromer2-macho/version=3/survey=ogle"
    with pytest.raises(InvalidName):
        paths.lightcurves("ogle", "I/../../x")
    memory = LakePaths("memory://lake")
    assert not memory.is_local and memory.url_of(memory.lightcurves()).startswith("memory://")


def test_quality_flags_sort_and_flag_every_rule():
    mjd = np.array([3.0, 1.0, 2.0, 2.0, 5.0, 6.0, 7.0, np.nan] + [10.0 + i for i in range(200)] + [1.0, 2.0])
    mag = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0] + list(np.linspace(0, 10, 200)) + [5.0, 5.0])
    err = np.array([0.1, 0.1, 0.1, 0.1, -0.1, 0.0, 1.5, 0.1] + [0.1] * 200 + [0.1, 0.1])
    offsets = np.array([0, 208, 210])
    mjd, mag, err, q = quality_flags(mjd, mag, err, offsets)
    assert list(mjd[:4]) == [1.0, 2.0, 2.0, 3.0]                  # sorted inside its curve
    assert q[2] & Quality.DUPLICATE_TIME and not q[1] & Quality.DUPLICATE_TIME
    assert all(q[i] & Quality.UNSORTED_SOURCE for i in range(3))
    assert q[4] & Quality.ERR_NONPOSITIVE and q[5] & Quality.ERR_NONPOSITIVE and q[6] & Quality.ERR_ABOVE_ONE
    assert q[207] & Quality.NONFINITE                               # NaN time sorts last
    # percentiles over the rows without the other flags, numpy's linear interpolation
    clean = (q[:208] & ~np.uint8(Quality.UNSORTED_SOURCE)) == 0
    clean |= (q[:208] & Quality.MAG_PERCENTILE) > 0
    lo, hi = np.percentile(mag[:208][clean], [1, 99])
    outside = (mag[:208] < lo) | (mag[:208] > hi)
    assert np.array_equal((q[:208] & Quality.MAG_PERCENTILE) > 0, outside & clean)
    assert q[208] == 0 and q[209] == 0                              # the next curve is independent


def test_clean_curve_observation_rules_and_noise_reading():
    rng = np.random.default_rng(0)
    t = np.sort(rng.uniform(0, 100, 400))
    rr = 0.4 * np.sin(2 * np.pi * t / 0.55) + rng.normal(0, 0.02, t.size)    # std ~0.28: a variable
    err = np.full(t.size, 0.02)
    err[:5] = 2.0
    kept = clean_curve(t, rr, err)
    assert kept.usable and not kept.keep[:5].any() and kept.keep.sum() < t.size - 5   # percentiles clipped too
    assert clean_curve(t, rr, err, noise_rule="any").reason == "noisy_std"
    assert clean_curve(t, rr, err, drop_noisy=False).usable
    # scatter made by a few extreme one-sided points: all three criteria -> noisy
    spiky = rng.normal(0, 0.01, t.size)
    spiky[rng.choice(t.size, 12, replace=False)] += 1.5
    result = clean_curve(t, spiky, np.full(t.size, 0.02))
    assert not result.usable and result.reason == "noisy"
    assert clean_curve(t[:4], rr[:4], err[5:9]).reason == "too_few_observations"


def test_duckdb_views_and_iter_curves_with_cleaning_stats(small_lake):
    con = connect(small_lake)
    tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    assert {"lightcurves", "labels", "ingest_manifest", "ingest_quarantine"} <= tables
    n_syn = con.execute("SELECT count(*) FROM lightcurves WHERE survey = 'synthetic'").fetchone()[0]
    assert n_syn == 120
    classes = dict(con.execute("SELECT label, count(*) FROM labels WHERE survey = 'synthetic' "
                               "AND label_set = 'class' GROUP BY label").fetchall())
    assert sum(classes.values()) == 60 and set(classes) <= {"RRab", "RRc", "Cepheid", "EB", "LPV"}
    # the simulator's true periods, which the classification figures fold the curves by
    periods = con.execute("SELECT min(label::DOUBLE), max(label::DOUBLE), count(*) FROM labels "
                          "WHERE survey = 'synthetic' AND label_set = 'period'").fetchone()
    assert periods[2] == 60 and 0.24 <= periods[0] and periods[1] <= 700
    stats = CleaningStats()
    curves = list(iter_curves(small_lake, surveys="macho", stats=stats))
    assert stats.curves == 19 and stats.dropped_by_flag["ERR_ABOVE_ONE"] == 73
    assert sum(len(c["mjd"]) for c in curves) == stats.kept_observations < 15_118
    assert all(c["survey"] == "macho" and (c["err"] > 0).all() and (c["err"] <= 1).all() for c in curves)
    raw = list(iter_curves(small_lake, surveys=["macho"], bands="R", clean=False))
    assert len(raw) == 10 and sum(len(c["mjd"]) for c in raw) == 7_391
    with pytest.raises(InvalidName):
        list(iter_curves(small_lake, surveys="../x"))


def test_windows_store_matches_the_lake(small_lake):
    from astromer.windows import window_starts

    info = build_windows(small_lake, "w200", surveys=["macho"], length=200, rule="astromer2")
    group = open_windows(small_lake, "w200")
    curves = list(iter_curves(small_lake, surveys=["macho"]))
    expected = sum(len(window_starts(len(c["mjd"]), 200, "astromer2")) for c in curves)
    assert info["windows"] == expected == group["mjd"].shape[0] and group["mjd"].shape[1] == 200
    assert group.attrs["rule"] == "astromer2" and group.attrs["length"] == 200
    n_valid = group["n_valid"][:]
    assert n_valid.sum() == sum(len(c["mjd"]) for c in curves)
    # a window's back-reference leads to the same observations in the lake
    row = 3
    curve = curves[int(group["curve"][row])]
    start, n = int(group["start"][row]), int(n_valid[row])
    assert group["object_id"][row] == curve["object_id"] and group["band"][row] == curve["band"]
    assert np.array_equal(group["mjd"][row, :n], curve["mjd"][start:start + n])
    assert np.allclose(group["mag"][row, :n], curve["mag"][start:start + n])
    assert (group["mjd"][row, n:] == 0).all()
    assert group["mjd"].compressors[0].__class__.__name__ == "ZstdCodec"
    with pytest.raises(FileExistsError):
        build_windows(small_lake, "w200", surveys=["macho"])
    for length in (0, -5):     # refused before any store is made (-5 left a temporary store, 0 divided by zero)
        with pytest.raises(ValueError, match="window length .* at least 1"):
            build_windows(small_lake, "bad", surveys=["macho"], length=length)
    assert not [p for p in os.listdir(os.path.join(small_lake, "windows")) if p.startswith("bad")]


def test_windows_and_query_commands(small_lake, capsys):
    from astromer.cli import main

    assert main(["lake", "windows", "--lake", small_lake, "--name", "syn", "--survey", "synthetic",
                 "--length", "100"]) == 0
    assert open_windows(small_lake, "syn")["mag"].shape[1] == 100
    capsys.readouterr()
    assert main(["lake", "query", "--lake", small_lake, "--format", "csv",
                 "SELECT band, count(*) AS n FROM lightcurves WHERE survey = 'macho' GROUP BY band ORDER BY band"]) == 0
    assert capsys.readouterr().out.replace('"', "").split() == ["band,n", "B,9", "R,10"]
    # user SQL reads the lake only: no other files, no writes, no way to switch that off
    assert main(["lake", "query", "--lake", small_lake, "SELECT * FROM read_csv('/etc/hostname')"]) == 2
    assert main(["lake", "query", "--lake", small_lake, "COPY (SELECT 1) TO '/tmp/astromer-leak.csv'"]) == 2
    assert main(["lake", "query", "--lake", small_lake, "SET enable_external_access = true"]) == 2
    assert "Permission Error" in capsys.readouterr().err


def test_lake_commands_name_what_is_missing_in_one_line(small_lake, tmp_path, capsys):
    from astromer.cli import main

    capsys.readouterr()
    assert main(["lake", "query", "--lake", str(tmp_path / "nolake"), "SELECT 1 FROM lightcurves"]) == 2
    assert "there is no lake at" in capsys.readouterr().err
    assert main(["lake", "query", "--lake", small_lake, "SELECT * FROM embeddings"]) == 2
    assert "has the tables: ingest_manifest, ingest_quarantine, labels, lightcurves" in capsys.readouterr().err
    assert main(["lake", "windows", "--lake", small_lake, "--name", "none", "--survey", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert "macho (bands B, R); synthetic (bands B, R)" in err and "Traceback" not in err
    assert not os.path.exists(LakePaths(small_lake).windows("none"))
    assert main(["lake", "windows", "--lake", small_lake, "--name", "../evil", "--survey", "macho"]) == 2
    assert main(["lake", "similar", "X", "--lake", small_lake]) == 2
    assert "jobs/embed.py" in capsys.readouterr().err


def test_memory_source_and_lake_through_fsspec_and_duckdb(client):
    fs = fsspec.filesystem("memory")
    for path in glob.glob(str(shared_path("data", "macho_sample") / "*.tar.bz2")):
        fs.pipe(f"/raw-test/macho/{os.path.basename(path)}", open(path, "rb").read())
    result = run_ingest("macho", "memory://raw-test/macho", "memory://lake-test", client=client, progress=False)
    assert (result.curves, result.observations) == (19, 15_118)
    con = connect("memory://lake-test")
    assert con.execute("SELECT count(*), sum(n_obs) FROM lightcurves").fetchone() == (19, 15_118)
    assert not [p for p in fs.find("/lake-test") if ".tmp-" in p]
    fs.rm("/lake-test", recursive=True)
    fs.rm("/raw-test", recursive=True)


def test_tar_member_urls_are_sources(tmp_path, client):
    archive = shared_path("data", "macho_sample", "lc_1.3444.614.tar.bz2")
    result = run_ingest("macho", f"tar://*.mjd::file://{archive}", str(tmp_path / "lake"), client=client,
                        progress=False)
    assert result.curves == 2 and result.inputs == 2
    con = connect(str(tmp_path / "lake"))
    assert con.execute("SELECT list(band ORDER BY band) FROM lightcurves").fetchone()[0] == ["B", "R"]


def test_similar_command_calls_the_embeddings_search(tmp_path, capsys):
    """`astromer lake similar` is registered here; the search itself lives in astromer.embeddings."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from astromer.cli import main

    lake = str(tmp_path / "lake")
    folder = LakePaths(lake).embeddings("tiny", "1", "synthetic")
    os.makedirs(folder)
    base = np.eye(8, dtype=np.float32)
    vectors = [base[0], base[0] * 0.9 + base[1] * 0.1, base[1], base[0] * 0.5 + base[2] * 0.5]
    pq.write_table(pa.table({"object_id": ["a", "b", "c", "d"], "band": ["R"] * 4,
                             "embedding": pa.array([list(v) for v in vectors], type=pa.list_(pa.float32(), 8))}),
                   os.path.join(folder, "part-R-00000.parquet"))
    rc = main(["lake", "similar", "a", "--k", "2", "--lake", lake])
    out = capsys.readouterr().out
    assert rc == 0
    lines = [line for line in out.splitlines() if "| R" in line]
    assert [line.split("|")[1].strip() for line in lines] == ["b", "d"]


@pytest.mark.parametrize("source", ["ogle", "asas"])
def test_clean_curves_decides_every_real_curve_as_clean_curve_does(source):
    """The flat cleaning of the training stream against the curve-by-curve one, on the real OGLE-IV Cepheids
    and ASAS variables (both rules: with and without the noise criteria), plus curves built to be noisy,
    constant or too short."""
    from astromer.lake.cleaning import clean_curves, segment_sums
    from astromer.lake.schema import quality_flags
    from astromer.surveys import get_reader

    folder = {"ogle": ("data", "ogle4_lmc_cepheids"), "asas": ("data", "asas_richards2012")}[source]
    reader = get_reader(source)
    plan = reader.plan(str(shared_path(*folder)), {})
    table = reader.read(plan.inputs[0], plan.context).to_table(source_sha256="s", ingest_id="i")
    curves = [(np.asarray(m, np.float64), np.asarray(q, np.uint8)) for m, q in
              zip(table.column("mag").to_pylist()[:1500], table.column("quality").to_pylist()[:1500])]
    rng = np.random.default_rng(0)
    t = np.sort(rng.uniform(0, 100, 300))
    spiky = rng.normal(0, 0.01, t.size)
    spiky[rng.choice(t.size, 12, replace=False)] += 1.5                     # all three criteria: noisy
    for mag in (spiky, np.full(t.size, 15.0), spiky[:4]):                   # noisy, std 0, too short
        *_, quality = quality_flags(t[:mag.size].copy(), mag.copy(), np.full(mag.size, 0.02), np.array([0, mag.size]))
        curves.append((mag, quality))
    offsets = np.concatenate([[0], np.cumsum([len(m) for m, _ in curves])])
    mag = np.concatenate([m for m, _ in curves]).astype(np.float32)
    quality = np.concatenate([q for _, q in curves])
    for drop_noisy in (True, False):
        keep, n_kept, usable = clean_curves(mag, quality, offsets, drop_noisy=drop_noisy)
        verdicts = []
        for i, (a, b) in enumerate(zip(offsets[:-1], offsets[1:])):
            one = clean_curve(np.arange(b - a, dtype=float), mag[a:b], np.full(b - a, 0.1), quality[a:b],
                              drop_noisy=drop_noisy)
            assert usable[i] == one.usable and n_kept[i] == one.keep.sum(), (i, one.reason)
            np.testing.assert_array_equal(keep[a:b], one.keep)
            verdicts.append(one.reason)
        assert verdicts[-3:] == (["noisy", None, "too_few_observations"] if drop_noisy
                                 else [None, None, "too_few_observations"])
        assert usable[:-3].sum() >= 0.9 * (len(curves) - 3) > 700     # nearly every real curve is usable
    assert segment_sums(np.array([1, 2, 3, 4]), np.array([0, 0, 2, 2, 4])).tolist() == [0, 3, 0, 7]
    assert segment_sums(np.array([True, True, False]), np.array([0, 2, 3])).tolist() == [2, 0]


def test_query_output_cut_short_by_its_reader_ends_quietly(tmp_path):
    # `astromer lake query ... | head`: the reader leaves, the command ends as SIGPIPE would, without a traceback
    import subprocess
    import sys

    (tmp_path / "lake").mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "astromer.cli", "lake", "query", "SELECT * FROM range(200000)",
                             "--lake", str(tmp_path / "lake"), "--max-rows", "200000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"range"
    proc.stdout.close()
    assert proc.wait(timeout=120) == 141
    assert proc.stderr.read() == b""
    # whether the reader left is asked of standard output itself: a pipe still read, or a file, says no
    probe = ("import sys, time; time.sleep(0.5); from astromer.cli import _stdout_reader_gone; "
             "sys.stderr.write(str(_stdout_reader_gone()))")
    for close_reader, expected in ((False, b"False"), (True, b"True")):
        child = subprocess.Popen([sys.executable, "-c", probe], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if close_reader:
            child.stdout.close()
        assert child.wait(timeout=60) == 0 and child.stderr.read() == expected, close_reader
        if not close_reader:
            child.stdout.close()
    with open(tmp_path / "out.txt", "w") as handle:
        child = subprocess.run([sys.executable, "-c", probe], stdout=handle, stderr=subprocess.PIPE, timeout=60)
    assert child.stderr == b"False"
