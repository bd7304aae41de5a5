"""Embed a survey of the lake with a registered model: Ray Data batch inference with an actor pool.

    python jobs/embed.py --model models:/astromer1-macho@production --lake LAKE --survey ogle
    python jobs/embed.py --model MODEL_DIR --name my-model --lake LAKE --survey sdss-stripe82 --band g r
    python jobs/embed.py --model ... --lake LAKE --survey asas --detail-objects 215153 --gpus-per-actor 1

Every window of every curve is encoded; each curve gets one row in
embeddings/model=<name>/version=<v>/survey=<s>/ (object_id, band, n_obs, n_windows, embedding FLOAT[D], layer_means).
Re-running for the same model version replaces that survey's rows (per band with --band). With
--detail-objects, per-observation embeddings and attention weights of those objects go to a Zarr store
beside the Parquet files. Starts a local Ray unless RAY_ADDRESS is set.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from astromer import settings
from astromer.commands import ArgumentParser, non_negative_float, positive_int


def build_parser() -> argparse.ArgumentParser:
    from astromer.embeddings import PRECISIONS

    parser = ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION or a model folder")
    parser.add_argument("--name", help="model name in the lake for a model folder (default: the folder name)")
    parser.add_argument("--lake", default=None, help="lake root (default: ASTROMER_HOME/lake)")
    parser.add_argument("--survey", required=True, nargs="+", help="survey(s) to embed")
    parser.add_argument("--band", "--bands", dest="bands", nargs="+", help="only these bands (default: all)")
    parser.add_argument("--actors", type=positive_int, default=1, help="model replicas in the actor pool")
    parser.add_argument("--cpus-per-actor", type=non_negative_float, default=1.0, help="Ray CPUs reserved per actor")
    parser.add_argument("--threads", type=positive_int, help="torch threads per actor (default: cores / actors)")
    parser.add_argument("--gpus-per-actor", type=non_negative_float, default=0.0,
                        help="GPUs per actor (0: CPU inference)")
    parser.add_argument("--precision", choices=PRECISIONS, default="bf16",
                        help="on GPUs: bf16 autocast (faster) or float32 (matches the CPU and the official "
                             "outputs; bf16 put Astromer 1 5%% off them)")
    parser.add_argument("--curves-per-batch", type=positive_int, default=128, help="curves per Ray Data batch")
    parser.add_argument("--batch-size", type=positive_int, default=256, help="windows per model forward")
    parser.add_argument("--no-clean", dest="clean", action="store_false",
                        help="embed every observation, ignoring the lake's quality flags")
    parser.add_argument("--detail-objects", nargs="+", default=(),
                        help="object ids whose per-observation embeddings and attention go to Zarr")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)

    import ray
    from astromer.commands import USER_ERRORS, report_usage_error
    from astromer.embeddings import check_gpus, check_selection, embed_survey, resolve_model
    from astromer.lake.paths import LakePaths
    from astromer.lake.writers import check_writable

    lake = args.lake or settings.default_lake()
    try:   # every survey, band and the model are checked before Ray starts and before any survey is embedded
        for survey in args.survey:
            check_selection(lake, survey, args.bands)
        ref = resolve_model(args.model, args.name)
        paths = LakePaths(lake)
        check_writable(paths.fs, paths.join("_embed"))     # a read-only or full lake, before Ray starts
    except USER_ERRORS as exc:
        return report_usage_error(exc)
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if not ray.is_initialized():
        if settings.ray_address() != "local":
            ray.init(address=settings.ray_address())
        else:
            ray.init(address="local", include_dashboard=False, configure_logging=False, log_to_driver=False)
    if args.gpus_per_actor > 0:
        try:
            check_gpus(args.gpus_per_actor * args.actors)
        except ValueError as exc:
            return report_usage_error(exc)
    for survey in args.survey:
        try:
            report = embed_survey(lake, ref, survey, args.bands, batch_size=args.batch_size,
                                  curves_per_batch=args.curves_per_batch, actors=args.actors,
                                  cpus_per_actor=args.cpus_per_actor, gpus_per_actor=args.gpus_per_actor,
                                  threads=args.threads, precision=args.precision,
                                  clean=args.clean, detail_objects=args.detail_objects)
        except KeyboardInterrupt:
            print(f"interrupted while embedding {survey}: its published embeddings are as they were (the surveys "
                  "embedded before it stay); the same command embeds it again", file=sys.stderr)
            return 130
        except OSError as exc:    # the lake could not be written: a full disk, a read-only folder
            print(f"error: embedding {survey}: {exc}; its published embeddings are as they were", file=sys.stderr)
            return 1
        summary = {k: v for k, v in report.items() if k != "bands"}
        summary["bands"] = {b: {k: (len(v) if k == "skipped" else v) for k, v in info.items()}
                            for b, info in report["bands"].items()}
        print(json.dumps(summary, indent=2, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
