"""What every survey reader shares: the unit of work, the accumulator of parsed curves, the fast
numeric text parser and the conversion to an Arrow table of the ``lightcurves`` schema.

A reader is a small class with two methods:

- ``plan(source, options) -> Plan``: list the inputs (one map task each) and read the small
  side files that belong to the whole source (OGLE's ``ident.dat``, ASAS's classes, Stripe 82's
  periods) into ``Plan.context``;
- ``read(item, context) -> Batch``: parse one input into curves, labels and quarantine rows.

Readers never raise on bad data: a bad row, curve or file becomes a quarantine row with one of the
named reasons of :data:`astromer.lake.schema.QUARANTINE_REASONS`.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import tarfile
import warnings
import zlib
from dataclasses import dataclass, field

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from astromer.kernels import compiled_kernels
from astromer.lake import schema
from astromer.lake.paths import (
    BAND_RULE,
    OBJECT_RULE,
    is_valid_band,
    is_valid_object_id,
    valid_objects_and_bands,
)

#: HJD-2450000 (OGLE, ASAS) onto the MJD scale
HJD2450000_TO_MJD = 49999.5


@dataclass
class Input:
    """One map task: a file (or archive) of a source, or one partition of the simulator."""

    key: str                  # stable, human-readable, unique within the plan (used in markers)
    url: str                  # fsspec URL (or a synthetic:// spec)
    size: int = 0
    options: dict = field(default_factory=dict)


@dataclass
class Plan:
    inputs: list[Input]
    context: dict = field(default_factory=dict)   # small side data shared by all map tasks
    label_sets: tuple[str, ...] = ()


@dataclass
class Batch:
    """Curves parsed from one input, concatenated (curve ``i`` is ``offsets[i]:offsets[i+1]``)."""

    object_id: list = field(default_factory=list)
    band: list = field(default_factory=list)
    ra: list = field(default_factory=list)
    dec: list = field(default_factory=list)
    source_file: list = field(default_factory=list)
    lengths: list = field(default_factory=list)
    mjd: list = field(default_factory=list)      # list of float64 arrays
    mag: list = field(default_factory=list)
    err: list = field(default_factory=list)
    labels: list = field(default_factory=list)   # (object_id, label_set, label)
    quarantine: list = field(default_factory=list)  # (input, reason, detail)

    def add_curve(self, object_id, band, mjd, mag, err, *, source_file, ra=None, dec=None) -> bool:
        """Add one curve after validating its names; returns False (and quarantines) if rejected."""
        if not is_valid_object_id(object_id):
            self.quarantine.append((source_file, "invalid_object_id", f"{repr(object_id)[:200]}: {OBJECT_RULE}"))
            return False
        if not is_valid_band(band):
            self.quarantine.append((source_file, "invalid_band", f"{repr(band)[:200]}: {BAND_RULE}"))
            return False
        if len(mjd) == 0:
            self.quarantine.append((source_file, "empty", f"{object_id} band {band}: no observation"))
            return False
        self.object_id.append(object_id)
        self.band.append(band)
        self.ra.append(ra)
        self.dec.append(dec)
        self.source_file.append(source_file)
        self.lengths.append(len(mjd))
        # copies: the batch owns its arrays, which to_table may sort in place
        self.mjd.append(np.array(mjd, dtype=np.float64))
        self.mag.append(np.array(mag, dtype=np.float64))
        self.err.append(np.array(err, dtype=np.float64))
        return True

    def add_block(self, object_ids, bands, lengths, mjd, mag, err, *, source_files, ras=None, decs=None):
        """Add many already-validated curves whose observations are concatenated (fast path). The batch
        takes the arrays over (to_table may sort them in place): pass arrays no one else holds."""
        n = len(object_ids)
        self.object_id.extend(object_ids)
        self.band.extend(bands)
        self.ra.extend(ras if ras is not None else [None] * n)
        self.dec.extend(decs if decs is not None else [None] * n)
        self.source_file.extend(source_files)
        self.lengths.extend(lengths)
        self.mjd.append(np.asarray(mjd, dtype=np.float64))
        self.mag.append(np.asarray(mag, dtype=np.float64))
        self.err.append(np.asarray(err, dtype=np.float64))

    @property
    def n_curves(self) -> int:
        return len(self.object_id)

    def to_table(self, *, source_sha256: str, ingest_id: str) -> pa.Table:
        """The shard table (``schema.SHARD``): curves grouped by band (input order inside a band, so
        that a band is a zero-copy slice), observations sorted by time, with quality flags."""
        lengths = np.asarray(self.lengths, dtype=np.int64)
        mjd, mag, err = _concat(self.mjd), _concat(self.mag), _concat(self.err)
        order = band_order(self.band)          # None: one band, or a reader grouped them already
        if order is not None:
            starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])[order]
            lengths = lengths[order]
            new_starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
            rows = np.repeat(starts - new_starts, lengths) + np.arange(int(lengths.sum()))
            mjd, mag, err = mjd[rows], mag[rows], err[rows]
            pick = order.tolist()
            for name in ("object_id", "band", "ra", "dec", "source_file"):
                values = getattr(self, name)
                setattr(self, name, [values[i] for i in pick])
            self.lengths = lengths.tolist()
            self.mjd, self.mag, self.err = [mjd], [mag], [err]
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        mjd, mag, err, flags = schema.quality_flags(mjd, mag, err, offsets)

        def lists(values, typ):
            return schema.observation_lists(offsets, values, typ)

        n = len(lengths)
        return pa.table({
            "object_id": pa.array(self.object_id, type=pa.string()),
            "ra": pa.array(self.ra, type=pa.float64()),
            "dec": pa.array(self.dec, type=pa.float64()),
            "mjd": lists(mjd, pa.float64()),
            "mag": lists(mag.astype(np.float32), pa.float32()),
            "err": lists(err.astype(np.float32), pa.float32()),
            "n_obs": pa.array(lengths.astype(np.int32), type=pa.int32()),
            "quality": lists(flags, pa.uint8()),
            "source_file": pa.array(self.source_file, type=pa.string()),
            "source_sha256": pa.repeat(pa.scalar(source_sha256, pa.string()), n),   # no list of n references
            "ingest_id": pa.repeat(pa.scalar(ingest_id, pa.string()), n),
            "band": pa.array(self.band, type=pa.string()),
        }, schema=schema.SHARD)


def band_order(bands: list) -> np.ndarray | None:
    """Indices that group ``bands`` by name (sorted, stable), or None when they are grouped already (or
    hold something other than names, which the name checks reject later)."""
    names = set(bands)
    if len(names) < 2 or not all(isinstance(b, str) for b in names):
        return None
    # a dict lookup per curve: half the time of numpy's searchsorted over object arrays
    code = {name: k for k, name in enumerate(sorted(names))}
    codes = np.fromiter(map(code.__getitem__, bands), dtype=np.int64, count=len(bands))
    if (np.diff(codes) >= 0).all():
        return None
    return np.argsort(codes, kind="stable")


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    """One float64 array of the batch's parts. A single part (a reader's block: one parse of a whole archive)
    is the array itself: the batch owns it, and copying an archive's three columns costs about 1.4 ms."""
    if len(parts) == 1 and parts[0].dtype == np.float64 and parts[0].flags.c_contiguous and parts[0].flags.writeable:
        return parts[0]
    return np.concatenate(parts).astype(np.float64, copy=False) if parts else np.zeros(0)


# ---------------------------------------------------------------------------------------------------
# numeric text


_HEADER = {}


def split_header(data: bytes, comment: bytes = b"#") -> tuple[list[bytes], bytes]:
    """Leading comment lines and the body after them (one regex match, no per-line Python loop)."""
    if not data.startswith(comment):
        return [], data
    pattern = _HEADER.get(comment)
    if pattern is None:
        pattern = _HEADER[comment] = re.compile(re.escape(comment) + rb"[^\n]*(?:\n|$)")
    pos = 0
    header = []
    match = pattern.match(data, pos)
    while match:
        header.append(match.group().rstrip(b"\r\n"))
        pos = match.end()
        if pos >= len(data):
            break
        match = pattern.match(data, pos)
    return header, data[pos:]


def parse_numeric(body: bytes, ncols: int, *, delimiter: bytes | None = None, name: str = "",
                  quarantine: list | None = None, first_line: int = 1) -> np.ndarray:
    """Parse a block of numeric rows into a float64 array ``[n, ncols]``.

    The fast path parses the whole buffer at once (numpy's C parser) and checks that every line
    gave exactly ``ncols`` values. Otherwise the rows are parsed one by one: bad rows are dropped
    and reported in ``quarantine`` as ``(name, reason, "line N: ...")`` (N counts from
    ``first_line``, the file line of the body's first row), good rows are kept.
    """
    text = body if delimiter in (None, b" ") else body.replace(delimiter, b" ")
    n_lines = text.count(b"\n") + (1 if text and not text.endswith(b"\n") else 0)
    if n_lines and b"\n\n" not in text and b"#" not in text and not text.startswith(b"\n"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                values = np.fromstring(text, dtype=np.float64, sep=" ")
            if values.size == n_lines * ncols:
                # a line with one value too many and another one short would still add up:
                # count fields per line cheaply through the separators
                if _fields_per_line_ok(text, n_lines, ncols):
                    return values.reshape(n_lines, ncols)
        except (ValueError, DeprecationWarning):
            pass
    return _parse_rows(body, ncols, delimiter, name, quarantine, first_line)


def single_spaced(text: bytes) -> bool:
    """Whether every line of ``text`` separates its fields by exactly one space (no tabs, CR, leading,
    trailing or doubled spaces): what the fast whole-buffer parsers assume."""
    return not (b"  " in text or b"\t" in text or b"\r" in text or text.startswith(b" ") or b"\n " in text
                or b" \n" in text)


def _fields_per_line_ok(text: bytes, n_lines: int, ncols: int) -> bool:
    if not single_spaced(text):
        return False  # irregular whitespace: let the row parser decide
    raw = np.frombuffer(text, dtype=np.uint8)
    spaces = np.cumsum(raw == 32)
    ends = np.flatnonzero(raw == 10)
    if len(ends) < n_lines:                      # last line without a newline
        ends = np.append(ends, len(raw) - 1)
    per_line = np.diff(np.concatenate([[0], spaces[ends]]))
    return bool(np.all(per_line == ncols - 1))


def _parse_rows(body: bytes, ncols: int, delimiter: bytes | None, name: str, quarantine: list | None,
                first_line: int = 1):
    rows = []
    problems: dict[str, list[str]] = {}
    for number, raw in enumerate(body.split(b"\n"), start=first_line):
        line = raw.strip()
        if not line or line.startswith(b"#"):
            continue
        try:
            line.decode("utf-8")
        except UnicodeDecodeError:
            problems.setdefault("non_utf8", []).append(f"line {number}: {raw[:60]!r}")
            continue
        fields = line.split(delimiter) if delimiter not in (None, b" ") else line.split()
        if len(fields) != ncols:
            problems.setdefault("wrong_column_count", []).append(
                f"line {number}: {len(fields)} fields, expected {ncols}: {raw[:60]!r}")
            continue
        try:
            rows.append([float(f) for f in fields])
        except ValueError:
            problems.setdefault("non_numeric", []).append(f"line {number}: {raw[:60]!r}")
    if quarantine is not None:
        for reason, lines in problems.items():
            shown = "; ".join(lines[:5]) + (f"; ... {len(lines) - 5} more" if len(lines) > 5 else "")
            quarantine.append((name, reason, f"{len(lines)} row(s) dropped: {shown}"))
    if not rows:
        return np.zeros((0, ncols))
    return np.asarray(rows, dtype=np.float64)


#: pyarrow CSV block size: a block is the unit its threads share out
CSV_BLOCK_BYTES = 1 << 24


def read_csv_columns(data: bytes, column_names: list[str], *, delimiter: str = ",",
                     header: bool = False, types: dict | None = None) -> pa.Table:
    """pyarrow's CSV parser over a whole buffer (raises on any malformed row).

    pyarrow parses a block per thread; a buffer of one block gains nothing from its thread pool but
    the handoffs (and a map task already runs beside others), so only larger buffers use threads."""
    read = pacsv.ReadOptions(column_names=None if header else column_names,
                             autogenerate_column_names=False, use_threads=len(data) > CSV_BLOCK_BYTES,
                             block_size=CSV_BLOCK_BYTES)
    parse = pacsv.ParseOptions(delimiter=delimiter)
    convert = pacsv.ConvertOptions(column_types=types or {})
    return pacsv.read_csv(io.BytesIO(data), read_options=read, parse_options=parse, convert_options=convert)


# ---------------------------------------------------------------------------------------------------
# files and archives

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")


def is_archive(url: str) -> bool:
    return url.split("::", 1)[0].lower().endswith(ARCHIVE_SUFFIXES)


class ArchiveError(Exception):
    """A truncated or corrupt archive."""


#: archives up to this size are read whole and indexed by :func:`tar_members` (fast); larger ones stream
WHOLE_ARCHIVE_BYTES = 1 << 30


def read_members(url: str, fs=None) -> Members:
    """The regular files of a tar archive (plain or compressed) as :class:`Members`.

    Archives up to :data:`WHOLE_ARCHIVE_BYTES` are decompressed into memory and indexed by
    :func:`tar_members`; larger ones stream through :mod:`tarfile` into one buffer. Raises
    :class:`ArchiveError` on a truncated or corrupt archive.
    """
    opener = fs.open(url, "rb") if fs is not None else fsspec.open(url, "rb").open()
    with opener as handle:
        size = getattr(handle, "size", None)
        if size is not None and size <= WHOLE_ARCHIVE_BYTES:
            with _archive_errors():
                data = _decompress(url.split("::", 1)[0], handle.read())
            return tar_members(data)
        return Members.from_pairs(_stream_members(handle))


@contextlib.contextmanager
def _archive_errors():
    """Decompressor and tar errors as :class:`ArchiveError` (lzma/bz2 raise their own types)."""
    try:
        yield
    except ArchiveError:
        raise
    except (tarfile.TarError, EOFError, zlib.error, OSError, ValueError) as exc:
        raise ArchiveError(f"{type(exc).__name__}: {exc}") from exc
    except Exception as exc:
        if type(exc).__module__ in ("_lzma", "_bz2", "lzma", "bz2", "gzip", "_compression"):
            raise ArchiveError(f"{type(exc).__name__}: {exc}") from exc
        raise


def _stream_members(handle):
    with _archive_errors(), tarfile.open(fileobj=handle, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            extracted = tar.extractfile(member)
            data = extracted.read() if extracted is not None else b""
            if len(data) != member.size:
                raise ArchiveError(f"member {member.name} is truncated")
            yield member.name, data


def _decompress(path: str, raw: bytes) -> bytes:
    lower = path.lower()
    if lower.endswith((".gz", ".tgz")):
        import gzip

        return gzip.decompress(raw)
    if lower.endswith((".bz2", ".tbz2")):
        import bz2

        return bz2.decompress(raw)
    if lower.endswith((".xz", ".txz")):
        import lzma

        return lzma.decompress(raw)
    return raw


def split_tar(data: bytes):
    """Yield ``(name, bytes)`` of the regular files of an uncompressed tar held in memory."""
    yield from tar_members(data).pairs()


@dataclass
class Members:
    """Regular files of an archive as spans of one buffer: member ``i`` is
    ``data[starts[i]:starts[i] + sizes[i]]`` (no copy per member)."""

    data: bytes
    names: list
    starts: np.ndarray
    sizes: np.ndarray

    def __len__(self) -> int:
        return len(self.names)

    def take(self, keep) -> Members:
        keep = np.asarray(keep)
        index = np.flatnonzero(keep) if keep.dtype == bool else keep
        return Members(self.data, [self.names[i] for i in index.tolist()], self.starts[index], self.sizes[index])

    def bytes_of(self, i: int) -> bytes:
        start = int(self.starts[i])
        return self.data[start:start + int(self.sizes[i])]

    def pairs(self):
        """``(name, bytes)`` of every member (one copy each)."""
        for i, name in enumerate(self.names):
            yield name, self.bytes_of(i)

    @classmethod
    def from_pairs(cls, pairs) -> Members:
        names, chunks = [], []
        for name, data in pairs:
            names.append(name)
            chunks.append(data)
        sizes = np.fromiter((len(c) for c in chunks), dtype=np.int64, count=len(chunks))
        starts = np.zeros(len(chunks), dtype=np.int64)
        np.cumsum(sizes[:-1], out=starts[1:])
        return cls(b"".join(chunks), names, starts, sizes)


_USTAR = np.frombuffer(b"ustar", dtype=np.uint8)
_OCTAL11 = 8 ** np.arange(10, -1, -1, dtype=np.int64)
_OCTAL6 = 8 ** np.arange(5, -1, -1, dtype=np.int64)
_REGULAR = (ord("0"), 0, ord("7"))


def tar_members(data: bytes) -> Members:
    """Index the regular files of an uncompressed tar held in memory.

    The 512-byte ustar headers are read for all members at once: by the compiled walk from header to
    header where it is built (``tar_headers``), else with numpy (an archive of a survey holds many
    thousands of small files; a per-member Python loop would cost more than parsing them). Either index
    is accepted only when it is self-consistent: every header carries the ustar magic, a plain octal
    size and a correct checksum, each header's size leads exactly to the next header, and nothing but
    zero blocks follows the last member. Anything else (GNU long names, pax headers, old v7 archives,
    damage) goes through the member-by-member walk, which raises :class:`ArchiveError` on a truncated
    or corrupt archive.
    """
    n_blocks = len(data) // 512
    if n_blocks == 0:
        return _tar_members_walk(data)
    blocks = np.frombuffer(data, dtype=np.uint8, count=n_blocks * 512).reshape(n_blocks, 512)
    found = _tar_headers_compiled(data, n_blocks)
    if found is None:
        found = _tar_headers_numpy(data, blocks)
        if found is None:
            return _tar_members_walk(data)
    heads_at, sizes, typeflag = found
    regular = np.isin(typeflag, _REGULAR)
    heads_at, sizes = heads_at[regular], sizes[regular]
    starts = (heads_at + 1) * 512
    # numpy's fixed-width bytes drop the NUL padding of the name fields
    names = blocks[heads_at, :100].view("S100").ravel().tolist()
    posix = blocks[heads_at, 262] == 0                 # "ustar\0": the prefix field holds a folder
    if posix.any():
        prefixes = blocks[heads_at, 345:500].view("S155").ravel().tolist()
        names = [p + b"/" + n if p and is_posix else n for n, p, is_posix in zip(names, prefixes, posix.tolist())]
    return Members(data, _decode_names(names), starts.astype(np.int64), sizes.astype(np.int64))


def _tar_headers_compiled(data: bytes, n_blocks: int):
    """(header block indices, sizes, type flags) of every member by the compiled walk, or None where it
    is not built or declines."""
    kernels = compiled_kernels()
    if kernels is None:
        return None
    heads_at, sizes, typeflag = (np.empty(n_blocks, dtype=np.int64) for _ in range(3))
    count = kernels.tar_headers(data, heads_at, sizes, typeflag)
    return None if count < 0 else (heads_at[:count], sizes[:count], typeflag[:count])


def _tar_headers_numpy(data: bytes, blocks: np.ndarray):
    """:func:`_tar_headers_compiled` with numpy: every block that carries the ustar magic is taken for a
    header, and the index is kept only if those headers chain exactly."""
    heads_at = np.flatnonzero((blocks[:, 257:262] == _USTAR).all(axis=1))
    if len(heads_at) == 0 or heads_at[0] != 0:
        return None
    heads = blocks[heads_at]
    digits = heads[:, 124:135].astype(np.int64) - 48
    check_digits = heads[:, 148:154].astype(np.int64) - 48
    if (digits < 0).any() or (digits > 7).any() or (check_digits < 0).any() or (check_digits > 7).any() \
            or not np.isin(heads[:, 135], (0, 32)).all():
        return None
    sizes = digits @ _OCTAL11
    # the checksum is the sum of the header's bytes with its own field counted as eight spaces
    computed = heads.sum(axis=1, dtype=np.int64) - heads[:, 148:156].sum(axis=1, dtype=np.int64) + 8 * 32
    following = heads_at + 1 + (sizes + 511) // 512
    typeflag = heads[:, 156]
    if not np.array_equal(computed, check_digits @ _OCTAL6) or not np.array_equal(following[:-1], heads_at[1:]) \
            or np.isin(typeflag, np.frombuffer(b"LKxg", dtype=np.uint8)).any():
        return None
    end = int(following[-1]) * 512
    if int(heads_at[-1]) * 512 + 512 + int(sizes[-1]) > len(data) or data.count(0, end) != len(data) - end:
        return None
    return heads_at, sizes, typeflag


def _decode_names(names: list[bytes]) -> list[str]:
    """Tar member names as text (cut at a NUL; undecodable bytes kept as surrogates): one decode of
    all names joined by newlines where none holds a newline or a NUL, else name by name."""
    joined = b"\n".join(names)
    if joined.count(b"\n") == len(names) - 1 and b"\0" not in joined and names:
        return joined.decode("utf-8", "surrogateescape").split("\n")
    return [n.split(b"\0", 1)[0].decode("utf-8", "surrogateescape") for n in names]


def _tar_members_walk(data: bytes) -> Members:
    """The member-by-member reading of ustar headers (GNU long names and pax go through tarfile)."""
    names, starts, sizes = [], [], []
    pos, end = 0, len(data)
    while pos + 512 <= end:
        header = data[pos:pos + 512]
        if header.count(0) == 512:          # end-of-archive blocks
            break
        typeflag = header[156:157]
        if typeflag in (b"L", b"K", b"x", b"g"):
            return Members.from_pairs(_split_with_tarfile(data))
        try:
            size_field = header[124:136]
            size = int(size_field.rstrip(b"\0 ").strip() or b"0", 8) if not size_field[0] & 0x80 else \
                int.from_bytes(size_field[1:], "big")
            int(header[148:156].rstrip(b"\0 ").strip() or b"0", 8)   # a corrupt header fails here
        except ValueError as exc:
            raise ArchiveError(f"corrupt tar header at byte {pos}") from exc
        name = header[:100].split(b"\0", 1)[0]
        prefix = header[345:500].split(b"\0", 1)[0] if header[257:263] == b"ustar\0" else b""
        if prefix:
            name = prefix + b"/" + name
        body = pos + 512
        if body + size > end:
            raise ArchiveError(f"member {name.decode('utf-8', 'replace')} is truncated")
        if typeflag in (b"0", b"\0", b"7"):
            names.append(name.decode("utf-8", "surrogateescape"))
            starts.append(body)
            sizes.append(size)
        pos = body + (size + 511) // 512 * 512
    else:
        if pos < end and data.count(0, pos) != end - pos:
            raise ArchiveError("archive ends inside a header")
    return Members(data, names, np.asarray(starts, dtype=np.int64), np.asarray(sizes, dtype=np.int64))


def _split_with_tarfile(data: bytes):
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar:
                if member.isfile():
                    yield member.name, tar.extractfile(member).read()
    except tarfile.TarError as exc:
        raise ArchiveError(f"{type(exc).__name__}: {exc}") from exc


def read_bytes(url: str, fs=None) -> bytes:
    """A whole (possibly compressed: .gz/.bz2/.xz by suffix) file."""
    compression = fsspec.utils.infer_compression(url.split("::", 1)[0])
    if fs is not None:
        with fs.open(url, "rb", compression=compression) as handle:
            return handle.read()
    with fsspec.open(url, "rb", compression=compression) as handle:
        return handle.read()


def basename(path: str) -> str:
    return os.path.basename(path.rstrip("/"))


def list_files(source: str, patterns: tuple[str, ...]) -> tuple[fsspec.AbstractFileSystem, list[dict]]:
    """Files of a source URL (a file, a folder searched recursively, or a glob) matching patterns.

    Each info dict gains ``url`` (an fsspec URL that opens the file, chained URLs such as
    ``tar://*.mjd::s3://bucket/x.tar`` included) and ``key`` (its path relative to the source).
    """
    import fnmatch

    fs, path = fsspec.core.url_to_fs(source)
    chain = source.split("::", 1)[1] if "::" in source else None
    if any(ch in path for ch in "*?["):
        found = fs.glob(path, detail=True)
        infos = list(found.values()) if isinstance(found, dict) else [fs.info(p) for p in found]
        root = path[: min(path.find(ch) for ch in "*?[" if ch in path)].rsplit("/", 1)[0]
    elif fs.isdir(path):
        infos = list(fs.find(path, detail=True).values())
        root = path
    elif fs.exists(path):
        infos = [fs.info(path)]
        root = path.rsplit("/", 1)[0] if "/" in path else ""
    else:
        raise FileNotFoundError(f"source {source!r} does not exist")
    chosen = [dict(i) for i in infos if i.get("type", "file") == "file"
              and any(fnmatch.fnmatch(basename(i["name"]).lower(), p) for p in patterns)]
    for info in chosen:
        info["url"] = full_url(fs, info["name"], chain)
        info["key"] = relative_key(root, info["name"])
    chosen.sort(key=lambda i: i["name"])
    return fs, chosen


def sibling_files(source: str, patterns: tuple[str, ...]) -> list[dict]:
    """Side files (ident.dat, classes, periods) in the source folder, or beside a single-file source."""
    fs, path = fsspec.core.url_to_fs(source)
    found = list_files(source, patterns)[1] if fs.isdir(path) or any(c in path for c in "*?[") else []
    if not found and not fs.isdir(path):
        parent = path.rsplit("/", 1)[0]
        chain = source.split("::", 1)[1] if "::" in source else None
        if parent and parent != path and fs.isdir(parent):
            found = list_files(full_url(fs, parent, chain), patterns)[1]
    return found


def full_url(fs, path: str, chain: str | None = None) -> str:
    protos = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    if "file" in protos and not chain:
        return path
    url = fs.unstrip_protocol(path)
    return f"{url}::{chain}" if chain else url


def relative_key(root: str, path: str) -> str:
    root = root.rstrip("/")
    if not root:
        return path.lstrip("/")
    if path.startswith(root + "/"):
        return path[len(root) + 1:]
    return basename(path)


def parse_bodies(bodies: list[bytes], names: list[str], ncols: int, *, delimiter: bytes = b" ",
                 quarantine: list | None = None, first_lines: list[int] | None = None
                 ) -> tuple[list[np.ndarray], np.ndarray]:
    """Parse many small numeric text bodies (archive members) as fast as one big file.

    Returns ``ncols`` concatenated float64 columns and the row count of each body. The bodies are
    joined into one buffer and parsed once by pyarrow's CSV reader; any irregularity (a bad row
    somewhere, empty lines, several spaces) sends every body through :func:`parse_numeric` on its
    own instead, so one bad member never costs the good ones beside it.
    """
    fixed = [b if b.endswith(b"\n") or not b else b + b"\n" for b in bodies]
    counts = np.fromiter((b.count(b"\n") for b in fixed), dtype=np.int64, count=len(fixed))
    text, rows = b"".join(fixed), int(counts.sum())
    columns = _parse_compiled(text, np.array([0]), np.array([len(text)]), rows, ncols, delimiter)
    if columns is None:
        columns = _parse_joined(text, rows, ncols, delimiter)
    if columns is not None:
        return columns, counts
    return _parse_each(bodies, names, ncols, delimiter, quarantine, first_lines)


def _parse_compiled(data: bytes, starts: np.ndarray, ends: np.ndarray, rows: int, ncols: int,
                    delimiter: bytes) -> list[np.ndarray] | None:
    """``ncols`` float64 columns of the spans ``data[starts[k]:ends[k]]``, read one after the other, by the
    compiled parser (when built): None where it declines (anything but strictly regular rows, or not
    exactly ``rows`` of them) or cannot take the delimiter (one ASCII character other than a line end)."""
    compiled = compiled_kernels()
    if compiled is None or not rows or len(delimiter) != 1 or delimiter >= b"\x80" or delimiter in b"\r\n":
        return None
    out = np.empty((ncols, rows))
    if compiled.parse_spans(data, np.ascontiguousarray(starts, dtype=np.int64),
                            np.ascontiguousarray(ends, dtype=np.int64), out, ncols, delimiter.decode("ascii")):
        return list(out)
    return None


def _parse_joined(text: bytes, rows: int, ncols: int, delimiter: bytes) -> list[np.ndarray] | None:
    """``ncols`` float64 columns of ``text`` if pyarrow parses exactly ``rows`` rows of it, else None (it
    accepts more than :func:`_parse_compiled`: nan, inf, ...; the same values on what both take)."""
    if not rows:
        return None
    names = [f"c{i}" for i in range(ncols)]
    try:
        table = read_csv_columns(text, names, delimiter=delimiter.decode(), types={c: pa.float64() for c in names})
    except (pa.ArrowInvalid, pa.ArrowTypeError, UnicodeDecodeError):
        return None
    if table.num_rows != rows or table.num_columns != ncols:
        return None
    return [table.column(c).to_numpy(zero_copy_only=False) for c in names]


def _parse_each(bodies, names, ncols, delimiter, quarantine, first_lines):
    first_lines = first_lines or [1] * len(bodies)
    arrays = [parse_numeric(b, ncols, delimiter=delimiter, name=n, quarantine=quarantine, first_line=f)
              for b, n, f in zip(bodies, names, first_lines)]
    counts = np.array([len(a) for a in arrays], dtype=np.int64)
    matrix = np.concatenate(arrays) if arrays else np.zeros((0, ncols))
    return [np.ascontiguousarray(matrix[:, i]) for i in range(ncols)], counts


@dataclass
class HeadedMembers:
    """Members split into their leading comment lines and a numeric body, as spans of one buffer.

    ``header_lines[k]`` holds ``(member index, start, end)`` arrays of every member's ``k``-th
    comment line (the newline excluded); member ``i``'s body is ``body_starts[i]:body_ends[i]``
    and holds ``rows[i]`` lines (``missing_newline[i]``: its last line has no newline).
    """

    members: Members
    header_lines: list
    body_starts: np.ndarray
    body_ends: np.ndarray
    rows: np.ndarray
    missing_newline: np.ndarray

    @property
    def header_counts(self) -> np.ndarray:
        counts = np.zeros(len(self.members), dtype=np.int64)
        for index, _, _ in self.header_lines:
            counts[index] += 1
        return counts

    def header_text(self, level: int, skip: int = 0) -> tuple[np.ndarray, bytes]:
        """Which members have a ``level``-th comment line, and those lines joined, each without its
        first ``skip`` bytes and ending in a newline: one gather, no list of lines."""
        if level >= len(self.header_lines):
            return np.zeros(0, dtype=np.int64), b""
        index, starts, ends = self.header_lines[level]
        starts = np.minimum(starts + skip, ends)
        lengths = ends - starts + 1                      # + the newline
        total = int(lengths.sum())
        line_starts = np.cumsum(lengths) - lengths
        picks = np.arange(total) + np.repeat(starts - line_starts, lengths)
        text = np.frombuffer(self.members.data, dtype=np.uint8)[np.minimum(picks, len(self.members.data) - 1)]
        text[line_starts + lengths - 1] = 10
        return index, text.tobytes()

    def header_numbers(self, level: int, columns: list[int], skip: int = 0) -> tuple[np.ndarray, np.ndarray] | None:
        """Which members have a ``level``-th comment line, and the numbers in the given fields of those lines
        (without their first ``skip`` bytes; ``len(columns)`` float64 rows), read in place by the compiled
        kernel where every line is strictly regular (single spaces, printable ASCII, as many fields on each);
        None where it declines or is not built: :meth:`header_text` and a CSV reader then take the lines."""
        compiled = compiled_kernels()
        if compiled is None or level >= len(self.header_lines):
            return None
        index, starts, ends = self.header_lines[level]
        out = np.empty((len(columns), len(index)))
        if compiled.line_fields(self.members.data, np.ascontiguousarray(np.minimum(starts + skip, ends), np.int64),
                                np.ascontiguousarray(ends, np.int64), np.asarray(columns, np.int64), out) < 0:
            return None
        return index, out

    def joined_bodies(self, order: np.ndarray | None = None) -> bytes:
        """Every body (in ``order`` if given), each ending in a newline, in one buffer (one copy)."""
        view = memoryview(self.members.data)
        pick = slice(None) if order is None else order
        spans = zip(self.body_starts[pick].tolist(), self.body_ends[pick].tolist())
        if not self.missing_newline.any():
            return b"".join([view[a:b] for a, b in spans])
        pieces = []
        for (a, b), add in zip(spans, self.missing_newline[pick].tolist()):
            pieces.append(view[a:b])
            if add:
                pieces.append(b"\n")
        return b"".join(pieces)

    def body(self, i: int) -> bytes:
        return self.members.data[int(self.body_starts[i]):int(self.body_ends[i])]

    def header_of(self, i: int) -> list[bytes]:
        """Member ``i``'s comment lines (slow path helper)."""
        data, lines = self.members.data, []
        for index, starts, ends in self.header_lines:
            at = np.flatnonzero(index == i)
            if not len(at):
                break
            lines.append(data[int(starts[at[0]]):int(ends[at[0]])].rstrip(b"\r"))
        return lines

    def parse(self, keys: list[str], ncols: int, *, delimiter: bytes = b" ", quarantine: list | None = None,
              order: np.ndarray | None = None) -> tuple[list[np.ndarray], np.ndarray]:
        """The bodies as ``ncols`` concatenated float64 columns and the row count of each body: one
        compiled parse of all bodies where they lie, else one pyarrow parse of them joined, else (any
        irregularity anywhere) :func:`parse_numeric` per body,
        naming bad rows by their line in the file (``keys`` name the members). With ``order`` (member
        indices) the bodies come out in that order: a reader that groups its curves by band before
        parsing saves the shard a reshuffle of every observation."""
        index = np.arange(len(self.members)) if order is None else np.asarray(order)
        rows = int(self.rows.sum())
        columns = _parse_compiled(self.members.data, self.body_starts[index], self.body_ends[index], rows, ncols,
                                  delimiter)
        if columns is None:
            columns = _parse_joined(self.joined_bodies(order), rows, ncols, delimiter)
        if columns is not None:
            return columns, self.rows[index]
        first_lines = (self.header_counts + 1)[index].tolist()
        return _parse_each([self.body(i) for i in index.tolist()], [keys[i] for i in index.tolist()], ncols,
                           delimiter, quarantine, first_lines)


def split_headed(members: Members, comment: bytes = b"#") -> HeadedMembers:
    """Find every member's leading ``comment`` lines and its body, for all members at once.

    Works on the newline positions of the whole buffer: the ``k``-th comment line of all members is
    found with one ``searchsorted``, so the cost does not grow with the number of members. The
    compiled scan (when built) gives the same spans in one pass without the newline index.
    """
    compiled = compiled_kernels()
    if compiled is not None and len(members) and len(comment) == 1:
        found = _scan_compiled(compiled, members, comment)
        if found is not None:
            return found
    data = members.data
    buf = np.frombuffer(data, dtype=np.uint8)
    newlines = np.flatnonzero(buf == 10)
    n = len(buf)
    ends = members.starts + members.sizes
    line_start = members.starts.copy()
    mark = comment[0]

    def first_byte_is_mark(positions):
        return buf[np.minimum(positions, max(n - 1, 0))] == mark if n else np.zeros(len(positions), bool)

    active = np.flatnonzero((members.sizes > 0) & first_byte_is_mark(line_start))
    levels = []
    while len(active):
        starts = line_start[active]
        k = np.searchsorted(newlines, starts)
        next_newline = np.where(k < len(newlines), newlines[np.minimum(k, len(newlines) - 1)], n) \
            if len(newlines) else np.full(len(starts), n)
        line_end = np.minimum(next_newline, ends[active])
        levels.append((active, starts, line_end))
        after = np.minimum(line_end + 1, ends[active])
        line_start[active] = after
        active = active[(after < ends[active]) & first_byte_is_mark(after)]
    rows = np.searchsorted(newlines, ends) - np.searchsorted(newlines, line_start)
    missing = (ends > line_start) & (buf[np.maximum(ends - 1, 0)] != 10) if n else np.zeros(len(ends), bool)
    return HeadedMembers(members, levels, line_start, ends, rows + missing, missing)


#: the most comment lines a member may start with for the compiled scan (more: the numpy path)
SCAN_HEADER_LINES = 64


def _scan_compiled(compiled, members: Members, comment: bytes) -> HeadedMembers | None:
    n = len(members)
    starts = np.ascontiguousarray(members.starts, dtype=np.int64)
    sizes = np.ascontiguousarray(members.sizes, dtype=np.int64)
    body_starts, rows, counts = np.empty(n, np.int64), np.empty(n, np.int64), np.empty(n, np.int64)
    missing = np.empty(n, np.uint8)
    header_starts = np.empty((n, SCAN_HEADER_LINES), np.int64)
    header_ends = np.empty((n, SCAN_HEADER_LINES), np.int64)
    if not compiled.scan_members(members.data, starts, sizes, comment.decode("latin-1"), body_starts, rows,
                                 missing, counts, header_starts, header_ends):
        return None
    levels = []
    for k in range(int(counts.max())):
        index = np.flatnonzero(counts > k)
        levels.append((index, header_starts[index, k], header_ends[index, k]))
    return HeadedMembers(members, levels, body_starts, starts + sizes, rows, missing.view(bool))


def add_parsed(batch: Batch, object_ids: list, bands: list, columns: list[np.ndarray], lengths: np.ndarray,
               source_files: list, ras=None, decs=None, time_offset: float = 0.0) -> np.ndarray:
    """Add parsed curves (concatenated ``mjd, mag, err`` columns) after validating every curve's
    names and length; rejected curves are quarantined. Returns the mask of accepted curves."""
    n = len(object_ids)
    ras = ras if ras is not None else [None] * n
    decs = decs if decs is not None else [None] * n
    lengths = np.asarray(lengths)
    accepted = valid_objects_and_bands(object_ids, bands) & (lengths > 0)
    for i in np.flatnonzero(~accepted).tolist():
        if not is_valid_object_id(object_ids[i]):
            batch.quarantine.append((source_files[i], "invalid_object_id", f"{repr(object_ids[i])[:200]}: {OBJECT_RULE}"))
        elif not is_valid_band(bands[i]):
            batch.quarantine.append((source_files[i], "invalid_band", f"{repr(bands[i])[:200]}: {BAND_RULE}"))
        elif lengths[i] == 0:
            batch.quarantine.append((source_files[i], "empty", f"{object_ids[i]} band {bands[i]}: no observation"))
        else:
            accepted[i] = True      # the per-name rules above are the authority
    mjd, mag, err = columns
    if not accepted.all():
        rows = np.repeat(accepted, lengths)
        mjd, mag, err = mjd[rows], mag[rows], err[rows]
        pick = np.flatnonzero(accepted).tolist()
        object_ids, bands, source_files, ras, decs = ([values[i] for i in pick] for values in
                                                      (object_ids, bands, source_files, ras, decs))
    batch.add_block(list(object_ids), list(bands), lengths[accepted].tolist(),
                    mjd + time_offset if time_offset else mjd, mag, err,
                    source_files=list(source_files), ras=list(ras), decs=list(decs))
    return accepted


def plan_inputs(source: str, patterns: tuple[str, ...], sidecars: tuple[str, ...],
                parse_sidecar) -> tuple[list[Input], dict]:
    """The inputs matching ``patterns`` under ``source``, and the merged parse of the sidecar files beside
    them (a class list, a catalogue, a period table) that readers turn into labels and coordinates."""
    _, infos = list_files(source, patterns)
    merged: dict = {}
    for info in sibling_files(source, sidecars):
        merged.update(parse_sidecar(read_bytes(info["url"]).decode("utf-8", "replace")))
    return [Input(key=i["key"], url=i["url"], size=i.get("size") or 0) for i in infos], merged


def input_member_block(item: Input, suffix: str) -> tuple[Members, list[str]]:
    """The members of an archive input whose names end in ``suffix`` (or the input itself when it is a
    plain file) as :class:`Members`, and their provenance keys (``<input>::<member>``)."""
    if not is_archive(item.url):
        return Members.from_pairs([(item.key, read_bytes(item.url))]), [item.key]
    members = read_members(item.url)
    if not _all_end_with(members.names, suffix):
        members = members.take(np.array([n.lower().endswith(suffix) for n in members.names], dtype=bool))
    return members, [f"{item.key}::{name}" for name in members.names]


def one_per_line(names: list[str]) -> str | None:
    """``names`` joined by newlines, for one pass over all of them (a count, a regular expression), or
    None where a name holds a newline: then they go one by one."""
    text = "\n".join(names)
    return text if text.count("\n") == len(names) - 1 else None


def _all_end_with(names: list[str], suffix: str) -> bool:
    """True when one pass over the names joined shows that every name ends in ``suffix``
    (case-insensitive); False otherwise, names holding a newline included (check them one by one)."""
    if not names:
        return True
    text = one_per_line(names)
    return text is not None and (text.lower() + "\n").count(suffix.lower() + "\n") == len(names)


def input_members(item: Input, suffix: str) -> list[tuple[str, str, bytes]]:
    """(provenance key, member name, bytes) of :func:`input_member_block`, one member at a time."""
    members, keys = input_member_block(item, suffix)
    return [(key, name, data) for key, (name, data) in zip(keys, members.pairs())]


def parse_time_mag_err_members(item: Input, delimiter: bytes) -> tuple[Batch, list, list[np.ndarray], np.ndarray]:
    """The start of a reader whose members are header-less ``.dat`` rows of time, magnitude and error
    (ASAS, OGLE): a fresh batch (bad members already quarantined in it), the members as
    :func:`input_members` gives them, the three parsed columns and each member's row count."""
    batch = Batch()
    members = input_members(item, ".dat")
    columns, lengths = parse_bodies([m[2] for m in members], [m[0] for m in members], 3, delimiter=delimiter,
                                    quarantine=batch.quarantine)
    return batch, members, columns, lengths


def add_labels(batch: Batch, object_ids: list, accepted, label_set: str, label_of) -> None:
    """A label for each accepted curve whose object ``label_of(object_id)`` names one (None: no label)."""
    for object_id, ok in zip(object_ids, accepted):
        label = label_of(object_id) if ok else None
        if label:
            batch.labels.append((object_id, label_set, label))
