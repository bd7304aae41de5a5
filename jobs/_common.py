"""What pretrain.py and finetune.py share: flags generated from TrainConfig, Ray start-up, the MLflow run
that a re-run with the same run name continues, the TorchTrainer, and registering the final model."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback
import typing
import uuid
from dataclasses import fields

from astromer import registry, settings
from astromer.commands import USER_ERRORS, ArgumentParser, report_usage_error
from astromer.config import ModelConfig
from astromer.train import JOB_SET, STATE_FILE, STOP_KEYS, TrainConfig, init_config, worker_loop

log = logging.getLogger("astromer.jobs")

#: the run tag that says why an attempt did not finish (moved to ``astromer.error.previous`` on resume)
ERROR_KEY = "astromer.error"

# flag aliases that read better on a command line
ALIASES = {"surveys": ["--survey"], "bands": ["--band"], "labels": ["--label"]}


def build_parser(description: str, defaults: dict | None = None) -> argparse.ArgumentParser:
    """One flag per TrainConfig field (``--max-steps``, ``--surveys ogle asas``, ``--use-gpu/--no-use-gpu``),
    plus ``--config FILE`` (JSON or YAML) whose values the flags override."""
    parser = ArgumentParser(description=description,
                                     epilog="Every setting, grouped and explained: docs/jobs/pretrain.md.")
    parser.add_argument("--config", help="JSON, YAML or TOML file of settings (flags override it)")
    parser.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE",
                        help="extra tag for the MLflow run and the registered version (repeatable)")
    hints = typing.get_type_hints(TrainConfig)
    helps = setting_comments(TrainConfig)
    for f in fields(TrainConfig):
        if f.name == "tags":
            continue
        hint = str(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        names = [flag, *ALIASES.get(f.name, [])]
        comment = helps.get(f.name, "")
        # a comment that explains the default already (default: the preset's) is not followed by "none"
        default = "" if "default" in comment and _default_text(f, defaults) == "none" else \
            f" (default: {_default_text(f, defaults)})"
        kwargs = {"dest": f.name, "default": argparse.SUPPRESS, "help": (comment + default).strip()}
        if f.name in JOB_SET:                           # the job's bookkeeping: not a user's setting
            kwargs["help"] = argparse.SUPPRESS
        if hint == "<class 'bool'>":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif "list" in hint:
            parser.add_argument(*names, nargs="+", **kwargs)
        elif "int" in hint:
            parser.add_argument(*names, type=int, **kwargs)
        elif "float" in hint:
            parser.add_argument(*names, type=float, **kwargs)
        else:
            parser.add_argument(*names, **kwargs)
    if defaults:
        parser.set_defaults(**defaults)
    return parser


def setting_comments(cls) -> dict[str, str]:
    """The comment beside each field of a settings dataclass (and its continuation lines), which is where the
    settings are documented: the flags' help text comes from there, so it cannot drift from the code."""
    import inspect
    import re

    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    comments: dict[str, str] = {}
    name, column = None, -1
    for line in lines:
        field_line = re.match(r"\s{4}(\w+): [^#]*?(?:#\s*(.*))?$", line)
        if field_line:
            name, column = field_line.group(1), line.find("#")
            if field_line.group(2):
                comments[name] = field_line.group(2).strip()
            continue
        # a comment line continues the field's only in the same column (a section heading sits at the left)
        continued = re.match(r"\s+#\s*(.*)$", line)
        if continued and name in comments and line.find("#") == column:
            comments[name] += " " + continued.group(1).strip()
        else:
            name = None
    return comments


def _default_text(f, job_defaults: dict | None = None) -> str:
    """A field's default as the help text shows it: the job's own where it sets one (finetuning does)."""
    from dataclasses import MISSING

    if job_defaults and f.name in job_defaults:
        value = job_defaults[f.name]
    else:
        value = f.default if f.default is not MISSING else f.default_factory()
    return "none" if value is None else str(value)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = {k: v for k, v in vars(args).items() if k not in ("config", "tag")}
    base = {}
    if args.config:
        from astromer.config import read_settings_file

        base = read_settings_file(args.config)
        internal = sorted(set(base) & set(JOB_SET))
        if internal:    # the job fills these in for its workers; from a file they would point at another run
            raise ValueError(f"{args.config}: {', '.join(internal)} are set by the job itself, not settings")
    config = TrainConfig.from_dict({**base, **values})
    for item in args.tag:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--tag {item!r}: expected KEY=VALUE (e.g. --tag owner=survey-team)")
        config.tags[key] = value
    return config


def complete(config: TrainConfig, prefix: str = "pretrain") -> TrainConfig:
    """Fill the settings that depend on the environment: lake, corpus, run name, storage, tracking, the
    schedule length (from the lake's Parquet footers; with a label set, the selected curves' ids too).
    Raises ValueError or FileNotFoundError for a selection that cannot train."""
    from astromer.data import partitions

    config.lake = config.lake or settings.default_lake()
    if not config.corpus:
        config.corpus = "-".join(sorted(config.surveys or {survey for survey, _ in partitions(config.lake)}))
    config.run_name = config.run_name or f"{prefix}-{config.corpus}-{time.strftime('%Y%m%d-%H%M%S')}"
    config.storage_path = config.storage_path or str(settings.ray_results_dir())
    config.tracking_uri = config.tracking_uri or settings.tracking_uri()
    if config.total_steps is None:
        curves = count_curves(config)
        n_train = curves * (1 - config.val_fraction - config.test_fraction)
        per_step = config.batch_size * config.num_workers
        if n_train < per_step:   # the workers would find no batch, and Ray would restart them for nothing
            raise ValueError(f"the selection has {curves:,} curves, about {n_train:,.0f} for training: fewer than "
                             f"one step takes (--batch-size {config.batch_size} x --num-workers "
                             f"{config.num_workers} = {per_step}); lower --batch-size or widen the selection")
        per_epoch = max(1, int(n_train // per_step))
        config.total_steps = min(config.max_steps or 10**12, per_epoch * config.epochs)
        if config.max_steps and config.total_steps < config.max_steps:
            log.warning("--max-steps %d: the run stops after %d steps, at --epochs %d (%d steps per epoch of "
                        "%d workers x batch %d); raise --epochs for more", config.max_steps, config.total_steps,
                        config.epochs, per_epoch, config.num_workers, config.batch_size)
    if config.warmup_steps and config.total_steps <= config.warmup_steps:
        log.warning("--warmup-steps %d is not shorter than the run's %d steps: the learning rate never reaches "
                    "--lr", config.warmup_steps, config.total_steps)
    return config


def count_curves(config: TrainConfig) -> int:
    """Number of light curves in the selection (the labelled ones when a label set is chosen)."""
    from astromer.data import count_selected_curves

    return count_selected_curves(config.data_spec())


def init_ray(config: TrainConfig) -> None:
    """Connect to $RAY_ADDRESS (set by ``ray job submit``) or start a local Ray."""
    import ray

    if ray.is_initialized():
        return
    address = settings.ray_address()
    if address != "local":
        ray.init(address=address, log_to_driver=True)
    else:
        # address="local": never join a stray cluster. The dashboard (on loopback) serves the state API that
        # Ray Train's placement-group cleaner asks every second whether the controller lives: without it a
        # 20-step run logged that warning 20 times. It costs about 3 s of start-up (41 against 44 s). The
        # cleaner finds the API through RAY_API_SERVER_ADDRESS, which Ray's processes inherit from this one:
        # left to search, it fails with a traceback wherever another Ray runs on the machine.
        port = _free_port()
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
                 log_to_driver=True)


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


#: the run tag naming the driver process of the attempt in flight (host, process, its start)
DRIVER_KEY = "astromer.driver"
#: beside the runs' checkpoint folders: which experiment each run name belongs to
RUN_OWNERS = ".astromer-runs"


def this_driver() -> dict:
    from astromer.lake.locks import this_process

    return {**this_process(), "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def check_run_name(config: TrainConfig, parent: ModelConfig | None = None) -> dict | None:
    """What the run name's history allows, checked before Ray starts and before the MLflow run is touched:

    - a run name that another experiment's job holds (pretraining and finetuning keep their checkpoints side
      by side under ``storage_path``: a finetune would resume a pretraining run's weights) is refused; the
      owner is recorded in ``RUN_OWNERS``, or found in MLflow for runs older than that record;
    - a run whose newest usable checkpoint holds a model of another shape than these settings make is
      refused (a resume would fail in every worker, after Ray had started, three times over); a folder a
      killed copy left half-written is passed over, as the workers pass it over;
    - a run whose attempt is still in flight (its MLflow run RUNNING, its driver alive on this host) is refused;
    - a run that finished as far as these settings ask (``--max-steps``, ``--epochs``, or early stopping at
      this ``--patience``): its final checkpoint is returned as {"step", "url", "state"} (nothing to train;
      training it again would write its final checkpoint over itself, and Ray would then delete the folder).
    Raises ValueError for the refusals. ``parent``: a finetune's parent config, when the job has read it."""
    import fsspec
    from astromer.lake.locks import holder_is_gone, on_this_machine
    from astromer.lake.paths import check_bucket
    from astromer.train import model_mismatch, run_checkpoints

    fs, root = fsspec.core.url_to_fs(config.storage_path)
    check_bucket(fs, root, "--storage-path")
    owner_path = f"{root.rstrip('/')}/{RUN_OWNERS}/{config.run_name}.json"
    owner = json.loads(fs.cat_file(owner_path))["experiment"] if fs.exists(owner_path) else None
    checkpoints = run_checkpoints(config.storage_path, config.run_name)
    registry.setup_tracking(config.tracking_uri)
    if owner is None and checkpoints:     # checkpoints older than the owner record: MLflow knows their run
        owner = _experiment_of_run(config.run_name, config.experiment)
    if owner is not None and owner != config.experiment:
        raise ValueError(f"run name {config.run_name} belongs to a run of experiment {owner} (its checkpoints are "
                         f"in {config.storage_path}/{config.run_name}): choose another --run-name")
    newest = None
    expected = ((parent or init_config(config.init_from, config.tracking_uri)) if config.init_from
                else config.model_config()) if checkpoints else None
    for step, final, url in checkpoints:
        # a folder that a killed copy left half-written (a file missing, or cut short) is passed over, as the
        # workers pass it over; any other failure to read (a store that does not answer) ends the check
        try:
            state = json.loads(fs.cat_file(f"{url.rstrip('/')}/{STATE_FILE}"))
        except (FileNotFoundError, ValueError) as exc:
            log.warning("checkpoint %s is not usable (%s): passed over", url, exc)
            continue
        try:
            mismatch = model_mismatch(url, expected)
        except (FileNotFoundError, ValueError, KeyError) as exc:
            if final and state.get("finished"):   # passed over, the run would train again and overwrite it
                raise ValueError(f"run {config.run_name}: its final checkpoint at step {step} cannot be read "
                                 f"({exc}); move that folder aside to resume from the one before") from None
            log.warning("checkpoint %s is not usable (%s): passed over", url, exc)
            continue
        if mismatch:
            raise ValueError(f"run {config.run_name} cannot resume with these settings: its checkpoint at step {step} "
                             f"holds another model ({mismatch}); start it with the settings it began with "
                             "(see its MLflow parameters), or choose another --run-name")
        newest = {"step": int(state["step"]), "final": final, "url": url, "state": state}
        break
    run_id = registry.find_run(config.experiment, config.run_name)
    if run_id is not None:
        from mlflow.tracking import MlflowClient

        run = MlflowClient().get_run(run_id)
        driver = json.loads(run.data.tags.get(DRIVER_KEY, "{}") or "{}")
        if run.info.status == "RUNNING" and driver and on_this_machine(driver) and not holder_is_gone(driver) \
                and driver.get("pid") != os.getpid():
            raise ValueError(f"run {config.run_name} is running: driver process {driver.get('pid')} on "
                             f"{driver.get('host')} since {driver.get('started_at')}; wait for it to end or stop "
                             "it (ray job stop), then run the same command to continue it")
    if not fs.exists(owner_path):
        fs.makedirs(os.path.dirname(owner_path), exist_ok=True)
        fs.pipe_file(owner_path, json.dumps({"experiment": config.experiment, "run_name": config.run_name}).encode())
    if newest and newest["final"] and newest["state"].get("finished"):
        state = newest["state"]
        if state["step"] >= (config.max_steps or 10**12) or state["epoch"] >= config.epochs \
                or state.get("evals_since_best", 0) >= config.patience:
            return newest
    return None


def _experiment_of_run(run_name: str, preferred: str) -> str | None:
    """The experiment of the MLflow run called ``run_name`` (``preferred`` when it has one of that name too),
    None when no experiment has one."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    ids = {e.experiment_id: e.name for e in client.search_experiments()}
    runs = client.search_runs(list(ids), filter_string=f"tags.`mlflow.runName` = '{run_name}'") if ids else []
    names = {ids[r.info.experiment_id] for r in runs}
    return preferred if preferred in names else (sorted(names)[0] if names else None)


def run_tags(config: TrainConfig, register_tags: dict | None = None) -> dict:
    """What the run trains, as tags (``astromer.<key>`` on the run, ``<key>`` on its registered version): set
    when the run starts, so that a stopped or failed run is found by them too."""
    return {"run_name": config.run_name, "corpus": config.corpus, "preset": config.preset,
            "surveys": ",".join(config.surveys or []) or "all", "bands": ",".join(config.bands or []) or "all",
            **config.tags, **(register_tags or {})}


def _run_tag_items(config: TrainConfig, register_tags: dict | None) -> dict[str, str]:
    return {f"astromer.{k}": str(v)[:5000] for k, v in run_tags(config, register_tags).items()}


def start_mlflow_run(config: TrainConfig, params: dict | None = None, register_tags: dict | None = None) -> str:
    """Create the MLflow run, or find the one of the same name (a resumed job continues its run)."""
    from mlflow.entities import Param, RunTag
    from mlflow.tracking import MlflowClient

    registry.setup_tracking(config.tracking_uri)
    client = MlflowClient()
    run_id = registry.find_run(config.experiment, config.run_name)
    flat = {k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in (params or config.to_dict()).items()
            if k not in (*JOB_SET, "tracking_uri", "pid_dir")}
    driver = {DRIVER_KEY: json.dumps(this_driver())}
    if run_id is None:
        run = client.create_run(registry.experiment_id(config.experiment), run_name=config.run_name,
                                tags={**_run_tag_items(config, register_tags), **driver})
        run_id = run.info.run_id
        items = [Param(k, str(v)[:6000]) for k, v in flat.items()]
        for lo in range(0, len(items), 100):
            client.log_batch(run_id, params=items[lo:lo + 100])
    else:
        # parameters are immutable in MLflow: settings changed on resume are recorded as tags
        logged = client.get_run(run_id).data.params
        changed = {f"astromer.resumed_with.{k}": str(v)[:5000] for k, v in flat.items()
                   if k in logged and logged[k] != str(v)[:6000]}
        # what it trains, again: tags added on this attempt (or a run older than these tags) match the version
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in
                                       {**_run_tag_items(config, register_tags), **changed, **driver}.items()])
        tags = client.get_run(run_id).data.tags
        for _, key in STOP_KEYS:    # a NaN or no-batch stop of an earlier attempt
            if key in tags:
                client.delete_tag(run_id, key)
        if ERROR_KEY in tags:       # how an earlier attempt ended; this one may finish
            client.set_tag(run_id, f"{ERROR_KEY}.previous", tags[ERROR_KEY])
            client.delete_tag(run_id, ERROR_KEY)
        client.update_run(run_id, status="RUNNING")
        client.set_tag(run_id, "astromer.resumed_at", time.strftime("%Y-%m-%dT%H:%M:%S"))
        log.warning("continuing MLflow run %s (%s)", config.run_name, run_id)
    return run_id


def run_training(config: TrainConfig, register_tags: dict | None = None, checked: bool = False) -> dict:
    """Train with Ray (TorchTrainer over the lake's datasets), then log and register the final model from the
    driver. Returns a summary dict (also printed as JSON by the jobs). ``checked``: the caller has run
    :func:`check_run_name` and trains (it is run here otherwise)."""
    import ray.train
    from astromer.data import (
        make_datasets,
        read_lightcurves,
        read_task_count,
        row_groups,
        start_pass_clock,
        units_digest,
        validation_digest,
    )
    from mlflow.tracking import MlflowClient
    from ray.train.torch import TorchTrainer

    finished = None if checked else check_run_name(config)
    if finished is not None:
        return finished_summary(config, finished, register_tags)
    init_ray(config)
    config.mlflow_run_id = start_mlflow_run(config, register_tags=register_tags)
    client = MlflowClient()
    clock = None
    try:   # from here on, however it ends, the run says so (it never stays RUNNING)
        if config.reproducible:   # a name of its own: an earlier attempt's clock may still be shutting down
            config.pass_clock = f"astromer-pass-clock-{config.mlflow_run_id}-{uuid.uuid4().hex[:8]}"
        spec = config.data_spec()
        units = row_groups(spec)           # the lake's row groups listed once, for the count and the training
        config.lake_digest = units_digest(units)
        # the validation windows' digest: production moves only between versions scored on the same ones
        register_tags = {**(register_tags or {}), registry.VAL_SET_TAG: validation_digest(spec, units)}
        client.set_tag(config.mlflow_run_id, f"astromer.{registry.VAL_SET_TAG}", register_tags[registry.VAL_SET_TAG])
        # the read tasks this cluster gives (--read-tasks 0: half its CPUs), fixed for the workers and recorded:
        # they decide how a reproducible run's windows are dealt
        config.read_tasks = spec.read_tasks = read_task_count(spec, len(units))
        client.set_tag(config.mlflow_run_id, "astromer.read_tasks", str(config.read_tasks))
        cleaning = log_cleaning(config, read_lightcurves(spec, units=units)) if config.count_cleaning else None
        # a reproducible run: its pass clock lives on the driver's node until the driver ends, and the
        # streams keep their order, so that each worker is dealt the same windows in the same order (Ray
        # Data's split ignores where the workers run then)
        clock = start_pass_clock(spec.pass_clock) if config.reproducible else None
        trainer = TorchTrainer(
            worker_loop,
            train_loop_config=config.to_dict(),
            scaling_config=ray.train.ScalingConfig(num_workers=config.num_workers, use_gpu=config.use_gpu,
                                                   resources_per_worker={"CPU": config.cpus_per_worker}),
            run_config=ray.train.RunConfig(
                name=config.run_name, storage_path=config.storage_path,
                failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.keep_checkpoints)),
            datasets=make_datasets(spec, units),
            dataset_config=ray.train.DataConfig(
                datasets_to_split=["train"],
                execution_options=_ordered_ingest() if config.reproducible else None),
        )
        result = trainer.fit()
    except (KeyboardInterrupt, SystemExit) as exc:   # stopped by its user: resumable, not failed
        client.set_tag(config.mlflow_run_id, ERROR_KEY, f"interrupted ({type(exc).__name__})")
        client.set_terminated(config.mlflow_run_id, status="KILLED")
        raise
    except BaseException as exc:
        client.set_tag(config.mlflow_run_id, ERROR_KEY, _root_message(exc)[:5000])
        client.set_terminated(config.mlflow_run_id, status="FAILED")
        raise
    finally:
        if clock is not None:
            ray.kill(clock)
    tags = client.get_run(config.mlflow_run_id).data.tags
    stop = next(((kind, tags[key]) for kind, key in STOP_KEYS if key in tags), None)
    if stop or result.checkpoint is None:
        message = stop[1] if stop else "training ended without a final checkpoint"
        client.set_tag(config.mlflow_run_id, ERROR_KEY, message[:5000])
        client.set_terminated(config.mlflow_run_id, status="FAILED")
        raise stop[0](message) if stop else RuntimeError(message)
    try:
        summary = finish_run(config, result, register_tags)
    except BaseException as exc:    # trained, but not registered: the run says why, as for any other failure
        client.set_tag(config.mlflow_run_id, ERROR_KEY, f"registering the model: {_root_message(exc)}"[:5000])
        client.set_terminated(config.mlflow_run_id, status="FAILED")
        raise
    if cleaning is not None:
        summary["cleaning"] = cleaning.get("all", {})
    client.set_terminated(config.mlflow_run_id, status="FINISHED")
    return summary


def _ordered_ingest():
    """Ray Train's ingest options with the blocks kept in order (a reproducible run)."""
    import ray.train

    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = True
    return options


def log_cleaning(config: TrainConfig, source=None) -> dict:
    """Count what the paper's cleaning keeps of the selected curves (per split; over ``source``, the job's
    read of the lake, when given) and log it to the run:
    metrics ``cleaning_<split>_<count>`` and the whole report as ``cleaning.json``."""
    from astromer.data import cleaning_report
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    report = cleaning_report(config.data_spec(), source)
    now = int(time.time() * 1000)
    metrics = []
    for split, counts in sorted(report.items()):
        flat = {k: v for k, v in counts.items() if not isinstance(v, dict)}
        flat.update({f"rejected_{k}": v for k, v in counts.get("rejected_curves", {}).items()})
        flat.update({f"flagged_{k}": v for k, v in counts.get("dropped_by_flag", {}).items()})
        metrics += [Metric(f"cleaning_{split}_{k}", float(v), now, 0) for k, v in sorted(flat.items())]
    client = MlflowClient()
    for lo in range(0, len(metrics), 500):
        client.log_batch(config.mlflow_run_id, metrics=metrics[lo:lo + 500])
    client.log_text(config.mlflow_run_id, json.dumps(report, indent=2, sort_keys=True), "cleaning.json")
    total = report.get("all", {})
    if total:
        log.info("cleaning: %d of %d curves usable (rejected: %s), %d of %d observations kept (flagged: %s)",
                 total.get("usable_curves", 0), total.get("curves", 0), total.get("rejected_curves", {}),
                 total.get("kept_observations", 0), total.get("observations", 0), total.get("dropped_by_flag", {}))
    return report


def _root_message(exc: BaseException) -> str:
    """The innermost error message: Ray wraps worker errors several times, and a worker group's error holds
    each worker's own (the first rank's is given, its last line: the traceback is printed above)."""
    seen = exc
    while True:
        failures = getattr(seen, "worker_failures", None) or getattr(seen, "controller_failure", None)
        if isinstance(failures, dict) and failures:
            seen = failures[min(failures)]
        elif isinstance(failures, BaseException):
            seen = failures
        elif seen.__cause__ is not None:
            seen = seen.__cause__
        else:
            break
    text = str(seen).strip().splitlines()
    return f"{type(seen).__name__}: {text[-1] if text else ''}"


def registered_name(config: TrainConfig) -> str:
    return config.register_as or registry.pretrained_name(str(config.corpus))


def finished_summary(config: TrainConfig, finished: dict, register_tags: dict | None = None) -> dict:
    """A run that had finished (:func:`check_run_name`'s final checkpoint): nothing trains. What it registered
    then is reported; a run whose registration had failed is registered now, from that checkpoint."""
    import ray.train
    from mlflow.tracking import MlflowClient

    step = finished["step"]
    name = registered_name(config)
    version = registry.version_with_tags(name, {"run_name": config.run_name, "step": step})
    run_id = registry.find_run(config.experiment, config.run_name)
    log.warning("run %s finished at step %d (its final checkpoint), as far as --max-steps, --epochs and --patience "
                "ask: nothing to train (raise them to continue it)", config.run_name, step)
    if version is not None or run_id is None:
        if run_id is not None and version is not None:   # registered, then its driver was stopped before the end
            status = MlflowClient().get_run(run_id).info.status
            if status != "FINISHED":
                MlflowClient().set_terminated(run_id, status="FINISHED")
        return {"run_name": config.run_name, "mlflow_run_id": run_id, "finished_before": step,
                "registered": name if version is not None else None, "version": version,
                "production": registry.production_version(name) if version is not None else None}
    # trained to its end, but its registration failed: register the final checkpoint, as the run would have
    from types import SimpleNamespace

    from astromer.data import row_groups, validation_digest

    log.warning("run %s has no registered version at step %d: registering its final checkpoint", config.run_name,
                step)
    client = MlflowClient()
    # the validation windows the run was scored on, as it recorded them (the lake may have changed since)
    val_set = client.get_run(run_id).data.tags.get(f"astromer.{registry.VAL_SET_TAG}")
    if val_set is None:
        log.warning("run %s recorded no validation set: the lake's present one is tagged", config.run_name)
        spec = config.data_spec()
        val_set = validation_digest(spec, row_groups(spec))
    register_tags = {**(register_tags or {}), registry.VAL_SET_TAG: val_set}
    config.mlflow_run_id = run_id
    metrics = {**(finished["state"].get("metrics") or {}), "step": step, "epoch": finished["state"].get("epoch", 0)}
    summary = finish_run(config, SimpleNamespace(metrics=metrics, checkpoint=ray.train.Checkpoint(finished["url"])),
                         register_tags)
    tags = client.get_run(run_id).data.tags
    if ERROR_KEY in tags:
        client.set_tag(run_id, f"{ERROR_KEY}.previous", tags[ERROR_KEY])
        client.delete_tag(run_id, ERROR_KEY)
    client.set_terminated(run_id, status="FINISHED")
    return {**summary, "finished_before": step}


def finish_run(config: TrainConfig, result, register_tags: dict) -> dict:
    """Log the final checkpoint's model into the run and register it (candidate; production if better)."""
    import mlflow

    metrics = {k: float(v) for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}
    name = registered_name(config)
    tags = {**run_tags(config, register_tags), "step": int(metrics.get("step", 0))}
    earlier = registry.version_with_tags(name, {"run_name": config.run_name, "step": tags["step"]})
    if earlier is not None:
        # a finished run started again: nothing trained since it registered this version
        log.warning("%s version %d holds this run's model at step %s already: nothing registered", name, earlier,
                    tags["step"])
        version = earlier
    else:
        with result.checkpoint.as_directory() as folder:
            with mlflow.start_run(run_id=config.mlflow_run_id):
                version = registry.register_model_dir(
                    folder, name, tags=tags,
                    metrics={"val_rmse": metrics["val_rmse"]} if "val_rmse" in metrics else None,
                    log_metrics=False)   # the run already has val_rmse per step (and final_val_rmse)
    summary = {"run_name": config.run_name, "mlflow_run_id": config.mlflow_run_id, "registered": name,
               "version": version, "production": registry.production_version(name),
               "checkpoint": _url(result.checkpoint), **metrics}
    return summary


def _url(checkpoint) -> str:
    """A Ray checkpoint's location as a URL (its path alone drops the store's scheme: astro/runs/...)."""
    fs = checkpoint.filesystem
    return checkpoint.path if fs is None or fs.type_name == "local" else f"{fs.type_name}://{checkpoint.path}"


def main(description: str, prefix: str, defaults: dict | None = None, prepare=None, argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = build_parser(description, defaults).parse_args(argv)
    try:   # what was asked (settings file, preset, lake, selection, model to start from) is checked here
        from mlflow.exceptions import MlflowException

        config = config_from_args(args)
        register_tags = {}
        config.lake = config.lake or settings.default_lake()
        if prepare is not None:       # a finetune pins its parent's version here
            register_tags = prepare(config) or {}
        # a parent model is loaded here, once: a damaged one would fail every worker after Ray starts
        parent = init_config(config.init_from, config.tracking_uri, check=True) if config.init_from else None
        config.check_probed(config.effective_window_length(parent))
        complete(config, prefix)
        finished = check_run_name(config, parent)
    except (*USER_ERRORS, OSError, settings.EphemeralHome, MlflowException) as exc:
        return report_usage_error(exc)
    log.info("settings: %s", json.dumps(config.to_dict(), sort_keys=True))
    try:
        summary = finished_summary(config, finished, register_tags) if finished is not None else \
            run_training(config, register_tags, checked=True)
    except (KeyboardInterrupt, SystemExit):   # Ray Train turns Ctrl-C into SystemExit once it has aborted
        print(f"interrupted: the same command with --run-name {config.run_name} continues from the last "
              "checkpoint", file=sys.stderr)
        return 130
    except tuple(kind for kind, _ in STOP_KEYS) as exc:   # training itself said why it stopped
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        traceback.print_exc()
        print(f"error: {_root_message(exc)}", file=sys.stderr)   # one readable line after Ray's long traceback
        return 1
    print(json.dumps(summary, indent=2, default=str))
    return 0
