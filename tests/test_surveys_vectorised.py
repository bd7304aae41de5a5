"""The whole-archive (vectorised) paths of the readers give exactly what the member-by-member paths
give: the tar index, the header/body split, MACHO's names and coordinates, name validation and the
per-curve percentiles of the quality flags."""
from __future__ import annotations

import bz2
import io
import re
import tarfile

import numpy as np
import pytest
from astromer.lake import paths, schema
from astromer.lake.paths import is_valid_object_id, valid_objects_and_bands, validate_band
from astromer.surveys import macho
from astromer.surveys.base import (
    ArchiveError,
    Batch,
    Members,
    _tar_members_walk,
    band_order,
    split_headed,
    split_header,
    tar_members,
)
from conftest import shared_path, tar_bytes


def _as_pairs(members: Members) -> list[tuple[str, bytes]]:
    return [(name, members.bytes_of(i)) for i, name in enumerate(members.names)]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_index_matches_tarfile_in_every_format(fmt):
    rng = np.random.default_rng(0)
    members = [(f"dir{i % 3}/lc_{i}.R.mjd", rng.bytes(int(rng.integers(0, 3000)))) for i in range(300)]
    members.append(("x" * 90 + "/" + "y" * 60 + ".mjd", b"long name\n"))     # prefix field / long name
    raw = tar_bytes(members, fmt)
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        expected = [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]
    assert _as_pairs(tar_members(raw)) == expected
    assert _as_pairs(_tar_members_walk(raw)) == expected


def test_tar_index_falls_back_when_a_body_looks_like_a_header():
    # a member whose content holds a fake ustar magic exactly where a header would carry it
    fake = bytearray(1024)
    fake[257:262] = b"ustar"
    raw = tar_bytes([("a.mjd", bytes(fake)), ("b.mjd", b"1 2 3\n")])
    assert _as_pairs(tar_members(raw)) == [("a.mjd", bytes(fake)), ("b.mjd", b"1 2 3\n")]


def test_tar_index_rejects_truncated_and_corrupt_archives():
    raw = bz2.decompress(shared_path("data", "macho_sample", "lc_1.3444.614.tar.bz2").read_bytes())
    with pytest.raises(ArchiveError):
        tar_members(raw[: len(raw) // 2])
    damaged = bytearray(raw)
    damaged[124:136] = b"zzzzzzzzzzzz"             # the first header's size field
    with pytest.raises(ArchiveError):
        tar_members(bytes(damaged))


HEADED = [
    b"#a b\n#c\n1.5 2 3\n4 5 6\n",
    b"1 2 3\n",                                   # no header
    b"#only a header\n",                         # header, no body
    b"#h\n7 8 9",                                 # last line without newline
    b"",                                          # empty member
    b"#h\r\n1 2 3\r\n",                           # CRLF
    b"#h\n\n1 2 3\n",                             # an empty line after the header
    b"#h",                                        # a header line without newline
]


def test_split_headed_agrees_with_split_header_member_by_member():
    members = Members.from_pairs([(f"m{i}", data) for i, data in enumerate(HEADED)])
    headed = split_headed(members)
    for i, data in enumerate(HEADED):
        header, body = split_header(data)
        assert headed.header_of(i) == [h.rstrip(b"\r") for h in header], i
        assert headed.body(i) == body, i
        assert headed.rows[i] == body.count(b"\n") + (1 if body and not body.endswith(b"\n") else 0), i
    joined = headed.joined_bodies()
    assert joined == b"".join(b if not b or b.endswith(b"\n") else b + b"\n" for b in (headed.body(i) for i in range(8)))


def test_headed_parse_falls_back_per_member_and_names_the_bad_line():
    members = Members.from_pairs([("good", b"#h\n1 2 3\n4 5 6\n"), ("bad", b"#h1\n#h2\n7 8 9\n1 x 2\n")])
    quarantine: list = []
    columns, counts = split_headed(members).parse(["good", "bad"], 3, quarantine=quarantine)
    assert counts.tolist() == [2, 1] and columns[0].tolist() == [1, 4, 7]
    assert quarantine == [("bad", "non_numeric", "1 row(s) dropped: line 4: b'1 x 2'")]


@pytest.mark.parametrize("with_bad_member", [False, True])
def test_headed_parse_in_a_given_order_equals_reordering_afterwards(with_bad_member):
    pairs = [("a", b"#h\n1 2 3\n4 5 6\n"), ("b", b"#h\n7 8 9\n"), ("c", b"#h\n#h2\n10 11 12\n13 14 15\n")]
    if with_bad_member:                     # one bad row anywhere sends every body through the row parser
        pairs.append(("d", b"#h\n1 x 2\n16 17 18\n"))
    members = Members.from_pairs(pairs)
    keys = [name for name, _ in pairs]
    order = np.arange(len(pairs))[::-1].copy()
    plain_quarantine: list = []
    columns, counts = split_headed(members).parse(keys, 3, quarantine=plain_quarantine)
    bounds = np.r_[0, np.cumsum(counts)]
    ordered_quarantine: list = []
    got, got_counts = split_headed(members).parse(keys, 3, quarantine=ordered_quarantine, order=order)
    assert got_counts.tolist() == counts[order].tolist()
    for c in range(3):
        expected = np.concatenate([columns[c][bounds[i]:bounds[i + 1]] for i in order])
        assert got[c].tolist() == expected.tolist()
    assert ordered_quarantine == plain_quarantine == ([("d", "non_numeric", "1 row(s) dropped: line 2: b'1 x 2'")]
                                                      if with_bad_member else [])


@pytest.mark.parametrize("small_lines", [macho.SMALL_HEADER_LINES, 0])   # small archives, and pyarrow's path
def test_macho_identity_fast_path_matches_the_member_by_member_rule(monkeypatch, small_lines):
    monkeypatch.setattr(macho, "SMALL_HEADER_LINES", small_lines)
    raw = bz2.decompress(shared_path("data", "macho_sample", "lc_1.3444.614.tar.bz2").read_bytes())
    real = tar_members(raw)
    header_2 = b"#Field Tile Seq RA(hour) Dec(deg) Filter mean_Mag med_Mag mean_(B-R) med_(B-R)\n"
    odd = [
        ("weird.name.mjd", header_2 + b"#5 12 34 1.5 -20.25 V 0 0 0 0\n#MJD Mag Err\n1 2 3\n"),  # id from header
        ("lc_9.9.9.B.mjd", header_2 + b"#not enough\n1 2 3\n"),                                 # bad header
        ("lc_8.8.8.R.mjd", b"1 2 3\n"),                                                         # no header
    ]
    for members in (real, Members.from_pairs(_as_pairs(real) + odd)):
        keys = [f"k::{n}" for n in members.names]
        fast, slow = Batch(), Batch()
        got = macho._identify_all(members, split_headed(members), keys, fast)
        headed = split_headed(members)
        expected = list(zip(*[macho._identify(n.rsplit("/", 1)[-1], headed.header_of(i), keys[i], slow)
                              for i, n in enumerate(members.names)]))
        assert [list(x) for x in got] == [list(x) for x in expected]
        assert fast.quarantine == slow.quarantine
    assert got[0][-3:] == ["5.12.34", "9.9.9", "8.8.8"] and got[2][-3] == 22.5


def test_macho_shard_groups_interleaved_bands_and_keeps_every_curve_whole():
    pairs = []
    for path in sorted(shared_path("data", "macho_sample").glob("*.tar.bz2")):
        pairs += _as_pairs(tar_members(bz2.decompress(path.read_bytes())))
    pairs.sort(key=lambda p: (p[0].split(".")[-3], p[0]))       # objects in turn, bands interleaved
    members = Members.from_pairs(pairs)
    batch = Batch()
    macho.parse_members(members, [f"k::{n}" for n in members.names], batch)
    table = batch.to_table(source_sha256="0" * 64, ingest_id="test")
    bands = table.column("band").to_pylist()
    assert len(set(bands)) == 2 and bands == sorted(bands)        # grouped by band
    for row in table.to_pylist():
        name = row["source_file"].split("::", 1)[1]
        header, body = split_header(dict(pairs)[name])
        rows = np.loadtxt(io.BytesIO(body), ndmin=2)
        rows = rows[np.argsort(rows[:, 0], kind="stable")]
        assert name.endswith(f".{row['band']}.mjd") and row["n_obs"] == len(rows)
        assert row["mjd"] == rows[:, 0].tolist()
        assert row["mag"] == rows[:, 1].astype(np.float32).tolist()


def test_band_order_groups_stably_and_only_when_needed():
    assert band_order(["R", "R"]) is None and band_order(["B", "B", "R"]) is None      # one band / grouped
    assert band_order(["R", "B", "R", "B", "V"]).tolist() == [1, 3, 0, 2, 4]
    assert band_order(["R", None, "B"]) is None                  # not names: left to the name checks


#: MACHO's file-name rule as a regular expression, the reference for the string-method split
MACHO_FILE_NAME = re.compile(r"^lc_(?P<object>.+)\.(?P<band>[^.]+)\.mjd\Z")


def test_macho_member_names_split_like_the_file_name_rule():
    names = ["lc_1.3444.614.R.mjd", "dir/sub/lc_1.2.3.B.mjd.gz", "lc_a.R.mjd.bz2", "lc_.R.mjd", "lc_a..mjd",
             "lc_a.mjd", "lc_noband.mjd", "xlc_a.R.mjd", "lc_a.R.mjd\n", "lc_a b.R.mjd", "a/lc_b/c.R.mjd",
             "lc_a.R.dat", "lc_a.R.mjd.gz.gz", "lc_x.y.z.mjd"]
    for name in names:
        base = name.rsplit("/", 1)[-1]
        for suffix in (".gz", ".bz2"):
            if base.endswith(suffix):
                base = base[: -len(suffix)]
                break
        match = MACHO_FILE_NAME.match(base)
        assert macho._object_and_band(macho._uncompressed_basename(name)) == (
            (match["object"], match["band"]) if match else None), name


@pytest.mark.parametrize("small_batch", [paths.SMALL_BATCH, 0])    # name by name, and pyarrow's regexes
def test_vectorised_name_rules_match_the_python_rules(monkeypatch, small_batch):
    monkeypatch.setattr(paths, "SMALL_BATCH", small_batch)
    objects = ["1.3444.614", "OGLE-LMC-CEP-0001", "a/b", "..", "a..b", "", "x" * 129, "x" * 128, "abc\n",
               "-lead", "ok:+", "é", None, "a b"]
    bands = ["R", "B", "I", "r/..", "", "V_1", "g", "x" * 17, "R\n", "R", "R", "R", "R", "R"]

    def python_rule(o, b):
        try:
            validate_band(b)
        except (ValueError, TypeError):
            return False
        return is_valid_object_id(o)
    expected = [python_rule(o, b) for o, b in zip(objects, bands)]
    assert valid_objects_and_bands(objects, bands).tolist() == expected
    assert expected == [True, True] + [False] * 8 + [True] + [False] * 3


def test_percentiles_of_the_padded_sort_equal_the_global_sort():
    rng = np.random.default_rng(3)
    lengths = rng.integers(1, 200, 300)
    offsets = np.r_[0, np.cumsum(lengths)]
    mag = rng.normal(size=offsets[-1])
    good = rng.random(offsets[-1]) > 0.1
    good[offsets[5]:offsets[6]] = False                 # a curve without any good row
    padded = schema._curve_percentiles(mag, good, offsets, lengths, (0.01, 0.99))
    flat = schema._sorted_within_curves(mag, good, offsets, lengths)
    n_good = np.add.reduceat(good.astype(np.int64), offsets[:-1])
    for q, got in zip((0.01, 0.99), padded):
        reference = np.array([np.percentile(mag[a:b][good[a:b]], q * 100) if good[a:b].any() else
                              (-np.inf if q < 0.5 else np.inf) for a, b in zip(offsets[:-1], offsets[1:])])
        assert np.allclose(got, reference, rtol=0, atol=1e-12)
        other = schema._segment_percentile(flat, offsets[:-1], n_good, q)
        assert np.allclose(np.where(n_good > 0, other, got), got, rtol=0, atol=1e-12)


@pytest.mark.parametrize("extra", [[], ["notes.txt"], ["lc_odd\nlc_1.2.3.R.mjd"]])
def test_macho_names_in_one_pass_follow_the_name_by_name_rule(extra):
    names = ["lc_1.3444.614.B.mjd", "lc_1.3444.614.R.mjd.gz", "dir/lc_x/lc_2.1.5.V.mjd.bz2", "lc_a.b.c.R.mjd",
             "lc_1.2.3.R.mjd.gz.gz", "lc_.B.mjd", "lc_a..mjd", "x/lc_1.2.3.mjd", "dir.lc_1/lc_9.9.9.B.mjd",
             "lc_1.2.3.B.MJD", "lc_1.2.3.B.mjd\r"] + extra
    expected = [macho._object_and_band(macho._uncompressed_basename(n)) for n in names]
    assert macho._objects_and_bands(names) == expected
    regular = [n for n, e in zip(names, expected) if e is not None]
    assert len(regular) >= 5 and macho._objects_and_bands(regular) == [e for e in expected if e is not None]


def test_macho_flat_names_by_the_simpler_pattern_match_the_general_one():
    # no folder and no compression suffix: the flat pattern, which must agree with the general one
    names = ["lc_1.3444.614.B.mjd", "lc_a.b.c.R.mjd", "lc_.B.mjd", "lc_a..mjd", "lc_1.2.3.B.MJD", "lc_x.mjd",
             "lc_1.2.3.B.mjd\r", "xlc_1.2.3.B.mjd", "lc_1.2.3.B.mjdx", "lc_\u00e9t\u00e9.V.mjd", "lc_1 2.R.mjd"]
    expected = [macho._object_and_band(macho._uncompressed_basename(n)) for n in names]
    assert macho._objects_and_bands(names) == expected
    regular = [n for n, e in zip(names, expected) if e is not None]
    assert len(regular) >= 4
    assert macho._objects_and_bands(regular) == macho._NAME_LINE.findall("\n".join(regular))
    assert all(e is None for n, e in zip(names, expected) if n not in regular)
    assert len(macho._NAME_LINE.findall("\n".join(names))) == len(regular)


@pytest.mark.parametrize("names", [
    [b"lc_1.B.mjd", b"dir/lc_2.R.mjd", b"caf\xc3\xa9.mjd", b"bad\xff\xfe.mjd"],
    [b"lc_1.B.mjd", b"cut\0garbage"],
    [b"line\nbreak.mjd", b"lc_1.B.mjd"],
    [b"a\xc3", b"\xa9b"],                                 # a multi-byte character split across two names
    [],
])
def test_tar_names_decoded_in_one_pass_equal_name_by_name(names):
    from astromer.surveys.base import _decode_names

    assert _decode_names(names) == [n.split(b"\0", 1)[0].decode("utf-8", "surrogateescape") for n in names]


@pytest.mark.parametrize("names,expected", [
    (["a.mjd", "b.MJD", "dir/c.mjd"], True), (["a.mjd", "b.txt"], False), (["a.mjd\nb.mjd", "c.mjd"], False),
    (["a.mjd.gz"], False), ([], True),
])
def test_every_name_ends_with_the_suffix(names, expected):
    from astromer.surveys.base import _all_end_with

    assert _all_end_with(names, ".mjd") is expected
    assert not expected or all(n.lower().endswith(".mjd") for n in names)    # True is never wrong


def test_shard_table_leaves_the_callers_arrays_alone_and_takes_read_only_blocks():
    # to_table sorts curves in place: a curve added one by one is the batch's own copy, and a block that
    # arrives read-only (a zero-copy view of an Arrow column) is copied before it is sorted
    mjd = np.array([3.0, 1.0, 2.0])
    mag = np.array([10.0, 11.0, 12.0])
    batch = Batch()
    assert batch.add_curve("a", "V", mjd, mag, np.full(3, 0.1), source_file="f")
    table = batch.to_table(source_sha256="0" * 64, ingest_id="x")
    assert table.column("mjd")[0].values.to_pylist() == [1.0, 2.0, 3.0]
    assert mjd.tolist() == [3.0, 1.0, 2.0] and mag.tolist() == [10.0, 11.0, 12.0]

    frozen = [np.array(c, dtype=np.float64) for c in ([2.0, 1.0, 5.0], [7.0, 8.0, 9.0], [0.1, 0.2, 0.3])]
    for column in frozen:
        column.flags.writeable = False
    block = Batch()
    block.add_block(["b"], ["V"], [3], *frozen, source_files=["g"])
    table = block.to_table(source_sha256="0" * 64, ingest_id="x")
    assert table.column("mjd")[0].values.to_pylist() == [1.0, 2.0, 5.0]
    assert table.column("mag")[0].values.to_pylist() == [8.0, 7.0, 9.0]
    assert frozen[0].tolist() == [2.0, 1.0, 5.0]
