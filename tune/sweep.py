"""Ray Tune over the classifier (and optional finetuning) settings, with ASHA, every trial in MLflow.

    python tune/sweep.py --model models:/astromer1-macho@production --lake LAKE --dataset ogle-modes \\
        --num-samples 16 --max-epochs 60 --out best.json
    python jobs/classify.py --model ... --lake LAKE --dataset ogle-modes --config best.json

Trials train the skip head on fold 0 of one samples-per-class scenario (default 100) and are judged on that
fold's validation split only (the test set is never looked at). ASHA stops weak trials after a few epochs.
The encoder is frozen, so per-layer means are computed once and shared by all trials through Ray's object
store; a trial with ``finetune`` set first finetunes its own copy of the encoder on the fold's training
curves (``--finetune-choice`` adds that to the search space). One MLflow parent run holds a nested run per
trial (parameters and per-epoch metrics, logged live from the driver); the best configuration is written as
JSON in the format ``jobs/classify.py --config`` reads.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from astromer import evaluate as ev
from astromer import registry, settings
from astromer.commands import ArgumentParser, positive_int
from ray.tune import Callback

METRIC = "val_loss"
# what the trials are ranked by, by ASHA, by Tune's progress table and by this script alike: a trial's best
# validation loss so far, which is what its classifier keeps (early stopping restores the best epoch)
RANKED = f"best_{METRIC}"


def search_space(finetune_choice: bool = False) -> dict:
    from ray import tune

    space = {
        "lr": tune.loguniform(1e-4, 3e-3),
        "batch_size": tune.choice([64, 128, 256]),
        "dropout": tune.choice([0.0, 0.1, 0.3]),
        "gamma_init": tune.choice(["uniform", "last", "random"]),
        "finetune": False,
    }
    if finetune_choice:
        space.update({"finetune": tune.choice([False, True]), "ft_lr": tune.loguniform(1e-5, 1e-3),
                      "ft_epochs": tune.choice([2, 5, 10])})
    return space


def settings_from_trial(config: dict, max_epochs: int, patience: int) -> ev.RunSettings:
    """A trial's sampled values as the RunSettings that jobs/classify.py --config reads."""
    run = ev.RunSettings()
    run.classifier = ev.ClassifierConfig(lr=float(config["lr"]), batch_size=int(config["batch_size"]),
                                         dropout=float(config["dropout"]), gamma_init=str(config["gamma_init"]),
                                         max_epochs=max_epochs, patience=patience)
    run.finetune = bool(config.get("finetune", False))
    if run.finetune:
        run.finetune_config = {**run.finetune_config, "lr": float(config["ft_lr"]),
                               "epochs": int(config["ft_epochs"])}
    return run


def trial(config: dict, data: dict) -> None:
    """One Tune trial: (optionally finetune, then) train the skip head, reporting validation loss per epoch."""
    from ray import tune

    run = settings_from_trial(config, data["max_epochs"], data["patience"])
    fold: ev.Fold = data["fold"]
    layers = data["layers"]
    if run.finetune:
        from astromer.weights import load_model_dir

        labelled = ev.LabelledSet(name="sweep", object_ids=data["object_ids"], bands=data["object_ids"],
                                  y=data["y"], class_names=data["class_names"], curves=data["curves"])
        layers = ev._finetuned_layers(load_model_dir(data["model_dir"]), labelled, fold, run, seed=0)
    y = data["y"]
    n_classes = len(data["class_names"])

    best = {"loss": float("inf"), "epoch": 0}

    def report(epoch: int, metrics: dict) -> None:
        if metrics[METRIC] < best["loss"]:
            best.update(loss=float(metrics[METRIC]), epoch=epoch + 1)    # the n-th epoch, as Tune counts them
        tune.report({**metrics, "epoch": epoch, RANKED: best["loss"], "best_epoch": best["epoch"]})

    rows, weights = ev.training_rows(fold.train, run.classifier)
    ev.train_skip_classifier(layers[rows], y[rows], layers[fold.val], y[fold.val], n_classes, run.classifier,
                             on_epoch=report, sample_weight=weights)


class MlflowTrials(Callback):
    """A Tune callback (runs in the driver): one nested MLflow run per trial under ``parent_run_id``,
    with the trial's parameters and its per-epoch metrics, written as they arrive."""

    def __init__(self, experiment_id: str, parent_run_id: str):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient()
        self.experiment_id, self.parent = experiment_id, parent_run_id
        self.runs: dict[str, str] = {}

    def on_trial_start(self, iteration, trials, trial, **info):
        run = self.client.create_run(self.experiment_id, run_name=f"trial-{trial.trial_id}",
                                     tags={"mlflow.parentRunId": self.parent, "trial_id": trial.trial_id})
        self.runs[trial.trial_id] = run.info.run_id
        for key, value in trial.config.items():
            self.client.log_param(run.info.run_id, key, value)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        run_id = self.runs.get(trial.trial_id)
        if run_id is None:
            return
        step = int(result.get("training_iteration", 0))
        for key in ("train_loss", "val_loss", "val_accuracy", RANKED):
            value = result.get(key)
            if isinstance(value, int | float) and np.isfinite(value):
                self.client.log_metric(run_id, key, float(value), step=step)

    def _end(self, trial, status: str) -> None:
        run_id = self.runs.pop(trial.trial_id, None)
        if run_id is not None:
            last = trial.last_result or {}
            self.client.log_metric(run_id, "epochs_run", float(last.get("training_iteration", 0)))
            self.client.set_terminated(run_id, status)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._end(trial, "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._end(trial, "FAILED")


def sweep(layers: np.ndarray, y: np.ndarray, object_ids: np.ndarray, class_names: list[str], *,
          samples_per_class: int = 100, num_samples: int = 16, max_epochs: int = 60, grace_period: int = 5,
          patience: int = 40, finetune_choice: bool = False, curves: list | None = None,
          model_dir: str | None = None, seed: int = 0, experiment: str = "astromer-sweep",
          run_name: str | None = None, out: str | Path | None = None, cpus_per_trial: float = 1.0,
          inputs: dict | None = None) -> dict:
    """Run the sweep and return {"best": RunSettings dict, "trials": [...], "parent_run_id": ...}.

    ``inputs``: what the layers came from (model, its registered name and version, dataset, lake, bands, ...):
    the parent run's parameters and the ``sweep`` entry of the best configuration, beside the search's own."""
    import mlflow
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    if finetune_choice and (curves is None or model_dir is None):
        raise ValueError("finetune_choice needs the curves and the model folder")
    for name, value in (("num_samples", num_samples), ("max_epochs", max_epochs), ("grace_period", grace_period),
                        ("patience", patience)):
        if not value >= 1:   # no trial would run, or each would fail in it (samples_per_class: make_folds checks)
            raise ValueError(f"{name}={value!r}: expected a positive whole number")
    module = sys.modules[trial.__module__]
    if module.__name__ != "__main__":  # a script, not an installed package: ship its code to the workers
        ray.cloudpickle.register_pickle_by_value(module)
    folds = ev.make_folds(object_ids, y, ev.ProtocolConfig(samples_per_class=(samples_per_class,), n_folds=1,
                                                           seed=seed))
    data = {"layers": np.asarray(layers, np.float32), "y": np.asarray(y), "object_ids": np.asarray(object_ids),
            "class_names": list(class_names), "fold": folds[0], "max_epochs": max_epochs, "patience": patience,
            "curves": curves if finetune_choice else None, "model_dir": model_dir}
    if not ray.is_initialized():
        ray.init(address=settings.ray_address(), include_dashboard=False, configure_logging=False,
                 log_to_driver=False)
    registry.setup_tracking()
    experiment_id = registry.experiment_id(experiment)
    name = run_name or f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    scheduler = ASHAScheduler(time_attr="training_iteration", max_t=max_epochs, grace_period=grace_period,
                              reduction_factor=2)
    with mlflow.start_run(experiment_id=experiment_id, run_name=name) as parent:
        searched = {"samples_per_class": samples_per_class, "num_samples": num_samples, "max_epochs": max_epochs,
                    "grace_period": grace_period, "scheduler": "ASHA", "finetune_choice": finetune_choice,
                    "n_curves": len(y), "classes": ",".join(class_names)}
        mlflow.log_params({**searched, **{k: str(v)[:6000] for k, v in (inputs or {}).items()}})
        tuner = tune.Tuner(
            tune.with_resources(tune.with_parameters(trial, data=data), {"cpu": cpus_per_trial}),
            param_space=search_space(finetune_choice),
            tune_config=tune.TuneConfig(metric=RANKED, mode="min", scheduler=scheduler, num_samples=num_samples,
                                        search_alg=BasicVariantGenerator(random_state=seed)),
            run_config=tune.RunConfig(name=name, storage_path=str(settings.ray_results_dir()),
                                      callbacks=[MlflowTrials(experiment_id, parent.info.run_id)], verbose=1),
        )
        grid = tuner.fit()
        trials = []
        for result in grid:
            if result.error is not None:
                trials.append({"config": result.config, "error": str(result.error)})
                continue
            trials.append({"config": result.config, METRIC: float(result.metrics.get(RANKED, float("inf"))),
                           "best_epoch": int(result.metrics.get("best_epoch", 0)),
                           "epochs": int(result.metrics.get("training_iteration", 0))})
        ok = [t for t in trials if "error" not in t]
        if not ok:
            raise RuntimeError(f"every trial of sweep {name} failed: {trials[0]['error'] if trials else 'none ran'}")
        best_trial = min(ok, key=lambda t: t[METRIC])   # RANKED's last value: Tune's choice too
        best = settings_from_trial(best_trial["config"], max_epochs=ev.ClassifierConfig.max_epochs,
                                   patience=ev.ClassifierConfig.patience).to_dict()
        best["metric"] = {METRIC: best_trial[METRIC], "best_epoch": best_trial["best_epoch"],
                          "epochs": best_trial["epochs"]}
        best["sweep"] = {"run_name": name, **(inputs or {}), **searched}
        mlflow.log_metric(RANKED, best_trial[METRIC])
        mlflow.log_dict(best, "best_config.json")
        if out is not None:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text(json.dumps(best, indent=2))
        return {"best": best, "trials": trials, "parent_run_id": parent.info.run_id, "experiment_id": experiment_id}


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model", required=True, help="models:/NAME@ALIAS or a model folder")
    parser.add_argument("--lake", default=None)
    parser.add_argument("--dataset", required=True, help=f"one of {', '.join(ev.DATASETS)}")
    parser.add_argument("--band", "--bands", dest="bands", nargs="+")
    parser.add_argument("--samples-per-class", type=positive_int, default=100)
    parser.add_argument("--max-per-class", type=positive_int, default=None,
                        help="a random subset of at most N objects per class (quick sweeps on large sets)")
    parser.add_argument("--num-samples", type=positive_int, default=16, help="trials")
    parser.add_argument("--max-epochs", type=positive_int, default=60)
    parser.add_argument("--grace-period", type=positive_int, default=5, help="epochs before ASHA may stop a trial")
    parser.add_argument("--finetune-choice", action="store_true", help="also search finetune yes/no + its settings")
    parser.add_argument("--experiment", default="astromer-sweep")
    parser.add_argument("--run-name")
    parser.add_argument("--out", default=None,
                        help="where the best configuration goes (default: $ASTROMER_HOME/sweeps/RUN_NAME/"
                             "best_config.json; a relative path is taken from the job's working folder)")
    args = parser.parse_args(argv)

    import dataclasses

    import astromer
    from astromer.commands import USER_ERRORS, check_output, report_usage_error
    from astromer.embeddings import resolve_model

    if args.grace_period > args.max_epochs:
        parser.error(f"--grace-period {args.grace_period} is longer than --max-epochs {args.max_epochs}")
    lake = args.lake or settings.default_lake()
    name = args.run_name or f"sweep-{args.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:   # the output, the set and the model, checked before any trial
        out = Path(args.out or settings.home() / "sweeps" / name / "best_config.json").resolve()
        check_output(str(out), folder=False)
        spec = ev.named_dataset(args.dataset)
        if args.bands:
            spec = dataclasses.replace(spec, bands=tuple(args.bands))
        if args.max_per_class is not None:
            spec = dataclasses.replace(spec, max_per_class=args.max_per_class)
        model = astromer.load_model(args.model)           # loaded, so checked: resolved without a second load
        ref = resolve_model(args.model, check=False)
        data = ev.load_labelled_set(lake, spec)
    except USER_ERRORS as exc:
        return report_usage_error(exc)
    # the encoder is frozen in the trials: what jobs/embed.py wrote for this model version serves as it is
    layers, state = ev.cached_layers(lake, ref.name, ref.version, spec.survey, data)
    print(f"lake embeddings of {ref.name} version {ref.version}: {state}", flush=True)
    if layers is None:
        print(f"embedding {len(data.curves):,} curves with {ref.name} version {ref.version} (jobs/embed.py writes "
              "them to the lake once for every sweep and classification)", flush=True)
        layers = model.embed(data.curves, all_layers=True)
    result = sweep(layers, data.y, data.object_ids, data.class_names, samples_per_class=args.samples_per_class,
                   num_samples=args.num_samples, max_epochs=args.max_epochs, grace_period=args.grace_period,
                   finetune_choice=args.finetune_choice, curves=data.curves,
                   model_dir=str(ref.model_dir), experiment=args.experiment,
                   run_name=name, out=out,
                   inputs={"model": str(args.model), "model_name": ref.name, "model_version": ref.version,
                           "dataset": spec.name, "survey": spec.survey, "label_set": spec.label_set,
                           "bands": ",".join(spec.bands or ()) or "all", "max_per_class": spec.max_per_class,
                           "lake": str(lake), "lake_embeddings": state})
    print(json.dumps(result["best"], indent=2))
    print(f"best configuration written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
