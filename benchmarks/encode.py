"""Encoding throughput against the machine's own float32 matrix-product rate, measured in the same run.

CPU (always): Astromer 1 encode rate in windows/s (windows of 200 real observations, batch 256, one warm-up
pass, median of timed passes) for the parity path (explicit softmax attention) and the fast path
(scaled_dot_product_attention, cached fused QKV, inference mode), the model FLOPs per window, the achieved
GFLOP/s and its ratio to a float32 matmul of the model's largest shape (target: >= 80 %). The official
TensorFlow library's 63.5 windows/s on a 2-core machine is printed for context.

GPU (when CUDA is available): Astromer 2 forward and training-step throughput in bf16 autocast and the
model-FLOP utilisation against the H100 dense bf16 peak (989 TFLOP/s).

    python benchmarks/encode.py [--windows 1024] [--passes 3] [--compile]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch
from astromer.config import ModelConfig
from astromer.model import Astromer, flops_per_window
from astromer.windows import curves_windows, probe

OFFICIAL_TF_WINDOWS_PER_S = 63.5       # ASTROMER 0.1.8 encode(), 2-core VM (reference README)
H100_BF16_DENSE_PEAK = 989e12


def median_time(fn, passes: int, warmup: int = 1, sync=lambda: None) -> float:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(passes):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process divided by the torch thread count). On a shared machine
    the second is what the work would take with the cores to itself; both are reported."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, (time.process_time() - cpu) / torch.get_num_threads()


def matmul_gflops(m: int, k: int, n: int, passes: int = 7, device="cpu", dtype=torch.float32) -> float:
    """Rate of one dense matrix product [m, k] @ [k, n] (2*m*k*n FLOPs), median of passes."""
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    out = torch.empty(m, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    seconds = median_time(lambda: torch.matmul(a, b, out=out), passes, warmup=2, sync=sync)
    return 2 * m * k * n / seconds / 1e9


class CpuMatmul:
    """The baseline: float32 [m, k] @ [k, n] of the model's largest product, re-measured next to every
    timed encode pass so that both see the same machine load."""

    def __init__(self, m: int, k: int, n: int, reps: int = 4):
        self.a, self.b = torch.randn(m, k), torch.randn(k, n)
        self.out = torch.empty(m, n)
        self.flops = 2 * m * k * n * reps
        self.reps = reps
        self.run()

    def run(self) -> None:
        for _ in range(self.reps):
            torch.matmul(self.a, self.b, out=self.out)

    def measure(self) -> tuple[float, float]:
        wall, cpu = timed(self.run)
        return self.flops / wall / 1e9, self.flops / cpu / 1e9


def synthetic_windows(n_windows: int, length: int, seed: int = 0):
    """Full windows of real-looking (irregular, ascending) observations, centred as the pipeline does."""
    rng = np.random.default_rng(seed)
    curves = []
    for _ in range(n_windows):
        mjd = 49_000 + np.cumsum(rng.exponential(3.0, length))
        mag = (-7 + 0.3 * np.sin(mjd / 17.0) + rng.normal(0, 0.05, length)).astype(np.float32)
        curves.append((mjd, mag, np.full(length, 0.05, np.float32)))
    return curves_windows(curves, length=length, rule="astromer2")


def cpu_encode(args) -> None:
    threads = args.threads or os.cpu_count()
    torch.set_num_threads(threads)
    config = ModelConfig.astromer1()
    length, batch = config.window_length, args.batch
    torch.manual_seed(0)
    model = Astromer(config).eval()
    windows = synthetic_windows(args.windows, length)
    batches = [(torch.from_numpy(windows.times[i:i + batch]), torch.from_numpy(windows.mags[i:i + batch]),
                torch.from_numpy(windows.padding[i:i + batch])) for i in range(0, len(windows), batch)]
    flops = flops_per_window(config, length, head=False)
    print(f"CPU: {threads} threads, torch {torch.__version__}, {len(windows)} windows of {length} real "
          f"observations, batch {batch}, 1 warm-up + median of {args.passes} passes")

    def encode_all():
        with torch.inference_mode():
            for times, mags, padding in batches:
                model.encode(times, mags, padding)

    shape = (batch * length, config.d_model, 3 * config.d_model)
    baseline = CpuMatmul(*shape)
    paths = [("parity path (explicit softmax)", "reference", False),
             ("fast path (SDPA, fused QKV)", "sdpa", False)]
    if args.compile:
        paths.append(("fast path + torch.compile", "sdpa", True))
    rows, mm_wall_all, mm_cpu_all = [], [], []
    for label, impl, compiled in paths:
        model.config.attention_impl = impl
        if compiled:
            model.compile_encoder()
            encode_all()                          # compilation happens here
        encode_all()                              # warm-up
        rates, ratios = [], []
        for _ in range(args.passes):
            mm_wall, mm_cpu = baseline.measure()  # baseline right before each pass: same load
            wall, cpu = timed(encode_all)
            mm_wall_all.append(mm_wall)
            mm_cpu_all.append(mm_cpu)
            rates.append((len(windows) / wall, len(windows) / cpu))
            ratios.append((len(windows) * flops / wall / 1e9 / mm_wall, len(windows) * flops / cpu / 1e9 / mm_cpu))
        med = lambda xs, i: statistics.median(x[i] for x in xs)   # noqa: E731
        rows.append((label, med(rates, 0), med(ratios, 0), med(rates, 1), med(ratios, 1)))

    mm_wall, mm_cpu = statistics.median(mm_wall_all), statistics.median(mm_cpu_all)
    print(f"baseline float32 matmul [{shape[0]}x{shape[1]}] @ [{shape[1]}x{shape[2]}]: "
          f"{mm_wall:.1f} GFLOP/s wall-clock, {mm_cpu:.1f} GFLOP/s per CPU time")
    print(f"Astromer 1 encoder FLOPs per window: {flops / 1e6:.1f} MFLOP "
          f"(matmul-rate ceiling {mm_wall * 1e9 / flops:.0f} windows/s wall-clock)")
    print(f"{'path':34s} {'windows/s':>10s} {'GFLOP/s':>8s} {'of matmul':>10s} {'vs TF 63.5':>10s}"
          f" | {'CPU-time: windows/s':>20s} {'of matmul':>10s}")
    for label, rate, ratio, cpu_rate, cpu_ratio in rows:
        print(f"{label:34s} {rate:10.1f} {rate * flops / 1e9:8.1f} {ratio:9.0%} {rate / OFFICIAL_TF_WINDOWS_PER_S:9.2f}x"
              f" | {cpu_rate:20.1f} {cpu_ratio:9.0%}")
    print("ratios are per pass against the matmul measured just before it (median); target >= 80% "
          "(about 170 windows/s on 2 idle cores). CPU-time columns divide this process's CPU seconds by "
          "the thread count: what the run would take with the cores to itself.")


def gpu_astromer2(args) -> None:
    device = "cuda"
    config = ModelConfig.astromer2()
    length, batch = config.window_length, args.gpu_batch
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = True
    model = Astromer(config).to(device)
    if args.compile:
        model.compile_encoder()
    windows = synthetic_windows(batch, length)
    times = torch.from_numpy(windows.times).to(device)
    mags = torch.from_numpy(windows.mags).to(device)
    padding = torch.from_numpy(windows.padding).to(device)
    p = probe(windows.mags, windows.padding, rng=np.random.default_rng(0))
    mags_in = torch.from_numpy(p.mags_in).to(device)
    hidden = torch.from_numpy(p.hidden).to(device)
    probed = torch.from_numpy(p.probed).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)
    flops = flops_per_window(config, length)
    peak_matmul = matmul_gflops(8192, 8192, 8192, device=device, dtype=torch.bfloat16) * 1e9

    def forward():
        model.eval()
        with torch.inference_mode():
            model(times, mags, padding)

    def train_step():
        model.train()
        optimizer.zero_grad(set_to_none=True)
        rec = model(times, mags_in, padding, hidden)
        loss = ((rec - mags) ** 2 * probed).sum() / probed.sum()
        loss.backward()
        optimizer.step()

    sync = torch.cuda.synchronize
    fwd = median_time(forward, args.passes * 3, warmup=3, sync=sync)
    step = median_time(train_step, args.passes * 3, warmup=3, sync=sync)
    print(f"GPU: {torch.cuda.get_device_name()}, Astromer 2, batch {batch} windows of {length}, bf16 autocast"
          f"{', torch.compile' if args.compile else ''}")
    print(f"bf16 matmul 8192^3: {peak_matmul / 1e12:.0f} TFLOP/s ({peak_matmul / H100_BF16_DENSE_PEAK:.0%} of the "
          f"989 TFLOP/s dense peak)")
    for label, seconds, mult in (("forward", fwd, 1), ("training step (fwd+bwd+Adam)", step, 3)):
        rate = batch / seconds
        achieved = rate * flops * mult
        print(f"{label:30s} {rate:10.0f} windows/s  {achieved / 1e12:6.1f} TFLOP/s  "
              f"MFU {achieved / H100_BF16_DENSE_PEAK:.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--windows", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    parser.add_argument("--compile", action="store_true", help="also time a torch.compile'd encoder")
    parser.add_argument("--gpu-batch", type=int, default=512)
    parser.add_argument("--skip-cpu", action="store_true")
    args = parser.parse_args()
    if not args.skip_cpu:
        cpu_encode(args)
    if torch.cuda.is_available():
        gpu_astromer2(args)
    else:
        print("no CUDA device: Astromer 2 GPU throughput not measured")


if __name__ == "__main__":
    main()
