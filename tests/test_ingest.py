"""The ingest driver's bookkeeping: parts cut while the map stage runs."""
from __future__ import annotations

import numpy as np
from astromer.ingest import PartCutter


def test_part_cutter_cuts_parts_while_markers_arrive_as_if_the_map_had_finished():
    rng = np.random.default_rng(1)
    markers = []
    for index in range(40):
        bands = {b: {"nbytes": int(rng.integers(1, 50))} for b in ("B", "R", "V") if rng.random() < 0.7}
        markers.append({"index": index, "bands": bands})

    def reference(markers, part_bytes):       # per band, consecutive shards up to part_bytes
        groups = []
        for band in sorted({b for m in markers for b in m["bands"]}):
            current, size, part = [], 0, 0
            for m in markers:
                info = m["bands"].get(band)
                if not info:
                    continue
                if current and size + info["nbytes"] > part_bytes:
                    groups.append((band, part, current))
                    current, size, part = [], 0, part + 1
                current.append(m["index"])
                size += info["nbytes"]
            if current:
                groups.append((band, part, current))
        return groups

    for part_bytes in (1, 60, 200, 10_000):
        cutter = PartCutter(part_bytes)
        streamed = []
        for m in markers:
            closed = cutter.add(m)
            # a part closes only once every shard in it has been seen
            assert all(max(indices) <= m["index"] for _, _, indices in closed)
            streamed += closed
        streamed += cutter.flush()
        assert sorted(streamed) == sorted(reference(markers, part_bytes))


def test_small_inputs_share_tasks_and_large_or_unsized_ones_do_not():
    from astromer.ingest import TASK_INPUT_BYTES, input_groups
    from astromer.surveys.base import Input

    tiny = [Input(key=f"t{i}", url=f"t{i}", size=10_000) for i in range(2000)]
    groups = input_groups(tiny, threads=2)
    assert [i for g in groups for i in g] == list(range(2000))             # every input once, in order
    assert len(groups) == 8 and max(map(len, groups)) == 250               # about four tasks per thread
    few = input_groups(tiny[:19], threads=2)                               # a small survey still spreads out
    assert len(few) == 8 and {len(g) for g in few} == {2, 3}
    # even groups: 50 archives hashed on two threads, no group of one left for the end
    archives = [Input(key=f"a{i}", url=f"a{i}", size=17_000_000) for i in range(50)]
    hashed = input_groups(archives, threads=2, max_bytes=256 << 20)
    assert [i for g in hashed for i in g] == list(range(50)) and {len(g) for g in hashed} == {6, 7}
    big = [Input(key=f"b{i}", url=f"b{i}", size=TASK_INPUT_BYTES // 2 + 1) for i in range(6)]
    assert input_groups(big, threads=2) == [[i] for i in range(6)]
    # the checksums take more bytes per task (reading and hashing is all they do)
    many_big = big * 4
    assert len(input_groups(many_big, threads=2)) == 24
    assert input_groups(many_big, threads=2, max_bytes=2 * TASK_INPUT_BYTES)[:2] == [[0, 1, 2], [3, 4, 5]]
    unsized = [Input(key="a", url="a", size=10), Input(key="s", url="s", size=0), Input(key="b", url="b", size=10)]
    assert input_groups(unsized * 3, threads=1) == [[0], [1], [2], [3], [4], [5, 6], [7], [8]]   # "s" alone


def test_the_ingest_hands_back_the_objects_it_keeps_out_of_full_collections():
    import gc

    from astromer.ingest import long_lived_frozen

    assert gc.get_freeze_count() == 0
    with long_lived_frozen():
        assert gc.get_freeze_count() > 1000          # the modules and everything else alive now
    assert gc.get_freeze_count() == 0
    try:
        with long_lived_frozen():
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    assert gc.get_freeze_count() == 0                # also when the run is stopped
