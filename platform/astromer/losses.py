"""Pretraining losses and metrics on the probed subset. All take [B, L] tensors; ``probed`` is bool.

Per window the squared residuals are averaged over its probed observations, then averaged over the
windows that have any, then square-rooted (the official order). Windows with no probed observation are
left out instead of dividing by zero.
"""
from __future__ import annotations

import torch
from torch import Tensor

# Errors at or below this (magnitudes) are clamped: a zero error must not become an infinite weight.
MIN_ERROR = 1e-3


def _check(pred: Tensor, target: Tensor, probed: Tensor) -> None:
    if pred.shape != target.shape or pred.shape != probed.shape:
        raise ValueError(f"shapes differ: pred {tuple(pred.shape)}, target {tuple(target.shape)}, "
                         f"probed {tuple(probed.shape)}")


def _window_mean(values: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """Weighted mean of values per window [B] and which windows have any weight."""
    total = weights.sum(dim=-1)
    has = total > 0
    return (values * weights).sum(dim=-1) / total.clamp_min(1e-12), has


def probed_rmse(pred: Tensor, target: Tensor, probed: Tensor) -> Tensor:
    """sqrt(mean over windows of the mean squared residual over each window's probed observations)."""
    _check(pred, target, probed)
    w = probed.to(pred.dtype)
    per_window, has = _window_mean((pred - target) ** 2, w)
    return torch.sqrt((per_window * has).sum() / has.sum().clamp_min(1))


def error_weights(err: Tensor, probed: Tensor) -> Tensor:
    """Per-observation weights from the errors: errors scaled to (0, 1] by the window's largest probed
    error, reciprocal taken. Zero, negative or non-finite errors get the weight of the window's largest
    error (the least trusted), never an infinite one."""
    valid = torch.isfinite(err) & (err > 0) & probed
    safe = torch.where(valid, err, torch.zeros_like(err))
    largest = safe.amax(dim=-1, keepdim=True).clamp_min(MIN_ERROR)
    scaled = torch.where(valid, safe.clamp_min(MIN_ERROR), largest) / largest   # (0, 1]
    return probed.to(err.dtype) / scaled


def weighted_rmse(pred: Tensor, target: Tensor, probed: Tensor, err: Tensor) -> Tensor:
    """Uncertainty-weighted RMSE: the per-window mean of squared residuals uses reciprocal scaled errors
    as weights (normalised within the window, so the result stays in magnitude units)."""
    _check(pred, target, probed)
    if err.shape != pred.shape:
        raise ValueError(f"err shape {tuple(err.shape)} differs from pred {tuple(pred.shape)}")
    w = error_weights(err.to(pred.dtype), probed)
    per_window, has = _window_mean((pred - target) ** 2, w)
    return torch.sqrt((per_window * has).sum() / has.sum().clamp_min(1))


def r2_sums(pred: Tensor, target: Tensor, probed: Tensor) -> tuple[Tensor, Tensor]:
    """The two sums of R2 over the probed observations of the windows: squared residuals, and squared
    deviations from each window's own mean of its probed targets (the official ``custom_r2``'s)."""
    _check(pred, target, probed)
    w = probed.to(pred.dtype)
    mean_t, _ = _window_mean(target, w)
    return (((pred - target) ** 2) * w).sum(), (((target - mean_t[:, None]) ** 2) * w).sum()


def r2(pred: Tensor, target: Tensor, probed: Tensor) -> Tensor:
    """Coefficient of determination on the probed observations, as the official code computes it: one
    minus the sum of squared residuals over the sum of squared deviations from each window's mean, both
    summed over all windows (1 with no deviation: the official divide_no_nan). Validation sums the same two
    over all its windows (the official loop averages its batches' values instead)."""
    ss_res, ss_tot = r2_sums(pred, target, probed)
    return 1.0 - torch.where(ss_tot > 0, ss_res / ss_tot.clamp_min(1e-12), torch.zeros_like(ss_tot))
