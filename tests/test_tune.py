"""tune/sweep.py: a real Ray Tune sweep with ASHA on a small set; every trial in MLflow; best config usable."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from astromer import evaluate as ev

ROOT = Path(__file__).resolve().parents[1]


def _load_sweep():
    spec = importlib.util.spec_from_file_location("astromer_tune_sweep", ROOT / "tune" / "sweep.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_sweep_with_asha_logs_every_trial_and_writes_a_usable_config(ray_local, mlflow_sqlite, tmp_path):
    import mlflow

    sweep = _load_sweep()
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 40)
    ids = np.array([f"o{i}" for i in range(len(y))])
    centres = rng.normal(0, 1.0, size=(3, 16))
    layers = (centres[y][:, None, :] + rng.normal(0, 1.0, size=(len(y), 3, 16))).astype(np.float32)
    out = tmp_path / "best.json"
    result = sweep.sweep(layers, y, ids, ["a", "b", "c"], samples_per_class=20, num_samples=8, max_epochs=8,
                         grace_period=1, patience=8, run_name="toy-sweep", out=out,
                         inputs={"model": "models:/toy@production", "model_name": "toy", "model_version": "3"})

    trials = result["trials"]
    assert len(trials) == 8 and all("error" not in t for t in trials)
    epochs = [t["epochs"] for t in trials]
    assert max(epochs) == 8 and min(epochs) < 8, epochs  # ASHA stopped the weaker trials early
    runs = mlflow.search_runs(experiment_ids=[result["experiment_id"]], output_format="list")
    nested = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == result["parent_run_id"]]
    assert len(nested) == 8 and all(r.info.status == "FINISHED" for r in nested)
    assert all("val_loss" in r.data.metrics and "lr" in r.data.params for r in nested)
    lengths = sorted(len(mlflow.tracking.MlflowClient().get_metric_history(r.info.run_id, "val_loss"))
                     for r in nested)
    assert lengths == sorted(epochs)
    # a trial is ranked by its best validation loss (what its early-stopped classifier keeps), by ASHA and
    # Tune's table as by the sweep: the lowest of its logged losses, at the epoch recorded
    histories = [mlflow.tracking.MlflowClient().get_metric_history(r.info.run_id, "val_loss") for r in nested]
    assert sorted(min(m.value for m in h) for h in histories) == pytest.approx(sorted(t["val_loss"] for t in trials))
    assert all(1 <= t["best_epoch"] <= t["epochs"] for t in trials)
    for run, history in zip(nested, histories):    # what Tune ranks: the running lowest loss, epoch by epoch
        ranked = mlflow.tracking.MlflowClient().get_metric_history(run.info.run_id, "best_val_loss")
        lows = np.minimum.accumulate([m.value for m in sorted(history, key=lambda m: m.step)])
        assert [m.value for m in sorted(ranked, key=lambda m: m.step)] == pytest.approx(list(lows))

    best = json.loads(out.read_text())
    settings = ev.RunSettings.from_dict(best)  # what jobs/classify.py --config does
    best_trial = min(trials, key=lambda t: t["val_loss"])
    assert settings.classifier.lr == best_trial["config"]["lr"]
    assert settings.classifier.gamma_init == best_trial["config"]["gamma_init"]
    assert best["metric"]["val_loss"] == best_trial["val_loss"]
    # what the sweep ran on, in the parent run and beside the best configuration
    parent = mlflow.tracking.MlflowClient().get_run(result["parent_run_id"])
    assert parent.data.params["model_name"] == "toy" and parent.data.params["model_version"] == "3"
    assert best["sweep"]["model"] == "models:/toy@production" and best["sweep"]["run_name"] == "toy-sweep"
    assert best["sweep"]["samples_per_class"] == 20


def test_sweep_counts_out_of_range_are_refused_before_any_trial(tmp_path, capsys):
    sweep = _load_sweep()
    base = ["--model", str(tmp_path / "model"), "--lake", str(tmp_path / "lake"), "--dataset", "stripe82"]
    for flag in ("--num-samples", "--samples-per-class", "--max-epochs", "--grace-period", "--max-per-class"):
        with pytest.raises(SystemExit) as stop:
            sweep.main([*base, flag, "0"])
        assert stop.value.code == 2 and f"argument {flag}: 0 is not a positive whole number" in capsys.readouterr().err
    y = np.repeat(np.arange(2), 5)
    ids = np.array([f"o{i}" for i in range(len(y))])
    for setting in ("num_samples", "max_epochs", "grace_period", "patience"):   # "every trial failed: none ran"
        with pytest.raises(ValueError, match=f"^{setting}=0: expected a positive whole number"):
            sweep.sweep(np.zeros((len(y), 2, 4), np.float32), y, ids, ["a", "b"], **{setting: 0})


def test_sweep_checks_its_dataset_and_output_before_any_work(tmp_path, capsys):
    sweep = _load_sweep()
    (tmp_path / "a-file").write_text("")
    base = ["--model", str(tmp_path / "model"), "--lake", str(tmp_path / "lake")]
    cases = [([*base, "--dataset", "stripe-82"], "unknown dataset 'stripe-82': expected one of asas, stripe82,"),
             # this one failed with a FileExistsError traceback when writing the result, after every trial
             ([*base, "--dataset", "stripe82", "--out", str(tmp_path / "a-file" / "best.json")],
              f"--out {tmp_path / 'a-file' / 'best.json'}: {tmp_path / 'a-file'} is a file, not a folder"),
             ([*base, "--dataset", "stripe82", "--out", str(tmp_path)], "a folder is there; expected a file name")]
    for argv, words in cases:
        assert sweep.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and words in err and "Traceback" not in err, (argv, err)
