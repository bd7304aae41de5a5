"""``astromer models``: list and inspect registered models (MLflow registry)."""
from __future__ import annotations

import argparse
import json
import sys


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="models_command", metavar="SUBCOMMAND")

    ls = sub.add_parser("list", help="registered models with their aliases and latest version")
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ls.set_defaults(func=_list)

    show = sub.add_parser("show", help="versions, aliases and tags of one registered model")
    show.add_argument("name", help="registered model name, e.g. astromer1-macho")
    show.add_argument("--json", action="store_true", help="print JSON instead of a table")
    show.set_defaults(func=_show)

    alias = sub.add_parser("alias", help="point an alias (production, candidate, ...) at a version by hand")
    alias.add_argument("name", help="registered model name")
    alias.add_argument("alias", help="alias, e.g. production")
    alias.add_argument("version", type=int, help="version number")
    alias.set_defaults(func=_alias)


def _list(args: argparse.Namespace) -> int:
    from astromer.registry import list_models

    rows = list_models()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no registered models")
        return 0
    print(f"{'name':<32} {'versions':>8} {'latest':>6}  aliases")
    for row in rows:
        aliases = ", ".join(f"{a}={v}" for a, v in row["aliases"].items()) or "-"
        print(f"{row['name']:<32} {row['versions']:>8} {row['latest_version']!s:>6}  {aliases}")
    return 0


def _show(args: argparse.Namespace) -> int:
    from astromer.registry import show_model

    try:
        info = show_model(args.name)
    except LookupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"model {info['name']}")
    for v in info["versions"]:
        aliases = ",".join(v["aliases"]) or "-"
        tags = " ".join(f"{k}={val}" for k, val in sorted(v["tags"].items()))
        print(f"  version {v['version']:<4} aliases={aliases:<22} run={v['run_id']}  {tags}")
    return 0


def _alias(args: argparse.Namespace) -> int:
    from astromer.registry import set_alias

    try:
        set_alias(args.name, args.alias, args.version)
    except (LookupError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{args.name}@{args.alias} -> version {args.version}")
    return 0
