"""Gradient checkpointing of a block, with a flag that tells its layers when a forward is a recomputation.

BatchNorm must not update its running statistics a second time when `torch.utils.checkpoint` recomputes a
block's forward during backward, or checkpointing would change the model; and the MLP's own activation
recomputation stands aside inside a checkpointed block (nothing is stored there anyway).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

# Set while torch.utils.checkpoint recomputes a block's forward during backward.
_RECOMPUTING: contextvars.ContextVar[bool] = contextvars.ContextVar("cvt_recomputing", default=False)
# Set while a block runs under gradient checkpointing (first pass or recomputation).
_CHECKPOINTED: contextvars.ContextVar[bool] = contextvars.ContextVar("cvt_checkpointed", default=False)


def recomputing() -> bool:
    """This forward is checkpointing's recomputation of a block (read only by layers of checkpointed blocks:
    before torch 2.14 a ContextVar read broke torch.compile's graph)."""
    return _RECOMPUTING.get()


def in_checkpoint() -> bool:
    """This forward runs inside a checkpointed block, first pass or recomputation."""
    return _CHECKPOINTED.get()


@contextlib.contextmanager
def _setting(var: contextvars.ContextVar, value: bool):
    token = var.set(value)
    try:
        yield
    finally:
        var.reset(token)


@contextlib.contextmanager
def _recomputation():
    with _setting(_CHECKPOINTED, True), _setting(_RECOMPUTING, True):
        yield


def _contexts():
    return _setting(_CHECKPOINTED, True), _recomputation()


def checkpoint_block(block: Callable[..., Any], *args: Any) -> Any:
    """`block(*args)` under non-reentrant gradient checkpointing, its forward and recomputation flagged."""
    # Compiled, the recomputation is traced into the graph once and the flags are not needed (and torch.compile
    # accepts only selective-checkpoint contexts there).
    contexts = {} if torch.compiler.is_compiling() else {"context_fn": _contexts}
    return checkpoint(block, *args, use_reentrant=False, **contexts)
