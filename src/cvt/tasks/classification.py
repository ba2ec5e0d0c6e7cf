"""Image classification: the first task. Batches are `(uint8 images, labels, unreadable files)` from cvt.data; the
loss is cross-entropy (soft-target with mixup/cutmix); evaluation is top-1, top-5, loss and the confusion matrix;
best weights are the highest `val_top1`."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..config import CvTConfig
from ..data import BatchTransform, Preprocess, build_data, data_info, parse_data, set_epoch
from ..model import CvT
from ..weights import save_weights
from . import register_task
from .base import DistInfo, Evaluation, Task, autocast

if TYPE_CHECKING:
    from ..recipe import TrainConfig

log = logging.getLogger("cvt.train")


# ---------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------
def resolve_img_size(cfg: TrainConfig, model_name: str | None) -> int:
    if cfg.img_size:
        return cfg.img_size
    _, native = data_info(cfg.data)
    if native:
        return native
    from ..registry import get_variant

    return get_variant(model_name).input_size if model_name else 224


def build_model(cfg: TrainConfig, state: dict[str, Any] | None) -> CvT:
    """The model to train: a resumed run's, a pretrained checkpoint's (any format), or a fresh variant."""
    from ..registry import create_model, from_pretrained

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


# ---------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------
@dataclass(kw_only=True)
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
# The task
# ---------------------------------------------------------------------------------------------------------------
@register_task
class Classification(Task):
    name = "classification"
    score = "val_top1"
    higher_is_better = True
    metrics = ("val_loss", "val_top1", "val_top5")

    def check(self, micro_batch: int) -> None:
        cfg = self.cfg
        parse_data(cfg.data)  # a bad --data is an error before anything is built
        if (cfg.mixup > 0 or cfg.cutmix > 0) and micro_batch % 2:
            raise ValueError(f"mixup/cutmix mix pairs: each process's batch ({micro_batch}) must be even")

    # ---- building -------------------------------------------------------------------------------------------
    def build(self, *, state: dict[str, Any] | None, device: torch.device, dist: DistInfo,
              micro_batch: int) -> nn.Module:
        cfg = self.cfg
        model = build_model(cfg, state).to(device)
        model_name = cfg.model or ("cvt_tiny" if not cfg.pretrained else None)
        pre = Preprocess.default_for(model.cfg.in_chans, resolve_img_size(cfg, model_name))
        # In-memory data (Fashion-MNIST) is trained and evaluated on whole images, resized: record no crop, so that
        # `cvt predict` on an image file sees it the same way.
        crop_pct = 1.0 if data_info(cfg.data)[1] else cfg.crop_pct
        self.pre = Preprocess(pre.img_size, pre.in_chans, pre.mean, pre.std, crop_pct, cfg.interpolation)
        self.data = build_data(
            cfg.data, self.pre, data_dir=cfg.data_dir, batch_size=micro_batch,
            eval_batch_size=max(256, micro_batch), num_workers=cfg.num_workers, device=device, rank=dist.rank,
            world=dist.world, seed=cfg.seed, randaugment=cfg.randaugment, color_jitter=cfg.color_jitter,
            crop_scale=cfg.crop_scale, hflip=cfg.hflip,
            # a resumed run keeps its labels: renamed or added class folders are an error, not a silent relabelling
            classes=state["classes"] if state is not None else None,
        )
        self.train, self.val, self.classes = self.data.train, self.data.val, self.data.classes
        if model.num_classes != len(self.classes):
            if state is not None:
                raise ValueError(f"the checkpoint has {model.num_classes} classes, the data {len(self.classes)}")
            if cfg.pretrained:
                log.info("new %d-class head (the checkpoint had %d classes)", len(self.classes), model.num_classes)
            model.reset_classifier(len(self.classes))
        self._build_step()
        return model

    def _build_step(self) -> None:
        """The batch transforms, mixup and the criterion."""
        cfg, native = self.cfg, self.data.native_size
        # Shifts and flips of in-memory images happen here, on the batch; image files are flipped as they load.
        self.transform = BatchTransform(self.pre, train=True, shift=cfg.shift if native else 0,
                                        hflip=cfg.hflip if native else 0.0, reprob=cfg.reprob)
        self.eval_transform = BatchTransform(self.pre)
        self.mixup, self.criterion = None, nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        if cfg.mixup > 0 or cfg.cutmix > 0:
            from timm.data import Mixup
            from timm.loss import SoftTargetCrossEntropy

            self.mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                               switch_prob=cfg.mixup_switch_prob, label_smoothing=cfg.label_smoothing,
                               num_classes=len(self.classes))
            self.criterion = SoftTargetCrossEntropy()

    def set_epoch(self, epoch: int, start: int) -> None:
        set_epoch(self.data, epoch, start)

    def describe(self) -> str:
        return f"{len(self.classes)} classes, {self.pre.img_size} px"

    # ---- a training step ------------------------------------------------------------------------------------
    def prepare(self, batch: Any, device: torch.device) -> tuple[Any, int] | None:
        x, y, _ = batch
        if len(y) == 0:
            return None
        x = self.transform(x.to(device, non_blocking=True))
        y = y.to(device, non_blocking=True)
        if self.mixup is not None:
            if len(y) % 2:  # a skipped file left an odd batch; mixup mixes pairs
                x, y = x[:-1], y[:-1]
            x, y = self.mixup(x, y)  # y: (B, classes) soft targets
        return (x, y), len(x)

    def loss(self, net: nn.Module, inputs: Any) -> torch.Tensor:
        x, y = inputs
        return self.criterion(net(x), y)

    # ---- evaluation and records -----------------------------------------------------------------------------
    def evaluate(self, model: nn.Module, *, device: torch.device, dtype: torch.dtype | None,
                 dist: DistInfo) -> Evaluation:
        r = evaluate(model, self.val, self.eval_transform, device, len(self.classes), dtype, dist)
        metrics = {"val_loss": round(r.loss, 5), "val_top1": round(r.top1, 3), "val_top5": round(r.top5, 3)}
        return Evaluation(metrics=metrics, count=r.count, skipped=r.skipped, detail=r)

    def format_metrics(self, row: dict[str, Any]) -> str:
        return f"val top-1 {row['val_top1']:.2f}% top-5 {row['val_top5']:.2f}%"

    def summary(self, final: Evaluation) -> dict[str, Any]:
        r: EvalResult = final.detail
        return {
            "img_size": self.pre.img_size, "classes": len(self.classes),
            "final_top1": round(r.top1, 3), "final_top5": round(r.top5, 3), "final_loss": round(r.loss, 5),
            "val_images": r.count, "per_class_top1": {c: round(a, 2) for c, a in zip(self.classes, r.per_class)},
        }

    @classmethod
    def headline(cls, summary: dict[str, Any]) -> str:
        best = cls.best_note(summary, f"{summary['best_top1'] or 0:.2f}%")
        return (f"final top-1 {summary['final_top1']:.2f}%{best}, top-5 {summary['final_top5']:.2f}% "
                f"on {summary['val_images']} images")

    def plots(self, history: list[dict[str, Any]], final: Evaluation, out: Path, title: str) -> None:
        from ..plots import plot_confusion, plot_curves

        r: EvalResult = final.detail
        plot_curves(history, out / "curves.png")
        plot_confusion(r.confusion, self.classes, out / "confusion_matrix.png",
                       f"{title}: top-1 {r.top1:.2f}% on {r.count} images")

    # ---- what the run folder and the checkpoint carry -------------------------------------------------------
    def state(self, model: nn.Module) -> dict[str, Any]:
        return {"model_config": model.cfg.to_dict(), "classes": self.classes, "preprocess": self.pre.to_dict()}

    def save_weights(self, model: nn.Module, folder: Path) -> None:
        save_weights(model.state_dict(), model.cfg, folder / "model.safetensors", class_names=self.classes)

    def files(self) -> dict[str, str]:
        return {"preprocess.json": json.dumps(self.pre.to_dict(), indent=2)}
