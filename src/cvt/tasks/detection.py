"""Object detection and instance segmentation: torchvision's Faster R-CNN / Mask R-CNN / RetinaNet / FCOS over a
CvT (or timm) feature pyramid (`cvt.detection`), trained on COCO-format data (`--data coco:PATH`, `cvt.datasets`).

Batches are `(list of images, list of target dicts, unreadable files)`; the loss is the sum of the torchvision
model's loss dict; evaluation is pycocotools' `COCOeval` over the val split (box AP, and mask AP for Mask R-CNN:
AP, AP50, AP75, AP small/medium/large, per-class AP), predictions mapped back to the file's category ids; best
weights by `val_box_map`. The run folder's model.safetensors + config.json describe the whole detector, so
`cvt eval` and `cvt predict` load it without the recipe.

Inference hooks, which `cvt eval` and `cvt predict` call on the task a checkpoint names (config.json's "task"); every
dense task implements the same three (`cvt.tasks.segmentation` too):

    @classmethod
    def load_for_inference(cls, checkpoint: str | Path, device: torch.device) -> tuple[nn.Module, dict]
        # the model in eval mode on `device`, and its saved settings (config.json: class names, sizes, ...)
    @classmethod
    def evaluate_files(cls, model, settings: dict, *, data: str, device, dtype, batch_size: int,
                       num_workers: int | None, out: Path) -> dict
        # the metrics of `model` on the val split of `data` (a --data spec): a JSON-able report that `cvt eval`
        # writes to out/eval.json (out: RUN/eval, already made); holds "table": (name, value) rows to print,
        # "images", "skipped" ("path: reason" list) and optionally "figures" (paths of PNGs it wrote in `out`)
    @classmethod
    def predict_files(cls, model, settings: dict, paths: list[str], *, device, score_threshold: float,
                      save_dir: Path | None) -> list[dict]
        # one JSON-able record per path (in order): {"image": path, ...predictions...} or {"image": path,
        # "error": "reason"} for an unreadable file; with `save_dir`, each image drawn with its predictions there
    @classmethod
    def format_prediction(cls, record: dict) -> str
        # one line of `cvt predict`'s text output for a record without "error"
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from . import register_task
from .base import DistInfo, Evaluation, Task, autocast

if TYPE_CHECKING:
    from ..recipe import TrainConfig

log = logging.getLogger("cvt.train")

DEFAULT_BACKBONE = "cvt_13"  # strides 4/8/16: the pyramid's P2-P4 (cvt_tiny/cvt_small stop at stride 8)
DEFAULT_HEAD = "fasterrcnn"
# torchvision's detectors are sized for 800-1333 px COCO (256-channel FPN, 1024-wide box head, 512 sampled RoIs,
# 2000 proposals); these fit 96-128 px canvases with 14-56 px items, for both backbones alike. Items become 14-75 px
# at min_size 128, so the RPN's anchors are torchvision's halved (16..256 over P2-P6): its 32 px P2 anchor overlaps
# a 14 px item by IoU 0.19, far under the RPN's 0.7 foreground threshold.
SMALL_DEFAULTS: dict[str, Any] = dict(
    fpn_channels=64, representation_size=256, mask_channels=64, anchor_sizes=(16, 32, 64, 128, 256),
    box_batch_size_per_image=128, rpn_batch_size_per_image=128,
    rpn_pre_nms_top_n_train=600, rpn_post_nms_top_n_train=300, rpn_pre_nms_top_n_test=300,
    rpn_post_nms_top_n_test=150,
)
DEFAULT_MIN_SIZE, DEFAULT_MAX_SIZE = 128, 192
# Settings of the R-CNN family only: RetinaNet and FCOS have no RPN or RoI heads.
_RCNN_ONLY = ("representation_size", "mask_channels", "box_batch_size_per_image", "rpn_batch_size_per_image",
              "rpn_pre_nms_top_n_train", "rpn_post_nms_top_n_train", "rpn_pre_nms_top_n_test",
              "rpn_post_nms_top_n_test")
COCO_STATS = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large")
CONFIG_FORMAT = "cvt-detection"


def coco_root(spec: str) -> Path:
    """PATH of a `coco:PATH` data spec."""
    kind, _, path = spec.partition(":")
    if kind != "coco" or not path:
        raise ValueError(f"detection reads --data coco:PATH (PATH/annotations/instances_train.json), got {spec!r}")
    return Path(os.path.expanduser(path))


def detector_settings(cfg: TrainConfig, num_classes: int) -> dict[str, Any]:
    """`build_detector` arguments for a recipe: the task's small defaults, then the recipe's head_args."""
    head = cfg.head or DEFAULT_HEAD
    args = {k: v for k, v in SMALL_DEFAULTS.items() if head in ("fasterrcnn", "maskrcnn") or k not in _RCNN_ONLY}
    args.update(cfg.head_args)
    args.update(head=head, backbone=cfg.model or ("" if cfg.pretrained else DEFAULT_BACKBONE),
                num_classes=num_classes, min_size=cfg.min_size or DEFAULT_MIN_SIZE,
                max_size=cfg.max_size or DEFAULT_MAX_SIZE)
    if cfg.model_args:
        args["backbone_args"] = dict(cfg.model_args)
    return args


# ---------------------------------------------------------------------------------------------------------------
# COCO evaluation (pycocotools)
# ---------------------------------------------------------------------------------------------------------------
def to_coco_results(output: dict[str, torch.Tensor], image_id: int, cat_ids: list[int], masks: bool) -> list[dict]:
    """One image's detections as COCO result records: bbox [x, y, w, h] in the image's pixels, the file's
    category id, score, and (with `masks`) the mask thresholded at 0.5 as compressed RLE."""
    boxes = output["boxes"].float().cpu()
    if len(boxes) == 0:
        return []
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1).tolist()
    labels, scores = output["labels"].tolist(), output["scores"].float().tolist()
    records = [{"image_id": int(image_id), "category_id": cat_ids[lab - 1], "bbox": [round(v, 2) for v in b],
                "score": round(s, 5)} for b, lab, s in zip(xywh, labels, scores)]
    if masks and "masks" in output:
        for record, rle in zip(records, encode_masks(output["masks"])):
            record["segmentation"] = rle
    return records


def encode_masks(masks: torch.Tensor) -> list[dict]:
    """Mask R-CNN's (N, 1, H, W) probabilities as compressed RLEs (`counts` as text, JSON-able)."""
    from pycocotools import mask as mask_utils

    binary = (masks[:, 0] > 0.5).cpu().numpy().astype(np.uint8)  # (N, H, W)
    rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0)))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def coco_evaluate(coco_gt, results: list[dict], iou_type: str = "bbox", img_ids: list[int] | None = None,
                  category_names: dict[int, str] | None = None) -> dict[str, Any]:
    """pycocotools' COCOeval of `results` against `coco_gt` (crowd regions ignored as COCOeval does), over
    `img_ids` (default all). Returns AP, AP50, AP75, AP small/medium/large (0-1; None where COCO says -1: no
    ground truth of that size) and per-class AP (by name when `category_names` maps the file's ids)."""
    from pycocotools.cocoeval import COCOeval

    img_ids = sorted(coco_gt.getImgIds()) if img_ids is None else sorted(img_ids)
    cat_ids = sorted(coco_gt.getCatIds())
    names = category_names or {c: str(c) for c in cat_ids}
    if not results:  # loadRes refuses an empty list; no detection is AP 0 wherever there is ground truth
        empty = {k: 0.0 for k in COCO_STATS}
        return {**empty, "per_class": {names[c]: 0.0 for c in cat_ids}}
    with contextlib.redirect_stdout(io.StringIO()):  # COCOeval prints its progress and table
        coco_dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, coco_dt, iou_type)
        ev.params.imgIds = img_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = {k: (None if v < 0 else round(float(v), 4)) for k, v in zip(COCO_STATS, ev.stats[:6])}
    # precision: (IoU thresholds, recall points, classes, area ranges, max dets); area "all", 100 detections
    precision = ev.eval["precision"][:, :, :, 0, -1]
    per_class = {}
    for k, c in enumerate(ev.params.catIds):
        p = precision[:, :, k]
        per_class[names[c]] = round(float(p[p > -1].mean()), 4) if (p > -1).any() else None
    return {**stats, "per_class": per_class}


def _plain_targets(targets: list[dict], device: torch.device) -> list[dict[str, torch.Tensor]]:
    """What torchvision's detectors train on: boxes, labels (and masks) as plain tensors on `device`."""
    out = []
    for t in targets:
        d = {"boxes": t["boxes"].as_subclass(torch.Tensor).float().to(device),
             "labels": t["labels"].as_subclass(torch.Tensor).long().to(device)}
        if "masks" in t:
            d["masks"] = t["masks"].as_subclass(torch.Tensor).to(device, torch.uint8)
        out.append(d)
    return out


@torch.no_grad()
def predict_coco(model: nn.Module, loader, device: torch.device, dtype: torch.dtype | None, cat_ids: list[int],
                 masks: bool) -> tuple[list[dict], list[int], list[str]]:
    """COCO result records of `model` over `loader`, the image ids it saw and the unreadable files."""
    was_training = model.training
    model.eval()
    results, seen, skipped = [], [], []
    for images, targets, errors in loader:
        skipped += list(errors)
        pairs = [(x, t) for x, t in zip(images, targets) if x is not None]
        if not pairs:
            continue
        with autocast(device, dtype):
            outputs = model([x.to(device, non_blocking=True) for x, _ in pairs])
        for (_, t), out in zip(pairs, outputs):
            image_id = int(t["image_id"])
            seen.append(image_id)
            results += to_coco_results(out, image_id, cat_ids, masks)
    model.train(was_training)
    return results, seen, skipped


def evaluate_detector(model: nn.Module, loader, coco_gt, *, device: torch.device, dtype: torch.dtype | None,
                      cat_ids: list[int], categories: list[str], masks: bool,
                      info: DistInfo | None = None) -> dict[str, Any]:
    """Box (and mask) COCO AP of `model` on `loader` (each process its share, the predictions gathered and
    scored on every process alike). Returns {"box": {...}, "mask": {...} or None, "count", "skipped"}."""
    results, seen, skipped = predict_coco(model, loader, device, dtype, cat_ids, masks)
    if info is not None and info.enabled:
        parts: list[Any] = [None] * info.world
        dist.all_gather_object(parts, (results, seen, skipped))
        results = [r for p in parts for r in p[0]]
        seen = [i for p in parts for i in p[1]]
        skipped = [e for p in parts for e in p[2]]
    if not seen:
        raise ValueError("nothing to evaluate: the validation split has no readable images")
    names = dict(zip(cat_ids, categories))
    box = coco_evaluate(coco_gt, [{k: v for k, v in r.items() if k != "segmentation"} for r in results], "bbox",
                        seen, names)
    mask = coco_evaluate(coco_gt, results, "segm", seen, names) if masks else None
    return {"box": box, "mask": mask, "count": len(seen), "skipped": skipped}


# ---------------------------------------------------------------------------------------------------------------
# Saving and loading a detector
# ---------------------------------------------------------------------------------------------------------------
def save_detector(model: nn.Module, folder: Path, extra: dict[str, Any]) -> None:
    """model.safetensors + config.json (task, the builder's arguments, class names, category ids, sizes)."""
    from safetensors.torch import save_file

    from ..utils import atomic_write

    folder = Path(folder)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    config = {"format": CONFIG_FORMAT, "task": "detection", "detector": _jsonable(model.detector_config), **extra,
              "weights": "model.safetensors"}
    atomic_write(folder / "model.safetensors",
                 lambda p: save_file(tensors, str(p), metadata={"format": "pt", "task": "detection"}))
    atomic_write(folder / "config.json", lambda p: p.write_text(json.dumps(config, indent=2)))


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(d, default=lambda v: list(v) if isinstance(v, tuple) else str(v)))


def read_detector_config(checkpoint: str | os.PathLike) -> dict[str, Any] | None:
    """config.json of a detection run folder (or beside its model.safetensors); None when it is not one."""
    path = Path(checkpoint)
    cfg_path = (path if path.is_dir() else path.parent) / "config.json"
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) and config.get("task") == "detection" else None


def load_detector(checkpoint: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """The detector a run folder (or its model.safetensors) holds, in eval mode, and its config.json."""
    from ..detection import build_detector
    from ..weights import load_safetensors_into

    config = read_detector_config(checkpoint)
    if config is None:
        raise ValueError(f"{checkpoint} is not a detection run (no config.json with task 'detection' beside it)")
    path = Path(checkpoint)
    weights = path / config.get("weights", "model.safetensors") if path.is_dir() else path
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} does not exist")
    args = dict(config["detector"])
    args["anchor_sizes"] = tuple(args["anchor_sizes"])
    model = build_detector(**args)
    load_safetensors_into(model, weights, "the detector its config.json describes")
    return model.to(device).eval(), config


# ---------------------------------------------------------------------------------------------------------------
# The task
# ---------------------------------------------------------------------------------------------------------------
@register_task
class Detection(Task):
    name = "detection"
    score = "val_box_map"
    higher_is_better = True
    metrics = ("val_box_map", "val_box_map_50", "val_box_map_75")

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        if cfg.model is None and not cfg.pretrained:
            # recorded in recipe.yaml and summary.json as what trained (the loop's own default is classification's)
            cfg.model = DEFAULT_BACKBONE
        self.masks = (cfg.head or DEFAULT_HEAD) == "maskrcnn"
        if self.masks:
            self.metrics = (*type(self).metrics, "val_mask_map", "val_mask_map_50", "val_mask_map_75")

    def check(self, micro_batch: int) -> None:
        coco_root(self.cfg.data)
        unknown = set(self.cfg.head_args) - _BUILDER_KEYS - _TORCHVISION_KEYS
        if unknown:
            raise ValueError(f"head_args: unknown setting(s) {', '.join(sorted(unknown))}; known: "
                             f"{', '.join(sorted(_BUILDER_KEYS | _TORCHVISION_KEYS))}")

    # ---- building -------------------------------------------------------------------------------------------
    def build(self, *, state: dict[str, Any] | None, device: torch.device, dist: DistInfo,
              micro_batch: int) -> nn.Module:
        from ..datasets import CocoDetection, build_loaders, collate_detection, detection_transforms
        from ..detection import build_detector

        cfg, root = self.cfg, coco_root(self.cfg.data)
        self.train_set = CocoDetection(root, "train", transforms=detection_transforms(True, hflip=cfg.hflip),
                                       masks=self.masks, train=True, seed=cfg.seed)
        self.val_set = CocoDetection(root, "val", transforms=detection_transforms(False), masks=self.masks)
        self.categories, self.cat_ids = list(self.train_set.categories), list(self.train_set.cat_ids)
        if state is not None:
            if state["categories"] != self.categories:
                raise ValueError(f"the checkpoint's categories {state['categories'][:4]}... are not the data's "
                                 f"{self.categories[:4]}...")
            args = dict(state["detector"])
            args["anchor_sizes"] = tuple(args["anchor_sizes"])
            model = build_detector(**args)
            model.load_state_dict(state["model"])
        else:
            if list(self.val_set.categories) != self.categories:
                raise ValueError(f"{root}: the val split's categories {self.val_set.categories[:4]}... differ from "
                                 f"the train split's {self.categories[:4]}...")
            args = detector_settings(cfg, len(self.categories) + 1)
            model = build_detector(**args, backbone_weights=cfg.pretrained)
        self.train, self.val = build_loaders(
            self.train_set, self.val_set, collate=collate_detection, batch_size=micro_batch,
            eval_batch_size=max(1, micro_batch), rank=dist.rank, world=dist.world, seed=cfg.seed,
            num_workers=cfg.num_workers if cfg.num_workers is not None else 0,
        )
        for name, n in getattr(self.train_set, "skipped", {}).items():
            if n:
                log.info("train split: %d annotation(s) left out (%s)", n, name.replace("_", " "))
        return model.to(device)

    def set_epoch(self, epoch: int, start: int) -> None:
        self.train.batch_sampler.set_epoch(epoch, start)  # (and the dataset's epoch, for its augmentation seeds)

    def describe(self) -> str:
        c = self.cfg
        return (f"{len(self.categories)} categories, {c.head or DEFAULT_HEAD}, "
                f"{c.min_size or DEFAULT_MIN_SIZE}-{c.max_size or DEFAULT_MAX_SIZE} px")

    # ---- a training step ------------------------------------------------------------------------------------
    def prepare(self, batch: Any, device: torch.device) -> tuple[Any, int] | None:
        images, targets, _ = batch
        pairs = [(x, t) for x, t in zip(images, targets) if x is not None]
        if not pairs:
            return None
        xs = [x.as_subclass(torch.Tensor).to(device, non_blocking=True) for x, _ in pairs]
        return (xs, _plain_targets([t for _, t in pairs], device)), len(xs)

    def loss(self, net: nn.Module, inputs: Any) -> torch.Tensor:
        images, targets = inputs
        losses = net(images, targets)  # torchvision: {"loss_classifier": ..., "loss_box_reg": ..., ...}
        return sum(losses.values())

    # ---- evaluation and records -----------------------------------------------------------------------------
    def evaluate(self, model: nn.Module, *, device: torch.device, dtype: torch.dtype | None,
                 dist: DistInfo) -> Evaluation:
        r = evaluate_detector(model, self.val, self.val_set.coco, device=device, dtype=dtype, cat_ids=self.cat_ids,
                              categories=self.categories, masks=self.masks, info=dist)
        metrics = {f"val_box_{k}": r["box"][k] for k in ("map", "map_50", "map_75")}
        if self.masks:
            metrics.update({f"val_mask_{k}": r["mask"][k] for k in ("map", "map_50", "map_75")})
        return Evaluation(metrics=metrics, count=r["count"], skipped=r["skipped"], detail=r)

    def format_metrics(self, row: dict[str, Any]) -> str:
        text = f"val box mAP {_fmt(row['val_box_map'])} (AP50 {_fmt(row['val_box_map_50'])})"
        if self.masks:
            text += f", mask mAP {_fmt(row['val_mask_map'])}"
        return text

    def summary(self, final: Evaluation) -> dict[str, Any]:
        r = final.detail
        out = {"head": self.cfg.head or DEFAULT_HEAD, "categories": self.categories,
               "min_size": self.cfg.min_size or DEFAULT_MIN_SIZE, "max_size": self.cfg.max_size or DEFAULT_MAX_SIZE,
               "val_images": r["count"]}
        for kind in ("box", "mask"):
            if r[kind] is not None:
                out.update({f"final_{kind}_{k}": r[kind][k] for k in COCO_STATS})
                out[f"per_class_{kind}_ap"] = r[kind]["per_class"]
        return out

    @classmethod
    def headline(cls, summary: dict[str, Any]) -> str:
        text = (f"final box mAP {_fmt(summary['final_box_map'])}, AP50 {_fmt(summary['final_box_map_50'])}"
                f" on {summary['val_images']} images")
        if "final_mask_map" in summary:
            text += f", mask mAP {_fmt(summary['final_mask_map'])}"
        return text + cls.best_note(summary, f"box mAP {_fmt(summary.get('best_box_map'))}")

    def plots(self, history: list[dict[str, Any]], final: Evaluation, out: Path, title: str) -> None:
        from ..plots import plot_curves

        with contextlib.suppress(KeyError, ValueError):  # the curves plot knows classification's columns
            plot_curves(history, out / "curves.png")

    # ---- what the run folder and the checkpoint carry -------------------------------------------------------
    def state(self, model: nn.Module) -> dict[str, Any]:
        return {"detector": _jsonable(model.detector_config), "categories": self.categories}

    def save_weights(self, model: nn.Module, folder: Path) -> None:
        save_detector(model, folder, {"class_names": self.categories, "cat_ids": self.cat_ids})

    # ---- inference hooks (cvt eval, cvt predict) ------------------------------------------------------------
    @classmethod
    def load_for_inference(cls, checkpoint: str | Path, device: torch.device) -> tuple[nn.Module, dict]:
        return load_detector(checkpoint, device)

    @classmethod
    def evaluate_files(cls, model: nn.Module, settings: dict, *, data: str, device: torch.device,
                       dtype: torch.dtype | None, batch_size: int, num_workers: int | None, out: Path) -> dict:
        from ..datasets import CocoDetection, build_loaders, collate_detection, detection_transforms

        masks = settings["detector"]["head"] == "maskrcnn"
        val_set = CocoDetection(coco_root(data), "val", transforms=detection_transforms(False), masks=masks)
        names, ids = settings["class_names"], settings["cat_ids"]
        if list(val_set.categories) != list(names):
            raise ValueError(f"{data} has categories {list(val_set.categories)[:4]}..., the checkpoint "
                             f"{list(names)[:4]}...: evaluate on the data it was trained for")
        _, val = build_loaders(None, val_set, collate=collate_detection, batch_size=1, eval_batch_size=batch_size,
                               num_workers=num_workers or 0)
        r = evaluate_detector(model, val, val_set.coco, device=device, dtype=dtype, cat_ids=ids, categories=names,
                              masks=masks)
        table = []
        for kind in ("box", "mask"):
            if r[kind] is not None:
                table += [(f"{kind} {k.replace('map', 'AP').replace('_', ' ')}", r[kind][k]) for k in COCO_STATS]
        per_class_rows = [(f"box AP {n}", v) for n, v in r["box"]["per_class"].items()]
        return {"task": "detection", "images": r["count"], "box": r["box"], "mask": r["mask"],
                "table": table + per_class_rows, "skipped": r["skipped"]}

    @classmethod
    def predict_files(cls, model: nn.Module, settings: dict, paths: list[str], *, device: torch.device,
                      score_threshold: float = 0.5, save_dir: Path | None = None) -> list[dict]:
        from ..datasets.coco import read_rgb_tensor

        names = settings["class_names"]
        records = []
        for path in paths:
            try:
                x = read_rgb_tensor(path)  # (3, H, W) uint8
            except Exception as e:  # noqa: BLE001 - one bad file must not stop the others
                records.append({"image": path, "error": str(e).splitlines()[0] if str(e) else type(e).__name__})
                continue
            with torch.no_grad():
                out = model([x.to(device).float() / 255])[0]
            keep = out["scores"] >= score_threshold
            out = {k: v[keep].cpu() for k, v in out.items()}
            dets = [{"box": [round(v, 2) for v in b], "class": names[lab - 1], "label": lab, "score": round(s, 4)}
                    for b, lab, s in zip(out["boxes"].tolist(), out["labels"].tolist(), out["scores"].tolist())]
            if "masks" in out:
                for d, rle in zip(dets, encode_masks(out["masks"])):
                    d["mask"] = rle
            records.append({"image": path, "width": x.shape[2], "height": x.shape[1], "detections": dets})
            if save_dir is not None:
                records[-1]["saved"] = str(_draw(x, out, names, Path(save_dir), path))
        return records

    @classmethod
    def format_prediction(cls, record: dict) -> str:
        dets = ", ".join(f"{d['class']} {d['score']:.2f} [{', '.join(f'{v:.0f}' for v in d['box'])}]"
                         for d in record["detections"])
        return f"{record['image']}: {len(record['detections'])} detection(s)" + (f": {dets}" if dets else "")


def _draw(image: torch.Tensor, out: dict[str, torch.Tensor], names: list[str], save_dir: Path, path: str) -> Path:
    """`image` with its boxes (and masks) drawn, as save_dir/<stem>.png."""
    from torchvision.io import write_png
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    drawn = image
    if "masks" in out and len(out["masks"]):
        drawn = draw_segmentation_masks(drawn, out["masks"][:, 0] > 0.5, alpha=0.4)
    labels = [f"{names[lab - 1]} {s:.2f}" for lab, s in zip(out["labels"].tolist(), out["scores"].tolist())]
    drawn = draw_bounding_boxes(drawn, out["boxes"], labels=labels, colors="red", width=1)
    save_dir.mkdir(parents=True, exist_ok=True)
    dst = save_dir / f"{Path(path).stem}.png"
    write_png(drawn, str(dst))
    return dst


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


# head_args keys: build_detector's own, and torchvision's detector arguments (checked here so that a typo is one
# line before anything is built, not a TypeError deep in torchvision).
_BUILDER_KEYS = {"fpn_channels", "representation_size", "mask_channels", "anchor_sizes", "trainable_layers",
                 "frozen_bn"}
_TORCHVISION_KEYS = {
    "image_mean", "image_std", "rpn_pre_nms_top_n_train", "rpn_pre_nms_top_n_test", "rpn_post_nms_top_n_train",
    "rpn_post_nms_top_n_test", "rpn_nms_thresh", "rpn_fg_iou_thresh", "rpn_bg_iou_thresh", "rpn_batch_size_per_image",
    "rpn_positive_fraction", "rpn_score_thresh", "box_score_thresh", "box_nms_thresh", "box_detections_per_img",
    "box_fg_iou_thresh", "box_bg_iou_thresh", "box_batch_size_per_image", "box_positive_fraction",
    "score_thresh", "nms_thresh", "detections_per_img", "fg_iou_thresh", "bg_iou_thresh", "topk_candidates",
    "center_sampling_radius",
}
