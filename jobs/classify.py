"""Classify variable stars with few labels, the way the Astromer papers report it.

    python jobs/classify.py --model models:/astromer1-macho@production --lake LAKE --dataset ogle-modes
    python jobs/classify.py --model MODEL_DIR --lake LAKE --dataset stripe82 --band r --periods periods.csv
    python jobs/classify.py --model ... --lake LAKE --survey asas --label-set class --min-members 30
    python jobs/classify.py --model ... --lake LAKE --dataset asas --config best.json   # from tune/sweep.py

Per fold (3) and samples per class (20, 100, 500): the frozen encoder with the `skip` head, optionally a
per-fold finetuned encoder (--finetune), and, on the same folds, light-curve features + random forest and the
skip head on a randomly initialised encoder. Writes results.md (macro F1, precision, recall, accuracy mean ±
std), results.json and PNG figures to --out, and logs everything to MLflow: one parent run, one nested run
per (method, samples per class).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

from astromer import evaluate as ev
from astromer import registry, settings
from astromer.commands import ArgumentParser, non_negative_int, positive_int


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION or a model folder")
    parser.add_argument("--lake", default=None, help="lake root (default: ASTROMER_HOME/lake)")
    parser.add_argument("--dataset", default=None, help=f"a named labelled set: {', '.join(ev.DATASETS)}")
    parser.add_argument("--survey", help="custom dataset: survey name (overrides the named set's)")
    parser.add_argument("--label-set", help="custom dataset: label set (e.g. class, mode, rrlyrae_type)")
    parser.add_argument("--band", "--bands", dest="bands", nargs="+", help="bands to use (default: the set's)")
    parser.add_argument("--classes", nargs="+", help="only these classes")
    parser.add_argument("--min-members", type=non_negative_int,
                        help="drop classes with fewer objects (default: the set's)")
    parser.add_argument("--max-per-class", type=positive_int,
                        help="use a random subset of at most this many objects per class (quick runs; not the protocol)")
    parser.add_argument("--periods", help="CSV with object id and period columns (folds the attention figure)")
    parser.add_argument("--config", help="JSON settings (RunSettings; tune/sweep.py writes one)")
    parser.add_argument("--finetune", action=argparse.BooleanOptionalAction, default=None,
                        help="finetune the encoder on each fold's training curves first")
    parser.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=None,
                        help="also run light-curve features + RF and the random-encoder skip head")
    parser.add_argument("--samples-per-class", type=positive_int, nargs="+", help="default 20 100 500")
    parser.add_argument("--folds", type=positive_int, help="default 3")
    parser.add_argument("--test-per-class", type=positive_int, help="default 1000")
    parser.add_argument("--max-epochs", type=positive_int, help="classifier epochs cap (default 500)")
    parser.add_argument("--patience", type=positive_int, help="early-stopping patience in epochs (default 40)")
    parser.add_argument("--seed", type=non_negative_int, default=None)
    parser.add_argument("--out", help="output folder (default: ASTROMER_HOME/classify/<dataset>-<time>)")
    parser.add_argument("--experiment", default="astromer-classify", help="MLflow experiment")
    parser.add_argument("--run-name", help="MLflow parent run name")
    parser.add_argument("--threads", type=positive_int, help="torch CPU threads")
    parser.add_argument("--no-lake-embeddings", dest="use_lake_embeddings", action="store_false",
                        help="recompute the frozen model's embeddings even when jobs/embed.py wrote them")
    return parser


def dataset_spec(args) -> ev.DatasetSpec:
    if args.dataset:
        spec = ev.named_dataset(args.dataset)
    elif args.survey and args.label_set:
        spec = ev.DatasetSpec(name=f"{args.survey}-{args.label_set}", survey=args.survey, label_set=args.label_set)
    else:
        raise ValueError("give --dataset NAME, or --survey and --label-set")
    changes = {}
    if args.survey:
        changes["survey"] = args.survey
    if args.label_set:
        changes["label_set"] = args.label_set
    if args.bands:
        changes["bands"] = tuple(args.bands)
        if args.dataset and spec.bands != tuple(args.bands):
            changes["name"] = f"{spec.name}-{'+'.join(args.bands)}"
    if args.classes:
        changes["classes"] = tuple(args.classes)
    if args.min_members is not None:
        changes["min_members"] = args.min_members
    if args.max_per_class is not None:
        changes["max_per_class"] = args.max_per_class
    return replace(spec, **changes)


def run_settings(args) -> ev.RunSettings:
    run = ev.RunSettings()
    if args.config:
        from astromer.config import read_settings_file

        data = read_settings_file(args.config)
        try:
            run = ev.RunSettings.from_dict(data)
        except ValueError as exc:
            raise ValueError(f"settings file {args.config}: {exc}") from None
    if args.finetune is not None:
        run.finetune = args.finetune
    if args.baselines is not None:
        run.baselines = args.baselines
    if args.samples_per_class is not None:
        run.protocol.samples_per_class = tuple(args.samples_per_class)
    if args.folds is not None:
        run.protocol.n_folds = args.folds
    if args.test_per_class is not None:
        run.protocol.test_per_class = args.test_per_class
    if args.max_epochs is not None:
        run.classifier.max_epochs = args.max_epochs
    if args.patience is not None:
        run.classifier.patience = args.patience
    if args.seed is not None:
        run.protocol.seed = run.classifier.seed = args.seed
    return run


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    import astromer
    import mlflow
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    from astromer.commands import USER_ERRORS, check_output, report_usage_error
    from astromer.embeddings import resolve_model

    lake = args.lake or settings.default_lake()
    try:   # what was asked (set, classes, settings file, periods, model, output) is checked before any training
        if args.out:
            check_output(args.out)
        spec = dataset_spec(args)
        run = run_settings(args)
        periods = ev.read_periods_csv(args.periods) if args.periods else None
        model = astromer.load_model(args.model)           # loaded, so checked: resolved without a second load
        ref = resolve_model(args.model, check=False)
        data = ev.load_labelled_set(lake, spec, periods=periods)
    except USER_ERRORS as exc:
        return report_usage_error(exc)
    started = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else settings.home() / "classify" / f"{spec.name}-{started}"
    print(f"dataset {spec.name}: {len(data)} curves, classes {data.class_names}; left out: {data.dropped}",
          flush=True)
    registry.setup_tracking()
    experiment = registry.experiment_id(args.experiment)
    with mlflow.start_run(experiment_id=experiment, run_name=args.run_name or f"classify-{spec.name}-{started}"):
        # the model as asked (an alias moves) and as resolved (the version that ran)
        mlflow.set_tags({"model": str(args.model), "model_name": ref.name, "model_version": ref.version,
                         "dataset": spec.name, "survey": spec.survey, "label_set": spec.label_set,
                         "lake": str(lake), "output": str(out)})
        frozen = None
        if args.use_lake_embeddings and not run.finetune:
            frozen, state = ev.cached_layers(lake, ref.name, ref.version, spec.survey, data)
            print(f"lake embeddings of {ref.name} version {ref.version}: {state}", flush=True)
            mlflow.set_tag("frozen_embeddings", "lake" if frozen is not None else "computed")
        report = ev.run_protocol(data, model, run, out, frozen_layers=frozen)
    (out / "command.txt").write_text("python jobs/classify.py " + " ".join(argv if argv is not None else sys.argv[1:])
                                     + "\n")
    print(f"results: {out / 'results.md'}")
    return 0 if report["summary"] else 1


if __name__ == "__main__":
    sys.exit(main())
