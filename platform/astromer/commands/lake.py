"""``astromer lake query|windows|similar``: the lake for users.

    astromer lake query "SELECT survey, band, count(*) FROM lightcurves GROUP BY ALL"
    astromer lake windows --name macho200 --survey macho
    astromer lake similar OGLE-LMC-CEP-0001 --k 10
"""
from __future__ import annotations

import argparse
import json
import sys

from astromer import settings
from astromer.commands import one_line_errors


def _lake(args) -> str:
    return args.lake or settings.default_lake()


@one_line_errors
def run_query(args) -> int:
    import duckdb

    from astromer.lake import LakePaths, connect

    lake = _lake(args)
    paths = LakePaths(lake)
    if not paths.fs.exists(paths.root):
        print(f"error: there is no lake at {lake} (--lake, or ASTROMER_LAKE / ASTROMER_HOME)", file=sys.stderr)
        return 2
    con = connect(paths, sandbox=True)
    try:
        if args.format == "table":
            cursor = con.execute(args.sql)
            if cursor.description is None:          # a statement without a result
                return 0
            columns = [d[0] for d in cursor.description]
            single = [str(d[1]).startswith("FLOAT") for d in cursor.description]
            print_table(columns, cursor.fetchmany(args.max_rows + 1), args.max_rows, single=single)
            return 0
        relation = con.sql(args.sql)
        if relation is None:
            return 0
        table = relation.to_arrow_table()
    except duckdb.Error as exc:
        views = [row[0] for row in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()]
        print(f"error: {exc}", file=sys.stderr)
        if isinstance(exc, duckdb.CatalogException):
            print(f"the lake at {lake} has the tables: {', '.join(sorted(views)) or 'none yet (ingest first)'}",
                  file=sys.stderr)
        return 2
    if args.format == "csv":
        import pyarrow.csv as pacsv

        sys.stdout.flush()
        pacsv.write_csv(table, sys.stdout.buffer)
    else:
        for row in table.to_pylist():
            print(json.dumps(row, default=str))
    return 0


def print_table(columns: list[str], rows: list[tuple], max_rows: int, out=None, single=None) -> None:
    """A plain text table (long lists are shortened). Doubles print in full (times need every
    digit); columns flagged in ``single`` (float32) print with 7 significant digits."""
    out = out or sys.stdout
    shown = rows[:max_rows]
    single = single or [False] * len(columns)

    def cell(value, is_single) -> str:
        if isinstance(value, float):
            return f"{value:.7g}" if is_single else repr(value)
        if isinstance(value, list) and len(value) > 6:
            return "[" + ", ".join(cell(v, is_single) for v in value[:3]) + f", ... ({len(value)})]"
        if isinstance(value, list):
            return "[" + ", ".join(cell(v, is_single) for v in value) + "]"
        return str(value)

    body = [[cell(v, s) for v, s in zip(row, single)] for row in shown]
    widths = [max([len(c)] + [len(r[i]) for r in body]) for i, c in enumerate(columns)]
    print(" | ".join(c.ljust(w) for c, w in zip(columns, widths)), file=out)
    print("-+-".join("-" * w for w in widths), file=out)
    for r in body:
        print(" | ".join(v.ljust(w) for v, w in zip(r, widths)), file=out)
    more = " (more rows not shown; --max-rows)" if len(rows) > max_rows else ""
    print(f"({len(shown)} row{'s' if len(shown) != 1 else ''}{more})", file=out)


@one_line_errors
def run_windows(args) -> int:
    from astromer.lake.windows import build_windows

    info = build_windows(_lake(args), args.name, surveys=args.survey, bands=args.band, length=args.length,
                         rule=args.rule, clean=not args.raw, drop_noisy=not args.keep_noisy, overwrite=args.overwrite)
    print(json.dumps(info, indent=2, default=str))
    return 0


@one_line_errors
def run_similar(args) -> int:
    from astromer.embeddings import similar

    used: dict = {}
    rows = similar(_lake(args), args.object_id, args.k, model=args.model, version=args.version, band=args.band,
                   survey=args.survey, used=used)
    print(f"nearest to {args.object_id} ({used['survey']}, band {used['band']}) by {used['model']} "
          f"version {used['version']}:")
    if not rows:
        print("no neighbours found")
        return 1
    columns = list(rows[0].keys())
    print_table(columns, [tuple(r[c] for c in columns) for r in rows], len(rows))
    return 0


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="lake_command", metavar="SUBCOMMAND")

    query = sub.add_parser("query", help="run SQL over the lake's DuckDB views and print a table")
    query.add_argument("sql", help="SQL over the views lightcurves, labels, embeddings, ingest_*")
    query.add_argument("--lake", default=None)
    query.add_argument("--max-rows", type=int, default=100, help="rows printed as a table at most (default 100)")
    query.add_argument("--format", choices=("table", "csv", "json"), default="table")
    query.set_defaults(func=run_query)

    windows = sub.add_parser("windows", help="build a Zarr store of fixed-length windows")
    windows.add_argument("--name", required=True, help="store name: windows/<name>.zarr")
    windows.add_argument("--lake", default=None)
    windows.add_argument("--survey", action="append", default=None, help="repeatable; default all")
    windows.add_argument("--band", action="append", default=None, help="repeatable; default all")
    windows.add_argument("--length", type=int, default=200, help="observations per window (default 200)")
    windows.add_argument("--rule", default="astromer2", choices=("astromer1", "astromer2"))
    windows.add_argument("--raw", action="store_true", help="skip the paper's cleaning")
    windows.add_argument("--keep-noisy", action="store_true",
                         help="do not reject curves by the kurtosis/skewness/std noise criteria")
    windows.add_argument("--overwrite", action="store_true")
    windows.set_defaults(func=run_windows)

    similar = sub.add_parser("similar", help="nearest curves of an object in embedding space")
    similar.add_argument("object_id")
    similar.add_argument("--k", type=int, default=10, help="neighbours (default 10)")
    similar.add_argument("--model", default=None)
    similar.add_argument("--version", default=None)
    similar.add_argument("--band", default=None, help="the object's band to query with (default: its first)")
    similar.add_argument("--survey", default=None, help="the object's survey (needed when several use its id)")
    similar.add_argument("--lake", default=None)
    similar.set_defaults(func=run_similar)
