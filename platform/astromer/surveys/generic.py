"""Anyone else's photometry: CSV or Parquet in long format (one row per observation).

Columns are mapped with ``--columns object=oid,time=hjd,mag=m,err=e[,band=filter,ra=..,dec=..]``
(defaults: ``object, band, time, mag, err``); without a band column every curve gets ``--band``
(default ``unknown``). Times are taken as MJD (``time_offset`` is added when given). Rows of one
(object, band) may be spread over a file in any order; each file is one input.
"""
from __future__ import annotations

import csv
import io

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from astromer.surveys.base import Batch, Input, Plan, list_files, read_bytes

FIELDS = ("object", "band", "time", "mag", "err", "ra", "dec")
REQUIRED = ("object", "time", "mag", "err")


def column_map(options: dict) -> dict[str, str]:
    mapping = {name: name for name in ("object", "band", "time", "mag", "err")}
    mapping.update(options.get("columns") or {})
    unknown = set(mapping) - set(FIELDS)
    if unknown:
        raise ValueError(f"unknown column mapping keys {sorted(unknown)}; known: {', '.join(FIELDS)}")
    return mapping


class _LongFormatReader:
    patterns: tuple[str, ...] = ()

    def plan(self, source: str, options: dict) -> Plan:
        column_map(options)   # fail early on a bad mapping
        fs, infos = list_files(source, self.patterns)
        inputs = [Input(key=i["key"], url=i["url"], size=i.get("size") or 0,
                        options=dict(options)) for i in infos]
        return Plan(inputs=inputs)

    def read(self, item: Input, context: dict) -> Batch:
        batch = Batch()
        mapping = column_map(item.options)
        table = self.load(item, mapping, batch)
        if table is None:
            return batch
        missing = [f"{k}={v}" for k, v in mapping.items() if k in REQUIRED and v not in table.column_names]
        if missing:
            batch.quarantine.append((item.key, "missing_column", (
                f"{', '.join(missing)} not among the file's columns ({', '.join(table.column_names[:12])}"
                f"{', ...' if len(table.column_names) > 12 else ''}): --columns NAME=COLUMN maps them")[:500]))
            return batch
        table = numeric_columns(table, mapping, item.key, batch)
        if table is None:
            return batch
        if table.num_rows == 0:
            batch.quarantine.append((item.key, "empty", "a header and no rows"))
            return batch
        add_long_table(batch, table, mapping, item, default_band=item.options.get("band", "unknown"),
                       time_offset=float(item.options.get("time_offset", 0.0)))
        return batch


class CsvReader(_LongFormatReader):
    name = "csv"
    patterns = ("*.csv", "*.csv.gz", "*.csv.bz2", "*.txt", "*.tsv")

    def load(self, item: Input, mapping: dict, batch: Batch) -> pa.Table | None:
        data = read_bytes(item.url)
        if not data.strip():
            batch.quarantine.append((item.key, "empty", "no header and no rows"))
            return None
        delimiter = item.options.get("delimiter") or ("\t" if item.url.endswith(".tsv") else ",")
        numeric = {mapping[k]: pa.float64() for k in ("time", "mag", "err", "ra", "dec") if k in mapping}
        text = {mapping[k]: pa.string() for k in ("object", "band") if k in mapping}
        try:
            return pacsv.read_csv(io.BytesIO(data), parse_options=pacsv.ParseOptions(delimiter=delimiter),
                                  convert_options=pacsv.ConvertOptions(column_types={**numeric, **text}))
        except (pa.ArrowInvalid, UnicodeDecodeError):
            return _rows_by_hand(item.key, data, delimiter, numeric, batch)


class ParquetReader(_LongFormatReader):
    name = "parquet"
    patterns = ("*.parquet", "*.pq")

    def load(self, item: Input, mapping: dict, batch: Batch) -> pa.Table | None:
        import fsspec

        with fsspec.open(item.url, "rb") as handle:
            table = pq.read_table(handle)
        if table.num_rows == 0:
            batch.quarantine.append((item.key, "empty", "no rows"))
            return None
        return table


NUMERIC = ("time", "mag", "err", "ra", "dec")


def numeric_columns(table: pa.Table, mapping: dict, key: str, batch: Batch) -> pa.Table | None:
    """The mapped numeric columns as float64. A text column (a Parquet file's strings) is read value by
    value: a row with text that is not a number is dropped and named (its row, column and text), as the CSV
    reader does. A column of another kind (lists, dates) quarantines the file as ``wrong_type``."""
    keep = np.ones(table.num_rows, dtype=bool)
    bad: list[str] = []
    nulls = set(pacsv.ConvertOptions().null_values)
    for field_name in NUMERIC:
        name = mapping.get(field_name)
        if name not in table.column_names:
            continue
        column = table.column(name)
        kind = column.type
        if pa.types.is_floating(kind) or pa.types.is_integer(kind) or pa.types.is_decimal(kind) \
                or pa.types.is_null(kind):
            values = pc.cast(column, pa.float64())
        elif pa.types.is_string(kind) or pa.types.is_large_string(kind):
            try:
                values = pc.cast(column, pa.float64())
            except pa.ArrowInvalid:
                parsed = []
                for row, text in enumerate(column.to_pylist()):
                    if text is None or text.strip() in nulls:
                        parsed.append(float("nan"))
                        continue
                    try:
                        parsed.append(float(text))
                    except ValueError:
                        parsed.append(float("nan"))
                        if keep[row]:
                            keep[row] = False
                            bad.append(f"{row + 1} ({name}: {text[:20]!r})")
                values = pa.array(parsed, type=pa.float64())
        else:
            batch.quarantine.append((key, "wrong_type", f"column {name} ({field_name}) holds {kind}, not numbers"))
            return None
        table = table.set_column(table.column_names.index(name), name, values)
    if bad:
        shown = ", ".join(bad[:10]) + (" ..." if len(bad) > 10 else "")
        batch.quarantine.append((key, "non_numeric", f"{len(bad)} row(s) dropped: row {shown}"))
        table = table.filter(pa.array(keep))
    return table


def _rows_by_hand(key: str, data: bytes, delimiter: str, numeric: dict, batch: Batch) -> pa.Table | None:
    """Slow path for a malformed CSV: keep the good rows, name every bad one (its line, and for a value
    that is not a number its column and text). Empty fields and the null spellings pyarrow's reader knows
    become NaN here as there, so a row's fate does not depend on the other rows of its file."""
    nulls = set(pacsv.ConvertOptions().null_values)
    lines = data.split(b"\n")
    if b"\x00" in data[:65536]:
        batch.quarantine.append((key, "unreadable", "binary data, not text (a NUL byte in its first 64 kB)"))
        return None
    header = next(csv.reader([lines[0].decode("utf-8", "replace")], delimiter=delimiter))
    columns = {name: [] for name in header}
    problems: dict[str, list[str]] = {}
    for number, raw in enumerate(lines[1:], start=2):
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            problems.setdefault("non_utf8", []).append(f"{number}")
            continue
        row = next(csv.reader([line.rstrip("\r")], delimiter=delimiter))
        if len(row) != len(header):
            problems.setdefault("wrong_column_count", []).append(f"{number} ({len(row)} fields, not {len(header)})")
            continue
        values, bad = [], None
        for name, text in zip(header, row):
            if name not in numeric:
                values.append(text)
            elif text.strip() in nulls:
                values.append(float("nan"))
            else:
                try:
                    values.append(float(text))
                except ValueError:
                    bad = f"{number} ({name}: {text[:20]!r})"
                    break
        if bad:
            problems.setdefault("non_numeric", []).append(bad)
            continue
        for name, v in zip(header, values):
            columns[name].append(v)
    for reason, lines_of in problems.items():
        shown = ", ".join(lines_of[:10]) + (" ..." if len(lines_of) > 10 else "")
        batch.quarantine.append((key, reason, f"{len(lines_of)} row(s) dropped: line {shown}"))
    if not any(columns.values()):
        batch.quarantine.append((key, "empty", "no parseable row"))
        return None
    return pa.table({name: pa.array(values, type=numeric.get(name, pa.string())) for name, values in columns.items()})


def add_long_table(batch: Batch, table: pa.Table, mapping: dict, item: Input, *, default_band: str,
                   time_offset: float = 0.0) -> None:
    """Group a long table into curves by (object, band), keeping the file's row order in each."""
    n = table.num_rows

    def floats(name):
        col = table.column(mapping[name])
        if not pa.types.is_floating(col.type) and not pa.types.is_integer(col.type):
            col = pc.cast(col, pa.float64(), safe=False)
        return col.to_numpy(zero_copy_only=False).astype(np.float64)

    objects = np.asarray(pc.cast(table.column(mapping["object"]), pa.string()).to_pylist(), dtype=object)
    if "band" in mapping and mapping["band"] in table.column_names:
        bands = np.asarray(pc.cast(table.column(mapping["band"]), pa.string()).to_pylist(), dtype=object)
    else:
        bands = np.full(n, default_band, dtype=object)
    time, mag, err = floats("time") + time_offset, floats("mag"), floats("err")
    ra = floats("ra") if "ra" in mapping and mapping["ra"] in table.column_names else None
    dec = floats("dec") if "dec" in mapping and mapping["dec"] in table.column_names else None
    keys = np.char.add(np.asarray([str(o) for o in objects]).astype(str), "\x00")
    keys = np.char.add(keys, np.asarray([str(b) for b in bands]).astype(str))
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    ends = np.r_[starts[1:], n]
    for lo, hi in zip(starts, ends):
        rows = order[lo:hi]
        first = rows[0]
        obj, band = objects[first], bands[first]
        batch.add_curve(None if obj is None else str(obj), "unknown" if band is None else str(band),
                        time[rows], mag[rows], err[rows], source_file=item.key,
                        ra=None if ra is None or not np.isfinite(ra[first]) else float(ra[first]),
                        dec=None if dec is None or not np.isfinite(dec[first]) else float(dec[first]))
