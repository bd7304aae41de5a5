"""Faults: malformed inputs are quarantined or flagged by name, a SIGKILLed run resumes to the same lake,
and no partial Parquet file is ever visible."""
from __future__ import annotations

import bz2
import io
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from astromer.commands.ingest import main as ingest_main
from astromer.ingest import DropsPublishedInputs, NoInputs, dask_client, run_ingest
from astromer.lake import LakePaths, Quality, connect

ROOT = Path(__file__).resolve().parents[1]
HEADER = ("#Field Tile Seq RA(hour) Dec(deg) Filter mean_Mag med_Mag mean_(B-R) med_(B-R)\n"
          "#1 {tile} 1 5.0 -69.0 {band} -6.0 -6.0 0.1 0.1\n#MJD Mag Err\n")


def macho_text(tile: int, band: str, rows: list[str]) -> bytes:
    return (HEADER.format(tile=tile, band=band) + "".join(r + "\n" for r in rows)).encode()


def good_rows(n: int, start: float = 48800.0) -> list[str]:
    rng = np.random.default_rng(n)
    return [f"{start + i * 1.1:.6f} {-6 + rng.normal(0, 0.05):.3f} {0.02 + 0.01 * rng.random():.3f}"
            for i in range(n)]


def tar_bytes(members: dict[str, bytes], mode: str = "w:bz2") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.fixture(scope="module")
def client():
    with dask_client(workers=1, threads_per_worker=2, processes=False) as c:
        yield c


@pytest.fixture()
def bad_source(tmp_path):
    """One input per kind of damage, next to good inputs."""
    src = tmp_path / "raw"
    src.mkdir()
    w = lambda name, data: (src / name).write_bytes(data)  # noqa: E731
    w("lc_1.100.1.tar.bz2", tar_bytes({"lc_1.100.1.B.mjd": macho_text(100, "B", good_rows(50)),
                                       "lc_1.100.1.R.mjd": macho_text(100, "R", good_rows(60))}))
    w("lc_1.101.1.R.mjd", macho_text(101, "R", good_rows(30)))
    w("lc_1.102.1.R.mjd", macho_text(102, "R", good_rows(20) + ["48900.1 -6.1", "48901.1 -6.1 0.02 7"]))
    w("lc_1.103.1.R.mjd", macho_text(103, "R", good_rows(20) + ["48900.1 abc 0.02", "48901.2 -6.0 n/a"]))
    w("lc_1.104.1.R.mjd", macho_text(104, "R", good_rows(20) + ["48900.1 nan 0.02", "48901.1 -6.0 inf",
                                                                  "48902.1 -inf 0.03"]))
    w("lc_1.105.1.R.mjd", macho_text(105, "R", good_rows(20) + ["48900.1 -6.0 -0.02", "48901.1 -6.0 0"]))
    w("lc_1.106.1.R.mjd", macho_text(106, "R", ["48810.5 -6.0 0.02", "48800.5 -6.1 0.02", "48805.5 -6.2 0.02",
                                                 "48805.5 -6.3 0.02"] + good_rows(10, 48900)))
    w("lc_1.107.1.R.mjd", b"")
    w("lc_1.108.1.R.mjd", macho_text(108, "R", good_rows(20)) + b"48950.1 -6.0\xff\xfe 0.02\n")
    whole = tar_bytes({"lc_1.109.1.R.mjd": macho_text(109, "R", good_rows(400))})
    w("lc_1.109.1.tar.bz2", whole[: len(whole) // 2])
    w("lc_1.110.1.tar.bz2", tar_bytes({"lc_a\\..\\b.R.mjd": macho_text(110, "R", good_rows(10)),
                                       "lc_1.111.1.R.mjd": macho_text(111, "R", good_rows(12))}))
    w("lc_1.112.1.R.mjd.bz2", bz2.compress(macho_text(112, "R", good_rows(15))))
    w("lc_1.113.1.R.mjd", macho_text(113, "R", good_rows(1)))                       # a single point
    t = 48800 + np.arange(100_000) * 0.01                                           # 100,000 points
    body = "\n".join(f"{x:.6f} {-6 + 0.1 * np.sin(x):.3f} 0.020" for x in t)
    w("lc_1.114.1.R.mjd", macho_text(114, "R", [body]))
    return src


def test_malformed_inputs_are_quarantined_or_flagged_by_name(bad_source, tmp_path, client):
    lake = tmp_path / "lake"
    result = run_ingest("macho", str(bad_source), str(lake), client=client, progress=False)
    assert result.exit_code == 0
    report = pq.read_table(Path(LakePaths(str(lake)).ingest("macho")) / "quarantine.parquet").to_pylist()
    reasons = {(r["input"].split("::")[0], r["reason"]) for r in report}
    assert ("lc_1.102.1.R.mjd", "wrong_column_count") in reasons
    assert ("lc_1.103.1.R.mjd", "non_numeric") in reasons
    assert ("lc_1.107.1.R.mjd", "empty") in reasons
    assert ("lc_1.108.1.R.mjd", "non_utf8") in reasons
    assert ("lc_1.109.1.tar.bz2", "truncated_archive") in reasons
    assert ("lc_1.110.1.tar.bz2", "invalid_object_id") in reasons
    detail = next(r["detail"] for r in report if r["reason"] == "wrong_column_count")
    assert "line 24" in detail and "line 25" in detail          # 3 header lines + 20 rows, then the bad two

    con = connect(str(lake))
    curves = {o: (n, q) for o, n, q in con.execute(
        "SELECT object_id || '/' || band, n_obs, quality FROM lightcurves").fetchall()}
    # every good input beside the bad ones is there, with every parseable row
    assert curves["1.100.1/B"][0] == 50 and curves["1.100.1/R"][0] == 60 and curves["1.101.1/R"][0] == 30
    assert curves["1.111.1/R"][0] == 12 and curves["1.112.1/R"][0] == 15
    assert curves["1.102.1/R"][0] == 20 and curves["1.103.1/R"][0] == 20 and curves["1.108.1/R"][0] == 20
    assert curves["1.113.1/R"][0] == 1 and curves["1.114.1/R"][0] == 100_000
    assert "1.107.1/R" not in curves and "1.109.1/R" not in curves
    # NaN/inf, negative/zero errors, duplicate and unsorted times are kept and flagged
    nonfinite = [q for q in curves["1.104.1/R"][1] if q & Quality.NONFINITE]
    assert curves["1.104.1/R"][0] == 23 and len(nonfinite) == 3
    errs = [q for q in curves["1.105.1/R"][1] if q & Quality.ERR_NONPOSITIVE]
    assert curves["1.105.1/R"][0] == 22 and len(errs) == 2
    q106 = curves["1.106.1/R"][1]
    assert sum(1 for q in q106 if q & Quality.DUPLICATE_TIME) == 1
    assert any(q & Quality.UNSORTED_SOURCE for q in q106)
    mjd = con.execute("SELECT mjd FROM lightcurves WHERE object_id = '1.106.1'").fetchone()[0]
    assert mjd[:4] == [48800.5, 48805.5, 48805.5, 48810.5]
    # the summary reports the quarantined inputs with their reasons
    assert result.quarantined_inputs == 2          # the empty file and the truncated archive
    assert "quarantine: truncated_archive" in result.summary()


def test_a_run_where_every_input_is_bad_exits_nonzero_with_the_report(tmp_path, capsys):
    src = tmp_path / "bad"
    src.mkdir()
    (src / "lc_1.1.1.R.mjd").write_bytes(b"")
    whole = tar_bytes({"lc_1.2.1.R.mjd": macho_text(2, "R", good_rows(300))})
    (src / "lc_1.2.1.tar.bz2").write_bytes(whole[:200])
    lake = tmp_path / "lake"
    rc = ingest_main(["--survey", "macho", "--source", str(src), "--lake", str(lake), "--workers", "1",
                      "--no-progress"])
    out = capsys.readouterr()
    assert rc == 1
    assert "quarantine: empty" in out.out and "quarantine: truncated_archive" in out.out
    assert "could be ingested" in out.err
    report = pq.read_table(Path(LakePaths(str(lake)).ingest("macho")) / "quarantine.parquet")
    assert sorted(report.column("reason").to_pylist()) == ["empty", "truncated_archive"]
    assert not (lake / "lightcurves").exists()


def test_generic_csv_names_bad_rows_and_objects(tmp_path, client):
    src = tmp_path / "csv"
    src.mkdir()
    (src / "a.csv").write_text("oid,filter,hjd,m,e\nX1,g,3,1.0,0.1\nX1,g,1,1.1,0.1\n../etc,r,1,2,0.1\nX1,r,2,3,0.2\n")
    (src / "b.csv").write_bytes(b"oid,filter,hjd,m,e\nY,g,1,x,0.1\nY,g,2,1,0.1,9\nY,g,3,1,0.1\nY,g,4,1\xff,0.1\n")
    (src / "c.csv").write_text("")
    lake = tmp_path / "lake"
    result = run_ingest("csv", str(src), str(lake), client=client, progress=False, out_survey="mine",
                        options={"columns": {"object": "oid", "band": "filter", "time": "hjd", "mag": "m",
                                             "err": "e"}})
    assert result.exit_code == 0 and result.curves == 3 and result.observations == 4
    reasons = sorted((q[0], q[1]) for q in result.quarantine)
    assert reasons == [("a.csv", "invalid_object_id"), ("b.csv", "non_numeric"), ("b.csv", "non_utf8"),
                       ("b.csv", "wrong_column_count"), ("c.csv", "empty")]
    con = connect(str(lake))
    assert con.execute("SELECT mjd FROM lightcurves WHERE object_id = 'X1' AND band = 'g'").fetchone()[0] == [1.0, 3.0]


def _lake_rows(lake: Path) -> list[dict]:
    dataset = ds.dataset(str(lake / "lightcurves"), format="parquet", partitioning="hive")
    table = dataset.to_table().sort_by([("band", "ascending"), ("object_id", "ascending")])
    return table.to_pylist()


def test_sigkill_during_map_then_rerun_gives_the_same_lake(tmp_path, client):
    source = "synthetic://?n=2400&seed=7&per_partition=150"
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    cmd = [sys.executable, str(ROOT / "ingest" / "run.py"), "--survey", "synthetic", "--source", source,
           "--lake", str(killed), "--workers", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    markers = []
    while time.time() < deadline and proc.poll() is None:
        markers = list(killed.glob("_ingest/runs/*/map/*.json"))
        if markers:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = {p: p.stat().st_mtime_ns for p in killed.glob("_ingest/runs/*/map/*.json")}
    assert 1 <= len(done_before) < 16
    assert (killed / "_ingest" / "survey=synthetic" / "lock.json").exists()    # the killed run's, taken over below
    # nothing half-written is visible: no published table, no partial Parquet anywhere
    assert not (killed / "lightcurves").exists()
    assert all(p.suffix != ".parquet" or pq.ParquetFile(p).metadata.num_rows >= 0 for p in killed.rglob("*"))

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    # the finished map tasks of the killed run were not redone, and the run says how many it took over
    assert all(p.stat().st_mtime_ns == t for p, t in done_before.items())
    assert f"{len(done_before)} of 16 inputs mapped already" in rerun.stdout
    assert f"done (resumed: {len(done_before)} inputs mapped by an earlier run)" in rerun.stdout
    assert "taking over the ingest lock of synthetic" in rerun.stdout
    assert not (killed / "_ingest" / "survey=synthetic" / "lock.json").exists()

    reference = run_ingest("synthetic", source, str(clean), client=client, progress=False)
    assert reference.curves == 4800
    assert _lake_rows(killed) == _lake_rows(clean)
    a = {p.relative_to(killed): p.read_bytes() for p in (killed / "lightcurves").rglob("*.parquet")}
    b = {p.relative_to(clean): p.read_bytes() for p in (clean / "lightcurves").rglob("*.parquet")}
    assert a == b
    assert not [p for p in killed.rglob("*") if ".tmp-" in p.name]


def _tiles(folder: Path, tiles, n_obs) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for tile in tiles:
        (folder / f"lc_1.{tile}.1.R.mjd").write_bytes(macho_text(tile, "R", good_rows(n_obs + tile)))
    return folder


def _observations(lake: Path) -> list[tuple]:
    return connect(str(lake)).execute("SELECT object_id, n_obs, ingest_id FROM lightcurves ORDER BY 1").fetchall()


def test_going_back_to_an_earlier_version_of_the_files_ingests_it_again(tmp_path, client):
    # v1, then one file edited (v2), then the edit undone: v1's finished run has no shards any more
    src, lake = _tiles(tmp_path / "src", (1, 2, 3), 20), tmp_path / "lake"
    first = run_ingest("macho", str(src), str(lake), client=client, progress=False)
    _tiles(src, (2,), 40)
    second = run_ingest("macho", str(src), str(lake), client=client, progress=False)
    assert second.ingest_id != first.ingest_id and [n for _, n, _ in _observations(lake)] == [21, 42, 23]
    _tiles(src, (2,), 20)
    out = io.StringIO()
    again = run_ingest("macho", str(src), str(lake), client=client, progress=False, stream=out)
    assert again.ingest_id == first.ingest_id and again.status == "done", out.getvalue()
    assert "running it afresh" in out.getvalue()
    assert _observations(lake) == [(f"1.{t}.1", 20 + t, first.ingest_id) for t in (1, 2, 3)]


class _KilledWhilePublishing(BaseException):
    """Stands for a SIGKILL between two moves of the publish (the moves take milliseconds on a local disk)."""


def _publish_killed_after(monkeypatch, moves: int):
    import astromer.ingest as ingest_module

    real, done = ingest_module.publish, []

    def publish(fs, tmp, final):
        if len(done) == moves:
            raise _KilledWhilePublishing(final)
        real(fs, tmp, final)
        done.append(final)

    monkeypatch.setattr(ingest_module, "publish", publish)


def test_a_publish_killed_half_way_resumes_to_the_new_survey(tmp_path, client, monkeypatch):
    old, new = _tiles(tmp_path / "old", (1, 2, 3, 4), 20), _tiles(tmp_path / "new", (1, 2, 3, 4), 50)
    lake, clean = tmp_path / "lake", tmp_path / "clean"
    parts = {"part_bytes": 1}    # a part per input: four moves
    run_ingest("macho", str(old), str(lake), client=client, progress=False, **parts)
    reference = run_ingest("macho", str(new), str(clean), client=client, progress=False, **parts)
    _publish_killed_after(monkeypatch, 2)
    with pytest.raises(_KilledWhilePublishing):
        run_ingest("macho", str(new), str(lake), client=client, progress=False, replace=True, **parts)
    assert {n for _, n, _ in _observations(lake)} == {51, 52, 23, 24}     # half published: what the resume mends
    monkeypatch.undo()
    out = io.StringIO()
    resumed = run_ingest("macho", str(new), str(lake), client=client, progress=False, replace=True, stream=out,
                         **parts)
    assert resumed.status == "done" and "4 of 4 inputs mapped already" in out.getvalue()
    assert _lake_rows(lake) == _lake_rows(clean) and resumed.ingest_id == reference.ingest_id


def test_a_publish_killed_then_overtaken_by_another_ingest_runs_afresh(tmp_path, client, monkeypatch):
    old, new = _tiles(tmp_path / "old", (1, 2, 3), 20), _tiles(tmp_path / "new", (1, 2, 3), 50)
    lake, parts = tmp_path / "lake", {"part_bytes": 1}
    run_ingest("macho", str(old), str(lake), client=client, progress=False, **parts)
    _publish_killed_after(monkeypatch, 1)
    with pytest.raises(_KilledWhilePublishing):
        run_ingest("macho", str(new), str(lake), client=client, progress=False, replace=True, **parts)
    monkeypatch.undo()
    other = _tiles(tmp_path / "other", (1, 2, 3), 70)                      # published in between
    run_ingest("macho", str(other), str(lake), client=client, progress=False, replace=True, **parts)
    out = io.StringIO()
    result = run_ingest("macho", str(new), str(lake), client=client, progress=False, replace=True, stream=out,
                        **parts)
    assert result.status == "done" and "running it afresh" in out.getvalue()
    assert [n for _, n, _ in _observations(lake)] == [51, 52, 53]


def test_a_publish_killed_then_written_over_by_another_killed_publish_runs_afresh(tmp_path, client, monkeypatch):
    # X moves 2 of 3 parts and dies, Y moves 1 (over X's first) and dies: X's resume must not keep Y's part
    old, x, y = (_tiles(tmp_path / name, (1, 2, 3), n) for name, n in (("old", 20), ("x", 50), ("y", 70)))
    lake, parts = tmp_path / "lake", {"part_bytes": 1}
    run_ingest("macho", str(old), str(lake), client=client, progress=False, **parts)
    for source, moves in ((x, 2), (y, 1)):
        _publish_killed_after(monkeypatch, moves)
        with pytest.raises(_KilledWhilePublishing):
            run_ingest("macho", str(source), str(lake), client=client, progress=False, replace=True, **parts)
        monkeypatch.undo()
    out = io.StringIO()
    result = run_ingest("macho", str(x), str(lake), client=client, progress=False, replace=True, stream=out, **parts)
    assert "running it afresh" in out.getvalue()
    assert _observations(lake) == [(f"1.{t}.1", 50 + t, result.ingest_id) for t in (1, 2, 3)]


def test_the_published_files_again_after_a_killed_publish_mend_the_survey(tmp_path, client, monkeypatch):
    # the manifest still names the old ingest, but a killed publish moved one of its own parts in: not unchanged
    old, x = _tiles(tmp_path / "old", (1, 2, 3), 20), _tiles(tmp_path / "x", (1, 2, 3), 50)
    lake, parts = tmp_path / "lake", {"part_bytes": 1}
    first = run_ingest("macho", str(old), str(lake), client=client, progress=False, **parts)
    _publish_killed_after(monkeypatch, 1)
    with pytest.raises(_KilledWhilePublishing):
        run_ingest("macho", str(x), str(lake), client=client, progress=False, replace=True, **parts)
    monkeypatch.undo()
    again = run_ingest("macho", str(old), str(lake), client=client, progress=False, replace=True, **parts)
    assert again.status == "done" and again.ingest_id == first.ingest_id
    assert _observations(lake) == [(f"1.{t}.1", 20 + t, first.ingest_id) for t in (1, 2, 3)]
    assert run_ingest("macho", str(old), str(lake), client=client, progress=False, **parts).status == "unchanged"


def test_the_part_size_is_part_of_the_ingest_id():
    from astromer.ingest import DEFAULT_PART_BYTES, ingest_id_of

    inputs = [("a.csv", "0" * 64)]
    assert ingest_id_of("csv", "mine", {}, inputs) == ingest_id_of("csv", "mine", {}, inputs, DEFAULT_PART_BYTES)
    assert ingest_id_of("csv", "mine", {}, inputs, 1 << 20) != ingest_id_of("csv", "mine", {}, inputs)


def test_a_run_killed_after_its_manifest_resumes_without_reading_again(tmp_path, client, monkeypatch):
    import astromer.ingest as ingest_module

    src, lake = _tiles(tmp_path / "src", (1, 2), 20), tmp_path / "lake"
    real = ingest_module.write_json

    def write_json(fs, data, path):
        if str(path).endswith("record.json"):
            raise _KilledWhilePublishing(path)
        real(fs, data, path)

    monkeypatch.setattr(ingest_module, "write_json", write_json)
    with pytest.raises(_KilledWhilePublishing):
        run_ingest("macho", str(src), str(lake), client=client, progress=False)
    monkeypatch.undo()
    out = io.StringIO()
    result = run_ingest("macho", str(src), str(lake), client=client, progress=False, stream=out)
    assert result.status == "done" and "afresh" not in out.getvalue() and result.resumed_inputs == 2
    assert [n for _, n, _ in _observations(lake)] == [21, 22]


def test_a_failed_rerun_keeps_the_published_survey_and_its_reports(tmp_path, client):
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.mkdir()
    bad.mkdir()
    (good / "lc_1.1.1.R.mjd").write_bytes(macho_text(1, "R", good_rows(40)))
    (bad / "lc_1.2.1.R.mjd").write_bytes(b"")
    lake = tmp_path / "lake"
    first = run_ingest("macho", str(good), str(lake), client=client, progress=False)
    failed = run_ingest("macho", str(bad), str(lake), client=client, progress=False, replace=True)
    assert first.exit_code == 0 and failed.exit_code == 1
    assert failed.report.startswith(str(lake / "_ingest" / "runs")) and os.path.exists(failed.report)
    con = connect(str(lake))
    assert con.execute("SELECT count(*), sum(n_obs) FROM lightcurves").fetchone() == (1, 40)
    assert con.execute("SELECT DISTINCT ingest_id FROM ingest_manifest").fetchall() == [(first.ingest_id,)]


def test_generic_parquet_with_a_column_mapping_through_the_command(tmp_path, capsys):
    import pyarrow as pa

    src = tmp_path / "pq"
    src.mkdir()
    pq.write_table(pa.table({"oid": ["s1", "s1", "s2", "s1"], "filt": ["g", "g", "g", "r"],
                             "hjd": [5.0, 4.0, 1.0, 2.0], "m": [15.0, 15.1, 16.0, 14.0], "e": [0.01, 0.02, 0.03, 0.5],
                             "ra_deg": [10.0, 10.0, 20.0, 10.0]}), src / "part.parquet")
    lake = tmp_path / "lake"
    rc = ingest_main(["--survey", "parquet", "--source", str(src), "--lake", str(lake), "--as", "mysurvey",
                      "--columns", "object=oid,band=filt,time=hjd,mag=m,err=e,ra=ra_deg", "--no-progress"])
    assert rc == 0
    con = connect(str(lake))
    rows = con.execute("SELECT survey, object_id, band, ra, mjd FROM lightcurves ORDER BY object_id, band").fetchall()
    assert rows == [("mysurvey", "s1", "g", 10.0, [4.0, 5.0]), ("mysurvey", "s1", "r", 10.0, [2.0]),
                    ("mysurvey", "s2", "g", 20.0, [1.0])]
    assert ingest_main(["--survey", "parquet", "--source", str(src), "--lake", str(lake),
                        "--columns", "object=oid,time=nope,mag=m,err=e", "--no-progress"]) == 1
    printed = capsys.readouterr()
    assert "missing_column" in printed.out
    assert "time=nope not among the file's columns (oid, filt, hjd, m, e, ra_deg): --columns" in printed.err


def test_a_second_batch_alone_is_refused_not_published_over_the_first(tmp_path, client, capsys):
    """An ingest publishes a whole survey: a source that lacks inputs the lake holds curves from would drop
    them, so it is refused (before any map) unless --replace; both batches together keep everything."""
    first, second = tmp_path / "batches" / "first", tmp_path / "batches" / "second"
    for folder in (first, second):
        folder.mkdir(parents=True)
    for tile, folder in ((1, first), (2, first), (3, second)):
        (folder / f"lc_1.{tile}.1.R.mjd").write_bytes(macho_text(tile, "R", good_rows(30 + tile)))
    lake = tmp_path / "lake"
    published = run_ingest("macho", str(first), str(lake), client=client, progress=False)
    assert published.curves == 2
    with pytest.raises(DropsPublishedInputs, match=r"2 curves from 2 input\(s\).*lc_1\.1\.1\.R\.mjd"):
        run_ingest("macho", str(second), str(lake), client=client, progress=False)
    runs = [p.name for p in (lake / "_ingest" / "runs").iterdir()]
    assert runs == [published.ingest_id]                                # refused before mapping
    rc = ingest_main(["--survey", "macho", "--source", str(second), "--lake", str(lake), "--no-progress"])
    assert rc == 2 and "--replace" in capsys.readouterr().err
    con = connect(str(lake))
    assert con.execute("SELECT count(*) FROM lightcurves").fetchone() == (2,)

    # the folder above both batches holds the first batch's files under other keys (second/..., first/...)
    together = run_ingest("macho", str(tmp_path / "batches"), str(lake), client=client, progress=False)
    assert together.curves == 3
    assert connect(str(lake)).execute("SELECT sum(n_obs) FROM lightcurves").fetchone() == (31 + 32 + 33,)
    replaced = run_ingest("macho", str(second), str(lake), client=client, progress=False, replace=True)
    assert replaced.curves == 1
    assert connect(str(lake)).execute("SELECT object_id FROM lightcurves").fetchall() == [("1.3.1",)]


def test_own_labels_outlive_a_reingest_and_part_labels_do_not(tmp_path, client):
    import pyarrow as pa
    from astromer.lake.schema import LABELS
    from astromer.lake.writers import write_parquet

    src = tmp_path / "csv"
    src.mkdir()
    rows = "".join(f"s{i},g,{t},15.0,0.1\n" for i in range(3) for t in range(5))
    (src / "phot.csv").write_text("oid,filter,hjd,m,e\n" + rows)
    lake = tmp_path / "lake"
    options = {"columns": {"object": "oid", "band": "filter", "time": "hjd", "mag": "m", "err": "e"}}
    run_ingest("csv", str(src), str(lake), client=client, progress=False, out_survey="mine", options=options)
    paths = LakePaths(str(lake))
    own = pa.table({"object_id": ["s0", "s1"], "label_set": ["type"] * 2, "label": ["RRL", "EB"]}, schema=LABELS)
    write_parquet(paths.fs, own, paths.own_labels("mine", "type"))
    stale = f"{paths.labels('mine')}/{paths.part_name(0)}"        # what an earlier ingest with labels left
    write_parquet(paths.fs, own.slice(0, 1), stale)
    (src / "phot.csv").write_text("oid,filter,hjd,m,e\n" + rows + "s0,g,9,15.0,0.1\n")
    result = run_ingest("csv", str(src), str(lake), client=client, progress=False, out_survey="mine",
                        options=options)
    assert result.observations == 16
    assert os.path.exists(paths.own_labels("mine", "type")) and not os.path.exists(stale)
    assert connect(str(lake)).execute("SELECT object_id, label FROM labels ORDER BY object_id").fetchall() == [
        ("s0", "RRL"), ("s1", "EB")]


def test_a_star_in_two_files_is_one_curve_and_the_summary_says_so(tmp_path, client):
    src = tmp_path / "seasons"
    src.mkdir()
    (src / "season1.csv").write_text("oid,hjd,m,e\n" + "".join(f"s1,{t},15.0,0.1\ns2,{t},16.0,0.1\n" for t in range(5)))
    (src / "season2.csv").write_text("oid,hjd,m,e\n" + "".join(f"s1,{t},15.5,0.1\n" for t in (13, 4, 10, 11)))
    options = {"columns": {"object": "oid", "time": "hjd", "mag": "m", "err": "e"}}
    lake = tmp_path / "lake"
    result = run_ingest("csv", str(src), str(lake), client=client, progress=False, out_survey="mine",
                        options=options)
    assert result.curves == 2 and result.split_objects == 1 and result.observations == 14
    assert result.split_example == "s1 unknown (season1.csv, season2.csv)"
    assert "objects in several inputs | 1 (object, band): merged into one curve each, e.g. s1 unknown" \
        in result.summary()
    rows = connect(str(lake)).execute("SELECT object_id, n_obs, mjd, mag, quality, source_file FROM lightcurves "
                                      "ORDER BY object_id").fetchall()
    dup, moved = int(Quality.DUPLICATE_TIME), int(Quality.UNSORTED_SOURCE)
    # time 4 is in both files: the first input's row stays clean, the second's is the duplicate; season2
    # listed its rows out of time order, and that flag stays with them
    assert rows[0] == ("s1", 9, [0, 1, 2, 3, 4, 4, 10, 11, 13], [15.0] * 5 + [15.5] * 4,
                       [0, 0, 0, 0, 0, dup | moved, moved, moved, moved], "season1.csv + season2.csv")
    assert rows[1][:2] == ("s2", 5) and rows[1][5] == "season1.csv"
    with pytest.raises(FileNotFoundError, match="there is no lake at"):
        connect(str(tmp_path / "no-such-lake"))


def test_csv_rows_keep_empty_fields_whatever_else_the_file_holds(tmp_path, client):
    """An empty error is NaN (flagged), not a dropped row, also when another row sends the file through the
    row-by-row reader; that reader names the column and the text of a value that is not a number."""
    src = tmp_path / "csv"
    src.mkdir()
    body = "oid,filter,hjd,m,e\n" + "".join(f"s,g,{t},15.0,0.1\n" for t in range(4)) + "s,g,9,15.0,\n"
    (src / "clean.csv").write_text(body)
    (src / "dirty.csv").write_text(body.replace("s,", "d,") + "d,g,10,abc,0.1\n")
    lake = tmp_path / "lake"
    result = run_ingest("csv", str(src), str(lake), client=client, progress=False, options={
        "columns": {"object": "oid", "band": "filter", "time": "hjd", "mag": "m", "err": "e"}})
    assert result.quarantine == [("dirty.csv", "non_numeric", "1 row(s) dropped: line 7 (m: 'abc')")]
    rows = connect(str(lake)).execute(
        "SELECT object_id, n_obs, isnan(err[5]), quality[5] FROM lightcurves ORDER BY object_id").fetchall()
    assert rows == [("d", 5, True, int(Quality.NONFINITE)), ("s", 5, True, int(Quality.NONFINITE))]


def test_usage_errors_of_the_ingest_command_exit_2_with_one_line(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    lake = str(tmp_path / "lake")
    assert ingest_main(["--survey", "macho", "--source", str(empty), "--lake", lake, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "no input of the macho reader found" in err and "*.tar.bz2" in err and "Traceback" not in err
    with pytest.raises(NoInputs):
        run_ingest("csv", str(empty / "*.csv"), lake, progress=False, workers=1)
    assert ingest_main(["--survey", "csv", "--source", str(empty), "--lake", lake,
                        "--scheduler", "tcp://127.0.0.1:1", "--no-progress"]) == 2
    assert "cannot reach the Dask scheduler at tcp://127.0.0.1:1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ingest_main(["--survey", "csv", "--source", str(empty), "--delimiter", ";;"])
    assert "is not one character" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ingest_main(["--survey", "csv", "--source", str(empty), "--workers", "0"])
    assert "0 is not a positive whole number" in capsys.readouterr().err
    assert ingest_main(["--survey", "macho", "--source", str(empty), "--columns", "object=a"]) == 2
    assert "--columns apply to --survey csv and parquet" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ingest_main(["--survey", "csv", "--source", str(empty), "--columns", "object=star;time=hjd"])
    assert "holds two '=': separate the items with commas" in capsys.readouterr().err
    assert ingest_main(["--survey", "csv", "--source", str(empty), "--lake", lake, "--band", "bad/band"]) == 2
    assert "invalid band name 'bad/band'" in capsys.readouterr().err
    assert ingest_main(["--survey", "synthetic", "--source", "synthetic://?n=abc", "--lake", lake]) == 2
    assert "n='abc' is not a whole number" in capsys.readouterr().err
    assert ingest_main(["--survey", "synthetic", "--source", "synthetic://?n=5&nn=1", "--lake", lake]) == 2
    assert "unknown setting(s) nn; known: n, seed" in capsys.readouterr().err
    # refused before writing anything: no lake left behind (the survey's lock and its folders are gone)
    assert not os.path.exists(lake)


def test_tab_separated_files_through_the_command(tmp_path):
    src = tmp_path / "tsv"
    src.mkdir()
    (src / "p.tsv").write_text("oid\thjd\tm\te\n" + "".join(f"a\t{t}\t15.0\t0.1\n" for t in range(3)))
    lake = tmp_path / "lake"
    assert ingest_main(["--survey", "csv", "--source", str(src), "--lake", str(lake), "--delimiter", "\\t",
                        "--columns", "object=oid,time=hjd,mag=m,err=e", "--no-progress"]) == 0
    assert connect(str(lake)).execute("SELECT object_id, n_obs FROM lightcurves").fetchall() == [("a", 3)]


def _lock_holder(lake: Path, survey: str) -> subprocess.Popen:
    """Another process holding ``survey``'s ingest lock until its standard input closes."""
    code = ("import sys\nfrom astromer.lake.locks import survey_lock\n"
            f"with survey_lock({str(lake)!r}, {survey!r}, source='elsewhere'):\n"
            "    print('held', flush=True)\n    sys.stdin.read()\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_one_ingest_of_a_survey_at_a_time(tmp_path, client, capsys):
    from astromer.lake.locks import SurveyLocked

    src, lake = _tiles(tmp_path / "src", (1, 2), 20), tmp_path / "lake"
    lock = lake / "_ingest" / "survey=macho" / "lock.json"
    holder = _lock_holder(lake, "macho")
    try:
        with pytest.raises(SurveyLocked, match=f"another ingest of macho is running: ingest of elsewhere by "
                                               f"process {holder.pid} on "):
            run_ingest("macho", str(src), str(lake), client=client, progress=False)
        assert not (lake / "_ingest" / "runs").exists() and not (lake / "lightcurves").exists()
        code = ingest_main(["--survey", "macho", "--source", str(src), "--lake", str(lake), "--no-progress"])
        assert code == 3 and "--break-lock" in capsys.readouterr().err
        # another survey of the same lake is not held up
        assert run_ingest("macho", str(src), str(lake), out_survey="beside", client=client, progress=False).curves == 2
        assert not (lake / "_ingest" / "survey=beside" / "lock.json").exists()
    finally:
        holder.kill()
        holder.wait()
    # killed without giving the lock back: its process no longer runs, so the next ingest takes it over
    assert lock.exists()
    out = io.StringIO()
    result = run_ingest("macho", str(src), str(lake), client=client, progress=False, stream=out)
    assert result.status == "done" and "that process no longer runs" in out.getvalue()
    assert not lock.exists()


def test_a_lock_from_another_machine_is_broken_only_when_asked(tmp_path, client):
    import json

    from astromer.lake.locks import SurveyLocked, survey_lock

    src, lake = _tiles(tmp_path / "src", (1,), 20), tmp_path / "lake"
    lock = lake / "_ingest" / "survey=macho" / "lock.json"
    lock.parent.mkdir(parents=True)
    lock.write_text(json.dumps({"token": "t", "host": "another-node", "pid": os.getpid(), "source": "s3://b/x",
                                "started_at": "2026-01-01T00:00:00Z"}))
    with pytest.raises(SurveyLocked, match="by process .* on another-node since 2026-01-01"):
        run_ingest("macho", str(src), str(lake), client=client, progress=False)
    out = io.StringIO()
    assert run_ingest("macho", str(src), str(lake), client=client, progress=False, stream=out,
                      break_lock=True).curves == 1
    assert "--break-lock" in out.getvalue() and not lock.exists()
    # on a filesystem of fsspec's (exclusive create): held within one process, then free again
    with survey_lock("memory://locks/lake", "macho"):
        with pytest.raises(SurveyLocked, match="another ingest of macho is running"):
            with survey_lock("memory://locks/lake", "macho"):
                pass
    with survey_lock("memory://locks/lake", "macho"):
        pass


def _seasons(folder: Path, seasons: int = 3, objects: int = 40) -> Path:
    """``seasons`` CSV files of two bands, most objects in every file, some in one only, a few times seen in
    two seasons; and ``all/all.csv``, the same rows in one file (season after season)."""
    rng = np.random.default_rng(11)
    rows = [[] for _ in range(seasons)]
    for i in range(objects):
        for band in ("g", "r"):
            for k in range(seasons):
                if i % 7 == 3 and k:                    # in the first season only
                    continue
                times = 50000 + 300 * k + np.sort(rng.choice(200, size=int(rng.integers(3, 30)), replace=False))
                if i % 5 == 0 and k:
                    times = np.r_[times, 50000 + 300 * (k - 1) + 1]       # a time the season before may hold
                rows[k] += [f"o{i:03d},{band},{t:.5f},{15 + rng.normal(0, 0.2):.3f},{rng.uniform(0.01, 0.1):.3f}"
                            for t in times]
    (folder / "all").mkdir(parents=True)
    header = "oid,filter,hjd,m,e\n"
    for k, season in enumerate(rows):
        (folder / f"season{k}.csv").write_text(header + "\n".join(season) + "\n")
    (folder / "all" / "all.csv").write_text(header + "\n".join(r for season in rows for r in season) + "\n")
    return folder


SEASON_OPTIONS = {"columns": {"object": "oid", "band": "filter", "time": "hjd", "mag": "m", "err": "e"}}


def _curves(lake: Path) -> list[tuple]:
    # UNSORTED_SOURCE says how a file listed its rows: one file of all seasons lists them otherwise
    return connect(str(lake)).execute(
        "SELECT object_id, band, n_obs, mjd, mag, err, list_transform(quality, lambda q: q & ~32::UTINYINT), ra, dec "
        "FROM lightcurves ORDER BY object_id, band").fetchall()


def test_season_files_make_the_curves_one_file_of_all_rows_makes(tmp_path, client):
    src = _seasons(tmp_path / "src")
    # small parts: each band's split rows spill from several parts into several buckets
    seasons = run_ingest("csv", str(src / "season*.csv"), str(tmp_path / "seasons"), client=client, progress=False,
                         options=SEASON_OPTIONS, part_bytes=20_000)
    whole = run_ingest("csv", str(src / "all"), str(tmp_path / "whole"), client=client, progress=False,
                       options=SEASON_OPTIONS)
    assert seasons.curves == whole.curves == 80 and seasons.observations == whole.observations
    assert seasons.split_objects == 2 * (40 - 6)          # o003, o010, ... are in one file
    # per band: the one curve no other input has, and the merged curves in buckets of about 20 kB
    parts = sorted(p.relative_to(tmp_path / "seasons" / "lightcurves").as_posix()
                   for p in (tmp_path / "seasons" / "lightcurves").rglob("*.parquet"))
    assert [p for p in parts if "band=g" in p] == [f"survey=csv/band=g/part-0000{i}.parquet" for i in (0, 3, 4)]
    assert _curves(tmp_path / "seasons") == _curves(tmp_path / "whole")
    assert not (tmp_path / "seasons" / "_ingest" / "runs" / seasons.ingest_id / "merge").exists()


@pytest.mark.parametrize("stage", ["split_task", "merge_task"])
def test_a_run_killed_while_merging_resumes_to_the_same_lake(tmp_path, client, monkeypatch, stage):
    import astromer.ingest as ingest_module

    src = _seasons(tmp_path / "src")
    real = getattr(ingest_module, stage)

    def fails_on_one(lake, ingest_id, band, number, *args):
        # tasks are pickled to the workers (a counter here would be copied): the g band's part 1 or bucket 1
        # fails, the other tasks finish or not, in whatever order the workers take them
        if (band, number) == ("g", 1):
            raise RuntimeError("killed")
        return real(lake, ingest_id, band, number, *args)

    monkeypatch.setattr(ingest_module, stage, fails_on_one)
    killed = tmp_path / "killed"
    with pytest.raises(RuntimeError, match="killed"):
        run_ingest("csv", str(src / "season*.csv"), str(killed), client=client, progress=False,
                   options=SEASON_OPTIONS, part_bytes=20_000)
    monkeypatch.undo()
    assert not (killed / "lightcurves").exists()
    resumed = run_ingest("csv", str(src / "season*.csv"), str(killed), client=client, progress=False,
                         options=SEASON_OPTIONS, part_bytes=20_000)
    clean = run_ingest("csv", str(src / "season*.csv"), str(tmp_path / "clean"), client=client, progress=False,
                       options=SEASON_OPTIONS, part_bytes=20_000)
    assert resumed.curves == clean.curves == 80
    assert _curves(killed) == _curves(tmp_path / "clean")
    a = {p.relative_to(killed): p.read_bytes() for p in (killed / "lightcurves").rglob("*.parquet")}
    b = {p.relative_to(tmp_path / "clean"): p.read_bytes() for p in (tmp_path / "clean" / "lightcurves").rglob("*.parquet")}
    assert a == b


def test_a_lake_that_cannot_be_written_ends_in_one_line_and_leaves_no_temporary_file(tmp_path, capsys, monkeypatch):
    import astromer.lake.writers as writers

    src = _tiles(tmp_path / "src", (1, 2), 20)
    not_a_folder = tmp_path / "lake-file"
    not_a_folder.write_text("")
    args = ["--survey", "macho", "--source", str(src), "--no-progress", "--workers", "1"]
    assert ingest_main([*args, "--lake", str(not_a_folder)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    # a full disk during the map: the map task's file is removed, the command says so in one line
    lake = tmp_path / "lake"
    real = writers.create

    def full_disk(fs, path, *, text=False):
        handle = real(fs, path, text=text)
        if ".arrow.tmp-" in path:
            handle.write(b"partial")
            raise OSError(28, "No space left on device", path)
        return handle

    monkeypatch.setattr(writers, "create", full_disk)
    assert ingest_main([*args, "--lake", str(lake)]) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "the same command resumes once this is mended" in err
    assert "Traceback" not in err
    assert not [p for p in lake.rglob("*") if ".tmp-" in p.name] and not (lake / "lightcurves").exists()
    monkeypatch.undo()
    assert ingest_main([*args, "--lake", str(lake)]) == 0


def test_an_interrupted_ingest_says_the_same_command_resumes(tmp_path, capsys, monkeypatch):
    import astromer.ingest as ingest_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ingest_module, "run_ingest", interrupted)
    assert ingest_main(["--survey", "macho", "--source", str(_tiles(tmp_path / "src", (1,), 20)),
                        "--lake", str(tmp_path / "lake")]) == 130
    assert "interrupted: no file is half-written; the same command resumes" in capsys.readouterr().err


def test_long_format_readers_name_what_they_drop(tmp_path, client):
    import pyarrow as pa

    src = tmp_path / "src"
    src.mkdir()
    # Parquet with magnitudes as text: the row that is not a number goes, the others stay
    pq.write_table(pa.table({"oid": ["s1"] * 5, "hjd": [1.0, 2.0, 3.0, 4.0, 5.0],
                             "m": ["15.0", "15.1", "", "abc", "15.3"], "e": [0.1] * 5}), src / "text.parquet")
    pq.write_table(pa.table({"oid": ["s2"], "hjd": [[1.0, 2.0]], "m": [15.0], "e": [0.1]}), src / "lists.parquet")
    result = run_ingest("parquet", str(src), str(tmp_path / "lake"), client=client, progress=False,
                        options={"columns": {"object": "oid", "time": "hjd", "mag": "m", "err": "e"}})
    assert sorted(result.quarantine) == [
        ("lists.parquet", "wrong_type", "column hjd (time) holds list<element: double>, not numbers"),
        ("text.parquet", "non_numeric", "1 row(s) dropped: row 4 (m: 'abc')")]
    assert result.curves == 1 and result.observations == 4
    assert "non_numeric | 1, e.g. text.parquet: 1 row(s) dropped: row 4 (m: 'abc')" in result.summary()
    # a header alone, binary data, an object name the lake refuses
    csvs = tmp_path / "csvs"
    csvs.mkdir()
    (csvs / "header.csv").write_text("oid,hjd,m,e\n")
    (csvs / "binary.csv").write_bytes(bytes(range(256)) * 4)
    (csvs / "comma.csv").write_text('oid,hjd,m,e\n"q,0",1,15,0.1\nok,1,15,0.1\n')
    result = run_ingest("csv", str(csvs), str(tmp_path / "lake"), client=client, progress=False, out_survey="c",
                        options={"columns": {"object": "oid", "time": "hjd", "mag": "m", "err": "e"}})
    found = {(key, reason): detail for key, reason, detail in result.quarantine}
    assert found[("header.csv", "empty")] == "a header and no rows"
    assert found[("binary.csv", "unreadable")].startswith("binary data, not text")
    assert found[("comma.csv", "invalid_object_id")].startswith("'q,0': an object name is 1-128 letters")
    assert result.curves == 1


def test_a_publish_of_merged_curves_killed_half_way_resumes_without_starting_over(tmp_path, client, monkeypatch):
    # season files: most reduce parts lose every curve to the merge; such an empty part, published, said
    # nothing of whose it was, and the resumed publish took the survey for another ingest's and began again
    src = _seasons(tmp_path / "src")
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    _publish_killed_after(monkeypatch, 3)
    with pytest.raises(_KilledWhilePublishing):
        run_ingest("csv", str(src / "season*.csv"), str(killed), client=client, progress=False,
                   options=SEASON_OPTIONS, part_bytes=20_000)
    monkeypatch.undo()
    out = io.StringIO()
    resumed = run_ingest("csv", str(src / "season*.csv"), str(killed), client=client, progress=False,
                         options=SEASON_OPTIONS, part_bytes=20_000, stream=out)
    assert "running it afresh" not in out.getvalue() and resumed.status == "done"
    run_ingest("csv", str(src / "season*.csv"), str(clean), client=client, progress=False, options=SEASON_OPTIONS,
               part_bytes=20_000)
    assert _curves(killed) == _curves(clean)
    parts = list((killed / "lightcurves").rglob("*.parquet"))
    assert parts and all(pq.ParquetFile(p).metadata.num_rows > 0 for p in parts)


def test_flags_judge_the_stored_values_so_a_merge_flags_as_one_file_does(tmp_path, client):
    # an error of 1.00000001 is 1.0 in the lake's float32: not above one, in one file as in two
    rows1 = "oid,hjd,m,e\ns,1,15.0,0.1\ns,4,15.0,1.00000001\n"
    rows2 = "oid,hjd,m,e\ns,4,15.2,0.1\ns,6,15.1,0.1\n"
    options = {"columns": {"object": "oid", "time": "hjd", "mag": "m", "err": "e"}}
    (tmp_path / "two").mkdir()
    (tmp_path / "two" / "a.csv").write_text(rows1)
    (tmp_path / "two" / "b.csv").write_text(rows2)
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "ab.csv").write_text(rows1 + rows2.split("\n", 1)[1])
    flags = {}
    for name in ("two", "one"):
        run_ingest("csv", str(tmp_path / name), str(tmp_path / f"lake-{name}"), client=client, progress=False,
                   options=options)
        flags[name] = connect(str(tmp_path / f"lake-{name}")).execute(
            "SELECT err, quality FROM lightcurves").fetchone()
    assert flags["two"] == flags["one"]
    assert flags["one"][1][1:3] == [0, int(Quality.DUPLICATE_TIME)]    # the first row of time 4 stays usable


def test_the_lock_on_a_store_without_exclusive_create_and_when_taken_over(tmp_path):
    import json

    import fsspec
    from astromer.lake import locks
    from fsspec.implementations.memory import MemoryFileSystem

    class PlainStore(MemoryFileSystem):       # a store that takes "xb" as "wb" (no conditional writes)
        protocol = "plainstore"

        def _open(self, path, mode="rb", **kwargs):
            return super()._open(path, mode.replace("x", "w"), **kwargs)

    fsspec.register_implementation("plainstore", PlainStore, clobber=True)
    with locks.survey_lock("plainstore://locks/lake", "macho"):
        with pytest.raises(locks.SurveyLocked, match="another ingest of macho is running"):
            with locks.survey_lock("plainstore://locks/lake", "macho"):
                pass
    # a holder of this host name but another boot or process namespace (a container) is not judged gone
    me = locks.this_process()
    assert not locks.holder_is_gone({**me, "boot_id": "another-boot", "pid": 2**22 + 7})
    assert locks.holder_is_gone({**me, "pid": 2**22 + 7})
    # a stale lock met by many at once (threads here; processes alike): exactly one takes it over
    import threading

    lake = tmp_path / "lake"
    lock = lake / "_ingest" / "survey=macho" / "lock.json"
    lock.parent.mkdir(parents=True)
    lock.write_text(json.dumps({"token": "stale", **me, "pid": 2**22 + 7}))
    start, held, outcomes = threading.Barrier(8), threading.Event(), []

    def take():
        start.wait()
        try:
            with locks.survey_lock(str(lake), "macho", stream=io.StringIO()):
                outcomes.append("held")
                held.wait(timeout=30)
        except locks.SurveyLocked:
            outcomes.append("refused")

    threads = [threading.Thread(target=take) for _ in range(8)]
    for t in threads:
        t.start()
    deadline = time.time() + 30
    while len(outcomes) < 8 and time.time() < deadline:
        time.sleep(0.01)
    held.set()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["held"] + ["refused"] * 7 and not lock.exists()


def test_merge_buckets_hold_about_equal_observations_and_an_empty_one_is_no_part(tmp_path, client):
    # one star with far more observations than the others: buckets cut by observations leave some with no
    # object starting in them (four of six here)
    src = tmp_path / "src"
    (src / "all").mkdir(parents=True)
    header, seasons = "oid,hjd,m,e\n", []
    for k in range(3):
        rows = [f"big,{50000 + 1000 * k + i * 0.5:.2f},15.0,0.05" for i in range(1500)]
        rows += [f"s{j},{50000 + 1000 * k + j:.2f},16.0,0.05" for j in range(5) for _ in range(1)]
        seasons.append(rows)
        (src / f"season{k}.csv").write_text(header + "\n".join(rows) + "\n")
    (src / "all" / "all.csv").write_text(header + "\n".join(r for s in seasons for r in s) + "\n")
    options = {"columns": {"object": "oid", "time": "hjd", "mag": "m", "err": "e"}}
    merged = run_ingest("csv", str(src / "season*.csv"), str(tmp_path / "merged"), client=client, progress=False,
                        options=options, part_bytes=4_000)
    whole = run_ingest("csv", str(src / "all"), str(tmp_path / "whole"), client=client, progress=False,
                       options=options)
    assert merged.curves == whole.curves == 6 and merged.split_objects == 6
    assert _curves(tmp_path / "merged") == _curves(tmp_path / "whole")
    parts = list((tmp_path / "merged" / "lightcurves").rglob("*.parquet"))
    assert 2 <= len(parts) and all(pq.ParquetFile(p).metadata.num_rows > 0 for p in parts)
