"""Readers' building blocks and the simulator: fast paths agree with the slow ones, the simulator is
deterministic, partition-independent and labelled with realistic periods and amplitudes."""
from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
from astromer.surveys import get_reader
from astromer.surveys.base import ArchiveError, Batch, parse_bodies, parse_numeric, split_header, split_tar
from astromer.surveys.synthetic import CLASSES, SyntheticReader, parse_spec, simulate_object, variability
from conftest import shared_path


def test_split_tar_matches_tarfile_on_a_real_archive():
    import bz2

    raw = bz2.decompress(shared_path("data", "macho_sample", "lc_1.3444.614.tar.bz2").read_bytes())
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        expected = [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]
    assert list(split_tar(raw)) == expected
    with pytest.raises(ArchiveError):
        list(split_tar(raw[: len(raw) // 2]))


def test_split_header_and_fast_parser_agree_with_the_row_parser():
    header, body = split_header(b"#a b\n#c\n1.5 2 3\n4 5 6\n")
    assert header == [b"#a b", b"#c"] and body == b"1.5 2 3\n4 5 6\n"
    assert parse_numeric(body, 3).tolist() == [[1.5, 2, 3], [4, 5, 6]]
    # a short row and a long row add up to the right count: the per-line check still catches them
    bad: list = []
    rows = parse_numeric(b"1 2 3\n4 5\n6 7 8 9\n10 11 12\n", 3, name="f", quarantine=bad, first_line=4)
    assert rows.tolist() == [[1, 2, 3], [10, 11, 12]]
    assert bad[0][:2] == ("f", "wrong_column_count") and "line 5" in bad[0][2] and "line 6" in bad[0][2]
    columns, counts = parse_bodies([b"1 2 3\n", b"4 5 6\n7 8 9", b""], ["a", "b", "c"], 3)
    assert counts.tolist() == [1, 2, 0] and columns[0].tolist() == [1, 4, 7]
    quarantine: list = []
    columns, counts = parse_bodies([b"1 2 3\n", b"4 x 6\n7 8 9\n"], ["a", "b"], 3, quarantine=quarantine)
    assert counts.tolist() == [1, 1] and columns[1].tolist() == [2, 8]
    assert quarantine == [("b", "non_numeric", "1 row(s) dropped: line 1: b'4 x 6'")]


def test_batch_rejects_names_that_could_become_paths():
    batch = Batch()
    assert not batch.add_curve("../x", "R", [1.0], [1.0], [0.1], source_file="f")
    assert not batch.add_curve("a/b", "R", [1.0], [1.0], [0.1], source_file="f")
    assert not batch.add_curve("ok", "R/..", [1.0], [1.0], [0.1], source_file="f")
    assert not batch.add_curve("ok", "R", [], [], [], source_file="f")
    assert batch.add_curve("OGLE-LMC-CEP-0001", "I", [1.0], [1.0], [0.1], source_file="f")
    assert [q[1] for q in batch.quarantine] == ["invalid_object_id", "invalid_object_id", "invalid_band", "empty"]


def test_simulator_is_deterministic_and_partition_independent():
    a = simulate_object(123, seed=5)
    b = simulate_object(123, seed=5)
    assert a["class"] == b["class"] and all(np.array_equal(x, y) for x, y in zip(a["bands"]["R"], b["bands"]["R"]))
    assert not np.array_equal(simulate_object(123, seed=6)["bands"]["R"][1], a["bands"]["R"][1][:1])
    reader = SyntheticReader()
    one = reader.plan("synthetic://?n=30&seed=5&per_partition=30", {})
    three = reader.plan("synthetic://?n=30&seed=5&per_partition=10", {})
    assert len(one.inputs) == 1 and len(three.inputs) == 3
    whole = reader.read(one.inputs[0], {})
    parts = [reader.read(item, {}) for item in three.inputs]
    assert whole.object_id == sum((p.object_id for p in parts), [])
    assert np.array_equal(np.concatenate(whole.mag), np.concatenate([np.concatenate(p.mag) for p in parts]))
    assert whole.labels == sum((p.labels for p in parts), [])
    assert parse_spec("synthetic://?n=7&seed=2")["n"] == 7
    with pytest.raises(ValueError):
        parse_spec("synthetic://?n=0")


def test_simulator_classes_cadence_and_errors_are_realistic():
    objects = [simulate_object(i, seed=1) for i in range(300)]
    by_class = {c: [o for o in objects if o["class"] == c] for c in CLASSES}
    assert all(len(v) >= 10 for v in by_class.values())
    ranges = {"RRab": (0.45, 0.85), "RRc": (0.24, 0.42), "Cepheid": (2, 60), "EB": (0.3, 15), "LPV": (80, 700)}
    for cls, (lo, hi) in ranges.items():
        assert all(lo <= o["period"] <= hi for o in by_class[cls])
    # RR Lyrae ab are saw-tooth: the rise to maximum light (smallest magnitude) takes a small part
    # of the cycle; RR c are nearly sinusoidal (about half of it)
    def rise_fraction(cls, seed):
        rng = np.random.Generator(np.random.Philox(key=seed))
        grid = np.linspace(0, 200, 200_001)
        mags, _, params = variability(cls, rng, grid)
        phase = (grid / params["period"]) % 1.0
        order = np.argsort(phase)
        ph, mg = phase[order], mags[order]
        faint, bright = ph[np.argmax(mg)], ph[np.argmin(mg)]
        return (bright - faint) % 1.0

    assert all(rise_fraction("RRab", s) < 0.3 for s in range(5))
    assert all(0.3 < rise_fraction("RRc", s) < 0.7 for s in range(5))
    assert np.median([rise_fraction("Cepheid", s) for s in range(5)]) < 0.4
    assert all(o["amplitude"] >= 0.5 for o in by_class["RRab"])
    for o in objects[:50]:
        t, m, e = o["bands"]["B"]
        assert np.all(np.diff(t) > 0) and 48800 <= t[0] and t[-1] < 48800 + 7 * 366
        gaps = np.diff(t)
        assert gaps.max() > 80          # seasonal gaps
        assert (gaps < 0.2).any() or len(t) < 30   # several exposures on some nights
        good = e <= 1
        assert (e > 0).all() and good.mean() > 0.98 and np.std(e[good]) > 0   # heteroscedastic, a few bad points
        assert -12 < np.median(m) < -3                                     # MACHO-like instrumental mags


def test_all_readers_are_registered():
    for name in ("macho", "ogle", "asas", "sdss-stripe82", "synthetic", "csv", "parquet"):
        assert get_reader(name).name == name
    with pytest.raises(ValueError):
        get_reader("nope")


def test_macho_unreadable_header_is_quarantined_with_readable_text():
    from astromer.surveys.base import Members
    from astromer.surveys.macho import parse_members

    body = b"48823.477419 -6.081 0.156\n48823.487014 -6.041 0.141\n"
    good = b"#Field Tile Seq RA(hour) Dec(deg) Filter\n#1 3444 614 5.02878 -69.171 B\n#MJD Mag Err\n" + body
    bad = b"#Field Tile Seq RA(hour) Dec(deg) Filter\n#1 3444 615 \xe9t\xe9 -69.171 B\n#MJD Mag Err\n" + body
    batch = Batch()
    parse_members(Members.from_pairs([("lc_1.3444.614.B.mjd", good), ("lc_1.3444.615.B.mjd", bad)]),
                  ["a.tar:614", "a.tar:615"], batch)
    (row,) = [q for q in batch.quarantine if q[1] == "bad_header"]
    assert row[0] == "a.tar:615"
    # the detail is text a reader can read, with the undecodable bytes marked, not a bytes repr
    assert row[2].startswith("header lines: '") and "\ufffdt\ufffd" in row[2] and "b'" not in row[2]
