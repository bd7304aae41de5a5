"""Pretraining end to end on real Ray (2 workers, DDP over gloo) and a real SQLite MLflow: logging,
registration, resume by run name, recovery from a killed worker, and the NaN stop."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from astromer import registry
from astromer.train import NonFiniteLossError, TrainConfig, unrecorded_checkpoint
from mlflow.tracking import MlflowClient
from test_data import write_lake

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "jobs"))
import _common  # noqa: E402


@pytest.fixture(scope="module")
def lake(tmp_path_factory):
    return write_lake(tmp_path_factory.mktemp("pretrain_lake"), 300, seed=3)   # one epoch = 15 steps


def tiny(lake, run_name: str, **overrides) -> TrainConfig:
    settings = dict(lake=str(lake), corpus="unit", preset="tiny", batch_size=8, num_workers=2,
                    cpus_per_worker=0.5, data_cpus=0.25, warmup_steps=2, lr=3e-3, log_every=1,
                    checkpoint_every=3, max_steps=6, patience=100, run_name=run_name, max_failures=2)
    settings.update(overrides)
    return _common.complete(TrainConfig(**settings))


def _checkpoint_steps(config: TrainConfig) -> list[int]:
    folder = Path(config.storage_path) / config.run_name
    return sorted(int(p.name.split("-")[1]) for p in folder.glob("step-*") if p.is_dir())


def _registered_checkpoint(config: TrainConfig) -> int | None:
    """Step of the latest checkpoint Ray Train has registered (a folder alone may still be mid-report)."""
    snapshot = Path(config.storage_path) / config.run_name / "checkpoint_manager_snapshot.json"
    if not snapshot.exists():
        return None
    latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
    return int(latest["metrics"]["step"]) if latest else None


def _history(client, run_id, key):
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_train_logs_metrics_plots_and_registers(ray_local, mlflow_sqlite, lake):
    config = tiny(lake, "resume-me", max_steps=20, checkpoint_every=5, system_metrics_every=1)  # a pass and a third
    first = _common.run_training(config)
    client = MlflowClient()
    run = client.get_run(first["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "resume-me"
    assert run.data.params["preset"] == "tiny" and run.data.params["max_steps"] == "20"
    assert [s for s, _ in _history(client, run.info.run_id, "train_loss")] == list(range(1, 21))
    # one whole pass, then the partial last one as its fraction of it
    (whole, one_pass), (last, partial) = _history(client, run.info.run_id, "epoch")
    assert one_pass == 1 and last == 20 and partial == pytest.approx(1 + (20 - whole) / whole)
    for key in ("train_rmse", "train_r2", "train_windows_per_s", "epoch_loss", "final_val_rmse",
                "final_test_rmse", "final_val_baseline_rmse", "final_val_r2"):
        assert key in run.data.metrics, key
    assert "resumed_from_step" not in run.data.metrics
    # the node's CPU and memory, sampled every second while it trained (MLflow's system metrics)
    cpu = client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")
    assert len(cpu) >= 2 and min(m.value for m in cpu) > 0      # the first sample too (psutil primed)
    assert run.data.metrics["system/system_memory_usage_megabytes"] > 0
    # the cleaning's effect is counted per split and logged beside the metrics
    cleaning = json.loads(Path(client.download_artifacts(run.info.run_id, "cleaning.json")).read_text())
    assert cleaning["all"]["curves"] == sum(cleaning[s]["curves"] for s in ("train", "val", "test"))
    assert run.data.metrics["cleaning_all_curves"] == cleaning["all"]["curves"] > 0
    assert first["cleaning"]["usable_curves"] == run.data.metrics["cleaning_all_usable_curves"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert artifacts == {"plots/learning_curve.png", "plots/reconstruction.png"}
    png = client.download_artifacts(run.info.run_id, "plots/reconstruction.png")
    assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    name = registry.pretrained_name("unit")
    assert first["registered"] == name and first["version"] == 1
    assert client.get_model_version_by_alias(name, "candidate").version in (1, "1")
    assert registry.production_version(name) == 1
    # the version carries the digest of the validation windows it was scored on, as the run does
    val_set = client.get_model_version(name, "1").tags["val_set"]
    assert len(val_set) == 16 and run.data.tags["astromer.val_set"] == val_set
    # the last step (a multiple of --checkpoint-every) is checkpointed once, as the final checkpoint
    steps = _checkpoint_steps(config)
    assert steps[-1] == 20 and steps.count(20) == 1
    assert (Path(config.storage_path) / config.run_name / "step-00000020-final").is_dir()

    # the registered production model loads from safetensors
    import astromer

    model = astromer.load_model(f"models:/{name}@production")
    assert model.config.name == "tiny"


def _final_weights(config: TrainConfig) -> dict:
    from astromer.weights import MODEL_FILE
    from safetensors.torch import load_file

    return load_file(str(Path(config.storage_path) / config.run_name / f"step-{config.max_steps:08d}-final"
                         / MODEL_FILE))


def test_reproducible_runs_repeat_each_other_step_for_step(ray_local, mlflow_sqlite, lake):
    """--reproducible, 2 workers with dropout, over a pass and a third (a new pass's draws included): a run
    stopped at step 12 (in the middle of the first pass), re-run to step 15 (the pass's end) and then to step
    20 under the same name logs the same training loss at every step as a run that went straight through, and
    ends with the same weights; a run without the flag draws other windows."""
    settings = dict(max_steps=20, total_steps=20, checkpoint_every=100, val_every=10, count_cleaning=False,
                    dropout=0.1)
    # checkpointed on the way, at step 15 too, the first pass's last batch: checkpoints change nothing
    straight = tiny(lake, "straight", reproducible=True, **{**settings, "checkpoint_every": 5})
    stopped = tiny(lake, "stopped", reproducible=True, **{**settings, "max_steps": 12})
    at_pass_end = tiny(lake, "stopped", reproducible=True, **{**settings, "max_steps": 15})
    resumed = tiny(lake, "stopped", reproducible=True, **settings)
    fresh = tiny(lake, "fresh", **settings)
    runs = [_common.run_training(config) for config in (straight, stopped, at_pass_end, resumed, fresh)]
    runs = [runs[0], runs[1], runs[3], runs[4]]      # straight, stopped, resumed (twice), fresh
    client = MlflowClient()
    assert runs[1]["mlflow_run_id"] == runs[2]["mlflow_run_id"]
    # the last resume starts the second pass: its checkpoint, written at the first pass's end, says so
    assert _history(client, runs[2]["mlflow_run_id"], "resumed_from_step") == [(12, 12.0), (15, 15.0)]
    final_15 = json.loads((Path(at_pass_end.storage_path) / "stopped" / "step-00000015-final" / "state.json")
                          .read_text())
    assert (final_15["epoch"], final_15["pass_steps"]) == (1, 0)
    assert (15, 1.0) in _history(client, runs[2]["mlflow_run_id"], "epoch")
    losses = [_history(client, runs[k]["mlflow_run_id"], "train_loss") for k in (0, 2, 3)]
    assert [s for s, _ in losses[0]] == [s for s, _ in losses[1]] == list(range(1, 21))
    assert losses[0] == losses[1]
    assert losses[2] != losses[0]
    assert _history(client, runs[0]["mlflow_run_id"], "val_rmse") == \
        _history(client, runs[2]["mlflow_run_id"], "val_rmse")
    # the checkpoint at a pass's last batch is written at the pass's end: a resume starts the next pass
    # (before, it read the whole pass again only to pass over it)
    at_pass_end = json.loads((Path(straight.storage_path) / "straight" / "step-00000015" / "state.json").read_text())
    assert (at_pass_end["step"], at_pass_end["epoch"], at_pass_end["pass_steps"]) == (15, 1, 0)
    weights = [_final_weights(config) for config in (straight, resumed, fresh)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])
    # the read tasks the cluster gave are recorded; resumed under another stream, the run says it no longer repeats
    tags = client.get_run(runs[0]["mlflow_run_id"]).data.tags
    assert tags["astromer.read_tasks"] == "1" and "astromer.reproducible.broken" not in tags
    _common.run_training(tiny(lake, "stopped", reproducible=True, **{**settings, "max_steps": 24,
                                                                      "shuffle_buffer": 0}))
    broken = client.get_run(runs[2]["mlflow_run_id"]).data.tags["astromer.reproducible.broken"]
    assert broken.startswith("resumed at step 20 with shuffle_buffer 4096 -> 0:")
    # ... as does a run that was not reproducible, resumed with the flag (its checkpoint lacks the generators)
    _common.run_training(tiny(lake, "fresh", reproducible=True, **{**settings, "max_steps": 24}))
    broken = client.get_run(runs[3]["mlflow_run_id"]).data.tags["astromer.reproducible.broken"]
    assert broken.startswith("resumed at step 20 with reproducible false -> true:")


def test_stopped_job_rerun_with_same_name_continues(ray_local, mlflow_sqlite, lake, tmp_path):
    """`python jobs/pretrain.py` (joined to this Ray through RAY_ADDRESS) is killed after a checkpoint; the same
    command line with the same run name continues from that checkpoint in the same MLflow run."""
    config = tiny(lake, "stop-me", max_steps=60)
    flags = ["--lake", str(lake), "--corpus", "unit", "--preset", "tiny", "--batch-size", "8",
             "--cpus-per-worker", "0.5", "--data-cpus", "0.25", "--warmup-steps", "2", "--log-every", "1",
             "--checkpoint-every", "3", "--run-name", "stop-me"]
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    job = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "pretrain.py"), *flags, "--max-steps", "60"],
                           env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while _registered_checkpoint(config) is None and time.monotonic() < deadline and job.poll() is None:
            time.sleep(0.1)
        stopped_at = _registered_checkpoint(config)
        assert stopped_at is not None, "the job never wrote a checkpoint"
    finally:
        job.kill()
        job.wait(timeout=60)
    time.sleep(1.0)
    stopped_at = _registered_checkpoint(config)
    run_id = registry.find_run(config.experiment, "stop-me")
    client = MlflowClient()
    assert client.get_run(run_id).data.params["max_steps"] == "60"

    # a complete checkpoint written after Ray's last record (the kill fell between the two) is taken too
    newer = unrecorded_checkpoint(config.storage_path, "stop-me", stopped_at)
    resume_at = int(Path(newer).name.split("-")[1]) if newer else stopped_at

    client.set_tag(run_id, _common.ERROR_KEY, "SystemExit: 1")     # as an interrupted attempt leaves it
    again = tiny(lake, "stop-me", max_steps=resume_at + 3)
    summary = _common.run_training(again)
    assert summary["mlflow_run_id"] == run_id
    assert _history(client, run_id, "resumed_from_step") == [(resume_at, float(resume_at))]
    # in time order: the steps after the checkpoint that the stopped job had done are redone, then it goes on
    logged = sorted(client.get_metric_history(run_id, "train_loss"), key=lambda m: (m.timestamp, m.step))
    assert [m.step for m in logged[-3:]] == [resume_at + 1, resume_at + 2, resume_at + 3]
    assert summary["step"] == resume_at + 3
    assert client.get_run(run_id).data.tags["astromer.resumed_with.max_steps"] == str(resume_at + 3)
    assert summary["version"] == 1 and client.get_run(run_id).info.status == "FINISHED"
    tags = client.get_run(run_id).data.tags
    assert _common.ERROR_KEY not in tags and tags[f"{_common.ERROR_KEY}.previous"] == "SystemExit: 1"


def test_killed_worker_resumes_from_last_checkpoint(ray_local, mlflow_sqlite, lake, tmp_path):
    # no test split: the run says it has no test scores instead of leaving them out without a word
    config = tiny(lake, "kill-one", max_steps=12, checkpoint_every=3, pid_dir=str(tmp_path / "pids"),
                  test_fraction=0.0)
    killed = {}

    def kill_rank1_after_first_checkpoint():
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and _registered_checkpoint(config) is None:
            time.sleep(0.05)
        pid = int((tmp_path / "pids" / "rank1.pid").read_text().split()[-1])
        os.kill(pid, signal.SIGKILL)
        time.sleep(1.0)                    # the group is torn down; nothing new can be registered
        killed["pid"], killed["last_checkpoint"] = pid, _registered_checkpoint(config)

    killer = threading.Thread(target=kill_rank1_after_first_checkpoint, daemon=True)
    killer.start()
    summary = _common.run_training(config)
    killer.join(timeout=5)
    assert killed, "the worker was never killed"
    client = MlflowClient()
    (resumed,) = _history(client, summary["mlflow_run_id"], "resumed_from_step")
    # Ray's last record, or a complete checkpoint written after it before the group was torn down
    assert resumed[0] >= killed["last_checkpoint"] and resumed[0] % 3 == 0
    assert 3 <= killed["last_checkpoint"] < 12
    assert summary["step"] == 12
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert "final_test_rmse" not in run.data.metrics and "final_val_rmse" in run.data.metrics
    assert run.data.tags["astromer.warning.test"].startswith("the test split gave no window to score "
                                                               "(--test-fraction 0.0 of too few curves")
    assert "astromer.warning.val" not in run.data.tags
    # the restarted workers are new processes
    assert [int(p) for p in (tmp_path / "pids" / "rank1.pid").read_text().split()][0] == killed["pid"]
    assert len((tmp_path / "pids" / "rank1.pid").read_text().split()) == 2


def test_nan_loss_stops_naming_the_step_without_checkpoint(ray_local, mlflow_sqlite, tmp_path):
    # variability of ~1e21 mag: squared residuals overflow float32, so the very first loss is infinite
    bad_lake = write_lake(tmp_path / "bad_lake", 60, seed=5, scale=1e22)
    # max_failures stays > 0: a NaN is not a lost worker and must not be retried
    config = tiny(bad_lake, "overflow", clean=False, checkpoint_every=1, max_failures=2, val_fraction=0.05,
                  test_fraction=0.05, pid_dir=str(tmp_path / "pids"))
    with pytest.raises(NonFiniteLossError, match=r"loss is (nan|inf) at step 1 \(epoch 0, batch 0\)") as info:
        _common.run_training(config)
    assert "without writing a checkpoint" in str(info.value)
    assert _checkpoint_steps(config) == []
    assert len((tmp_path / "pids" / "rank0.pid").read_text().split()) == 1      # started once, never retried
    run = MlflowClient().get_run(registry.find_run(config.experiment, "overflow"))
    assert run.info.status == "FAILED" and "at step 1" in run.data.tags["astromer.error"]
    # what it trained is tagged from the start, so a failed or stopped run is found like a finished one
    assert {k: run.data.tags.get(f"astromer.{k}") for k in ("run_name", "preset", "surveys", "corpus")} == \
        {"run_name": "overflow", "preset": "tiny", "surveys": "all", "corpus": "unit"}


def test_an_epoch_without_a_batch_stops_the_run_without_retries(ray_local, mlflow_sqlite, lake, tmp_path):
    """Counted before cleaning, the curves fill a step; the cleaning (every curve under min_observations)
    leaves none. The workers stop with the reason instead of being restarted as lost."""
    from astromer.train import NoTrainingBatch

    config = tiny(lake, "no-batch", min_observations=100_000, max_failures=2, count_cleaning=False,
                  pid_dir=str(tmp_path / "pids"))
    with pytest.raises(NoTrainingBatch, match="epoch 0 gave no training batch"):
        _common.run_training(config)
    assert len((tmp_path / "pids" / "rank0.pid").read_text().split()) == 1      # started once, never retried
    run = MlflowClient().get_run(registry.find_run(config.experiment, "no-batch"))
    assert run.info.status == "FAILED" and "no training batch" in run.data.tags["astromer.error"]


def test_finetune_from_registry_records_lineage(ray_local, mlflow_sqlite, tmp_path):
    import finetune
    from astromer.config import ModelConfig
    from astromer.model import Astromer
    from astromer.weights import save_model

    save_model(Astromer(ModelConfig.tiny()), tmp_path / "parent")
    parent_version = registry.register_model_dir(tmp_path / "parent", "astromer2-parent")
    labelled = write_lake(tmp_path / "labelled", 120, survey="asas", seed=7, labels=True)
    config = TrainConfig(lake=str(labelled), surveys=["asas"], label_set="class", labels=["long"],
                         init_from="models:/astromer2-parent@production", batch_size=8, num_workers=2,
                         cpus_per_worker=0.5, data_cpus=0.25, max_steps=3, checkpoint_every=3, log_every=1,
                         run_name="ft", **{k: v for k, v in finetune.DEFAULTS.items() if k != "epochs"})
    finetune.lineage(config)
    _common.complete(config, "finetune")
    classes = pq.read_table(Path(labelled) / "labels").column("label").to_pylist()
    n_long = classes.count("long")
    assert 0 < n_long < 120   # the schedule comes from the labelled curves, not from the whole survey
    assert _common.count_curves(config) == n_long
    summary = _common.run_training(config)
    assert summary["registered"] == "astromer2-parent-ft-asas" and summary["step"] == 3
    tags = MlflowClient().get_model_version("astromer2-parent-ft-asas", str(summary["version"])).tags
    assert tags["parent_model"] == "astromer2-parent" and tags["parent_version"] == str(parent_version)
    selection = json.loads(tags["data_selection"])
    assert selection["surveys"] == ["asas"] and selection["label_set"] == "class" and selection["labels"] == ["long"]
    run = MlflowClient().get_run(summary["mlflow_run_id"])
    # the alias is resolved once, pinned, and the URI asked for kept beside it
    assert run.data.params["init_from"] == f"models:/astromer2-parent/{parent_version}"
    assert tags["parent_uri"] == "models:/astromer2-parent@production"
    assert MlflowClient().get_experiment(run.info.experiment_id).name == registry.FINETUNE_EXPERIMENT
    # production moves to another version: the run, resumed, still names the parent it began from
    newer = registry.register_model_dir(tmp_path / "parent", "astromer2-parent")
    registry.set_alias("astromer2-parent", "production", newer)
    resumed = TrainConfig(**{**config.to_dict(), "init_from": "models:/astromer2-parent@production",
                             "max_steps": 6, "tags": {}, "register_as": None})
    assert finetune.lineage(resumed)["parent_version"] == str(parent_version) != str(newer)
    assert resumed.init_from == f"models:/astromer2-parent/{parent_version}"


def test_what_a_job_is_asked_is_checked_before_ray_starts(lake, tmp_path, monkeypatch, capsys):
    """Mistakes in the settings end with one line and exit status 2, before any Ray or MLflow work."""
    from astromer import settings

    base = ["--lake", str(lake), "--preset", "tiny", "--max-steps", "1"]
    cases = [
        (["--lake", str(tmp_path / "nolake")], "no lightcurves table"),
        ([*base, "--preset", "astromer3"], "astromer3"),
        ([*base, "--surveys", "nosuch"], "the lake holds"),
        ([*base, "--config", str(tmp_path / "missing.yaml")], "missing.yaml"),
    ]
    cases.append(([*base, "--tag", "novalue"], "--tag 'novalue': expected KEY=VALUE"))   # it exited 1
    cases.append(([*base, "--tag", "=value"], "--tag '=value': expected KEY=VALUE"))
    (tmp_path / "bad.json").write_text('{"max_step": 3}')
    cases.append(([*base, "--config", str(tmp_path / "bad.json")], "max_step"))
    (tmp_path / "inner.json").write_text('{"mlflow_run_id": "abc"}')
    cases.append(([*base, "--config", str(tmp_path / "inner.json")], "mlflow_run_id are set by the job itself"))
    cases.append(([*base, "--batch-size", "256"], "fewer than one step takes (--batch-size 256 x --num-workers 2"))
    labelled = write_lake(tmp_path / "labelled", 40, survey="asas", seed=7, labels=True)
    lab = ["--lake", str(labelled), "--preset", "tiny", "--max-steps", "1"]
    cases.append(([*lab, "--label-set", "mode"], "no label set 'mode' in the lake; there are ['class']"))
    cases.append(([*lab, "--label-set", "class", "--labels", "Nope"], "none of the labels ['Nope']"))
    # one label misspelt among good ones is refused too (it would drop its class without a word)
    cases.append(([*lab, "--label-set", "class", "--labels", "short", "Nope"],
                  "no curve has the label(s) ['Nope'] in label set 'class' of the lake; there are ['long', 'short']"))
    # a damaged model to start from: refused in the driver, naming the file (not in every worker after Ray starts)
    from astromer.config import ModelConfig
    from astromer.model import Astromer
    from astromer.weights import save_model

    damaged = {name: save_model(Astromer(ModelConfig.tiny()), tmp_path / name) for name in ("cut", "badjson", "other")}
    tensors = damaged["cut"] / "model.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:-100])
    (damaged["badjson"] / "config.json").write_text('{"name": "tiny",,}')
    ModelConfig.astromer2().to_json(damaged["other"] / "config.json")
    cases.append(([*base, "--init-from", str(damaged["cut"])], f"{tensors}: not a readable safetensors file"))
    cases.append(([*base, "--init-from", str(damaged["badjson"]), "--window-length", "64"],
                  f"{damaged['badjson'] / 'config.json'}: not valid JSON"))
    cases.append(([*base, "--init-from", str(damaged["other"])], "config.json says d_model 256; model.safetensors"))
    # a --probed that probes nothing of the shortest window: a curve of --min-observations, or the parent's
    # own short windows (it trained until 'loss is nan')
    import dataclasses

    short = save_model(Astromer(dataclasses.replace(ModelConfig.tiny(), window_length=8)), tmp_path / "short")
    cases.append(([*base, "--probed", "0.05"], "probes no observation of a window of 10 observations"))
    cases.append(([*base, "--init-from", str(short), "--probed", "0.1"],
                  "probed=0.1 probes no observation of a window of 8 observations (the window length)"))
    for argv, words in cases:
        assert _common.main("pretrain", "pretrain", argv=argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and words in err and "Traceback" not in err, (argv, err)

    # `ray job submit --working-dir` runs a job in a temporary copy of the folder: no default home there
    copy = tmp_path / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    monkeypatch.delenv("ASTROMER_HOME", raising=False)
    monkeypatch.delenv("ASTROMER_LAKE", raising=False)
    with pytest.raises(settings.EphemeralHome, match="ASTROMER_HOME"):
        settings.default_lake()
    assert _common.main("pretrain", "pretrain", argv=["--preset", "tiny"]) == 2
    assert "--runtime-env-json" in capsys.readouterr().err
    assert settings.home(persistent=False) == copy / ".astromer"      # a cache may live there
    monkeypatch.setenv("ASTROMER_HOME", str(tmp_path / "home"))
    assert settings.default_lake() == str(tmp_path / "home" / "lake")


def test_a_run_name_is_checked_before_ray_starts(ray_local, mlflow_sqlite, lake, capsys):
    from astromer.lake.locks import process_started

    settings = dict(max_steps=6, checkpoint_every=3, count_cleaning=False)
    first = _common.run_training(tiny(lake, "done-once", **settings))
    folder = Path(tiny(lake, "done-once").storage_path) / "done-once"
    before = sorted(p.name for p in folder.glob("step-*"))
    assert before[-1] == "step-00000006-final"
    # a finished run started again, twice: nothing trains, nothing is written (the second attempt deleted the
    # final checkpoint: each attempt wrote a final folder of the same name, and Ray dropped the older record's)
    for _ in range(2):
        again = _common.run_training(tiny(lake, "done-once", **settings))
        assert again["finished_before"] == 6 and again["version"] == first["version"]
    assert sorted(p.name for p in folder.glob("step-*")) == before
    client = MlflowClient()
    run_id = first["mlflow_run_id"]
    assert client.get_run(run_id).info.status == "FINISHED"
    # settings that make another model cannot resume it; nor can another experiment's job of that name
    with pytest.raises(ValueError, match=r"its checkpoint at step 6 holds another model \(the settings say d_model 256; "
                                         r"model.safetensors holds 32"):
        _common.check_run_name(tiny(lake, "done-once", preset="astromer1"))
    with pytest.raises(ValueError, match="run name done-once belongs to a run of experiment astromer-pretrain"):
        _common.check_run_name(tiny(lake, "done-once", experiment=registry.FINETUNE_EXPERIMENT))
    # the command says so in one line, exit status 2, before Ray or MLflow are touched
    code = _common.main("pretrain", "pretrain", argv=["--lake", str(lake), "--preset", "astromer1", "--run-name",
                                                      "done-once", "--max-steps", "6"])
    assert code == 2 and "cannot resume with these settings" in capsys.readouterr().err
    assert client.get_run(run_id).info.status == "FINISHED" and client.get_run(run_id).data.params["preset"] == "tiny"
    # an attempt in flight (RUNNING, its driver alive on this host) is not joined by a second one
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        driver = {**_common.this_driver(), "pid": sleeper.pid, "process_started": process_started(sleeper.pid)}
        client.set_tag(run_id, _common.DRIVER_KEY, json.dumps(driver))
        client.update_run(run_id, status="RUNNING")
        with pytest.raises(ValueError, match=f"run done-once is running: driver process {sleeper.pid}"):
            _common.check_run_name(tiny(lake, "done-once", max_steps=9))
    finally:
        sleeper.kill()
        sleeper.wait()
    assert _common.check_run_name(tiny(lake, "done-once", max_steps=9)) is None      # its driver is gone
    client.set_terminated(run_id, status="FINISHED")

    # a newer folder that a killed copy left half-written is passed over, as the workers pass it over
    (folder / "step-00000009").mkdir()
    (folder / "step-00000009" / "state.json").write_text('{"step": 9}')
    assert _common.check_run_name(tiny(lake, "done-once", **settings))["step"] == 6
    # a run name from before the owner records: MLflow says whose it is
    (Path(tiny(lake, "done-once").storage_path) / _common.RUN_OWNERS / "done-once.json").unlink()
    with pytest.raises(ValueError, match="belongs to a run of experiment astromer-pretrain"):
        _common.check_run_name(tiny(lake, "done-once", experiment=registry.FINETUNE_EXPERIMENT))
    # trained to its end, but its registration failed: the same command registers the final checkpoint
    name = first["registered"]
    client.delete_model_version(name, str(first["version"]))
    client.set_tag(run_id, _common.ERROR_KEY, "registering the model: the registry was down")
    client.set_terminated(run_id, status="FAILED")
    again = _common.run_training(tiny(lake, "done-once", **settings))
    assert again["finished_before"] == 6 and again["version"] == first["version"] + 1 and again["step"] == 6
    assert client.get_model_version(name, str(again["version"])).tags["run_name"] == "done-once"
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and _common.ERROR_KEY not in run.data.tags
    assert sorted(p.name for p in folder.glob("step-*")) == [*before, "step-00000009"]

    # a run that stopped early stays finished at the same --patience, and goes on at a larger one
    stopped = Path(tiny(lake, "done-once").storage_path) / "early-stop"
    (stopped / "step-00000004-final").mkdir(parents=True)
    for f in (folder / "step-00000006-final").iterdir():
        (stopped / "step-00000004-final" / f.name).write_bytes(f.read_bytes())
    state = json.loads((stopped / "step-00000004-final" / "state.json").read_text())
    state.update(step=4, epoch=0, finished=True, evals_since_best=2)
    (stopped / "step-00000004-final" / "state.json").write_text(json.dumps(state))
    assert _common.check_run_name(tiny(lake, "early-stop", max_steps=50, patience=2))["step"] == 4
    assert _common.check_run_name(tiny(lake, "early-stop", max_steps=50, patience=5)) is None
