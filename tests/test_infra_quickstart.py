"""The README's main job end to end, reduced (--small): every stage runs for real (Dask ingest, Ray pretraining,
MLflow registry, Ray embedding, the classification protocol with its baselines) and the report is printed."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    home = tmp_path_factory.mktemp("quickstart") / "home"
    env = {k: v for k, v in os.environ.items() if k not in {"RAY_ADDRESS", "MLFLOW_TRACKING_URI"}}
    env["ASTROMER_HOME"] = str(home)
    done = subprocess.run([sys.executable, "jobs/quickstart.py", "--small"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    return home, done


def test_quickstart_runs_every_stage_and_prints_the_report(quickstart):
    home, done = quickstart
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    out = done.stdout
    # each stage announced, with the command a newcomer would type
    for n, stage in enumerate(("ingest", "pretrain", "embed", "classify", "results"), start=1):
        assert f"=== {n}/5 {stage}" in out
    for script in ("ingest/run.py", "jobs/pretrain.py", "jobs/embed.py", "jobs/classify.py"):
        assert re.search(rf"^\$ \S*python\S* {re.escape(script)} ", out, re.M), script

    # the results table: the model and both baselines, with mean ± std scores in [0, 1]
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 8 and "±" in cells[4]:
            rows[cells[0]] = [float(c.split("±")[0]) for c in cells[4:]]
    assert {"astromer skip (frozen)", "random encoder skip", "light-curve features + RF",
            "commonest test class (reference)"} <= set(rows), rows
    assert all(0.0 <= v <= 1.0 for scores in rows.values() for v in scores)
    # the classical baseline separates the simulated classes: labels and curves are joined correctly
    assert rows["light-curve features + RF"][0] > 0.5 > rows["commonest test class (reference)"][0]

    # the DuckDB report counts what was ingested (150 objects in two bands)
    assert re.search(r"synthetic\s*│\s*B\s*│\s*150\s*│", out) and re.search(r"synthetic\s*│\s*R\s*│\s*150\s*│", out)
    assert "array_cosine_similarity" in out and "query failed" not in out
    # the neighbours: five curves, each once (one label set joined, not every set the object has)
    lines = out.splitlines()
    header = next(k for k, line in enumerate(lines) if line.split()[:4] == ["object_id", "band", "label", "similarity"])
    neighbours = lines[header + 1:header + 6]
    assert len({tuple(line.split()[:2]) for line in neighbours}) == 5, neighbours
    pngs = [Path(line.strip()) for line in out.splitlines() if line.strip().endswith(".png")]
    assert pngs and all(p.is_file() and p.stat().st_size > 1000 for p in pngs)
    # the pretraining run's figures are fetched from MLflow beside the classification ones
    assert {"learning_curve.png", "reconstruction.png"} <= {p.name for p in pngs}
    # the reconstruction is scored against every baseline, on all probed values and on the hidden ones
    scores = re.findall(r"^  (all probed values|hidden values only): model (\d\.\d+); window mean (\d\.\d+), "
                        r"interpolation (\d\.\d+), smoother (\d\.\d+)$", out, re.M)
    assert [s[0] for s in scores] == ["all probed values", "hidden values only"], out[-3000:]
    beaten = sum(min(float(v) for v in values[1:]) < float(values[0]) for _, *values in scores)
    assert out.count("does better than this model") == beaten
    assert f"mlflow ui --backend-store-uri sqlite:///{home / 'mlflow.db'} --host 127.0.0.1" in out


def test_quickstart_registered_a_model_that_loads_from_the_registry(quickstart, monkeypatch):
    home, done = quickstart
    assert done.returncode == 0
    import astromer
    import mlflow
    import numpy as np
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{home / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("ASTROMER_HOME", str(home))
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)   # an earlier test in this process may have pointed the registry elsewhere
    version = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version_by_alias("astromer2-quickstart", "candidate")
    assert f"registered model: models:/astromer2-quickstart/{version.version}" in done.stdout
    model = astromer.load_model("models:/astromer2-quickstart@candidate")
    assert model.config.name == "tiny"
    t = np.sort(np.random.default_rng(0).uniform(0, 300, 120))
    vector = model.embed([(t, np.sin(t / 7.0).astype(np.float32), np.full(120, 0.02, np.float32))])
    assert vector.shape == (1, model.config.d_model) and np.isfinite(vector).all()
    # the embed stage wrote that version's embeddings into the lake
    parts = list((home / "lake" / "embeddings" / "model=astromer2-quickstart" / f"version={version.version}")
                 .rglob("*.parquet"))
    assert parts
