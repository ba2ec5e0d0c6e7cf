"""Semantic segmentation folders (mmsegmentation's layout): `ROOT/{split}/images/*` paired by file stem with
`ROOT/{split}/masks/*.png`, masks single-channel class indices (grey or palette PNG), 255 = ignore; optional
`ROOT/classes.txt`, one name a line, index 0 first.

A folder whose images and masks do not pair up is refused, naming the first unpaired files. A pair that cannot be
used (unreadable, a mask of another size than its image, mask values beyond the classes other than 255) is
skipped and reported, as classification does for an unreadable image: one pair lost, not the run.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..data import IMAGE_EXTENSIONS
from ..utils import mix_seed
from .coco import SPLITS, _reason, read_rgb

IGNORE_INDEX = 255
MASK_MODES = ("L", "P", "I;16", "I")  # single-channel: grey, palette (VOC's), 16/32-bit


def _first(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def scan_pairs(root: Path, split: str) -> list[tuple[Path, Path]]:
    """(image, mask) paths of ROOT/split, paired by stem, in name order; refuses a folder that does not pair."""
    if not root.exists():
        raise FileNotFoundError(f"segmentation folder {root} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"segmentation folder {root} is a file, not a folder (an archive? unpack it)")
    folder = root / split
    for sub in ("images", "masks"):
        if not (folder / sub).is_dir():
            raise FileNotFoundError(f"{root} has no {split}/{sub}/ folder; expected {root}/{split}/images/* "
                                    f"with {root}/{split}/masks/*.png")

    def files(sub: str, exts: set[str]) -> dict[str, Path]:
        found: dict[str, Path] = {}
        for p in sorted((folder / sub).iterdir()):
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in exts:
                if p.stem in found:
                    raise ValueError(f"{folder / sub} has two files named {p.stem}: {found[p.stem].name}, {p.name}")
                found[p.stem] = p
        return found

    images, masks = files("images", IMAGE_EXTENSIONS), files("masks", {".png"})
    if not images:
        raise ValueError(f"{folder / 'images'} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    lonely_images = sorted(images[s].name for s in images.keys() - masks.keys())
    lonely_masks = sorted(masks[s].name for s in masks.keys() - images.keys())
    if lonely_images or lonely_masks:
        parts = []
        if lonely_images:
            parts.append(f"{len(lonely_images)} image(s) without a mask ({_first(lonely_images)})")
        if lonely_masks:
            parts.append(f"{len(lonely_masks)} mask(s) without an image ({_first(lonely_masks)})")
        raise ValueError(f"{folder}: images and masks do not pair up by file name: {'; '.join(parts)}")
    return [(images[s], masks[s]) for s in sorted(images)]


def read_classes(root: Path) -> list[str] | None:
    path = root / "classes.txt"
    if not path.is_file():
        return None
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not names:
        raise ValueError(f"{path} is empty; it should name the classes, one a line, index 0 first")
    if len(names) > IGNORE_INDEX:
        raise ValueError(f"{path} names {len(names)} classes; masks of 8-bit indices with 255 = ignore hold "
                         f"at most {IGNORE_INDEX}")
    return names


def read_mask(path: Path) -> np.ndarray:
    """int64 (H, W) class indices of an index PNG; a colour mask is refused (it holds no indices)."""
    from PIL import Image

    with Image.open(path) as img:
        if img.mode not in MASK_MODES:
            raise ValueError(f"mask mode {img.mode} is not single-channel class indices (L, P or 16-bit)")
        return np.asarray(img).astype(np.int64)


def largest_index(masks: list[Path]) -> int:
    """The largest class index (not 255) in the masks: their histograms, read without holding the masks."""
    from PIL import Image

    top = 0
    for path in masks:
        try:
            with Image.open(path) as img:
                if img.mode in ("L", "P"):
                    hist = img.histogram()[:256]
                    hist[IGNORE_INDEX] = 0
                    present = [i for i, c in enumerate(hist) if c]
                else:
                    values = np.unique(np.asarray(img))
                    present = [int(v) for v in values if v != IGNORE_INDEX]
        except Exception:  # noqa: BLE001 - an unreadable mask is reported when its pair is read
            continue
        if present:
            top = max(top, max(present))
    return top


class SegFolder(Dataset):
    """One split of a segmentation folder as `(image, mask)`: float32 `(3, H, W)` in [0, 1] and int64 `(H, W)`
    class indices, 255 = ignore. A pair that cannot be used gives `(None, "path: reason")`;
    `collate_segmentation` drops and reports it.

    `classes`: ROOT/classes.txt, else `classes` (say, the training split's, for its validation split), else
    "class_0".."class_M" up to the largest index in this split's masks. Training (`train=True`) flips and, with a
    `size`, takes random resized crops of that size (`segmentation_transforms`); evaluation keeps each image's
    own size (`collate_segmentation` pads a batch with ignored pixels). With a `seed`, each item's randomness is
    `mix_seed(seed, epoch, index)`.
    """

    def __init__(self, root: str | Path, split: str, *, size: int | tuple[int, int] | None = None,
                 train: bool = False, seed: int | None = None, transforms: Callable | None = None,
                 classes: list[str] | None = None):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        self.root = Path(root).expanduser()
        self.split, self.train, self.seed, self.epoch = split, train, seed, 0
        self.samples = scan_pairs(self.root, split)
        self.classes: list[str] = (read_classes(self.root) or (list(classes) if classes else None)
                                   or [f"class_{i}" for i in range(largest_index([m for _, m in self.samples]) + 1)])
        self.size = (size, size) if isinstance(size, int) else tuple(size) if size else None
        self.transforms = segmentation_transforms(True, size=self.size) if transforms is None and train else transforms

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, Any]:
        from torchvision import tv_tensors
        from torchvision.transforms.v2 import functional as TF

        image_path, mask_path = self.samples[index]
        try:
            pixels = read_rgb(image_path)
        except Exception as e:  # noqa: BLE001 - any decoder failure means "unreadable"
            return None, f"{image_path}: {_reason(e)}"
        try:
            mask = read_mask(mask_path)
        except Exception as e:  # noqa: BLE001
            return None, f"{mask_path}: {_reason(e)}"
        if mask.shape != pixels.shape[:2]:
            return None, (f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} pixels, its image "
                          f"{image_path.name} {pixels.shape[1]}x{pixels.shape[0]}")
        k = len(self.classes)
        bad = np.unique(mask[(mask >= k) & (mask != IGNORE_INDEX) | (mask < 0)])
        if bad.size:
            return None, (f"{mask_path}: mask values {_first([str(v) for v in bad.tolist()])} are outside the "
                          f"{k} classes (0-{k - 1}) and not {IGNORE_INDEX} (ignore)")
        image = tv_tensors.Image(torch.from_numpy(pixels.copy()).permute(2, 0, 1))  # (H, W, 3) -> (3, H, W)
        target = tv_tensors.Mask(torch.from_numpy(mask))
        if self.transforms is not None:
            with torch.random.fork_rng(devices=[]):  # leave the caller's generator as it was
                if self.seed is not None:
                    torch.manual_seed(mix_seed(self.seed, self.epoch, index))
                image, target = self.transforms(image, target)
        if image.dtype == torch.uint8:
            image = TF.to_dtype(image, torch.float32, scale=True)
        return image.as_subclass(torch.Tensor), target.as_subclass(torch.Tensor).long()


def segmentation_transforms(train: bool, *, size: tuple[int, int] | None = None, hflip: float = 0.5,
                            scale: tuple[float, float] = (0.35, 1.0)):
    """torchvision v2 transforms of `(image, mask)`: for training, a horizontal flip and, with a `size` (H, W),
    a random resized crop of `scale` of the image's area to that size (masks by nearest neighbour, as v2 does for
    `tv_tensors.Mask`). Evaluation: the identity."""
    from torchvision.transforms import v2

    if not train:
        return v2.Identity()
    ops: list = [v2.RandomHorizontalFlip(hflip)] if hflip > 0 else []
    if size is not None:
        ops.append(v2.RandomResizedCrop(size, scale=scale, antialias=True))
    return v2.Compose(ops) if ops else v2.Identity()


def collate_segmentation(batch: list) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """`(B, 3, H, W)` images, `(B, H, W)` int64 masks, and the "path: reason" of unusable pairs. Items of
    different sizes (evaluation keeps each image's own) are padded at the bottom and right to the largest, the
    images with 0 and the masks with 255, so padding counts in no metric."""
    good = [(x, y) for x, y in batch if x is not None]
    errors = [y for x, y in batch if x is None]
    if not good:
        return torch.empty(0, 3, 0, 0), torch.empty(0, 0, 0, dtype=torch.int64), errors
    h = max(x.shape[-2] for x, _ in good)
    w = max(x.shape[-1] for x, _ in good)
    images = torch.zeros(len(good), 3, h, w)
    masks = torch.full((len(good), h, w), IGNORE_INDEX, dtype=torch.int64)
    for i, (x, y) in enumerate(good):
        images[i, :, : x.shape[-2], : x.shape[-1]] = x
        masks[i, : y.shape[-2], : y.shape[-1]] = y
    return images, masks, errors
