"""The Ray Data pretraining pipeline on a small real lake: split, cleaning, windows and probe selection."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from astromer.config import MaskConfig
from astromer.data import DataSpec, make_datasets, make_windows, partition_paths, split_of
from astromer.lake.paths import LakePaths
from astromer.lake.schema import LABELS, LIGHTCURVES, quality_flags
from astromer.windows import probe_counts

LENGTH = 64   # the tiny preset's window


def write_lake(root: Path, n_curves: int = 120, *, survey: str = "synthetic", band: str = "V", seed: int = 0,
               n_obs=(40, 160), amplitude=(0.03, 0.12), scale: float = 1.0, labels: bool = False) -> Path:
    """A lake partition of periodic curves in the lake schema (quality flags computed as the ingest does).
    ``scale`` multiplies the variability (a huge scale makes the loss overflow: the NaN test)."""
    rng = np.random.default_rng(seed)
    rows = {name: [] for name in LIGHTCURVES.names}
    classes = []
    for i in range(n_curves):
        n = int(rng.integers(*n_obs))
        mjd = np.sort(rng.uniform(50000, 51500, n))
        period = rng.uniform(0.3, 30)
        amp = rng.uniform(*amplitude)
        err = rng.uniform(0.005, 0.03, n)
        mag = 15 + scale * amp * np.sin(2 * np.pi * mjd / period + rng.uniform(0, 6.3)) + rng.normal(0, err)
        mjd, mag, err, quality = quality_flags(mjd, mag, err, np.array([0, n]))
        for name, value in (("object_id", f"SYN-{seed}-{i:05d}"), ("ra", 10.0), ("dec", -5.0), ("mjd", mjd),
                            ("mag", mag.astype(np.float32)), ("err", err.astype(np.float32)), ("n_obs", n),
                            ("quality", quality), ("source_file", "memory"), ("source_sha256", "0" * 64),
                            ("ingest_id", "test")):
            rows[name].append(value)
        classes.append("short" if period < 5 else "long")
    paths = LakePaths(str(root))
    folder = Path(paths.lightcurves(survey, band))
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(rows, schema=LIGHTCURVES), folder / f"part-{seed:05d}.parquet", row_group_size=50)
    if labels:
        label_dir = Path(paths.labels(survey))
        label_dir.mkdir(parents=True, exist_ok=True)
        table = pa.table({"object_id": rows["object_id"], "label_set": ["class"] * n_curves, "label": classes},
                         schema=LABELS)
        pq.write_table(table, label_dir / f"part-{seed:05d}.parquet")
    return root


@pytest.fixture(scope="module")
def small_lake(tmp_path_factory):
    root = tmp_path_factory.mktemp("lake")
    write_lake(root, 150, band="V", seed=0)
    write_lake(root, 30, band="B", seed=1)
    return root


def test_split_is_deterministic_disjoint_and_by_object():
    ids = [f"OBJ-{i}" for i in range(4000)]
    splits = [split_of("s", "V", o, val_fraction=0.1, test_fraction=0.2) for o in ids]
    assert splits == [split_of("s", "V", o, val_fraction=0.1, test_fraction=0.2) for o in ids]
    # all bands of an object share a split, so no test object is ever trained on
    assert splits == [split_of("s", "B", o, val_fraction=0.1, test_fraction=0.2) for o in ids]
    counts = {s: splits.count(s) / len(ids) for s in ("train", "val", "test")}
    assert abs(counts["test"] - 0.2) < 0.03 and abs(counts["val"] - 0.1) < 0.03
    # a different seed gives a different split
    other = [split_of("s", "V", o, val_fraction=0.1, test_fraction=0.2, seed=1) for o in ids]
    assert other != splits


def test_validation_digest_follows_what_decides_the_validation_windows(tmp_path):
    import pyarrow as pa
    from astromer.config import MaskConfig
    from astromer.data import validation_digest
    from astromer.lake.paths import LakePaths
    from astromer.lake.schema import MANIFEST
    from astromer.lake.writers import write_parquet

    lake = str(tmp_path / "lightcurves" / "lake")    # a lake whose own address holds /lightcurves/
    units = [{"url": f"{lake}/lightcurves/survey=a/band=V/part-00000.parquet", "row_group": 0, "rows": 10,
              "survey": "a", "band": "V"}]
    spec = DataSpec(lake=lake)
    digest = validation_digest(spec, units)
    # how the stream runs, how the selection was named, or where the lake is reached do not change the windows
    assert validation_digest(DataSpec(lake=lake, data_cpus=1.0, read_tasks=4, pass_clock="c"), units) == digest
    assert validation_digest(DataSpec(lake=lake, surveys=["a"], bands=["V"]), units) == digest
    assert validation_digest(spec, [{**units[0], "url": "file://" + units[0]["url"]}]) == digest
    for other in (DataSpec(lake=lake, seed=1), DataSpec(lake=lake, val_fraction=0.2),
                  DataSpec(lake=lake, window_length=100), DataSpec(lake=lake, mask=MaskConfig(probed=0.4)),
                  DataSpec(lake=lake, drop_noisy=False), DataSpec(lake=lake, labels=["x"])):
        assert validation_digest(other, units) != digest, other
    assert validation_digest(spec, [{**units[0], "rows": 11}]) != digest      # other row groups
    # the same layout with other content: another ingest published
    manifest = pa.table({"input": ["f"], "url": ["f"], "size": pa.array([1], pa.int64()), "sha256": ["0"],
                         "curves": pa.array([10], pa.int64()), "observations": pa.array([100], pa.int64()),
                         "status": ["ok"], "ingest_id": ["abc"]}, schema=MANIFEST)
    paths = LakePaths(lake)
    write_parquet(paths.fs, manifest, f"{paths.ingest('a')}/manifest.parquet")
    assert validation_digest(spec, units) != digest


def test_cleaning_report_counts_what_the_windows_drop(ray_local, tmp_path):
    from astromer.data import cleaning_report, read_lightcurves

    root = write_lake(tmp_path / "lake", 60, band="V", seed=3, n_obs=(4, 40))
    spec = DataSpec(lake=str(root), val_fraction=0.2, test_fraction=0.2, min_observations=10)
    report = cleaning_report(spec)
    table = pq.read_table(next((root / "lightcurves").rglob("*.parquet")))
    n_obs = table.column("n_obs").to_numpy()
    assert report["all"]["curves"] == 60 and report["all"]["observations"] == int(n_obs.sum())
    assert sum(report[s]["curves"] for s in ("train", "val", "test")) == 60
    # curves with fewer than 5 clean observations, then fewer than min_observations, are rejected
    from astromer.lake.schema import CLEANING_MASK

    clean = np.array([int(((np.asarray(q) & CLEANING_MASK) == 0).sum()) for q in table.column("quality").to_pylist()])
    rejected = report["all"]["rejected_curves"]
    assert rejected.get("too_few_observations", 0) == int((clean < 5).sum()) > 0
    assert rejected.get("fewer_than_min_observations", 0) == int(((clean >= 5) & (clean < 10)).sum()) > 0
    assert report["all"]["kept_observations"] == int(clean[clean >= 10].sum())
    # the usable curves are exactly the ones the window pipeline turns into windows
    source = read_lightcurves(spec)
    windows = sum(len(b["object_id"]) for split in ("train", "val", "test")
                  for b in source.map_batches(make_windows, fn_kwargs={"spec": spec, "split": split, "fixed": True},
                                              batch_format="numpy").iter_batches(batch_size=None))
    assert report["all"]["usable_curves"] == windows


def test_partition_selection(small_lake):
    assert [Path(p).name for p in partition_paths(str(small_lake))] == ["band=B", "band=V"]
    assert [Path(p).name for p in partition_paths(str(small_lake), bands=["V"])] == ["band=V"]
    with pytest.raises(FileNotFoundError, match="no lightcurves for surveys"):
        partition_paths(str(small_lake), surveys=["ogle"])
    with pytest.raises(ValueError, match="invalid survey"):
        LakePaths(str(small_lake)).lightcurves("../x")


def test_read_lightcurves_reads_every_row_group_once(ray_local, small_lake, tmp_path):
    from astromer.data import read_lightcurves, row_groups

    spec = DataSpec(lake=str(small_lake))
    units = row_groups(spec)
    # one read unit per row group (row_group_size=50: 150 curves -> 3, 30 -> 1), survey and band from the folder
    assert sorted((u["band"], u["row_group"]) for u in units) == [("B", 0), ("V", 0), ("V", 1), ("V", 2)]
    assert {u["survey"] for u in units} == {"synthetic"}
    want = pa.concat_tables([pq.read_table(f) for f in sorted((small_lake / "lightcurves").rglob("*.parquet"))])
    for tasks in (1, 3):       # one task streams through every row group; three split them
        ds = read_lightcurves(DataSpec(lake=str(small_lake), read_tasks=tasks))
        rows = ds.take_all()
        got = {(r["band"], r["object_id"]): r for r in rows}
        assert len(rows) == len(got) == want.num_rows == 180     # every curve once
        for row in want.to_pylist():
            band = "V" if row["object_id"].startswith("SYN-0-") else "B"
            mine = got[(band, row["object_id"])]
            assert mine["survey"] == "synthetic"
            np.testing.assert_array_equal(mine["mjd"], row["mjd"])
            np.testing.assert_array_equal(mine["quality"], row["quality"])
        assert f"{tasks} tasks executed" in ds.stats()
    # a selection names its partitions; an empty selection fails clearly
    assert {u["band"] for u in row_groups(DataSpec(lake=str(small_lake), bands=["B"]))} == {"B"}
    # the footers are kept between listings, but a file rewritten (an ingest since) is read again
    import astromer.data

    lake = write_lake(tmp_path / "rewritten", 120, seed=4)
    assert [u["rows"] for u in row_groups(DataSpec(lake=str(lake)))] == [50, 50, 20]
    [key] = [k for k in astromer.data._FOOTERS if str(tmp_path / "rewritten") in k[1]]
    astromer.data._FOOTERS[key] = (7, 7)                       # the second listing reads the kept counts
    assert [u["rows"] for u in row_groups(DataSpec(lake=str(lake)))] == [7, 7]
    [file] = (lake / "lightcurves").rglob("*.parquet")
    os.utime(file, ns=(file.stat().st_atime_ns, file.stat().st_mtime_ns + 10**9))   # touched: same size
    assert [u["rows"] for u in row_groups(DataSpec(lake=str(lake)))] == [50, 50, 20]
    pq.write_table(pq.read_table(file).slice(0, 90), file, row_group_size=30)
    assert [u["rows"] for u in row_groups(DataSpec(lake=str(lake)))] == [30, 30, 30]
    empty = tmp_path / "empty"
    Path(LakePaths(str(empty)).lightcurves("synthetic", "V")).mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no lightcurves files"):
        row_groups(DataSpec(lake=str(empty)))


def test_split_units_keeps_order_and_balances_rows():
    from astromer.data import read_task_count, split_units

    units = [{"url": f"f{i // 4}", "row_group": i % 4, "rows": rows} for i, rows in enumerate([2048] * 10 + [500, 30])]
    for tasks in (1, 2, 3, 5, 12, 40):
        runs = split_units(units, tasks)
        assert [u for run in runs for u in run] == units            # every unit once, in lake order
        assert len(runs) == min(tasks, len(units))
        share = sum(u["rows"] for u in units) / len(runs)
        assert all(sum(u["rows"] for u in run) < share + 2048 for run in runs)   # a share and one row group
    assert [len(r) for r in split_units(units, 2)] == [6, 6]
    assert read_task_count(DataSpec(lake="x", read_tasks=3), units=2) == 2   # never more tasks than row groups
    assert read_task_count(DataSpec(lake="x", read_tasks=3), units=10) == 3
    assert read_task_count(DataSpec(lake="x"), units=10) >= 1


def test_deal_units_mixes_surveys_and_balances_rows():
    from astromer.data import deal_units

    units = ([{"survey": "ogle", "row_group": g, "rows": 2048} for g in range(4)]
             + [{"survey": "asas", "row_group": g, "rows": 2048} for g in range(4)] + [{"survey": "macho", "rows": 30}])
    for tasks in (1, 2, 3, 9, 20):
        shares = deal_units(units, tasks)
        assert len(shares) == min(tasks, len(units))
        assert sorted(id(u) for share in shares for u in share) == sorted(id(u) for u in units)   # each once
        rows = [sum(u["rows"] for u in share) for share in shares]
        assert max(rows) - min(rows) <= 2048
    # split in two, each task holds both surveys (consecutive runs would give one survey to each)
    assert all({u["survey"] for u in share} >= {"ogle", "asas"} for share in deal_units(units, 2))


def test_training_read_deals_and_reorders_row_groups_every_pass(ray_local, tmp_path):
    from astromer.data import read_lightcurves

    root = write_lake(tmp_path / "lake", 1000, band="V", seed=2, n_obs=(10, 30))      # 20 row groups of 50
    spec = DataSpec(lake=str(root), read_tasks=2)
    ds = read_lightcurves(spec, shuffle=True)
    passes = [[r["object_id"] for r in ds.iter_rows()] for _ in range(3)]
    assert all(sorted(p) == sorted(passes[0]) and len(p) == len(set(p)) == 1000 for p in passes)  # every curve once
    assert len({tuple(p) for p in passes}) == 3                   # a new order on every pass
    fixed = [r["object_id"] for r in read_lightcurves(spec).iter_rows()]
    assert fixed == [r["object_id"] for r in read_lightcurves(spec).iter_rows()]   # validation's read: lake order


def test_a_pass_clock_seeds_the_training_read_and_windows(ray_local, tmp_path):
    """A reproducible run's training stream: the same pass reads the row groups in the same order and draws the
    same windows and masks; the next pass draws others; the clock's pass travels in the ``pass`` column."""
    import ray
    from astromer.data import PASS_COLUMN, read_lightcurves, set_pass, start_pass_clock, window_dataset

    root = write_lake(tmp_path / "lake", 600, band="V", seed=2, n_obs=(80, 160))      # 12 row groups of 50
    spec = DataSpec(lake=str(root), read_tasks=2, window_length=LENGTH, pass_clock="test-pass-clock")
    clock = start_pass_clock(spec.pass_clock)
    context = ray.data.DataContext.get_current()
    preserve_order = context.execution_options.preserve_order
    context.execution_options.preserve_order = True
    try:
        ds = read_lightcurves(spec, shuffle=True)
        windows = window_dataset(spec, "train", ds)

        def one_pass(epoch):
            set_pass(spec.pass_clock, epoch)
            rows = [(r["object_id"], r[PASS_COLUMN]) for r in ds.iter_rows()]
            return rows, _collect(windows)

        (rows_a, first), (rows_b, again), (rows_c, second) = one_pass(3), one_pass(3), one_pass(4)
        assert {p for _, p in rows_a} == {3} and {p for _, p in rows_c} == {4}
        # the job keeps the stream's order in a reproducible run (two read tasks interleave otherwise)
        assert rows_a == rows_b and sorted(rows_a) != rows_a
        assert [o for o, _ in rows_c] != [o for o, _ in rows_a] and sorted(o for o, _ in rows_c) == sorted(
            o for o, _ in rows_a)
        by_a = {o: k for k, o in enumerate(first["object_id"])}
        by_b = {o: k for k, o in enumerate(again["object_id"])}
        by_c = {o: k for k, o in enumerate(second["object_id"])}
        assert set(by_a) == set(by_b) == set(by_c)
        for column in ("times", "target", "mags_in", "probed", "hidden"):
            assert all(np.array_equal(first[column][by_a[o]], again[column][by_b[o]]) for o in by_a), column
        moved = [o for o in by_a if not np.array_equal(first["probed"][by_a[o]], second["probed"][by_c[o]])]
        assert len(moved) > 0.9 * len(by_a)
        # without a clock, fresh entropy: the same pass twice draws different masks
        plain = window_dataset(DataSpec(lake=str(root), read_tasks=2, window_length=LENGTH), "train")
        fresh = [_collect(plain) for _ in range(2)]
        by = [{o: k for k, o in enumerate(f["object_id"])} for f in fresh]
        assert sum(not np.array_equal(fresh[0]["probed"][by[0][o]], fresh[1]["probed"][by[1][o]])
                   for o in by[0]) > 0.9 * len(by[0])
    finally:
        context.execution_options.preserve_order = preserve_order
        ray.kill(clock)


def _collect(ds) -> dict[str, np.ndarray]:
    parts = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def test_a_batch_without_windows_keeps_the_column_types(ray_local, tmp_path):
    """A block with no window (a row group whose curves are all in other splits, or all cleaned away) has
    the tensor columns of the others, not pickled Python objects."""
    import pyarrow as pa
    from astromer.data import window_dataset
    from ray.data.extensions import ArrowTensorType, ArrowTensorTypeV2

    lake = write_lake(tmp_path / "lake", 120, seed=2)        # three row groups
    spec = DataSpec(lake=str(lake), window_length=LENGTH, val_fraction=0.01, test_fraction=0.01, read_tasks=3)
    ds = window_dataset(spec, "test")                          # about one curve: two blocks with none
    blocks = list(ds.iter_internal_ref_bundles())
    assert len(blocks) == 3
    types = {str(pa.table(t).schema.field("times").type)
             for t in ray_local.get([ref for bundle in blocks for ref in bundle.block_refs])}
    assert len(types) == 1 and isinstance(pa.table(ray_local.get(blocks[0].block_refs[0])).schema.field(
        "times").type, (ArrowTensorType, ArrowTensorTypeV2)), types


def test_windows_masks_fresh_per_epoch_and_fixed_validation(ray_local, small_lake):
    mask = MaskConfig()
    spec = DataSpec(lake=str(small_lake), bands=["V"], window_length=LENGTH, mask=mask, val_fraction=0.2,
                    test_fraction=0.2, data_cpus=0.25)
    datasets = make_datasets(spec)
    epoch1, epoch2 = _collect(datasets["train"]), _collect(datasets["train"])
    val1, val2 = _collect(datasets["val"]), _collect(datasets["val"])
    test = _collect(datasets["test"])

    ids = {name: set(batch["object_id"]) for name, batch in (("train", epoch1), ("val", val1), ("test", test))}
    assert not ids["train"] & ids["val"] and not ids["train"] & ids["test"] and not ids["val"] & ids["test"]
    assert len(ids["train"]) + len(ids["val"]) + len(ids["test"]) == 150 - _rejected(small_lake)
    assert all(i.startswith("SYN-0-") for s in ids.values() for i in s)        # band V only

    for batch in (epoch1, val1, test):
        real = ~batch["padding"]
        n_valid = real.sum(1)
        assert batch["times"].shape[1] == LENGTH and n_valid.min() >= 10
        n_probed, n_same, n_random = probe_counts(n_valid, mask)
        np.testing.assert_array_equal(batch["probed"].sum(1), n_probed)
        np.testing.assert_array_equal(batch["hidden"].sum(1), n_probed - n_same - n_random)
        assert not (batch["probed"] & batch["padding"]).any()
        assert not (batch["hidden"] & ~batch["probed"]).any()
        # centred windows: mean of real magnitudes and times is 0; padding is 0
        mean_mag = (batch["target"] * real).sum(1) / n_valid
        np.testing.assert_allclose(mean_mag, 0, atol=1e-4)
        assert (batch["target"][batch["padding"]] == 0).all() and (batch["times"][batch["padding"]] == 0).all()
        # the model sees the true value except on probed observations
        assert np.array_equal(batch["mags_in"][~batch["probed"]], batch["target"][~batch["probed"]])
        changed = (batch["mags_in"] != batch["target"]) & batch["probed"] & ~batch["hidden"]
        assert changed.sum() > 0                                                # some random replacements

    def by_object(batch):
        return {o: k for k, o in enumerate(batch["object_id"])}

    # training windows and selections are drawn anew on every pass over the data ...
    i1, i2 = by_object(epoch1), by_object(epoch2)
    assert set(i1) == set(i2)
    long_curves = [o for o in i1 if epoch1["padding"][i1[o]].sum() == 0]          # curves longer than a window
    moved = [o for o in long_curves if not np.array_equal(epoch1["times"][i1[o]], epoch2["times"][i2[o]])]
    assert len(moved) > 0.8 * len(long_curves)
    reselected = [o for o in i1 if not np.array_equal(epoch1["probed"][i1[o]], epoch2["probed"][i2[o]])]
    assert len(reselected) > 0.9 * len(i1)
    # ... while validation windows and masks are identical on every pass
    v1, v2 = by_object(val1), by_object(val2)
    assert set(v1) == set(v2)
    for o in v1:
        for column in ("times", "target", "mags_in", "probed", "hidden"):
            np.testing.assert_array_equal(val1[column][v1[o]], val2[column][v2[o]])


def _rejected(root: Path) -> int:
    """Curves of band V that the cleaning or the minimum length rejects (computed directly)."""
    from astromer.lake.cleaning import clean_curve

    table = pq.read_table(Path(LakePaths(str(root)).lightcurves("synthetic", "V")))
    rejected = 0
    for mjd, mag, err, quality in zip(*(table[c].to_pylist() for c in ("mjd", "mag", "err", "quality"))):
        result = clean_curve(np.array(mjd), np.array(mag), np.array(err), np.array(quality, np.uint8))
        rejected += (not result.usable) or result.keep.sum() < 10
    return rejected


@pytest.mark.parametrize("clean", [True, False])
def test_flat_training_windows_match_the_curve_by_curve_ones(tmp_path, clean):
    """make_windows on an Arrow batch (the stream's: all curves at once) against the same batch as numpy
    columns (curve by curve): the same curves, each window a slice of its cleaned curve, centred the same."""
    from astromer.data import read_row_group, row_groups
    from astromer.lake.cleaning import clean_curve

    root = write_lake(tmp_path / "lake", 200, band="V", seed=5, n_obs=(4, 400), amplitude=(0.02, 2.0))
    spec = DataSpec(lake=str(root), window_length=LENGTH, val_fraction=0.2, test_fraction=0.1, clean=clean)
    table = pa.concat_tables([read_row_group(u) for u in row_groups(spec)])
    table = table.append_column("label", pa.array([f"class-{i % 3}" for i in range(table.num_rows)]))
    columns = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
    flat, one_by_one = make_windows(table, spec, "train", False), make_windows(columns, spec, "train", False)
    assert sorted(flat["object_id"]) == sorted(one_by_one["object_id"]) and len(flat["object_id"]) > 60
    # both in a random order of their own, not the row group's
    in_lake_order = [o for o in columns["object_id"] if o in set(flat["object_id"])]
    assert list(flat["object_id"]) != in_lake_order and list(one_by_one["object_id"]) != in_lake_order
    other = {o: k for k, o in enumerate(one_by_one["object_id"])}
    pairs = [(k, other[o]) for k, o in enumerate(flat["object_id"])]
    assert all(flat["label"][k] == one_by_one["label"][j] for k, j in pairs)
    assert all(flat["padding"][k].sum() == one_by_one["padding"][j].sum() for k, j in pairs)
    rows = {o: i for i, o in enumerate(columns["object_id"])}
    for k, object_id in enumerate(flat["object_id"]):
        i = rows[object_id]
        mjd, mag = np.asarray(columns["mjd"][i]), np.asarray(columns["mag"][i], np.float32)
        err = np.asarray(columns["err"][i], np.float32)
        keep = (clean_curve(mjd, mag, err, np.asarray(columns["quality"][i], np.uint8)).keep if clean
                else np.isfinite(mjd) & np.isfinite(mag) & np.isfinite(err))
        real = ~flat["padding"][k]
        n = int(real.sum())
        # the window's times, centred, are a contiguous run of the kept times, centred
        kept_times = mjd[keep]
        starts = [s for s in range(len(kept_times) - n + 1)
                  if np.allclose(kept_times[s:s + n] - kept_times[s:s + n].mean(), flat["times"][k][real], atol=1e-3)]
        assert len(starts) == 1 and n == min(len(kept_times), LENGTH), object_id
        s = starts[0]
        np.testing.assert_allclose(flat["target"][k][real], mag[keep][s:s + n] - mag[keep][s:s + n].mean(), atol=1e-5)
        np.testing.assert_array_equal(flat["errs"][k][real], err[keep][s:s + n])
    # a batch without flags (a lake written without them) goes curve by curve, computing them as the ingest does
    no_flags = table.set_column(table.column_names.index("quality"), "quality",
                                pa.nulls(table.num_rows, pa.list_(pa.uint8())))
    assert sorted(make_windows(no_flags, spec, "train", False)["object_id"]) == sorted(flat["object_id"])


@pytest.mark.parametrize("clean", [True, False])
def test_flat_cleaning_counts_match_the_curve_by_curve_ones(tmp_path, clean):
    """count_cleaning on an Arrow batch (all curves at once) against the same batch as numpy columns."""
    import json

    from astromer.data import count_cleaning, read_row_group, row_groups

    root = write_lake(tmp_path / "lake", 200, band="V", seed=6, n_obs=(3, 300), amplitude=(0.02, 2.0))
    spec = DataSpec(lake=str(root), val_fraction=0.2, test_fraction=0.2, min_observations=12, clean=clean)
    table = pa.concat_tables([read_row_group(u) for u in row_groups(spec)])
    # one curve made noisy by a few extreme one-sided points (all three criteria)
    rng = np.random.default_rng(1)
    t = np.sort(rng.uniform(50000, 50100, 300))
    spiky = 15 + rng.normal(0, 0.01, t.size)
    spiky[rng.choice(t.size, 12, replace=False)] += 1.5
    mjd, mag, err, quality = quality_flags(t, spiky, np.full(t.size, 0.02), np.array([0, t.size]))
    extra = pa.table({"object_id": ["SPIKY"], "mjd": [mjd], "mag": [mag.astype(np.float32)],
                      "err": [err.astype(np.float32)], "quality": [quality], "survey": ["synthetic"], "band": ["V"]},
                     schema=table.schema)
    table = pa.concat_tables([table, extra])
    columns = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}

    def report(batch):
        out = count_cleaning(batch, spec)
        return {str(s): json.loads(str(j)) for s, j in zip(out["split"], out["stats"])}

    flat, one_by_one = report(table), report(columns)
    assert flat == one_by_one
    rejected = {r for split in flat.values() for r in split["rejected_curves"]}
    assert sum(split["curves"] for split in flat.values()) == 201
    if clean:
        assert {"too_few_observations", "fewer_than_min_observations", "noisy"} <= rejected
        assert any(split["dropped_by_flag"] for split in flat.values())
    else:
        assert rejected == {"fewer_than_min_observations"}


@pytest.mark.parametrize("split", ["val", "test"])
def test_flat_fixed_windows_are_the_curve_by_curve_ones(tmp_path, split):
    """The fixed validation and test windows, cut for a whole Arrow batch, take the same starts and the same
    probe selections from the same per-curve generators as the curve-by-curve path."""
    from astromer.data import read_row_group, row_groups

    root = write_lake(tmp_path / "lake", 300, band="V", seed=7, n_obs=(4, 400), amplitude=(0.02, 2.0))
    spec = DataSpec(lake=str(root), window_length=LENGTH, val_fraction=0.3, test_fraction=0.3)
    table = pa.concat_tables([read_row_group(u) for u in row_groups(spec)])
    columns = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
    flat, one_by_one = make_windows(table, spec, split, True), make_windows(columns, spec, split, True)
    assert list(flat["object_id"]) == list(one_by_one["object_id"]) and len(flat["object_id"]) > 40
    for name in ("padding", "probed", "hidden"):
        np.testing.assert_array_equal(flat[name], one_by_one[name], err_msg=name)
    for name in ("times", "target", "mags_in", "errs"):
        np.testing.assert_allclose(flat[name], one_by_one[name], atol=2e-5, rtol=0, err_msg=name)
    assert (flat["mags_in"] != flat["target"]).any()                 # random replacements happen
    # and the same again on another call: fixed means fixed
    again = make_windows(table, spec, split, True)
    for name in ("times", "mags_in", "probed", "hidden"):
        np.testing.assert_array_equal(again[name], flat[name])


def test_parts_written_with_nullable_observation_elements_read_in_the_lakes_types(tmp_path):
    # lakes written before the observations' elements were declared non-null: their units come out in
    # the same types as the new parts', so that Ray Data can put both in one block
    from astromer.data import read_row_group

    write_lake(tmp_path, 20, band="V", seed=0)
    new_file = next((tmp_path / "lightcurves").rglob("*.parquet"))
    old_schema = pa.schema([pa.field(f.name, pa.list_(f.type.value_type), nullable=f.nullable)
                            if pa.types.is_list(f.type) else f for f in LIGHTCURVES])
    old_file = new_file.with_name("part-old.parquet")
    pq.write_table(pq.read_table(new_file).cast(old_schema), old_file)
    assert pq.read_schema(old_file).field("mjd").type.value_field.nullable
    assert not pq.read_schema(new_file).field("mjd").type.value_field.nullable
    units = [read_row_group({"url": str(path), "row_group": 0, "survey": "synthetic", "band": "V"})
             for path in (old_file, new_file)]
    assert units[0].schema == units[1].schema and units[0].equals(units[1])
    assert pa.concat_tables(units).num_rows == 2 * units[0].num_rows
