"""`cvt tune`: measure the CPU-dependent fast paths on this machine and keep the choice for its CPU model.

Each path in `config.CPU_DEPENDENT` is timed on and off, alternately, in inference and in a training step of the
model and batch the user names (the demo's by default); it is kept on only where its median speed-up is at least 1 in
every measurement. The choice is cached in $XDG_CACHE_HOME/cvt/fast_paths.json under the CPU's model name, the
torch version and the ISA PyTorch dispatches to, and applied at `import cvt` on a machine that matches all three
(the CPU kind's defaults apply elsewhere); `CVT_FAST_PATHS` and `set_fast_paths` still override it.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def cache_path() -> Path:
    from ..utils import cache_dir

    return cache_dir() / "fast_paths.json"


def machine_key() -> str:
    import torch

    from .config import cpu_kind, cpu_model

    return f"{cpu_model()} | torch {torch.__version__} | {cpu_kind()}"


def cached_choice() -> dict[str, bool] | None:
    """This machine's calibrated setting of the CPU-dependent paths, if `cvt tune` has measured it; None otherwise
    (an unreadable cache is ignored: it only ever speeds things up)."""
    from .config import CPU_DEPENDENT

    try:
        entry = json.loads(cache_path().read_text())[machine_key()]
        return {name: bool(entry["paths"][name]) for name in CPU_DEPENDENT}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _seconds_per_call(fn: Callable[[], Any], min_time: float) -> float:
    n, start = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_time:
            return elapsed / n


def _speedup(fn: Callable[[], Any], path: str, rounds: int, min_time: float) -> float:
    """Median over `rounds` alternating pairs of (seconds with `path` off) / (seconds with it on)."""
    from .config import fast_paths

    with fast_paths(**{path: True}):
        fn()
    with fast_paths(**{path: False}):
        fn()
    ratios = []
    for _ in range(rounds):
        with fast_paths(**{path: True}):
            on = _seconds_per_call(fn, min_time)
        with fast_paths(**{path: False}):
            off = _seconds_per_call(fn, min_time)
        ratios.append(off / on)
    return statistics.median(ratios)


def measure(model: str = "cvt_tiny", img_size: int = 28, batch: int = 128, rounds: int = 5,
            min_time: float = 0.5, in_chans: int | None = None) -> dict[str, dict[str, float]]:
    """path -> {measurement: speed-up}, for the CPU-dependent paths, on `model` at `batch` x `img_size`^2."""
    import torch
    import torch.nn.functional as F

    import cvt

    torch.manual_seed(0)
    args = {} if in_chans is None else {"in_chans": in_chans}
    net = cvt.create_model(model, **args)
    x = torch.randn(batch, net.cfg.in_chans, img_size, img_size)
    y = torch.randint(0, net.cfg.num_classes, (batch,))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)

    def infer() -> None:
        net.eval()
        with torch.inference_mode():
            net(x)

    def train_step() -> None:
        net.train()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
        opt.step()

    return {
        "onednn_linear": {"inference": _speedup(infer, "onednn_linear", rounds, min_time),
                          "training step": _speedup(train_step, "onednn_linear", rounds, min_time)},
        "mlp_in_pieces": {"inference": _speedup(infer, "mlp_in_pieces", rounds, min_time)},
    }


def choose(speedups: dict[str, dict[str, float]]) -> dict[str, bool]:
    """On where the path paid (speed-up >= 1) in every measurement of it."""
    return {path: all(v >= 1.0 for v in by.values()) for path, by in speedups.items()}


def save(choice: dict[str, bool], speedups: dict[str, dict[str, float]], workload: dict[str, Any]) -> Path:
    from ..utils import atomic_write

    path = cache_path()
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    cache[machine_key()] = {"paths": choice, "speedups": speedups, "workload": workload,
                            "date": time.strftime("%Y-%m-%d %H:%M")}
    text = json.dumps(cache, indent=2) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text))
    return path
