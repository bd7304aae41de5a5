"""`astromer weights ...`: import official TensorFlow weights (no TensorFlow needed), inspect checkpoints."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from astromer.config import PRESETS


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="weights_command", metavar="SUBCOMMAND")

    imp = sub.add_parser("import", help="official checkpoint (folder, .index, zip) or .npz -> model folder",
                         description="Read official Astromer weights and write OUT_DIR/model.safetensors + "
                                     "OUT_DIR/config.json.")
    imp.add_argument("src", help="checkpoint folder, weights.index path, published zip (e.g. macho_a0.zip) "
                                 "or an .npz of checkpoint tensors")
    imp.add_argument("out_dir", help="output model folder")
    imp.add_argument("--preset", default="astromer1", choices=sorted(PRESETS),
                     help="model layout of the checkpoint (default astromer1)")
    imp.add_argument("--register", metavar="NAME", default=None,
                     help="also register the folder in the MLflow model registry under NAME")
    imp.set_defaults(func=_import)

    ls = sub.add_parser("list", help="list the tensors (name, dtype, shape) of a checkpoint index")
    ls.add_argument("src", help="checkpoint folder, weights.index path or zip")
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ls.set_defaults(func=_list)

    dig = sub.add_parser("digest", help="sha256 over a model folder's tensors (compare two runs' weights)",
                         description="Print the sha256 over the tensors of each model folder (a checkpoint "
                                     "such as ray_results/RUN/step-00000300 or a registered model's folder): "
                                     "names, dtypes, shapes and values. The model.safetensors file's own "
                                     "checksum differs between identical models, its metadata being written "
                                     "in no fixed order.")
    dig.add_argument("folders", nargs="+", help="model folders (holding model.safetensors)")
    dig.set_defaults(func=_digest)


def _digest(args: argparse.Namespace) -> int:
    from pathlib import Path

    from astromer.weights import MODEL_FILE, weights_digest

    missing = [f for f in args.folders if not (Path(f) / MODEL_FILE).is_file()]
    if missing:
        print(f"astromer weights digest: no {MODEL_FILE} in {', '.join(missing)}", file=sys.stderr)
        return 2
    for folder in args.folders:
        print(f"{weights_digest(folder)}  {folder}")
    return 0


def _import(args: argparse.Namespace) -> int:
    from astromer.commands import USER_ERRORS, check_output, error_line, report_usage_error
    from astromer.weights import import_official

    try:   # a model folder is local (--register puts a copy in MLflow's artifact store)
        check_output(args.out_dir, "out_dir")
    except USER_ERRORS as exc:
        return report_usage_error(exc)
    if args.register:   # checked before anything is written
        from astromer.registry import validate_model_name

        try:
            validate_model_name(args.register)
        except ValueError as exc:
            return report_usage_error(ValueError(f"--register: {exc}"))
    try:
        model = import_official(args.src, args.out_dir, preset=args.preset)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        print(f"astromer weights import: {error_line(exc)}", file=sys.stderr)
        return 1
    print(f"wrote {args.out_dir} ({args.preset}, {model.num_parameters():,} parameters)")
    missing = _missing_from_source(args.out_dir)
    if missing:   # e.g. a classifier checkpoint holds the encoder only
        print(f"astromer weights import: the checkpoint lacks {len(missing)} tensor(s), kept at their initial "
              f"values: {', '.join(missing)}. Embedding and classifying use the encoder only; reconstructions "
              "need the head: finetune before using them.", file=sys.stderr)
    if args.register:
        from astromer.registry import register_model_dir, version_with_tags
        from astromer.weights import weights_digest

        digest = weights_digest(args.out_dir)
        same = version_with_tags(args.register, {"weights_sha256": digest})
        if same is not None:   # importing the same checkpoint again adds no version
            print(f"{args.register} version {same} holds these weights already: nothing registered")
            return 0
        version = register_model_dir(args.out_dir, args.register,
                                     tags={"source": _absolute(args.src), "preset": args.preset,
                                           "weights_sha256": digest})
        print(f"registered {args.register} version {version}")
    return 0


def _absolute(src: str) -> str:
    """A local source as an absolute path (the lineage tag outlives the folder the command ran in); a URL as is."""
    return src if "://" in str(src) else str(Path(src).resolve())


def _missing_from_source(model_dir: str) -> list[str]:
    from pathlib import Path

    from safetensors import safe_open

    from astromer.weights import MODEL_FILE

    with safe_open(str(Path(model_dir) / MODEL_FILE), "pt") as handle:
        names = (handle.metadata() or {}).get("missing_from_source", "")
    return [n for n in names.split(",") if n]


def _list(args: argparse.Namespace) -> int:
    from astromer.weights import list_tf_checkpoint

    try:
        entries = list_tf_checkpoint(args.src)
    except (FileNotFoundError, ValueError) as exc:
        print(f"astromer weights list: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({k: {"dtype": d, "shape": list(s)} for k, (d, s) in entries.items()}, indent=1))
    else:
        for name, (dtype, shape) in entries.items():
            print(f"{name}\t{dtype}\t{list(shape)}")
    return 0
