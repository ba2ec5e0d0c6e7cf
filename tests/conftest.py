"""What the training tests share: a tiny CvT's settings, a generated image folder and fake Fashion-MNIST files.

The constants are imported by the test modules (`from conftest import TINY`); pytest puts tests/ on sys.path."""

from __future__ import annotations

import contextlib
import gzip
import signal
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# benchmarks/ holds scripts, not a package pip installs: the tests import its modules (harness, contestants,
# report, bench) as the scripts import each other, from the folder itself. The one place that puts it on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

# A CvT small enough that a training step takes milliseconds.
TINY = [
    "--model", "cvt_tiny", "--set", "model_args.depths=[1,1,1]", "--set", "model_args.embed_dims=[16,32,64]",
    "--set", "model_args.num_heads=[1,1,2]", "--num-workers", "0",
]
TINY_ARGS = dict(depths=(1, 1, 1), embed_dims=(16, 32, 64), num_heads=(1, 1, 2))
CLASSES = ["bird", "cat", "dog"]


def make_image(rng: np.random.Generator, cls: int, size=(36, 40)) -> np.ndarray:
    arr = rng.integers(0, 80, (*size, 3), dtype=np.uint8)
    arr[..., cls] = 220  # each class its own dominant colour: learnable in a few steps
    return arr


@contextlib.contextmanager
def sigterm_at(epoch: int, step: int):
    """Inside the block, a training run sends itself SIGTERM after optimizer step `step` of (0-based) `epoch`, as
    Ctrl-C or a cluster scheduler would; the progress hook is restored on exit."""
    from cvt import engine

    real_update = engine._Progress.update

    def stop_at(self, at, loss, lr):
        real_update(self, at, loss, lr)
        if self.epoch == epoch and at == step:
            signal.raise_signal(signal.SIGTERM)

    engine._Progress.update = stop_at
    try:
        yield
    finally:
        engine._Progress.update = real_update


@pytest.fixture(autouse=True)
def every_fast_path_on():
    """Each test sees every fast path on, whatever this CPU's defaults turn off (cvt.layers.config.CPU_DEFAULTS:
    CI machines differ), so each path is checked against the reference on every CPU; the setting before the test
    is restored after it."""
    from cvt.layers import fast_paths

    with fast_paths(True):
        yield


@pytest.fixture
def one_thread():
    """Tiny models on a shared 2-core machine: one thread is faster and immune to another process's load, and every
    process of a comparison runs the same thread count. Modules opt in with `pytestmark`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_image_folder(root, seed: int, counts: dict[str, int], classes=CLASSES, size=(36, 40), suffix=".png"):
    """`root/<split>/<class>/<i><suffix>` with counts[split] generated images a class; returns root."""
    rng = np.random.default_rng(seed)
    for split, n in counts.items():
        for c, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(make_image(rng, c, size)).save(d / f"{i}{suffix}")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """train/ (6 images a class, mixed formats and modes, one broken file, one hidden file) and val/ (3 a class)."""
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 3)):
        for c, name in enumerate(CLASSES):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                img = Image.fromarray(make_image(rng, c))
                if i == 1:
                    img.save(d / f"{i}.JPG", quality=90)  # upper-case extension
                elif i == 2:
                    img.convert("RGBA").save(d / f"{i}.png")
                elif i == 3:
                    img.convert("P").save(d / f"{i}.png")
                elif i == 4:
                    Image.fromarray(make_image(rng, c, (5, 7))).save(d / f"{i}.png")  # smaller than the crop
                else:
                    img.save(d / f"{i}.png")
    (root / "train" / "cat" / "broken.jpg").write_bytes(b"this is not a JPEG")
    (root / "train" / "dog" / ".hidden.png").write_bytes(b"ignored: hidden")
    (root / "train" / "dog" / "notes.txt").write_text("ignored: not an image extension")
    return root


def write_idx(path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}i", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def fake_fmnist(tmp_path_factory):
    """The four IDX files of Fashion-MNIST's layout, with 64 training and 20 test images."""
    root = tmp_path_factory.mktemp("fmnist")
    rng = np.random.default_rng(1)
    for split, n in (("train", 64), ("t10k", 20)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 40, (n, 28, 28))
        for i, y in enumerate(labels):
            images[i, 2 * y : 2 * y + 4] = 250  # a bright band whose height encodes the class
        write_idx(root / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{split}-labels-idx1-ubyte.gz", labels)
    return root
