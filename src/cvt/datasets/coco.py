"""COCO detection and instance segmentation files, as torchvision's detection models take them.

`ROOT/annotations/instances_{split}.json` with images in `ROOT/{split}/` (or torchvision's and COCO's own names,
`instances_{split}2017.json` and `{split}2017/`). What real files hold is read as the reference tools read it:

- category ids are sparse (COCO's run 1-90): they become labels 1..K in id order, 0 being the background that
  torchvision's models reserve; `categories` keeps the names and `cat_ids` the file's ids for predictions;
- segmentations are polygons, uncompressed RLE (`counts` a list, as crowd regions are) or compressed RLE (a
  string), decoded by pycocotools;
- crowd annotations (`iscrowd: 1`) are left out of training targets, as torchvision's reference does, and kept in
  `coco` (the ground truth for `COCOeval`, which ignores detections matched to them);
- images without annotations stay (torchvision's models take empty targets: negatives);
- boxes are clipped to their image; what is left without area (or was degenerate in the file) is dropped.

What cannot be used is counted in `skipped` rather than raised, as long as the file as a whole makes sense; a
file that does not (bad JSON, no images, no categories, no usable annotation) is refused with one line.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..utils import mix_seed

SPLITS = ("train", "val")


# ---------------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------------
def find_coco_files(root: str | Path, split: str) -> tuple[Path, Path]:
    """The annotation file and the image folder of `split`: ours (`instances_train.json`, `train/`) or
    torchvision's/COCO's (`instances_train2017.json`, `train2017/`)."""
    root = Path(root).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"COCO folder {root} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"COCO folder {root} is a file, not a folder (an archive? unpack it)")
    names = [(f"instances_{split}.json", split), (f"instances_{split}2017.json", f"{split}2017")]
    for ann_name, image_dir in names:
        ann = root / "annotations" / ann_name
        if ann.is_file():
            # An annotation file with the other naming's image folder is fine too (a renamed folder).
            folders = [root / image_dir] + [root / d for _, d in names if d != image_dir]
            found = next((f for f in folders if f.is_dir()), None)
            if found is None:
                raise FileNotFoundError(f"{root} has {ann.relative_to(root)} but no image folder {split}/ "
                                        f"(nor {split}2017/)")
            return ann, found
    raise FileNotFoundError(f"{root} has no annotations/instances_{split}.json (nor instances_{split}2017.json)")


def load_json(path: Path) -> Any:
    """A JSON file, or one line saying why it is not one."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.start}): not a COCO annotation file") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        hint = "; the file looks truncated" if e.pos >= len(text.rstrip()) else ""
        raise ValueError(f"{path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}{hint}") from None


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _segmentation_ok(seg: Any, h: int, w: int) -> bool:
    """Whether pycocotools can decode `seg` for an h x w image: polygons with at least 3 points, or an RLE of
    the image's size."""
    if isinstance(seg, list):
        return any(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 and all(map(_number, p)) for p in seg)
    if isinstance(seg, dict):
        size, counts = seg.get("size"), seg.get("counts")
        return (isinstance(size, list) and [int(v) for v in size] == [h, w]
                and isinstance(counts, (str, bytes, list)) and len(counts) > 0)
    return False


def _to_rle(seg: Any, h: int, w: int) -> dict:
    """pycocotools' RLE of a polygon list (merged: COCO polygons are a union), an uncompressed RLE or a
    compressed one."""
    import pycocotools.mask as mask_utils

    if isinstance(seg, list):
        polygons = [p for p in seg if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0]
        return mask_utils.merge(mask_utils.frPyObjects(polygons, h, w))
    if isinstance(seg["counts"], list):
        return mask_utils.frPyObjects(seg, h, w)
    return seg


def decode_mask(seg: Any, h: int, w: int) -> np.ndarray:
    """uint8 (h, w) 0/1 mask of a COCO segmentation (polygons, uncompressed or compressed RLE)."""
    import pycocotools.mask as mask_utils

    return mask_utils.decode(_to_rle(seg, h, w))


def clean_annotations(data: Any, path: Path) -> tuple[dict, dict[str, int]]:
    """The file's content checked and made whole for pycocotools (ids, areas and iscrowd where missing), less
    the annotations it cannot place (unknown image or category, no usable box), with their counts."""
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, not a COCO object with images, "
                         "annotations and categories")
    images, categories, annotations = data.get("images"), data.get("categories"), data.get("annotations", [])
    for key, value in (("images", images), ("categories", categories), ("annotations", annotations)):
        if not isinstance(value, list):
            raise ValueError(f"{path} has no '{key}' list" if value is None else f"{path}: '{key}' is not a list")
    if not images:
        raise ValueError(f"{path} lists no images")
    if not categories:
        raise ValueError(f"{path} lists no categories")
    if not annotations:
        raise ValueError(f"{path} has no annotations at all: nothing to train on or evaluate against")
    sizes: dict[int, tuple[int, int]] = {}
    for i, im in enumerate(images):
        ok = (isinstance(im, dict) and isinstance(im.get("id"), int) and isinstance(im.get("file_name"), str)
              and all(isinstance(im.get(k), int) and im[k] > 0 for k in ("height", "width")))
        if not ok:
            raise ValueError(f"{path}: images[{i}] needs an integer id, a file_name and positive integer height "
                             f"and width, has {json.dumps(im)[:120]}")
        if im["id"] in sizes:
            raise ValueError(f"{path}: image id {im['id']} appears twice (images[{i}])")
        sizes[im["id"]] = (im["height"], im["width"])
    cat_ids: set[int] = set()
    for i, cat in enumerate(categories):
        if not (isinstance(cat, dict) and isinstance(cat.get("id"), int) and isinstance(cat.get("name"), str)):
            raise ValueError(f"{path}: categories[{i}] needs an integer id and a name, has {json.dumps(cat)[:120]}")
        if cat["id"] in cat_ids:
            raise ValueError(f"{path}: category id {cat['id']} appears twice (categories[{i}])")
        cat_ids.add(cat["id"])

    import pycocotools.mask as mask_utils

    skipped = {"unknown_image": 0, "unknown_category": 0, "bad_annotations": 0, "degenerate_boxes": 0}
    kept, seen_ids = [], set()
    next_id = 1 + max((a["id"] for a in annotations if isinstance(a, dict) and isinstance(a.get("id"), int)),
                      default=0)
    for ann in annotations:
        bbox = ann.get("bbox") if isinstance(ann, dict) else None
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(map(_number, bbox))):
            skipped["bad_annotations"] += 1
            continue
        if not isinstance(ann.get("image_id"), int) or ann["image_id"] not in sizes:
            skipped["unknown_image"] += 1
            continue
        if not isinstance(ann.get("category_id"), int) or ann["category_id"] not in cat_ids:
            skipped["unknown_category"] += 1
            continue
        h, w = sizes[ann["image_id"]]
        x, y, bw, bh = bbox
        if min(x + bw, w) - max(x, 0) < 1e-3 or min(y + bh, h) - max(y, 0) < 1e-3:
            # No area, or none inside the image: no target to train on, and a ground truth no detection can
            # match (torchvision's reference evaluates against the targets it trains on, without these).
            skipped["degenerate_boxes"] += 1
            continue
        ann = dict(ann)
        if not isinstance(ann.get("id"), int) or ann["id"] in seen_ids:
            ann["id"], next_id = next_id, next_id + 1  # pycocotools indexes annotations by a unique id
        seen_ids.add(ann["id"])
        ann["iscrowd"] = int(bool(ann.get("iscrowd", 0)))
        seg = ann.get("segmentation")
        if not _number(ann.get("area")):
            ann["area"] = (float(mask_utils.area(_to_rle(seg, h, w))) if _segmentation_ok(seg, h, w)
                           else float(bbox[2] * bbox[3]))  # COCOeval's area ranges read it
        if seg is None:
            # COCOeval's mask evaluation decodes every ground truth: a box-only annotation counts as its box.
            ann["segmentation"] = [[x, y, x + bw, y, x + bw, y + bh, x, y + bh]]
        kept.append(ann)
    if not kept:
        reasons = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in skipped.items() if v)
        raise ValueError(f"{path}: none of its {len(annotations)} annotations is usable ({reasons})")
    cleaned = {k: v for k, v in data.items() if k != "annotations"}
    cleaned["annotations"] = kept
    return cleaned, skipped


def make_coco(dataset: dict):
    """A pycocotools COCO over an in-memory dataset (its index built without printing)."""
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress; library code does not
        coco.createIndex()
    return coco


def read_rgb(path: Path) -> np.ndarray:
    """uint8 (H, W, 3) pixels as stored (no EXIF rotation: COCO's coordinates refer to the stored pixels, as
    torchvision's CocoDetection reads them); grey images repeated to three channels."""
    from PIL import Image

    from ..data import _full_scale, as_8bit

    with Image.open(path) as img:
        img.load()
        return np.asarray(as_8bit(img, _full_scale(img)).convert("RGB"))


def read_rgb_tensor(path: str | Path) -> torch.Tensor:
    """`read_rgb` as a uint8 (3, H, W) tensor: what `cvt predict` of a dense run reads, as training reads it."""
    return torch.from_numpy(read_rgb(Path(path)).copy()).permute(2, 0, 1).contiguous()


def _reason(e: Exception) -> str:
    if isinstance(e, FileNotFoundError):
        return "file not found"
    first = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {first}".rstrip(": ")


# ---------------------------------------------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------------------------------------------
class CocoDetection(Dataset):
    """One split of a COCO dataset as `(image, target)` pairs for torchvision's detection models.

    image: float32 `(3, H, W)` in [0, 1]. target: `boxes` (tv_tensors.BoundingBoxes, XYXY pixels), `labels`
    (int64, 1..K), `masks` (tv_tensors.Mask uint8 `(N, H, W)`, with `masks=True`), `image_id`, `iscrowd` (zeros:
    crowd objects are not training targets), `area`. An image that cannot be read (missing, broken, not the size
    the file says) gives `(None, {"image_id": id, "error": "path: reason"})`; `collate_detection` reports it.

    `transforms` takes and returns `(image, target)` with tv_tensors (torchvision's v2); by default the training
    split (`train=True`) flips and scale-jitters (`detection_transforms`), others are left as they are. With a
    `seed`, each item's randomness is `mix_seed(seed, epoch, index)`: the same in any worker and after a resume.
    """

    def __init__(self, root: str | Path, split: str, *, transforms: Callable | None = None, masks: bool = False,
                 train: bool = False, seed: int | None = None):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        self.root = Path(root).expanduser()
        self.split, self.masks, self.train, self.seed, self.epoch = split, masks, train, seed, 0
        self.ann_file, self.image_dir = find_coco_files(self.root, split)
        dataset, self.skipped = clean_annotations(load_json(self.ann_file), self.ann_file)
        self.coco = make_coco(dataset)
        cats = sorted(self.coco.cats.values(), key=lambda c: c["id"])
        self.cat_ids: list[int] = [c["id"] for c in cats]
        self.categories: list[str] = [c["name"] for c in cats]
        label_of = {cid: i + 1 for i, cid in enumerate(self.cat_ids)}
        self.ids: list[int] = sorted(self.coco.imgs)
        self.transforms = detection_transforms(True) if transforms is None and train else transforms

        # Training targets, decided here (not in workers) so that `skipped` counts every image once.
        self.skipped["crowd"] = 0
        if masks:
            self.skipped["no_segmentation"] = 0
        self._targets: dict[int, list[tuple[list[float], int, Any]]] = {}
        for img_id in self.ids:
            info = self.coco.imgs[img_id]
            h, w = info["height"], info["width"]
            objects = []
            for ann in self.coco.imgToAnns.get(img_id, []):
                if ann["iscrowd"]:
                    self.skipped["crowd"] += 1
                    continue
                x, y, bw, bh = ann["bbox"]
                box = [min(max(x, 0.0), w), min(max(y, 0.0), h), min(max(x + bw, 0.0), w), min(max(y + bh, 0.0), h)]
                seg = ann.get("segmentation")
                if masks and not _segmentation_ok(seg, h, w):
                    self.skipped["no_segmentation"] += 1
                    continue
                objects.append((box, label_of[ann["category_id"]], seg))
            self._targets[img_id] = objects

    @property
    def num_classes(self) -> int:
        """Classes a torchvision detector is built with: the categories and the background."""
        return len(self.categories) + 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, dict]:
        from torchvision import tv_tensors
        from torchvision.transforms.v2 import functional as TF

        img_id = self.ids[index]
        info = self.coco.imgs[img_id]
        h, w = info["height"], info["width"]
        path = self.image_dir / info["file_name"]
        try:
            pixels = read_rgb(path)
        except Exception as e:  # noqa: BLE001 - any decoder failure means "unreadable"
            return None, {"image_id": img_id, "error": f"{path}: {_reason(e)}"}
        if pixels.shape[:2] != (h, w):
            return None, {"image_id": img_id, "error": f"{path}: image is {pixels.shape[1]}x{pixels.shape[0]} "
                                                       f"pixels, {self.ann_file.name} says {w}x{h}"}
        objects = self._targets[img_id]
        image = tv_tensors.Image(torch.from_numpy(pixels.copy()).permute(2, 0, 1))  # (H, W, 3) -> (3, H, W)
        boxes = torch.tensor([o[0] for o in objects], dtype=torch.float32).reshape(-1, 4)
        target: dict[str, Any] = {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(h, w), clamping_mode="hard"),
            "labels": torch.tensor([o[1] for o in objects], dtype=torch.int64),
            "image_id": img_id,
        }
        if self.masks:
            stack = np.stack([decode_mask(o[2], h, w) for o in objects]) if objects else np.zeros((0, h, w))
            target["masks"] = tv_tensors.Mask(torch.from_numpy(stack.astype(np.uint8)))
        if self.transforms is not None:
            with torch.random.fork_rng(devices=[]):  # leave the caller's generator as it was
                if self.seed is not None:
                    torch.manual_seed(mix_seed(self.seed, self.epoch, index))
                image, target = self.transforms(image, target)
        if image.dtype == torch.uint8:
            image = TF.to_dtype(image, torch.float32, scale=True)
        n = len(target["labels"])
        if "masks" in target:
            target["area"] = target["masks"].flatten(1).sum(1).float()
        else:
            b = target["boxes"]
            target["area"] = ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).as_subclass(torch.Tensor).float()
        target["iscrowd"] = torch.zeros(n, dtype=torch.int64)
        return image.as_subclass(torch.Tensor), target


# ---------------------------------------------------------------------------------------------------------------
# Transforms and collate
# ---------------------------------------------------------------------------------------------------------------
def detection_transforms(train: bool, *, hflip: float = 0.5, scale_range: tuple[float, float] = (0.75, 1.25)):
    """torchvision v2 transforms of `(image, target)` that move boxes and masks with the image.

    Training: horizontal flip, then scale jitter by a factor in `scale_range` of the image's own size with a
    random shift (`RandomAffine` without rotation: a zoom in is a random crop of the scaled image, a zoom out
    pads it), on a canvas of the image's size; boxes are clamped to the canvas and those left without area
    dropped with their labels and masks (`SanitizeBoundingBoxes`). The detector's own transform resizes
    afterwards (`min_size`, `max_size`). Evaluation: the identity."""
    from torchvision.transforms import v2

    if not train:
        return v2.Identity()
    lo, hi = scale_range
    if not 0 < lo <= hi:
        raise ValueError(f"scale_range must be 0 < low <= high, got {scale_range}")
    ops: list = []
    if hflip > 0:
        ops.append(v2.RandomHorizontalFlip(hflip))
    if (lo, hi) != (1.0, 1.0):
        # Room to reach the edges of a zoomed-in image, and some shift at any scale.
        shift = min(0.5, max(0.1, (hi - 1) / 2))
        ops.append(v2.RandomAffine(degrees=0.0, translate=(shift, shift), scale=(lo, hi)))
    ops += [v2.ClampBoundingBoxes(), v2.SanitizeBoundingBoxes(min_size=1.0)]
    return v2.Compose(ops)


def collate_detection(batch: list) -> tuple[list[torch.Tensor], list[dict], list[str]]:
    """A batch as torchvision's detectors take it (lists: images differ in size), and the "path: reason" of the
    images that could not be read, for the training loop to report."""
    images, targets, errors = [], [], []
    for image, target in batch:
        if image is None:
            errors.append(target["error"])
        else:
            images.append(image)
            targets.append(target)
    return images, targets, errors
