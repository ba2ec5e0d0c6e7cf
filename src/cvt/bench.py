"""Transitional: the benchmark moved to the repository's `benchmarks/` (harness.py, contestants.py, report.py,
bench.py). What is left here are the three helpers `benchmarks/ablation.py` still imports from `cvt.bench`; their
home is `benchmarks/harness.py` (`peak_rss_bytes`, `train_step_fn`, `time_per_call`). Delete this module once
ablation.py imports them from there.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_per_call(fn: Callable[[], Any], device: torch.device, min_time: float) -> float:
    """Seconds per call of `fn` (already warm): repeated until `min_time` has passed, at least once."""
    n, start = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        _sync(device)
        elapsed = time.perf_counter() - start
        if elapsed >= min_time:
            return elapsed / n


def _peak_rss_bytes() -> int:
    """This process's peak resident set size (`VmHWM` on Linux: ru_maxrss inherits a forking parent's peak)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB, macOS bytes


def _train_step_fn(model: nn.Module, device: torch.device, dtype: str, batch: int, img_size: int, seed: int = 0):
    """A closure running one training step (forward, cross-entropy, backward, AdamW) of a cvt model on a fixed
    random batch."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, model.cfg.in_chans, img_size, img_size, generator=g).to(device)
    y = torch.randint(0, model.cfg.num_classes, (batch,), generator=g).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    model.train()

    def step() -> None:
        opt.zero_grad(set_to_none=True)  # before the forward, as a training loop does (CUDA graphs' memory pool)
        with torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext():
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    return step
