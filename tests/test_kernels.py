"""The compiled kernels (``astromer._kernels``) give exactly what their numpy and pyarrow twins
give, and decline (so that the twins run) on whatever they do not handle."""
from __future__ import annotations

import io
import os

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
from astromer.kernels import compiled_kernels
from astromer.surveys import get_reader
from astromer.surveys.base import Input, Members, split_headed
from conftest import shared_path, tar_bytes

compiled = compiled_kernels()


def test_the_install_builds_the_compiled_kernels():
    # the set-up compiles them (a C compiler is part of the supported environment); without them
    # ingest still works, taking about 1.6 times as long (benchmarks/ingest.py)
    assert compiled is not None


def parse_rows(text: bytes, out: np.ndarray, ncols: int, delimiter: str) -> bool:
    """The compiled parser over one whole text (a single span)."""
    return compiled.parse_spans(text, np.array([0]), np.array([len(text)]), out, ncols, delimiter)


def _pyarrow_columns(text: bytes, ncols: int) -> np.ndarray:
    names = [f"c{i}" for i in range(ncols)]
    table = pacsv.read_csv(io.BytesIO(text), read_options=pacsv.ReadOptions(column_names=names),
                           parse_options=pacsv.ParseOptions(delimiter=" "),
                           convert_options=pacsv.ConvertOptions(column_types={c: pa.float64() for c in names}))
    return np.stack([table.column(c).to_numpy() for c in names])


@pytest.mark.skipif(compiled is None, reason="compiled kernels not built")
@pytest.mark.parametrize("fmt", ["{!r}", "{:.3f}", "{:.12g}", "{:.17g}", "{:.6e}", "{:.25f}", "{:.0f}"])
def test_parse_rows_gives_pyarrows_doubles_bit_for_bit(fmt):
    rng = np.random.default_rng(len(fmt))
    values = np.concatenate([rng.normal(50_000, 3_000, 3_000), rng.normal(0, 1, 3_000),
                             rng.uniform(-1, 1, 3_000) * 10.0 ** rng.integers(-40, 40, 3_000)])
    tokens = [fmt.format(float(v)) for v in values]
    text = "\n".join(" ".join(tokens[i:i + 3]) for i in range(0, len(tokens), 3)).encode() + b"\n"
    out = np.empty((3, len(tokens) // 3))
    assert parse_rows(text, out, 3, " ")
    expected = _pyarrow_columns(text, 3)
    assert np.array_equal(out.view(np.int64), expected.view(np.int64))


@pytest.mark.skipif(compiled is None, reason="compiled kernels not built")
@pytest.mark.parametrize("text", [
    b"1 2 3\n\n4 5 6\n",        # empty line
    b"1  2 3\n",                # doubled delimiter
    b"1 2\n", b"1 2 3 4\n",     # missing or extra field
    b"nan 1 2\n", b"1 inf 2\n", b"1 2 x\n", b"- 1 2\n", b"1e 1 2\n", b"1.2.3 1 2\n",
    b"1 2 3\n4 5 6\n7 8 9\n",   # more lines than rows
    b"1 2 3 \n",                # trailing delimiter
])
def test_parse_rows_declines_what_it_does_not_handle(text):
    out = np.empty((3, 2))
    assert not parse_rows(text, out, 3, " ")


@pytest.mark.skipif(compiled is None, reason="compiled kernels not built")
def test_parse_rows_accepts_crlf_a_missing_last_newline_and_bare_decimals():
    out = np.empty((3, 2))
    assert parse_rows(b"1 2 3\r\n.5 5. -.5e1", out, 3, " ")
    assert out.T.tolist() == [[1, 2, 3], [0.5, 5.0, -5.0]]


def _random_member(rng) -> bytes:
    parts = [b"#" + bytes(rng.choice(list(b"ab #\r\n"), int(rng.integers(0, 8)))) + b"\n"
             for _ in range(int(rng.integers(0, 4)))]
    parts += [rng.choice([b"1 2 3", b"4.5 -6 7e1", b"8 9", b"x y z", b""]) + (b"\n" if rng.random() < 0.9 else b"")
              for _ in range(int(rng.integers(0, 5)))]
    if rng.random() < 0.1:
        parts.append(b"#")
    return b"".join(parts)


def _both_paths(monkeypatch, fn):
    monkeypatch.setenv("ASTROMER_COMPILED", "0")
    python_path = fn()
    monkeypatch.setenv("ASTROMER_COMPILED", "1")
    return python_path, fn()


@pytest.mark.skipif(compiled is None, reason="compiled kernels not built")
def test_split_and_parse_agree_with_the_numpy_and_pyarrow_paths_on_random_members(monkeypatch):
    rng = np.random.default_rng(7)
    for trial in range(400):
        pairs = [(f"m{i}", _random_member(rng)) for i in range(int(rng.integers(1, 6)))]
        members = Members.from_pairs(pairs)
        keys = [name for name, _ in pairs]
        order = rng.permutation(len(pairs)) if rng.random() < 0.5 else None

        def run(members=members, keys=keys, order=order):
            headed = split_headed(members)
            quarantine: list = []
            columns, counts = headed.parse(keys, 3, quarantine=quarantine, order=order)
            return headed, [c.tolist() for c in columns], counts.tolist(), quarantine

        (a, a_cols, a_counts, a_q), (b, b_cols, b_counts, b_q) = _both_paths(monkeypatch, run)
        assert a.body_starts.tolist() == b.body_starts.tolist(), (trial, pairs)
        assert a.rows.tolist() == b.rows.tolist() and a.missing_newline.tolist() == b.missing_newline.tolist()
        assert [[x.tolist() for x in level] for level in a.header_lines] == \
            [[x.tolist() for x in level] for level in b.header_lines], (trial, pairs)
        assert (a_cols, a_counts, a_q) == (b_cols, b_counts, b_q), (trial, pairs)


@pytest.mark.skipif(compiled is None, reason="compiled kernels not built")
def test_more_header_lines_than_the_compiled_scan_holds_go_the_numpy_way(monkeypatch):
    member = b"".join(b"#line %d\n" % i for i in range(100)) + b"1 2 3\n"
    members = Members.from_pairs([("m", member), ("n", b"#h\n4 5 6\n")])
    a, b = _both_paths(monkeypatch, lambda: split_headed(members))
    assert len(a.header_lines) == len(b.header_lines) == 100
    assert a.body_starts.tolist() == b.body_starts.tolist() and a.rows.tolist() == b.rows.tolist() == [1, 1]


@pytest.mark.skipif(compiled is None, reason="compiled kernels not built")
def test_the_real_macho_sample_reads_the_same_either_way(monkeypatch):
    reader = get_reader("macho")
    folder = shared_path("data", "macho_sample")
    for path in sorted(folder.glob("*.tar.bz2"))[:6]:
        item = Input(key=path.name, url=str(path), size=os.path.getsize(path))
        a, b = _both_paths(monkeypatch, lambda item=item: reader.read(item, {}).to_table(source_sha256="s",
                                                                                      ingest_id="i"))
        assert a.num_rows > 0 and a.equals(b), path.name


@pytest.mark.skipif(compiled is None, reason="compiled kernels not built")
def test_selected_percentiles_equal_the_sorted_ones_bit_for_bit(monkeypatch):
    from astromer.lake import schema

    rng = np.random.default_rng(11)
    lengths = rng.integers(0, 300, 400)
    lengths[[3, 50]] = 0                                          # empty curves
    offsets = np.r_[0, np.cumsum(lengths)]
    mag = np.round(rng.normal(15, 0.3, offsets[-1]), 2)            # many ties
    good = rng.random(offsets[-1]) > 0.1
    good[offsets[7]:offsets[8]] = False                           # a curve without any good row
    for quantiles in [(0.01, 0.99), (0.5,), (0.0, 0.25, 1.0)]:
        python_path, kernel_path = _both_paths(
            monkeypatch, lambda q=quantiles: schema._curve_percentiles(mag, good, offsets, lengths, q))
        for a, b in zip(python_path, kernel_path):
            assert np.array_equal(a.view(np.int64), b.view(np.int64)), quantiles


def _random_curves(rng, sorted_in_time=True):
    lengths = rng.integers(0, 400, 40)
    lengths[[0, 7]] = 0, 3_000            # an empty curve; one long enough for quickselect (1% rank > 16)
    offsets = np.r_[0, np.cumsum(lengths)].astype(np.int64)
    n = int(offsets[-1])
    mjd = np.concatenate([np.sort(rng.uniform(0, 100, k)) for k in lengths])
    mjd[: n // 2] = np.round(mjd[: n // 2])                               # duplicate times
    mag = np.round(rng.normal(15, 1, n), 1)                                # ties
    err = rng.choice([0.01, 0.2, 1.0, 1.5, 0.0, -0.1], n, p=[0.6, 0.2, 0.05, 0.05, 0.05, 0.05])
    mag[rng.integers(0, n, 20)] = np.nan
    err[rng.integers(0, n, 5)] = np.inf
    mjd[rng.integers(0, n, 5)] = np.nan
    err[offsets[3]:offsets[4]] = 2.0                                     # a curve without a good row
    err[rng.integers(0, n, 10)] = 1.00000001                             # above one, but 1.0 as stored
    mag[rng.integers(0, n, 10)] += 1e-9                                  # apart in float64, equal as stored
    if not sorted_in_time:
        lo = offsets[5]
        mjd[lo], mjd[lo + 1] = mjd[lo + 1] + 1.0, mjd[lo]
    return mjd, mag, err, offsets


@pytest.mark.skipif(compiled is None, reason="compiled kernels not built")
@pytest.mark.parametrize("seed", range(4))
def test_compiled_quality_flags_equal_the_numpy_ones(monkeypatch, seed):
    from astromer.lake import schema

    mjd, mag, err, offsets = _random_curves(np.random.default_rng(seed))
    python_path, kernel_path = _both_paths(
        monkeypatch, lambda: schema.quality_flags(mjd.copy(), mag.copy(), err.copy(), offsets))
    assert schema._flags_compiled(mjd, mag, err, offsets) is not None           # the kernel took them
    flags = kernel_path[3]
    assert np.array_equal(python_path[3], flags)
    for bit in (schema.Quality.NONFINITE, schema.Quality.ERR_NONPOSITIVE, schema.Quality.ERR_ABOVE_ONE,
                schema.Quality.DUPLICATE_TIME, schema.Quality.MAG_PERCENTILE):
        assert (flags & bit).any(), bit                                          # every flag occurs


@pytest.mark.parametrize("compiled_flags", ["0", "1"])
def test_the_first_usable_row_of_a_time_stays_clean(monkeypatch, compiled_flags):
    # a blank magnitude, then a good one at the same time: the good one is no duplicate; a third is
    from astromer.lake import schema

    if compiled_flags == "1" and compiled is None:
        pytest.skip("compiled kernels not built")
    monkeypatch.setenv("ASTROMER_COMPILED", compiled_flags)
    mjd = np.array([1.0, 2.0, 2.0, 2.0, 3.0, 3.0, 4.0])
    mag = np.array([15.0, np.nan, 15.1, 15.2, 15.3, 15.4, 15.5])
    err = np.array([0.02, 0.02, 0.02, 0.02, 2.0, 0.02, 0.02])
    flags = schema.quality_flags(mjd, mag, err, np.array([0, 7]))[3]
    dup = (flags & schema.Quality.DUPLICATE_TIME) != 0
    assert dup.tolist() == [False, False, False, True, False, False, False]
    dropped = schema.CLEANING_MASK & ~schema.Quality.MAG_PERCENTILE       # the extremes' flag aside
    assert (flags & dropped != 0).tolist() == [False, True, False, True, True, False, False]


@pytest.mark.skipif(compiled is None, reason="compiled kernels not built")
def test_compiled_quality_flags_decline_a_curve_out_of_time_order(monkeypatch):
    from astromer.lake import schema

    mjd, mag, err, offsets = _random_curves(np.random.default_rng(9), sorted_in_time=False)
    assert schema._flags_compiled(mjd, mag, err, offsets) is None
    python_path, kernel_path = _both_paths(
        monkeypatch, lambda: schema.quality_flags(mjd.copy(), mag.copy(), err.copy(), offsets))
    assert all(np.array_equal(a, b, equal_nan=True) for a, b in zip(python_path, kernel_path))
    moved = np.flatnonzero(kernel_path[3] & schema.Quality.UNSORTED_SOURCE)
    assert len(moved) >= 2 and offsets[5] <= moved.min() and moved.max() < offsets[6]     # that curve only


@pytest.mark.skipif(compiled is None, reason="compiled kernels not built")
def test_select_ranks_declines_nan_and_matches_a_sort():
    values = np.array([3.0, 1.0, 2.0, 5.0, np.nan, 4.0])
    starts, lengths = np.array([0, 3], np.int64), np.array([3, 3], np.int64)
    ranks = np.array([0, 2, 0, 1], np.int64)
    assert not compiled.select_ranks(values, starts, lengths, ranks, np.empty(4))
    values[4] = -1.0
    out = np.empty(4)
    assert compiled.select_ranks(values, starts, lengths, ranks, out)
    assert out.tolist() == [1.0, 3.0, -1.0, 4.0]
    rng = np.random.default_rng(0)
    big = rng.normal(size=5_000)
    ranks = rng.integers(0, 5_000, 50).astype(np.int64)
    out = np.empty(50)
    assert compiled.select_ranks(big, np.array([0], np.int64), np.array([5_000], np.int64), ranks, out)
    assert out.tolist() == np.sort(big)[ranks].tolist()


@pytest.mark.skipif(compiled is None, reason="compiled kernels not built")
def test_the_real_ogle_sample_reads_the_same_either_way(monkeypatch):
    reader = get_reader("ogle")
    plan = reader.plan(str(shared_path("data", "ogle4_lmc_cepheids")), {})
    for item in plan.inputs[:3]:
        a, b = _both_paths(monkeypatch, lambda item=item: reader.read(item, plan.context).to_table(
            source_sha256="s", ingest_id="i"))
        assert a.num_rows > 0 and a.equals(b), item.key


@pytest.mark.parametrize("delimiter", [b"\xa0", b"\n"])
def test_delimiters_the_kernels_do_not_take_go_the_pyarrow_way(delimiter):
    members = Members.from_pairs([("m", b"#h\n1" + delimiter + b"2" + delimiter + b"3\n")])
    quarantine: list = []
    columns, counts = split_headed(members).parse(["m"], 3, delimiter=delimiter, quarantine=quarantine)
    assert counts.tolist() == [len(columns[0])]     # no error escapes; pyarrow or the row reader decides


@pytest.mark.skipif(compiled is None, reason="compiled kernels not built")
def test_the_compiled_tar_index_equals_the_numpy_one_and_declines_the_same_archives():
    import tarfile

    from astromer.surveys.base import _tar_headers_compiled, _tar_headers_numpy

    rng = np.random.default_rng(5)
    members = [(f"dir{i % 3}/lc_{i}.R.mjd", rng.bytes(int(rng.integers(0, 3000)))) for i in range(200)]
    members.append(("x" * 90 + "/" + "y" * 60 + ".mjd", b"long name\n"))       # the prefix field
    fake = bytearray(1024)
    fake[257:262] = b"ustar"                                                      # a body that looks like a header

    def both(raw):
        blocks = np.frombuffer(raw, dtype=np.uint8, count=len(raw) // 512 * 512).reshape(-1, 512)
        return _tar_headers_compiled(raw, len(blocks)), _tar_headers_numpy(raw, blocks)

    kernel, numpy_index = both(tar_bytes(members, tarfile.USTAR_FORMAT))
    assert kernel is not None and all(np.array_equal(a, b) for a, b in zip(kernel, numpy_index))
    assert len(kernel[0]) == 202 and kernel[2][-1] == ord("5")                  # the folder is listed too
    kernel, numpy_index = both(tar_bytes([("a.mjd", bytes(fake))] + members[:3], tarfile.USTAR_FORMAT))
    assert kernel is not None and numpy_index is None           # the walk from header to header is not fooled
    for raw in (tar_bytes(members, tarfile.GNU_FORMAT),        # a long name: an 'L' header
                tar_bytes(members, tarfile.PAX_FORMAT),        # pax headers
                tar_bytes(members[:3], tarfile.USTAR_FORMAT) + b"\1" * 512,    # bytes after the end
                tar_bytes(members[:3], tarfile.USTAR_FORMAT)[:3000]):                 # cut inside a member
        assert both(raw)[0] is None
    damaged = bytearray(tar_bytes(members[:3], tarfile.USTAR_FORMAT))
    damaged[200] ^= 1                                                             # the checksum no longer holds
    assert both(bytes(damaged)) == (None, None)


def _line_fields(lines: list[bytes], columns: list[int]):
    data = b"\n".join(lines) + b"\n"
    starts = np.cumsum([0] + [len(line) + 1 for line in lines[:-1]]).astype(np.int64)
    ends = starts + np.array([len(line) for line in lines], dtype=np.int64)
    out = np.full((len(columns), len(lines)), np.nan)
    return compiled.line_fields(data, starts, ends, np.array(columns, dtype=np.int64), out), out


@pytest.mark.skipif(compiled is None, reason="compiled kernels not built")
def test_line_fields_reads_regular_lines_as_python_does_and_declines_the_rest():
    rng = np.random.default_rng(3)
    formats = ["{:.5f}", "{:.4f}", "{!r}", "{:.6e}", "{:+.3f}", "{:.0f}"]
    lines, expected = [], []
    for k in range(500):
        ra, dec = rng.uniform(0, 24), rng.uniform(-90, 90)
        ra_text, dec_text = formats[k % 6].format(ra), formats[(k + 1) % 6].format(dec)
        lines.append(f"{k} 3 {k % 7} {ra_text} {dec_text} R -4.1 x".encode())
        expected.append((float(ra_text), float(dec_text)))
    count, out = _line_fields(lines, [3, 4])
    assert count == 8
    assert np.array_equal(out.T.view(np.int64), np.array(expected).view(np.int64))
    good = b"1 0 0 4.92779 -66.2816 B"
    for bad in [b"1 0 0 4.9  -66.2816 B", b"1 0 0 4.9 -66.2816 B ", b" 1 0 0 4.9 -66.2816 B",
                b"1\t0 0 4.9 -66.2816 B", b'1 0 "0" 4.9 -66.2816 B', "1 0 0 4.9 -66.2816 \u00e9".encode(),
                b"1 0 0 4.9 -66.2816", b"1 0 0 4.9 -66.2816 B extra", b"1 0 0 nan -66.2816 B",
                b"1 0 0 4.9h -66.2816 B", b"1 0 0 4.9 -66.2816 B\r", b""]:
        assert _line_fields([good, bad], [3, 4])[0] == -1, bad
        assert _line_fields([bad, good], [3, 4])[0] == -1, bad
    assert _line_fields([good, good], [3, 4])[0] == 6


@pytest.mark.skipif(compiled is None, reason="compiled kernels not built")
def test_macho_names_and_coordinates_agree_either_way_on_random_archives(monkeypatch):
    from astromer.surveys import macho

    rng = np.random.default_rng(11)
    second_lines = [b"#1 0 %d 4.92779 -66.2816 %s -4.178 -4.178 0.000 0.000", b"#1 0 %d 4.9 -66.28 %s",
                    b"#1 0 %d  4.9 -66.28 %s", b"#1 0 %d 4.9 nan %s", b"#1 0 %d 4.9 %s", b"#MJD Mag %d Err %s"]
    for trial in range(200):
        n = int(rng.integers(1, 40))
        pairs = []
        for i in range(n):
            band = "BR"[i % 2]
            line = second_lines[0 if rng.random() < 0.8 else int(rng.integers(1, len(second_lines)))]
            header = b"#Field Tile Seq RA Dec Filter\n" + line % (i, band.encode()) + b"\n#MJD Mag Err\n"
            name = f"lc_1.0.{i}.{band}.mjd" if rng.random() < 0.95 else f"odd_{i}.mjd"
            pairs.append((name, header + b"48802.1 -4.1 0.1\n"))
        members = Members.from_pairs(pairs)
        keys = [f"in::{name}" for name, _ in pairs]

        def run(members=members, keys=keys):
            from astromer.surveys.base import Batch
            batch = Batch()
            found = macho._identify_all(members, split_headed(members), keys, batch)
            return found, batch.quarantine

        a, b = _both_paths(monkeypatch, run)
        assert repr(a) == repr(b), (trial, pairs)      # repr: a nan Dec equals itself


@pytest.mark.parametrize("compiled_flags", ["0", "1"])
def test_flags_judge_magnitudes_and_errors_as_the_lake_stores_them(monkeypatch, compiled_flags):
    # an error of 1.00000001 is 1.0 in float32: not above one; a magnitude 1e-9 above the 99th percentile's
    # value is that value as stored: not outside
    from astromer.lake import schema

    if compiled_flags == "1" and compiled is None:
        pytest.skip("compiled kernels not built")
    monkeypatch.setenv("ASTROMER_COMPILED", compiled_flags)
    mjd = np.arange(5, dtype=np.float64)
    mag = np.array([15.0, 15.0, 15.0, 15.0, 15.0 + 1e-9])
    err = np.array([0.02, 1.00000001, 1.5, 0.02, 0.02])
    flags = schema.quality_flags(mjd, mag, err, np.array([0, 5]))[3]
    assert flags.tolist() == [0, 0, int(schema.Quality.ERR_ABOVE_ONE), 0, 0]
