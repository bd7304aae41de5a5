"""ASAS (Richards et al. 2012 training set): ``asas_training_set.tar.gz`` holding
``asas_training_set/<id>.dat`` header-less CSV ``t,mag,err`` (t = HJD-2450000, V band), and
``asas_training_set_classes.dat`` (``filename,class``) beside it: the ``class`` labels.
"""
from __future__ import annotations

import csv
import io

from astromer.surveys.base import (
    HJD2450000_TO_MJD,
    Batch,
    Input,
    Plan,
    add_labels,
    add_parsed,
    basename,
    parse_time_mag_err_members,
    plan_inputs,
)

LABEL_SET = "class"


def parse_classes(text: str) -> dict[str, str]:
    rows = csv.reader(io.StringIO(text))
    out = {}
    for row in rows:
        if len(row) >= 2 and row[0] != "filename":
            out[row[0].strip()] = row[1].strip()
    return out


class AsasReader:
    name = "asas"
    patterns = ("*.tar", "*.tar.gz", "*.tgz", "*.tar.bz2", "*.tar.xz")

    def plan(self, source: str, options: dict) -> Plan:
        inputs, classes = plan_inputs(source, self.patterns, ("*classes*",), parse_classes)
        return Plan(inputs=inputs, context={"classes": classes}, label_sets=(LABEL_SET,))

    def read(self, item: Input, context: dict) -> Batch:
        batch, members, columns, lengths = parse_time_mag_err_members(item, b",")
        object_ids = [basename(name).rsplit(".dat", 1)[0] for _, name, _ in members]
        accepted = add_parsed(batch, object_ids, ["V"] * len(members), columns, lengths, [m[0] for m in members],
                              time_offset=HJD2450000_TO_MJD)
        add_labels(batch, object_ids, accepted, LABEL_SET, context.get("classes", {}).get)
        return batch
