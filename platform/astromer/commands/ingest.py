"""``astromer ingest --survey S --source URL --lake LAKE``: raw survey files -> the lake (Dask).

Same as ``python ingest/run.py ...``. Exit status 0 when curves were ingested (bad inputs are
quarantined and reported), 1 when every input was bad or the lake could not be written, 2 on a usage error,
3 when another ingest of the survey is running, 130 when interrupted (the same command resumes).
"""
from __future__ import annotations

import argparse
import sys

from astromer import settings
from astromer.commands import USER_ERRORS, ArgumentParser, positive_int, report_usage_error


def parse_mapping(text: str | None) -> dict[str, str]:
    """``object=oid,time=hjd,mag=m`` -> {"object": "oid", ...}."""
    if not text:
        return {}
    out = {}
    for item in text.split(","):
        if "=" not in item:
            raise argparse.ArgumentTypeError(f"--columns item {item!r} is not NAME=COLUMN")
        key, value = item.split("=", 1)
        if "=" in value:
            raise argparse.ArgumentTypeError(f"--columns item {item!r} holds two '=': separate the items with commas "
                                             "(object=oid,time=hjd,...)")
        out[key.strip()] = value.strip()
    return out


def delimiter(text: str) -> str:
    """One character, or a tab written as ``\\t`` or ``tab`` (how a shell passes one)."""
    if text in ("\\t", "tab", "TAB"):
        return "\t"
    if len(text) != 1:
        raise argparse.ArgumentTypeError(f"--delimiter {text!r} is not one character (a tab: '\\t' or tab)")
    return text


#: the options only some readers read, and those readers
READER_OPTIONS = {"columns": ("csv", "parquet"), "band": ("csv", "parquet"), "delimiter": ("csv",)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from astromer.surveys import READERS

    parser.add_argument("--survey", required=True, choices=sorted(READERS), help="raw format of the source")
    parser.add_argument("--source", required=True,
                        help="fsspec URL: folder, file, glob, memory://, s3://, tar://...::file, synthetic://?n=..")
    parser.add_argument("--lake", default=None, help="lake root (default: $ASTROMER_LAKE or ASTROMER_HOME/lake)")
    parser.add_argument("--as", dest="out_survey", default=None,
                        help="survey name in the lake (default: the --survey name)")
    parser.add_argument("--replace", action="store_true",
                        help="publish even when the survey in the lake holds curves from inputs this source lacks "
                             "(they are removed); without it such an ingest is refused")
    parser.add_argument("--break-lock", action="store_true",
                        help="take the survey's ingest lock even though another ingest holds it (one killed on "
                             "another machine; a holder killed on this machine is taken over without it)")
    parser.add_argument("--columns", type=parse_mapping, default=None,
                        help="csv/parquet column mapping: object=..,time=..,mag=..,err=..[,band=..,ra=..,dec=..]")
    parser.add_argument("--band", default=None, help="csv/parquet: band when no band column is mapped")
    parser.add_argument("--delimiter", type=delimiter, default=None,
                        help="csv: field delimiter, one character or \\t for a tab (default ,)")
    parser.add_argument("--scheduler", default=None, help="address of an existing Dask scheduler")
    parser.add_argument("--workers", type=positive_int, default=None,
                        help="local cluster: threads (default: one per core), or worker processes with --processes")
    parser.add_argument("--processes", action=argparse.BooleanOptionalAction, default=None,
                        help="local cluster: worker processes instead of threads in this process (default: "
                             "processes for a survey of many small inputs, such as MACHO's archives)")
    parser.add_argument("--threads", type=positive_int, default=None, help="local cluster with --processes: threads per worker")
    parser.add_argument("--part-mb", type=positive_int, default=None,
                        help="target part size in Arrow MB (default 192: about 128 MB of Parquet)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args) -> int:
    import os

    from astromer.ingest import DEFAULT_PART_BYTES, run_ingest
    from astromer.lake.locks import SurveyLocked
    from astromer.lake.paths import validate_band

    for name, readers in READER_OPTIONS.items():
        if getattr(args, name) and args.survey not in readers:
            return report_usage_error(ValueError(f"--{name} apply to --survey {' and '.join(readers)}; the "
                                                 f"{args.survey} reader reads its own format"))
    source = args.source
    if "://" not in source and "::" not in source:
        source = os.path.abspath(source)   # the manifest records where the inputs were, from any folder
    options = {}
    if args.columns:
        options["columns"] = args.columns
    if args.band:
        options["band"] = args.band
    if args.delimiter:
        options["delimiter"] = args.delimiter
    lake = args.lake or settings.default_lake()
    try:
        if args.band:
            validate_band(args.band)
        result = run_ingest(args.survey, source, lake, options=options, out_survey=args.out_survey,
                            scheduler=args.scheduler, workers=args.workers, threads_per_worker=args.threads,
                            processes=args.processes, progress=not args.no_progress,
                            part_bytes=(args.part_mb << 20) if args.part_mb else DEFAULT_PART_BYTES,
                            stream=sys.stdout, replace=args.replace, break_lock=args.break_lock)
    except (*USER_ERRORS, ConnectionError) as exc:
        return report_usage_error(exc)
    except SurveyLocked as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("interrupted: no file is half-written; the same command resumes from the inputs mapped so far (and "
              "finishes a publish that was under way)", file=sys.stderr)
        return 130
    except OSError as exc:        # the lake could not be written: a full disk, a read-only folder
        print(f"error: {exc}; no file is half-written, and the same command resumes once this is mended (and "
              "finishes a publish that was under way)", file=sys.stderr)
        return 1
    if result.exit_code:
        print(f"error: no input of {args.source} could be ingested; why, for the first of them:", file=sys.stderr)
        for key, reason, detail in result.quarantine[:5]:
            print(f"  {key}: {reason}: {detail}", file=sys.stderr)
        print(f"the whole report: {result.report}", file=sys.stderr)
    return result.exit_code


def register(parser: argparse.ArgumentParser) -> None:
    add_arguments(parser)
    parser.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="ingest/run.py", description=__doc__.splitlines()[0])
    register(parser)
    args = parser.parse_args(argv)
    return args.func(args)
