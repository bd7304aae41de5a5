"""The training pieces without Ray: settings, schedule, the step's NaN guard, checkpoints, fit_windows."""
from __future__ import annotations

import json
import pickle
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from astromer.data import DataSpec, numpy_windows
from astromer.train import (
    NonFiniteLossError,
    RunTracker,
    TrainConfig,
    TrainState,
    build_model,
    evaluate,
    fit_windows,
    learning_curve_panels,
    learning_curve_png,
    load_checkpoint,
    make_optimizer,
    reconstruction_png,
    save_checkpoint,
    train_step,
)

ROOT = Path(__file__).resolve().parents[1]


def _curves(n=48, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        k = int(rng.integers(50, 150))
        t = np.sort(rng.uniform(50000, 50800, k))
        period, amp = rng.uniform(1, 20), rng.uniform(0.2, 0.6)
        out.append((t, (15 + amp * np.sin(2 * np.pi * t / period)).astype(np.float32),
                    np.full(k, 0.01, np.float32)))
    return out


def _batch(config, seed=0, n=16):
    spec = DataSpec(lake="", window_length=config.model_config().window_length, mask=config.mask)
    return {k: torch.as_tensor(v) for k, v in numpy_windows(_curves(n, seed), spec, np.random.default_rng(seed)).items()}


def test_settings_file_flags_and_validation(tmp_path):
    sys.path.insert(0, str(ROOT / "jobs"))
    import _common

    (tmp_path / "run.yaml").write_text("preset: tiny\nlr: 0.002\nsurveys: [ogle, asas]\nloss: weighted\n")
    args = _common.build_parser("x").parse_args(["--config", str(tmp_path / "run.yaml"), "--lr", "0.01",
                                                 "--survey", "macho", "--no-clean", "--tag", "owner=me"])
    config = _common.config_from_args(args)
    assert (config.preset, config.lr, config.surveys, config.loss, config.clean) == ("tiny", 0.01, ["macho"],
                                                                                     "weighted", False)
    assert config.tags == {"owner": "me"}
    # every flag's help is its setting's comment in TrainConfig, with the job's own default
    help_text = " ".join(_common.build_parser("x", {"warmup_steps": 20}).format_help().split())
    assert "--reproducible, --no-reproducible same settings and cluster: the same steps" in help_text
    assert "--warmup-steps WARMUP_STEPS linear warm-up from lr / warmup_steps (default: 20)" in help_text
    (tmp_path / "run.json").write_text(json.dumps({"preset": "tiny", "max_steps": 7}))
    assert TrainConfig.from_file(tmp_path / "run.json", lr=0.5).max_steps == 7
    with pytest.raises(ValueError, match="unknown training setting"):
        TrainConfig.from_dict({"learning_rate": 1})
    with pytest.raises(ValueError, match="loss='l1'"):
        TrainConfig(loss="l1")
    with pytest.raises(ValueError, match="MaskConfig.probed"):
        TrainConfig(probed=1.5)
    with pytest.raises(ValueError, match=re.escape("MaskConfig.probed=0.0: expected a fraction in (0, 1]")):
        TrainConfig(probed=0)    # it trained until 'loss is nan at step 2'
    # a fraction that rounds to no probed observation on the shortest window a run trains on: batches of
    # such windows have no loss term and a NaN gradient (the job checks it once it knows the window length)
    with pytest.raises(ValueError, match=re.escape("probed=0.05 probes no observation of a window of 10 "
                                                   "observations (the shortest curve kept: --min-observations 10)")):
        TrainConfig(probed=0.05).check_probed(200)
    TrainConfig(probed=0.05, min_observations=20).check_probed(200)       # floor(0.05 * 20) = 1
    with pytest.raises(ValueError, match=re.escape("a window of 8 observations (the window length)")):
        TrainConfig(probed=0.1, min_observations=20).check_probed(8)
    TrainConfig(probed=0.2, min_observations=4).check_probed(200)   # the cleaning keeps no curve under 5
    with pytest.raises(ValueError, match="a window of 4 observations"):
        TrainConfig(probed=0.2, min_observations=4, clean=False).check_probed(200)
    # --random applies to what --same leaves of the probed ones (windows.probe_counts), as its help says
    assert ("--random RANDOM fraction of the probed ones left after `same` that get another observation's "
            "magnitude; the rest are hidden ([MASK]) (default: 0.2)") in help_text
    # a settings file has no types of its own: each value is checked against its setting's
    (tmp_path / "typed.yaml").write_text("lr: 1e-3\nsystem_metrics_every: '5'\nsurveys: ogle\nbatch_size: 32.0\n")
    typed = TrainConfig.from_file(tmp_path / "typed.yaml")
    assert (typed.lr, typed.system_metrics_every, typed.surveys, typed.batch_size) == (1e-3, 5.0, ["ogle"], 32)
    sampled = TrainConfig(lr=np.float32(0.5), batch_size=np.int64(16), reproducible=np.bool_(True))  # numpy's
    assert (type(sampled.lr), type(sampled.batch_size), sampled.reproducible) == (float, int, True)
    for setting, message in ((dict(reproducible="false"), "reproducible='false' (str): expected true or false"),
                             (dict(batch_size="8.5"), "batch_size='8.5' (str): expected a whole number"),
                             (dict(system_metrics_every=float("nan")), "expected a finite number"),
                             (dict(system_metrics_every=0.2), "0 (off) or at least 1 second"),
                             (dict(bands=[1]), "expected a list of names"),
                             (dict(batch_size=True), "batch_size=True (bool): expected a whole number")):
        with pytest.raises(ValueError, match=re.escape(message)):
            TrainConfig(**setting)


def test_a_flag_error_is_the_first_line_and_a_long_usage_is_left_to_help(capsys):
    import _common
    from astromer.cli import build_parser

    with pytest.raises(SystemExit) as stop:
        _common.build_parser("x").parse_args(["--lr", "abc"])
    err = capsys.readouterr().err.splitlines()
    assert stop.value.code == 2
    # the job's usage block ran to thirty lines above the error
    assert err == ["error: argument --lr: invalid float value: 'abc'", f"see {Path(sys.argv[0]).name} --help for "
                   "every flag"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["lake", "query"])            # a short usage still follows the error
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "error: the following arguments are required: sql"
    assert err[1].startswith("usage: astromer lake query") and len(err) <= 5


def test_schedule_warmup_then_cosine():
    config = TrainConfig(preset="tiny", lr=1.0, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    model = build_model(config)
    optimizer, scheduler = make_optimizer(model, config)
    lrs = []
    for _ in range(110):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)     # linear warm-up
    assert lrs[60] == pytest.approx(0.55, abs=0.02)                            # half-way down the cosine
    assert lrs[-1] == pytest.approx(0.1, abs=0.01)
    constant = TrainConfig(preset="tiny", schedule="constant", warmup_steps=0)
    _, sched = make_optimizer(model, constant)
    assert sched.get_last_lr()[0] == constant.lr


def test_nan_loss_raises_naming_step_and_batch_without_update():
    config = TrainConfig(preset="tiny", warmup_steps=0)
    torch.manual_seed(0)
    model = build_model(config)
    optimizer, scheduler = make_optimizer(model, config)
    batch = _batch(config)
    batch["target"][3, 0] = float("nan")
    batch["probed"][3, 0] = True
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 17 \(epoch 2, batch 5\)"):
        train_step(model, batch, optimizer, scheduler, config, step=17, epoch=2, batch_index=5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_step_metrics_read_means_and_a_cpu_nan_still_raises_at_once():
    from astromer.train import StepMetrics

    config = TrainConfig(preset="tiny", warmup_steps=0)
    torch.manual_seed(0)
    model = build_model(config)
    optimizer, scheduler = make_optimizer(model, config)
    assert not optimizer.defaults.get("fused")            # on a CPU: no device-side skip, so no deferral
    batches = [_batch(config, seed=s) for s in range(3)]
    steps = StepMetrics()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    expected = [train_step(model, b, optimizer, scheduler, config, step=i + 1) for i, b in enumerate(batches)]
    model.load_state_dict(state)
    optimizer, scheduler = make_optimizer(model, config)
    for i, b in enumerate(batches):
        assert train_step(model, b, optimizer, scheduler, config, step=i + 1, into=steps) is None
    read = steps.read()
    assert read["steps"] == 3 and steps.read() == {}
    for name in ("loss", "rmse", "r2"):
        assert read[name] == pytest.approx(np.mean([e[name] for e in expected]), rel=1e-5)
    bad = _batch(config)
    bad["target"][3, 0], bad["probed"][3, 0] = float("nan"), True
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 9 \(epoch 1, batch 2\)"):
        train_step(model, bad, optimizer, scheduler, config, step=9, epoch=1, batch_index=2, into=steps)


def test_checkpoint_round_trip_continues_identically(tmp_path, monkeypatch):
    config = TrainConfig(preset="tiny", warmup_steps=3, max_steps=20)
    torch.manual_seed(1)
    model = build_model(config)
    optimizer, scheduler = make_optimizer(model, config)
    batches = [_batch(config, seed=s) for s in range(3)]
    train_step(model, batches[0], optimizer, scheduler, config, step=1)
    save_checkpoint(tmp_path / "ckpt", model, optimizer, scheduler, TrainState(step=1, epoch=0, best_val=0.5))
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors",
                                                                     "state.json", "trainer_state.pt"]
    expected = [train_step(model, b, optimizer, scheduler, config, step=i + 2) for i, b in enumerate(batches[1:])]

    # restore into fresh objects; the optimiser state goes through torch.load(weights_only=True), which
    # refuses arbitrary objects, and the model through safetensors: plain pickle is never used
    def refuse(*args, **kwargs):
        raise AssertionError("checkpoint loading must not unpickle")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    fresh = build_model(config)
    opt2, sched2 = make_optimizer(fresh, config)
    state = load_checkpoint(tmp_path / "ckpt", fresh, opt2, sched2)
    assert (state.step, state.best_val) == (1, 0.5)
    again = [train_step(fresh, b, opt2, sched2, config, step=i + 2) for i, b in enumerate(batches[1:])]
    for a, b in zip(expected, again):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["lr"] == b["lr"]


def test_unrecorded_checkpoint_is_the_newest_complete_folder(tmp_path):
    """What a resumed worker takes beyond Ray's record: the newest step folder whose files all read; a
    partly written one is skipped, and nothing is offered at or below the recorded step."""
    import shutil

    from astromer.train import checkpoint_dir_name, unrecorded_checkpoint

    config = TrainConfig(preset="tiny")
    model = build_model(config)
    optimizer, scheduler = make_optimizer(model, config)
    run = tmp_path / "storage" / "my-run"
    for step in (3, 6):
        save_checkpoint(run / checkpoint_dir_name(step), model, optimizer, scheduler, TrainState(step=step))
    shutil.copytree(run / checkpoint_dir_name(6), run / checkpoint_dir_name(9))
    model_file = run / checkpoint_dir_name(9) / "model.safetensors"
    model_file.write_bytes(model_file.read_bytes()[:1000])          # the copy was cut short
    (run / "checkpoint_manager_snapshot.json").write_text("{}")     # Ray's own files are not checkpoints
    storage = str(tmp_path / "storage")
    assert unrecorded_checkpoint(storage, "my-run", 3) == str(run / checkpoint_dir_name(6))
    assert unrecorded_checkpoint(storage, "my-run", -1) == str(run / checkpoint_dir_name(6))
    assert unrecorded_checkpoint(storage, "my-run", 6) is None
    assert unrecorded_checkpoint(storage, "other-run", -1) is None
    save_checkpoint(run / checkpoint_dir_name(12, final=True), model, optimizer, scheduler, TrainState(step=12))
    assert unrecorded_checkpoint(storage, "my-run", 6) == str(run / "step-00000012-final")


def test_probed_score_baselines_see_only_what_the_model_sees():
    from astromer.train import ProbedScore

    times = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]])
    target = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0, 9.0]])          # a ramp, then a jump
    probed = torch.tensor([[False, True, False, True, True, False]])
    hidden = torch.tensor([[False, True, False, True, False, False]])   # position 4 is a kept ("same") value
    batch = {"times": times, "target": target, "probed": probed, "hidden": hidden,
             "padding": torch.zeros_like(probed)}
    score = ProbedScore()
    score.add(target.clone(), batch)                                    # a perfect model
    out = score.result("val")
    visible_mean = (0.0 + 2.0 + 9.0) / 3
    mean_err = ((1 - visible_mean) ** 2 + (3 - visible_mean) ** 2 + (4 - visible_mean) ** 2) / 3
    # interpolation between visible neighbours: 1 -> 1.0 (exact), 3 -> 2 + (9-2)/3, 4 -> 2 + 2*(9-2)/3
    interp_err = (0 + (3 - (2 + 7 / 3)) ** 2 + (4 - (2 + 14 / 3)) ** 2) / 3
    assert out["val_rmse"] == 0 and out["val_hidden_rmse"] == 0
    assert out["val_baseline_rmse"] == pytest.approx(mean_err ** 0.5)
    assert out["val_interp_rmse"] == pytest.approx(interp_err ** 0.5)
    hidden_mean_err = ((1 - visible_mean) ** 2 + (3 - visible_mean) ** 2) / 2
    assert out["val_hidden_baseline_rmse"] == pytest.approx(hidden_mean_err ** 0.5)
    assert out["val_hidden_interp_rmse"] == pytest.approx(((3 - (2 + 7 / 3)) ** 2 / 2) ** 0.5)
    assert {"val_smoother_rmse", "val_hidden_smoother_rmse"} <= set(out)


def test_kernel_smoother_picks_the_bandwidth_by_leave_one_out_and_never_reads_probed_values():
    from astromer.train import kernel_smoother

    rng = np.random.default_rng(3)
    times = torch.from_numpy(np.sort(rng.uniform(0, 200, (3, 40)), axis=1))
    smooth = torch.sin(times / 15.0)                        # varies over ~weeks: a bandwidth of days wins
    noise = torch.from_numpy(rng.normal(0, 0.5, (3, 40)))   # white noise: nothing beats the mean
    target = torch.cat([smooth[:2], noise[2:]])
    visible = torch.from_numpy(rng.random((3, 40)) < 0.6)
    visible[:, 0] = True
    mean = (target * visible).sum(1) / visible.sum(1)
    bandwidths = (0.5, 4.0, 64.0)
    out = kernel_smoother(times, target, visible, mean, bandwidths=bandwidths, shrink=1.0)

    # reference: a plain loop over windows, bandwidths and observations
    t, y, v, m = times.numpy(), target.numpy(), visible.numpy(), mean.numpy()
    chosen = []
    for b in range(3):
        errors, preds = [], []
        for h in bandwidths:
            k = np.exp(-0.5 * ((t[b][:, None] - t[b][None, v[b]]) / h) ** 2)
            preds.append((k @ y[b][v[b]] + m[b]) / (k.sum(1) + 1.0))
            loo = []
            for i in np.flatnonzero(v[b]):
                others = v[b].copy()
                others[i] = False
                w = np.exp(-0.5 * ((t[b][i] - t[b][others]) / h) ** 2)
                loo.append(((w @ y[b][others] + m[b]) / (w.sum() + 1.0) - y[b][i]) ** 2)
            errors.append(np.mean(loo))
        chosen.append(int(np.argmin(errors)))
        np.testing.assert_allclose(out[b].numpy(), preds[chosen[-1]], rtol=1e-9, atol=1e-12)
    assert chosen[:2] == [1, 1]
    assert float((out[2] - mean[2])[~visible[2]].abs().mean()) < 0.1    # noise: about the window mean

    # the probed (not visible) values play no part
    changed = torch.where(visible, target, target + 100.0)
    assert torch.equal(kernel_smoother(times, changed, visible, mean, bandwidths=bandwidths), out)


def test_fit_windows_learns_and_plots(tmp_path):
    torch.manual_seed(0)
    config = TrainConfig(preset="tiny", lr=3e-3, warmup_steps=5, schedule="constant", batch_size=16, epochs=12,
                         patience=50)
    model = build_model(config)
    curves, val_curves = _curves(64, 0), _curves(16, 1)
    spec = DataSpec(lake="", window_length=model.config.window_length)
    val_batch = {k: torch.as_tensor(v) for k, v in numpy_windows(val_curves, spec, np.random.default_rng(5)).items()}
    before = evaluate(model, [val_batch])
    history = fit_windows(model, curves, config, val_curves=val_curves)
    after = evaluate(model, [val_batch])
    assert len(history["loss"]) == 12 * 4 and len(history["val_rmse"]) == 12
    assert after["val_rmse"] < 0.7 * before["val_rmse"]
    # these curves are smooth: the reconstruction beats predicting the window mean
    assert after["val_rmse"] < after["val_baseline_rmse"]
    png = reconstruction_png(model, val_batch, tmp_path / "rec.png")
    curve = learning_curve_png({"loss": list(enumerate(history["loss"]))}, tmp_path / "lc.png")
    assert png.read_bytes()[:4] == curve.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="no curves"):
        fit_windows(model, [], config)
    # classify's in-process finetune: curves too short to probe one observation are left out (a batch of
    # them had a NaN gradient), and a model whose windows are all too short is refused
    import dataclasses

    sparse = TrainConfig(preset="tiny", probed=0.1, batch_size=4, epochs=1, warmup_steps=0, schedule="constant")
    short_curves = [(t[:9], m[:9]) for t, m, *_ in _curves(8, 2)]
    with pytest.raises(ValueError, match="no curves"):        # 9 observations: floor(0.9) probes none
        fit_windows(build_model(sparse), short_curves, sparse)
    assert len(fit_windows(build_model(sparse), short_curves + curves[:4], sparse)["loss"]) == 1   # 4 kept
    from astromer.model import Astromer

    short_model = Astromer(dataclasses.replace(model.config, window_length=8))
    with pytest.raises(ValueError, match="probes no observation of the model's 8-observation windows"):
        fit_windows(short_model, curves, sparse)


def test_learning_curve_panels_split_hidden_and_drop_a_loss_equal_to_the_rmse():
    rmse = [(1, 0.5), (2, 0.4)]
    val = {"val_rmse": [(2, 0.3)], "val_baseline_rmse": [(2, 0.35)], "val_hidden_rmse": [(2, 0.33)],
           "val_hidden_smoother_rmse": [(2, 0.31)]}
    (probed, names), (hidden, hidden_names) = learning_curve_panels({"train_loss": rmse, "train_rmse": rmse, **val})
    assert names.keys() == {"train_rmse", "val_rmse", "val_baseline_rmse"}
    assert hidden_names.keys() == {"val_hidden_rmse", "val_hidden_smoother_rmse"} and "hidden" in hidden
    # a weighted loss differs from the RMSE: both are drawn; without hidden series there is one panel
    (_, names), = learning_curve_panels({"train_loss": [(1, 0.9), (2, 0.7)], "train_rmse": rmse,
                                         "val_rmse": [(2, 0.3)]})
    assert names.keys() == {"train_loss", "train_rmse", "val_rmse"}


def test_run_history_keeps_the_later_value_of_a_step_trained_again(tmp_path):
    # a resumed run trains the steps after its checkpoint again: MLflow keeps both values, the plots the later
    import time

    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    run_id = mlflow.MlflowClient().create_run(
        mlflow.MlflowClient().create_experiment("history", artifact_location=str(tmp_path / "art"))).info.run_id
    tracker = RunTracker(TrainConfig(mlflow_run_id=run_id, tracking_uri=uri), rank=0)
    tracker.metrics({"train_loss": 0.9}, step=1)
    tracker.metrics({"train_loss": 0.8}, step=2)
    tracker.metrics({"train_loss": 0.7}, step=3)
    time.sleep(0.01)
    tracker.metrics({"train_loss": 0.75}, step=3)   # the resumed attempt, from a checkpoint at step 2
    tracker.metrics({"train_loss": 0.6}, step=4)
    assert len(tracker.client.get_metric_history(run_id, "train_loss")) == 5
    assert tracker.history("train_loss") == {"train_loss": [(1, 0.9), (2, 0.8), (3, 0.75), (4, 0.6)]}
    assert RunTracker(TrainConfig(mlflow_run_id=run_id, tracking_uri=uri), rank=1).history("train_loss") == {}


def test_settings_files_in_three_formats_and_their_errors_name_the_file(tmp_path):
    from astromer.config import read_settings_file

    files = {"ok.yaml": "max_steps: 3\n", "ok.toml": "max_steps = 3\n", "ok.json": '{"max_steps": 3}'}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
        assert read_settings_file(tmp_path / name) == {"max_steps": 3}
    broken = {"bad.yaml": ("a: 1\nb: [1,\nc: d: e\n", "not valid YAML at line 3 column 5"),
              "bad.json": ('{"a": 1,,}', "not valid JSON at line 1 column 9"),
              "bad.toml": ("max_steps = \n", "not valid TOML"),
              "bad.cfg": ("max_steps: 3", "not valid JSON (a settings file is .json, .yaml, .yml or .toml)")}
    for name, (text, message) in broken.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=re.escape(f"{tmp_path / name}: {message}")):
            read_settings_file(tmp_path / name)


def test_the_gpu_ddp_check_runs_on_a_cpu():
    """benchmarks/gpu_ddp_check.py is what a lent GPU machine (torch, no Ray) runs first; here it runs its
    eager mode under gloo, so that it still matches the job's functions when a GPU comes."""
    import os
    import subprocess

    from conftest import ROOT

    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_ddp_check.py"), "--preset", "tiny",
                           "--modes", "eager", "--steps", "4"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "platform")})
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert "checkpoint round trip ok" in done.stdout and done.stdout.rstrip().endswith("OK")
