"""MACHO: one ``lc_<field>.<tile>.<seq>.tar.bz2`` per object holding ``lc_<id>.<band>.mjd`` files.

Each ``.mjd`` file has ``#`` header lines (field, tile, seq, RA in hours, Dec in degrees, filter,
mean/median magnitude and colour) and then ``MJD Mag Err`` rows separated by single spaces.
Instrumental magnitudes are negative (about -6 to -10). Inputs may also be plain tar files holding
many objects (how a whole survey is packed) or loose ``.mjd`` files (optionally compressed).

A survey packed in archives holds hundreds of thousands of small files, so the reader works on all
members of an archive at once: the tar index, the header lines, the names and the numeric rows are
each handled by one vectorised pass (see :class:`astromer.surveys.base.HeadedMembers`); the
member-by-member path remains for whatever the fast one does not accept.
"""
from __future__ import annotations

import io
import re

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from astromer.surveys.base import (
    ArchiveError,
    Batch,
    Input,
    Members,
    Plan,
    add_parsed,
    band_order,
    input_member_block,
    list_files,
    one_per_line,
    single_spaced,
    split_headed,
)


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
        members, keys = input_member_block(item, ".mjd")
        parse_members(members, keys, batch)
        return batch


def parse_members(members: Members, keys: list[str], batch: Batch) -> None:
    """Parse MACHO text files (``keys`` name them in provenance and quarantine rows) into ``batch``."""
    headed = split_headed(members)
    object_ids, bands, ras, decs = _identify_all(members, headed, keys, batch)
    order = band_order(bands)      # parse grouped by band: the order of the shard's rows
    columns, lengths = headed.parse(keys, 3, delimiter=b" ", quarantine=batch.quarantine, order=order)
    if order is not None:
        pick = order.tolist()          # once, not once per list
        object_ids, bands, ras, decs, keys = ([values[i] for i in pick]
                                              for values in (object_ids, bands, ras, decs, keys))
    add_parsed(batch, object_ids, bands, columns, lengths, keys, ras, decs)


def _identify_all(members, headed, keys, batch):
    """Object ids and bands from the member names, RA/Dec (degrees) from the second header line,
    vectorised; members the fast path cannot read go through :func:`_identify` one by one."""
    n = len(members)
    split = _objects_and_bands(members.names) if n else []
    ok_name = np.array([pair is not None for pair in split], dtype=bool)
    objects = [pair[0] if pair else None for pair in split]
    band_names = [pair[1] if pair else None for pair in split]
    numbers = headed.header_numbers(1, [3, 4], skip=1) if n and ok_name.all() else None
    if numbers is not None and len(numbers[0]) == n:
        # the regular case read in place: every member named by the rule and headed by regular lines
        ra_hours, dec_deg = numbers[1]
        return objects, band_names, (ra_hours * 15.0).tolist(), dec_deg.tolist()
    object_ids, bands = [None] * n, [None] * n
    ras, decs = [None] * n, [None] * n
    slow = np.ones(n, dtype=bool)
    index, text = headed.header_text(1, skip=1)
    fields = _header_fields(text, len(index))
    if fields is not None and n:
        ra_deg = (fields.column("ra").to_numpy() * 15.0).tolist()
        dec_deg = fields.column("dec").to_numpy().tolist()
        if len(index) == n and ok_name.all():       # the regular case: every member named and headed
            return objects, band_names, ra_deg, dec_deg
        # the names that break the rule take their id and band from the header (Python strings only here)
        field_, tile, seq, filt = (fields.column(c).to_pylist() for c in ("field", "tile", "seq", "filter"))
        for j, i in enumerate(index.tolist()):
            if ok_name[i]:
                object_ids[i], bands[i] = objects[i], band_names[i]
            else:
                object_ids[i], bands[i] = f"{field_[j]}.{tile[j]}.{seq[j]}", filt[j]
            ras[i], decs[i] = ra_deg[j], dec_deg[j]
            slow[i] = False
    for i in np.flatnonzero(slow).tolist():
        object_ids[i], bands[i], ras[i], decs[i] = _identify(members.names[i],
                                                             headed.header_of(i), keys[i], batch)
    return object_ids, bands, ras, decs


#: :func:`_object_and_band` of :func:`_uncompressed_basename`, for one name per line (the folders go
#: one at a time: a single ``[^\n]*/`` runs to the line's end and backtracks, twice as slow)
_NAME_LINE = re.compile(r"^(?:[^\n/]*/)*lc_([^/\n]+)\.([^./\n]+)\.mjd(?:\.gz|\.bz2)?$", re.MULTILINE)
#: the same for names without folders or a compression suffix (a survey's archive), which need no
#: alternatives: 1.4 against 2.3 ms for 4,000 names
_FLAT_NAME_LINE = re.compile(r"^lc_(.+)\.([^.\n]+)\.mjd$", re.MULTILINE)


def _objects_and_bands(names: list[str]) -> list[tuple[str, str] | None]:
    """``(object, band)`` of every member name (None where the name does not follow the rule): one
    regular-expression pass over the names joined by newlines when every one of them matches (the
    archive of a survey), else name by name."""
    text = one_per_line(names)
    if text is not None:
        flat = "/" not in text and ".gz" not in text and ".bz2" not in text
        found = (_FLAT_NAME_LINE if flat else _NAME_LINE).findall(text)
        if len(found) == len(names):
            return found
    return [_object_and_band(_uncompressed_basename(name)) for name in names]


def _uncompressed_basename(name: str) -> str:
    """A member's file name without its folders and a ``.gz``/``.bz2`` suffix."""
    base = name.rsplit("/", 1)[-1]
    for suffix in (".gz", ".bz2"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    return base


def _object_and_band(filename: str) -> tuple[str, str] | None:
    """``(object, band)`` of a file named ``lc_<object>.<band>.mjd`` (see
    :func:`_uncompressed_basename`), else None. String methods: a regular expression name by name
    costs several times more (over all names at once it is faster: :func:`_objects_and_bands`)."""
    if not (filename.startswith("lc_") and filename.endswith(".mjd")):
        return None
    obj, dot, band = filename[3:-4].rpartition(".")
    return (obj, band) if dot and obj and band else None


#: below this many header lines :func:`_identify` member by member is cheaper than one pyarrow parse
SMALL_HEADER_LINES = 32


def _header_fields(text: bytes, n_lines: int) -> pa.Table | None:
    """A table of the ``field, tile, seq, ra, dec, filter`` columns (RA in hours, Dec in degrees) of the
    ``n_lines`` second header lines in ``text`` (their ``#`` removed, one per line) when written the
    regular way (single-space separated values), or None to read them one by one. A few lines (an archive of one object, as MACHO ships
    them) are read one by one too: pyarrow's CSV reader costs about 1.2 ms a call, whatever the length."""
    if not n_lines or n_lines < SMALL_HEADER_LINES:
        return None
    if not single_spaced(text):
        return None
    names = ["field", "tile", "seq", "ra", "dec", "filter"]
    try:
        table = pacsv.read_csv(
            io.BytesIO(text),
            read_options=pacsv.ReadOptions(autogenerate_column_names=True),
            parse_options=pacsv.ParseOptions(delimiter=" "),
            convert_options=pacsv.ConvertOptions(
                include_columns=[f"f{i}" for i in range(6)],
                column_types={"f0": pa.string(), "f1": pa.string(), "f2": pa.string(), "f3": pa.float64(),
                              "f4": pa.float64(), "f5": pa.string()}))
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowKeyError, UnicodeDecodeError, KeyError):
        return None
    if table.num_rows != n_lines or any(table.column(i).null_count for i in range(6)):
        return None
    # a table, not lists: the regular case needs only RA and Dec, and four columns of Python strings cost
    # about 1.2 ms per archive of 4,000 members
    return table.rename_columns(names)


def _identify(name: str, header: list[bytes], source_file: str, batch: Batch):
    """Object id and band from the file name, RA/Dec (degrees) from the header when readable."""
    filename = _uncompressed_basename(name)
    match = _object_and_band(filename)
    object_id, band = match if match else (filename.rsplit(".", 1)[0], "unknown")
    ra = dec = None
    values = header[1].lstrip(b"#").split() if len(header) >= 2 else []
    try:
        field_, tile, seq, ra_hours, dec_deg, filt = (v.decode("ascii") for v in values[:6])
        ra, dec = float(ra_hours) * 15.0, float(dec_deg)
        if not match:
            object_id, band = f"{field_}.{tile}.{seq}", filt
    except (ValueError, UnicodeDecodeError):
        if header:
            text = b"\n".join(header)[:200].decode("utf-8", "replace")   # readable in the report, not a bytes repr
            batch.quarantine.append((source_file, "bad_header", f"header lines: {text!r}"))
    return object_id, band, ra, dec


__all__ = ["MachoReader", "parse_members", "ArchiveError"]
