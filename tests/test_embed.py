"""The embed job (real Ray Data on a small lake), the Parquet rows it writes, and DuckDB similarity search."""
from __future__ import annotations

import json
import logging
import os
import posixpath
import re
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from astromer import embeddings as emb
from astromer.config import ModelConfig
from astromer.lake import connect
from astromer.lake.paths import LakePaths
from astromer.lake.schema import LIGHTCURVES, Quality
from astromer.lake.writers import write_parquet
from astromer.model import Astromer
from astromer.weights import save_model

SURVEY = "synthetic"


def _curve(rng, n, period, amp, t0=50000.0):
    t = t0 + np.sort(rng.choice(np.arange(0, 3000, 0.37), size=n, replace=False))
    m = 15 + amp * np.sin(2 * np.pi * t / period) + rng.normal(0, 0.01, n)
    return t, m.astype(np.float32), np.full(n, 0.02, np.float32)


def _write_lake(root, rng, n_objects=10, bands=("g", "r")):
    """A lake with one survey in two bands; ``twin-a`` and ``twin-b`` are the same curve up to tiny noise;
    ``bad-0`` has every observation flagged (it must get a reason, not an embedding)."""
    paths = LakePaths(str(root))
    curves = {}
    for band in bands:
        rows = []
        for i in range(n_objects):
            n = int(rng.integers(30, 150))
            curves[(f"obj-{i}", band)] = _curve(rng, n, period=rng.uniform(0.3, 50), amp=rng.uniform(0.05, 1))
        t, m, e = _curve(rng, 90, period=3.3, amp=0.7)
        curves[("twin-a", band)] = (t, m, e)
        curves[("twin-b", band)] = (t, m + rng.normal(0, 1e-4, len(m)).astype(np.float32), e)
        curves[("bad-0", band)] = _curve(rng, 20, 1.0, 0.1)
        for (oid, b), (t, m, e) in curves.items():
            if b != band:
                continue
            q = np.zeros(len(t), np.uint8)
            if oid == "bad-0":
                q[:] = Quality.ERR_ABOVE_ONE
            rows.append({"object_id": oid, "ra": None, "dec": None, "mjd": t.tolist(), "mag": m.tolist(),
                         "err": e.tolist(), "n_obs": len(t), "quality": q.tolist(), "source_file": "test",
                         "source_sha256": "0" * 64, "ingest_id": "test"})
        table = pa.Table.from_pylist(rows, schema=LIGHTCURVES)
        # two files per band, so the job reads several blocks
        half = table.num_rows // 2
        base = paths.lightcurves(SURVEY, band)
        write_parquet(paths.fs, table.slice(0, half), posixpath.join(base, paths.part_name(0)))
        write_parquet(paths.fs, table.slice(half), posixpath.join(base, paths.part_name(1)))
    return curves


@pytest.fixture()
def small_lake(tmp_path):
    rng = np.random.default_rng(0)
    lake = tmp_path / "lake"
    curves = _write_lake(lake, rng)
    import torch

    torch.manual_seed(0)
    model = Astromer(ModelConfig.tiny())
    model_dir = save_model(model, tmp_path / "tiny-model")
    return str(lake), str(model_dir), curves, model


def _read_survey(lake, ref):
    folder = LakePaths(lake).embeddings(ref["model"], ref["version"], SURVEY)
    return pq.read_table(folder), sorted(p.name for p in __import__("pathlib").Path(folder).iterdir())


def _load_job(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "jobs" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"job_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_embed_job_writes_rows_replaces_on_rerun_and_writes_detail(ray_local, small_lake, capsys, caplog):
    lake, model_dir, curves, model = small_lake
    caplog.set_level(logging.INFO, logger="astromer.embeddings")
    report = emb.embed_survey(lake, model_dir, SURVEY, name="tiny", curves_per_batch=5,
                              detail_objects=["twin-a"], progress_every=0.05)
    assert len(curves) == 26 and report["rows"] == 24
    # the job's own progress: curves done of the survey's (read from the footers), as the actors go
    done = [int(m.group(1)) for r in caplog.records
            if (m := re.fullmatch(rf"embedding {SURVEY}: (\d+) of 26 curves \(\d+%\), \d+ curves/s", r.getMessage()))]
    assert done and done == sorted(done) and done[-1] <= 26, [r.getMessage() for r in caplog.records]
    assert report["device"] == "cpu" and report["precision"] == "float32"   # bf16 applies on GPUs only
    for band in ("g", "r"):
        (skipped,) = report["bands"][band]["skipped"]
        assert skipped["object_id"] == "bad-0" and "no usable observation" in skipped["reason"]
    table, files = _read_survey(lake, report)
    assert table.num_rows == 24
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 32)
    assert table.schema.field("layer_means").type == pa.list_(pa.list_(pa.float32(), 32), 3)
    assert files == ["part-00000.parquet"]
    rows = {(r["object_id"], r["band"]): r for r in table.to_pylist()}
    assert set(rows) == {key for key in curves if key[0] != "bad-0"}
    # the stored vectors are the model's own per-curve embedding of the same curve
    t, m, e = curves[("obj-3", "r")]
    expected = model.embed([(t, m, e)], all_layers=True)[0]
    got = rows[("obj-3", "r")]
    assert got["n_obs"] == len(t) and got["n_windows"] == -(-len(t) // 64)
    np.testing.assert_allclose(np.array(got["layer_means"]), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.array(got["embedding"]), expected[-1], rtol=1e-4, atol=1e-5)

    # re-running the same model version replaces the rows; re-running one band keeps the other band
    job = _load_job("embed")
    assert job.main(["--model", model_dir, "--name", "tiny", "--lake", lake, "--survey", SURVEY,
                     "--curves-per-batch", "7"]) == 0
    table2, files2 = _read_survey(lake, report)
    assert table2.num_rows == 24 and files2 == files
    only_g = emb.embed_survey(lake, model_dir, SURVEY, bands=["g"], name="tiny")
    table3, _ = _read_survey(lake, only_g)
    assert table3.num_rows == 24
    assert sorted(table3.column("band").to_pylist()) == ["g"] * 12 + ["r"] * 12
    # the survey's report keeps the entry of the band the run left alone
    saved = json.loads((Path(LakePaths(lake).embeddings("tiny", only_g["version"])) / "_reports"
                        / f"survey={SURVEY}.json").read_text())
    assert sorted(saved["bands"]) == ["g", "r"] and saved["rows"] == 24 and only_g["rows"] == 24
    assert not list(LakePaths(lake).fs.glob(posixpath.join(lake, "_embed", "*")))  # staging cleaned up

    # per-observation detail for the chosen object, in Zarr
    import zarr

    group = zarr.open_group(report["detail"]["path"], mode="r")
    n = len(curves[("twin-a", "g")][0])
    assert group["twin-a/g/embedding"].shape == (n, 32)
    assert group["twin-a/g/attention"].shape == (2, 2, 2, 64, 64)  # blocks, windows, heads, L, L
    received = group["twin-a/g/attention_received"][:]
    assert received.shape == (n,) and np.all(received > 0)

    # and the catalog's view finds the planted twin
    hits = emb.similar(lake, "twin-a", k=3)
    assert hits[0]["object_id"] == "twin-b" and hits[0]["similarity"] > 0.999
    assert all(h["object_id"] != "twin-a" for h in hits)
    from astromer.cli import main as cli

    capsys.readouterr()
    assert cli(["lake", "similar", "twin-a", "--k", "2", "--lake", lake, "--band", "r"]) == 0
    out = capsys.readouterr().out
    assert "twin-b" in out and f"nearest to twin-a ({SURVEY}, band r) by tiny version" in out
    assert cli(["lake", "similar", "nobody", "--lake", lake]) == 2
    assert capsys.readouterr().err.startswith("error: object 'nobody' has no embedding from tiny")


def test_embed_job_rejects_unknown_survey_and_band(ray_local, small_lake, capsys, monkeypatch):
    lake, model_dir, _, _ = small_lake
    with pytest.raises(FileNotFoundError, match=rf"surveys=\['macho'\].*the lake holds {SURVEY} \(bands g, r\)"):
        emb.embed_survey(lake, model_dir, "macho")
    # the job checks every survey before it embeds any, and refuses GPUs a local Ray does not have
    job = _load_job("embed")
    capsys.readouterr()
    assert job.main(["--model", model_dir, "--lake", lake, "--survey", SURVEY, "nosuch"]) == 2
    assert "surveys=['nosuch']" in capsys.readouterr().err
    assert not os.path.exists(LakePaths(lake).embeddings())
    assert job.main(["--model", str(Path(model_dir).parent / "nomodel"), "--lake", lake, "--survey", SURVEY]) == 2
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert job.main(["--model", model_dir, "--lake", lake, "--survey", SURVEY, "--gpus-per-actor", "1"]) == 2
    assert "ask for 1 GPU(s) and this machine's Ray has 0" in capsys.readouterr().err
    assert not os.path.exists(LakePaths(lake).embeddings())
    with pytest.raises(FileNotFoundError, match=r"no band\(s\) \['z'\]"):
        emb.embed_survey(lake, model_dir, SURVEY, bands=["z"])
    with pytest.raises(ValueError, match="precision 'fp16'"):
        emb.embed_survey(lake, model_dir, SURVEY, precision="fp16")


def test_embed_job_refuses_a_damaged_model_before_ray_starts(small_lake, capsys, monkeypatch):
    import ray

    lake, model_dir, _, _ = small_lake
    tensors = Path(model_dir) / "model.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:-100])

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray started for a model the job could not load")

    monkeypatch.setattr(ray, "init", no_ray)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    capsys.readouterr()
    assert _load_job("embed").main(["--model", model_dir, "--lake", lake, "--survey", SURVEY]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tensors}: not a readable safetensors file") and err.count("\n") == 1, err


def test_embed_counts_out_of_range_are_refused_before_ray_starts(tmp_path, capsys):
    import ray

    job = _load_job("embed")
    base = ["--model", str(tmp_path / "model"), "--lake", str(tmp_path / "lake"), "--survey", SURVEY]
    for flag, value in [("--actors", "0"), ("--batch-size", "0"), ("--curves-per-batch", "-1"), ("--threads", "0"),
                        ("--cpus-per-actor", "-1"), ("--gpus-per-actor", "-0.5")]:
        with pytest.raises(SystemExit) as stop:
            job.main([*base, flag, value])
        assert stop.value.code == 2 and f"argument {flag}: {value} is not a" in capsys.readouterr().err
    started = ray.is_initialized()
    for setting, value in [("actors", 0), ("batch_size", 0), ("curves_per_batch", 0), ("threads", 0),
                           ("gpus_per_actor", -1.0)]:
        with pytest.raises(ValueError, match=rf"^{setting}={value}: expected"):
            emb.embed_survey(str(tmp_path / "lake"), str(tmp_path / "model"), SURVEY, **{setting: value})
    assert ray.is_initialized() == started and not (tmp_path / "lake").exists()


def test_embedder_precision_reaches_the_model(small_lake, tmp_path):
    _, model_dir, _, _ = small_lake
    assert emb.CurveEmbedder(model_dir, str(tmp_path), device="cpu").model.bf16_on_cuda
    assert not emb.CurveEmbedder(model_dir, str(tmp_path), device="cpu", precision="float32").model.bf16_on_cuda


def test_progress_counts_a_retried_block_once(ray_local, small_lake, tmp_path):
    # an actor lost mid-block: Ray Data runs the block again, and the batches done before the loss come twice
    import ray

    lake, model_dir, _, _ = small_lake

    class _DiesOnceEmbedder(emb.CurveEmbedder):
        """Kills its own actor process at its second batch, the first time only (a marker file remembers);
        defined here, so that Ray pickles it by value."""

        def __init__(self, *args, marker: str, **kwargs):
            super().__init__(*args, **kwargs)
            self.marker, self.seen = marker, 0

        def __call__(self, batch):
            self.seen += 1
            if self.seen == 2 and not os.path.exists(self.marker):
                Path(self.marker).touch()
                os._exit(1)
            return super().__call__(batch)

    counter = ray.remote(num_cpus=0)(emb.CurveCounter).remote()
    source = LakePaths(lake).lightcurves(SURVEY, "g")
    ds = ray.data.read_parquet(source, partitioning=None, include_paths=True, override_num_blocks=1)
    ds = ds.select_columns(emb.READ_COLUMNS + ["path"]).map_batches(
        _DiesOnceEmbedder, batch_size=4, batch_format="pyarrow",
        fn_constructor_kwargs=dict(model_dir=model_dir, skipped_dir=str(tmp_path / "skipped"), device="cpu",
                                   counter=counter, marker=str(tmp_path / "died")),
        compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.5)
    rows = ds.count()
    assert (tmp_path / "died").exists()   # the actor did die, and the job went on
    assert rows == 12                     # 13 curves in band g; bad-0 has no usable observation
    assert ray.get(counter.count.remote()) == 13   # every curve once, the re-run batches included
    ray.kill(counter)


def _write_embeddings(lake, model, version, survey, ids, vectors, band="V"):
    paths = LakePaths(lake)
    d = vectors.shape[1]
    table = pa.table({
        "object_id": pa.array(ids), "band": pa.array([band] * len(ids)),
        "n_obs": pa.array(np.full(len(ids), 100, np.int32)), "n_windows": pa.array(np.ones(len(ids), np.int32)),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), d),
    })
    write_parquet(paths.fs, table, posixpath.join(paths.embeddings(model, version, survey), "part-V-00000.parquet"))


def test_similar_finds_planted_neighbour_and_binds_parameters(tmp_path):
    lake = str(tmp_path / "lake")
    rng = np.random.default_rng(1)
    x = rng.normal(size=(500, 16)).astype(np.float32)
    x[123] = 3.0 * x[7] + rng.normal(0, 0.01, 16)  # same direction: cosine ~ 1, far in euclidean terms
    ids = [f"o{i}" for i in range(500)]
    _write_embeddings(lake, "m", "1", "asas", ids, x)
    _write_embeddings(lake, "m", "2", "asas", ids, -x)  # another version must not leak into the answer
    hits = emb.similar(lake, "o7", k=5, model="m", version="1")
    assert [h["object_id"] for h in hits][0] == "o123"
    assert len(hits) == 5 and hits[0]["similarity"] > 0.999
    sims = [h["similarity"] for h in hits]
    assert sims == sorted(sims, reverse=True)
    # brute-force check of the whole top 5
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    cos = unit @ unit[7]
    cos[7] = -np.inf
    assert [h["object_id"] for h in hits] == [ids[i] for i in np.argsort(-cos)[:5]]
    # newest version by default; quotes in an object id are data, not SQL
    assert emb.similar(lake, "o7", k=1, model="m")[0]["object_id"] == "o123"
    with pytest.raises(LookupError, match="has no embedding"):
        emb.similar(lake, "o7' OR '1'='1", k=3, model="m", version="1")
    with pytest.raises(LookupError, match="versions"):
        emb.similar(lake, "o7", model="m", version="9")


def test_a_curve_whose_embedding_is_not_finite_is_skipped_with_its_reason(small_lake):
    """The second guard behind load_model_dir's: a model that gives NaN never publishes a NaN row."""
    import torch

    lake, _, curves, model = small_lake
    ids = ["obj-0", "obj-1", "bad-0"]
    table = pa.Table.from_pylist(
        [{"object_id": oid, "mjd": curves[(oid, "g")][0], "mag": curves[(oid, "g")][1], "err": curves[(oid, "g")][2],
          "quality": np.full(len(curves[(oid, "g")][0]), Quality.ERR_ABOVE_ONE if oid == "bad-0" else 0, np.uint8)}
         for oid in ids])
    schema = emb.embeddings_schema(model.config.d_model, model.config.n_layers + 1)
    out, skipped = emb.embed_table(model, table, "g", schema, batch_size=16)
    assert out.column("object_id").to_pylist() == ["obj-0", "obj-1"] and skipped.num_rows == 1
    out, skipped = emb.embed_table(model, table.slice(2), "g", schema, batch_size=16)   # nothing to embed
    assert out.num_rows == 0 and skipped.column("object_id").to_pylist() == ["bad-0"]
    with torch.no_grad():
        model.encoder.blocks[1].attention.wq.weight[0, :4] = float("nan")
    out, skipped = emb.embed_table(model, table, "g", schema, batch_size=16)
    assert out.num_rows == 0
    reasons = dict(zip(skipped.column("object_id").to_pylist(), skipped.column("reason").to_pylist()))
    assert reasons == {"obj-0": "the model's embedding is not finite (NaN or infinite values)",
                       "obj-1": "the model's embedding is not finite (NaN or infinite values)",
                       "bad-0": "no usable observation after cleaning"}


def test_readme_sql_example_runs(tmp_path):
    """The DuckDB query shown in the README, on the lake's catalog."""
    from astromer.lake import connect

    lake = str(tmp_path / "lake")
    x = np.eye(256, dtype=np.float32)[:6] + 0.01
    _write_embeddings(lake, "astromer1-macho", "1", "asas", [f"a{i}" for i in range(6)], x)
    con = connect(lake)
    rows = con.execute(emb.README_SQL, ["astromer1-macho", "1", "a2", 3]).fetchall()
    assert rows[0][1] == "a2" and rows[0][3] == pytest.approx(1.0, abs=1e-6)
    assert len(rows) == 3
    assert isinstance(con, duckdb.DuckDBPyConnection)


@pytest.mark.parametrize("rule", ["astromer2", "astromer1"])
def test_embed_table_all_at_once_equals_curve_by_curve(rule):
    """The job's flat path (cleaning, windows for the whole batch) against the curve-by-curve one: the same
    rows, reasons, counts and windows, embeddings equal to float32 rounding; a batch with times out of order
    after the cleaning goes curve by curve."""
    import torch

    rng = np.random.default_rng(3)
    curves = [_curve(rng, int(n), period=rng.uniform(0.3, 50), amp=rng.uniform(0.05, 1))
              for n in rng.integers(1, 300, 40)]
    rows = []
    for i, (t, m, e) in enumerate(curves):
        q = np.zeros(len(t), np.uint8)
        q[rng.random(len(t)) < 0.1] = Quality.ERR_ABOVE_ONE        # some observations flagged
        if i == 7:
            q[:] = Quality.NONFINITE                                 # a curve with nothing left
        m = m.copy()
        m[rng.random(len(t)) < 0.05] = np.nan                       # NaN magnitudes are never seen
        rows.append({"object_id": f"o{i}", "mjd": t, "mag": m, "err": e, "quality": q})
    table = pa.Table.from_pylist(rows)
    table = table.cast(pa.schema([("object_id", pa.string()), ("mjd", pa.list_(pa.float64())),
                                  ("mag", pa.list_(pa.float32())), ("err", pa.list_(pa.float32())),
                                  ("quality", pa.list_(pa.uint8()))]))
    torch.manual_seed(0)
    model = Astromer(ModelConfig(**{**ModelConfig.tiny().to_dict(), "window_rule": rule}))
    flat = emb._flat_embedding(model, table, 16, True)
    one = emb._curve_by_curve_embedding(model, table, 16, True)
    assert flat[0] == one[0] and flat[1] == one[1] and flat[1][7] is not None
    np.testing.assert_array_equal(flat[2], one[2])
    np.testing.assert_array_equal(flat[3], one[3])
    np.testing.assert_allclose(flat[4], one[4], rtol=1e-4, atol=1e-5)
    # through embed_table, the rows are the same either way
    schema = emb.embeddings_schema(model.config.d_model, model.config.n_layers + 1)
    out, skipped = emb.embed_table(model, table, "V", schema, batch_size=16)
    assert out.column("object_id").to_pylist() == [f"o{i}" for i in one[0]] and skipped.num_rows == 1
    # a duplicate time the flags did not catch: the flat path declines, the curve-by-curve one keeps the first
    t, m, e = curves[0]
    twice = pa.Table.from_pylist([{"object_id": "dup", "mjd": np.r_[t[:5], t[4:]], "mag": np.r_[m[:5], m[4:]],
                                   "err": np.r_[e[:5], e[4:]], "quality": np.zeros(len(t) + 1, np.uint8)}])
    assert emb._flat_embedding(model, twice, 16, True) is None
    out, _ = emb.embed_table(model, twice, "V", schema, batch_size=16)
    assert out.column("n_obs").to_pylist() == [int(np.isfinite(m).sum())]


def _write_photometry(path, rng, *, stars: int, n_obs: int, sign: float = 1.0) -> None:
    """A long-format CSV of ``stars`` sinusoidal curves of ``n_obs`` observations each."""
    lines = ["star,hjd,magnitude,sigma"]
    for i in range(stars):
        t = np.sort(rng.uniform(50000, 50300, n_obs))
        lines += [f"s{i},{x:.5f},{15 + sign * 0.3 * np.sin(x / (1 + i)):.4f},0.02" for x in t]
    path.write_text("\n".join(lines) + "\n")


def test_classification_uses_lake_embeddings_only_of_the_ingest_the_lake_holds(ray_local, tmp_path):
    # embeddings written, then the survey ingested again with other magnitudes: they describe curves the
    # lake no longer holds, and classify / sweep compute the layers afresh until the embed job runs again
    import torch
    from astromer import evaluate as ev
    from astromer.ingest import dask_client, run_ingest
    from astromer.lake.schema import LABELS

    rng = np.random.default_rng(3)
    src, lake = tmp_path / "src", str(tmp_path / "lake")
    src.mkdir()

    def write_csv(sign):
        _write_photometry(src / "phot.csv", rng, stars=9, n_obs=60, sign=sign)

    options = {"columns": {"object": "star", "time": "hjd", "mag": "magnitude", "err": "sigma"}}
    write_csv(+1)
    with dask_client(workers=1, threads_per_worker=1, processes=False) as client:
        run_ingest("csv", str(src), lake, client=client, progress=False, out_survey="mine", options=options)
        paths = LakePaths(lake)
        write_parquet(paths.fs, pa.Table.from_pylist(
            [{"object_id": f"s{i}", "label_set": "class", "label": "abc"[i % 3]} for i in range(9)], schema=LABELS),
            paths.own_labels("mine", "class"))
        torch.manual_seed(0)
        model_dir = save_model(Astromer(ModelConfig.tiny()), tmp_path / "tiny")
        spec = ev.DatasetSpec("mine", "mine", "class", min_members=3)
        data = ev.load_labelled_set(lake, spec)
        assert ev.cached_layers(lake, "tiny", "x", "mine", data) == (None, "absent")
        ref = emb.embed_survey(lake, model_dir, "mine", name="tiny", progress_every=0)
        layers, state = ev.cached_layers(lake, "tiny", ref["version"], "mine", data)
        assert state == "used" and layers.shape == (9, 3, 32)
        write_csv(-1)
        run_ingest("csv", str(src), lake, client=client, progress=False, out_survey="mine", options=options)
    data = ev.load_labelled_set(lake, spec)
    layers, state = ev.cached_layers(lake, "tiny", ref["version"], "mine", data)
    assert layers is None and state.startswith("stale (band unknown was embedded from ingest"), state
    emb.embed_survey(lake, model_dir, "mine", name="tiny", progress_every=0)
    assert ev.cached_layers(lake, "tiny", ref["version"], "mine", data)[1] == "used"


def test_the_embed_report_names_the_ingest_its_curves_came_from(ray_local, tmp_path, monkeypatch):
    # an ingest that lands while the embed job starts: the job reads the ingest id before the curves, so it
    # embeds the curves of that id or newer ones. Staged here by an ingest of longer curves just before the
    # id is read; read after the curves, the report would name the new ingest beside the old curves' rows.
    import torch
    from astromer import evaluate as ev
    from astromer.ingest import dask_client, run_ingest
    from astromer.lake import catalog
    from astromer.lake.schema import LABELS

    rng = np.random.default_rng(5)
    src, lake = tmp_path / "src", str(tmp_path / "lake")
    src.mkdir()

    def write_csv(n_obs):
        _write_photometry(src / "phot.csv", rng, stars=6, n_obs=n_obs)

    options = {"columns": {"object": "star", "time": "hjd", "mag": "magnitude", "err": "sigma"}}
    read_id = catalog.published_ingest_id
    with dask_client(workers=1, threads_per_worker=1, processes=False) as client:
        write_csv(40)
        run_ingest("csv", str(src), lake, client=client, progress=False, out_survey="mine", options=options)
        paths = LakePaths(lake)
        write_parquet(paths.fs, pa.Table.from_pylist(
            [{"object_id": f"s{i}", "label_set": "class", "label": "ab"[i % 2]} for i in range(6)], schema=LABELS),
            paths.own_labels("mine", "class"))

        def ingest_then_read(*args, **kwargs):
            write_csv(70)
            run_ingest("csv", str(src), lake, client=client, progress=False, out_survey="mine", options=options)
            return read_id(*args, **kwargs)

        monkeypatch.setattr(catalog, "published_ingest_id", ingest_then_read)
        torch.manual_seed(0)
        model_dir = save_model(Astromer(ModelConfig.tiny()), tmp_path / "tiny")
        ref = emb.embed_survey(lake, model_dir, "mine", name="tiny", progress_every=0)
    monkeypatch.undo()
    # the rows are of the 70-observation curves (the cleaning drops a few), not of the 40-observation ones
    assert connect(lake).execute("SELECT count(*), min(n_obs) > 60 FROM embeddings").fetchone() == (6, True)
    data = ev.load_labelled_set(lake, ev.DatasetSpec("mine", "mine", "class", min_members=3))
    assert ev.cached_layers(lake, "tiny", ref["version"], "mine", data)[1] == "used"


def test_embed_job_ends_in_one_line_when_the_lake_cannot_be_written_or_it_is_interrupted(small_lake, capsys,
                                                                                            monkeypatch):
    import ray
    from astromer import embeddings

    lake, model_dir, _, _ = small_lake
    job = _load_job("embed")
    args = ["--model", model_dir, "--lake", lake, "--survey", SURVEY]

    def no_ray(*a, **k):
        raise AssertionError("Ray started for a lake the job could not write")

    monkeypatch.setattr(ray, "init", no_ray)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    (Path(lake) / "_embed").write_text("a file where the staging folder goes")
    capsys.readouterr()
    assert job.main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot write in {lake}/_embed") and err.count("\n") == 1, err
    (Path(lake) / "_embed").unlink()
    # stopped, or the disk full, while a survey is embedded: one line each, and what it says
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    for raised, code, words in [(KeyboardInterrupt(), 130, "interrupted while embedding"),
                                (OSError(28, "No space left on device"), 1, "No space left on device")]:
        def stopped(*a, raised=raised, **k):
            raise raised

        monkeypatch.setattr(embeddings, "embed_survey", stopped)
        assert job.main(args) == code
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err and err.count("\n") == 1, err
