"""Where one GPU training step's time goes, and which changes to it pay: one run, several variants.

Every variant trains the astromer2 preset in bf16 autocast from the same in-memory batches (no data
pipeline) and prints windows/s and model-FLOP utilisation against the datasheet peak and against the
card's own measured bf16 matmul rate:

  before     the job's step as it was: every step read its figures back (a host synchronisation), the
             optimiser was the multi-tensor AdamW, and the positional encoding's out= writes split the
             compiled encoder into 7 graphs
  job        the library's step as the pretraining job runs it (``train_step`` into ``StepMetrics``,
             read every 10 steps; fused AdamW; the compiled encoder)
  graphs     job with CUDA graphs (``compile_mode="reduce-overhead"``)
  b1024      job at twice the batch
  graphs1024 graphs at twice the batch
  whole      job, with the encoder, head and loss compiled as one graph
  flex       whole, with the attention as FlexAttention (the key mask as a score modification)
  nodrop     job without dropout (what dropout costs; not a change the model can take)

and, as two more entries of the list, ``attention``: one block's attention alone (forward + backward at
the step's shapes) for each kernel that takes the key mask, and ``profile``: the job step's kernels by
GPU time.

    python benchmarks/gpu_step.py [--batch 512] [--steps 30] [--variants attention,job,graphs,...] [--out DIR]

Needs torch only (no Ray, no MLflow). ``--device cpu --batch 4 --steps 2 --variants before,job`` runs
the same code on a CPU as a smoke test.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from astromer.config import PRESETS  # noqa: E402
from astromer.losses import weighted_rmse  # noqa: E402
from astromer.train import StepMetrics, TrainConfig, build_model, make_optimizer, train_step  # noqa: E402
from pretrain import _memory_batches, attention_flops_per_window, matmul_tflops  # noqa: E402

VARIANTS = ("before", "job", "graphs", "b1024", "graphs1024", "whole", "flex", "nodrop")
WHOLE = ("whole", "flex")                  # the variants compiled as one graph (encoder, head and loss)
WARMUP = 5


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Step:
    """One variant's training step, built once, called per batch."""

    def __init__(self, name: str, batch: int, device: torch.device):
        self.name, self.device = name, device
        self.cfg = TrainConfig(preset="astromer2", batch_size=batch, warmup_steps=0, use_gpu=device.type == "cuda",
                               compile=name not in WHOLE, dropout=0.0 if name == "nodrop" else None,
                               compile_mode="reduce-overhead" if name.startswith("graphs") else "default")
        torch.manual_seed(0)
        self.model = build_model(self.cfg).to(device)
        self.optimizer, self.scheduler = make_optimizer(self.model, self.cfg)
        if name == "before":
            self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.cfg.lr,
                                               weight_decay=self.cfg.weight_decay)
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: 1.0)
        self.metrics = StepMetrics()
        self.loss_fn = None
        if name in WHOLE:
            # train_step calls the model and the loss apart; compiling them as one graph needs its own step
            model = self.model

            def forward_loss(batch):
                pred = model(batch["times"], batch["mags_in"], batch["padding"], batch["hidden"])
                return weighted_rmse(pred, batch["target"], batch["probed"], batch["errs"])

            self.loss_fn = torch.compile(forward_loss)
        self.step_no = 0
        self.last_loss = float("nan")

    def __call__(self, batch: dict) -> None:
        self.step_no += 1
        if self.name == "before":
            self.last_loss = train_step(self.model, batch, self.optimizer, self.scheduler, self.cfg,
                                        step=self.step_no)["loss"]
            return
        if self.loss_fn is None:
            train_step(self.model, batch, self.optimizer, self.scheduler, self.cfg, step=self.step_no,
                       into=self.metrics)
        else:
            self.model.train()
            loss = self.loss_fn(batch)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
        if self.step_no % self.cfg.log_every == 0:      # read back as often as the job's loop does
            self.last_loss = float(loss) if self.loss_fn is not None else self.metrics.read()["loss"]


def _pe_before(self, times):
    """The positional encoding as it was (out= writes whenever autograd does not need the result)."""
    t = times.float().unsqueeze(-1)
    if t.requires_grad and torch.is_grad_enabled():
        return torch.stack((torch.sin(t * self.omega_even), torch.cos(t * self.omega_odd)), -1).flatten(-2)
    pe = t.new_empty(*times.shape, 2 * self.omega_even.numel())
    torch.sin(t * self.omega_even, out=pe[..., 0::2])
    torch.cos(t * self.omega_odd, out=pe[..., 1::2])
    return pe


class _FlexFunctional:
    """torch.nn.functional with scaled_dot_product_attention served by FlexAttention: the model's additive
    key bias [B, 1, 1, L] becomes a score modification, so no [B, H, L, L] mask is ever formed."""

    def __getattr__(self, name):
        return getattr(torch.nn.functional, name)

    @staticmethod
    def scaled_dot_product_attention(q, k, v, attn_mask=None):
        from torch.nn.attention.flex_attention import flex_attention

        if attn_mask is None:
            return flex_attention(q, k, v)
        key_bias = attn_mask[:, 0, 0, :]                         # [B, L]

        def add_key_bias(score, b, h, q_idx, kv_idx):
            return score + key_bias[b, kv_idx]

        return flex_attention(q, k, v, score_mod=add_key_bias)


def time_variant(name: str, args, device, flops: float, peak: float, matmul: float) -> dict:
    import astromer.model as model_module

    batch = args.batch * (2 if name.endswith("1024") else 1)
    # each variant compiles afresh: they share Encoder.forward, and past Dynamo's recompile limit a later
    # variant would run eager with only a warning, timed as if compiled
    torch._dynamo.reset()
    t_build = time.perf_counter()
    saved = model_module.PositionalEncoding.forward, model_module.F
    if name == "before":
        model_module.PositionalEncoding.forward = _pe_before
    if name == "flex":
        model_module.F = _FlexFunctional()
    try:
        return _time_steps(name, args, device, flops, peak, matmul, batch, t_build)
    finally:
        model_module.PositionalEncoding.forward, model_module.F = saved


def warmed_step(name: str, batch: int, device) -> tuple[Step, list[dict]]:
    """A variant's step after its warm-up steps (compilation, kernel tuning), and its in-memory batches."""
    step = Step(name, batch, device)
    pool = _memory_batches(batch, step.cfg.data_spec(), 0, device)
    for i in range(WARMUP):
        step(pool[i % len(pool)])
    sync(device)
    return step, pool


def _time_steps(name, args, device, flops, peak, matmul, batch, t_build) -> dict:
    step, pool = warmed_step(name, batch, device)
    warm_s = time.perf_counter() - t_build
    times = []
    for _rep in range(3):              # three timed rounds: the median, and the spread for the noise
        sync(device)
        t0 = time.perf_counter()
        for i in range(args.steps):
            step(pool[i % len(pool)])
        sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    rate = args.steps * batch / times[1]
    spread = (times[-1] - times[0]) / times[1]
    row = {"variant": name, "batch": batch, "windows_per_s": rate, "spread": spread, "build_s": warm_s,
           "loss": float(step.last_loss), "mfu": rate * flops / peak,
           "of_matmul": rate * flops / matmul if matmul else float("nan")}
    print(f"{name:8s} batch {batch:5d}: {rate:9.0f} windows/s (spread {100 * spread:.0f}%), MFU "
          f"{100 * row['mfu']:.1f}% of datasheet, {100 * row['of_matmul']:.1f}% of measured matmul; "
          f"loss {row['loss']:.4f}; build+warm-up {warm_s:.0f} s", flush=True)
    return row


def attention_kernels(args, device) -> list[dict]:
    """Forward + backward of one block's attention at the training shapes, [B, 4, 200, 64] bf16 with a
    key mask from padding | hidden (about 40% of keys masked), for each kernel that takes it."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b, h, length, dh = args.batch, 4, 200, 64
    q, k, v = (torch.randn(b, h, length, dh, device=device, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    masked = torch.rand(b, length, device=device) < 0.4
    bias = (masked.float() * -1e9)[:, None, None, :].to(torch.bfloat16)
    grad = torch.randn(b, h, length, dh, device=device, dtype=torch.bfloat16)
    rows = []

    def run(fn, label):
        try:
            for _ in range(3):
                fn().backward(grad)
            sync(device)
            t0 = time.perf_counter()
            for _ in range(20):
                fn().backward(grad)
            sync(device)
            ms = (time.perf_counter() - t0) / 20 * 1e3
        except Exception as exc:          # noqa: BLE001 - a kernel that refuses these shapes is a result too
            print(f"attention {label}: failed ({type(exc).__name__}: {str(exc)[:160]})", flush=True)
            return
        rows.append({"attention": label, "ms_fwd_bwd": ms, "ms_per_step_6_blocks": 6 * ms})
        print(f"attention {label:28s}: {ms:6.2f} ms forward+backward per block, {6 * ms:6.1f} ms per step",
              flush=True)

    def sdpa(mask):
        return lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    run(sdpa(bias), "sdpa default, additive mask")
    for backend in ("EFFICIENT_ATTENTION", "CUDNN_ATTENTION"):
        def under(backend=backend):
            with sdpa_kernel(getattr(SDPBackend, backend)):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        run(under, f"sdpa {backend.lower()}")
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        run(sdpa(None), "flash, no mask (floor)")
    try:
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention)

        def key_mask(score, b_, h_, q_idx, kv_idx):
            return torch.where(masked[b_, kv_idx], -float("inf"), score)

        run(lambda: flex(q, k, v, score_mod=key_mask), "flex_attention, key score_mod")
    except Exception as exc:              # noqa: BLE001
        print(f"attention flex: failed ({type(exc).__name__}: {str(exc)[:160]})", flush=True)
    return rows


def profile(args, device, out_dir: str | None) -> None:
    """The job step's kernels by GPU time (5 profiled steps after the warm-up)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    step, pool = warmed_step("job", args.batch, device)
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(5):
            step(pool[i % len(pool)])
        sync(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=70)
    if out_dir:
        with open(os.path.join(out_dir, "profile_job.txt"), "w") as fh:
            fh.write(table)
    print("\n".join(table.splitlines()[:28]), flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--variants", default=",".join(("attention",) + VARIANTS + ("profile",)),
                        help="in order; besides the step variants: attention (the kernels alone), profile")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 datasheet peak")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="folder for the JSON results and profile")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    flops = attention_flops_per_window(PRESETS["astromer2"]())
    matmul = matmul_tflops() * 1e12 if device.type == "cuda" else 0.0
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"{name}, torch {torch.__version__}; {flops / 1e9:.2f} GFLOP per training window; bf16 matmul "
          f"{matmul / 1e12:.0f} TFLOP/s measured, datasheet {args.peak_tflops:.0f}", flush=True)
    results: dict = {"device": name, "torch": torch.__version__, "matmul_tflops": matmul / 1e12, "rows": []}

    def save():
        if args.out:
            with open(os.path.join(args.out, "gpu_step.json"), "w") as fh:
                json.dump(results, fh, indent=1)

    for variant in [v for v in args.variants.split(",") if v]:
        if variant not in VARIANTS + ("attention", "profile"):
            parser.error(f"unknown variant {variant!r}: expected some of {','.join(VARIANTS)},attention,profile")
        try:
            if variant == "attention":
                results["attention"] = attention_kernels(args, device)
            elif variant == "profile":
                profile(args, device, args.out)
            else:
                results["rows"].append(time_variant(variant, args, device, flops, args.peak_tflops * 1e12,
                                                    matmul))
        except Exception as exc:          # noqa: BLE001 - report the variant, keep the others
            print(f"{variant}: failed ({type(exc).__name__}: {str(exc)[:300]})", flush=True)
        save()
    print("\nvariant   batch  windows/s  MFU(datasheet)  MFU(measured matmul)")
    for row in results["rows"]:
        print(f"{row['variant']:8s} {row['batch']:6d} {row['windows_per_s']:10.0f} {100 * row['mfu']:14.1f}% "
              f"{100 * row['of_matmul']:19.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
