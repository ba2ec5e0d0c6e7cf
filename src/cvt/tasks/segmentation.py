"""Semantic segmentation: `--data seg:PATH` (PATH/{train,val}/images/* with masks/*.png paired by stem, 255 ignored).

Batches are `(images (B, 3, H, W) float in [0, 1], masks (B, H, W) int64, unreadable files)` from cvt.datasets; the
model is `cvt.segmentation.segmenter` (smp's UPerNet or FPN over the backbone `--model` names; `head` picks the
decoder); the loss is torch's cross-entropy with ignore_index 255. The evaluation is one confusion matrix over the
whole validation split (summed over processes), each image at its own size: per-class IoU, their mean over the
classes present (mIoU as papers and torchmetrics' `MulticlassJaccardIndex(average="macro")` compute it, not a mean of
per-image IoUs), pixel accuracy and the loss. Best weights are the highest `val_miou`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..segmentation import IGNORE_INDEX, Segmenter, load_segmenter, save_segmenter, segmenter
from . import register_task
from .base import DistInfo, Evaluation, Task, autocast

DEFAULT_SIZE = 128  # training crop side when the recipe sets no img_size: the scenes' canvases are 96-128 px
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's, as timm's and cvt's RGB models use


# ---------------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------------
def confusion_update(confusion: torch.Tensor, pred: torch.Tensor, target: torch.Tensor) -> None:
    """Add the pixels of `pred` against `target` (same shape, class indices) to `confusion` (K*K, flat: row the
    true class, column the prediction); target pixels equal to IGNORE_INDEX are left out."""
    k = int(round(confusion.numel() ** 0.5))
    keep = target != IGNORE_INDEX
    t, p = target[keep], pred[keep]
    confusion += torch.bincount(t * k + p, minlength=k * k)


@dataclass(kw_only=True)
class SegResult:
    confusion: torch.Tensor  # (K, K) pixel counts: rows true class, columns prediction
    loss: float  # mean cross-entropy over the scored pixels
    count: int  # images
    skipped: list[str] = field(default_factory=list)

    @property
    def iou(self) -> list[float | None]:
        """Per-class IoU in %, TP / (TP + FP + FN); None for a class neither in the masks nor predicted."""
        c = self.confusion.double()
        tp = c.diag()
        union = c.sum(0) + c.sum(1) - tp
        return [None if u == 0 else float(t / u * 100) for t, u in zip(tp, union)]

    @property
    def miou(self) -> float:
        """The mean of the per-class IoUs over the classes present (in the masks or the predictions)."""
        present = [v for v in self.iou if v is not None]
        return sum(present) / len(present) if present else 0.0

    @property
    def pixel_acc(self) -> float:
        total = self.confusion.sum().item()
        return self.confusion.diag().sum().item() / total * 100 if total else 0.0


def normalize(images: torch.Tensor, mean: Sequence[float] = MEAN, std: Sequence[float] = STD) -> torch.Tensor:
    m = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    return (images - m) / s


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: torch.device, num_classes: int,
             dtype: torch.dtype | None = None, info: DistInfo | None = None, mean: Sequence[float] = MEAN,
             std: Sequence[float] = STD) -> SegResult:
    """The confusion matrix, loss and image count over `loader` (summed over all processes when distributed);
    images are normalised with `mean` and `std`."""
    was_training = model.training
    model.eval()
    k = num_classes
    confusion = torch.zeros(k * k, dtype=torch.long, device=device)
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, scored pixels, images
    skipped: list[str] = []
    for images, masks, errors in loader:
        skipped += errors
        if len(masks) == 0:
            continue
        x = normalize(images.to(device, non_blocking=True), mean, std)
        y = masks.to(device, non_blocking=True)
        with autocast(device, dtype):
            logits = model(x)
        logits = logits.float()
        sums[0] += F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX, reduction="sum")
        sums[1] += (y != IGNORE_INDEX).sum()
        sums[2] += len(y)
        confusion_update(confusion, logits.argmax(1), y)
    if info is not None and info.enabled:
        dist.all_reduce(confusion)
        dist.all_reduce(sums)
        gathered: list[list[str]] = [[] for _ in range(info.world)]
        dist.all_gather_object(gathered, skipped)
        skipped = [e for part in gathered for e in part]
    model.train(was_training)
    n = int(sums[2].item())
    if n == 0:
        raise ValueError("nothing to evaluate: the validation split has no readable images")
    return SegResult(confusion=confusion.view(k, k).cpu(), loss=sums[0].item() / max(1.0, sums[1].item()), count=n,
                     skipped=skipped)


def plot_class_iou(result: SegResult, class_names: Sequence[str], path: Path, title: str = "") -> Path:
    """A bar per class (IoU %), classes absent from masks and predictions marked n/a; the mIoU as a line."""
    from ..plots import _pyplot

    plt = _pyplot()
    iou = result.iou
    fig, ax = plt.subplots(figsize=(max(5.0, 0.55 * len(iou) + 2), 4))
    ax.bar(range(len(iou)), [v or 0.0 for v in iou], color="tab:blue")
    for i, v in enumerate(iou):
        ax.text(i, (v or 0.0) + 1, "n/a" if v is None else f"{v:.0f}", ha="center", fontsize=7)
    ax.axhline(result.miou, color="tab:red", ls="--", label=f"mIoU {result.miou:.1f}%")
    ax.set_xticks(range(len(iou)), labels=list(class_names), rotation=45, ha="right")
    ax.set(ylim=(0, 105), ylabel="IoU (%)", title=title or "per-class IoU")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _seg_root(spec: str) -> str:
    from ..data import parse_data

    kind, root = parse_data(spec)
    if kind != "seg":
        raise ValueError(f"segmentation reads --data seg:PATH (PATH/{{train,val}}/images, masks), got {spec!r}")
    return root


# ---------------------------------------------------------------------------------------------------------------
# The task
# ---------------------------------------------------------------------------------------------------------------
@register_task
class Segmentation(Task):
    name = "segmentation"
    score = "val_miou"
    higher_is_better = True
    metrics = ("val_loss", "val_miou", "val_pixel_acc")

    def check(self, micro_batch: int) -> None:
        _seg_root(self.cfg.data)  # (the recipe checked `head` against cvt.recipe.TASK_HEADS)

    # ---- building -------------------------------------------------------------------------------------------
    def build(self, *, state: dict[str, Any] | None, device: torch.device, dist: DistInfo,
              micro_batch: int) -> nn.Module:
        from ..data import default_workers
        from ..datasets import SegFolder, build_loaders, collate_segmentation

        cfg = self.cfg
        root = _seg_root(cfg.data)
        self.img_size = cfg.img_size or DEFAULT_SIZE
        self.train_set = SegFolder(root, "train", size=self.img_size, train=True, seed=cfg.seed)
        self.classes = list(self.train_set.classes)
        # Each image at its own size, one a batch: batched images of other sizes would be padded, and the padding
        # (outside the metrics) would still change the predictions near their edges.
        val_set = SegFolder(root, "val", classes=self.classes)
        if state is not None and self.classes != state["classes"]:
            raise ValueError(f"the run's classes {state['classes'][:4]}... differ from {root}'s {self.classes[:4]}...")
        workers = default_workers(device, dist.world) if cfg.num_workers is None else cfg.num_workers
        self.train, self.val = build_loaders(
            self.train_set, val_set, collate=collate_segmentation, batch_size=micro_batch, eval_batch_size=1,
            rank=dist.rank, world=dist.world, seed=cfg.seed, num_workers=workers,
        )
        if state is not None:
            from ..segmentation import SegmenterConfig

            model = Segmenter(SegmenterConfig.from_dict(state["segmenter"]))
            model.load_state_dict(state["model"])
        else:
            model = segmenter(cfg.model or "cvt_tiny", len(self.classes), cfg.head or "upernet", cfg.pretrained,
                              class_names=self.classes, **cfg.model_args)
        return model.to(device)

    def set_epoch(self, epoch: int, start: int) -> None:
        self.train.batch_sampler.set_epoch(epoch, start)  # also the dataset's: augmentation from (seed, epoch, index)

    def describe(self) -> str:
        return f"{len(self.classes)} classes, {self.img_size} px crops"

    # ---- a training step ------------------------------------------------------------------------------------
    def prepare(self, batch: Any, device: torch.device) -> tuple[Any, int] | None:
        images, masks, _ = batch
        if len(masks) == 0:
            return None
        x = normalize(images.to(device, non_blocking=True))
        return (x, masks.to(device, non_blocking=True)), len(masks)

    def loss(self, net: nn.Module, inputs: Any) -> torch.Tensor:
        x, y = inputs
        logits = net(x).float()  # (B, K, H, W)
        # torch's mean over the scored pixels; a batch whose pixels are all ignored gives 0, not 0/0
        total = F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX, reduction="sum")
        return total / (y != IGNORE_INDEX).sum().clamp(min=1)

    # ---- evaluation and records -----------------------------------------------------------------------------
    def evaluate(self, model: nn.Module, *, device: torch.device, dtype: torch.dtype | None,
                 dist: DistInfo) -> Evaluation:
        r = evaluate(model, self.val, device, len(self.classes), dtype, dist)
        metrics = {"val_loss": round(r.loss, 5), "val_miou": round(r.miou, 3), "val_pixel_acc": round(r.pixel_acc, 3)}
        return Evaluation(metrics=metrics, count=r.count, skipped=r.skipped, detail=r)

    def format_metrics(self, row: dict[str, Any]) -> str:
        return f"val mIoU {row['val_miou']:.2f}% pixel acc {row['val_pixel_acc']:.2f}%"

    def summary(self, final: Evaluation) -> dict[str, Any]:
        r: SegResult = final.detail
        return {
            "img_size": self.img_size, "classes": len(self.classes), "head": self.cfg.head or "upernet",
            "final_miou": round(r.miou, 3), "final_pixel_acc": round(r.pixel_acc, 3), "final_loss": round(r.loss, 5),
            "val_images": r.count, "per_class_iou": _per_class(r, self.classes),
        }

    @classmethod
    def headline(cls, summary: dict[str, Any]) -> str:
        best = cls.best_note(summary, f"{summary.get('best_miou') or 0:.2f}%")
        return (f"final mIoU {summary['final_miou']:.2f}%{best}, pixel accuracy {summary['final_pixel_acc']:.2f}% "
                f"on {summary['val_images']} images")

    def plots(self, history: list[dict[str, Any]], final: Evaluation, out: Path, title: str) -> None:
        from ..plots import plot_curves

        r: SegResult = final.detail
        plot_curves(history, out / "curves.png", {"val_miou": "mIoU", "val_pixel_acc": "pixel accuracy"},
                    ylabel="%", title="validation mIoU")
        plot_class_iou(r, self.classes, out / "per_class_iou.png", f"{title}: mIoU {r.miou:.2f}% on {r.count} images")

    # ---- what the run folder and the checkpoint carry -------------------------------------------------------
    def state(self, model: nn.Module) -> dict[str, Any]:
        return {"segmenter": model.config(), "classes": self.classes}

    def save_weights(self, model: nn.Module, folder: Path) -> None:
        save_segmenter(model, folder, {"img_size": self.img_size, "mean": list(MEAN), "std": list(STD),
                                       "ignore_index": IGNORE_INDEX})

    # ---- inference: `cvt eval` and `cvt predict` ------------------------------------------------------------
    @classmethod
    def load_for_inference(cls, checkpoint: str | Path, device: torch.device) -> tuple[nn.Module, dict]:
        """The segmenter a run saved (RUN, RUN/best or a model.safetensors with its config.json), in eval mode, and
        its config.json (class names, training crop size, normalisation)."""
        return load_segmenter(checkpoint, device)

    @classmethod
    def evaluate_files(cls, model: nn.Module, settings: dict, *, data: str, device: torch.device,
                       dtype: torch.dtype | None, batch_size: int, num_workers: int | None, out: Path) -> dict:
        """`model`'s mIoU, pixel accuracy and per-class IoU on the val split of `data` (seg:PATH), each image at its
        own size (`batch_size` is not used: one image a batch, as in training's evaluation); the bar chart in `out`.
        The report's "table" rows are what `cvt eval` prints; the rest goes to eval.json."""
        from ..datasets import SegFolder, build_loaders, collate_segmentation

        classes = settings.get("class_names") or [f"class_{i}" for i in range(model.num_classes)]
        val_set = SegFolder(_seg_root(data), "val", classes=classes)
        if len(val_set.classes) != len(classes):
            raise ValueError(f"{data} has {len(val_set.classes)} classes, the checkpoint {len(classes)}: evaluate on "
                             "the data it was trained for")
        _, val = build_loaders(None, val_set, collate=collate_segmentation, batch_size=1, eval_batch_size=1,
                               num_workers=num_workers or 0)
        r = evaluate(model, val, device, model.num_classes, dtype, mean=settings.get("mean", MEAN),
                     std=settings.get("std", STD))
        png = plot_class_iou(r, classes, out / "per_class_iou.png", f"mIoU {r.miou:.2f}% on {r.count} images")
        table = [("mIoU (%)", round(r.miou, 3)), ("pixel accuracy (%)", round(r.pixel_acc, 3)),
                 ("loss", round(r.loss, 5))]
        table += [(f"IoU {c} (%)", None if v is None else round(v, 3)) for c, v in zip(classes, r.iou)]
        return {"task": "segmentation", "images": r.count, "miou": round(r.miou, 3),
                "pixel_acc": round(r.pixel_acc, 3), "loss": round(r.loss, 5), "per_class_iou": _per_class(r, classes),
                "classes": classes, "confusion": r.confusion.tolist(), "table": table, "skipped": r.skipped,
                "figures": [str(png)]}

    @classmethod
    def predict_files(cls, model: nn.Module, settings: dict, paths: list[str], *, device: torch.device,
                      score_threshold: float = 0.5, save_dir: Path | None = None) -> list[dict]:
        """Each image's predicted mask at its own size, as per-class pixel fractions; with `save_dir`, the mask as an
        index PNG (DIR/<stem>_mask.png, class indices as in the training masks) and an overlay
        (DIR/<stem>_overlay.png, torchvision's draw_segmentation_masks; the class named "background" undrawn).
        `score_threshold` is detection's: every pixel gets its most probable class."""
        import numpy as np
        from PIL import Image
        from torchvision.utils import draw_segmentation_masks

        from ..datasets.coco import read_rgb_tensor

        k = model.num_classes
        classes = settings.get("class_names") or [f"class_{i}" for i in range(k)]
        mean, std = settings.get("mean", MEAN), settings.get("std", STD)
        if save_dir is not None:
            Path(save_dir).mkdir(parents=True, exist_ok=True)
        records = []
        for path in paths:
            try:
                rgb = read_rgb_tensor(path)  # (3, H, W) uint8
            except Exception as e:  # noqa: BLE001 - one bad file must not stop the others
                records.append({"image": path, "error": str(e).splitlines()[0] if str(e) else type(e).__name__})
                continue
            with torch.no_grad():
                x = normalize(rgb[None].float().div(255).to(device), mean, std)
                pred = model(x)[0].argmax(0).cpu()  # (H, W) class indices
            fractions = torch.bincount(pred.flatten(), minlength=k).double() / pred.numel()
            record: dict[str, Any] = {
                "image": path, "width": int(pred.shape[1]), "height": int(pred.shape[0]),
                "class_fractions": {c: round(float(f), 5) for c, f in zip(classes, fractions) if f > 0},
            }
            if save_dir is not None:
                stem = Path(save_dir) / Path(path).stem
                Image.fromarray(pred.numpy().astype(np.uint8)).save(f"{stem}_mask.png")
                drawn = [i for i in range(k) if classes[i] != "background" and fractions[i] > 0]
                overlay = rgb
                if drawn:
                    masks = pred[None] == torch.tensor(drawn)[:, None, None]  # (N, H, W) bool
                    overlay = draw_segmentation_masks(rgb, masks, alpha=0.5, colors=[_colour(i) for i in drawn])
                Image.fromarray(overlay.permute(1, 2, 0).numpy()).save(f"{stem}_overlay.png")
                record["saved"] = [f"{stem}_mask.png", f"{stem}_overlay.png"]
            records.append(record)
        return records

    @classmethod
    def format_prediction(cls, record: dict) -> str:
        parts = sorted(record["class_fractions"].items(), key=lambda kv: -kv[1])
        text = ", ".join(f"{c} {f * 100:.1f}%" for c, f in parts)
        saved = f" (wrote {', '.join(record['saved'])})" if record.get("saved") else ""
        return f"{record['image']}: {text}{saved}"


def _per_class(r: SegResult, classes: Sequence[str]) -> dict[str, float | None]:
    return {c: None if v is None else round(v, 2) for c, v in zip(classes, r.iou)}


def _colour(i: int) -> tuple[int, int, int]:
    """A fixed colour per class index (matplotlib's tab20)."""
    from matplotlib import colormaps

    r, g, b, _ = colormaps["tab20"](i % 20)
    return int(r * 255), int(g * 255), int(b * 255)
