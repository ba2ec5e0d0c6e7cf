"""Image classification: the first task. Batches are `(uint8 images, labels, unreadable files)` from cvt.data; the
loss is cross-entropy (soft-target with mixup/cutmix); evaluation is top-1, top-5, loss and the confusion matrix;
best weights are the highest `val_top1`.

The model is a CvT (`--model cvt_tiny`, any `cvt zoo` name, or a `--pretrained` checkpoint's), or any timm classifier
(`--model timm:<name>`, e.g. cvt's baselines `timm:resnet_cifar_small`), built with `timm.create_model` for the
data's classes and channels with `model_args` as its keyword arguments, and saved as its weights plus a config.json
that rebuilds it (format "cvt-timm-classifier"), which `cvt eval` and `cvt predict` load."""

from __future__ import annotations

import difflib
import json
import logging
import math
import os
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
from ..weights import load_safetensors_into, save_described, save_weights, weights_in_folder
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
    if timm_name(model_name) is not None:
        pretrained_cfg = _timm_pretrained_cfg(timm_name(model_name))
        return pretrained_cfg.input_size[-1] if pretrained_cfg is not None else 224
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
# timm classifiers (`--model timm:<name>`)
# ---------------------------------------------------------------------------------------------------------------
TIMM_PREFIX = "timm:"  # as detection and segmentation spell a timm backbone
TIMM_FORMAT = "cvt-timm-classifier"  # config.json's "format" beside a timm classifier's model.safetensors


def timm_name(model: str | None) -> str | None:
    """The timm model that `model` ("timm:<name>") names; None for a CvT."""
    return model[len(TIMM_PREFIX):] if model and model.startswith(TIMM_PREFIX) else None


def check_timm_name(name: str) -> None:
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join('timm:' + c for c in close)}?" if close else " (see timm.list_models())"
        raise ValueError(f"--model timm:{name}: timm has no model {name!r}{hint}")


def _timm_pretrained_cfg(name: str):
    from timm.models import get_pretrained_cfg

    try:
        return get_pretrained_cfg(name)
    except RuntimeError as e:  # a pretrained tag the architecture does not have
        raise ValueError(f"--model timm:{name}: {e}") from None


def timm_model_args(name: str, model_args: dict[str, Any], img_size: int) -> dict[str, Any]:
    """`model_args` with the training side as `img_size` where the model's input size is fixed (a ViT's position
    embedding): timm's own rule, its pretrained cfg's `fixed_input_size`. Other models (a ResNet) take no such
    argument."""
    args = dict(model_args)
    pretrained_cfg = _timm_pretrained_cfg(name)
    if pretrained_cfg is not None and pretrained_cfg.fixed_input_size:
        args.setdefault("img_size", img_size)
    return args


def build_timm_classifier(name: str, *, num_classes: int, in_chans: int, pretrained: str | os.PathLike | None = None,
                          **model_args: Any) -> nn.Module:
    """`timm.create_model(name, num_classes=..., in_chans=..., **model_args)`, from scratch, or from `pretrained` (a
    file timm's loader reads, or a folder holding model.safetensors) through timm's pretrained_cfg overlay, as
    detection's timm backbones are loaded (timm drops a head of another class count and adapts the first
    convolution to `in_chans`)."""
    import timm

    extra: dict[str, Any] = {}
    if pretrained:
        path = Path(pretrained).expanduser()
        if not path.exists():
            raise ValueError(f"--pretrained {path} does not exist")
        file = weights_in_folder(path) if path.is_dir() else path
        extra = dict(pretrained=True, pretrained_cfg_overlay=dict(file=str(file)))
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in model_args.items()}  # (YAML has no tuples)
    try:
        return timm.create_model(name, num_classes=num_classes, in_chans=in_chans, **args, **extra)
    except TypeError as e:  # an argument the model does not take
        raise ValueError(f"timm model {name!r}: {e} (model_args are its keyword arguments)") from None
    except RuntimeError as e:
        if not pretrained:
            raise
        # weights that do not fit: torch's message lists every key on many lines
        raise ValueError(f"cannot load {pretrained} into timm model {name!r}: {str(e).splitlines()[0]}") from None


def save_timm_classifier(model: nn.Module, record: dict[str, Any], class_names: list[str], folder: Path) -> Path:
    """`folder/model.safetensors` and the config.json that rebuilds the model (`record`: `timm_model`,
    `model_args`, `num_classes`, `in_chans`), with the class names."""
    config = {"format": TIMM_FORMAT, "task": "classification", **record, "class_names": list(class_names),
              "weights": "model.safetensors"}
    return save_described(model, config, folder)


def load_timm_classifier(checkpoint: str | os.PathLike) -> nn.Module | None:
    """The timm classifier a run saved (RUN, RUN/best or the model.safetensors in one), in eval mode, with its
    `class_names` and `in_chans`; None when the config.json there does not describe one (a CvT's, or none)."""
    path = Path(checkpoint).expanduser()
    folder = path if path.is_dir() else path.parent
    if path.is_file() and path.suffix != ".safetensors":
        return None
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or config.get("format") != TIMM_FORMAT:
        return None
    try:
        name, num_classes, in_chans = config["timm_model"], config["num_classes"], config["in_chans"]
        model = build_timm_classifier(name, num_classes=num_classes, in_chans=in_chans, **config["model_args"])
    except KeyError as e:
        raise ValueError(f"{folder / 'config.json'} lacks the entry {e}") from None
    load_safetensors_into(model, path if path.is_file() else folder / config.get("weights", "model.safetensors"),
                          "its config.json")
    model.class_names, model.in_chans, model.fresh_classifier = config.get("class_names"), in_chans, False
    return model.eval()


def input_channels(model: nn.Module) -> int:
    """The image channels a classifier takes: a CvT's config says; a timm model (`load_timm_classifier`'s) its own."""
    return model.cfg.in_chans if isinstance(model, CvT) else model.in_chans


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
        if timm_name(cfg.model) is not None:
            check_timm_name(timm_name(cfg.model))
        if (cfg.mixup > 0 or cfg.cutmix > 0) and micro_batch % 2:
            raise ValueError(f"mixup/cutmix mix pairs: each process's batch ({micro_batch}) must be even")

    # ---- building -------------------------------------------------------------------------------------------
    def build(self, *, state: dict[str, Any] | None, device: torch.device, dist: DistInfo,
              micro_batch: int) -> nn.Module:
        cfg = self.cfg
        self.timm: dict[str, Any] | None = None  # what rebuilds a timm classifier (`_build_timm`); None for a CvT
        if timm_name(cfg.model) is None:
            model = build_model(cfg, state).to(device)
            in_chans, model_name = model.cfg.in_chans, cfg.model or ("cvt_tiny" if not cfg.pretrained else None)
        else:  # built below, once the data says how many classes
            model, in_chans, model_name = None, data_info(cfg.data)[0], cfg.model
        pre = Preprocess.default_for(in_chans, resolve_img_size(cfg, model_name))
        # In-memory data (Fashion-MNIST) is trained and evaluated on whole images, resized: record no crop, so that
        # `cvt predict` on an image file sees it the same way.
        crop_pct = 1.0 if data_info(cfg.data)[1] else cfg.crop_pct
        self.pre = Preprocess(pre.img_size, pre.in_chans, pre.mean, pre.std, crop_pct, cfg.interpolation)
        self.data = build_data(
            cfg.data, self.pre, data_dir=cfg.data_dir, batch_size=micro_batch,
            eval_batch_size=max(256, micro_batch), num_workers=cfg.num_workers, device=device, rank=dist.rank,
            world=dist.world, seed=cfg.seed, randaugment=cfg.randaugment, color_jitter=cfg.color_jitter,
            crop_scale=cfg.crop_scale, hflip=cfg.hflip, holdout=cfg.holdout, train_fraction=cfg.train_fraction,
            # a resumed run keeps its labels: renamed or added class folders are an error, not a silent relabelling
            classes=state["classes"] if state is not None else None,
        )
        self.train, self.val, self.classes = self.data.train, self.data.val, self.data.classes
        if model is None:
            model = self._build_timm(state).to(device)
        if model.num_classes != len(self.classes):
            if state is not None:
                raise ValueError(f"the checkpoint has {model.num_classes} classes, the data {len(self.classes)}")
            if cfg.pretrained:
                log.info("new %d-class head (the checkpoint had %d classes)", len(self.classes), model.num_classes)
            model.reset_classifier(len(self.classes))
        self._build_step()
        return model

    def _build_timm(self, state: dict[str, Any] | None) -> nn.Module:
        """The timm classifier for the data's classes and channels at the training side (a resumed run's: the one it
        recorded, with its weights)."""
        cfg = self.cfg
        if state is not None:
            self.timm = state["timm_config"]
        else:
            name = timm_name(cfg.model)
            self.timm = {"timm_model": name, "model_args": timm_model_args(name, cfg.model_args, self.pre.img_size),
                         "num_classes": len(self.classes), "in_chans": self.pre.in_chans}
        rec = self.timm
        model = build_timm_classifier(rec["timm_model"], num_classes=rec["num_classes"], in_chans=rec["in_chans"],
                                      pretrained=cfg.pretrained if state is None else None, **rec["model_args"])
        if state is not None:
            model.load_state_dict(state["model"])
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
            "val_images": r.count, "val_split": "held out of train" if self.cfg.holdout else "validation split",
            "train_images": len(self.data.train_dataset),
            "per_class_top1": {c: round(a, 2) for c, a in zip(self.classes, r.per_class)},
        }

    @classmethod
    def headline(cls, summary: dict[str, Any]) -> str:
        best = cls.best_note(summary, f"{summary['best_top1'] or 0:.2f}%")
        return (f"final top-1 {summary['final_top1']:.2f}%{best}, top-5 {summary['final_top5']:.2f}% "
                f"on {summary['val_images']}{_held_out(summary)} images")

    def plots(self, history: list[dict[str, Any]], final: Evaluation, out: Path, title: str) -> None:
        from ..plots import plot_confusion, plot_curves

        r: EvalResult = final.detail
        plot_curves(history, out / "curves.png")
        plot_confusion(r.confusion, self.classes, out / "confusion_matrix.png",
                       f"{title}: top-1 {r.top1:.2f}% on {r.count} images")

    # ---- what the run folder and the checkpoint carry -------------------------------------------------------
    def state(self, model: nn.Module) -> dict[str, Any]:
        arch = {"timm_config": self.timm} if self.timm is not None else {"model_config": model.cfg.to_dict()}
        return {**arch, "classes": self.classes, "preprocess": self.pre.to_dict()}

    def save_weights(self, model: nn.Module, folder: Path) -> None:
        if self.timm is not None:
            save_timm_classifier(model, self.timm, self.classes, folder)
            return
        save_weights(model.state_dict(), model.cfg, folder / "model.safetensors", class_names=self.classes)

    def files(self) -> dict[str, str]:
        return {"preprocess.json": json.dumps(self.pre.to_dict(), indent=2)}


def _held_out(summary: dict[str, Any]) -> str:
    return " held-out" if summary.get("val_split") == "held out of train" else ""
