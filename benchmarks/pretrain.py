"""Pretraining throughput: is the Ray Data stream fast enough to keep the trainers busy?

In one run, on the same model, batch size and lake:

  1. training windows/s with 1 and with 2 CPU workers fed by Ray Data (get_dataset_shard + iter_torch_batches);
  2. the same TorchTrainer fed from in-memory tensors (the ceiling: no data pipeline at all);
  3. the ratio 1 / 2 per worker count (target >= 0.9): the two alternate for ``--rounds`` rounds and each
     side's best round counts, as timeit does (this machine's speed drifts between runs); every round's
     ratio is printed too;
  4. the Ray Data window stream alone, without training (target >= 5x what one worker consumes), against
     the same sampling in a plain in-process loop on one core (its baseline: what Ray Data adds or costs),
     and at the GPU batch size once per number of read tasks in ``--stream-tasks`` (default: one task, then
     the job's default of half the cluster's CPUs), for how the stream scales with the cores it gets;
  5. with CUDA: windows/s of one GPU in bf16 (eager, compiled, compiled with CUDA graphs; ``--gpu-variants``
     picks some), model-FLOP utilisation, and whether Ray Data keeps the fastest of them fed.

Every trainer runs the job's step: figures kept on the device and read every ``log_every`` steps.

    python benchmarks/pretrain.py [--lake LAKE] [--preset astromer2] [--batch-size 16] [--steps 12]
                                  [--rounds 3] [--stream-tasks 1,0] [--stream-only]
    python benchmarks/pretrain.py --gpu-only --lake LAKE --stream-tasks 1,4,8,0 --gpu-variants graphs   # a GPU

Without --lake a synthetic lake is ingested into a temporary folder (astromer.ingest, survey synthetic).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

import numpy as np
import torch
from astromer.config import PRESETS
from astromer.data import DataSpec, iter_batches, make_datasets, numpy_windows, read_task_count, row_groups
from astromer.train import StepMetrics, TrainConfig, build_model, make_optimizer, train_step

WARMUP_STEPS = 3
# On a GPU the first steps compile (torch.compile) and, with CUDA graphs, record the graphs: more untimed steps
GPU_WARMUP_STEPS = 5


def bench_loop(config: dict) -> None:
    """Per-worker loop: ``warmup`` untimed steps, then ``steps`` timed ones; reports windows/s (all workers)."""
    import ray.train
    import ray.train.torch

    cfg = TrainConfig.from_dict(config["train"])
    torch.set_num_threads(1)
    torch.manual_seed(0)
    device = ray.train.torch.get_device()
    model = build_model(cfg).to(device)
    optimizer, scheduler = make_optimizer(model, cfg)
    world = ray.train.get_context().get_world_size()
    ddp = ray.train.torch.prepare_model(model, move_to_device=False) if world > 1 else model
    if config["source"] == "memory":
        spec = DataSpec(lake="", window_length=model.config.window_length, mask=cfg.mask)
        pool = _memory_batches(cfg.batch_size, spec, ray.train.get_context().get_world_rank(), device)

        def batches():
            while True:
                yield from pool
    else:
        shard = ray.train.get_dataset_shard("train")

        def batches():
            while True:
                yield from iter_batches(shard, cfg.batch_size, drop_last=True, device=device,
                                        shuffle_buffer=cfg.shuffle_buffer)

    warmup = config.get("warmup", WARMUP_STEPS)
    total = warmup + config["steps"]
    t0, steps = None, StepMetrics()        # read back every log_every steps, as the job's loop does
    for step, batch in enumerate(batches(), start=1):
        if step == warmup + 1:
            steps.read()
            t0 = time.perf_counter()
        train_step(ddp, batch, optimizer, scheduler, cfg, step=step, into=steps)
        if step % cfg.log_every == 0 or step == total:
            steps.read()
        if step == total:
            break
    elapsed = time.perf_counter() - t0
    if ray.train.get_context().get_world_rank() == 0:   # Ray Train keeps metrics only with checkpoints
        with open(config["out"], "w") as fh:
            json.dump({"windows_per_s": config["steps"] * cfg.batch_size * world / elapsed}, fh)


def _memory_batches(batch_size: int, spec: DataSpec, seed: int, device, count: int = 4) -> list[dict]:
    """``count`` masked training batches of synthetic curves on ``device`` (several, so that no cache of one
    batch flatters the rate)."""
    rng = np.random.default_rng(seed)
    return [{k: torch.as_tensor(v).to(device) for k, v in
             numpy_windows(_memory_curves(batch_size, rng), spec, rng).items()} for _ in range(count)]


def _memory_curves(n: int, rng: np.random.Generator) -> list:
    curves = []
    for _ in range(n):
        k = int(rng.integers(250, 600))
        t = np.sort(rng.uniform(50000, 52500, k))
        curves.append((t, (15 + 0.3 * np.sin(t / rng.uniform(0.5, 30))).astype(np.float32),
                       np.full(k, 0.02, np.float32)))
    return curves


def train_rate(cfg: TrainConfig, source: str, workers: int, steps: int, datasets: dict | None,
               warmup: int = WARMUP_STEPS) -> float:
    import ray.train
    from ray.train.torch import TorchTrainer

    out = tempfile.mktemp(prefix="bench-rate-", suffix=".json")
    trainer = TorchTrainer(
        bench_loop, train_loop_config={"train": cfg.to_dict(), "source": source, "steps": steps, "out": out,
                                      "warmup": warmup},
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=cfg.use_gpu,
                                               resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=ray.train.RunConfig(name=f"bench-{source}-{workers}-{int(time.time())}",
                                       storage_path=tempfile.mkdtemp(prefix="bench-ray-")),
        datasets={"train": datasets["train"]} if source == "ray" else None,
    )
    trainer.fit()
    with open(out) as fh:
        return float(json.load(fh)["windows_per_s"])


def stream_rate(datasets: dict, batch_size: int, min_windows: int, shuffle_buffer: int = 0,
                clock: str | None = None) -> float:
    """Windows/s of the training stream itself (read, clean, window, probe, batch), no model. The clock
    starts at the first batch, as the trainers' does after their warm-up steps: the start of the first pass
    (Ray Data's planning, the workers' start) is not throughput. With a pass ``clock`` (the datasets made
    with it), as a reproducible run streams: the pass set before each, the buffer's draw seeded."""
    from astromer.data import set_pass

    seen, t0, epoch = 0, None, 0
    while seen < min_windows:
        if clock:
            set_pass(clock, epoch)
        for batch in iter_batches(datasets["train"], batch_size, drop_last=True, shuffle_buffer=shuffle_buffer,
                                  shuffle_seed=epoch if clock else None):
            if t0 is None:
                t0 = time.perf_counter()
                continue
            seen += batch["times"].shape[0]
        epoch += 1
    return seen / (time.perf_counter() - t0)


def in_process_rate(spec: DataSpec, batch_size: int, min_windows: int) -> float:
    """The stream's baseline: the same sampling in a plain in-process loop, no Ray. The row groups in a new
    order on every pass, each read with pyarrow, cleaned, windowed and probed by the stream's own function
    (``make_windows``) and cut into batches of torch tensors as the workers receive them; one core, and no
    shuffle buffer. As for the stream, the clock starts after the first batch (here: the first row group)."""
    from astromer.data import TORCH_COLUMNS, make_windows, read_row_group

    units = row_groups(spec)
    rng = np.random.default_rng(0)
    seen, t0 = 0, None
    while seen < min_windows:
        for k in rng.permutation(len(units)):
            windows = make_windows(read_row_group(units[k]), spec, "train", fixed=False)
            whole = len(windows["times"]) // batch_size * batch_size
            for lo in range(0, whole, batch_size):
                {name: torch.from_numpy(np.array(windows[name][lo:lo + batch_size])) for name in TORCH_COLUMNS}
            if t0 is None:
                t0 = time.perf_counter()
                continue
            seen += whole
            if seen >= min_windows:
                break
    return seen / (time.perf_counter() - t0)


def attention_flops_per_window(cfg) -> float:
    """Model FLOPs of one training window (forward + backward = 3x forward), matmuls only."""
    L, d, f, n = cfg.window_length, cfg.d_model, cfg.d_ff, cfg.n_layers
    per_block = 2 * L * (4 * d * d + (2 * d * d if cfg.residual == "projection" else 0) + 2 * d * f) \
        + 2 * 2 * L * L * d
    forward = n * per_block + 2 * L * d + 2 * L * d
    return 3.0 * forward


def matmul_tflops(n: int = 8192, repeats: int = 10) -> float:
    """The card's measured bf16 matmul rate (TFLOP/s) on random data: the practical ceiling beside the datasheet."""
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * n ** 3 * repeats / (time.perf_counter() - t0) / 1e12


# The GPU step variants: name -> (torch.compile on, compile mode)
GPU_VARIANTS = {"eager": (False, "default"), "compiled": (True, "default"), "graphs": (True, "reduce-overhead")}


def gpu_memory_rate(args, spec: DataSpec, variant: str) -> float:
    """bf16 training windows/s on one GPU from in-memory batches."""
    compiled, mode = GPU_VARIANTS[variant]
    cfg = TrainConfig(preset=args.preset, batch_size=args.gpu_batch_size, warmup_steps=0, use_gpu=True,
                      compile=compiled, compile_mode=mode)
    torch.manual_seed(0)
    model = build_model(cfg).cuda()
    optimizer, scheduler = make_optimizer(model, cfg)
    pool = _memory_batches(args.gpu_batch_size, spec, 0, "cuda")
    steps = StepMetrics()
    for step in range(GPU_WARMUP_STEPS):          # the first steps compile (torch.compile) and tune kernels
        train_step(model, pool[step % 4], optimizer, scheduler, cfg, step=step + 1, into=steps)
    steps.read()
    t0 = time.perf_counter()
    for step in range(args.gpu_steps):
        train_step(model, pool[step % 4], optimizer, scheduler, cfg, step=step + GPU_WARMUP_STEPS + 1, into=steps)
        if (step + 1) % cfg.log_every == 0:
            steps.read()
    steps.read()
    return args.gpu_steps * args.gpu_batch_size / (time.perf_counter() - t0)


def stream_windows(args, units: list[dict]) -> int:
    """How many windows a stream measurement takes: two passes over the lake, or 20 GPU batches if more."""
    return max(20 * args.gpu_batch_size, 2 * sum(int(u["rows"]) for u in units))


def stream_by_tasks(args, spec: DataSpec) -> dict:
    """The stream alone at the GPU batch size for each read-task count of ``--stream-tasks`` (0: the job's
    default), two passes over the lake each (or 20 batches, if more)."""
    import dataclasses

    out = {}
    units = row_groups(spec)
    windows = stream_windows(args, units)
    for requested in [int(t) for t in args.stream_tasks.split(",") if t.strip()]:
        tasks_spec = dataclasses.replace(spec, read_tasks=requested)
        tasks = read_task_count(tasks_spec, len(units))
        rate = stream_rate(make_datasets(tasks_spec), args.gpu_batch_size, min_windows=windows,
                           shuffle_buffer=args.shuffle_buffer)
        key = f"stream_{'default_' if requested == 0 else ''}{tasks}_tasks_windows_per_s"
        out[key] = rate
        print(f"Ray Data stream alone at batch {args.gpu_batch_size}, {tasks} read task(s) over {len(units)} row "
              f"groups{' (the default)' if requested == 0 else ''}: {rate:8.0f} windows/s", flush=True)
        if args.reproducible:
            out[key.replace("stream_", "reproducible_stream_")] = ordered = reproducible_stream_rate(
                args, tasks_spec, windows)
            print(f"  the same, as --reproducible streams it (pass clock, blocks in order, seeded buffer): "
                  f"{ordered:8.0f} windows/s = {ordered / rate:.2f}x", flush=True)
    return out


def reproducible_stream_rate(args, spec: DataSpec, windows: int) -> float:
    """The stream alone as a reproducible run's: its pass clock, Ray Data's ``preserve_order`` (which the job
    sets through Ray Train's ingest options), the shuffle buffer seeded."""
    import dataclasses

    import ray
    from astromer.data import start_pass_clock

    name = f"bench-pass-clock-{os.getpid()}"
    clock = start_pass_clock(name)
    try:
        datasets = make_datasets(dataclasses.replace(spec, pass_clock=name))
        datasets["train"].context.execution_options.preserve_order = True
        return stream_rate(datasets, args.gpu_batch_size, min_windows=windows, shuffle_buffer=args.shuffle_buffer,
                           clock=name)
    finally:
        ray.kill(clock)


def gpu_branch(args, spec: DataSpec, datasets: dict) -> dict:
    """bf16 training throughput on one GPU from in-memory tensors (eager, compiled, compiled with CUDA
    graphs), MFU against the datasheet peak and the measured matmul rate, the Ray Data stream alone at the
    GPU batch size, and one GPU worker fed by Ray Data (TorchTrainer, the job's data path)."""
    flops = attention_flops_per_window(PRESETS[args.preset]())
    out = {"gpu_name": torch.cuda.get_device_name(), "gpu_matmul_tflops": matmul_tflops()}
    print(f"{out['gpu_name']}: bf16 matmul {out['gpu_matmul_tflops']:.0f} TFLOP/s measured "
          f"(datasheet {args.gpu_peak_tflops:.0f}); {flops / 1e9:.2f} GFLOP per training window", flush=True)
    variants = [v.strip() for v in args.gpu_variants.split(",") if v.strip()]
    for label in variants:
        try:
            rate = gpu_memory_rate(args, spec, label)
        except Exception as exc:                   # noqa: BLE001 - report the variant, keep the others
            print(f"GPU {label}: failed ({type(exc).__name__}: {exc})", flush=True)
            continue
        out[f"gpu_{label}_windows_per_s"] = rate
        out[f"gpu_{label}_mfu"] = rate * flops / (args.gpu_peak_tflops * 1e12)
        print(f"GPU bf16 {label}, batch {args.gpu_batch_size}, in memory: {rate:8.0f} windows/s | MFU "
              f"{100 * out[f'gpu_{label}_mfu']:.1f}% of the datasheet (target >= 35%), "
              f"{100 * rate * flops / (out['gpu_matmul_tflops'] * 1e12):.1f}% of the measured matmul rate",
              flush=True)
    timed = [v for v in variants if f"gpu_{v}_windows_per_s" in out]
    if not timed:                                  # nothing to compare the fed worker with
        print("GPU: no in-memory variant ran; the stream and the fed worker are not measured", flush=True)
        return out
    best = max(timed, key=lambda k: out[f"gpu_{k}_windows_per_s"])
    out["gpu_best"] = best
    out["gpu_stream_windows_per_s"] = stream_rate(datasets, args.gpu_batch_size, min_windows=20 * args.gpu_batch_size,
                                                  shuffle_buffer=args.shuffle_buffer)
    print(f"Ray Data stream alone at batch {args.gpu_batch_size}: {out['gpu_stream_windows_per_s']:8.0f} windows/s",
          flush=True)
    fed_cfg = TrainConfig(preset=args.preset, batch_size=args.gpu_batch_size, warmup_steps=0, use_gpu=True,
                          cpus_per_worker=1, shuffle_buffer=args.shuffle_buffer, compile=GPU_VARIANTS[best][0], compile_mode=GPU_VARIANTS[best][1])
    fed = train_rate(fed_cfg, "ray", 1, args.gpu_steps, datasets, warmup=GPU_WARMUP_STEPS)
    out["gpu_ray_data_windows_per_s"] = fed
    out["gpu_fed_ratio"] = fed / out[f"gpu_{best}_windows_per_s"]
    print(f"GPU bf16 {best}, one TorchTrainer worker fed by Ray Data: {fed:8.0f} windows/s = "
          f"{out['gpu_fed_ratio']:.2f} of in-memory (fed if >= 0.90)", flush=True)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lake", help="lake to stream from (default: a temporary synthetic lake)")
    parser.add_argument("--curves", type=int, default=3000, help="synthetic lake size")
    parser.add_argument("--preset", default="astromer2")
    parser.add_argument("--batch-size", type=int, default=16, help="per worker")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per measurement")
    # three rounds: with two, one fast round of either side decided the ratio, which came out from 0.89 to 1.09
    # for the same code on the 2-core machine, while feeding costs the trainers about 0.2% of the CPU
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternating rounds of in-memory and Ray Data fed training per worker count (best of)")
    parser.add_argument("--gpu-batch-size", type=int, default=512)
    parser.add_argument("--gpu-steps", type=int, default=30)
    parser.add_argument("--gpu-peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100 SXM: 989)")
    parser.add_argument("--gpu-only", action="store_true", help="skip the CPU-worker measurements")
    parser.add_argument("--gpu-variants", default=",".join(GPU_VARIANTS),
                        help=f"in-memory GPU step variants to time, of {', '.join(GPU_VARIANTS)}; the fastest "
                             "is then fed by Ray Data")
    parser.add_argument("--stream-tasks", default="1,0",
                        help="read-task counts for the stream alone at the GPU batch size (0: the job's default)")
    parser.add_argument("--stream-only", action="store_true", help="only the stream by read tasks")
    parser.add_argument("--reproducible", action="store_true",
                        help="also the stream by read tasks as a --reproducible run streams it")
    parser.add_argument("--shuffle-buffer", type=int, default=TrainConfig.shuffle_buffer,
                        help="windows each worker mixes its batches from, as the job's --shuffle-buffer (0: off)")
    args = parser.parse_args(argv)
    unknown = sorted({v.strip() for v in args.gpu_variants.split(",")} - set(GPU_VARIANTS) - {""})
    if unknown or not args.gpu_variants.strip():
        parser.error(f"--gpu-variants {args.gpu_variants!r}: expected some of {', '.join(GPU_VARIANTS)}")

    import ray

    lake = args.lake
    if not lake:
        from astromer.ingest import run_ingest

        lake = tempfile.mkdtemp(prefix="bench-lake-")
        run_ingest("synthetic", f"synthetic://?n={args.curves}&seed=0", lake)
    ray.init(address=os.environ.get("RAY_ADDRESS") or "local", num_cpus=None if os.environ.get("RAY_ADDRESS")
             else max(2, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False)
    from astromer.data import quiet_progress

    quiet_progress()
    cfg = TrainConfig(preset=args.preset, batch_size=args.batch_size, warmup_steps=0, lake=lake,
                      drop_noisy=False, val_fraction=0.0, test_fraction=0.0, shuffle_buffer=args.shuffle_buffer)
    spec = cfg.data_spec()
    datasets = make_datasets(spec)
    results: dict[str, float] = {}
    print(f"lake {lake}; preset {args.preset}; batch {args.batch_size}/worker; {args.steps} timed steps "
          f"after {WARMUP_STEPS} warm-up steps; shuffle buffer {args.shuffle_buffer} windows; "
          f"torch {torch.__version__}", flush=True)
    if args.stream_only:
        rates = stream_by_tasks(args, spec)
        rates["in_process_windows_per_s"] = in_process_rate(spec, args.gpu_batch_size,
                                                            min_windows=stream_windows(args, row_groups(spec)))
        print(f"the same sampling in-process at batch {args.gpu_batch_size} (one core, no Ray): "
              f"{rates['in_process_windows_per_s']:8.0f} windows/s", flush=True)
        print(json.dumps({k: round(v, 3) for k, v in rates.items()}))
        ray.shutdown()
        return 0
    for workers in () if args.gpu_only else (1, 2):
        # the machine's speed drifts by 10-20% from minute to minute: the two sides alternate, and each
        # side's best round is compared (as timeit does); every round is printed too
        rounds = {"memory": [], "ray": []}
        for number in range(1, args.rounds + 1):
            for source in ("memory", "ray"):
                rounds[source].append(train_rate(cfg, source, workers, args.steps,
                                                 datasets if source == "ray" else None))
            print(f"{workers} worker(s), round {number}: Ray Data fed {rounds['ray'][-1]:8.1f} windows/s | "
                  f"in-memory {rounds['memory'][-1]:8.1f} | ratio {rounds['ray'][-1] / rounds['memory'][-1]:.2f}",
                  flush=True)
        results[f"memory_{workers}w"] = max(rounds["memory"])
        results[f"ray_data_{workers}w"] = max(rounds["ray"])
        results[f"ratio_{workers}w"] = results[f"ray_data_{workers}w"] / results[f"memory_{workers}w"]
        results[f"round_ratios_{workers}w"] = [round(r / m, 3) for r, m in zip(rounds["ray"], rounds["memory"])]
        print(f"{workers} worker(s): Ray Data fed {results[f'ray_data_{workers}w']:8.1f} windows/s | in-memory "
              f"{results[f'memory_{workers}w']:8.1f} windows/s (best of {args.rounds}) | ratio "
              f"{results[f'ratio_{workers}w']:.2f} (target >= 0.90)", flush=True)
    if not args.gpu_only:
        results["stream"] = stream_rate(datasets, args.batch_size, min_windows=20000,
                                        shuffle_buffer=args.shuffle_buffer)
        results["stream_vs_one_worker"] = results["stream"] / results["ray_data_1w"]
        print(f"Ray Data stream alone: {results['stream']:8.1f} windows/s = {results['stream_vs_one_worker']:.1f}x "
              "one worker's consumption (target >= 5x)", flush=True)
        results["in_process"] = in_process_rate(spec, args.batch_size, min_windows=20000)
        results["stream_vs_in_process"] = results["stream"] / results["in_process"]
        print(f"the same sampling in-process (one core, no Ray): {results['in_process']:8.1f} windows/s; the "
              f"stream gives {results['stream_vs_in_process']:.2f}x that", flush=True)
    results.update(stream_by_tasks(args, spec))
    if torch.cuda.is_available():
        results.update(gpu_branch(args, spec, datasets))
    else:
        print("no CUDA device: GPU branch skipped")
    print(json.dumps({k: (round(v, 3) if isinstance(v, float) and math.isfinite(v) else v)
                      for k, v in results.items()}))
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
