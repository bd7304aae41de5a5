"""Masked-reconstruction training: settings, the step, checkpoints, metrics and plots.

Two drivers share these pieces:

* ``worker_loop`` is what every Ray Train worker runs (``jobs/pretrain.py`` and ``jobs/finetune.py`` pass
  it to ``TorchTrainer``): batches from ``get_dataset_shard``, DDP, checkpoints at a step interval,
  restart from ``ray.train.get_checkpoint()``, MLflow logging on rank 0.
* ``fit_windows`` is a plain in-process loop over a small list of curves (per-fold finetuning).

A checkpoint folder holds ``model.safetensors`` + ``config.json`` (astromer.weights), ``trainer_state.pt``
(optimiser, scheduler and RNG state; read with ``torch.load(weights_only=True)``) and ``state.json``
(step, epoch, early-stopping state, MLflow run id).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from astromer.config import PRESETS, MaskConfig, ModelConfig, check_setting_types, read_settings_file
from astromer.losses import probed_rmse, r2, r2_sums, weighted_rmse
from astromer.windows import shortest_probed_window

log = logging.getLogger("astromer.train")

STATE_FILE = "state.json"
NONFINITE_KEY = "astromer.nonfinite_loss"   # run tag (and report key) carrying a NaN stop to the job
TRAINER_STATE_FILE = "trainer_state.pt"


NO_BATCH_KEY = "astromer.no_training_batch"  # the same for an epoch that gave a worker no batch at all


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite: training stops, naming the step and batch; no checkpoint is written."""


class NoTrainingBatch(ValueError):
    """An epoch gave no training batch (too few usable curves for batch_size x workers): no retry can help."""


#: why a worker ended training early, and the run tag that carries it to the job
STOP_KEYS = ((NonFiniteLossError, NONFINITE_KEY), (NoTrainingBatch, NO_BATCH_KEY))


# --------------------------------------------------------------------------- settings

@dataclass
class TrainConfig:
    """Every setting of a pretraining or finetuning run (flags and --config files map onto these names)."""

    # data
    lake: str | None = None                 # lake root; default: ASTROMER_HOME/lake
    surveys: list[str] | None = None        # surveys to read; default: every survey in the lake
    bands: list[str] | None = None          # bands to read; default: every band
    corpus: str | None = None               # registered as astromer2-<corpus>; default: the sorted survey names
    val_fraction: float = 0.1               # objects held out for validation (split by a hash of the object)
    test_fraction: float = 0.1              # objects held out for the final test
    clean: bool = True                      # the paper's cleaning (off: finite values only)
    drop_noisy: bool = True                 # the paper's noise criteria; off for catalogued variable stars
    min_observations: int = 10              # shorter curves (after cleaning) are left out
    count_cleaning: bool = True             # count what the cleaning drops (one extra read of the selection)
    label_set: str | None = None            # finetuning: labelled curves only
    labels: list[str] | None = None         # finetuning: only these labels of the label set
    # model
    preset: str = "astromer2"               # astromer2 | astromer1 | tiny (astromer.config.PRESETS)
    window_length: int | None = None        # default: the preset's
    dropout: float | None = None            # default: the preset's
    init_from: str | None = None            # models:/NAME@ALIAS or a model folder (finetuning)
    time_attention_init: float = 2.0        # fresh models: block 1's query/key = this x identity (0: random)
    # task
    probed: float = 0.5                     # fraction of a window's observations probed
    same: float = 0.2                       # fraction of the probed ones left as they are
    random: float = 0.2                     # fraction of the probed ones left after `same` that get another
                                            # observation's magnitude; the rest are hidden ([MASK])
    loss: str = "plain"                     # "plain" | "weighted" (uncertainty-weighted RMSE)
    # optimisation
    optimizer: str = "adam"                 # "adam" | "adamw"
    lr: float = 1e-4                        # peak learning rate (astromer2 collapsed to the window mean at 1e-3)
    weight_decay: float = 0.0               # decoupled with adamw, L2 with adam
    schedule: str = "cosine"                # "cosine" (linear warm-up, cosine decay) | "constant" (warm-up only)
    warmup_steps: int = 100                 # linear warm-up from lr / warmup_steps
    min_lr_ratio: float = 0.05              # the cosine's floor, as a fraction of lr
    grad_clip: float | None = 1.0           # gradient norm clip (0: off)
    batch_size: int = 64                    # per worker
    epochs: int = 10                        # passes over the training curves
    max_steps: int | None = None            # stop after this many steps (the schedule spans them)
    total_steps: int | None = None          # schedule length; filled in by the job from the lake size
    patience: int = 5                       # evaluations without improvement before stopping
    val_every: int | None = None            # evaluate every N steps (default: at each epoch end)
    # execution
    num_workers: int = 2                    # Ray Train workers (DDP ranks; one per GPU)
    use_gpu: bool = False                   # a GPU per worker, bf16 autocast, NCCL
    cpus_per_worker: float = 0.5           # laptop defaults: 2 workers + the data tasks fit 2 cores
    data_cpus: float = 0.25                 # CPUs reserved per Ray Data task
    read_tasks: int = 0                     # tasks reading and windowing the lake; 0: half the cluster's CPUs
    shuffle_buffer: int = 4096              # windows each worker mixes its batches from (0: stream order)
    checkpoint_every: int = 100             # steps between checkpoints
    keep_checkpoints: int = 2               # newest checkpoints kept on storage
    max_failures: int = 2                   # restarts of lost workers from the last checkpoint
    compile: bool = False                   # torch.compile the encoder
    compile_mode: str = "default"           # torch.compile mode; "reduce-overhead" adds CUDA graphs on GPUs
    seed: int = 0                           # the split, the initial weights, the validation and test windows
    reproducible: bool = False              # same settings and cluster: the same steps, bit for bit
    log_every: int = 10                     # steps between logged training figures
    system_metrics_every: float = 10.0      # seconds between samples of each node's CPU, memory, GPU (0: off)
    # tracking
    run_name: str | None = None             # re-running a name resumes it; default: <job>-<corpus>-<time>
    storage_path: str | None = None         # default: ASTROMER_HOME/ray_results
    experiment: str = "astromer-pretrain"   # MLflow experiment
    tracking_uri: str | None = None         # default: MLFLOW_TRACKING_URI, or SQLite under ASTROMER_HOME
    mlflow_run_id: str | None = None        # set by the job (resume finds the run by run_name)
    pass_clock: str | None = None           # set by the job: a reproducible run's PassClock actor (astromer.data)
    lake_digest: str | None = None          # set by the job: the selected row groups (a reproducible resume checks it)
    register_as: str | None = None          # default: astromer2-<corpus>
    tags: dict[str, str] = field(default_factory=dict)
    pid_dir: str | None = None              # workers append their pid to rank<N>.pid here (operations, fault tests)

    def __post_init__(self):
        check_setting_types(self)
        if self.preset not in PRESETS:
            raise ValueError(f"preset {self.preset!r}: expected one of {sorted(PRESETS)}")
        checks = {"loss": ("plain", "weighted"), "optimizer": ("adam", "adamw"),
                  "schedule": ("cosine", "constant"),
                  "compile_mode": ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")}
        for name, allowed in checks.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}: expected one of {allowed}")
        for name in ("batch_size", "epochs", "checkpoint_every", "num_workers", "log_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r}: expected a positive integer")
        if not (self.system_metrics_every == 0 or self.system_metrics_every >= 1):
            raise ValueError(f"system_metrics_every={self.system_metrics_every!r}: expected 0 (off) or at least 1 "
                             "second between samples")
        if int(self.shuffle_buffer) < 0:
            raise ValueError(f"shuffle_buffer={self.shuffle_buffer!r}: expected 0 (off) or a number of windows")
        if self.lr <= 0:
            raise ValueError(f"lr={self.lr}: expected a positive learning rate")
        MaskConfig(self.probed, self.same, self.random)   # validates the fractions

    def check_probed(self, window_length: int) -> None:
        """Refuse a ``probed`` fraction that probes no observation of the shortest window this run trains on
        (floor(probed * n) is 0 when probed < 1/n): a batch of such windows has no loss term and a NaN
        gradient. The shortest window: the model's length, or a curve of the fewest observations the run keeps
        (``min_observations``; with the cleaning on, never fewer than it needs)."""
        from astromer.lake.cleaning import MIN_OBS

        kept = max(int(self.min_observations), MIN_OBS if self.clean else 1)
        shortest = min(int(window_length), kept)
        if shortest < shortest_probed_window(self.mask):
            which = "the window length" if shortest == int(window_length) else \
                f"the shortest curve kept: --min-observations {self.min_observations}"
            raise ValueError(f"probed={self.probed!r} probes no observation of a window of {shortest} observations "
                             f"({which}): expected probed >= {1 / shortest:.4g}")

    # ---- derived ----
    @property
    def mask(self) -> MaskConfig:
        return MaskConfig(self.probed, self.same, self.random)

    def model_config(self) -> ModelConfig:
        base = PRESETS[self.preset]().to_dict()
        if self.window_length is not None:
            base["window_length"] = int(self.window_length)
        if self.dropout is not None:
            base["dropout"] = float(self.dropout)
        return ModelConfig.from_dict(base)

    def data_spec(self):
        from astromer.data import DataSpec

        return DataSpec(lake=str(self.lake), surveys=self.surveys, bands=self.bands,
                        window_length=self.effective_window_length(), mask=self.mask, val_fraction=self.val_fraction,
                        test_fraction=self.test_fraction, seed=self.seed, clean=self.clean,
                        drop_noisy=self.drop_noisy,
                        min_observations=self.min_observations, label_set=self.label_set,
                        labels=self.labels, data_cpus=self.data_cpus, read_tasks=self.read_tasks,
                        pass_clock=self.pass_clock if self.reproducible else None)

    def effective_window_length(self, parent: ModelConfig | None = None) -> int:
        """The run's window length: ``window_length``, else the parent model's (``parent``, when the caller has
        read its config already) or the preset's."""
        if self.window_length:
            return int(self.window_length)
        if self.init_from:
            return (parent or init_config(self.init_from, self.tracking_uri)).window_length
        return self.model_config().window_length

    # ---- round-trip ----
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown training setting(s) {unknown}; known: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | os.PathLike, **overrides) -> TrainConfig:
        """Settings from a JSON or YAML file, then ``overrides`` (flags given on the command line)."""
        return cls.from_dict({**read_settings_file(path), **overrides})


#: the settings the job fills in for its workers (no flag shows them; they are not the run's parameters)
JOB_SET = ("mlflow_run_id", "pass_clock", "lake_digest")


def init_config(init_from: str, tracking_uri: str | None = None, check: bool = False) -> ModelConfig:
    """The config of the model a run starts from (a registry URI or a model folder). With ``check`` the
    model is loaded once in the driver first: a damaged folder or registered version (config, safetensors,
    tensors that do not fit) raises a ValueError naming the file before Ray starts, instead of failing
    every worker and every retry."""
    from astromer.registry import resolve_model_dir

    return ModelConfig.from_json(resolve_model_dir(init_from, tracking_uri, check=check) / "config.json")


# --------------------------------------------------------------------------- model, optimiser, schedule

def build_model(config: TrainConfig):
    """A fresh model of the preset, or the model at ``config.init_from`` (registry URI or folder); its
    encoder goes through torch.compile when ``config.compile``."""
    from astromer.model import Astromer

    if config.init_from:
        from astromer.registry import resolve_model_dir
        from astromer.weights import load_model_dir

        # workers resolve against the job's registry (their environment may point elsewhere)
        model = load_model_dir(resolve_model_dir(config.init_from, config.tracking_uri))
        if config.dropout is not None:
            for module in model.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = float(config.dropout)
    else:
        model = Astromer(config.model_config())
        if config.time_attention_init:
            from astromer.model import init_time_attention

            init_time_attention(model.encoder, config.time_attention_init)
    return model.compile_encoder(mode=config.compile_mode) if config.compile else model


def make_optimizer(model: torch.nn.Module, config: TrainConfig):
    """(optimiser, LambdaLR scheduler): linear warm-up, then cosine decay to ``min_lr_ratio`` over
    ``total_steps`` (or constant). On a GPU (the model moved there first) the optimiser is the fused
    kernel: one launch for all parameters, and it can skip a step on the device (see ``train_step``)."""
    opt_cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    params = list(model.parameters())
    fused = bool(params) and all(p.is_cuda for p in params)
    optimizer = opt_cls(params, lr=config.lr, weight_decay=config.weight_decay, fused=fused or None)
    total = config.total_steps or config.max_steps
    warmup = max(0, int(config.warmup_steps))

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if config.schedule == "constant" or not total or total <= warmup:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --------------------------------------------------------------------------- the step

def compute_loss(pred, batch: dict, config: TrainConfig):
    if config.loss == "weighted":
        return weighted_rmse(pred, batch["target"], batch["probed"], batch["errs"])
    return probed_rmse(pred, batch["target"], batch["probed"])


def _all_ranks_finite(loss: torch.Tensor) -> torch.Tensor:
    """Whether the loss is finite on every rank (one tiny all-reduce, so all ranks stop together), as a
    bool tensor on the loss's device: nothing is read back here."""
    ok = torch.isfinite(loss.detach()).to(torch.float32).reshape(1)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_backend() == "nccl":
            ok = ok.to(loss.device)
        torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
    return ok[0] > 0


def _nonfinite_message(value: float, step: int, epoch: int, batch_index: int) -> str:
    return (f"loss is {value} at step {step} (epoch {epoch}, batch {batch_index}); "
            "stopping without writing a checkpoint")


class StepMetrics:
    """The training steps' loss, RMSE and R2 on the probed subset, summed on the device where they are
    computed until ``read``, then averaged over the ranks. Reading a number back from a GPU waits for all the work queued before it, and
    the GPU then idles while the next step is launched; the job's loop reads once per ``log_every`` steps
    instead of after every step (with the fused optimiser, on one H200 at batch 512: 25,100 and 28,900
    against 23,300 windows/s, and 32,500 to 32,800 with CUDA graphs; docs/performance.md). On a CPU it
    changes nothing.

    A step whose loss was not finite adds nothing; ``read`` raises NonFiniteLossError naming the first such
    step (its update was skipped on the device, see ``train_step``)."""

    NAMES = ("loss", "rmse", "r2")

    def __init__(self):
        self.sums: torch.Tensor | None = None            # [3] float64 on the device
        self.bad_step = self.bad_loss = None             # first non-finite step (0: none) and its loss
        self.steps = 0
        self.where: dict[int, tuple[int, int]] = {}      # step -> (epoch, batch) since the last read

    def add(self, values: torch.Tensor, finite: torch.Tensor, step: int, epoch: int, batch_index: int) -> None:
        values = values.detach().to(torch.float64)        # [3]: loss, rmse, r2
        if self.sums is None:
            self.sums = torch.zeros_like(values)
            self.bad_step = torch.zeros((), dtype=torch.float64, device=values.device)
            self.bad_loss = torch.zeros_like(self.bad_step)
        self.sums += torch.where(finite, values, 0.0)
        first = (self.bad_step == 0) & ~finite
        self.bad_step = torch.where(first, float(step), self.bad_step)
        self.bad_loss = torch.where(first, values[0], self.bad_loss)
        self.steps += 1
        self.where[step] = (epoch, batch_index)

    def read(self) -> dict[str, float]:
        """Means since the last read plus ``steps`` (their count); {} when there were none. The one host
        synchronisation."""
        if not self.steps:
            return {}
        sums = self.sums
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # every rank reads at the same steps: the figures become the mean over all ranks' batches
            # (rank 0's alone is half the story with 2 workers; the non-finite flags agree already)
            torch.distributed.all_reduce(sums)
            sums = sums / torch.distributed.get_world_size()
        *sums, bad_step, bad_loss = torch.cat([sums, self.bad_step[None], self.bad_loss[None]]).tolist()
        steps, where = self.steps, self.where
        self.sums, self.steps, self.where = None, 0, {}
        if bad_step:
            epoch, batch_index = where[int(bad_step)]
            raise NonFiniteLossError(_nonfinite_message(bad_loss, int(bad_step), epoch, batch_index))
        return {**{name: total / steps for name, total in zip(self.NAMES, sums)}, "steps": steps}


def _skips_on_device(optimizer) -> bool:
    """Whether the optimiser can skip a step by a flag on the device (the fused kernels' ``found_inf``)."""
    return bool(optimizer.defaults.get("fused"))


def train_step(model, batch: dict, optimizer, scheduler, config: TrainConfig, *, step: int, epoch: int = 0,
               batch_index: int = 0, into: StepMetrics | None = None) -> dict[str, float] | None:
    """One optimisation step on a masked batch. ``step`` is the number this step will have once done.

    Without ``into``: returns loss, rmse, r2 and lr as floats, and raises NonFiniteLossError (before any
    update) when the loss is NaN or infinite on any rank. With ``into`` (a StepMetrics): nothing is read
    back; the figures are added there and None is returned. A fused optimiser (GPUs) then skips a
    non-finite step's update on the device and ``into.read()`` raises; any other raises here at once."""
    model.train()
    pred = model(batch["times"], batch["mags_in"], batch["padding"], batch["hidden"])
    loss = compute_loss(pred, batch, config)
    finite = _all_ranks_finite(loss)
    deferred = into is not None and _skips_on_device(optimizer)
    if not deferred and not bool(finite):
        raise NonFiniteLossError(_nonfinite_message(loss.item(), step, epoch, batch_index))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if config.grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    if deferred:
        # read by the fused kernel: where 1 it leaves weights, moments and step count as they were
        optimizer.found_inf = (~finite).to(torch.float32)
    optimizer.step()
    scheduler.step()
    with torch.no_grad():
        pred = pred.detach().float()
        values = torch.stack([loss.detach().float(), probed_rmse(pred, batch["target"], batch["probed"]),
                              r2(pred, batch["target"], batch["probed"])])
    if into is not None:
        into.add(values, finite, step, epoch, batch_index)
        return None
    loss_value, rmse, score = values.tolist()
    return {"loss": loss_value, "rmse": rmse, "r2": score, "lr": float(scheduler.get_last_lr()[0])}


class ProbedScore:
    """Accumulates probed RMSE (the loss's order: per-window mean, mean over windows, root), R2 (the
    official definition, :func:`~astromer.losses.r2`, its sums taken over all windows), and baselines that
    see what the model sees, over many batches:

    - ``baseline``: every probed magnitude predicted by the mean of the window's visible (unprobed)
      magnitudes (the number to beat);
    - ``interp``: linear interpolation in time between the visible neighbours before and after
      (the nearest one at the edges), the simplest rule that uses the times at all;
    - ``smoother``: a Gaussian kernel average of the visible magnitudes, shrunk towards the window mean,
      with each window's bandwidth chosen by leave-one-out over its visible magnitudes
      (:func:`kernel_smoother`): the best a rule that only looks at neighbours in time does without
      training, the level a model has to pass to have learnt more than local smoothing.

    ``hidden_*`` are the same scores over the hidden ([MASK]ed) probed values only: of the other probed
    values the model sees the kept ones as they are (they can be copied) and the randomised ones with
    another observation's magnitude; the hidden ones must be inferred.
    """

    NAMES = ("model", "baseline", "interp", "smoother")
    SUBSETS = ("probed", "hidden")

    def __init__(self):
        self.windows = dict.fromkeys(self.SUBSETS, 0)                  # windows with any value in the subset
        self.sums = {subset: dict.fromkeys(self.NAMES, 0.0) for subset in self.SUBSETS}   # of per-window MSEs
        self.ss_res = 0.0   # R2's two sums over all windows (losses.r2: the training batches' definition)
        self.ss_tot = 0.0

    def add(self, pred: torch.Tensor, batch: dict) -> None:
        pred = pred.detach().double().cpu()
        target = batch["target"].double().cpu()
        probed = batch["probed"].cpu()
        hidden = batch["hidden"].cpu() & probed if "hidden" in batch else probed
        visible = ~batch["padding"].cpu() & ~probed
        v = visible.double()
        mean_visible = (target * v).sum(1) / v.sum(1).clamp_min(1)
        times = batch["times"].double().cpu()
        guesses = {"model": pred, "baseline": mean_visible[:, None].expand_as(target),
                   "interp": _interpolate_visible(times, target, visible, mean_visible),
                   "smoother": kernel_smoother(times, target, visible, mean_visible)}
        for subset, mask in (("probed", probed), ("hidden", hidden)):
            w = mask.double()
            counts = w.sum(1)
            has = counts > 0
            for name, guess in guesses.items():
                self.sums[subset][name] += float((((guess - target) ** 2 * w).sum(1) / counts.clamp_min(1))[has].sum())
            self.windows[subset] += int(has.sum())
        ss_res, ss_tot = r2_sums(pred, target, probed)
        self.ss_res += float(ss_res)
        self.ss_tot += float(ss_tot)

    def result(self, prefix: str) -> dict[str, float]:
        if not self.windows["probed"]:
            return {}
        out = {f"{prefix}_r2": 1.0 - (self.ss_res / self.ss_tot if self.ss_tot > 0 else 0.0),   # as losses.r2
               f"{prefix}_windows": float(self.windows["probed"])}
        for subset in self.SUBSETS:
            if not self.windows[subset]:
                continue
            for name in self.NAMES:
                key = "_".join(p for p in (prefix, "hidden" if subset == "hidden" else "",
                                           "" if name == "model" else name, "rmse") if p)
                out[key] = math.sqrt(self.sums[subset][name] / self.windows[subset])
        return out


def _interpolate_visible(times: torch.Tensor, target: torch.Tensor, visible: torch.Tensor,
                         fallback: torch.Tensor) -> torch.Tensor:
    """Per window, the magnitude at every time linearly interpolated between the visible observations
    (``np.interp``: the nearest visible value beyond the first/last one); ``fallback`` without any."""
    t, y, seen = times.numpy(), target.numpy(), visible.numpy()
    out = np.repeat(fallback.numpy()[:, None], t.shape[1], axis=1)
    for row in range(t.shape[0]):
        keep = seen[row]
        if keep.any():
            out[row] = np.interp(t[row], t[row][keep], y[row][keep])
    return torch.from_numpy(out)


#: bandwidths (days) the smoother baseline chooses from: hours to a season
SMOOTHER_BANDWIDTHS = (0.25, 1.0, 4.0, 16.0, 64.0)
#: weight of the window mean in the smoother, in units of one observation at zero distance
SMOOTHER_SHRINK = 1.0


def kernel_smoother(times: torch.Tensor, target: torch.Tensor, visible: torch.Tensor, mean: torch.Tensor,
                    bandwidths=SMOOTHER_BANDWIDTHS, shrink: float = SMOOTHER_SHRINK) -> torch.Tensor:
    """Per window, sum_j k(t - t_j) y_j + shrink * mean over sum_j k(t - t_j) + shrink, j over the visible
    observations, k a Gaussian of bandwidth h; h is chosen per window among ``bandwidths`` by the
    leave-one-out error over the visible observations (each predicted from the others), so nothing
    about the probed values is used. [B, L] in, [B, L] out; a window without visible values gets ``mean``."""
    v = visible.double()                                                       # [B, L]
    y = target * v
    half_dt2 = -0.5 * (times[:, :, None] - times[:, None, :]) ** 2             # [B, L, L], once for all h
    m = mean[:, None]
    best_err = torch.full_like(mean, float("inf"))
    out = m.expand_as(target).clone()
    for h in bandwidths:
        k = torch.exp(half_dt2 / (h * h)) * v[:, None, :]                     # visible keys only
        num = torch.bmm(k, y.unsqueeze(-1)).squeeze(-1)                        # [B, L]
        den = k.sum(-1)
        pred = (num + shrink * m) / (den + shrink)
        loo = (num - y + shrink * m) / (den - v + shrink)                      # without the point itself
        err = (((loo - target) ** 2) * v).sum(-1) / v.sum(-1).clamp_min(1)     # [B]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        out = torch.where(better[:, None], pred, out)
    return out


@torch.no_grad()
def evaluate(model, batches, prefix: str = "val", max_batches: int | None = None) -> dict[str, float]:
    """Probed RMSE, R2 and the window-mean baseline of ``model`` over ``batches`` (dicts of tensors)."""
    model.eval()
    score = ProbedScore()
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        score.add(model(batch["times"], batch["mags_in"], batch["padding"], batch["hidden"]), batch)
    return score.result(prefix)


# --------------------------------------------------------------------------- checkpoints

@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    pass_steps: int = 0                     # steps taken in the current pass (a reproducible resume skips them)
    stream: dict[str, str] = field(default_factory=dict)   # what shapes the training stream (stream_shape)
    best_val: float | None = None
    evals_since_best: int = 0
    resumed_from: int | None = None
    mlflow_run_id: str | None = None
    finished: bool = False
    metrics: dict[str, float] = field(default_factory=dict)


def _unwrap(model):
    return model.module if hasattr(model, "module") else model


def save_checkpoint(folder: str | os.PathLike, model, optimizer, scheduler, state: TrainState,
                    rank_rng: list[list[torch.Tensor]] | None = None) -> Path:
    """Write a complete checkpoint into ``folder`` (model as safetensors, the rest as tensors + JSON).
    ``rank_rng``: every rank's generator states (:func:`rng_states`), for a reproducible resume."""
    from astromer.weights import save_model

    folder = Path(folder)
    save_model(_unwrap(model), folder, metadata={"step": state.step})
    # the writer's generators: the CPU one, and on a GPU the device's, which draws the dropout masks there
    extra = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "torch_rng": torch.get_rng_state(), "rng": rng_states()}
    if rank_rng is not None:
        extra["rank_rng"] = rank_rng
    torch.save(extra, folder / TRAINER_STATE_FILE)
    (folder / STATE_FILE).write_text(json.dumps(asdict(state), indent=2))
    return folder


def read_checkpoint(folder: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[dict, dict, dict]:
    """A checkpoint's three parts, read and checked: the model's tensors (safetensors), the optimiser,
    scheduler and RNG state (``weights_only``: no code is unpickled) and the train state. Raises on a missing
    or damaged file, before anything is applied."""
    from safetensors.torch import load_file

    from astromer.weights import MODEL_FILE

    folder = Path(folder)
    tensors = load_file(str(folder / MODEL_FILE), device=str(device))
    extra = torch.load(folder / TRAINER_STATE_FILE, map_location=device, weights_only=True)
    return tensors, extra, json.loads((folder / STATE_FILE).read_text())


def load_checkpoint(folder: str | os.PathLike, model, optimizer=None, scheduler=None,
                    device: torch.device | str = "cpu", rank: int | None = None) -> TrainState:
    """Restore model (safetensors), optimiser/scheduler/RNG (weights_only) and the train state. With a
    ``rank`` and every rank's generators in the checkpoint, that rank's are restored (its CPU and, on a GPU,
    its device generator); otherwise rank 0's (CPU, and the device's: restored on a GPU only the CPU one,
    rank 0 drew its dropout masks from step 0's again after every resume)."""
    tensors, extra, state = read_checkpoint(folder, device)
    _unwrap(model).load_state_dict(tensors)
    if optimizer is not None:
        optimizer.load_state_dict(extra["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(extra["scheduler"])
    ranks = extra.get("rank_rng")
    if rank is not None and ranks is not None and rank < len(ranks):
        set_rng_states(ranks[rank])
    elif "rng" in extra:
        set_rng_states(extra["rng"])
    else:                                       # a checkpoint from before the device generator was saved
        torch.set_rng_state(extra["torch_rng"].cpu())
    return TrainState(**state)


def stream_shape(config: TrainConfig, world: int) -> dict[str, str]:
    """The settings that decide which windows reach which worker in which order: a reproducible run resumed
    under others no longer repeats the uninterrupted one."""
    spec = asdict(config.data_spec())
    shape = {k: v for k, v in spec.items() if k not in ("lake", "data_cpus", "pass_clock")}
    shape.update(workers=world, batch_size=config.batch_size, shuffle_buffer=config.shuffle_buffer,
                 reproducible=config.reproducible, lake=config.lake_digest)
    return {k: json.dumps(v, sort_keys=True) for k, v in shape.items()}


def rng_states() -> list[torch.Tensor]:
    """This process's generator states: the CPU one, and the current GPU's where there is one."""
    states = [torch.get_rng_state()]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states.append(torch.cuda.get_rng_state())
    return states


def set_rng_states(states: list[torch.Tensor]) -> None:
    torch.set_rng_state(states[0].cpu())
    if len(states) > 1 and torch.cuda.is_available():
        torch.cuda.set_rng_state(states[1].cpu())


_CHECKPOINT_DIR = re.compile(r"step-(\d{8})(-final)?")


def checkpoint_dir_name(step: int, final: bool = False) -> str:
    """The name of a checkpoint's folder under ``storage_path/run_name`` (one place for both ends)."""
    return f"step-{step:08d}" + ("-final" if final else "")


def run_checkpoints(storage_path: str, run_name: str) -> list[tuple[int, bool, str]]:
    """The checkpoint folders under ``storage_path/run_name`` as (step, final, url), newest first."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(storage_path)
    base = f"{root.rstrip('/')}/{run_name}"
    if not fs.exists(base):
        return []
    found = []
    for path in fs.ls(base, detail=False):
        match = _CHECKPOINT_DIR.fullmatch(path.rstrip("/").rsplit("/", 1)[-1])
        if match:
            found.append((int(match.group(1)), bool(match.group(2)),
                          fs.unstrip_protocol(path) if "://" in storage_path else path))
    return sorted(found, reverse=True)


def model_mismatch(checkpoint_url: str, expected: ModelConfig) -> str | None:
    """How the model in a checkpoint folder differs from a model of ``expected`` (:func:`weights.shape_mismatch`
    in the settings' words), or None when it would load. Reads the safetensors header only."""
    import fsspec

    from astromer.model import Astromer
    from astromer.weights import MODEL_FILE, shape_mismatch

    with fsspec.open(f"{checkpoint_url.rstrip('/')}/{MODEL_FILE}", "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(size))
    held = {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    with torch.device("meta"):
        wanted = {k: tuple(v.shape) for k, v in Astromer(expected).state_dict().items()}
    mismatch = shape_mismatch(expected, wanted, held)
    return mismatch and mismatch.replace("config.json says", "the settings say").replace("by config.json",
                                                                                         "by the settings")


def unrecorded_checkpoint(storage_path: str, run_name: str, after_step: int, device="cpu") -> str | None:
    """The newest complete checkpoint folder of the run above ``after_step`` (Ray Train's latest record).

    Ray writes a reported checkpoint's files, then records it; a job interrupted between the two (Ctrl-C
    did so for the last two checkpoints in one trial) leaves complete checkpoints that Ray does not offer
    on resume. A folder counts when all its files read (a partly copied one does not)."""
    import ray.train

    found = [(step, url) for step, _, url in run_checkpoints(storage_path, run_name) if step > after_step]
    for _, url in found:
        try:
            with ray.train.Checkpoint(url).as_directory() as folder:
                read_checkpoint(folder, device)
        except Exception as exc:    # a damaged or partial folder: the next older one is tried
            log.warning("checkpoint %s is not usable (%s): skipped", url, exc)
            continue
        return url
    return None


# --------------------------------------------------------------------------- plots

#: metric names holding a rule's score rather than the model's (ProbedScore's baselines): drawn dashed
REFERENCE_MARKERS = tuple(name for name in ProbedScore.NAMES if name != "model")


#: colours by what a line measures, the same in both panels: the model's lines solid, each baseline dashed
#: in its own colour, so "model vs smoother" reads the same on the probed and the hidden panel
LINE_COLOURS = {"train": "tab:orange", "loss": "tab:brown", "model": "tab:blue", "baseline": "0.4",
                "interp": "tab:green", "smoother": "tab:purple"}


def _line_kind(name: str) -> str | None:
    """What a learning-curve series measures: a baseline's name, 'model' (validation), 'train', or None."""
    parts = name.split("_")
    for marker in REFERENCE_MARKERS:
        if marker in parts:
            return marker
    if parts[0] == "val":
        return "model"
    if parts[0] == "train":
        return "loss" if parts[-1] == "loss" else "train"
    return None


def learning_curve_panels(history: dict[str, list[tuple[int, float]]]) -> list[tuple[str, dict]]:
    """The learning curve's panels: (title, {name: sorted points}) over all probed values, then over the
    hidden values alone (``*_hidden_*``) when there are any. A training loss equal to the training RMSE
    (the plain loss) is left out: it would hide under the RMSE's line."""
    series = {name: sorted(points) for name, points in history.items() if points}
    loss, rmse = series.get("train_loss"), series.get("train_rmse")
    if loss and rmse and len(loss) == len(rmse) and np.allclose([v for _, v in loss], [v for _, v in rmse]):
        del series["train_loss"]
    panels = [("all probed values", {n: p for n, p in series.items() if "_hidden_" not in n})]
    hidden = {n: p for n, p in series.items() if "_hidden_" in n}
    if hidden:
        panels.append(("hidden values only ([MASK]ed: inferred, not copied)", hidden))
    return panels


def learning_curve_png(history: dict[str, list[tuple[int, float]]], path: str | os.PathLike,
                       title: str = "learning curve") -> Path:
    """Plot metric histories {name: [(step, value), ...]} against step: one panel over all probed values,
    one over the hidden ones alone (``*_hidden_*`` series) when there are any. Long per-step series (the
    training loss of small batches jumps by a factor of several) are drawn faint with their running mean on
    top; the baselines are dashed. The y axis is linear and sized to the validation lines and baselines,
    so the gap between the model and the baselines is what the eye sees (early training values above it
    are cut off)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = learning_curve_panels(history)
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 3.4 * len(panels) + 0.6), sharex=True, squeeze=False)
    for ax, (subtitle, lines) in zip(axes[:, 0], panels):
        top = []
        for name, points in sorted(lines.items()):
            steps, values = (np.asarray(v, dtype=float) for v in zip(*points))
            kind = _line_kind(name)
            colour = LINE_COLOURS.get(kind)
            style = dict(ls="--", lw=1.3) if kind in REFERENCE_MARKERS else dict(lw=1.6, marker="o", ms=3)
            drawn = values
            if len(steps) >= 30:
                width = max(5, len(steps) // 20)
                (raw,) = ax.plot(steps, values, lw=0.8, alpha=0.25, color=colour)
                drawn = np.convolve(values, np.ones(width) / width, mode="valid")
                ax.plot(steps[width - 1:], drawn, color=raw.get_color(), label=f"{name} (mean of {width})",
                        **{**style, "marker": None})
            else:
                ax.plot(steps, values, label=name, color=colour, **style)
            # the axis leaves out the training lines' first quarter (far above the rest at the start)
            top.append(float(np.max(drawn[len(drawn) // 4:] if kind in ("train", "loss") else values)))
        if top and all(np.isfinite(top)):
            ax.set_ylim(0.0, 1.15 * max(top))
        ax.set_ylabel("RMSE (mag)")
        ax.set_title(subtitle, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


@torch.no_grad()
def reconstruction_png(model, batch: dict, path: str | os.PathLike, n: int = 4, title: str | None = None) -> Path:
    """A few validation windows: the visible observations, the probed ones told apart (hidden: the model saw
    the [MASK] token or a random value and has to infer them; shown: kept as they were, so they could be
    copied) and the reconstruction of each. A panel's title scores its hidden values against the window
    mean and the smoother (:class:`ProbedScore`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model.eval()
    pred = model(batch["times"], batch["mags_in"], batch["padding"], batch["hidden"]).float()
    # the windows with the most hidden values first: a window with one or two says little
    counts = (batch["hidden"] & batch["probed"] & ~batch["padding"]).sum(1).cpu()
    order = torch.argsort(counts, descending=True, stable=True)[:min(n, pred.shape[0])].tolist()
    fig, axes = plt.subplots(len(order), 1, figsize=(9, 2.4 * len(order) + 0.4), squeeze=False)
    for row, k in enumerate(order):
        ax = axes[row, 0]
        one = {key: value[k:k + 1].cpu() for key, value in batch.items()}
        real = ~one["padding"][0].numpy()
        probed = one["probed"][0].numpy() & real
        hidden = probed & one["hidden"][0].numpy()
        t, y, p = one["times"][0].numpy(), one["target"][0].numpy(), pred[k].cpu().numpy()
        ax.scatter(t[real & ~probed], y[real & ~probed], s=6, c="0.65", label="visible")
        ax.scatter(t[hidden], y[hidden], s=14, c="tab:blue", label="hidden (true value)")
        ax.scatter(t[probed & ~hidden], y[probed & ~hidden], s=14, facecolors="none", edgecolors="tab:blue",
                   label="probed, shown as is (true value)")
        ax.scatter(t[probed], p[probed], s=14, c="tab:red", marker="x", label="reconstructed")
        ax.invert_yaxis()                        # brighter up, as magnitudes are drawn
        ax.set_ylabel("mag - mean")
        score = ProbedScore()
        score.add(pred[k:k + 1], one)
        scores = score.result("w")
        label = f"window {row + 1}: {int(hidden.sum())} hidden of {int(real.sum())} observations"
        if "w_hidden_rmse" in scores:
            label += (f"; hidden RMSE model {scores['w_hidden_rmse']:.3f}, window mean "
                      f"{scores['w_hidden_baseline_rmse']:.3f}, smoother {scores['w_hidden_smoother_rmse']:.3f}")
        ax.set_title(label, fontsize=8)
        if row == 0:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axes[-1, 0].set_xlabel("days from window centre")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)


# --------------------------------------------------------------------------- MLflow on rank 0

class RunTracker:
    """MLflow logging from rank 0 (every call is a no-op on other ranks or without a run id)."""

    def __init__(self, config: TrainConfig, rank: int):
        self.active = rank == 0 and bool(config.mlflow_run_id)
        self.run_id = config.mlflow_run_id
        self.client = None
        if self.active:
            from mlflow.tracking import MlflowClient

            from astromer.registry import setup_tracking

            setup_tracking(config.tracking_uri)
            self.client = MlflowClient()

    def metrics(self, values: dict[str, float], step: int) -> None:
        if not self.active:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, int(step)) for k, v in values.items()
                 if v is not None and math.isfinite(float(v))]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def tag(self, key: str, value: str) -> None:
        if self.active:
            self.client.set_tag(self.run_id, key, value[:5000])

    def artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        if self.active:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def history(self, *names: str) -> dict[str, list[tuple[int, float]]]:
        """{name: [(step, value), ...]} by step, one value per step: a step trained again after a resume has
        two values in MLflow, and the later one (the attempt that went on) is the one kept."""
        if not self.active:
            return {}
        out = {}
        for name in names:
            latest = {}
            for m in sorted(self.client.get_metric_history(self.run_id, name), key=lambda m: m.timestamp):
                latest[m.step] = m.value
            out[name] = sorted(latest.items())
        return out


def _measured_cpu_monitor():
    """MLflow's CPU sampler, whose first sample is measured: psutil gives the CPU use since its previous call
    in the same thread, and 0.0 at the first, so every attempt's first sample read 0.0 (a false dip)."""
    import psutil
    from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor

    class FirstSampleMeasured(CPUMonitor):
        primed = False

        def collect_metrics(self):
            if not self.primed:
                psutil.cpu_percent()          # the origin, in the sampler's own thread
                time.sleep(0.2)
                self.primed = True
            super().collect_metrics()

    return FirstSampleMeasured()


@contextlib.contextmanager
def system_metrics(config: TrainConfig, ctx):
    """MLflow's sampler of the node's CPU, memory, disk, network and (with ``nvidia-ml-py``) GPU use, logged
    to the run as ``system/...`` every ``system_metrics_every`` seconds while the block runs: by the first
    worker of each node (``system/node_<rank>/...`` when the run spans several nodes)."""
    if not (config.system_metrics_every and config.mlflow_run_id and ctx.get_local_rank() == 0):
        yield
        return
    from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    from astromer.registry import setup_tracking

    # "Skip logging GPU metrics. Set logger level to DEBUG..." on every CPU machine is not news
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    setup_tracking(config.tracking_uri)
    several_nodes = ctx.get_local_world_size() < ctx.get_world_size()
    # steps go on from the run's last system sample (an earlier attempt's), or start at 0
    monitor = SystemMetricsMonitor(config.mlflow_run_id, sampling_interval=config.system_metrics_every,
                                   resume_logging=True,
                                   node_id=f"node_{ctx.get_node_rank()}" if several_nodes else None)
    if isinstance(getattr(monitor, "monitors", None), list):
        monitor.monitors = [_measured_cpu_monitor() if isinstance(m, CPUMonitor) else m for m in monitor.monitors]
    else:
        log.warning("MLflow's system-metrics sampler changed: its first CPU sample may read 0.0")
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()


# --------------------------------------------------------------------------- the Ray Train worker

def worker_loop(config_dict: dict) -> None:
    """The body of ``train_loop_per_worker``: resume, train with periodic checkpoints and validation,
    stop early or at ``max_steps``/``epochs``, then evaluate val + test and report the final model."""
    import ray.train
    import ray.train.torch

    from astromer.data import quiet_progress

    config = TrainConfig.from_dict(config_dict)
    quiet_progress()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if rank == 0:
        clear_stale_checkpoint_staging()
    if config.pid_dir:
        Path(config.pid_dir).mkdir(parents=True, exist_ok=True)
        with open(Path(config.pid_dir) / f"rank{rank}.pid", "a") as fh:   # one line per (re)start
            fh.write(f"{os.getpid()}\n")
    torch.manual_seed(config.seed * 1000 + rank)
    if not config.use_gpu:
        torch.set_num_threads(max(1, round(config.cpus_per_worker)))   # one intra-op pool per reserved core
    device = ray.train.torch.get_device()

    model = build_model(config).to(device)
    optimizer, scheduler = make_optimizer(model, config)
    state = TrainState(mlflow_run_id=config.mlflow_run_id)
    tracker = RunTracker(config, rank)
    shape = stream_shape(config, world)
    checkpoint = ray.train.get_checkpoint()
    newer = _agreed_unrecorded_checkpoint(config, checkpoint, rank, world)
    if newer is not None:
        log.warning("rank %d: %s is newer than the checkpoint Ray recorded: resuming from it", rank, newer)
        checkpoint = ray.train.Checkpoint(newer)
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = load_checkpoint(folder, model, optimizer, scheduler, device,
                                    rank=rank if config.reproducible else None)
        state.resumed_from, state.finished = state.step, False
        changed = _changed_stream(config, state, shape, rank, tracker)
        if changed or not config.reproducible:
            # the pass starts again; rank 0 continues the saved RNG stream, the others branch off it
            state.pass_steps = 0
            if rank:
                torch.manual_seed(config.seed * 1000 + rank + 7919 * state.step)
        log.warning("rank %d resumed from checkpoint at step %d (epoch %d)", rank, state.step, state.epoch)
    state.stream = shape
    ddp_model = ray.train.torch.prepare_model(model, move_to_device=False) if world > 1 else model
    if state.resumed_from is not None:
        tracker.metrics({"resumed_from_step": state.resumed_from}, state.step)
    loop = _Loop(config, ddp_model, model, optimizer, scheduler, state, tracker, rank, world, device)
    val = CachedBatches(ray.train.get_dataset_shard("val"), config.batch_size, device)
    with system_metrics(config, ctx):
        try:
            loop.run(ray.train.get_dataset_shard("train"), val)
        except (NonFiniteLossError, NoTrainingBatch) as exc:
            # every rank sees the same verdict (a NaN is all-reduced; the stream splits the batches equally),
            # so all end here together. Neither is a lost worker: ending normally with the reason (and no
            # checkpoint) keeps Ray from retrying what would fail again.
            key = next(key for kind, key in STOP_KEYS if isinstance(exc, kind))
            log.error("%s", exc)
            tracker.tag(key, str(exc))                # how the job learns why training ended (rank 0)
            ray.train.report({key: str(exc), "step": state.step})
            return
        loop.finish(val, CachedBatches(ray.train.get_dataset_shard("test"), config.batch_size, device, limit=0))


#: the run tag that says why a reproducible run no longer repeats an uninterrupted one
REPRODUCIBILITY_KEY = "astromer.reproducible.broken"


def _changed_stream(config: TrainConfig, state: TrainState, shape: dict[str, str], rank: int,
                    tracker: RunTracker) -> str | None:
    """A reproducible run resumed from a checkpoint whose stream was shaped otherwise (other settings, another
    lake, or a run that was not reproducible, whose checkpoint holds neither the stream nor every rank's
    generators): says so (a warning from rank 0, the run tag REPRODUCIBILITY_KEY) and returns what changed."""
    if not config.reproducible:
        return None
    if state.stream:
        changed = ", ".join(f"{k} {state.stream.get(k)} -> {v}" for k, v in shape.items()
                            if state.stream.get(k) != v)
    else:
        changed = "a checkpoint written before reproducible runs, which records no stream"
    if changed and rank == 0:
        message = (f"resumed at step {state.step} with {changed}: the stream is no longer the one the run began "
                   "with, so this run does not repeat an uninterrupted one from here on")
        log.warning("reproducible run %s", message)
        tracker.tag(REPRODUCIBILITY_KEY, message)
    return changed or None


#: the local folder a checkpoint is written into before Ray copies it to the run's storage
CHECKPOINT_STAGING = "astromer-ckpt-"


def clear_stale_checkpoint_staging() -> None:
    """Remove the staging folders of worker processes that are gone: a worker killed (or a job interrupted)
    while Ray copied a checkpoint leaves its folder behind, tens of MB for astromer2."""
    import glob
    import shutil

    for folder in glob.glob(os.path.join(tempfile.gettempdir(), f"{CHECKPOINT_STAGING}*-*")):
        pid = os.path.basename(folder)[len(CHECKPOINT_STAGING):].split("-", 1)[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _agreed_unrecorded_checkpoint(config: TrainConfig, checkpoint, rank: int, world: int) -> str | None:
    """Rank 0 looks for a complete checkpoint newer than Ray's record (:func:`unrecorded_checkpoint`) and
    every rank takes its answer, so that all resume from the same step."""
    choice = None
    if rank == 0 and config.storage_path and config.run_name:
        after = -1
        if checkpoint is not None:
            match = _CHECKPOINT_DIR.fullmatch(Path(str(checkpoint.path)).name)
            after = int(match.group(1)) if match else 10**12   # a checkpoint named otherwise: keep Ray's
        choice = unrecorded_checkpoint(config.storage_path, config.run_name, after)
    if world > 1:
        import torch.distributed as dist

        shared = [choice]
        dist.broadcast_object_list(shared, src=0)
        choice = shared[0]
    return choice


class CachedBatches:
    """Fixed evaluation batches: streamed from Ray Data on the first pass and kept in memory when there are at
    most ``limit`` windows (they are identical on every pass), streamed again otherwise."""

    def __init__(self, shard, batch_size: int, device, limit: int = 8192):
        self.shard, self.batch_size, self.device, self.limit = shard, batch_size, device, limit
        self.cache: list | None = None

    def __call__(self):
        from astromer.data import iter_batches

        if self.cache is not None:
            yield from self.cache
            return
        kept, count = [], 0
        for batch in iter_batches(self.shard, self.batch_size, device=self.device):
            count += batch["times"].shape[0]
            if kept is not None:
                kept = kept + [batch] if count <= self.limit else None
            yield batch
        self.cache = kept


def _flag_last(items):
    """``(item, is_last)`` for each item, reading one item ahead."""
    items = iter(items)
    for current in items:
        for following in items:
            yield current, False
            current = following
        yield current, True


class _Loop:
    """The epoch/step bookkeeping of ``worker_loop`` (kept apart so the loop reads top to bottom)."""

    def __init__(self, config, ddp_model, model, optimizer, scheduler, state, tracker, rank, world, device):
        self.config, self.ddp_model, self.model = config, ddp_model, model
        self.optimizer, self.scheduler, self.state = optimizer, scheduler, state
        self.tracker, self.rank, self.world, self.device = tracker, rank, world, device
        self.max_steps = config.max_steps or 10**12
        self.steps = StepMetrics()              # read at log, validation and checkpoint steps, epoch ends
        self.epoch_loss_sum, self.epoch_steps = 0.0, 0
        self.full_epoch_steps: int | None = None    # steps of the last whole pass (a partial one's fraction)

    def read_steps(self) -> dict[str, float]:
        """The steps' figures since the last read (the loop's only host synchronisation between
        evaluations); raises NonFiniteLossError if one of them had a non-finite loss."""
        metrics = self.steps.read()
        if metrics:
            self.epoch_loss_sum += metrics["loss"] * metrics["steps"]
            self.epoch_steps += metrics["steps"]
        return metrics

    def start_pass(self) -> int | None:
        """In a reproducible run, rank 0 sets the pass clock to this pass before any worker asks for its
        batches (Ray Data starts a pass when all have), and each worker's shuffle buffer is seeded by
        (seed, pass, rank). None otherwise: fresh entropy."""
        config = self.config
        if not config.reproducible:
            return None
        from astromer.data import set_pass

        if self.rank == 0:
            set_pass(config.pass_clock, self.state.epoch)
        return int(np.random.default_rng([config.seed, self.state.epoch, self.rank]).integers(2**31))

    def done(self) -> bool:
        return self.state.step >= self.max_steps or self.state.epoch >= self.config.epochs or self.state.finished

    def run(self, train_shard, val_batches) -> None:
        from astromer.data import iter_batches

        config, state = self.config, self.state
        window_t0, windows = time.perf_counter(), 0
        epoch_t0 = window_t0

        @contextlib.contextmanager
        def paused():
            """Leave what runs inside (a validation, a checkpoint) out of the throughput figures."""
            nonlocal window_t0, epoch_t0
            t = time.perf_counter()
            yield
            pause = time.perf_counter() - t
            window_t0, epoch_t0 = window_t0 + pause, epoch_t0 + pause

        while not self.done():
            epoch_t0, epoch_windows = time.perf_counter(), 0
            self.epoch_loss_sum, self.epoch_steps = 0.0, 0
            # a reproducible run resumed in the middle of a pass: the pass is drawn again, the same batches in
            # the same order, and the ones trained on before the checkpoint are passed over
            skip = state.pass_steps
            batches = iter_batches(train_shard, config.batch_size, drop_last=True, device=self.device,
                                   shuffle_buffer=config.shuffle_buffer, shuffle_seed=self.start_pass())
            for batch_index, (batch, last_of_pass) in enumerate(_flag_last(batches)):
                if batch_index < skip:
                    continue
                train_step(self.ddp_model, batch, self.optimizer, self.scheduler, config, step=state.step + 1,
                           epoch=state.epoch, batch_index=batch_index, into=self.steps)
                state.step += 1
                state.pass_steps += 1
                windows += batch["times"].shape[0] * self.world
                epoch_windows += batch["times"].shape[0] * self.world
                if state.step % config.log_every == 0:
                    metrics = self.read_steps()     # means over the steps since the last read
                    metrics.pop("steps", None)
                    metrics["lr"] = float(self.scheduler.get_last_lr()[0])
                    metrics["windows_per_s"] = windows / max(time.perf_counter() - window_t0, 1e-9)
                    self.tracker.metrics({f"train_{k}": v for k, v in metrics.items()}, state.step)
                    if self.rank == 0:              # the figures are every rank's mean: one line, not one per rank
                        log.info("step %d epoch %d loss %.4f rmse %.4f r2 %.3f %.0f windows/s", state.step,
                                 state.epoch, metrics.get("loss", float("nan")), metrics.get("rmse", float("nan")),
                                 metrics.get("r2", float("nan")), metrics["windows_per_s"])
                    window_t0, windows = time.perf_counter(), 0
                if config.val_every and state.step % config.val_every == 0:
                    with paused():
                        self.read_steps()
                        self.validate(val_batches)
                ends_run = self.state.finished or state.step >= self.max_steps
                # a run's last step is checkpointed once, by finish(), as the final checkpoint; a pass's last
                # step after the pass's end (below), so that a resume starts the next pass instead of reading
                # this one again only to pass over all of it
                if state.step % config.checkpoint_every == 0 and not ends_run and not last_of_pass:
                    with paused():
                        self.read_steps()           # a non-finite step raises here, before the checkpoint
                        self.report_checkpoint()
                if ends_run:
                    self.read_steps()
                    if last_of_pass:   # the pass is whole: the final checkpoint starts the next one
                        self._close_pass(epoch_windows, epoch_t0)
                    else:
                        self._epoch_metrics(epoch_windows, epoch_t0, partial=True)
                    break
            else:
                self.read_steps()
                if not state.pass_steps:
                    raise NoTrainingBatch(
                        f"epoch {state.epoch} gave no training batch: fewer usable training curves than "
                        f"batch_size x num_workers = {config.batch_size * self.world} (check the selection, "
                        "the cleaning settings and the split fractions)")
                trained = state.pass_steps > skip    # not all passed over (an older checkpoint at a pass's end)
                self._close_pass(epoch_windows, epoch_t0)
                if not config.val_every:
                    with paused():
                        self.validate(val_batches)
                if trained and state.step % config.checkpoint_every == 0 and not self.done():
                    with paused():
                        self.report_checkpoint()

    def _close_pass(self, windows: int, t0: float) -> None:
        """A whole pass done: the next one starts, and the pass's figures are logged."""
        self.state.epoch += 1
        self.full_epoch_steps, self.state.pass_steps = self.state.pass_steps, 0
        self._epoch_metrics(windows, t0)

    def _epoch_metrics(self, windows: int, t0: float, partial: bool = False) -> None:
        """``epoch``: passes completed. A partial last pass counts as its fraction of the last whole one
        (571.4, not 571 a second time), or is left out of ``epoch`` when no whole pass ran in this attempt."""
        if not self.epoch_steps:
            return
        values = {"epoch_loss": self.epoch_loss_sum / self.epoch_steps,
                  "epoch_windows_per_s": windows / (time.perf_counter() - t0)}
        if not partial:
            values["epoch"] = self.state.epoch
        elif self.full_epoch_steps:
            values["epoch"] = self.state.epoch + min(self.state.pass_steps / self.full_epoch_steps, 0.99)
        self.tracker.metrics(values, self.state.step)

    def validate(self, val_batches) -> None:
        """Rank 0 scores the fixed validation windows; every rank learns whether to stop early."""
        stop = 0.0
        if self.rank == 0:
            result = evaluate(self.model, val_batches(), "val")
            self.tracker.metrics(result, self.state.step)
            val = result.get("val_rmse")
            if val is not None:
                log.info("step %d val_rmse %.4f (window mean %.4f, time interpolation %.4f, smoother %.4f; hidden "
                         "only %.4f vs %.4f)", self.state.step, val, result["val_baseline_rmse"],
                         result["val_interp_rmse"], result["val_smoother_rmse"],
                         result.get("val_hidden_rmse", float("nan")),
                         result.get("val_hidden_baseline_rmse", float("nan")))
                self.learning_curve()
                if self.state.best_val is None or val < self.state.best_val:
                    self.state.best_val, self.state.evals_since_best = val, 0
                else:
                    self.state.evals_since_best += 1
                stop = float(self.state.evals_since_best >= self.config.patience)
        if self.world > 1:
            flag = torch.tensor([stop], device=self.device if self.device.type == "cuda" else "cpu")
            torch.distributed.broadcast(flag, src=0)
            stop = float(flag.item())
        if stop:
            log.warning("early stopping at step %d: no improvement in %d evaluations", self.state.step,
                        self.config.patience)
            self.state.finished = True

    def ranks_rng(self) -> list[list[torch.Tensor]] | None:
        """Every rank's generators (dropout), gathered on every rank, for a reproducible run's checkpoint."""
        if not self.config.reproducible:
            return None
        if self.world == 1:
            return [rng_states()]
        gathered: list = [None] * self.world
        torch.distributed.all_gather_object(gathered, rng_states())
        return gathered

    def report_checkpoint(self, metrics: dict[str, float] | None = None, final: bool = False,
                          rank_rng: list | None = None) -> None:
        """Rank 0 writes the checkpoint (with ``rank_rng``, gathered here unless the caller has); every rank
        reports to Ray."""
        import ray.train

        metrics = {"step": self.state.step, "epoch": self.state.epoch, **(metrics or {})}
        rank_rng = self.ranks_rng() if rank_rng is None else rank_rng
        if self.rank == 0:
            with tempfile.TemporaryDirectory(prefix=f"{CHECKPOINT_STAGING}{os.getpid()}-") as folder:
                save_checkpoint(folder, self.model, self.optimizer, self.scheduler, self.state, rank_rng)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                                 checkpoint_dir_name=checkpoint_dir_name(self.state.step, final))
        else:
            ray.train.report(metrics, checkpoint=None)

    def finish(self, val_batches, test_batches) -> None:
        """Final scores on the validation and test splits, plots, and the final checkpoint."""
        # gathered first: the other ranks then wait for rank 0's evaluation in Ray's report, which has no
        # time limit, not in a collective that times out after 30 minutes
        rank_rng = self.ranks_rng()
        results: dict[str, float] = {}
        if self.rank == 0:
            results.update(evaluate(self.model, val_batches(), "val"))
            results.update(evaluate(self.model, test_batches(), "test"))
            for split, fraction in (("val", self.config.val_fraction), ("test", self.config.test_fraction)):
                if f"{split}_rmse" not in results:   # a tiny selection: say so rather than leave the score out
                    message = (f"the {split} split gave no window to score (--{split}-fraction {fraction} of "
                               f"too few curves, or none left after the cleaning): no final {split} scores")
                    log.warning(message)
                    self.tracker.tag(f"astromer.warning.{split}", message)
            self.tracker.metrics({f"final_{k}": v for k, v in results.items()}, self.state.step)
            self._plots(val_batches)
            log.info("finished at step %d: %s", self.state.step, json.dumps(results))
        self.state.finished = True
        self.state.metrics = results
        self.report_checkpoint(results, final=True, rank_rng=rank_rng)

    #: the series of the learning curve: training, validation and the baselines, on all probed values
    #: and on the hidden ones alone
    CURVE_SERIES = ("train_loss", "train_rmse", *(f"val_{subset}{name}rmse" for subset in ("", "hidden_")
                                                    for name in ("", "baseline_", "interp_", "smoother_")))

    def _title(self) -> str:
        return f"{self.config.run_name or 'run'} ({self.config.preset}, {self.config.loss} loss), step {self.state.step}"

    def learning_curve(self) -> None:
        """Write and log plots/learning_curve.png (after each validation too: a long run shows its progress
        in MLflow while it trains)."""
        if self.tracker.active:
            history = self.tracker.history(*self.CURVE_SERIES)
            with tempfile.TemporaryDirectory() as tmp:
                self.tracker.artifact(learning_curve_png(history, Path(tmp) / "learning_curve.png",
                                                         title=self._title()), "plots")

    def _plots(self, val_batches) -> None:
        if not self.tracker.active:
            return
        self.learning_curve()
        with tempfile.TemporaryDirectory() as tmp:
            first = next(iter(val_batches()), None)
            if first is not None:
                self.tracker.artifact(reconstruction_png(self.model, first, Path(tmp) / "reconstruction.png",
                                                         title=f"validation windows: {self._title()}"), "plots")


# --------------------------------------------------------------------------- in-process finetuning

def check_model_windows(mask: MaskConfig, window_length: int) -> None:
    """Refuse to finetune a model whose windows are all too short for ``mask`` to probe an observation."""
    if window_length < shortest_probed_window(mask):
        raise ValueError(f"probed={mask.probed!r} probes no observation of the model's {window_length}-observation "
                         f"windows: expected probed >= {1 / window_length:.4g}")


def fit_windows(model, curves, config: TrainConfig | dict | None = None, *, val_curves=None,
                rng: np.random.Generator | None = None, device: str | torch.device = "cpu") -> dict[str, list]:
    """Masked-reconstruction training of ``model`` in place on a small list of curves ``(mjd, mag[, err])``
    (no Ray): each epoch draws a fresh random window and probe per curve. ``config`` fields used: lr,
    optimizer, weight_decay, batch_size, epochs, max_steps, loss, probed/same/random, warmup_steps,
    schedule, grad_clip, patience (with ``val_curves``: fixed validation windows). Returns the history
    {"loss": [...per step], "val_rmse": [...per epoch]}."""
    from astromer.data import DataSpec, numpy_windows

    if config is None:
        config = TrainConfig(warmup_steps=0, schedule="constant", lr=1e-4, batch_size=32, epochs=5)
    elif isinstance(config, dict):
        config = TrainConfig.from_dict(config)
    # every window must probe an observation (a batch without any has a NaN gradient): curves too short for
    # that are left out, and a model whose windows are all too short is refused
    check_model_windows(config.mask, model.config.window_length)
    needed = shortest_probed_window(config.mask)
    given = list(curves)
    curves = [c for c in given if len(c[0]) >= needed]
    if len(curves) < len(given):
        log.info("fit_windows: %d of %d curves have fewer than %d observations, too few to probe one; left out",
                 len(given) - len(curves), len(given), needed)
    if val_curves:
        val_curves = [c for c in val_curves if len(c[0]) >= needed]
    if not curves:
        raise ValueError("fit_windows: no curves to train on")
    rng = rng or np.random.default_rng(config.seed)
    spec = DataSpec(lake="", window_length=model.config.window_length, mask=config.mask)
    model.to(device)
    optimizer, scheduler = make_optimizer(model, config)
    val_batch = None
    if val_curves:
        val_batch = _to_tensors(numpy_windows(list(val_curves), spec, np.random.default_rng(config.seed + 1)),
                                device)
    history: dict[str, list] = {"loss": [], "val_rmse": []}
    best, best_state, waited, step = None, None, 0, 0
    for epoch in range(config.epochs):
        order = rng.permutation(len(curves))
        for batch_index, lo in enumerate(range(0, len(order), config.batch_size)):
            chosen = [curves[i] for i in order[lo:lo + config.batch_size]]
            batch = _to_tensors(numpy_windows(chosen, spec, rng), device)
            step += 1
            metrics = train_step(model, batch, optimizer, scheduler, config, step=step, epoch=epoch,
                                 batch_index=batch_index)
            history["loss"].append(metrics["loss"])
            if config.max_steps and step >= config.max_steps:
                break
        if val_batch is not None:
            val = evaluate(model, [val_batch], "val")["val_rmse"]
            history["val_rmse"].append(val)
            if best is None or val < best:
                best, waited = val, 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                waited += 1
                if waited >= config.patience:
                    break
        if config.max_steps and step >= config.max_steps:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return history


def _to_tensors(batch: dict, device) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(v).to(device) for k, v in batch.items()}
