"""MACHO: one ``lc_<field>.<tile>.<seq>.tar.bz2`` per object holding ``lc_<id>.<band>.mjd`` files.

Each ``.mjd`` file has ``#`` header lines (field, tile, seq, RA in hours, Dec in degrees, filter,
mean/median magnitude and colour) and then ``MJD Mag Err`` rows separated by single spaces.
Instrumental magnitudes are negative (about -6 to -10). Inputs may also be plain tar files holding
many objects (how a whole survey is packed) or loose ``.mjd`` files (optionally compressed).
"""
from __future__ import annotations

import re

from astromer.surveys.base import (
    ArchiveError,
    Batch,
    Input,
    Plan,
    add_parsed,
    is_archive,
    iter_members,
    list_files,
    parse_bodies,
    read_bytes,
    split_header,
)

_NAME = re.compile(r"^lc_(?P<object>.+)\.(?P<band>[^.]+)\.mjd$")


class MachoReader:
    name = "macho"
    patterns = ("*.tar", "*.tar.gz", "*.tgz", "*.tar.bz2", "*.tbz2", "*.tar.xz", "*.mjd", "*.mjd.gz",
                "*.mjd.bz2")

    def plan(self, source: str, options: dict) -> Plan:
        fs, infos = list_files(source, self.patterns)
        inputs = [Input(key=i["key"], url=i["url"], size=i.get("size") or 0)
                  for i in infos]
        return Plan(inputs=inputs)

    def read(self, item: Input, context: dict) -> Batch:
        batch = Batch()
        if is_archive(item.url):
            members = [(f"{item.key}::{name}", name, data) for name, data in iter_members(item.url)
                       if name.lower().endswith(".mjd")]
        else:
            members = [(item.key, item.key, read_bytes(item.url))]
        parse_members(members, batch)
        return batch


def parse_members(members: list[tuple[str, str, bytes]], batch: Batch) -> None:
    """Parse ``(source_file, member_name, bytes)`` MACHO text files into ``batch`` (one block)."""
    bodies, names, first_lines = [], [], []
    object_ids, bands, ras, decs = [], [], [], []
    for source_file, name, data in members:
        header, body = split_header(data)
        object_id, band, ra, dec = _identify(name.rsplit("/", 1)[-1], header, source_file, batch)
        bodies.append(body)
        first_lines.append(len(header) + 1)
        names.append(source_file)
        object_ids.append(object_id)
        bands.append(band)
        ras.append(ra)
        decs.append(dec)
    columns, lengths = parse_bodies(bodies, names, 3, delimiter=b" ", quarantine=batch.quarantine,
                                    first_lines=first_lines)
    add_parsed(batch, object_ids, bands, columns, lengths, names, ras, decs)


def _identify(filename: str, header: list[bytes], source_file: str, batch: Batch):
    """Object id and band from the file name, RA/Dec (degrees) from the header when readable."""
    for suffix in (".gz", ".bz2"):
        if filename.endswith(suffix):
            filename = filename[: -len(suffix)]
    match = _NAME.match(filename)
    object_id, band = (match["object"], match["band"]) if match else (filename.rsplit(".", 1)[0], "unknown")
    ra = dec = None
    values = header[1].lstrip(b"#").split() if len(header) >= 2 else []
    try:
        field_, tile, seq, ra_hours, dec_deg, filt = (v.decode("ascii") for v in values[:6])
        ra, dec = float(ra_hours) * 15.0, float(dec_deg)
        if not match:
            object_id, band = f"{field_}.{tile}.{seq}", filt
    except (ValueError, UnicodeDecodeError):
        if header:
            batch.quarantine.append((source_file, "bad_header", repr(b"\n".join(header)[:200])))
    return object_id, band, ra, dec


__all__ = ["MachoReader", "parse_members", "ArchiveError"]
