"""CvT's activations, and how the fused MLP computes each (`ActKernel`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import is_enabled


class QuickGELU(nn.Module):
    """authors: `x * sigmoid(1.702 x)`, the activation the released weights were trained with.

    The same function is `silu(1.702 x) / 1.702`: SiLU is one fused kernel forward and one backward, where the
    authors' formula is three elementwise passes forward and five backward (fast path `quick_gelu_as_silu`).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            if is_enabled("quick_gelu_as_silu"):
                return F.silu(1.702 * x) / 1.702
        return x * torch.sigmoid(1.702 * x)


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def _quick_gelu_(x: torch.Tensor) -> torch.Tensor:
    return x.mul_(torch.sigmoid(1.702 * x))


def _silu_(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x, inplace=True)


def _gelu_(x: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.gelu_(x)


@dataclass(frozen=True)
class ActKernel:
    """An activation written as `act(x) = kernel(scale * x) / scale`, so that an MLP can move `scale` and
    `1 / scale` into its two matmuls and leave the bare kernel on the hidden tensor."""

    scale: float
    kernel: Callable[[torch.Tensor], torch.Tensor]
    kernel_: Callable[[torch.Tensor], torch.Tensor]  # in place (inference only)
    onednn_post: str | None  # the kernel as a oneDNN GEMM post-op, if oneDNN has it


_QUICK_GELU_AS_SILU = ActKernel(1.702, F.silu, _silu_, "swish")  # oneDNN's swish is SiLU
_QUICK_GELU = ActKernel(1.0, _quick_gelu, _quick_gelu_, None)
_GELU = ActKernel(1.0, F.gelu, _gelu_, "gelu")


def act_kernel(act: nn.Module) -> ActKernel | None:
    """How a fused MLP computes `act` (a module the caller checked is as built), or None if it cannot."""
    if type(act) is QuickGELU:
        return _QUICK_GELU_AS_SILU if is_enabled("quick_gelu_as_silu") else _QUICK_GELU
    if type(act) is nn.GELU and act.approximate == "none":
        return _GELU
    return None
