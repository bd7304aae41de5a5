"""The model on a CUDA device: float32 equals the float64 reference, bf16 autocast stays within bf16's
error, the official Astromer 1 outputs are reproduced on the GPU, a bf16 training step learns (also with
CUDA graphs), and a non-finite step is skipped on the device and reported by the next read.

Skipped where no CUDA device is present (CI has none); run them on a GPU machine with
``pytest tests/test_gpu.py``.
"""
from __future__ import annotations

import astromer
import numpy as np
import pytest
import torch
from astromer.config import ModelConfig
from astromer.model import Astromer
from astromer.train import (
    NonFiniteLossError,
    StepMetrics,
    TrainConfig,
    build_model,
    evaluate,
    make_optimizer,
    train_step,
)
from astromer.weights import import_official
from conftest import shared_path

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _windows(batch: int, length: int, seed: int):
    """Random irregular windows with a ragged tail of padding (fresh for every call: no zeros)."""
    g = torch.Generator().manual_seed(seed)
    times = torch.cumsum(torch.rand(batch, length, generator=g) * 3 + 0.01, dim=1)
    mags = torch.randn(batch, length, generator=g) * 0.3
    real = torch.randint(length // 3, length + 1, (batch,), generator=g)
    padding = torch.arange(length)[None, :] >= real[:, None]
    return times, mags, padding


def _rel_err(got: torch.Tensor, want: torch.Tensor, keep: torch.Tensor) -> float:
    got, want = got.double().cpu()[keep], want.double().cpu()[keep]
    return float(torch.linalg.norm(got - want) / torch.linalg.norm(want))


@pytest.mark.parametrize("impl", ["sdpa", "reference"])
def test_astromer2_on_cuda_float32_and_bf16_match_the_cpu(impl):
    # The reference is the CPU's float32 on the plain attention path (the positional encoding is float32 by
    # design, as in the TF code, so the model has no float64 form); its own error is ~1e-6.
    torch.manual_seed(0)
    config = ModelConfig.astromer2()
    ref = Astromer(config).eval()
    ref.config.attention_impl = "reference"
    config = ModelConfig.astromer2()
    config.attention_impl = impl
    times, mags, padding = _windows(32, config.window_length, seed=1)
    with torch.no_grad():
        want = ref.encode(times, mags, padding)
        gpu = Astromer(config).cuda().eval()
        gpu.load_state_dict(ref.state_dict())
        gpu.bf16_on_cuda = False
        fp32 = gpu.encode(times.cuda(), mags.cuda(), padding.cuda())
        gpu.bf16_on_cuda = True
        bf16 = gpu.encode(times.cuda(), mags.cuda(), padding.cuda())
    keep = ~padding
    assert torch.isfinite(fp32[keep.cuda()]).all() and torch.isfinite(bf16[keep.cuda()]).all()
    assert bf16.dtype == torch.float32          # autocast inside, float32 out
    assert _rel_err(fp32, want, keep) < 1e-4
    err = _rel_err(bf16, want, keep)
    assert 1e-4 < err < 2e-2, err               # above float32's error: bf16 really ran


def test_official_astromer1_outputs_on_cuda(tmp_path):
    ref = shared_path("reference", "astromer1_macho")
    import_official(ref / "macho_a0.zip", tmp_path / "m", preset="astromer1")
    model = astromer.load_model(tmp_path / "m").cuda()
    with np.load(ref / "reference_macho_lcs.npz") as npz:
        data = {k: npz[k] for k in npz.files}
    times = torch.from_numpy(data["win_times"][:, :, 0]).cuda()
    mags = torch.from_numpy(data["win_input"][:, :, 0]).cuda()
    padding = torch.from_numpy(data["win_mask_in"][:, :, 0] > 0.5).cuda()
    want = data["win_recon"][:, :, 0]
    model.bf16_on_cuda = False
    fp32 = model.reconstruct(times, mags, padding).detach().cpu().numpy()
    assert np.abs(fp32 - want).max() < 2e-4           # the CPU parity test's tolerance, padding included
    model.bf16_on_cuda = True
    bf16 = model.reconstruct(times, mags, padding).detach().cpu().numpy()
    # bf16 costs Astromer 1 far more than float32 does: 5.0% relative error on the real rows, measured on an
    # H100 (not yet traced to a layer). Asserted as a bound so that a regression shows; float32 above is exact.
    real = ~padding.cpu().numpy()                     # padded rows carry no observation to reconstruct
    err = np.linalg.norm((bf16 - want)[real]) / np.linalg.norm(want[real])
    assert 1e-4 < err < 0.08, err


def _sine_batch(cfg: TrainConfig, n: int, seed: int) -> dict:
    from astromer.data import DataSpec, numpy_windows

    rng = np.random.default_rng(seed)
    spec = DataSpec(lake="", window_length=200, mask=cfg.mask)
    curves = []
    for _ in range(n):
        t = np.sort(rng.uniform(50000, 51000, 300))
        curves.append((t, (0.5 * np.sin(2 * np.pi * t / rng.uniform(0.3, 20))).astype(np.float32),
                       np.full(300, 0.02, np.float32)))
    return {k: torch.as_tensor(v).cuda() for k, v in numpy_windows(curves, spec, rng).items()}


def test_bf16_training_step_on_cuda_learns_a_fixed_batch():
    torch.manual_seed(0)
    cfg = TrainConfig(preset="astromer2", batch_size=64, warmup_steps=0, lr=1e-3, use_gpu=True)
    model = build_model(cfg).cuda()
    optimizer, scheduler = make_optimizer(model, cfg)
    batch = _sine_batch(cfg, cfg.batch_size, 0)
    losses = [train_step(model, batch, optimizer, scheduler, cfg, step=s)["loss"] for s in range(1, 41)]
    assert all(np.isfinite(losses))
    assert all(p.dtype == torch.float32 for p in model.parameters())   # master weights stay float32
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_steps_read_every_few_steps_learn_and_evaluate(mode):
    # The job's GPU path: fused AdamW, figures kept on the device and read every 5 steps, the compiled
    # encoder (with CUDA graphs for reduce-overhead), an evaluation of another batch size in between.
    torch.manual_seed(0)
    cfg = TrainConfig(preset="astromer2", batch_size=64, warmup_steps=0, lr=1e-3, use_gpu=True, compile=True,
                      compile_mode=mode)
    model = build_model(cfg).cuda()
    optimizer, scheduler = make_optimizer(model, cfg)
    assert optimizer.defaults["fused"]
    batch, val = _sine_batch(cfg, 64, 0), _sine_batch(cfg, 24, 1)
    steps, means = StepMetrics(), []
    for s in range(1, 41):
        assert train_step(model, batch, optimizer, scheduler, cfg, step=s, into=steps) is None
        if s % 5 == 0:
            read = steps.read()
            assert read["steps"] == 5
            means.append(read["loss"])
        if s == 20:
            scores = evaluate(model, [val], "val")
            assert np.isfinite(scores["val_rmse"])
    assert all(np.isfinite(means))
    assert means[-1] < 0.7 * means[0], means
    again = evaluate(model, [val], "val")
    assert again["val_rmse"] < scores["val_rmse"]


def test_non_finite_step_is_skipped_on_the_device_and_raised_at_the_read():
    torch.manual_seed(0)
    cfg = TrainConfig(preset="astromer2", batch_size=32, warmup_steps=0, use_gpu=True)
    model = build_model(cfg).cuda()
    optimizer, scheduler = make_optimizer(model, cfg)
    good, bad = _sine_batch(cfg, 32, 0), _sine_batch(cfg, 32, 1)
    bad["target"][3, 0], bad["probed"][3, 0] = float("nan"), True
    steps = StepMetrics()
    train_step(model, good, optimizer, scheduler, cfg, step=1, into=steps)
    steps.read()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    moments = [optimizer.state[p]["exp_avg"].clone() for p in model.parameters()]
    train_step(model, bad, optimizer, scheduler, cfg, step=2, epoch=0, batch_index=7, into=steps)
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())     # no update
    assert all(torch.equal(m, optimizer.state[p]["exp_avg"]) for m, p in zip(moments, model.parameters()))
    train_step(model, good, optimizer, scheduler, cfg, step=3, into=steps)          # later steps go on
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 2 \(epoch 0, batch 7\)"):
        steps.read()


def test_the_jobs_gpu_path_under_nccl_without_ray():
    """DDP with every compile mode, the collectives on the device and a checkpoint round trip that restores
    the device generator (benchmarks/gpu_ddp_check.py, which needs neither Ray nor MLflow)."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_ddp_check.py"), "--preset", "tiny"],
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "platform")})
    assert done.returncode == 0 and done.stdout.rstrip().endswith("OK"), done.stdout + done.stderr[-3000:]
    assert "backend nccl" in done.stdout and "2 generator(s)" in done.stdout
