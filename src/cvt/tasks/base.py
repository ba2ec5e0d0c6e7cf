"""The contract between the shared training loop (`cvt.engine.fit`) and a task.

The loop owns everything every task needs the same way: processes and devices, DDP, AMP, EMA, accumulation,
clipping, the schedule, checkpoints and exact resume, signals, the progress bar, the run folder, TensorBoard, best
weights and the summary. A task owns what differs: its model and data, the loss of a step, its evaluation, the
score that picks best weights, its columns in metrics.jsonl and summary.json, and its plots.

A batch is whatever the task's loaders yield: the loop only hands it back to the task (`prepare`, then `loss`)
and asks it which files it could not read (`unreadable`). Classification yields `(images, labels, errors)`; a
detection task would yield `(list of images, list of target dicts, errors)` and sum a torchvision model's loss dict.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

if TYPE_CHECKING:
    from ..recipe import TrainConfig


@dataclass(kw_only=True)
class DistInfo:
    """This process's place among torchrun's processes (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Mixed precision on `device` in `dtype` (None: full precision)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass(kw_only=True)
class Evaluation:
    """One evaluation, as the loop records it."""

    metrics: dict[str, float]  # the task's columns of metrics.jsonl (`Task.metrics`), rounded as logged
    count: int  # samples evaluated, over all processes
    skipped: list[str] = field(default_factory=list)  # "path: reason" of files that could not be read
    detail: Any = None  # the task's own result (a confusion matrix, per-class AP...) for its summary and plots


class Task:
    """One kind of training. Subclasses set the class attributes and implement the methods; `get_task(name)`
    finds them by `name` (registered with `@register_task`). One instance serves one run."""

    name: ClassVar[str]
    score: ClassVar[str]  # the metrics column that chooses best weights, e.g. "val_top1"
    higher_is_better: ClassVar[bool] = True  # the score's direction (a loss would be False)
    metrics: ClassVar[tuple[str, ...]]  # the evaluation's metrics.jsonl columns, None in rows not evaluated

    train: Iterable  # set by `build`: this process's training batches (with len: batches an epoch)
    val: Iterable  # set by `build`: this process's share of the validation batches

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg

    # ---- before anything is built ---------------------------------------------------------------------------
    def check(self, micro_batch: int) -> None:
        """Refuse settings this task cannot train with (`micro_batch`: samples per process and forward)."""

    # ---- building -------------------------------------------------------------------------------------------
    def build(self, *, state: dict[str, Any] | None, device: torch.device, dist: DistInfo,
              micro_batch: int) -> nn.Module:
        """The model (fresh, pretrained, or a resumed run's from `state`) on `device`, and the loaders (`train`,
        `val`). Randomness here comes from the run's seed, set just before."""
        raise NotImplementedError

    def set_epoch(self, epoch: int, start: int) -> None:
        """Shuffle the training data for `epoch` and skip its first `start` batches (resuming mid-epoch)."""
        raise NotImplementedError

    def describe(self) -> str:
        """A few words on the data for the run's first log line, e.g. "10 classes, 28 px"."""
        return ""

    # ---- a training step ------------------------------------------------------------------------------------
    def unreadable(self, batch: Any) -> list[str]:
        """The "path: reason" of each file `batch` could not read (data.py's batches end with that list)."""
        return list(batch[-1])

    def prepare(self, batch: Any, device: torch.device) -> tuple[Any, int] | None:
        """`batch` moved to `device` and augmented, as what `loss` takes, and its number of samples; None when
        nothing in it could be read. Runs outside autocast, after the loop seeded this micro-step's randomness."""
        raise NotImplementedError

    def loss(self, net: nn.Module, inputs: Any) -> torch.Tensor:
        """The scalar loss of `inputs` through `net` (under autocast; the loop scales and back-propagates it)."""
        raise NotImplementedError

    # ---- evaluation and records -----------------------------------------------------------------------------
    def evaluate(self, model: nn.Module, *, device: torch.device, dtype: torch.dtype | None,
                 dist: DistInfo) -> Evaluation:
        """Score `model` on `val` (every process its share; the figures summed over all)."""
        raise NotImplementedError

    def format_metrics(self, row: dict[str, Any]) -> str:
        """An evaluated metrics row's figures for the epoch's log line, e.g. "val top-1 91.20% top-5 99.80%"."""
        return ", ".join(f"{k} {row[k]:.4g}" for k in self.metrics)

    def summary(self, final: Evaluation) -> dict[str, Any]:
        """The task's summary.json fields, from the final evaluation."""
        return {"val_images": final.count, **{f"final_{k.removeprefix('val_')}": v for k, v in final.metrics.items()}}

    @classmethod
    def headline(cls, summary: dict[str, Any]) -> str:
        """The result in a few words, as `cvt train` prints it."""
        key = "final_" + cls.score.removeprefix("val_")
        return f"{key} {summary[key]}"

    @classmethod
    def best_note(cls, summary: dict[str, Any], value: str) -> str:
        """" (best VALUE at epoch N, weights in DIR)" for a headline, `value` the formatted best score; "" when no
        evaluation chose best weights."""
        if summary.get("best_" + cls.score.removeprefix("val_")) is None:
            return ""
        where = f", weights in {summary['best_weights']}" if summary.get("best_weights") else ""
        return f" (best {value} at epoch {summary['best_epoch']}{where})"

    def plots(self, history: list[dict[str, Any]], final: Evaluation, out: Path, title: str) -> None:
        """PNG figures of the run in `out` (`title`: the model's name)."""

    # ---- what the run folder and the checkpoint carry -------------------------------------------------------
    def state(self, model: nn.Module) -> dict[str, Any]:
        """Checkpoint entries that `build` needs to rebuild this run's model and data on resume."""
        return {}

    def save_weights(self, model: nn.Module, folder: Path) -> None:
        """`model`'s weights in `folder`, loadable on their own (model.safetensors and its config)."""
        raise NotImplementedError

    def files(self) -> dict[str, str]:
        """Small text files to write beside the weights (name -> content), e.g. preprocess.json."""
        return {}
