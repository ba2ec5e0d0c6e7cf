"""The training loop every task shares: `build_optimizer`, `WarmupCosine`, `train_one_epoch`, and `fit`, which runs a
whole `TrainConfig` into a run directory. What differs per task (model, data, loss, metrics, plots) comes from the
task the recipe names (`cvt.tasks`; classification: `cvt.tasks.classification`). For classification:

    RUN/metrics.jsonl       one JSON line per epoch (train loss, val top-1/top-5, lr, images/s, seconds)
    RUN/summary.json        best/final top-1, epochs, training seconds, model, parameters, skipped files
    RUN/model.safetensors   the final weights (EMA when on) + config.json + preprocess.json beside them
    RUN/best/               the same three files for the evaluation with the best score so far (+ best.json)
    RUN/checkpoint.pt       the training state for --resume (written atomically; torch.load(weights_only=True))
    RUN/recipe.yaml         the resolved settings;  RUN/tensorboard/  events;  RUN/*.png  curves, confusion matrix

One process or many: under `torchrun` (RANK/WORLD_SIZE/LOCAL_RANK in the environment) the model is wrapped in
DistributedDataParallel (gloo on CPU, nccl on GPU) and each rank trains on its shard; `batch_size` is global, so
the optimizer sees the same batch whatever the number of processes. BatchNorm in the convolutional projections
normalises over each rank's share, as in the authors' training, unless `sync_bn` is set: then over the global
batch, and N processes train as one process with the same batch would (up to float rounding).

Randomness is seeded per step from (seed, epoch, step, rank), so a run resumed from any checkpoint continues
exactly as the uninterrupted run would have. The library logs through `logging.getLogger("cvt.train")`.

`fit` runs in phases, each a function below: check the settings, build, restore a checkpoint, wrap for DDP and
compile, open the run folder, train the epochs (each: train, evaluate, record, checkpoint), summarise.
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
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .budget import TimeBudget, parse_duration
from .layers.config import fast_path_origin
from .model import CvT, param_count
from .recipe import TrainConfig, write_yaml
from .tasks import DistInfo, Evaluation, Task, autocast, get_task

# Classification's pieces, where callers have always found them (cvt eval, cvt predict, tests).
from .tasks.classification import TTA_MODES, EvalResult, build_model, evaluate, log_probs, resolve_img_size  # noqa: F401
from .utils import atomic_write, mix_seed, seed_everything, write_text
from .weights import STATE_FORMAT

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
def setup_distributed(device_pref: str | None) -> tuple[DistInfo, torch.device]:
    """Join the process group torchrun describes (if any) and pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    info = DistInfo(rank=int(os.environ.get("RANK", "0")), world=world,
                    local_rank=int(os.environ.get("LOCAL_RANK", "0")))
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

    def resize(self, total: int) -> None:
        """Decay to `total` steps instead (a `--time-budget` run fitting its length); warm-up and cool-down stay."""
        self.total = total
        self._apply()

    def get_last_lr(self) -> float:
        return self.lr_at(self.step_count)

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step_count}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step_count = int(state["step"])
        self._apply()



# ---------------------------------------------------------------------------------------------------------------
# One epoch of training
# ---------------------------------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class Trainer:
    """What a training step needs. `net` is what runs forward (DDP / compiled); `model` the plain module; `task`
    turns a batch into a loss."""

    model: nn.Module
    net: nn.Module
    task: Task
    optimizer: torch.optim.Optimizer
    schedule: WarmupCosine
    device: torch.device
    dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None
    ema: Any = None
    accum_steps: int = 1
    clip_grad: float | None = None
    seed: int = 0
    dist: DistInfo = field(default_factory=DistInfo)
    skipped: dict[str, str] = field(default_factory=dict)  # path -> reason, files that could not be read
    strict_data: bool = False


@dataclass(kw_only=True)
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

    def after(self, before: dict[str, Any] | None) -> EpochStats:
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
    samples, done, bad_steps, pending, interrupted = 0, 0, 0, None, False
    start = time.perf_counter()
    for step in range(start_step, steps):
        t.optimizer.zero_grad(set_to_none=True)
        step_loss = torch.zeros((), device=t.device)
        for micro in range(t.accum_steps):
            batch = next(batches)
            _note_skipped(t, t.task.unreadable(batch))
            # Everything random in this micro-step (augmentation, mixup, drop path) follows from these numbers.
            seed_everything(mix_seed(t.seed, epoch, step, micro, t.dist.rank))
            prepared = t.task.prepare(batch, t.device)
            if prepared is None:
                if t.dist.enabled:
                    raise ValueError("a whole batch of unreadable images: clean the data or use one process")
                continue
            inputs, count = prepared
            last = micro == t.accum_steps - 1
            sync = contextlib.nullcontext() if last or not t.dist.enabled else t.net.no_sync()
            with sync:
                with autocast(t.device, t.dtype):
                    loss = t.task.loss(t.net, inputs)
                scaled = loss / t.accum_steps
                (t.scaler.scale(scaled) if t.scaler is not None else scaled).backward()
            step_loss += loss.detach() / t.accum_steps
            samples += count * t.dist.world
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
    return EpochStats(loss=_mean_loss(loss_sum, int(taken), t.dist), steps=start_step + done, images=samples,
                      seconds=time.perf_counter() - start, interrupted=interrupted, taken=int(taken))


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
# Stopping: signals and periodic checkpoints
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

    def __enter__(self) -> _StopFlag:
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




# ---------------------------------------------------------------------------------------------------------------
# A whole run, in phases
# ---------------------------------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class Run:
    """One fit between its phases: the trainer, and the records the checkpoint carries besides the trainer's."""

    cfg: TrainConfig
    task: Task
    trainer: Trainer
    out: Path
    steps_per_epoch: int
    micro: int  # samples per process and forward
    wall_start: float  # this process's start (perf_counter)
    history: list[dict[str, Any]] = field(default_factory=list)  # the rows of metrics.jsonl
    start_epoch: int = 0
    start_step: int = 0
    partial: dict[str, Any] | None = None  # what an interrupted epoch had done before the resume
    train_seconds: float = 0.0
    wall_before: float = 0.0  # wall-clock seconds of the run before this process took it up
    writer: Any = None  # TensorBoard's, on rank 0
    budget: TimeBudget | None = None  # --time-budget: the fitted length of the run

    @property
    def epochs(self) -> int:
        """Epochs this run trains: the recipe's, or as many as fit its time budget (the last perhaps short)."""
        return self.budget.epochs if self.budget is not None else self.cfg.epochs

    def epoch_steps(self, epoch: int) -> int:
        return self.budget.epoch_steps(epoch) if self.budget is not None else self.steps_per_epoch

    @property
    def eval_model(self) -> nn.Module:
        """What is evaluated and saved: the EMA weights when on."""
        return self.trainer.ema.module if self.trainer.ema is not None else self.trainer.model

    def wall(self) -> float:
        return self.wall_before + time.perf_counter() - self.wall_start

    def snapshot(self, epoch: int, step: int, partial: dict[str, Any] | None = None) -> dict[str, Any]:
        """The checkpoint: resuming from it continues exactly as this run goes on from here."""
        t = self.trainer
        return {
            "format": STATE_FORMAT, "version": 1, "task": self.task.name, "epoch": epoch, "step": step,
            "model": t.model.state_dict(), "optimizer": t.optimizer.state_dict(), "scheduler": t.schedule.state_dict(),
            "scaler": t.scaler.state_dict() if t.scaler is not None else None,
            "ema": t.ema.module.state_dict() if t.ema is not None else None,
            "rng": rng_state(), "config": self.cfg.to_dict(), **self.task.state(t.model),
            "history": self.history, "train_seconds": self.train_seconds, "wall_seconds": self.wall(),
            "skipped": dict(t.skipped), "partial": partial,
            "time_budget": self.budget.state() if self.budget is not None else None,
        }

    def checkpoint(self, epoch: int, step: int, partial: dict[str, Any] | None = None) -> Path:
        path = self.out / CHECKPOINT
        if self.trainer.dist.main:
            save_state(path, self.snapshot(epoch, step, partial))
        return path


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
    state, state_path = load_state(resume) if resume else (None, None)
    task, micro = _check_settings(cfg, info, state)
    run = _build(cfg, task, info, device, state, micro, wall_start)
    if state is not None:
        _restore(run, state, state_path)
    _wrap(run)
    _open_run_dir(run, fresh=state is None, cleanup=cleanup)
    final = _train(run, progress)
    return _summarize(run, final)


def _check_settings(cfg: TrainConfig, info: DistInfo, state: dict[str, Any] | None) -> tuple[Task, int]:
    """What is wrong with the settings before anything is built: a resumed run that would change its task or
    model, data the task cannot read, a batch that does not split over the processes. Returns the task and the
    batch of one process's forward."""
    if state is not None:
        _check_resume(cfg, state)
    task = get_task(cfg.task)(cfg)
    if cfg.batch_size % (info.world * cfg.accum_steps):
        raise ValueError(
            f"batch_size {cfg.batch_size} must be divisible by processes x accum_steps = "
            f"{info.world} x {cfg.accum_steps}"
        )
    micro = cfg.batch_size // (info.world * cfg.accum_steps)
    task.check(micro)
    return task, micro


def _check_resume(cfg: TrainConfig, state: dict[str, Any]) -> None:
    """A resumed run keeps its task and model: another would be recorded in recipe.yaml and the checkpoint without
    being what trains, so --config RUN/recipe.yaml would build another run."""
    kept = state["config"]
    task = state.get("task", "classification")  # checkpoints from before tasks were all classification
    if cfg.task != task:
        raise ValueError(f"a resumed run keeps its task; task {cfg.task!r} differs from the run's {task!r}")
    changed = [k for k in ("model", "model_args", "pretrained") if getattr(cfg, k) != kept.get(k)]
    if changed:
        raise ValueError(
            "a resumed run keeps its model; "
            + ", ".join(f"{k} {getattr(cfg, k)!r} differs from the run's {kept.get(k)!r}" for k in changed)
            + " (to train another model from these weights, start a new run with --pretrained)"
        )


def _cvt_parts(model: nn.Module) -> list[CvT]:
    """The CvTs in `model`: itself for classification, a detector's backbone."""
    return [m for m in model.modules() if isinstance(m, CvT)]


def _checkpointable(model: nn.Module) -> list[nn.Module]:
    """What `grad_checkpointing` switches: the CvTs in `model`, else a timm classifier's own switch."""
    return _cvt_parts(model) or ([model] if hasattr(model, "set_grad_checkpointing") else [])


def _build(cfg: TrainConfig, task: Task, info: DistInfo, device: torch.device, state: dict[str, Any] | None,
           micro: int, wall_start: float) -> Run:
    """The task's model and data, then what trains them: optimizer, schedule, AMP, EMA."""
    seed_everything(cfg.seed)
    model = task.build(state=state, device=device, dist=info, micro_batch=micro)
    for part in _checkpointable(model):
        part.set_grad_checkpointing(cfg.grad_checkpointing)
    steps = len(task.train) // cfg.accum_steps
    if cfg.steps_per_epoch:
        steps = min(steps, cfg.steps_per_epoch)
    if steps == 0:
        raise ValueError(f"an epoch has no full step: lower --batch-size (now {cfg.batch_size}) or accum_steps")
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay)
    schedule = WarmupCosine(
        optimizer, cfg.lr, cfg.epochs * steps, round(cfg.warmup_epochs * steps), cfg.warmup_lr, cfg.min_lr,
        round(cfg.cooldown_epochs * steps),
    )
    dtype = amp_dtype(cfg.amp, device)
    ema = None
    if cfg.ema_decay > 0:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=cfg.ema_warmup)
    trainer = Trainer(
        model=model, net=model, task=task, optimizer=optimizer, schedule=schedule, device=device, dtype=dtype,
        scaler=torch.amp.GradScaler(device.type) if dtype == torch.float16 else None, ema=ema,
        accum_steps=cfg.accum_steps, clip_grad=cfg.clip_grad, seed=cfg.seed, dist=info, strict_data=cfg.strict_data,
    )
    budget = None
    if cfg.time_budget is not None:
        budget = TimeBudget(parse_duration(cfg.time_budget), most=cfg.epochs * steps, steps_per_epoch=steps,
                            eval_every=cfg.eval_every, val_batches=_val_images(task) / cfg.batch_size)
    return Run(cfg=cfg, task=task, trainer=trainer, out=Path(cfg.out), steps_per_epoch=steps, micro=micro,
               wall_start=wall_start, budget=budget)


def _val_images(task: Task) -> int:
    """The size of the task's validation split (its loader's dataset, or its in-memory tensors)."""
    val = task.val
    val = getattr(val, "dataset", val)
    try:
        return len(val)
    except TypeError:
        return 0


def _restore(run: Run, state: dict[str, Any], state_path: Path) -> None:
    """Continue from a checkpoint: optimizer, schedule, loss scale, EMA, random generators and the records."""
    t = run.trainer
    t.optimizer.load_state_dict(state["optimizer"])
    t.schedule.load_state_dict(state["scheduler"])
    if t.scaler is not None and state.get("scaler"):
        t.scaler.load_state_dict(state["scaler"])
    if t.ema is not None and state.get("ema"):
        t.ema.module.load_state_dict(state["ema"])
    set_rng_state(state["rng"])
    run.start_epoch, run.start_step = int(state["epoch"]), int(state["step"])
    run.history, run.train_seconds = list(state["history"]), float(state["train_seconds"])
    run.wall_before, t.skipped = float(state.get("wall_seconds", 0.0)), dict(state.get("skipped", {}))
    run.partial = state.get("partial") if run.start_step > 0 else None
    if run.budget is not None and state.get("time_budget"):
        run.budget.load_state(state["time_budget"])
        t.schedule.resize(run.budget.total)
    log.info("resuming %s from epoch %d, step %d/%d", state_path, run.start_epoch + 1, run.start_step,
             run.steps_per_epoch)


def _wrap(run: Run) -> None:
    """What runs forward: the model in DistributedDataParallel across processes, compiled when asked."""
    t, cfg = run.trainer, run.cfg
    if t.dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        parts = _cvt_parts(t.model)
        for part in parts:
            part.set_sync_batchnorm(cfg.sync_bn)
        if cfg.sync_bn and not parts:  # another model's (a timm classifier's) torch BatchNorms
            if t.device.type != "cuda":
                raise ValueError("sync_bn: this model's BatchNorms are torch's, whose SyncBatchNorm runs on GPUs "
                                 "only (CvT's run on any backend); drop sync_bn or train on CUDA")
            # in place: the parameters and buffers stay those the optimizer and the checkpoint hold
            t.model = nn.SyncBatchNorm.convert_sync_batchnorm(t.model)
        t.net = DistributedDataParallel(t.model, device_ids=[t.device.index] if t.device.type == "cuda" else None)
    if cfg.compile:
        # Static shapes (every batch has the same size): a dynamic batch dimension is slower code, and crashed torch
        # 2.11's Inductor in a CvT backward on the H200 (benchmarks/GPU_NOTES.md).
        t.net = torch.compile(t.net, mode=cfg.compile_mode, dynamic=False)


def _open_run_dir(run: Run, *, fresh: bool, cleanup: contextlib.ExitStack) -> None:
    """Rank 0's run folder: the resolved recipe, the task's files, metrics.jsonl as far as the run got, TensorBoard."""
    t, cfg, out = run.trainer, run.cfg, run.out
    if not t.dist.main:
        return
    out.mkdir(parents=True, exist_ok=True)
    if fresh:
        # A new run in a folder that held one (`cvt train --overwrite`): the old summary and best weights must not
        # sit beside the new run's if it stops early. Removed only now that the model and data are built, so a
        # mistake in either loses nothing. Its checkpoint and final weights are replaced at the first epoch's end.
        (out / "summary.json").unlink(missing_ok=True)
        for path in (out / "best").glob("*"):
            if path.is_file():
                path.unlink()
    write_text(out / "recipe.yaml", write_yaml(cfg.to_dict()))
    for name, text in run.task.files().items():
        write_text(out / name, text)
    write_text(out / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in run.history))
    run.writer = _tensorboard(out)
    if run.writer is not None:
        cleanup.callback(run.writer.close)
    log.info(
        "training %s (%s parameters) on %s: %s, %s%d epochs x %d steps of %d images, %s%s%s%s",
        _model_name(cfg), f"{param_count(t.model):,}", cfg.data, run.task.describe(),
        "at most " if run.budget is not None else "", cfg.epochs, run.steps_per_epoch, cfg.batch_size, t.device,
        f", {t.dist.world} processes" if t.dist.enabled else "",
        f", amp {t.dtype}".replace("torch.", "") if t.dtype else "",
        f", within {run.budget.budget_s:.0f} s (--time-budget)" if run.budget is not None else "",
    )


def _model_name(cfg: TrainConfig) -> str:
    return cfg.model or (str(cfg.pretrained) if cfg.pretrained else "cvt_tiny")


def _train(run: Run, progress: bool) -> Evaluation:
    """The epochs from where the run stands, each trained, evaluated when due, recorded and checkpointed. Returns
    the last evaluation (of the final weights, measured again when a resumed run had nothing left to train)."""
    cfg, final = run.cfg, None
    with _StopFlag(run.trainer.dist, cfg.checkpoint_minutes * 60) as stop:
        epoch = run.start_epoch
        while epoch < run.epochs:  # (a budgeted run refits `run.epochs` at each epoch's end)
            stats = _train_epoch(run, epoch, stop, progress)
            ended = time.perf_counter()
            last = epoch + 1 == run.epochs
            row = {"epoch": epoch + 1, "train_loss": round(stats.loss, 5), **dict.fromkeys(run.task.metrics),
                   "lr": run.trainer.schedule.get_last_lr(), "images_per_s": round(stats.images_per_s, 1),
                   "seconds": round(stats.seconds, 2)}
            if last or (epoch + 1) % cfg.eval_every == 0:
                final = _evaluate(run, epoch, stats)
                row.update(final.metrics)
            _record_epoch(run, row)
            stop.saved()
            if run.budget is not None and not last:
                _refit(run, stats, evaluated=row[run.task.score] is not None,
                       epoch_end_s=time.perf_counter() - ended)
            epoch += 1
    if final is None:
        t = run.trainer
        final = run.task.evaluate(run.eval_model, device=t.device, dtype=t.dtype, dist=t.dist)
    return final


def _train_epoch(run: Run, epoch: int, stop: _StopFlag, progress: bool) -> EpochStats:
    """One epoch, in parts when it pauses for a periodic checkpoint; a signal checkpoints and raises Interrupted.
    The stats cover the whole epoch, the part before a resume included."""
    t, cfg, steps = run.trainer, run.cfg, run.epoch_steps(epoch)
    first = run.start_step if epoch == run.start_epoch else 0
    before = run.partial if epoch == run.start_epoch else None  # what this epoch did before the resume, if any
    while True:
        run.task.set_epoch(epoch, first * cfg.accum_steps)
        bar = _progress(progress and t.dist.main, epoch, run.epochs, first, steps,
                        run.micro * cfg.accum_steps * t.dist.world)
        on_step, should_stop = bar.update, stop
        if run.budget is not None:
            on_step, should_stop = _budget_hooks(run, bar.update, stop)
        try:
            stats = train_one_epoch(t, run.task.train, epoch, steps, first, on_step, should_stop)
        finally:
            bar.close()
        run.train_seconds += stats.seconds
        stats = stats.after(before)
        _gather_skipped(t)  # (evaluations gather their own)
        over = run.budget is not None and t.schedule.step_count >= run.budget.total  # the fitted run's last step
        if not stats.interrupted or (not stop.stopping and (stats.steps == steps or over)):
            return stats  # (a periodic checkpoint due after the last step: the epoch-end one comes next)
        path = run.checkpoint(epoch, stats.steps, stats.partial())
        if stop.stopping:
            name = signal.Signals(stop.signum).name
            raise Interrupted(
                f"stopped by {name} at epoch {epoch + 1}, step {stats.steps}/{steps}; "
                f"checkpoint written to {path}; continue with --resume", path, stop.signum,
            )
        # A periodic checkpoint: the epoch goes on from that step exactly as `--resume` from it would, so the run's
        # weights are those of a run that never paused (tested).
        log.info("checkpoint at epoch %d, step %d/%d written to %s", epoch + 1, stats.steps, steps, path)
        stop.saved()
        first, before = stats.steps, stats.partial()


def _budget_hooks(run: Run, on_step: Callable, stop: _StopFlag) -> tuple[Callable, Callable[[], bool]]:
    """A budgeted epoch's step hooks: the first fit of the run's length once a step's time is measured, and the
    end of the epoch at the fitted run's last step."""
    t, budget = run.trainer, run.budget
    assert budget is not None

    def step_hook(step: int, loss: torch.Tensor, lr: float) -> None:
        on_step(step, loss, lr)
        if budget.on_step(t.schedule.step_count, time.perf_counter()):
            _fit_budget(run, done=t.schedule.step_count)

    def should_stop() -> bool:
        return stop() or t.schedule.step_count >= budget.total  # stop() first: under DDP every rank must call it

    return step_hook, should_stop


def _refit(run: Run, stats: EpochStats, *, evaluated: bool, epoch_end_s: float) -> None:
    """At an epoch's end: the fit again, with this epoch's step time and, when it was evaluated, what its
    evaluation and saves took."""
    budget = run.budget
    assert budget is not None
    step_s = stats.seconds / stats.steps if stats.steps else None  # (the epoch's part before a resume included)
    _fit_budget(run, done=run.trainer.schedule.step_count, step_s=step_s, eval_s=epoch_end_s if evaluated else None)


def _fit_budget(run: Run, *, done: int, step_s: float | None = None, eval_s: float | None = None) -> None:
    """Fit the run's length to its budget (rank 0's fit on every rank) and the cosine to it; logged."""
    t, budget = run.trainer, run.budget
    assert budget is not None
    total = budget.fit(elapsed_s=run.wall(), done=done, step_s=step_s, eval_s=eval_s)
    if t.dist.enabled:
        shared = torch.tensor([total], dtype=torch.long, device=t.device if t.device.type == "cuda" else "cpu")
        dist.broadcast(shared, src=0)
        budget.total = total = int(shared.item())
    t.schedule.resize(total)
    log.info("time budget %.0f s: %.3f s a step, evaluations %s: %d of the recipe's %d steps fit (%.1f epochs)",
             budget.budget_s, budget.step_s, f"{budget.eval_s:.1f} s" if budget.eval_s is not None else "estimated",
             total, budget.most, total / run.steps_per_epoch)


def _evaluate(run: Run, epoch: int, stats: EpochStats) -> Evaluation:
    t = run.trainer
    try:
        _share_rank0_buffers(run.eval_model, t.dist)
        result = run.task.evaluate(run.eval_model, device=t.device, dtype=t.dtype, dist=t.dist)
        _note_skipped(t, [e for e in result.skipped if e.partition(": ")[0] not in t.skipped])
    except Exception:
        # An evaluation that fails (an unreadable image under --strict-data, say) keeps the epoch's training:
        # --resume after the fix runs none of its steps again, only the evaluation.
        run.checkpoint(epoch, stats.steps, stats.partial())
        raise
    return result


def _record_epoch(run: Run, row: dict[str, Any]) -> None:
    """The epoch's row in metrics.jsonl, the log and TensorBoard; the final weights, best weights when they are,
    and the epoch-end checkpoint."""
    best = _best_row(run.task, run.history)
    run.history.append(row)
    if not run.trainer.dist.main:
        return
    _append_line(run.out / "metrics.jsonl", row)
    _log_epoch(run.writer, row, run.epochs, run.task)
    run.task.save_weights(run.eval_model, run.out)
    if _improves(run.task, row, best):
        # timm's model_best, as a folder that loads like the run's own (config and task files beside the weights);
        # best.json, written last, says which evaluation they are. A run killed before the checkpoint below redoes
        # this epoch on resume, and the summary names best/ only where best.json matches the history.
        best_dir = run.out / "best"
        best_dir.mkdir(exist_ok=True)
        run.task.save_weights(run.eval_model, best_dir)
        for name, text in run.task.files().items():
            write_text(best_dir / name, text)
        write_text(best_dir / "best.json", json.dumps(_best_record(run.task, row)))
    run.checkpoint(row["epoch"], 0)


def _best_row(task: Task, history: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The evaluated row with the best score: the first of equals, as best/ holds it."""
    scored = [h for h in history if h.get(task.score) is not None]
    if not scored:
        return None
    pick = max if task.higher_is_better else min
    return pick(scored, key=lambda h: h[task.score])


def _improves(task: Task, row: dict[str, Any], best: dict[str, Any] | None) -> bool:
    value = row.get(task.score)
    if value is None:
        return False
    if best is None:
        return True
    return value > best[task.score] if task.higher_is_better else value < best[task.score]


def _best_record(task: Task, row: dict[str, Any] | None) -> dict[str, Any] | None:
    """What best.json holds for the evaluation `row`: its epoch and score."""
    return None if row is None else {"epoch": row["epoch"], task.score: row[task.score]}


def _summarize(run: Run, final: Evaluation) -> dict[str, Any]:
    """summary.json (the shared fields around the task's) and the task's plots."""
    t, cfg, task = run.trainer, run.cfg, run.task
    best = _best_row(task, run.history)
    seconds = sum(h["seconds"] for h in run.history)
    summary = {
        "model": _model_name(cfg), "params": param_count(t.model), "task": task.name, "data": cfg.data,
        "epochs": run.epochs, "best_" + task.score.removeprefix("val_"): best[task.score] if best else None,
        "best_epoch": best["epoch"] if best else None,
        "best_weights": _best_weights(run.out, _best_record(task, best)),
        **task.summary(final),
        "train_seconds": round(run.train_seconds, 1), "wall_seconds": round(run.wall(), 1),
        "images_per_s": round(sum(h["images_per_s"] * h["seconds"] for h in run.history) / max(1e-9, seconds), 1),
        "device": str(t.device), "processes": t.dist.world,
        "amp": str(t.dtype).replace("torch.", "") if t.dtype else "none",
        "ema": t.ema is not None, "skipped_files": len(t.skipped), "skipped": sorted(t.skipped),
        "time_budget": run.budget.summary() if run.budget is not None else None,
        "fast_paths": fast_path_origin(),
        "config": cfg.to_dict(),
    }
    if t.dist.main:
        write_text(run.out / "summary.json", json.dumps(summary, indent=2))
        task.plots(run.history, final, run.out, summary["model"])
    return summary


# ---------------------------------------------------------------------------------------------------------------
# Run-directory helpers
# ---------------------------------------------------------------------------------------------------------------
def _best_weights(out: Path, record: dict[str, Any] | None) -> str | None:
    """RUN/best when its best.json is `record` (the history's best evaluation), else None: a run from before best/
    existed, or one killed between writing best/ and its checkpoint whose redone epoch scored lower."""
    try:
        saved = json.loads((out / "best" / "best.json").read_text())
    except (OSError, ValueError):
        return None
    return str(out / "best") if record is not None and saved == record else None


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


def _log_epoch(writer, row: dict, epochs: int, task: Task) -> None:
    val = f", {task.format_metrics(row)}" if row[task.score] is not None else ""
    log.info("epoch %d/%d: train loss %.4f%s, lr %.3g, %.0f images/s, %.1f s", row["epoch"], epochs,
             row["train_loss"], val, row["lr"], row["images_per_s"], row["seconds"])
    if writer is None:
        return
    for key, value in row.items():  # train/loss, val/top1, lr, ...
        if key not in ("epoch", "seconds") and value is not None:
            writer.add_scalar(key.replace("_", "/", 1), value, row["epoch"])
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
