"""A lake, training runs and embeddings on S3: a real S3 server (moto's, on 127.0.0.1) stands in for AWS,
MinIO or Ceph; each job runs as a user runs it (a process of its own that starts its own Ray), with the
store's endpoint in its environment, as on a cluster. Only an object store has no folders to rename and
caches its listings: each step here once failed there and nowhere else."""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys

import pytest
from conftest import ROOT, shared_path

moto_server = pytest.importorskip("moto.server", reason="the dev extra installs moto (a local S3 server)")
s3fs = pytest.importorskip("s3fs", reason="the s3 and dev extras install s3fs")

BUCKET = "astromer-test"


@pytest.fixture(scope="module")
def s3_env():
    """The environment a job needs for the local S3 server (what a user sets for MinIO or Ceph)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    logging.getLogger("werkzeug").setLevel(logging.WARNING)   # a line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)           # for this process's own reads (DuckDB, zarr, the listings below)
    try:
        s3fs.S3FileSystem(skip_instance_cache=True).mkdir(BUCKET)
        yield env
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


def _run(args: list[str], env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    full = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **env}   # each job starts its Ray
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=full, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"{args[0]} exited {done.returncode}:\n{done.stderr[-3000:]}"
    return done


def _last_json(stdout: str) -> dict:
    return json.loads(stdout[stdout.rindex("\n{") + 1:] if "\n{" in stdout else stdout)


@pytest.mark.slow
def test_lake_training_and_embeddings_on_s3(s3_env, tmp_path):
    from astromer.lake import connect
    from astromer.lake.windows import build_windows

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    lake = f"s3://{BUCKET}/lake"
    runs = f"s3://{BUCKET}/runs"
    env = {**s3_env, "ASTROMER_HOME": str(tmp_path / "home")}
    macho = shared_path("data", "macho_sample")

    # ingest (Dask) into the store: the published counts, the report named by its URL
    ingest = _run(["ingest/run.py", "--survey", "macho", "--source", str(macho), "--lake", lake, "--no-progress"],
                  env)
    assert f"report: {lake}/_ingest/survey=macho/quarantine.parquet" in ingest.stdout
    _run(["ingest/run.py", "--survey", "synthetic", "--source", "synthetic://?n=40&seed=3", "--lake", lake,
          "--no-progress"], env)
    con = connect(lake)
    counts = dict(con.sql("SELECT survey, count(*) FROM lightcurves GROUP BY ALL").fetchall())
    assert counts == {"macho": 19, "synthetic": 80}
    assert con.sql("SELECT sum(n_obs) FROM lightcurves WHERE survey = 'macho'").fetchall() == [(15_118,)]

    # windows (Zarr): built locally, uploaded, then put in place; a rebuild leaves none of the old files
    first = build_windows(lake, "w", surveys="synthetic")
    second = build_windows(lake, "w", surveys="macho", overwrite=True)
    assert first["path"] == second["path"] == f"{lake}/windows/w.zarr"
    import zarr

    store = zarr.open_group(second["path"], mode="r")
    assert store["mag"].shape[0] == second["windows"] and set(store["survey"][:]) == {"macho"}
    fs.invalidate_cache()
    left = fs.find(f"{BUCKET}/lake/windows")
    assert not [p for p in left if ".tmp-" in p], left
    chunks = [p for p in left if "/mag/c/" in p]
    assert len(chunks) == -(-second["windows"] // 4096), chunks     # the synthetic store's chunks are gone

    # pretraining reads the lake and keeps its checkpoints on the store; the same run again trains nothing
    flags = ["jobs/pretrain.py", "--lake", lake, "--preset", "tiny", "--num-workers", "1", "--batch-size", "8",
             "--max-steps", "6", "--checkpoint-every", "3", "--warmup-steps", "2", "--val-every", "3",
             "--storage-path", runs, "--run-name", "on-s3"]
    trained = _last_json(_run(flags, env).stdout)
    assert trained["registered"] and trained["version"] == 1
    assert trained["checkpoint"] == f"{runs}/on-s3/step-00000006-final"     # a URL, to paste into a command
    fs.invalidate_cache()
    checkpoints = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{BUCKET}/runs/on-s3") if "/step-" in p)
    assert checkpoints[-1] == "step-00000006-final", checkpoints
    assert fs.exists(f"{BUCKET}/runs/.astromer-runs/on-s3.json")
    again = _last_json(_run(flags, env).stdout)
    assert again["finished_before"] == 6 and again["version"] == 1

    # embeddings: written by Ray's workers, then put in place over the survey's earlier rows (twice)
    model = f"models:/{trained['registered']}/1"
    for detail in ([], ["--detail-objects", "SIM3.000000001"]):
        _run(["jobs/embed.py", "--model", model, "--lake", lake, "--survey", "synthetic", *detail], env)
        rows = connect(lake).sql("SELECT count(*), count(DISTINCT (object_id, band)) FROM embeddings "
                       "WHERE survey = 'synthetic'").fetchall()[0]
        assert rows == (80, 80)
    detail = zarr.open_group(f"{lake}/embeddings/model={trained['registered']}/version=1/_detail/"
                             "survey=synthetic.zarr", mode="r")      # per-observation detail, uploaded
    assert sorted(detail["SIM3.000000001"].group_keys()) == ["B", "R"]
    fs.invalidate_cache()
    staged = fs.find(f"{BUCKET}/lake/_embed") if fs.exists(f"{BUCKET}/lake/_embed") else []
    assert not [p for p in staged if not p.endswith("/")], staged   # (pyarrow leaves empty folder markers)

    # finetuning reads the store's labels; classification uses the store's embeddings
    tuned = _last_json(_run(["jobs/finetune.py", "--init-from", model, "--lake", lake, "--surveys", "synthetic",
                             "--label-set", "class", "--max-steps", "3", "--batch-size", "8", "--warmup-steps", "1",
                             "--storage-path", runs], env).stdout)
    assert tuned["registered"] == f"{trained['registered']}-ft-synthetic"
    classified = _run(["jobs/classify.py", "--model", model, "--lake", lake, "--dataset", "synthetic",
                       "--samples-per-class", "5", "--folds", "1", "--no-baselines", "--max-epochs", "5",
                       "--out", str(tmp_path / "classify")], env)
    assert "lake embeddings of" in classified.stdout + classified.stderr
    assert (tmp_path / "classify" / "results.md").exists()


def test_the_ingest_lock_on_s3_is_taken_once_even_by_two_that_looked_at_once(s3_env):
    """S3 refuses a second conditional write (If-None-Match), so two ingests that both found no lock and
    wrote in the same instant cannot both hold it."""
    from astromer.lake.locks import SurveyLocked, _create_exclusive, survey_lock

    lake = f"s3://{BUCKET}/locked-lake"
    with survey_lock(lake, "macho", source="first"):
        with pytest.raises(SurveyLocked, match="another ingest of macho is running"):
            with survey_lock(lake, "macho", source="second"):
                pass
    with survey_lock(lake, "macho"):      # released: free again
        pass

    class LookedBeforeTheOtherWrote(s3fs.S3FileSystem):
        def exists(self, path, **kwargs):
            return False

    blind = LookedBeforeTheOtherWrote(skip_instance_cache=True)
    path = f"{BUCKET}/locked-lake/_ingest/survey=ogle/lock.json"
    assert _create_exclusive(blind, path, b'{"token": "a"}')
    assert not _create_exclusive(blind, path, b'{"token": "b"}')
    assert blind.cat_file(path) == b'{"token": "a"}'


def test_a_folder_is_replaced_object_by_object_on_s3(s3_env):
    """replace_folder on S3: a new folder in place of none, nested files copied, stale ones removed, empty
    folder markers (as pyarrow writes them) passed over, and an empty new folder never empties the old one."""
    from astromer.lake.writers import replace_folder

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    root = f"{BUCKET}/replace"
    fs.pipe({f"{root}/new/a.parquet": b"a1", f"{root}/new/sub/b": b"b1", f"{root}/new/marker/": b""})
    replace_folder(fs, f"s3://{root}/new", f"{root}/final/")     # a URL and a trailing slash are the same place
    assert fs.cat(fs.find(f"{root}/final")) == {f"{root}/final/a.parquet": b"a1", f"{root}/final/sub/b": b"b1"}
    fs.rm(f"{root}/new", recursive=True)
    fs.pipe({f"{root}/new/a.parquet": b"a2"})
    replace_folder(fs, f"{root}/new", f"{root}/final")
    fs.invalidate_cache()
    assert fs.cat(fs.find(f"{root}/final")) == {f"{root}/final/a.parquet": b"a2"}    # sub/b was stale
    with pytest.raises(FileNotFoundError, match="nothing under"):
        replace_folder(fs, f"{root}/missing", f"{root}/final")
    assert fs.cat(f"{root}/final/a.parquet") == b"a2"


def test_store_mistakes_end_in_one_line_before_anything_is_written(s3_env, tmp_path):
    """A mistyped bucket is refused (s3fs would make it and write there), a local-only output given a URL is
    refused (it became a local folder named 's3:'), and a store that cannot be reached or refuses the
    credentials is one line naming its settings, not a traceback."""
    from astromer.commands import check_output
    from astromer.ingest import run_ingest
    from astromer.lake.paths import check_bucket

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    with pytest.raises(FileNotFoundError, match="--lake s3://no-such-bucket/lake: there is no bucket 'no-such-bucket'"):
        run_ingest("synthetic", "synthetic://?n=5&seed=1", "s3://no-such-bucket/lake", progress=False)
    with pytest.raises(FileNotFoundError, match="--storage-path"):
        check_bucket(fs, "no-such-bucket/runs", "--storage-path")
    check_bucket(fs, f"{BUCKET}/runs", "--storage-path")        # an existing bucket, a new folder: fine
    assert "no-such-bucket" not in fs.ls("", refresh=True)
    with pytest.raises(ValueError, match="--out s3://b/c: expected a local folder"):
        check_output("s3://b/c")
    cli = [sys.executable, "-m", "astromer.cli"]
    refused = subprocess.run([*cli, "weights", "import", str(tmp_path / "x.zip"), f"s3://{BUCKET}/models/x"],
                             capture_output=True, text=True, cwd=tmp_path, env={**os.environ, **s3_env})
    assert refused.returncode == 2 and "expected a local folder" in refused.stderr
    assert not (tmp_path / "s3:").exists()
    # no credentials anywhere (and no instance metadata to ask): one line, exit 2
    bare = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    bare.update(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"),
                AWS_EC2_METADATA_DISABLED="true", AWS_ENDPOINT_URL=s3_env["AWS_ENDPOINT_URL"])
    query = subprocess.run([*cli, "lake", "query", "SELECT 1", "--lake", f"s3://{BUCKET}/lake"],
                           capture_output=True, text=True, env=bare, timeout=120)
    assert query.returncode == 2, query.stderr
    assert query.stderr.startswith("error: the object store: Unable to locate credentials") and \
        "AWS_ENDPOINT_URL" in query.stderr and "Traceback" not in query.stderr, query.stderr
