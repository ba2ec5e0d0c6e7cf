"""Fused forwards of CvT's MLP and block: the same arithmetic as the reference forwards in `cvt.model`, in fewer
passes over memory. They read the layers' weights and the activation's kernel directly, so they run only for
as-built layers (`config.as_built`): a LoRA wrapper, a hook or another activation gets the reference forward.

Fast paths used here: `quick_gelu_as_silu`, `recompute_act`, `onednn_linear`, `mlp_in_pieces`, `fused_inference`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from .activations import ActKernel, QuickGELU, act_kernel
from .checkpoint import in_checkpoint
from .config import as_built, eager_inference, fx_tracing, is_enabled
from .linear import Linear, _scaled, onednn_applies, onednn_linear, onednn_linear_add, residual_linear, scaled_linear

# Below this many elements (16 MB in fp32) the activation is not worth recomputing: the memory saved is small and
# the saved-tensor hooks' fixed cost per call shows in the step time of small models.
_RECOMPUTE_MIN_NUMEL = 1 << 22

# Tokens per piece of the MLP in oneDNN inference (`mlp_add_inference`): 1024 rows of CvT-13's widest hidden
# tensor (1536) are 6 MB, which stays in cache (benchmarks/RESULTS.md).
_MLP_ROWS = 1024

_MLP_PATHS = ("quick_gelu_as_silu", "recompute_act", "onednn_linear")


def fusable(mlp: nn.Module) -> ActKernel | None:
    """The activation kernel a fused forward uses for `mlp` (with `fc1`, `act`, `fc2`, `drop`), or None where
    its layers are not as built (a wrapper, a hook, another activation) and the reference forward must run."""
    if not (as_built(mlp.fc1, Linear) and as_built(mlp.fc2, Linear) and as_built(mlp.act, (QuickGELU, nn.GELU))):
        return None
    return act_kernel(mlp.act)


def mlp_kernel(mlp: nn.Module) -> ActKernel | None:
    """`fusable(mlp)` when one of the training-time MLP fast paths is on, else None: nothing to gain, or a tracer
    (torch.fx, TorchScript) records the model, which should see the reference ops (and torch.fx's Proxies cannot
    answer the fused forward's size checks). torch.compile does take it."""
    if fx_tracing() or torch.jit.is_tracing() or not any(is_enabled(p) for p in _MLP_PATHS):
        return None
    return fusable(mlp)


def linear_of_recomputed(linear: Callable[[torch.Tensor], torch.Tensor], fn: Callable[[torch.Tensor], torch.Tensor],
                         h: torch.Tensor) -> torch.Tensor:
    """`linear(fn(h))`, where autograd keeps `h` but not `fn(h)`: backward recomputes `fn(h)` instead.

    Used for the MLP's fc2(act(fc1 x)): the activation's output, 4x the block's width, is the largest tensor a
    block stores for backward, while `h` is stored anyway (the activation's own backward needs it). The result
    and the gradients are the same as without this; it costs one more activation pass in backward.
    """
    a = fn(h)
    dev = h.device.type
    autocast = torch.is_autocast_enabled(dev)
    dtype = torch.get_autocast_dtype(dev) if autocast else a.dtype
    a = a.to(dtype)  # the cast autocast would make inside F.linear, made here so linear saves `a` itself
    ptr = a.untyped_storage().data_ptr()

    def pack(t: torch.Tensor):
        if t.untyped_storage().data_ptr() == ptr:  # linear's input (or a view of it): remember how to remake it
            return t.size(), t.stride(), t.storage_offset()
        return t

    def unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        with torch.no_grad(), torch.autocast(dev, dtype=dtype, enabled=autocast):
            again = fn(h).to(dtype)
        return again.as_strided(*packed)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        return linear(a)


def mlp_forward(mlp: nn.Module, kernel: ActKernel, x: torch.Tensor) -> torch.Tensor:
    """`drop(fc2(drop(act(fc1 x))))` with act(h) = kernel(s h) / s: fc1 computes s h and fc2 takes 1/s, both
    inside their matmuls, so the hidden tensor sees the one fused kernel and nothing else; in training the
    kernel's output is recomputed in backward instead of stored (`recompute_act`). (B, T, C) -> (B, T, C)."""
    s = kernel.scale
    h = scaled_linear(x, mlp.fc1, s, s)  # (B, T, hidden)
    fc2 = functools.partial(scaled_linear, linear=mlp.fc2, alpha=1.0 / s)
    if (
        is_enabled("recompute_act")
        and h.numel() >= _RECOMPUTE_MIN_NUMEL
        and torch.is_grad_enabled()
        and not (mlp.training and mlp.drop.p > 0)
        and not (mlp.checkpointed and in_checkpoint())
        and not torch.compiler.is_compiling()  # the compiler decides for itself what to recompute
    ):
        return mlp.drop(linear_of_recomputed(fc2, kernel.kernel, h))
    return mlp.drop(fc2(mlp.drop(kernel.kernel(h))))


def mlp_add_inference(mlp: nn.Module, kernel: ActKernel, residual: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`residual + mlp(x)`, written into `residual` (a contiguous tensor the caller made), without autograd.

    On oneDNN each fc1 is one GEMM with the activation's kernel as its post-op and each fc2 one GEMM with the
    residual add as its post-op, `_MLP_ROWS` tokens at a time (`mlp_in_pieces`): the 4x-wide hidden tensor is
    made and consumed in cache-sized pieces instead of going to memory and back. Otherwise the kernel runs in
    place on fc1's output and fc2 accumulates into `residual`.
    """
    s = kernel.scale
    fc1, fc2 = mlp.fc1, mlp.fc2
    post = kernel.onednn_post
    if post is None or not onednn_applies(x, fc1.weight) or residual.dtype != torch.float32:
        hidden = kernel.kernel_(scaled_linear(x, fc1, s, s))
        return residual_linear(residual, hidden, fc2, inplace=True, alpha=1.0 / s)
    # kernel(s * fc1(x)) / s = act(fc1(x)): s on fc1's weight and bias, 1 / s on fc2's weight
    w1, b1, w2 = _scaled(fc1.weight, s), _scaled(fc1.bias, s), _scaled(fc2.weight, 1.0 / s)
    rows = x.reshape(-1, x.shape[-1])  # (N, C)
    out = residual.view(-1, residual.shape[-1])  # (N, C), the caller's tensor
    piece = _MLP_ROWS if is_enabled("mlp_in_pieces") else max(1, rows.shape[0])
    for i in range(0, rows.shape[0], piece):
        hidden = onednn_linear(rows[i : i + piece], w1, b1, post)  # (n, 4C), n <= piece
        out[i : i + piece] = onednn_linear_add(hidden, out[i : i + piece], w2, fc2.bias)
    return residual


def block_inference_kernel(block: nn.Module, x: torch.Tensor) -> ActKernel | None:
    """The MLP's activation kernel when `block_inference` may run (the fast path is on, plain eager inference, an
    as-built proj and MLP), else None."""
    if not (is_enabled("fused_inference") and not block.training and eager_inference(x)
            and as_built(block.attn.proj, Linear)):
        return None
    return fusable(block.mlp)


def block_inference(block: nn.Module, kernel: ActKernel, x: torch.Tensor, h: int, w: int,
                    has_cls: bool) -> torch.Tensor:
    """A pre-norm block's inference in fewer passes over memory: each residual add rides on the matmul of the
    branch's last Linear (a oneDNN post-op, or MKL's addmm accumulating into the residual), and the activation is
    fc1's post-op or runs in place. Only tensors made here are written in place; the input `x` is left as it is."""
    y = residual_linear(x, block.attn.attend(block.norm1(x), h, w, has_cls), block.attn.proj, inplace=False)
    return mlp_add_inference(block.mlp, kernel, y, block.norm2(y))
