"""The pretraining job's GPU path without Ray: DDP, the collectives and a checkpoint, under NCCL on one GPU.

A lent GPU machine may have torch but not Ray or MLflow, and only minutes: this runs in seconds what a
``--use-gpu`` run does first, with the job's own functions, so that a mistake only CUDA and NCCL show
(a CPU tensor in a collective, a compiled step that does not survive DDP, a device generator not
restored) is found before a long run:

  1. one process group of one rank (NCCL with CUDA, gloo elsewhere: the same calls);
  2. per compile mode (``--modes eager,default,reduce-overhead``): the model in DDP, ``train_step`` with the
     job's settings (bf16 autocast and the fused optimiser on a GPU), the figures read through
     ``StepMetrics.read`` (an all-reduce), the resume choice's ``broadcast_object_list``, the generators'
     ``all_gather_object`` and the validation's ``broadcast`` (``_Loop.validate``);
  3. a checkpoint written and read back: the weights, the optimiser's state on the device, and the device
     generator of the writer; a step after the resume that stays finite.

    PYTHONPATH=platform python3 benchmarks/gpu_ddp_check.py                  # on the GPU machine
    PYTHONPATH=platform python3 benchmarks/gpu_ddp_check.py --preset tiny --modes eager   # anywhere (CPU)

Prints one line per check and ``OK`` at the end; exits 1 at the first failure.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from astromer.train import (  # noqa: E402
    RunTracker,
    StepMetrics,
    TrainConfig,
    TrainState,
    _Loop,
    build_model,
    load_checkpoint,
    make_optimizer,
    rng_states,
    save_checkpoint,
    train_step,
)
from pretrain import _memory_batches  # noqa: E402  (benchmarks/pretrain.py: synthetic batches, no Ray)


def check_mode(mode: str, args, device: torch.device) -> None:
    cuda = device.type == "cuda"
    config = TrainConfig(preset=args.preset, batch_size=args.batch_size, warmup_steps=0, use_gpu=cuda,
                         compile=mode != "eager", compile_mode="default" if mode == "eager" else mode)
    torch.manual_seed(0)
    model = build_model(config).to(device)
    optimizer, scheduler = make_optimizer(model, config)
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if cuda else None,
                                                    output_device=device if cuda else None)
    batches = _memory_batches(args.batch_size, config.data_spec(), 0, device, count=2)
    steps = StepMetrics()
    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        train_step(ddp, batches[step % 2], optimizer, scheduler, config, step=step, into=steps)
    figures = steps.read()                                   # all-reduce of the summed figures
    assert figures["steps"] == args.steps and all(map(torch.isfinite, map(torch.tensor, figures.values())))
    print(f"{mode}: {args.steps} DDP steps in {time.perf_counter() - started:.1f} s (compiles included), "
          f"loss {figures['loss']:.4f}; StepMetrics.read all-reduce ok", flush=True)

    choice = [{"resume": "step-00000010"}]
    dist.broadcast_object_list(choice, src=0)                # the resume choice, as rank 0 makes it
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, rng_states())           # every rank's generators (reproducible runs)
    assert len(gathered[0]) == (2 if cuda else 1), "the device generator is missing from rng_states()"
    loop = _Loop(config, ddp, model, optimizer, scheduler, TrainState(step=args.steps), RunTracker(config, 0),
                 0, dist.get_world_size(), device)
    loop.world = 2                                           # takes the broadcast branch of a multi-rank run
    loop.validate(lambda: iter([batches[0], {k: v[: args.batch_size // 2] for k, v in batches[1].items()}]))
    assert loop.state.best_val is not None
    print(f"{mode}: broadcast_object_list, all_gather_object, validate's broadcast ok "
          f"(val RMSE {loop.state.best_val:.4f})", flush=True)

    with tempfile.TemporaryDirectory() as folder:
        written = rng_states()
        save_checkpoint(folder, model, optimizer, scheduler, TrainState(step=args.steps))
        torch.manual_seed(12345)                             # the restore must undo this
        restored = build_model(config).to(device)
        optimizer2, scheduler2 = make_optimizer(restored, config)
        state = load_checkpoint(folder, restored, optimizer2, scheduler2, device)
        assert state.step == args.steps
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), restored.state_dict().values()))
        assert all(v.device == device for s in optimizer2.state.values() for v in s.values()
                   if torch.is_tensor(v) and v.dim()), "optimiser state not on the device"
        now = rng_states()
        assert all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(written, now)), "generators not restored"
        after = StepMetrics()
        train_step(restored, batches[0], optimizer2, scheduler2, config, step=args.steps + 1, into=after)
        print(f"{mode}: checkpoint round trip ok (weights, optimiser on {device}, {len(now)} generator(s)); "
              f"step after resume loss {after.read()['loss']:.4f}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="astromer2")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--modes", default=None,
                        help="compile modes, of eager, default, reduce-overhead (default: all on CUDA, eager elsewhere)")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)                        # what Ray Train does in each GPU worker
    modes = (args.modes or ("eager,default,reduce-overhead" if cuda else "eager")).split(",")
    with tempfile.TemporaryDirectory() as rendezvous:
        dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{rendezvous}/pg", rank=0,
                                world_size=1)
        try:
            print(f"torch {torch.__version__}, {torch.cuda.get_device_name() if cuda else 'CPU'}, backend "
                  f"{dist.get_backend()}, preset {args.preset}, batch {args.batch_size}", flush=True)
            for mode in modes:
                check_mode(mode.strip(), args, device)
        finally:
            dist.destroy_process_group()
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
