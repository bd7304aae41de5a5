"""Probed-subset RMSE, uncertainty-weighted RMSE and R2."""
from __future__ import annotations

import math

import pytest
import torch
from astromer.losses import error_weights, probed_rmse, r2, weighted_rmse


def batch():
    torch.manual_seed(0)
    target = torch.randn(3, 8)
    pred = target + 0.1 * torch.randn(3, 8)
    probed = torch.zeros(3, 8, dtype=torch.bool)
    probed[0, :4] = True
    probed[1, 2:5] = True      # window 2 has nothing probed: it must be left out, not divide by zero
    err = torch.rand(3, 8) * 0.1 + 0.01
    return pred, target, probed, err


def test_probed_rmse_is_the_official_order_of_means():
    pred, target, probed, _ = batch()
    sq = (pred - target) ** 2
    expected = math.sqrt((sq[0, :4].mean().item() + sq[1, 2:5].mean().item()) / 2)
    assert probed_rmse(pred, target, probed).item() == pytest.approx(expected, rel=1e-6)
    # Residuals outside the probed subset do not count.
    pred2 = pred.clone()
    pred2[~probed] = 1e6
    assert probed_rmse(pred2, target, probed).item() == pytest.approx(expected, rel=1e-6)


def test_weighted_rmse_equals_rmse_for_equal_errors_and_downweights_noisy_points():
    pred, target, probed, _ = batch()
    same = torch.full_like(pred, 0.05)
    assert weighted_rmse(pred, target, probed, same).item() == pytest.approx(
        probed_rmse(pred, target, probed).item(), rel=1e-6)
    # One large residual on an observation with a large error counts less than with a small error.
    pred3 = target.clone()
    pred3[0, 0] += 1.0
    noisy, precise = same.clone(), same.clone()
    noisy[0, 0] = 0.5
    precise[0, 0] = 0.005
    assert weighted_rmse(pred3, target, probed, noisy) < weighted_rmse(pred3, target, probed, precise)


@pytest.mark.parametrize("bad", [0.0, -0.2, float("nan"), float("inf")])
def test_weighted_rmse_is_finite_for_zero_negative_and_non_finite_errors(bad):
    pred, target, probed, err = batch()
    err[0, :4] = bad          # every probed error of window 0 is bad
    err[1, 3] = bad
    loss = weighted_rmse(pred, target, probed, err)
    assert torch.isfinite(loss)
    w = error_weights(err, probed)
    assert torch.isfinite(w).all() and (w[probed] > 0).all() and (w[~probed] == 0).all()
    pred.requires_grad_(True)
    weighted_rmse(pred, target, probed, err).backward()
    assert torch.isfinite(pred.grad).all()


def test_r2_is_one_for_perfect_and_zero_for_the_mean():
    _, target, probed, _ = batch()
    assert r2(target, target, probed).item() == pytest.approx(1.0)
    means = torch.zeros_like(target)
    means[0] = target[0, :4].mean()
    means[1] = target[1, 2:5].mean()
    assert r2(means, target, probed).item() == pytest.approx(0.0, abs=1e-6)


def test_r2_pools_both_sums_over_windows_as_the_official_code():
    # two windows of very different spread: the official R2 sums residuals and deviations (from each window's
    # own mean) over both; an average of per-window R2s would give 0.5 here
    target = torch.tensor([[0.0, 2.0, 4.0, 0.0], [10.0, 10.1, 10.2, 0.0]])
    probed = torch.tensor([[True, True, True, False], [True, True, True, False]])
    pred = target.clone()
    pred[1] = torch.tensor([10.1, 10.1, 10.1, 0.0])      # window 2 predicted by its mean: its own R2 is 0
    ss_tot = 8.0 + 0.02
    assert r2(pred, target, probed).item() == pytest.approx(1 - 0.02 / ss_tot, rel=1e-5)
    # validation sums the same two over all its batches: the same figure, one batch or two
    from astromer.train import ProbedScore

    def score(*rows):
        acc = ProbedScore()
        for r in rows:
            acc.add(pred[r], {"times": torch.arange(4.0).expand(len(r), 4), "target": target[r],
                              "probed": probed[r], "padding": ~probed[r]})
        return acc.result("val")["val_r2"]

    assert score([0, 1]) == pytest.approx(r2(pred, target, probed).item(), rel=1e-6)
    assert score([0], [1]) == pytest.approx(score([0, 1]), rel=1e-12)
    # no deviation at all: 1, as the official divide_no_nan gives, in both places
    flat = torch.full((1, 4), 3.0)
    assert r2(flat + 1, flat, probed[:1]).item() == 1.0
    acc = ProbedScore()
    acc.add(flat + 1, {"times": torch.arange(4.0)[None], "target": flat, "probed": probed[:1], "padding": ~probed[:1]})
    assert acc.result("val")["val_r2"] == 1.0


def test_shape_mismatch_is_an_error():
    pred, target, probed, err = batch()
    with pytest.raises(ValueError, match="shapes differ"):
        probed_rmse(pred, target[:, :4], probed)
    with pytest.raises(ValueError, match="err shape"):
        weighted_rmse(pred, target, probed, err[:2])
