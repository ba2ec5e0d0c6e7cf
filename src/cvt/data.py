"""Data for training and evaluation: Fashion-MNIST from its IDX files, or an image folder.

Both sources hand the training loop uint8 batches `(B, C, H, W)`; `BatchTransform` then does what is cheap on
whole batches on the training device: random shifts and flips of in-memory data, scaling and normalisation,
random erasing (timm). Per-image work on files (decode, RandomResizedCrop, flip, RandAugment) runs in DataLoader
workers with torchvision's `transforms.v2` and timm's RandAugment.

Randomness is a function of (seed, epoch, sample or step), not of worker count or history, so a run resumed at
any step sees the same data, in the same order, with the same augmentation as an uninterrupted one.
"""

from __future__ import annotations

import gzip
import itertools
import math
import os
import re
import signal
import struct
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from .utils import mix_seed, seed_everything

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's package dataset-fashion-mnist
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)  # of the 60,000 training images
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}


# ---------------------------------------------------------------------------------------------------------------
# Preprocessing: what a checkpoint needs to see images the way it was trained (saved as preprocess.json)
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Preprocess:
    img_size: int
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float = 0.875  # evaluation: resize the short side to img_size / crop_pct, centre-crop img_size
    interpolation: str = "bicubic"
    # "center": the above; "squash": resize the whole image to img_size x img_size (the authors' 384 px protocol)
    crop_mode: str = "center"

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocess:
        if d.get("crop_mode", "center") not in ("center", "squash"):
            raise ValueError(f"crop_mode must be center or squash, got {d['crop_mode']!r}")
        return cls(
            img_size=int(d["img_size"]), in_chans=int(d["in_chans"]), mean=tuple(d["mean"]), std=tuple(d["std"]),
            crop_pct=float(d.get("crop_pct", 0.875)), interpolation=str(d.get("interpolation", "bicubic")),
            crop_mode=str(d.get("crop_mode", "center")),
        )

    @classmethod
    def default_for(cls, in_chans: int, img_size: int) -> Preprocess:
        """What cvt's own recipes use: Fashion-MNIST statistics for grey models, ImageNet's for colour ones."""
        mean, std = (FASHION_MNIST_MEAN, FASHION_MNIST_STD) if in_chans == 1 else (IMAGENET_MEAN, IMAGENET_STD)
        if len(mean) != in_chans:
            mean, std = (sum(mean) / len(mean),) * in_chans, (sum(std) / len(std),) * in_chans
        return cls(img_size=img_size, in_chans=in_chans, mean=mean, std=std)


# ---------------------------------------------------------------------------------------------------------------
# Fashion-MNIST
# ---------------------------------------------------------------------------------------------------------------
def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file (MNIST's format: magic 0 0 <type> <ndim>, big-endian int32 sizes, data), gzipped or not."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (bad magic number)")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise ValueError(f"{path} is truncated inside its header ({len(raw)} bytes)")
    shape = struct.unpack(f">{ndim}i", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != math.prod(shape):
        raise ValueError(f"{path} is truncated: header says {shape} ({math.prod(shape)} bytes), found {data.size}")
    return data.reshape(shape)


def find_fashion_mnist(data_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding the four Fashion-MNIST files: `data_dir`, else Debian's /usr/share/datasets/fashion-mnist."""
    folder = Path(data_dir).expanduser() if data_dir else FASHION_MNIST_DIR
    names = [n for pair in FASHION_MNIST_FILES.values() for n in pair]
    missing = [n for n in names if not (folder / n).exists() and not (folder / n[:-3]).exists()]
    if missing:
        where = f"--data-dir {folder}" if data_dir else str(folder)
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {where} (missing {', '.join(missing)}). Install it with "
            "'sudo apt-get install dataset-fashion-mnist' (Debian/Ubuntu; files land in "
            f"{FASHION_MNIST_DIR}), or put the four files from https://github.com/zalandoresearch/fashion-mnist "
            "(data/fashion) in a folder and pass --data-dir FOLDER"
        )
    return folder


def load_fashion_mnist(split: str, data_dir: str | os.PathLike | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images `(N, 1, 28, 28)` and int64 labels `(N,)` of the "train" (60,000) or "test" (10,000) split."""
    folder = find_fashion_mnist(data_dir)

    def pick(name: str) -> Path:
        return folder / name if (folder / name).exists() else folder / name[:-3]

    images_file, labels_file = FASHION_MNIST_FILES[split]
    images, labels = read_idx(pick(images_file)), read_idx(pick(labels_file))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(
            f"Fashion-MNIST {split} files in {folder} disagree: images {images.shape}, labels {labels.shape}"
        )
    if labels.max() >= len(FASHION_MNIST_CLASSES):
        raise ValueError(f"Fashion-MNIST {split} labels in {folder} go up to {labels.max()}; expected 0-9")
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


class TensorImages(Dataset):
    """In-memory uint8 images; indexed by a list of indices, it returns a whole batch (no per-image Python)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        idx = torch.as_tensor(index, dtype=torch.long)
        return self.images[idx], self.labels[idx], []


# ---------------------------------------------------------------------------------------------------------------
# Image folders
# ---------------------------------------------------------------------------------------------------------------
def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def class_folders(root: str | os.PathLike, split: str) -> list[str]:
    """The class names of ROOT/split: its visible sub-folders, sorted."""
    folder = Path(root) / split
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist; expected {folder}/<class>/<image>")
    return [d.name for d in _visible_dirs(folder)]


def scan_image_folder(root: str | os.PathLike, split: str, classes: list[str] | None = None,
                      classes_from: str = "the train split") -> tuple[list[tuple[str, int]], list[str]]:
    """(path, class index) pairs of ROOT/split/<class>/* (any depth below the class folder), and the class names.

    Class names come from the folders of the train split; `classes` (the train split's) checks a val split
    against them. Hidden files and folders are ignored; extensions match case-insensitively.
    """
    root = Path(root)
    folder = root / split
    if not root.exists():
        raise FileNotFoundError(f"image folder {root} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"image folder {root} is a file, not a folder (an archive? unpack it)")
    if not folder.is_dir():
        raise FileNotFoundError(f"{root} has no '{split}' folder; expected {root}/{split}/<class>/<image>")
    found = [d.name for d in _visible_dirs(folder)]
    if not found:
        raise ValueError(f"{folder} has no class folders; expected {folder}/<class>/<image>")
    if classes is None:
        classes = found
    else:
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise ValueError(
                f"{folder} has class folder(s) {classes_from} lacks: {', '.join(unknown[:5])}"
                + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
            )
    samples: list[tuple[str, int]] = []
    for name in found:
        files = []
        for dirpath, dirnames, filenames in os.walk(folder / name, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            files += [
                os.path.join(dirpath, f) for f in sorted(filenames)
                if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS
            ]
        if not files and split == "train":
            raise ValueError(f"class folder {folder / name} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        samples += [(f, classes.index(name)) for f in files]
    if not samples:
        raise ValueError(f"{folder} holds no images")
    return samples, classes


def open_image(path: str | os.PathLike, in_chans: int):
    """A PIL image in the mode the model takes ("L" for 1 channel, "RGB" for 3); raises on unreadable files."""
    from PIL import Image, ImageOps

    with Image.open(path) as img:
        img.load()
        top = _full_scale(img)  # before exif_transpose, whose copy drops the TIFF tags
        img = as_8bit(ImageOps.exif_transpose(img), top)
    if in_chans == 1:
        return img.convert("L")
    img = img.convert("RGB")
    if in_chans == 3:
        return img
    raise ValueError(f"images can be read as 1 or 3 channels, the model takes {in_chans}")


def as_8bit(img, top: float | None):
    """`img` ready for convert("L"/"RGB"): 16/32-bit grey scaled by its format's full range `top` (`_full_scale`;
    PIL's convert clips at 255 instead, and a pixel's brightness must not depend on the brightest pixel of its
    image), palettes expanded (to RGBA, keeping transparency's colour)."""
    from PIL import Image

    if top is not None:
        arr = np.asarray(img, dtype=np.float64)
        return Image.fromarray(np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8), mode="L")
    if img.mode in ("P", "PA"):
        return img.convert("RGBA")
    return img


def _full_scale(img) -> float | None:
    """The value of white in a 16/32-bit grey PIL image (None for other modes)."""
    if img.mode.startswith("I;16"):
        return 65535.0
    if img.mode == "I":
        # Pillow decodes 16-bit PGM (and 16-bit PNG, in older versions) to mode "I" as well, rescaled to 0-65535;
        # only a TIFF that says 32 bits per sample holds 32-bit values (signed: white is 2**31 - 1).
        bits = getattr(img, "tag_v2", {}).get(258)  # TIFF BitsPerSample
        return 2.0**31 - 1 if bits in (32, (32,)) else 65535.0
    if img.mode == "F":
        # Floats carry no range: 0-1 is the common convention; larger values are read as 8- or 16-bit levels.
        top = float(np.nanmax(np.asarray(img))) if img.size[0] * img.size[1] else 0.0
        return 1.0 if top <= 1.0 else 255.0 if top <= 255.0 else 65535.0
    return None


class ImageFiles(Dataset):
    """Images from files through a PIL transform; an unreadable file yields None (the collate drops it and
    reports its path), so one broken file costs one image, not the run."""

    def __init__(self, samples: list[tuple[str, int]], in_chans: int, transform, seed: int | None = None):
        self.samples, self.in_chans, self.transform = samples, in_chans, transform
        self.seed, self.epoch = seed, 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        if self.seed is not None:
            # Augmentation randomness is a function of (seed, epoch, index): the same whatever worker runs it.
            seed_everything(mix_seed(self.seed, self.epoch, index))
        try:
            img = open_image(path, self.in_chans)
        except Exception as e:  # noqa: BLE001 - any decoder failure means "unreadable"
            return None, label, f"{path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
        return self.transform(img), label, None


def collate_skipping(batch: list, refill: bool = False) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Stack the readable images; the errors of the others come along for the training loop to report.
    `refill` (training) repeats readable images of the batch in place of unreadable ones, so batches keep their
    size: pairs for mixup, and equal work for every DDP rank."""
    good = [(x, y) for x, y, err in batch if err is None]
    errors = [err for _, _, err in batch if err is not None]
    if not good:
        return torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.long), errors
    if refill:
        good += [good[i % len(good)] for i in range(len(batch) - len(good))]
    return torch.stack([x for x, _ in good]), torch.tensor([y for _, y in good]), errors


def collate_refilling(batch: list) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    return collate_skipping(batch, refill=True)


def file_transform(pre: Preprocess, train: bool, randaugment: str | None = None, color_jitter: float = 0.0,
                   crop_scale: tuple[float, float] = (0.08, 1.0), hflip: float = 0.5):
    """PIL image -> uint8 tensor `(C, H, W)`: torchvision v2 crops/flips/jitter and timm's RandAugment.
    Scaling, normalisation and random erasing happen later, on the batch (`BatchTransform`)."""
    from torchvision.transforms import v2

    interp = getattr(v2.InterpolationMode, pre.interpolation.upper())
    size = pre.img_size
    if not train and pre.crop_mode == "squash":
        return v2.Compose([v2.Resize((size, size), interpolation=interp), v2.PILToTensor()])
    if not train:
        resize = size if pre.crop_pct >= 1 else int(math.floor(size / pre.crop_pct))
        return v2.Compose([v2.Resize(resize, interpolation=interp), v2.CenterCrop(size), v2.PILToTensor()])
    ops: list = [v2.RandomResizedCrop(size, scale=crop_scale, interpolation=interp)]
    if hflip > 0:
        ops.append(v2.RandomHorizontalFlip(hflip))
    if randaugment:
        from timm.data.auto_augment import rand_augment_transform

        fill = tuple(round(255 * m) for m in pre.mean)
        hparams = dict(translate_const=int(size * 0.45), img_mean=fill if pre.in_chans == 3 else fill[0])
        hparams["interpolation"] = _pil_interpolation(pre.interpolation)
        ops.append(rand_augment_transform(randaugment, hparams))
    elif color_jitter > 0:
        ops.append(v2.ColorJitter(color_jitter, color_jitter, color_jitter))
    ops.append(v2.PILToTensor())
    return v2.Compose(ops)


def _pil_interpolation(name: str) -> int:
    from PIL import Image

    return {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}[name]


# ---------------------------------------------------------------------------------------------------------------
# Batch transforms (on the training device)
# ---------------------------------------------------------------------------------------------------------------
class BatchTransform:
    """uint8 `(B, C0, H0, W0)` -> normalised float `(B, C, S, S)`: channel conversion, resize, and for training
    random shifts/flips (in-memory data; files were augmented per image already) and timm's random erasing.
    Uses the global RNG, which the training loop seeds per step."""

    def __init__(self, pre: Preprocess, train: bool = False, shift: int = 0, hflip: float = 0.0, reprob: float = 0.0):
        self.pre, self.train, self.shift, self.hflip = pre, train, shift, hflip
        self.erasing = None
        if train and reprob > 0:
            from timm.data.random_erasing import RandomErasing

            self.erasing = RandomErasing(reprob, mode="pixel", device="cpu")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.pre
        if self.train and self.shift > 0:
            x = random_shift(x, self.shift)
        if self.train and self.hflip > 0:
            flip = torch.rand(x.shape[0], device=x.device) < self.hflip
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        x = x.float().div_(255)
        if x.shape[1] != pre.in_chans:
            x = _convert_channels(x, pre.in_chans)
        if x.shape[-2:] != (pre.img_size, pre.img_size):
            x = F.interpolate(x, size=(pre.img_size, pre.img_size), mode=pre.interpolation,
                              antialias=pre.interpolation != "nearest", align_corners=None).clamp_(0, 1)
        mean = torch.tensor(pre.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(pre.std, device=x.device).view(1, -1, 1, 1)
        x = (x - mean) / std
        if self.erasing is not None:
            self.erasing.device = x.device
            x = self.erasing(x)
        return x


def random_shift(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Translate each image by its own random offset in [-pad, pad] pixels (zero fill): RandomCrop(padding=pad),
    batched, since torchvision's v2 crops apply one offset to a whole batch."""
    b, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (b, 1), device=x.device)
    ox = torch.randint(0, 2 * pad + 1, (b, 1), device=x.device)
    rows = (oy + torch.arange(h, device=x.device))[:, :, None]  # (B, H, 1)
    cols = (ox + torch.arange(w, device=x.device))[:, None, :]  # (B, 1, W)
    out = padded[torch.arange(b, device=x.device)[:, None, None], :, rows, cols]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def _convert_channels(x: torch.Tensor, in_chans: int) -> torch.Tensor:
    if x.shape[1] == 1:
        return x.expand(-1, in_chans, -1, -1)
    if in_chans == 1 and x.shape[1] == 3:
        weights = torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)  # ITU-R 601, as PIL's "L"
        return (x * weights).sum(1, keepdim=True)
    raise ValueError(f"cannot feed {x.shape[1]}-channel images to a {in_chans}-channel model")


# ---------------------------------------------------------------------------------------------------------------
# Samplers and loaders
# ---------------------------------------------------------------------------------------------------------------
class EpochBatches(Sampler):
    """This process's batches of one epoch: a shuffled shard (DistributedSampler, seeded by seed and epoch) cut
    into batches, optionally starting at batch `start` (a resumed epoch skips what it already did, unread)."""

    def __init__(self, size: int, batch_size: int, rank: int, world: int, seed: int, drop_last: bool = True):
        self.sampler = DistributedSampler(range(size), num_replicas=world, rank=rank, shuffle=True, seed=seed,
                                          drop_last=True)
        self.batch_size, self.drop_last, self.start = batch_size, drop_last, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.sampler.set_epoch(epoch)
        self.start = start

    def __len__(self) -> int:
        n = len(self.sampler)
        full = n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)
        return full - self.start

    def __iter__(self) -> Iterator[list[int]]:
        it = iter(self.sampler)
        batches = iter(lambda: list(itertools.islice(it, self.batch_size)), [])
        for i, batch in enumerate(batches):
            if self.drop_last and len(batch) < self.batch_size:
                return
            if i >= self.start:
                yield batch


class ShardBatches(Sampler):
    """Evaluation: this process's share (every world-th image, no padding or duplicates) in fixed batches."""

    def __init__(self, size: int, batch_size: int, rank: int = 0, world: int = 1):
        self.indices = list(range(rank, size, world))
        self.batch_size = batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.indices) / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        for i in range(0, len(self.indices), self.batch_size):
            yield self.indices[i : i + self.batch_size]


@dataclass
class DataBundle:
    train: DataLoader | None
    val: DataLoader
    train_batches: EpochBatches | None
    train_dataset: Dataset | None
    classes: list[str]
    native_chans: int  # channels of the data as stored (1 for Fashion-MNIST, 3 for image folders)
    native_size: int | None  # side of in-memory images; None for files


def parse_data(spec: str) -> tuple[str, str | None]:
    if spec == "fashion-mnist":
        return "fashion-mnist", None
    for kind in ("imagefolder", "coco", "seg"):
        if spec.startswith(f"{kind}:") and len(spec) > len(kind) + 1:
            # `~` after the colon is not expanded by the shell (nor in a recipe); torchvision's folders expand it
            path = os.path.expanduser(spec[len(kind) + 1 :])
            if kind != "imagefolder" and not Path(path).is_dir():
                what = "COCO folder" if kind == "coco" else "segmentation folder"
                state = "is a file, not a folder" if Path(path).exists() else "does not exist"
                raise FileNotFoundError(f"--data {spec}: {what} {path} {state}")
            return kind, path
    raise ValueError(
        f"--data must be 'fashion-mnist', 'imagefolder:PATH' (PATH/train/<class>/*), 'coco:PATH' "
        f"(PATH/annotations/instances_train.json, PATH/train/) or 'seg:PATH' (PATH/train/images, "
        f"PATH/train/masks), got {spec!r}"
    )


def data_info(spec: str) -> tuple[int, int | None]:
    """(channels, native side) of a data source without reading it: (1, 28) for Fashion-MNIST, (3, None) else
    (image folders, COCO, segmentation folders: colour images of their own sizes)."""
    kind, _ = parse_data(spec)
    return (1, 28) if kind == "fashion-mnist" else (3, None)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader `worker_init_fn`: workers ignore SIGINT and SIGTERM. A terminal's Ctrl-C (or a scheduler's
    SIGTERM) reaches the whole process group; a worker killed by it makes the main process fail with "DataLoader
    worker exited unexpectedly" before it can write its checkpoint. The main process handles the signal and
    shuts the workers down; they also exit by themselves when the main process is gone (PyTorch's watchdog)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def default_workers(device: torch.device, local_world: int = 1) -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    share = max(1, cpus // max(1, local_world))
    # On a GPU the CPUs do nothing else; on a CPU run the workers take cores from the model.
    return min(8, share) if device.type == "cuda" else max(1, share // 2)


SPLIT_SEED = 20260  # fixes the held-out and subset images, whatever the run's seed


def split_training(labels: Sequence[int], holdout: int = 0, fraction: float = 1.0) -> tuple[list[int], list[int]]:
    """Indices (training, held out) of a training set with these labels: `holdout` images held out and `fraction`
    of the rest kept (rounded, at least one of every class).

    Both are taken from the front of one stratified order: the images in a fixed random order (`SPLIT_SEED`, not
    the run's seed, so every seed and model sees the same images), each image of a class scored by its rank in
    the class over the class's size, sorted by score. Any front of that order holds each class in proportion to its
    size (within one image) and every class's first image, and a smaller fraction's images lie inside a larger
    one's."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    n = len(labels)
    if not 0 <= holdout < n:
        raise ValueError(f"holdout {holdout} must leave training images: the training split has {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    ordered = _stratified(order, labels)
    held, rest = ordered[:holdout], _stratified(ordered[holdout:], labels)
    if holdout and len(labels[rest].unique()) < len(labels.unique()):
        raise ValueError(f"holdout {holdout} leaves a class no training image: hold fewer images out")
    keep = max(round(fraction * len(rest)), len(labels[rest].unique()))
    return sorted(rest[:keep].tolist()), sorted(held.tolist())


def _stratified(indices: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`indices` reordered by (rank within its class) / (class size), ties and each class's order kept."""
    score = torch.empty(len(indices), dtype=torch.float64)
    classes = labels[indices]
    for c in classes.unique():
        members = (classes == c).nonzero().flatten()
        score[members] = torch.arange(len(members), dtype=torch.float64) / len(members)
    return indices[torch.sort(score, stable=True).indices]


def build_data(
    spec: str,
    pre: Preprocess,
    *,
    data_dir: str | None = None,
    train: bool = True,
    batch_size: int = 128,
    eval_batch_size: int = 256,
    num_workers: int | None = None,
    device: torch.device = torch.device("cpu"),
    rank: int = 0,
    world: int = 1,
    seed: int = 0,
    randaugment: str | None = None,
    color_jitter: float = 0.0,
    crop_scale: tuple[float, float] = (0.08, 1.0),
    hflip: float = 0.5,
    classes: Sequence[str] | None = None,
    holdout: int = 0,
    train_fraction: float = 1.0,
) -> DataBundle:
    """Loaders of uint8 batches: the training split (when `train`) sharded over `world` processes, and the
    validation split (Fashion-MNIST's 10,000 test images, or PATH/val; with `holdout`, that many training images,
    `split_training`'s). `batch_size` is per process. `classes` (a checkpoint's class names) fixes the label
    order; an image folder's val split may hold a subset."""
    kind, root = parse_data(spec)
    pin = device.type == "cuda"
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if kind == "fashion-mnist":
        workers = 0 if num_workers is None else num_workers  # indexing a tensor needs no workers
        if train and (holdout or train_fraction != 1):
            images, labels = load_fashion_mnist("train", data_dir)
            keep, held = split_training(labels, holdout, train_fraction)
            train_ds = TensorImages(images[keep], labels[keep])
            val_ds = TensorImages(images[held], labels[held]) if holdout else TensorImages(
                *load_fashion_mnist("test", data_dir))
        else:
            train_ds = TensorImages(*load_fashion_mnist("train", data_dir)) if train else None
            val_ds = TensorImages(*load_fashion_mnist("test", data_dir))
        if classes is not None and list(classes) != FASHION_MNIST_CLASSES:
            raise ValueError(f"the checkpoint's classes {list(classes)[:4]}... are not Fashion-MNIST's")
        init = ignore_stop_signals if workers else None
        val = DataLoader(val_ds, sampler=ShardBatches(len(val_ds), eval_batch_size, rank, world), batch_size=None,
                         num_workers=workers, pin_memory=pin, worker_init_fn=init)
        train_loader = batches = None
        if train:
            batches = EpochBatches(len(train_ds), batch_size, rank, world, seed)
            train_loader = DataLoader(train_ds, sampler=batches, batch_size=None, num_workers=workers, pin_memory=pin,
                                      worker_init_fn=init)
        return DataBundle(train_loader, val, batches, train_ds, list(FASHION_MNIST_CLASSES), 1, 28)

    workers = default_workers(device, local_world) if num_workers is None else num_workers
    if train:
        train_samples, found = scan_image_folder(root, "train")
        if classes is not None and found != list(classes):
            raise ValueError(f"{root}/train has classes {found[:5]}..., expected {list(classes)[:5]}...")
        classes = found
    from_checkpoint = classes is not None and not train
    if classes is None:
        classes = class_folders(root, "train" if (Path(root) / "train").is_dir() else "val")
    if train and (holdout or train_fraction != 1):
        keep, held = split_training([label for _, label in train_samples], holdout, train_fraction)
        val_samples = [train_samples[i] for i in held]
        train_samples = [train_samples[i] for i in keep]
    if not (train and holdout):
        val_samples, _ = scan_image_folder(root, "val", list(classes),
                                           "the checkpoint" if from_checkpoint else "the train split")
    common = dict(num_workers=workers, pin_memory=pin, collate_fn=collate_skipping,
                  worker_init_fn=ignore_stop_signals if workers else None)
    val_ds = ImageFiles(val_samples, pre.in_chans, file_transform(pre, train=False))
    val = DataLoader(val_ds, batch_sampler=ShardBatches(len(val_ds), eval_batch_size, rank, world), **common)
    train_loader = batches = train_ds = None
    if train:
        tf = file_transform(pre, True, randaugment, color_jitter, crop_scale, hflip)
        train_ds = ImageFiles(train_samples, pre.in_chans, tf, seed)
        if len(train_ds) < batch_size * world:
            raise ValueError(
                f"{root}/train has {len(train_ds)} images, fewer than one batch of {batch_size * world}: "
                "lower --batch-size"
            )
        batches = EpochBatches(len(train_ds), batch_size, rank, world, seed)
        train_loader = DataLoader(train_ds, batch_sampler=batches, **{**common, "collate_fn": collate_refilling})
    return DataBundle(train_loader, val, batches, train_ds, list(classes), 3, None)


def set_epoch(bundle: DataBundle, epoch: int, start: int = 0) -> None:
    """Shuffle for `epoch` and skip its first `start` batches (resuming mid-epoch)."""
    bundle.train_batches.set_epoch(epoch, start)
    if isinstance(bundle.train_dataset, ImageFiles):
        bundle.train_dataset.epoch = epoch


def preprocess_for(checkpoint: str | os.PathLike, in_chans: int, img_size: int | None = None,
                   default_size: int = 224) -> Preprocess:
    """How to feed images to a checkpoint: the preprocess.json a training run wrote beside it, else cvt's
    defaults for its channel count; `img_size` overrides the side (resolution is free for CvT)."""
    import json

    path = Path(checkpoint)
    beside = (path if path.is_dir() else path.parent) / "preprocess.json"
    if beside.is_file():
        try:
            pre = Preprocess.from_dict(json.loads(beside.read_text()))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{beside} is not a valid preprocessing record: {e}") from None
        if pre.in_chans != in_chans:
            raise ValueError(f"{beside} describes {pre.in_chans}-channel input, the model takes {in_chans}")
    else:
        # A file from elsewhere: the side it was trained at where it says (transformers' preprocessor_config.json,
        # the authors' file names `CvT-13-384x384-IN-1k.pth`), and the authors' evaluation protocol: resize
        # and centre-crop 87.5% below 384 px, resize the whole image to size x size (no crop) at 384 and above.
        size = img_size or _native_size(path) or default_size
        pre = Preprocess.default_for(in_chans, size)
        if size >= 384:
            pre = Preprocess(size, in_chans, pre.mean, pre.std, 1.0, pre.interpolation, "squash")
    if img_size is not None:
        if img_size < 1:
            raise ValueError(f"--img-size must be a positive number of pixels, got {img_size}")
        pre = Preprocess(img_size, pre.in_chans, pre.mean, pre.std, pre.crop_pct, pre.interpolation, pre.crop_mode)
    return pre


def _native_size(checkpoint: Path) -> int | None:
    """The image side a foreign checkpoint was trained at, where it says; None where it does not."""
    import json

    hf = (checkpoint if checkpoint.is_dir() else checkpoint.parent) / "preprocessor_config.json"
    if hf.is_file():
        try:
            size = json.loads(hf.read_text()).get("size")
        except (OSError, ValueError, AttributeError):
            size = None
        side = size.get("shortest_edge", size.get("height")) if isinstance(size, dict) else size
        if isinstance(side, int) and side > 0:
            return side
    named = re.search(r"(?<![A-Za-z0-9])(\d{2,4})x\1(?![A-Za-z0-9])", checkpoint.name)  # "-384x384-", "_32x32."
    return int(named.group(1)) if named else None
