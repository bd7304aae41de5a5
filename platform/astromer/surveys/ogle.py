"""OGLE-IV (OCVS): ``phot_I.tar.gz`` holding ``I/<ID>.dat`` files of whitespace-separated
``HJD-2450000 mag err`` rows, and ``ident.dat`` (id, pulsation mode(s), RA, Dec, field ids) beside it.

The band is the folder name inside the archive (``I`` or ``V``). RA/Dec and the ``mode`` label come
from ``ident.dat``; an object missing from it keeps null coordinates and no label.
"""
from __future__ import annotations

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

LABEL_SET = "mode"


def parse_ident(text: str) -> dict[str, tuple[str, float, float]]:
    """``ident.dat`` -> {id: (mode, ra_deg, dec_deg)}."""
    out = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        try:
            h, m, s = (float(x) for x in fields[2].split(":"))
            sign = -1.0 if fields[3].startswith("-") else 1.0
            d, am, asec = (float(x) for x in fields[3].lstrip("+-").split(":"))
        except ValueError:
            continue
        out[fields[0]] = (fields[1], 15.0 * (h + m / 60 + s / 3600), sign * (d + am / 60 + asec / 3600))
    return out


class OgleReader:
    name = "ogle"
    patterns = ("*.tar", "*.tar.gz", "*.tgz", "*.tar.bz2", "*.tar.xz", "ogle-*.dat", "ogle-*.dat.gz")

    def plan(self, source: str, options: dict) -> Plan:
        inputs, ident = plan_inputs(source, self.patterns, ("ident.dat",), parse_ident)
        return Plan(inputs=inputs, context={"ident": ident}, label_sets=(LABEL_SET,))

    def read(self, item: Input, context: dict) -> Batch:
        batch, members, columns, lengths = parse_time_mag_err_members(item, b" ")
        ident = context.get("ident", {})
        object_ids, bands, ras, decs = [], [], [], []
        for _, name, _ in members:
            object_id = basename(name).split(".dat")[0]
            parts = name.replace("\\", "/").split("/")
            object_ids.append(object_id)
            bands.append(parts[-2] if len(parts) >= 2 and parts[-2] in ("I", "V") else "I")
            _, ra, dec = ident.get(object_id, (None, None, None))
            ras.append(ra)
            decs.append(dec)
        accepted = add_parsed(batch, object_ids, bands, columns, lengths, [m[0] for m in members], ras, decs,
                              time_offset=HJD2450000_TO_MJD)
        add_labels(batch, object_ids, accepted, LABEL_SET, lambda object_id: ident.get(object_id, (None,))[0])
        return batch
