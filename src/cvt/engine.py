"""Training and evaluation as plain functions: `build_optimizer`, `WarmupCosine`, `train_one_epoch`, `evaluate`,
and `fit`, which runs a whole `TrainConfig` into a run directory:

    RUN/metrics.jsonl       one JSON line per epoch (train loss, val top-1/top-5, lr, images/s, seconds)
    RUN/summary.json        best/final top-1, epochs, training seconds, model, parameters, skipped files
    RUN/model.safetensors   the final weights (EMA when on) + config.json + preprocess.json beside them
    RUN/best/               the same three files for the evaluation with the highest top-1 so far
    RUN/checkpoint.pt       the training state for --resume (written atomically; torch.load(weights_only=True))
    RUN/recipe.yaml         the resolved settings;  RUN/tensorboard/  events;  RUN/*.png  curves, confusion matrix

One process or many: under `torchrun` (RANK/WORLD_SIZE/LOCAL_RANK in the environment) the model is wrapped in
DistributedDataParallel (gloo on CPU, nccl on GPU) and each rank trains on its shard; `batch_size` is global, so
the optimizer sees the same batch whatever the number of processes. BatchNorm in the convolutional projections
normalises over each rank's share, as in the authors' training, unless `sync_bn` is set: then over the global
batch, and N processes train as one process with the same batch would (up to float rounding).

Randomness is seeded per step from (seed, epoch, step, rank), so a run resumed from any checkpoint continues
exactly as the uninterrupted run would have. The library logs through `logging.getLogger("cvt.train")`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .config import CvTConfig
from .data import BatchTransform, Preprocess, build_data, data_info, parse_data, set_epoch
from .model import CvT, param_count
from .recipe import TrainConfig, write_yaml
from .utils import atomic_write, mix_seed, seed_everything, write_text
from .weights import STATE_FORMAT, save_weights

log = logging.getLogger("cvt.train")

CHECKPOINT = "checkpoint.pt"


class NonFiniteLoss(ValueError):
    """The loss or the gradients became NaN/inf; the last checkpoint on disk is the last good state."""


class Interrupted(Exception):
    """Training stopped on SIGINT/SIGTERM after writing a checkpoint (`path`) to resume from."""

    def __init__(self, message: str, path: Path, signum: int):
        super().__init__(message)
        self.path, self.signum = path, signum


# ---------------------------------------------------------------------------------------------------------------
# Processes and devices
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_pref: str | None) -> tuple[DistInfo, torch.device]:
    """Join the process group torchrun describes (if any) and pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    info = DistInfo(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    device = pick_device(device_pref, info.local_rank)
    if info.enabled and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # On GPUs, NCCL for the tensors and gloo beside it for the few CPU ones (the stop flag, gathered
        # objects): NCCL alone has no backend for a CPU tensor.
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=info.rank, world_size=world)
    return info, device


def pick_device(pref: str | None, local_rank: int = 0) -> torch.device:
    if pref in (None, "auto"):
        pref = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(pref)
    except RuntimeError:
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {pref!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for, but PyTorch sees no CUDA GPU here; use --device cpu")
        count = torch.cuda.device_count()
        if device.index is None:
            device = torch.device("cuda", local_rank % count)
        elif device.index >= count:
            raise ValueError(f"--device {pref}: PyTorch sees {count} CUDA GPU(s) here, cuda:0 to cuda:{count - 1}")
    elif device.type != "cpu":
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {pref!r}")
    return device


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `mode` on `device` (None: full precision). "auto" is off on CPUs, where bf16
    autocast measured slower than float32 for these small models."""
    if mode == "none" or (mode == "auto" and device.type != "cuda"):
        return None
    if mode == "fp16":
        return torch.float16
    if mode == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# ---------------------------------------------------------------------------------------------------------------
# Optimizer and schedule
# ---------------------------------------------------------------------------------------------------------------
def build_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on weight matrices and kernels only: never on norms, biases (1-d parameters) or
    what the model lists in `no_weight_decay()` (the cls token)."""
    from timm.optim import param_groups_weight_decay

    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    groups = param_groups_weight_decay(model, weight_decay, no_weight_decay_list=skip)
    param = next(model.parameters())
    # The fused kernel is one op for all parameters (the per-parameter loop costs ~15% of a small CPU step).
    fused = param.device.type in ("cpu", "cuda") and param.dtype == torch.float32
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, fused=fused)


class WarmupCosine:
    """Per-step learning rate: linear warm-up from `warmup_lr` to `lr`, cosine down to `min_lr` at
    `total - cooldown` steps, then `min_lr`. Its state is the step counter."""

    def __init__(self, optimizer: torch.optim.Optimizer, lr: float, total: int, warmup: int = 0,
                 warmup_lr: float = 1e-6, min_lr: float = 0.0, cooldown: int = 0):
        self.optimizer, self.lr, self.total, self.warmup = optimizer, lr, total, warmup
        self.warmup_lr, self.min_lr, self.cooldown = warmup_lr, min_lr, cooldown
        self.step_count = 0
        self._apply()

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.warmup_lr + (self.lr - self.warmup_lr) * step / self.warmup
        decay = max(1, self.total - self.cooldown - self.warmup)
        t = min(1.0, (step - self.warmup) / decay)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * t))

    def _apply(self) -> None:
        lr = self.lr_at(self.step_count)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def get_last_lr(self) -> float:
        return self.lr_at(self.step_count)

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step_count}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step_count = int(state["step"])
        self._apply()


# ---------------------------------------------------------------------------------------------------------------
# One epoch of training, one pass of evaluation
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Trainer:
    """What a training step needs. `net` is what runs forward (DDP / compiled); `model` the plain module."""

    model: CvT
    net: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: WarmupCosine
    criterion: nn.Module
    transform: BatchTransform
    device: torch.device
    dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None
    ema: Any = None
    mixup: Any = None
    accum_steps: int = 1
    clip_grad: float | None = None
    seed: int = 0
    dist: DistInfo = field(default_factory=DistInfo)
    skipped: dict[str, str] = field(default_factory=dict)  # path -> reason, files that could not be read
    strict_data: bool = False


@dataclass
class EpochStats:
    loss: float
    steps: int
    images: int  # over all processes
    seconds: float
    interrupted: bool = False
    taken: int = 0  # optimizer steps whose loss is in `loss` (a non-finite fp16 step is skipped)

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def partial(self) -> dict[str, Any]:
        """What an interrupted epoch had done, for the checkpoint: the resumed epoch reports the whole epoch."""
        return {"loss": self.loss, "taken": self.taken, "images": self.images, "seconds": self.seconds}

    def after(self, before: dict[str, Any] | None) -> "EpochStats":
        """These stats continued from an interrupted part of the same epoch (`partial()` of it)."""
        if not before:
            return self
        taken = int(before["taken"]) + self.taken
        loss = (float(before["loss"]) * int(before["taken"]) + self.loss * self.taken) / max(1, taken)
        return dataclasses.replace(self, loss=loss, taken=taken, images=int(before["images"]) + self.images,
                                   seconds=float(before["seconds"]) + self.seconds)


def _note_skipped(t: Trainer, errors: list[str]) -> None:
    for err in errors:
        path, _, reason = err.partition(": ")
        if t.strict_data:
            raise ValueError(f"unreadable image {path}: {reason} (drop --strict-data to skip such files)")
        if path not in t.skipped:
            t.skipped[path] = reason
            log.warning("skipping unreadable image %s (%s)", path, reason)


def train_one_epoch(
    t: Trainer,
    loader: Iterable,
    epoch: int,
    steps: int,
    start_step: int = 0,
    on_step: Callable[[int, torch.Tensor, float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> EpochStats:
    """Optimizer steps `start_step`..`steps - 1` of `epoch` (each of `accum_steps` micro-batches from `loader`,
    which must already start at `start_step`). Returns early, with `interrupted`, when `should_stop()` says so."""
    t.net.train()
    batches = iter(loader)
    loss_sum = torch.zeros((), device=t.device)
    taken = torch.zeros((), dtype=torch.int, device=t.device)
    images, done, bad_steps, pending, interrupted = 0, 0, 0, None, False
    start = time.perf_counter()
    for step in range(start_step, steps):
        t.optimizer.zero_grad(set_to_none=True)
        step_loss = torch.zeros((), device=t.device)
        for micro in range(t.accum_steps):
            x, y, errors = next(batches)
            if errors:
                _note_skipped(t, errors)
            if len(y) == 0:
                if t.dist.enabled:
                    raise ValueError("a whole batch of unreadable images: clean the data or use one process")
                continue
            x = x.to(t.device, non_blocking=True)
            y = y.to(t.device, non_blocking=True)
            # Everything random in this micro-step (augmentation, mixup, drop path) follows from these numbers.
            seed_everything(mix_seed(t.seed, epoch, step, micro, t.dist.rank))
            x = t.transform(x)
            if t.mixup is not None:
                if len(y) % 2:  # a skipped file left an odd batch; mixup mixes pairs
                    x, y = x[:-1], y[:-1]
                x, y = t.mixup(x, y)
            last = micro == t.accum_steps - 1
            sync = contextlib.nullcontext() if last or not t.dist.enabled else t.net.no_sync()
            with sync:
                with autocast(t.device, t.dtype):
                    loss = t.criterion(t.net(x), y)
                scaled = loss / t.accum_steps
                (t.scaler.scale(scaled) if t.scaler is not None else scaled).backward()
            step_loss += loss.detach() / t.accum_steps
            images += len(y) * t.dist.world
        if t.scaler is not None:
            t.scaler.unscale_(t.optimizer)
        # The norm of the (all-reduced) gradients: the same on every rank, so every rank takes the same decision.
        norm = torch.nn.utils.clip_grad_norm_(t.model.parameters(), t.clip_grad or math.inf)
        finite = torch.isfinite(norm)
        # The epoch's loss is the mean over the steps taken: one skipped NaN step must not make it NaN.
        loss_sum += torch.where(finite, step_loss, 0.0)
        taken += finite.int()
        # Reading `finite` waits for the device. Reading the previous step's instead lets a GPU run one step
        # behind the CPU that queues its work: a non-finite step is reported one step later, before any checkpoint.
        if pending is not None:
            bad_steps = _check_finite(t, *pending, bad_steps)
        pending = (finite, step_loss, epoch, step, steps)
        if t.scaler is not None:
            t.scaler.step(t.optimizer)
            t.scaler.update()
        else:
            t.optimizer.step()
        t.schedule.step()
        if t.ema is not None:
            t.ema.update(t.model, step=t.schedule.step_count)
        done += 1
        if on_step is not None:
            on_step(step + 1, step_loss, t.schedule.get_last_lr())
        if should_stop is not None and should_stop():
            interrupted = True
            break
    if pending is not None:
        _check_finite(t, *pending, bad_steps)
    return EpochStats(_mean_loss(loss_sum, int(taken), t.dist), start_step + done, images,
                      time.perf_counter() - start, interrupted=interrupted, taken=int(taken))


def _check_finite(t: Trainer, finite: torch.Tensor, step_loss: torch.Tensor, epoch: int, step: int, steps: int,
                  bad_steps: int) -> int:
    """Raise on a non-finite step (without a loss scaler) or on 100 skipped fp16 steps in a row; returns the run of
    consecutive skipped steps."""
    if bool(finite):
        return 0
    if t.scaler is None:
        raise NonFiniteLoss(
            f"non-finite loss/gradients at epoch {epoch + 1}, step {step + 1} of {steps} "
            f"(loss {step_loss.item():.4g}); the last checkpoint was left as it was. "
            "Try a lower --lr, clip_grad, or --amp none"
        )
    # fp16: the scaler skips this step and lowers its scale, as scalers do
    if bad_steps + 1 > 100:
        raise NonFiniteLoss(f"100 steps in a row with non-finite gradients under fp16 (epoch {epoch + 1})")
    return bad_steps + 1


def _gather_skipped(t: Trainer) -> None:
    """Every rank learns the files every other rank skipped: rank 0 writes checkpoint.pt and summary.json."""
    if not t.dist.enabled:
        return
    parts: list[dict[str, str]] = [{} for _ in range(t.dist.world)]
    dist.all_gather_object(parts, t.skipped)
    for part in parts:
        for path, reason in part.items():
            t.skipped.setdefault(path, reason)


def _share_rank0_buffers(model: nn.Module, info: DistInfo) -> None:
    """Rank 0's BatchNorm statistics to every process before an evaluation: DDP syncs buffers at the start of each
    forward, so after the epoch's last one each rank holds its own update (and so does each rank's EMA); the
    shards are then all scored with the statistics of the model rank 0 saves."""
    if info.enabled:
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)


def _mean_loss(loss_sum: torch.Tensor, steps: int, info: DistInfo) -> float:
    if info.enabled:
        loss_sum = loss_sum.clone()
        dist.all_reduce(loss_sum)
        loss_sum /= info.world
    return loss_sum.item() / max(1, steps)


@dataclass
class EvalResult:
    top1: float
    top5: float
    loss: float
    count: int
    confusion: torch.Tensor  # (K, K): rows true class, columns prediction
    skipped: list[str] = field(default_factory=list)

    @property
    def per_class(self) -> list[float]:
        c = self.confusion.double()
        return (c.diag() / c.sum(1).clamp(min=1) * 100).tolist()


TTA_MODES = ("none", "hflip")


def log_probs(model: nn.Module, x: torch.Tensor, tta: str = "none") -> torch.Tensor:
    """Log class probabilities of a batch of model-ready images, (B, classes) in fp32.

    tta="hflip" averages the probabilities of each image and its mirror image (test-time augmentation): it
    suits models trained with horizontal flips, costs a second forward pass, and is reported as such, never
    as the single-view figure."""
    if tta not in TTA_MODES:
        raise ValueError(f"tta must be one of {', '.join(TTA_MODES)}, got {tta!r}")
    logp = model(x).float().log_softmax(-1)
    if tta == "hflip":
        mirrored = model(x.flip(-1)).float().log_softmax(-1)
        logp = torch.logaddexp(logp, mirrored) - math.log(2.0)  # log of the mean of the two probabilities
    return logp


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    transform: BatchTransform,
    device: torch.device,
    num_classes: int,
    dtype: torch.dtype | None = None,
    info: DistInfo | None = None,
    tta: str = "none",
) -> EvalResult:
    """Top-1, top-5 (top-k for fewer classes), mean cross-entropy and the confusion matrix over `loader`
    (summed over all processes when distributed); `tta` as in `log_probs`."""
    was_training = model.training
    model.eval()
    k = num_classes
    confusion = torch.zeros(k * k, dtype=torch.long, device=device)
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # top-5 hits, loss sum, count
    skipped: list[str] = []
    for x, y, errors in loader:
        skipped += errors
        if len(y) == 0:
            continue
        x, y = transform(x.to(device, non_blocking=True)), y.to(device, non_blocking=True)
        with autocast(device, dtype):
            logp = log_probs(model, x, tta)
        topk = logp.topk(min(5, k), dim=1).indices
        sums[0] += (topk == y[:, None]).any(1).sum()
        sums[1] += F.nll_loss(logp, y, reduction="sum")
        sums[2] += len(y)
        confusion += torch.bincount(y * k + logp.argmax(1), minlength=k * k)
    if info is not None and info.enabled:
        dist.all_reduce(confusion)
        dist.all_reduce(sums)
        gathered: list[list[str]] = [[] for _ in range(info.world)]
        dist.all_gather_object(gathered, skipped)
        skipped = [e for part in gathered for e in part]
    model.train(was_training)
    n = int(sums[2].item())
    confusion = confusion.view(k, k).cpu()
    if n == 0:
        raise ValueError("nothing to evaluate: the validation split has no readable images")
    return EvalResult(
        top1=confusion.diag().sum().item() / n * 100, top5=sums[0].item() / n * 100, loss=sums[1].item() / n,
        count=n, confusion=confusion, skipped=skipped,
    )


# ---------------------------------------------------------------------------------------------------------------
# Training state (checkpoint.pt)
# ---------------------------------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def save_state(path: Path, state: dict[str, Any]) -> None:
    """Write the training state atomically (temporary file, fsync, rename): a reader sees old or new, never half."""
    atomic_write(path, lambda p: torch.save(state, p))


def load_state(spec: str | os.PathLike) -> tuple[dict[str, Any], Path]:
    """A training state from a checkpoint file or a run folder holding checkpoint.pt; plain tensors only."""
    path = Path(spec)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"nothing to resume: {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - every failure becomes one clear line
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise ValueError(f"refused to load {path}: it is a pickle that would import or run code ({text})") from None
        raise ValueError(f"cannot resume from {path}: truncated or not a training checkpoint ({text})") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"{path} is not a cvt training checkpoint (model weights? use --pretrained for those)")
    return state, path


# ---------------------------------------------------------------------------------------------------------------
# A whole run
# ---------------------------------------------------------------------------------------------------------------
class _StopFlag:
    """Read between steps: SIGINT/SIGTERM set `signum`, the run checkpoints and stops; every `every_s` seconds
    since the last checkpoint (rank 0's clock) it is due, the run checkpoints and goes on. All ranks agree
    before acting."""

    def __init__(self, info: DistInfo, every_s: float = 0.0):
        self.info, self.signum, self._old = info, 0, {}
        self.every_s, self._last = every_s, time.monotonic()
        # What the last call decided, the same on every rank: a signal that lands after it (during a periodic
        # save, say) waits for the next step's call, so that no rank stops while another goes on.
        self.stopping = False

    def __enter__(self) -> "_StopFlag":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum:  # a second signal: stop now, the last checkpoint stays intact
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def saved(self) -> None:
        """A checkpoint was written: the next periodic one is `every_s` from now."""
        self._last = time.monotonic()

    def __call__(self) -> bool:
        due = self.every_s > 0 and time.monotonic() - self._last >= self.every_s
        if not self.info.enabled:
            self.stopping = bool(self.signum)
        else:
            flag = torch.tensor([self.signum, int(due and self.info.main)], dtype=torch.long)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            self.signum = self.signum or int(flag[0].item())
            self.stopping, due = bool(flag[0].item()), bool(flag[1].item())
        return self.stopping or due


def resolve_img_size(cfg: TrainConfig, model_name: str | None) -> int:
    if cfg.img_size:
        return cfg.img_size
    _, native = data_info(cfg.data)
    if native:
        return native
    from .registry import get_variant

    return get_variant(model_name).input_size if model_name else 224


def build_model(cfg: TrainConfig, state: dict[str, Any] | None) -> CvT:
    """The model to train: a resumed run's, a pretrained checkpoint's (any format), or a fresh variant."""
    from .registry import create_model, from_pretrained

    if state is not None:
        model = CvT(CvTConfig.from_dict(state["model_config"]))
        model.load_state_dict(state["model"])
        return model
    args = dict(cfg.model_args)
    if cfg.pretrained:
        if cfg.model:
            return create_model(cfg.model, pretrained=cfg.pretrained, **args)
        return from_pretrained(cfg.pretrained, **args)
    args.setdefault("in_chans", data_info(cfg.data)[0])
    return create_model(cfg.model or "cvt_tiny", **args)


def fit(cfg: TrainConfig, *, resume: str | os.PathLike | None = None, progress: bool = False) -> dict[str, Any]:
    """Train `cfg` into `cfg.out` (continuing from `resume`, a checkpoint or run folder); returns the summary."""
    info, device = setup_distributed(cfg.device)
    try:
        with contextlib.ExitStack() as cleanup:  # closed however the run ends (finished, interrupted, failed)
            return _fit(cfg, info, device, resume, progress, cleanup)
    finally:
        if info.enabled and dist.is_initialized():
            dist.destroy_process_group()


def _fit(cfg: TrainConfig, info: DistInfo, device: torch.device, resume, progress: bool,
         cleanup: contextlib.ExitStack) -> dict[str, Any]:
    wall_start = time.perf_counter()
    out = Path(cfg.out)
    state, state_path = load_state(resume) if resume else (None, None)
    if state is not None:
        # The model comes from the checkpoint: a changed model or model_args would be recorded in recipe.yaml and
        # the checkpoint without being what trains, so --config RUN/recipe.yaml would build another model.
        kept = state["config"]
        changed = [k for k in ("model", "model_args", "pretrained") if getattr(cfg, k) != kept.get(k)]
        if changed:
            raise ValueError(
                "a resumed run keeps its model; "
                + ", ".join(f"{k} {getattr(cfg, k)!r} differs from the run's {kept.get(k)!r}" for k in changed)
                + " (to train another model from these weights, start a new run with --pretrained)"
            )
    parse_data(cfg.data)  # a bad --data is an error before anything is built
    if cfg.batch_size % (info.world * cfg.accum_steps):
        raise ValueError(
            f"batch_size {cfg.batch_size} must be divisible by processes x accum_steps = {info.world} x {cfg.accum_steps}"
        )
    micro = cfg.batch_size // (info.world * cfg.accum_steps)
    if (cfg.mixup > 0 or cfg.cutmix > 0) and micro % 2:
        raise ValueError(f"mixup/cutmix mix pairs: each process's batch ({micro}) must be even")

    seed_everything(cfg.seed)
    model = build_model(cfg, state).to(device)
    model_name = cfg.model or ("cvt_tiny" if not cfg.pretrained else None)
    pre = Preprocess.default_for(model.cfg.in_chans, resolve_img_size(cfg, model_name))
    # In-memory data (Fashion-MNIST) is trained and evaluated on whole images, resized: record no crop, so that
    # `cvt predict` on an image file sees it the same way.
    crop_pct = 1.0 if data_info(cfg.data)[1] else cfg.crop_pct
    pre = Preprocess(pre.img_size, pre.in_chans, pre.mean, pre.std, crop_pct, cfg.interpolation)
    data = build_data(
        cfg.data, pre, data_dir=cfg.data_dir, batch_size=micro, eval_batch_size=max(256, micro),
        num_workers=cfg.num_workers, device=device, rank=info.rank, world=info.world, seed=cfg.seed,
        randaugment=cfg.randaugment, color_jitter=cfg.color_jitter, crop_scale=cfg.crop_scale, hflip=cfg.hflip,
        # a resumed run keeps its labels: renamed or added class folders are an error, not a silent relabelling
        classes=state["classes"] if state is not None else None,
    )
    classes = data.classes
    if model.num_classes != len(classes):
        if state is not None:
            raise ValueError(f"the checkpoint has {model.num_classes} classes, the data {len(classes)}")
        if cfg.pretrained:
            log.info("new %d-class head (the checkpoint had %d classes)", len(classes), model.num_classes)
        model.reset_classifier(len(classes))
    model.set_grad_checkpointing(cfg.grad_checkpointing)

    steps_per_epoch = len(data.train) // cfg.accum_steps
    if cfg.steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.steps_per_epoch)
    if steps_per_epoch == 0:
        raise ValueError(f"an epoch has no full step: lower --batch-size (now {cfg.batch_size}) or accum_steps")
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay)
    schedule = WarmupCosine(
        optimizer, cfg.lr, cfg.epochs * steps_per_epoch, round(cfg.warmup_epochs * steps_per_epoch), cfg.warmup_lr,
        cfg.min_lr, round(cfg.cooldown_epochs * steps_per_epoch),
    )
    dtype = amp_dtype(cfg.amp, device)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    ema = None
    if cfg.ema_decay > 0:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=cfg.ema_warmup)
    mixup, criterion = None, nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    if cfg.mixup > 0 or cfg.cutmix > 0:
        from timm.data import Mixup
        from timm.loss import SoftTargetCrossEntropy

        mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                      switch_prob=cfg.mixup_switch_prob, label_smoothing=cfg.label_smoothing,
                      num_classes=len(classes))
        criterion = SoftTargetCrossEntropy()

    start_epoch, start_step, history, train_seconds, wall_before = 0, 0, [], 0.0, 0.0
    partial: dict[str, Any] | None = None  # what an interrupted epoch had done before the resume
    skipped: dict[str, str] = {}
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if ema is not None and state.get("ema"):
            ema.module.load_state_dict(state["ema"])
        set_rng_state(state["rng"])
        start_epoch, start_step = int(state["epoch"]), int(state["step"])
        history, train_seconds = list(state["history"]), float(state["train_seconds"])
        wall_before, skipped = float(state.get("wall_seconds", 0.0)), dict(state.get("skipped", {}))
        partial = state.get("partial") if start_step > 0 else None
        log.info("resuming %s from epoch %d, step %d/%d", state_path, start_epoch + 1, start_step, steps_per_epoch)

    net: nn.Module = model
    if info.enabled:
        from torch.nn.parallel import DistributedDataParallel

        model.set_sync_batchnorm(cfg.sync_bn)
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        # Static shapes (every batch has the same size): a dynamic batch dimension is slower code, and crashed torch
        # 2.11's Inductor in a CvT backward on the H200 (benchmarks/GPU_NOTES.md).
        net = torch.compile(net, mode=cfg.compile_mode, dynamic=False)
    train_tf = BatchTransform(pre, train=True, shift=cfg.shift if data.native_size else 0,
                              hflip=cfg.hflip if data.native_size else 0.0, reprob=cfg.reprob)
    eval_tf = BatchTransform(pre)
    t = Trainer(model, net, optimizer, schedule, criterion, train_tf, device, dtype, scaler, ema, mixup,
                cfg.accum_steps, cfg.clip_grad, cfg.seed, info, skipped, cfg.strict_data)
    params = param_count(model)
    writer = None
    if info.main:
        out.mkdir(parents=True, exist_ok=True)
        if state is None:
            # A new run in a folder that held one (`cvt train --overwrite`): the old summary and best weights must not
            # sit beside the new run's if it stops early. Removed only now that the model and data are built, so a
            # mistake in either loses nothing. Its checkpoint and final weights are replaced at the first epoch's end.
            (out / "summary.json").unlink(missing_ok=True)
            for name in ("best.json", "model.safetensors", "preprocess.json", "config.json"):
                (out / "best" / name).unlink(missing_ok=True)
        write_text(out / "recipe.yaml", write_yaml(cfg.to_dict()))
        write_text(out / "preprocess.json", json.dumps(pre.to_dict(), indent=2))
        write_text(out / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history))
        writer = _tensorboard(out)
        if writer is not None:
            cleanup.callback(writer.close)
        log.info(
            "training %s (%s parameters) on %s: %d classes, %d px, %d epochs x %d steps of %d images, %s%s%s",
            model_name or cfg.pretrained, f"{params:,}", cfg.data, len(classes), pre.img_size, cfg.epochs,
            steps_per_epoch, cfg.batch_size, device, f", {info.world} processes" if info.enabled else "",
            f", amp {dtype}".replace("torch.", "") if dtype else "",
        )

    def snapshot(epoch: int, step: int, wall: float, partial: dict[str, Any] | None = None) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT, "version": 1, "epoch": epoch, "step": step,
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": schedule.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "ema": ema.module.state_dict() if ema is not None else None,
            "rng": rng_state(), "config": cfg.to_dict(), "model_config": model.cfg.to_dict(), "classes": classes,
            "preprocess": pre.to_dict(), "history": history, "train_seconds": train_seconds,
            "wall_seconds": wall, "skipped": dict(t.skipped), "partial": partial,
        }

    eval_model = ema.module if ema is not None else model
    result: EvalResult | None = None
    with _StopFlag(info, cfg.checkpoint_minutes * 60) as stop:
        for epoch in range(start_epoch, cfg.epochs):
            first = start_step if epoch == start_epoch else 0
            before = partial if epoch == start_epoch else None  # what this epoch did before the resume, if any
            while True:  # the epoch, in parts when it pauses for a checkpoint
                set_epoch(data, epoch, first * cfg.accum_steps)
                bar = _progress(progress and info.main, epoch, cfg.epochs, first, steps_per_epoch,
                                micro * cfg.accum_steps * info.world)
                try:
                    stats = train_one_epoch(t, data.train, epoch, steps_per_epoch, first, bar.update, stop)
                finally:
                    bar.close()
                train_seconds += stats.seconds
                stats = stats.after(before)
                _gather_skipped(t)  # (evaluate() gathers its own)
                if not stats.interrupted or (not stop.stopping and stats.steps == steps_per_epoch):
                    break  # (a periodic checkpoint due after the last step: the epoch-end one comes next)
                path = out / CHECKPOINT
                if info.main:
                    save_state(path, snapshot(epoch, stats.steps, wall_before + time.perf_counter() - wall_start,
                                              stats.partial()))
                if stop.stopping:
                    name = signal.Signals(stop.signum).name
                    raise Interrupted(
                        f"stopped by {name} at epoch {epoch + 1}, step {stats.steps}/{steps_per_epoch}; "
                        f"checkpoint written to {path}; continue with --resume", path, stop.signum,
                    )
                # A periodic checkpoint: the epoch goes on from that step exactly as `--resume` from it would, so
                # the run's weights are those of a run that never paused (tested).
                log.info("checkpoint at epoch %d, step %d/%d written to %s", epoch + 1, stats.steps,
                         steps_per_epoch, path)
                stop.saved()
                first, before = stats.steps, stats.partial()
            row = {
                "epoch": epoch + 1, "train_loss": round(stats.loss, 5), "val_loss": None, "val_top1": None,
                "val_top5": None, "lr": schedule.get_last_lr(), "images_per_s": round(stats.images_per_s, 1),
                "seconds": round(stats.seconds, 2),
            }
            last = epoch + 1 == cfg.epochs
            if last or (epoch + 1) % cfg.eval_every == 0:
                try:
                    _share_rank0_buffers(eval_model, info)
                    result = evaluate(eval_model, data.val, eval_tf, device, len(classes), dtype, info)
                    _note_skipped(t, [e for e in result.skipped if e.partition(": ")[0] not in t.skipped])
                except Exception:
                    # An evaluation that fails (an unreadable image under --strict-data, say) keeps the epoch's
                    # training: --resume after the fix runs none of its steps again, only the evaluation.
                    if info.main:
                        save_state(out / CHECKPOINT, snapshot(epoch, stats.steps, wall_before + time.perf_counter()
                                                              - wall_start, stats.partial()))
                    raise
                row.update(val_loss=round(result.loss, 5), val_top1=round(result.top1, 3), val_top5=round(result.top5, 3))
            best_before = max((h["val_top1"] for h in history if h["val_top1"] is not None), default=-math.inf)
            history.append(row)
            if info.main:
                _append_line(out / "metrics.jsonl", row)
                _log_epoch(writer, row, cfg.epochs)
                save_weights(eval_model.state_dict(), model.cfg, out / "model.safetensors", class_names=classes)
                if row["val_top1"] is not None and row["val_top1"] > best_before:
                    # timm's model_best, as a folder that loads like the run's own (config and preprocessing
                    # beside the weights); best.json, written last, says which evaluation they are. A run killed
                    # before the checkpoint below redoes this epoch on resume, and the summary names best/ only
                    # where best.json matches the history.
                    best_dir = out / "best"
                    best_dir.mkdir(exist_ok=True)
                    save_weights(eval_model.state_dict(), model.cfg, best_dir / "model.safetensors", class_names=classes)
                    write_text(best_dir / "preprocess.json", json.dumps(pre.to_dict(), indent=2))
                    write_text(best_dir / "best.json", json.dumps({"epoch": row["epoch"], "val_top1": row["val_top1"]}))
                save_state(out / CHECKPOINT, snapshot(epoch + 1, 0, wall_before + time.perf_counter() - wall_start))
            stop.saved()

    if result is None:  # resumed a finished run: measure the final weights again
        result = evaluate(eval_model, data.val, eval_tf, device, len(classes), dtype, info)
    evaluated = [h for h in history if h["val_top1"] is not None]
    best = max(evaluated, key=lambda h: h["val_top1"]) if evaluated else None  # the first of equals, as saved
    summary = {
        "model": model_name or str(cfg.pretrained), "params": params, "data": cfg.data, "img_size": pre.img_size,
        "classes": len(classes), "epochs": cfg.epochs, "best_top1": best["val_top1"] if best else None,
        "best_epoch": best["epoch"] if best else None, "best_weights": _best_weights(out, best),
        "final_top1": round(result.top1, 3), "final_top5": round(result.top5, 3), "final_loss": round(result.loss, 5),
        "val_images": result.count, "train_seconds": round(train_seconds, 1),
        "wall_seconds": round(wall_before + time.perf_counter() - wall_start, 1),
        "images_per_s": round(sum(h["images_per_s"] * h["seconds"] for h in history) / max(1e-9, sum(h["seconds"] for h in history)), 1),
        "device": str(device), "processes": info.world, "amp": str(dtype).replace("torch.", "") if dtype else "none",
        "ema": ema is not None, "skipped_files": len(t.skipped), "skipped": sorted(t.skipped),
        "per_class_top1": {c: round(a, 2) for c, a in zip(classes, result.per_class)},
        "config": cfg.to_dict(),
    }
    if info.main:
        write_text(out / "summary.json", json.dumps(summary, indent=2))
        from .plots import plot_confusion, plot_curves

        plot_curves(history, out / "curves.png")
        plot_confusion(result.confusion, classes, out / "confusion_matrix.png",
                       f"{summary['model']}: top-1 {result.top1:.2f}% on {result.count} images")
    return summary


# ---------------------------------------------------------------------------------------------------------------
# Run-directory helpers
# ---------------------------------------------------------------------------------------------------------------
def _best_weights(out: Path, best: dict | None) -> str | None:
    """RUN/best when it holds the weights of `best` (the history's best evaluation), else None: a run from before
    best/ existed, or one killed between writing best/ and its checkpoint whose redone epoch scored lower."""
    try:
        saved = json.loads((out / "best" / "best.json").read_text())
    except (OSError, ValueError):
        return None
    same = best is not None and saved == {"epoch": best["epoch"], "val_top1": best["val_top1"]}
    return str(out / "best") if same else None


def _append_line(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a dependency; a run without it still trains
        log.warning("tensorboard is not installed: no events written")
        return None
    return SummaryWriter(str(out / "tensorboard"))


def _log_epoch(writer, row: dict, epochs: int) -> None:
    val = f", val top-1 {row['val_top1']:.2f}% top-5 {row['val_top5']:.2f}%" if row["val_top1"] is not None else ""
    log.info("epoch %d/%d: train loss %.4f%s, lr %.3g, %.0f images/s, %.1f s", row["epoch"], epochs,
             row["train_loss"], val, row["lr"], row["images_per_s"], row["seconds"])
    if writer is None:
        return
    for key in ("train_loss", "val_loss", "val_top1", "val_top5", "lr", "images_per_s"):
        if row[key] is not None:
            writer.add_scalar(key.replace("_", "/", 1), row[key], row["epoch"])
    writer.flush()


class _Progress:
    """A tqdm bar on a terminal; otherwise a log line about every 10% of an epoch."""

    def __init__(self, enabled: bool, epoch: int, epochs: int, first: int, total: int, batch: int):
        self.epoch, self.epochs, self.total, self.batch = epoch, epochs, total, batch
        self.bar = None
        self.every = max(1, total // 10)
        self.show_every = max(1, total // 100)  # the bar's loss: 100 readings an epoch
        self.start, self.first = time.perf_counter(), first
        self.enabled = enabled
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=first, desc=f"epoch {epoch + 1}/{epochs}", unit="step",
                            dynamic_ncols=True, leave=False)

    def update(self, step: int, loss: torch.Tensor, lr: float) -> None:
        """`loss` stays a device tensor: reading it waits for the GPU, so only a shown value is read."""
        if not self.enabled:
            return
        rate = (step - self.first) * self.batch / max(1e-9, time.perf_counter() - self.start)
        if self.bar is not None:
            self.bar.update(1)
            if step % self.show_every == 0 or step == self.total:
                self.bar.set_postfix(loss=f"{float(loss):.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.0f}", refresh=False)
        elif step % self.every == 0 or step == self.total:
            log.info("epoch %d/%d step %d/%d: loss %.4f, lr %.3g, %.0f images/s", self.epoch + 1, self.epochs,
                     step, self.total, float(loss), lr, rate)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _progress(enabled: bool, epoch: int, epochs: int, first: int, total: int, batch: int) -> _Progress:
    return _Progress(enabled, epoch, epochs, first, total, batch)
