"""The ``astromer`` command.

Each command group lives in its own module under ``astromer.commands`` and exposes
``register(subparsers)``; the module is imported only when the command line names it, so ``astromer
--help`` stays fast and a broken optional part never breaks the others.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from astromer.commands import ArgumentParser

# command name -> (module under astromer.commands, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "weights": ("weights", "import official TensorFlow weights, inspect checkpoints"),
    "ingest": ("ingest", "turn raw survey photometry into the lake (Dask)"),
    "lake": ("lake", "query the lake with DuckDB, build windows, find similar curves"),
    "models": ("models", "list and inspect registered models"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="astromer", description="Astromer light-curve platform")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        if only is not None and name != only:
            sub.add_parser(name, help=help_text)
            continue
        module = importlib.import_module(f"astromer.commands.{module_name}")
        module.register(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    name = argv[0] if argv and argv[0] in COMMANDS else None
    parser = build_parser(only=name if name else "__none__")
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if not argv else 2
    try:
        result = args.func(args)
    except BrokenPipeError:
        if not _stdout_reader_gone():
            raise
        # `astromer lake query ... | head`: the reader left; end as a program killed by SIGPIPE does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # the exit's flush must not fail again
        return 141
    return int(result or 0)


def _stdout_reader_gone() -> bool:
    """Whether standard output is a pipe or socket whose reader has closed it (poll reports an error or a
    hang-up on it: Linux pipes say POLLERR, sockets and BSD pipes POLLHUP)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLERR | select.POLLHUP)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):   # no poll on this platform, or no real stdout
        return False


if __name__ == "__main__":
    sys.exit(main())
