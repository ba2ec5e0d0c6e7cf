"""Helpers every part of cvt shares: durable file writes and deterministic seeding."""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch


# ---------------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------------
def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Write through a temporary file in the same folder, fsync it, rename it over `path`, fsync the folder: a
    reader, or a process killed at any instant (SIGKILL, power loss), finds the old file or the new one, never half.

    The temporary file is `.NAME.tmpPID`; one that a killed writer left behind (its PID no longer running) is
    removed after the next successful write of NAME, so interrupted runs do not pile up half-written checkpoints."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{_temp_prefix(path)}{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    # The rename lives in the folder's entry: until the folder is on disk, a crash can bring back the old file.
    _fsync_dir(path.parent)
    _remove_stale_temps(path)


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.tmp"


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # Windows cannot open a folder; its rename is as durable as it gets there
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a folder
        pass
    finally:
        os.close(fd)


def _remove_stale_temps(path: Path) -> None:
    prefix = _temp_prefix(path)
    try:
        names = [n for n in os.listdir(path.parent) if n.startswith(prefix)]
    except OSError:
        return
    for name in names:
        pid = name[len(prefix):]
        # A running writer's file is its own business (another process saving the same path right now).
        if pid.isdigit() and int(pid) not in (0, os.getpid()) and _pid_running(int(pid)):
            continue
        try:
            os.unlink(path.parent / name)
        except OSError:  # gone already, or not ours to remove: it harms nothing
            pass


def _pid_running(pid: int) -> bool:
    if os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows: assume it runs
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it runs, as another user
        return True
    return True


def write_text(path: Path, text: str) -> None:
    """`path.write_text(text)`, atomically (`atomic_write`)."""
    atomic_write(path, lambda p: p.write_text(text))


# ---------------------------------------------------------------------------------------------------------------
# Seeds
# ---------------------------------------------------------------------------------------------------------------
def cache_dir() -> Path:
    """cvt's folder for what it keeps between runs (exported ONNX files, `cvt tune`'s choice):
    $XDG_CACHE_HOME/cvt, else ~/.cache/cvt."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "cvt"


def mix_seed(*values: int) -> int:
    """A deterministic 63-bit seed from integers (Python's hash() of tuples is not stable across versions)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = ((h ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (timm's augmentations draw from all three)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
