"""SDSS Stripe 82 RR Lyrae (Sesar et al. 2010): ``rrlyrae_light_curves.tar.gz`` holding
``light-curves/<Num>.csv`` with header ``time,mag,magerr,band`` (MJD; u g r i z interleaved), and
``periods.csv`` (``Num,Type,Per``) beside it: the ``rrlyrae_type`` labels (ab or c).
One curve per (object, band), in time order within each band.
"""
from __future__ import annotations

import csv
import io

import numpy as np

from astromer.surveys.base import (
    Batch,
    Input,
    Plan,
    basename,
    input_members,
    plan_inputs,
    read_csv_columns,
)

LABEL_SET = "rrlyrae_type"
COLUMNS = ("time", "mag", "magerr", "band")


def parse_periods(text: str) -> dict[str, str]:
    return {row["Num"].strip(): row["Type"].strip() for row in csv.DictReader(io.StringIO(text))
            if row.get("Num") and row.get("Type")}


class Stripe82Reader:
    name = "sdss-stripe82"
    patterns = ("*.tar", "*.tar.gz", "*.tgz", "*.tar.bz2", "*.tar.xz")

    def plan(self, source: str, options: dict) -> Plan:
        inputs, types = plan_inputs(source, self.patterns, ("periods.csv",), parse_periods)
        return Plan(inputs=inputs, context={"types": types}, label_sets=(LABEL_SET,))

    def read(self, item: Input, context: dict) -> Batch:
        batch = Batch()
        members = input_members(item, ".csv")
        types = context.get("types", {})
        for source_file, name, data in members:
            object_id = basename(name).rsplit(".csv", 1)[0]
            if parse_member(source_file, object_id, data, batch) and object_id in types:
                batch.labels.append((object_id, LABEL_SET, types[object_id]))
        return batch


def parse_member(source_file: str, object_id: str, data: bytes, batch: Batch) -> bool:
    """One interleaved-band CSV -> one curve per band. Returns whether any curve was added."""
    if not data.strip():
        batch.quarantine.append((source_file, "empty", "no header and no rows"))
        return False
    try:
        table = read_csv_columns(data, list(COLUMNS), header=True,
                                 types={"time": "float64", "mag": "float64", "magerr": "float64",
                                        "band": "string"})
        missing = [c for c in COLUMNS if c not in table.column_names]
        if missing:
            batch.quarantine.append((source_file, "missing_column", ", ".join(missing)))
            return False
        time = table.column("time").to_numpy(zero_copy_only=False)
        mag = table.column("mag").to_numpy(zero_copy_only=False)
        err = table.column("magerr").to_numpy(zero_copy_only=False)
        band = np.asarray(table.column("band").to_pylist(), dtype=object)
    except Exception:
        time, mag, err, band = _parse_rows(source_file, data, batch)
    added = False
    if len(band) == 0:
        batch.quarantine.append((source_file, "empty", "no parseable row"))
        return False
    for b in sorted(set(band.tolist()), key=lambda x: "zz" if x is None else str(x)):
        sel = band == b
        added |= batch.add_curve(object_id, str(b), time[sel], mag[sel], err[sel], source_file=source_file)
    return added


def _parse_rows(source_file, data, batch):
    """Slow row-by-row path that names every bad row."""
    rows, problems = [], {}
    for number, raw in enumerate(data.split(b"\n")[1:], start=2):
        line = raw.strip()
        if not line:
            continue
        try:
            fields = line.decode("utf-8").split(",")
        except UnicodeDecodeError:
            problems.setdefault("non_utf8", []).append(number)
            continue
        if len(fields) != 4:
            problems.setdefault("wrong_column_count", []).append(number)
            continue
        try:
            rows.append((float(fields[0]), float(fields[1]), float(fields[2]), fields[3].strip()))
        except ValueError:
            problems.setdefault("non_numeric", []).append(number)
    for reason, lines in problems.items():
        batch.quarantine.append((source_file, reason, f"{len(lines)} row(s) dropped: lines {lines[:10]}"))
    if not rows:
        return np.zeros(0), np.zeros(0), np.zeros(0), np.asarray([], dtype=object)
    t, m, e, b = zip(*rows)
    return np.asarray(t), np.asarray(m), np.asarray(e), np.asarray(b, dtype=object)
