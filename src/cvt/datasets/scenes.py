"""Fashion-MNIST scenes: a real-data detection and segmentation set that needs no download.

Each canvas holds several Fashion-MNIST items at several scales, tinted, some overlapping (a later item occludes
an earlier one), on clutter: a noisy, shaded background and fragments of other items that are not objects.
Canvases come in several sizes and aspect ratios. Boxes and masks come from the items' own pixels: an item's
object pixels are those it covers more than half (its resized alpha above 0.5), its box and area those it still
shows after occlusion. Train canvases draw items from Fashion-MNIST's train split, val canvases from its test
split only, so no val item was seen in training. Everything is a function of the seed and the canvas index.

Written in both layouts, so `coco:OUT` and `seg:OUT` read the same canvases:

    OUT/annotations/instances_{train,val}.json   COCO: polygons (RLE where the visible part has holes), bbox,
                                                 area, iscrowd 0; categories the 10 names with ids 1..10
    OUT/{train,val}/images/NNNNNN.png            the canvases (COCO file_name "images/NNNNNN.png")
    OUT/{train,val}/masks/NNNNNN.png             index masks: 0 background, 1..10 the items' classes, 255 on
                                                 the items' anti-aliased borders
    OUT/classes.txt                              "background" then the 10 names
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..data import FASHION_MNIST_CLASSES
from ..utils import mix_seed

SIZES = ((96, 96), (128, 96), (96, 128), (128, 128))  # (height, width)
OUTPUTS = ("annotations", "train", "val", "classes.txt")  # what write_scenes owns in OUT
ITEMS_PER_CANVAS = (2, 5)  # inclusive
ITEM_SIDE = (18, 0.6)  # smallest side in pixels, largest as a fraction of the canvas' short side
MIN_VISIBLE = 0.45  # an item occluded beyond this fraction of its pixels is placed elsewhere
FRAGMENTS = (2, 6)  # inclusive


def _resize(item: np.ndarray, side: int) -> np.ndarray:
    """A 28x28 uint8 item as float [0, 1] at side x side (bilinear with antialiasing: PIL's)."""
    from PIL import Image

    img = Image.fromarray(item).resize((side, side), Image.BILINEAR)
    return np.asarray(img, dtype=np.float32) / 255.0


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """`mask` with the background it encloses filled: the background reachable from the border, grown by
    4-neighbour steps, is all that stays background."""
    free = np.pad(~mask, 1)
    outside = np.zeros_like(free)
    outside[0, :] = outside[-1, :] = outside[:, 0] = outside[:, -1] = True
    while True:
        grown = outside.copy()
        grown[1:] |= outside[:-1]
        grown[:-1] |= outside[1:]
        grown[:, 1:] |= outside[:, :-1]
        grown[:, :-1] |= outside[:, 1:]
        grown &= free
        if np.array_equal(grown, outside):
            return ~outside[1:-1, 1:-1]
        outside = grown


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """(h, w, 3) float: a tinted level, a linear shading and pixel noise."""
    level = rng.uniform(0.0, 0.3)
    tint = rng.uniform(0.7, 1.0, 3)
    gy, gx = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    shade = level + rng.uniform(-0.12, 0.12) * gy + rng.uniform(-0.12, 0.12) * gx
    noise = rng.normal(0.0, rng.uniform(0.02, 0.08), (h, w, 3))
    return shade[..., None] * tint + noise


def _paste(canvas: np.ndarray, alpha: np.ndarray, colour: np.ndarray, y: int, x: int) -> None:
    """Blend a (s, s) alpha of `colour` into the canvas at (y, x), cropping what falls outside."""
    h, w = canvas.shape[:2]
    s0, s1 = alpha.shape
    y0, x0, y1, x1 = max(y, 0), max(x, 0), min(y + s0, h), min(x + s1, w)
    if y0 >= y1 or x0 >= x1:
        return
    a = alpha[y0 - y : y1 - y, x0 - x : x1 - x, None]
    region = canvas[y0:y1, x0:x1]
    region[:] = region * (1 - a) + colour * a


def _polygons_or_rle(mask: np.ndarray) -> list | dict:
    """COCO segmentation of a 0/1 mask: polygons along the pixel edges (contourpy's marching squares at 0.5 on
    the zero-padded mask, shifted to COCO's pixel-corner coordinates), or a compressed RLE where the mask has a
    hole (COCO polygons are a union and cannot hold one)."""
    import contourpy
    import pycocotools.mask as mask_utils

    padded = np.pad(mask.astype(np.float64), 1)
    lines = contourpy.contour_generator(z=padded, line_type=contourpy.LineType.Separate).lines(0.5)
    polygons, holes = [], False
    for line in lines:
        x, y = line[:, 0], line[:, 1]
        signed = 0.5 * float(np.sum(x[:-1] * y[1:] - x[1:] * y[:-1]))
        if signed < 0:  # contourpy runs round holes the other way
            holes = True
            break
        if len(line) >= 4:  # closed: the first point repeats; three distinct points at least
            # padded index j + 1 is pixel j, whose centre is j + 0.5 in COCO's coordinates
            polygons.append([round(float(v), 2) for v in (line[:-1] - 0.5).ravel()])
    if holes or not polygons:
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}
    return polygons


def make_canvas(rng: np.random.Generator, images: np.ndarray, labels: np.ndarray,
                sizes: Sequence[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """One scene: uint8 (H, W, 3) pixels, uint8 (H, W) index mask, and its objects (label 0..9, 0/1 visible
    mask) in drawing order."""
    h, w = sizes[rng.integers(len(sizes))]
    canvas = _background(rng, h, w)
    for _ in range(rng.integers(FRAGMENTS[0], FRAGMENTS[1] + 1)):
        # Clutter: a patch of some item, smaller than any object and dimmer, that is no object.
        item = _resize(images[rng.integers(len(images))], int(rng.integers(28, 56)))
        s = int(rng.integers(6, 13))
        py, px = rng.integers(0, item.shape[0] - s, 2)
        patch = item[py : py + s, px : px + s]
        _paste(canvas, np.clip(patch / 0.3, 0, 1) * rng.uniform(0.3, 0.7), rng.uniform(0.2, 1.0, 3) * patch.max(),
               int(rng.integers(-s // 2, h - s // 2)), int(rng.integers(-s // 2, w - s // 2)))

    objects: list[dict] = []
    semantic = np.zeros((h, w), np.uint8)
    largest = max(ITEM_SIDE[0] + 1, int(min(h, w) * ITEM_SIDE[1]))
    for _ in range(rng.integers(ITEMS_PER_CANVAS[0], ITEMS_PER_CANVAS[1] + 1)):
        k = int(rng.integers(len(images)))
        side = int(rng.integers(ITEM_SIDE[0], largest + 1))
        value = _resize(images[k], side)
        alpha = np.clip(value / 0.15, 0, 1)  # opaque garment, anti-aliased at its outline
        # Dark pixels inside the outline are garment too (a black shirt's folds): opaque, and no border there.
        filled = np.pad(_fill_holes(alpha > 0.5), 1)
        inner = filled[1:-1, 1:-1] & filled[:-2, 1:-1] & filled[2:, 1:-1] & filled[1:-1, :-2] & filled[1:-1, 2:]
        alpha[inner] = 1.0
        for _try in range(8):
            y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
            full = np.zeros((h, w), bool)
            full[y : y + side, x : x + side] = alpha > 0.5
            if not full.any():
                break
            # Some overlap, not so much that an earlier item all but disappears.
            if all((o["mask"] & ~full).sum() >= MIN_VISIBLE * o["pixels"] for o in objects):
                break
        else:
            continue
        if not full.any():
            continue
        colour = rng.uniform(0.35, 1.0, 3)
        colour = colour / colour.max() * rng.uniform(0.75, 1.0)
        shaded = np.zeros((h, w, 3))
        a_full = np.zeros((h, w))
        a_full[y : y + side, x : x + side] = alpha
        shaded[y : y + side, x : x + side] = (0.25 + 0.75 * value[..., None]) * colour
        canvas = canvas * (1 - a_full[..., None]) + shaded * a_full[..., None]
        for o in objects:
            o["mask"] &= ~full
        semantic[full] = int(labels[k]) + 1
        semantic[(a_full > 0.05) & (a_full < 0.95)] = 255  # mixed pixels: neither the item nor what it covers
        objects.append({"label": int(labels[k]), "mask": full, "pixels": int(full.sum())})
    objects = [o for o in objects if o["mask"].sum() > 0]
    pixels = np.clip(np.rint(canvas * 255), 0, 255).astype(np.uint8)
    return pixels, semantic, objects


def _fashion_mnist(fmnist_dir, items) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"train": (uint8 (N, 28, 28), labels), "test": ...} from `items` or the IDX files."""
    if items is None:
        from ..data import load_fashion_mnist

        items = {split: load_fashion_mnist(split, fmnist_dir) for split in ("train", "test")}
    out = {}
    for split in ("train", "test"):
        if split not in items:
            raise ValueError(f"items must hold Fashion-MNIST's 'train' and 'test' splits, lacks {split!r}")
        images, labels = (np.asarray(v) for v in items[split])
        images = images.reshape(len(images), *images.shape[-2:]).astype(np.uint8)
        if len(images) == 0 or len(images) != len(labels):
            raise ValueError(f"items[{split!r}]: {len(images)} images, {len(labels)} labels")
        out[split] = images, labels.astype(np.int64)
    return out


def write_scenes(out: str | os.PathLike, *, fmnist_dir=None, seed: int = 0, train_images: int = 2000,
                 val_images: int = 300, sizes: Sequence[tuple[int, int]] = SIZES, items: dict | None = None,
                 overwrite: bool = False) -> dict:
    """Write the scenes to `out` (layouts above) and return their counts: per split the canvases, objects,
    objects per class, and the canvas sizes used.

    `items`: Fashion-MNIST as arrays, `{"train": (images, labels), "test": (images, labels)}` (images uint8
    (N, 28, 28) or (N, 1, 28, 28)), instead of reading the IDX files from `fmnist_dir` (cvt.data's default
    folder when None). A non-empty `out` is refused unless `overwrite`; the scenes are written beside it first
    and moved in at the end, so an interrupted run leaves `out` as it was. With `overwrite`, only what this
    function writes is replaced (annotations/, train/, val/, classes.txt)."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty; pass --overwrite to replace its scenes")
    if train_images < 1 or val_images < 1:
        raise ValueError(f"--train-images and --val-images must be at least 1, got {train_images}, {val_images}")
    for hw in sizes:
        if len(hw) != 2 or min(hw) < 2 * ITEM_SIDE[0]:
            raise ValueError(f"canvas sizes must be (height, width) of at least {2 * ITEM_SIDE[0]} px, got {hw}")
    data = _fashion_mnist(fmnist_dir, items)
    from PIL import Image

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    counts: dict = {}
    try:
        (tmp / "annotations").mkdir(parents=True)
        (tmp / "classes.txt").write_text("\n".join(["background", *FASHION_MNIST_CLASSES]) + "\n")
        for split, source, n, code in (("train", "train", train_images, 1), ("val", "test", val_images, 2)):
            images, labels = data[source]
            for sub in ("images", "masks"):
                (tmp / split / sub).mkdir(parents=True)
            coco_images, annotations = [], []
            per_class = [0] * len(FASHION_MNIST_CLASSES)
            shapes: dict[str, int] = {}
            for i in range(n):
                rng = np.random.default_rng(mix_seed(seed, code, i))
                pixels, semantic, objects = make_canvas(rng, images, labels, sizes)
                h, w = semantic.shape
                name = f"{i:06d}.png"
                Image.fromarray(pixels).save(tmp / split / "images" / name)
                Image.fromarray(semantic).save(tmp / split / "masks" / name)
                coco_images.append({"id": i + 1, "file_name": f"images/{name}", "height": h, "width": w})
                shapes[f"{w}x{h}"] = shapes.get(f"{w}x{h}", 0) + 1
                for o in objects:
                    m = o["mask"]
                    rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
                    x0, y0 = int(cols[0]), int(rows[0])
                    annotations.append({
                        "id": len(annotations) + 1, "image_id": i + 1, "category_id": o["label"] + 1,
                        "bbox": [x0, y0, int(cols[-1]) + 1 - x0, int(rows[-1]) + 1 - y0],
                        "area": int(m.sum()), "iscrowd": 0, "segmentation": _polygons_or_rle(m),
                    })
                    per_class[o["label"]] += 1
            categories = [{"id": c + 1, "name": name, "supercategory": "fashion"}
                          for c, name in enumerate(FASHION_MNIST_CLASSES)]
            coco = {"info": {"description": f"Fashion-MNIST scenes, {split} (items from its {source} split), "
                                            f"seed {seed}"},
                    "images": coco_images, "annotations": annotations, "categories": categories}
            (tmp / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco, separators=(",", ":")))
            counts[split] = {"images": n, "objects": len(annotations), "per_class": per_class,
                             "sizes": dict(sorted(shapes.items()))}
        out.mkdir(parents=True, exist_ok=True)
        for name in OUTPUTS:
            old = out / name
            if old.is_dir():
                shutil.rmtree(old)
            elif old.exists():
                old.unlink()
            os.replace(tmp / name, old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return counts
