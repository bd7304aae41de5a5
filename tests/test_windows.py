"""Windowing rules, centring and the pretraining probe selection."""
from __future__ import annotations

import numpy as np
import pytest
from astromer.config import MaskConfig
from astromer.windows import (
    curve_windows,
    curves_windows,
    probe,
    probe_counts,
    random_window,
    validate_curve,
    window_starts,
)


def make_curve(n, seed=0, t0=50_000.0):
    rng = np.random.default_rng(seed)
    mjd = t0 + np.cumsum(rng.uniform(0.01, 3.0, n))
    mag = rng.normal(15.0, 0.3, n).astype(np.float32)
    err = rng.uniform(0.01, 0.1, n).astype(np.float32)
    return mjd, mag, err


@pytest.mark.parametrize("n, starts", [(45, [0]), (200, [0, 0]), (722, [0, 200, 400, 522]), (400, [0, 200, 200])])
def test_astromer1_rule_overlaps_the_last_window(n, starts):
    np.testing.assert_array_equal(window_starts(n, 200, "astromer1"), starts)


@pytest.mark.parametrize("n, starts", [(45, [0]), (200, [0]), (722, [0, 200, 400, 600]), (401, [0, 200, 400])])
def test_astromer2_rule_pads_the_last_window(n, starts):
    np.testing.assert_array_equal(window_starts(n, 200, "astromer2"), starts)


def test_astromer2_windows_centre_in_float64_and_pad():
    mjd, mag, err = make_curve(450)
    w = curve_windows(mjd, mag, err, length=200, rule="astromer2")
    assert len(w) == 3 and list(w.n_valid) == [200, 200, 50]
    last = w.take(2)
    assert last.padding[0, 50:].all() and not last.padding[0, :50].any()
    assert (last.times[0, 50:] == 0).all() and (last.mags[0, 50:] == 0).all() and (last.errs[0, 50:] == 0).all()
    expected = (mjd[400:] - mjd[400:].mean()).astype(np.float32)
    np.testing.assert_array_equal(last.times[0, :50], expected)
    np.testing.assert_allclose(last.mags[0, :50].mean(), 0.0, atol=1e-5)
    np.testing.assert_array_equal(last.errs[0, :50], err[400:])          # errors are not centred
    assert w.start.tolist() == [0, 200, 400]


def test_astromer1_centring_is_the_sequential_float32_mean():
    mjd, mag, err = make_curve(250, seed=3)
    w = curve_windows(mjd, mag, err, length=200, rule="astromer1")
    block = np.stack([mjd[50:250], mag[50:250], err[50:250]], 1).astype(np.float32)
    expected = block - np.cumsum(block, 0, dtype=np.float32)[-1] / np.float32(200)
    assert w.times[1].tobytes() == expected[:, 0].tobytes()
    assert w.mags[1].tobytes() == expected[:, 1].tobytes()
    # It differs from the float64 centring of the astromer2 rule by a visible amount.
    float64_times = (mjd[50:250] - mjd[50:250].mean()).astype(np.float32)
    assert np.abs(w.times[1] - float64_times).max() > 1e-4


def test_curves_windows_track_curve_index():
    curves = [make_curve(n, seed=n) for n in (10, 300, 1)]
    w = curves_windows(curves, length=200)
    assert w.curve.tolist() == [0, 1, 1, 2]
    assert w.n_valid.tolist() == [10, 200, 100, 1]
    assert w.times.dtype == np.float32 and w.padding.dtype == bool and w.n_valid.dtype == np.int32


@pytest.mark.parametrize("mutate, message", [
    (lambda t, m: (t[:0], m[:0]), "empty"),
    (lambda t, m: (t, np.where(np.arange(len(m)) == 4, np.nan, m)), "mag is not finite"),
    (lambda t, m: (np.where(np.arange(len(t)) == 2, np.inf, t), m), "mjd is not finite"),
    (lambda t, m: (t[::-1].copy(), m), "unsorted"),
    (lambda t, m: (np.r_[t[:3], t[2], t[4:]], m), "duplicate"),
    (lambda t, m: (t, m[:-1]), "has 9 values"),
])
def test_bad_curves_are_named(mutate, message):
    mjd, mag, _ = make_curve(10)
    with pytest.raises(ValueError, match=message):
        curves_windows([make_curve(5), mutate(mjd, mag)])
    with pytest.raises(ValueError, match="curve 1"):
        curves_windows([make_curve(5), mutate(mjd, mag)])


def test_float32_mjds_that_collapse_are_named_as_the_cause():
    # two real MACHO times 3.5 minutes apart are one float32 value: the error says why, and float64 is fine
    mjd = np.array([53602.22875, 53602.23115, 53603.5])
    with pytest.raises(ValueError, match=r"duplicate times.*float32, which resolves values near 53602 only to "
                                         r"0\.0039 days: pass float64 times"):
        validate_curve(mjd.astype(np.float32), np.ones(3))
    validate_curve(mjd, np.ones(3))
    with pytest.raises(ValueError, match=r"float16, which resolves values near 53600 only to 32 days"):
        validate_curve(mjd.astype(np.float16), np.ones(3))
    from astromer.windows import precision_hint

    assert "bfloat16, which resolves values near 500 only to 2 days" in precision_hint("torch.bfloat16", 500.0)
    assert precision_hint("float32", 500.0) == "" and precision_hint("float64", 53602.0) == ""
    with pytest.raises(ValueError, match=r"strictly increasing\)$"):      # a real duplicate: no hint
        validate_curve(np.array([53602.2, 53602.2, 53603.0]), np.ones(3))


def test_non_numeric_curve_is_a_type_error():
    with pytest.raises(TypeError, match="mag must be a numeric array"):
        validate_curve(np.arange(3.0), np.array(["a", "b", "c"]))


def test_random_window_is_a_contiguous_slice():
    mjd, mag, err = make_curve(1000, seed=1)
    rng = np.random.default_rng(0)
    starts = set()
    for _ in range(20):
        w = random_window(mjd, mag, err, length=200, rng=rng)
        s = int(w.start[0])
        starts.add(s)
        assert len(w) == 1 and w.n_valid[0] == 200 and 0 <= s <= 800
        np.testing.assert_allclose(w.times[0], mjd[s:s + 200] - mjd[s:s + 200].mean(), atol=1e-3)
    assert len(starts) > 5
    short = random_window(mjd[:50], mag[:50], err[:50], length=200, rng=rng)
    assert short.start[0] == 0 and short.n_valid[0] == 50


def test_probe_follows_the_official_counts():
    # n=200: 100 probed, ceil(20)=20 same, ceil(0.2*80)=16 random, 64 hidden.
    assert [c.tolist() for c in probe_counts(np.array([200, 45, 1, 10]), MaskConfig())] == \
        [[100, 22, 0, 5], [20, 5, 0, 1], [16, 4, 0, 1]]
    rng = np.random.default_rng(7)
    n_valid = np.array([200, 45, 1, 10])
    padding = np.arange(200)[None, :] >= n_valid[:, None]
    mags = rng.normal(size=(4, 200)).astype(np.float32) * ~padding
    p = probe(mags, padding, rng=rng)
    assert p.probed.sum(1).tolist() == [100, 22, 0, 5]
    assert p.hidden.sum(1).tolist() == [64, 13, 0, 3]
    assert not (p.probed & padding).any() and not (p.hidden & ~p.probed).any()
    changed = p.mags_in != mags
    assert not (changed & ~p.probed).any() and not (changed & p.hidden).any()
    # A random-replaced magnitude is copied from another real observation of the same window.
    for b, col in zip(*np.nonzero(changed)):
        assert p.mags_in[b, col] in set(mags[b, :n_valid[b]].tolist())
    # Same-kept + random + hidden = probed; "random" ones are probed, visible, and (almost always) changed.
    visible_probed = p.probed & ~p.hidden
    assert visible_probed.sum(1).tolist() == [36, 9, 0, 2]
    assert changed.sum() >= 16 + 4


def test_probe_selection_is_uniform():
    rng = np.random.default_rng(0)
    padding = np.zeros((2000, 20), bool)
    p = probe(np.zeros((2000, 20), np.float32), padding, rng=rng)
    freq = p.probed.mean(0)
    assert np.abs(freq - 0.5).max() < 0.05


def test_random_windows_cut_each_curve_as_random_window_does():
    """The flat twin: every window is a contiguous slice of its own curve, centred as random_window centres
    it, shorter curves whole and padded, and the start uniform over the curve's possible starts."""
    from astromer.windows import random_windows

    lengths = [1000, 50, 203, 200, 1, 350]
    curves = [make_curve(n, seed=i) for i, n in enumerate(lengths)]
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    flat = [np.concatenate([c[k] for c in curves]) for k in range(3)]
    rng = np.random.default_rng(0)
    starts = [set() for _ in lengths]
    for _ in range(60):
        w = random_windows(*flat, offsets, length=200, rng=rng)
        assert w.times.shape == (len(lengths), 200) and w.times.dtype == np.float32
        for i, (mjd, mag, err) in enumerate(curves):
            s, n_valid = int(w.start[i]), min(lengths[i], 200)
            starts[i].add(s)
            assert w.n_valid[i] == n_valid and 0 <= s <= max(lengths[i] - 200, 0)
            want = curve_windows(mjd[s:s + 200], mag[s:s + 200], err[s:s + 200], length=200, validate=False)
            np.testing.assert_allclose(w.times[i], want.times[0], atol=2e-6)
            np.testing.assert_allclose(w.mags[i], want.mags[0], atol=2e-6)
            np.testing.assert_array_equal(w.errs[i], want.errs[0])
            np.testing.assert_array_equal(w.padding[i], want.padding[0])
    assert starts[2] == {0, 1, 2, 3} and starts[3] == {0} and starts[1] == {0} and len(starts[0]) > 40
    with pytest.raises(ValueError, match="curve 1 has no observation"):
        random_windows(*flat, np.array([0, 10, 10]), length=200, rng=rng)


@pytest.mark.parametrize("rule", ["astromer2", "astromer1"])
def test_flat_windows_are_the_windows_of_curves_windows(rule):
    from astromer.windows import flat_windows

    lengths = [450, 200, 1, 401, 37, 1000]
    curves = [make_curve(n, seed=i) for i, n in enumerate(lengths)]
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    flat = flat_windows(*(np.concatenate([c[k] for c in curves]) for k in range(3)), offsets, length=200, rule=rule)
    want = curves_windows(curves, length=200, rule=rule)
    for name in ("n_valid", "start", "curve", "padding", "errs"):
        np.testing.assert_array_equal(getattr(flat, name), getattr(want, name), err_msg=name)
    if rule == "astromer1":           # the parity rule stays bit for bit
        assert flat.times.tobytes() == want.times.tobytes() and flat.mags.tobytes() == want.mags.tobytes()
    else:
        np.testing.assert_allclose(flat.times, want.times, atol=1e-5, rtol=0)
        np.testing.assert_allclose(flat.mags, want.mags, atol=1e-6, rtol=0)
        assert flat.curve.tolist() == [0, 0, 0, 1, 2, 3, 3, 3, 4, 5, 5, 5, 5, 5]


def test_seeded_probe_gives_each_window_its_own_selection():
    from astromer.windows import seeded_probe

    rng = np.random.default_rng(0)
    mags = rng.normal(0, 1, (30, 64)).astype(np.float32)
    padding = np.arange(64)[None, :] >= rng.integers(2, 65, 30)[:, None]
    seeds = rng.integers(0, 2**63, 30).tolist()
    together = seeded_probe(mags, padding, seeds)
    for k, seed in enumerate(seeds):
        alone = probe(mags[k:k + 1], padding[k:k + 1], rng=np.random.default_rng(seed))
        for name in ("mags_in", "hidden", "probed"):
            np.testing.assert_array_equal(getattr(together, name)[k], getattr(alone, name)[0], err_msg=name)
    with pytest.raises(ValueError, match="29 seeds for 30 windows"):
        seeded_probe(mags, padding, seeds[:-1])
