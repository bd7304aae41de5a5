"""jobs/classify.py end to end on a small labelled lake: real DuckDB catalog, real MLflow (SQLite)."""
from __future__ import annotations

import importlib.util
import json
import posixpath
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from astromer import evaluate as ev
from astromer.config import ModelConfig
from astromer.lake.paths import LakePaths
from astromer.lake.schema import LABELS, LIGHTCURVES
from astromer.lake.writers import write_parquet
from astromer.model import Astromer
from astromer.weights import save_model

ROOT = Path(__file__).resolve().parents[1]


def _load_job(name: str):
    spec = importlib.util.spec_from_file_location(f"job_{name}", ROOT / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CLASSES = {"fast": (0.3, 0.6), "slow": (8.0, 15.0), "eclipse": (2.0, 4.0)}


def write_labelled_lake(root, n_per_class=24, survey="synthetic", bands=("g", "r"), seed=0):
    """Three classes of periodic curves (different periods and shapes) in two bands, plus a rare class."""
    rng = np.random.default_rng(seed)
    paths = LakePaths(str(root))
    rows = {b: [] for b in bands}
    labels, periods = [], {}
    counts = dict.fromkeys(CLASSES, n_per_class) | {"rare": 2}
    for cls, count in counts.items():
        lo, hi = CLASSES.get(cls, (1.0, 1.5))
        for i in range(count):
            oid = f"{cls}-{i:03d}"
            period = rng.uniform(lo, hi)
            periods[oid] = period
            labels.append({"object_id": oid, "label_set": "class", "label": cls})
            labels.append({"object_id": oid, "label_set": "period", "label": repr(period)})
            for b in bands:
                n = int(rng.integers(40, 120))
                t = 50000 + np.sort(rng.choice(np.arange(0, 2000, 0.29), n, replace=False))
                phase = (t / period) % 1
                shape = -0.8 * (np.abs(phase - 0.5) < 0.05) if cls == "eclipse" else 0.4 * np.sin(2 * np.pi * phase)
                m = 15 + shape + rng.normal(0, 0.02, n)
                rows[b].append({"object_id": oid, "ra": None, "dec": None, "mjd": t.tolist(), "mag": m.tolist(),
                                "err": [0.02] * n, "n_obs": n, "quality": [0] * n, "source_file": "test",
                                "source_sha256": "0" * 64, "ingest_id": "test"})
    for b in bands:
        write_parquet(paths.fs, pa.Table.from_pylist(rows[b], schema=LIGHTCURVES),
                      posixpath.join(paths.lightcurves(survey, b), paths.part_name(0)))
    write_parquet(paths.fs, pa.Table.from_pylist(labels, schema=LABELS),
                  posixpath.join(paths.labels(survey), paths.part_name(0)))
    return periods


@pytest.fixture()
def labelled_lake(tmp_path):
    import torch

    write_labelled_lake(tmp_path / "lake")
    torch.manual_seed(0)
    model_dir = save_model(Astromer(ModelConfig.tiny()), tmp_path / "tiny")
    return str(tmp_path / "lake"), str(model_dir)


def test_load_labelled_set_filters_classes_and_keeps_objects_together(labelled_lake):
    lake, _ = labelled_lake
    data = ev.load_labelled_set(lake, ev.DatasetSpec("toy", "synthetic", "class", min_members=10))
    assert data.class_names == ["eclipse", "fast", "slow"]
    assert len(data) == 3 * 24 * 2  # two bands per object
    assert any("rare" in reason for reason in data.dropped)
    assert data.periods["fast-000"] == pytest.approx(data.periods["fast-000"]) and len(data.periods) == 74
    one_band = ev.load_labelled_set(lake, ev.DatasetSpec("toy", "synthetic", "class", bands=("r",),
                                                         classes=("fast", "slow"), min_members=10))
    assert set(one_band.bands) == {"r"} and one_band.class_names == ["fast", "slow"]
    capped = ev.load_labelled_set(lake, ev.DatasetSpec("toy", "synthetic", "class", min_members=10, max_per_class=7))
    assert [len(set(capped.object_ids[capped.y == c])) for c in range(3)] == [7, 7, 7]
    assert len(capped) == 3 * 7 * 2  # both bands of every kept object
    with pytest.raises(ValueError, match="no label set 'mode'"):
        ev.load_labelled_set(lake, ev.DatasetSpec("toy", "synthetic", "mode"))
    with pytest.raises(LookupError, match=r"no class \['Mira'\] in label set 'class'.*'eclipse'"):
        ev.load_labelled_set(lake, ev.DatasetSpec("toy", "synthetic", "class", classes=("fast", "Mira")))


def test_an_empty_labelled_selection_says_what_the_lake_lacks_and_has(labelled_lake, tmp_path):
    lake, _ = labelled_lake
    # a survey without labels beside the labelled one
    paths = LakePaths(lake)
    row = {"object_id": "x", "ra": None, "dec": None, "mjd": [1.0, 2.0], "mag": [15.0, 15.1], "err": [0.1, 0.1],
           "n_obs": 2, "quality": [0, 0], "source_file": "t", "source_sha256": "0" * 64, "ingest_id": "t"}
    write_parquet(paths.fs, pa.Table.from_pylist([row], schema=LIGHTCURVES),
                  posixpath.join(paths.lightcurves("plain", "V"), paths.part_name(0)))
    cases = [(ev.DatasetSpec("t", "synthetc", "class"), FileNotFoundError,
              r"surveys=\['synthetc'\].*the lake holds plain \(bands V\); synthetic \(bands g, r\)"),
             (ev.DatasetSpec("t", "plain", "class"), ValueError,
              r"no labels in surveys \['plain'\]; the labelled surveys are \['synthetic'\]"),
             (ev.DatasetSpec("t", "synthetic", "mode"), ValueError,
              r"no label set 'mode' in surveys \['synthetic'\]; there are \['class', 'period'\]"),
             (ev.DatasetSpec("t", "synthetic", "class", bands=("Q",)), FileNotFoundError,
              r"survey 'synthetic' has no band\(s\) \['Q'\].*it has \['g', 'r'\]")]
    for spec, kind, words in cases:   # each was "no labelled curves for survey ..., label set ..., bands ..."
        with pytest.raises(kind, match=words):
            ev.load_labelled_set(lake, spec)


def test_classify_job_checks_what_it_is_asked_before_training(labelled_lake, tmp_path, capsys):
    lake, model_dir = labelled_lake
    job = _load_job("classify")
    (tmp_path / "typo.json").write_text('{"classifier": {"lr": 0.01, "lr_decay": 0.5}}')
    base = ["--model", model_dir, "--lake", lake, "--survey", "synthetic", "--label-set", "class",
            "--out", str(tmp_path / "out")]
    (tmp_path / "typo2.json").write_text('{"finetune_config": {"lrr": 0.01}}')
    (tmp_path / "fast.json").write_text('{"classifier": {"lr": "fast"}}')
    (tmp_path / "dropout.yaml").write_text('classifier:\n  dropout: 1.5\n')
    (tmp_path / "broken.json").write_text('{"classifier": {"lr": 0.01,}}')
    cases = [([*base, "--config", str(tmp_path / "fast.json")],
              f"settings file {tmp_path / 'fast.json'}: setting classifier.lr='fast' (str): expected a finite"),
             ([*base, "--config", str(tmp_path / "dropout.yaml")], "classifier.dropout=1.5: expected a fraction"),
             ([*base, "--config", str(tmp_path / "broken.json")], f"{tmp_path / 'broken.json'}: not valid JSON"),
             ([*base, "--config", str(tmp_path / "typo.json")], "unknown classifier setting(s) ['lr_decay']"),
             ([*base, "--config", str(tmp_path / "typo2.json")], "unknown finetune_config setting(s) ['lrr']"),
             ([*base, "--classes", "fast", "Mira"], "no class ['Mira']"),
             (["--model", model_dir, "--lake", lake, "--dataset", "stripe-82"],
              "unknown dataset 'stripe-82': expected one of asas, stripe82,"),
             (["--model", model_dir, "--lake", lake, "--survey", "synthetic"], "give --dataset NAME, or --survey"),
             ([*base[:-1], str(tmp_path / "typo.json")], "a file is there; expected a folder"),
             ([*base[:-1], str(tmp_path / "typo.json" / "out")], f"{tmp_path / 'typo.json'} is a file, not a folder"),
             (["--model", model_dir, "--lake", lake, "--survey", "nosuch", "--label-set", "class"], "nosuch"),
             ([*base[2:], "--model", str(tmp_path / "nomodel")], "nomodel")]
    for argv, words in cases:
        assert job.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and words in err, (argv, err)
    assert not (tmp_path / "out").exists()


def test_classify_job_refuses_counts_out_of_range_before_anything(tmp_path, capsys):
    job = _load_job("classify")
    base = ["--model", str(tmp_path / "model"), "--lake", str(tmp_path / "lake"), "--dataset", "stripe82"]
    for flag, value in [("--folds", "0"), ("--folds", "-1"), ("--max-epochs", "-3"), ("--samples-per-class", "0"),
                        ("--test-per-class", "0"), ("--patience", "0"), ("--threads", "0"),
                        ("--max-per-class", "0"), ("--min-members", "-1"), ("--seed", "-1")]:
        with pytest.raises(SystemExit) as stop:
            job.main([*base, flag, value])
        assert stop.value.code == 2, (flag, value)
        assert f"argument {flag}: {value} is not a" in capsys.readouterr().err
    # what is given is used, the smallest counts too (a test of truth, not `if args.folds:`)
    args = job.build_parser().parse_args([*base, "--folds", "1", "--patience", "1", "--min-members", "0",
                                          "--max-per-class", "1"])
    run = job.run_settings(args)
    assert (run.protocol.n_folds, run.classifier.patience) == (1, 1)
    assert (job.dataset_spec(args).min_members, job.dataset_spec(args).max_per_class) == (0, 1)


def test_classify_job_runs_protocol_with_baselines_and_logs_to_mlflow(labelled_lake, tmp_path, mlflow_sqlite):
    import mlflow

    lake, model_dir = labelled_lake
    out = tmp_path / "out"
    config = tmp_path / "best.json"
    config.write_text(json.dumps({"classifier": {"hidden": [64, 32, 16], "lr": 2e-3, "max_epochs": 30,
                                                 "patience": 5}, "rf_trees": 50}))
    job = _load_job("classify")
    rc = job.main(["--model", model_dir, "--lake", lake, "--survey", "synthetic", "--label-set", "class",
                   "--min-members", "10", "--samples-per-class", "4", "8", "--folds", "2", "--test-per-class", "10",
                   "--config", str(config), "--out", str(out), "--run-name", "toy-classify"])
    assert rc == 0
    table = (out / "results.md").read_text()
    for method in (ev.METHOD_FROZEN, ev.METHOD_RANDOM, ev.METHOD_RF):
        for spc in (4, 8):
            assert f"| {method} | {spc} | 2 |" in table
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["classifier"]["hidden"] == [64, 32, 16]
    rf = [r for r in results["results"] if r["method"] == ev.METHOD_RF]
    assert len(rf) == 4 and np.mean([r["f1"] for r in rf]) > 0.6  # separable classes: features work
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert "attention-first-block.png" in pngs and any(p.startswith("tsne-") for p in pngs)
    assert sum(p.startswith("confusion-") for p in pngs) == 6 and sum(p.startswith("gammas-") for p in pngs) == 4
    runs = mlflow.search_runs(experiment_names=["astromer-classify"], output_format="list")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    nested = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and parents[0].info.run_name == "toy-classify"
    assert len(nested) == 8          # frozen, random encoder, features + RF, the commonest-class reference
    # each row says how many distinct objects its smallest class trained on; the learned layer weights are kept
    for spc in (4, 8):
        row = next(r for r in results["summary"] if r["method"] == ev.METHOD_FROZEN and r["samples_per_class"] == spc)
        assert 1 <= row["train_objects"] <= spc
    gammas = {(g["method"], g["samples_per_class"]): np.array(g["per_fold"]) for g in results["gammas"]}
    assert gammas[(ev.METHOD_FROZEN, 4)].shape[0] == 2
    assert np.allclose(gammas[(ev.METHOD_FROZEN, 4)].sum(1), 1.0, atol=1e-5)
    assert all("f1_mean" in r.data.metrics and "f1_std" in r.data.metrics for r in nested)


def test_per_fold_finetuning_changes_the_encoder_copy_only(labelled_lake, tmp_path):
    import astromer

    lake, model_dir = labelled_lake
    model = astromer.load_model(model_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = ev.load_labelled_set(lake, ev.DatasetSpec("toy", "synthetic", "class", bands=("g",), min_members=10))
    run = ev.RunSettings(classifier=ev.ClassifierConfig(hidden=(32, 16), max_epochs=5, patience=2),
                         protocol=ev.ProtocolConfig(samples_per_class=(4,), n_folds=1, test_per_class=8),
                         finetune=True, baselines=False,
                         finetune_config={"lr": 1e-3, "batch_size": 8, "epochs": 1, "warmup_steps": 0,
                                          "schedule": "constant"})
    fold = ev.make_folds(data.object_ids, data.y, run.protocol)[0]
    tuned = ev._finetuned_layers(model, data, fold, run, seed=0)
    frozen = model.embed([data.curves[i] for i in fold.test], all_layers=True)
    assert not np.allclose(tuned[fold.test], frozen, atol=1e-6)  # the finetuned copy embeds differently
    assert all(np.array_equal(before[k], v) for k, v in model.state_dict().items())  # the model is untouched
    report = ev.run_protocol(data, model, run, tmp_path / "ft", log_mlflow=False, progress=None)
    assert {r["method"] for r in report["results"]} == {ev.METHOD_FROZEN, ev.METHOD_FINETUNED}
