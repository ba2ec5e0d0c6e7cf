"""Convolutional Vision Transformer (Wu et al., "CvT: Introducing Convolutions to Vision Transformers", ICCV 2021).

Read top to bottom: primitives -> convolutional token embedding -> convolutional attention -> block -> stage ->
the model (classifier and backbone in one class). Behaviour follows the authors' `lib/models/cls_cvt.py`,
quirks included (each is marked "authors:"), so their released weights give their published accuracy.

Layouts: images and feature maps are NCHW `(B, C, H, W)`; token sequences are `(B, T, C)` with `T = H * W`
(plus one cls token in front in the last stage).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import CvTConfig


# ---------------------------------------------------------------------------------------------------------------
# Primitives
# ---------------------------------------------------------------------------------------------------------------
class QuickGELU(nn.Module):
    """authors: `x * sigmoid(1.702 x)`, the activation the released weights were trained with.

    The same function is `silu(1.702 x) / 1.702`, and SiLU is one fused kernel forward and one backward, where
    the authors' formula is three elementwise passes forward and five backward. The MLP moves the two scales
    into its matmuls (`Mlp.forward`), which leaves a bare SiLU on the hidden tensor.
    """

    scale = 1.702  # the activation is kernel(scale * x) / scale
    kernel = staticmethod(F.silu)
    onednn_post = "swish"  # the kernel as a oneDNN GEMM post-op (oneDNN's swish is SiLU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.scale * x) / self.scale

    @staticmethod
    def kernel_(x: torch.Tensor) -> torch.Tensor:
        """`kernel` in place on `x` (inference only)."""
        return F.silu(x, inplace=True)


class GELU(nn.GELU):
    scale = None  # exact GELU is a fused kernel as it is: nothing to fold
    kernel = staticmethod(F.gelu)
    onednn_post = "gelu"

    @staticmethod
    def kernel_(x: torch.Tensor) -> torch.Tensor:
        """`kernel` in place on `x` (inference only)."""
        return torch.ops.aten.gelu_(x)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 and cast back (authors: their subclass upcasts so fp16/bf16 runs stay stable)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        # Autocast would run layer_norm in fp32 anyway on CUDA, but not on every device: do it explicitly.
        with torch.autocast(device_type=x.device.type, enabled=False):
            out = F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps)
        return out.to(x.dtype)


def _make_act(name: str) -> nn.Module:
    return QuickGELU() if name == "quick_gelu" else GELU()


# Set while torch.utils.checkpoint recomputes a block's forward during backward. BatchNorm must not update its
# running statistics a second time then, or gradient checkpointing would change the model.
_RECOMPUTING: contextvars.ContextVar[bool] = contextvars.ContextVar("cvt_recomputing", default=False)
# Set while a block runs under gradient checkpointing (first pass or recomputation): it stores nothing then,
# so the MLP's own activation recomputation (`_linear_of_recomputed`) stands aside.
_CHECKPOINTED: contextvars.ContextVar[bool] = contextvars.ContextVar("cvt_checkpointed", default=False)


@contextlib.contextmanager
def _setting(var: contextvars.ContextVar, value: bool):
    token = var.set(value)
    try:
        yield
    finally:
        var.reset(token)


@contextlib.contextmanager
def _recomputing():
    with _setting(_CHECKPOINTED, True), _setting(_RECOMPUTING, True):
        yield


def _checkpoint_contexts():
    return _setting(_CHECKPOINTED, True), _recomputing()


# Below this many elements (16 MB in fp32) the activation is not worth recomputing: the memory saved is small and
# the saved-tensor hooks' fixed cost per call shows in the step time (cvt_tiny at batch 128: 1.6-4.5% slower with
# them). CvT-13 at batch 32 has 9.7M-25.7M elements per MLP hidden, well above.
_RECOMPUTE_MIN_NUMEL = 1 << 22


def _linear_of_recomputed(linear: Callable[[torch.Tensor], torch.Tensor], fn, h: torch.Tensor) -> torch.Tensor:
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


def _tracing_or_compiling() -> bool:
    """A tracer, TorchScript, torch.compile or torch.export is recording the model: it should see ordinary,
    out-of-place ops."""
    return (
        torch.jit.is_tracing()
        or torch.jit.is_scripting()
        or torch.compiler.is_compiling()
        or torch.compiler.is_exporting()
    )


def _eager_inference(x: torch.Tensor) -> bool:
    """True for plain eager inference, where in-place tricks are safe: no autograd, no autocast (whose casts the
    fused path would bypass), and no tracer or compiler (which want out-of-place ops)."""
    return not (torch.is_grad_enabled() or torch.is_autocast_enabled(x.device.type) or _tracing_or_compiling())


# oneDNN's fp32 GEMM, which PyTorch's own CPU Linear does not use (addmm goes to MKL). On this project's AMD EPYC
# (Zen 4, AVX-512) it ran CvT-13's Linear shapes at 1.0-1.9x MKL's rate (a (6304, 384) x (384, 384) projection:
# 93 against 57 GMAC/s; `python benchmarks/gemm.py`, figures in benchmarks/RESULTS.md), and it fuses the MLP's
# activation and the residual add into the GEMM. Exact fp32 (no reduced-precision math mode): the parity tests hold.
_LINEAR_POINTWISE = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None


_PEEK_FUNCTORCH = getattr(torch._C._functorch, "peek_interpreter_stack", None)


def _functorch_active() -> bool:
    """Inside a torch.func transform (grad, vmap, jacrev...), which our autograd Functions do not support: the
    model then runs on ordinary ops (per-sample gradients with torch.func keep working)."""
    return _PEEK_FUNCTORCH is not None and _PEEK_FUNCTORCH() is not None


def _onednn_linear_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `x @ weight.T` may run through oneDNN: fp32 on CPU, outside autocast (which would want its own
    casts), outside tracers and compilers (which should see ordinary ops: ONNX export, torch.compile) and outside
    torch.func transforms."""
    return (
        _LINEAR_POINTWISE is not None
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and not _tracing_or_compiling()
        and not _functorch_active()
    )


def _scaled(t: torch.Tensor | None, s: float) -> torch.Tensor | None:
    """`t * s`, or `t` itself when there is nothing to scale (s = 1, or no tensor: a Linear without bias)."""
    return t * s if t is not None and s != 1.0 else t


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, post: str = "none") -> torch.Tensor:
    """`post(x @ weight.T + bias)` in one oneDNN call, post one of "none", "swish" (SiLU), "gelu" (exact)."""
    return _LINEAR_POINTWISE(x, weight, bias, post, [], "none" if post == "gelu" else "")


# Tokens per piece of the MLP in oneDNN inference (`Mlp.add_to_inference`): 1024 rows of CvT-13's widest hidden
# tensor (1536) are 6 MB. 512 to 4096 all measured 7-30% faster than whole tensors at batch 32; 1024 was best or
# near it in every stage.
_MLP_ROWS = 1024

# Below this many tokens (rows) the input gradient goes through MKL: the transposed weight's copy that oneDNN
# needs costs more than its faster GEMM gains (CvT-13's stage 3 at batch 1, 197 tokens: 73 against 94 GMAC/s).
_ONEDNN_GRAD_MIN_TOKENS = 2048


class _OneDNNLinear(torch.autograd.Function):
    """`x @ weight.T + bias` with the forward and the input gradient through oneDNN (both are (N, K) x (K, M)
    products, which it runs faster here for N in the thousands) and the weight gradient through MKL (a (M, N) x
    (N, K) product, for which PyTorch has no oneDNN entry point). The tensors it saves go through any saved-tensor
    hooks, as built-in ops' do (the MLP's activation recomputation relies on that)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return _onednn_linear(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        flat = grad.reshape(-1, grad.shape[-1])  # (N, M)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:  # (N, M) x (M, K)
            if flat.shape[0] >= _ONEDNN_GRAD_MIN_TOKENS:
                grad_x = _onednn_linear(flat, weight.t().contiguous(), None).view(x.shape)
            else:  # few tokens: the transposed weight's copy costs more than oneDNN gains (benchmarks/gemm.py)
                grad_x = flat.mm(weight).view(x.shape)
        if ctx.needs_input_grad[1]:
            grad_w = flat.t().mm(x.reshape(-1, x.shape[-1]))  # (M, N) x (N, K)
        if ctx.needs_input_grad[2]:  # False for a Linear without bias
            grad_b = flat.sum(0)
        return grad_x, grad_w, grad_b


def _scaled_linear(x: torch.Tensor, linear: nn.Linear, alpha: float = 1.0, beta: float = 1.0) -> torch.Tensor:
    """`alpha * x @ W.T + beta * b` for `linear`'s W and b.

    Without autograd on MKL the scales ride inside the matmul (free in the GEMM). With autograd, addmm's backward
    would apply alpha and beta as extra passes over its (N, C_in) and (N, C_out) gradients, the size of the
    activations; scaling W and b instead costs passes the size of the weight (CvT-13's QuickGELU training step:
    329 ms of `mul` per batch of 32). oneDNN takes no scales: it gets the scaled W and b."""
    flat = x.reshape(-1, x.shape[-1])  # (..., C_in) -> (N, C_in)
    onednn = _onednn_linear_ok(x, linear.weight)
    grad = torch.is_grad_enabled()
    if onednn or (grad and (alpha != 1.0 or beta != 1.0) and linear.weight.shape[0] < flat.shape[0]):
        weight, bias = _scaled(linear.weight, alpha), _scaled(linear.bias, beta)
        if onednn:
            # the Function under autograd whatever requires grad (bias-only fine-tuning: neither x nor W does)
            return _OneDNNLinear.apply(x, weight, bias) if grad else _onednn_linear(x, weight, bias)
        out = torch.mm(flat, weight.t()) if bias is None else torch.addmm(bias, flat, weight.t())
    elif linear.bias is None:
        out = torch.mm(flat, linear.weight.t()) * alpha
    else:
        out = torch.addmm(linear.bias, flat, linear.weight.t(), beta=beta, alpha=alpha)
    return out.view(*x.shape[:-1], out.shape[-1])


def _linear(x: torch.Tensor, linear: nn.Module) -> torch.Tensor:
    """`linear(x)`, through `_scaled_linear`'s faster paths when `linear` is an as-built nn.Linear."""
    return _scaled_linear(x, linear) if _as_built(linear, nn.Linear) else linear(x)


def _residual_linear(
    residual: torch.Tensor, x: torch.Tensor, linear: nn.Linear, inplace: bool, alpha: float = 1.0
) -> torch.Tensor:
    """`residual + alpha * x @ W.T + b` as one matmul accumulating into the residual (inference only;
    `inplace` may write into `residual` itself)."""
    if _onednn_linear_ok(x, linear.weight) and residual.dtype == torch.float32:
        return _LINEAR_POINTWISE.binary(x, residual, _scaled(linear.weight, alpha), linear.bias, "add")  # a new tensor
    if inplace:
        out = residual.add_(linear.bias) if linear.bias is not None else residual
    else:
        out = residual + linear.bias if linear.bias is not None else residual.clone()
        out = out.contiguous()
    flat = out.view(-1, out.shape[-1])
    # addmm with out= aliasing its input: the same kernel as addmm_, but MAC counters see an addmm
    torch.addmm(flat, x.reshape(-1, x.shape[-1]), linear.weight.t(), alpha=alpha, out=flat)
    return out


def _as_built(module: nn.Module, kind: type | tuple[type, ...]) -> bool:
    """`module` is exactly `kind` (not a subclass or a wrapper such as LoRA's) and nothing hooks its forward: the
    fused paths read its weights or its kernel directly, which would bypass a wrapper, a hook or a pruning mask."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return (
        type(module) in kinds
        and not module._forward_hooks
        and not module._forward_pre_hooks
        and not getattr(nn.modules.module, "_global_forward_hooks", None)
        and not getattr(nn.modules.module, "_global_forward_pre_hooks", None)
    )


# ---------------------------------------------------------------------------------------------------------------
# Convolutional token embedding
# ---------------------------------------------------------------------------------------------------------------
class ConvEmbed(nn.Module):
    """Strided Conv2d (with bias) + LayerNorm over channels: the start of every stage."""

    def __init__(self, in_chans: int, dim: int, patch_size: int, stride: int, padding: int, eps: float):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=stride, padding=padding)
        self.norm = LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = self.proj(x)  # (B, C, H, W)
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)  # (B, H*W, C)
        return self.norm(x), h, w


# ---------------------------------------------------------------------------------------------------------------
# Convolutional attention
# ---------------------------------------------------------------------------------------------------------------
class _DenseGradient(torch.autograd.Function):
    """Identity forward; backward hands on the gradient as a dense channels-last map.

    In the last stage q, k and v are concatenated after the cls token, so the gradient reaching each projection is
    a slice of a (B, 1 + T, C) tensor: strided by 1 + T tokens per image. CPU BatchNorm's backward has no fast
    path for that layout (CvT-13, a (32, 384, 14, 14) map: 16.8 ms against 2.3 ms for a copy plus the dense
    kernel); one copy here serves the BatchNorm and the convolution behind it. Dense gradients pass unchanged."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous(memory_format=torch.channels_last)


class ConvProjection(nn.Module):
    """Depthwise Conv2d (no bias) + BatchNorm2d: the "dw_bn" projection of q, k or v, map in, tokens out.

    In eval mode the BatchNorm is folded into the convolution (one pass instead of two); in training mode the
    BatchNorm runs as usual, except that a checkpoint recomputation leaves the running statistics alone.
    """

    def __init__(self, dim: int, kernel_size: int, stride: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, kernel_size, stride=stride, padding=kernel_size // 2, groups=dim, bias=False)
        self.bn = nn.BatchNorm2d(dim)
        # Training under DDP: normalise with the statistics of all processes' batches (`CvT.set_sync_batchnorm`).
        self.sync_bn = False
        # In a block under gradient checkpointing (set by `Stage.grad_checkpointing`): only then can a forward be a
        # recomputation, so only then is the ContextVar read, which breaks the graph in torch.compile before 2.14.
        self.checkpointed = False

    def folded_weight_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Conv weight and bias equal to conv followed by eval-mode BatchNorm."""
        bn = self.bn
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)  # (C,)
        weight = self.conv.weight * scale.view(-1, 1, 1, 1)
        bias = bn.bias - bn.running_mean * scale
        return weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv, bn = self.conv, self.bn
        if not self.training:
            weight, bias = self.folded_weight_bias()
            x = F.conv2d(x, weight, bias, conv.stride, conv.padding, groups=conv.groups)
        else:
            x = conv(x)
            recomputing = self.checkpointed and _RECOMPUTING.get()
            if not recomputing:
                bn.num_batches_tracked.add_(1)
            # momentum 0 keeps running stats unchanged during a checkpoint recomputation
            momentum = 0.0 if recomputing else bn.momentum
            if self.sync_bn and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                x = sync_batch_norm(x, bn, momentum)
            else:
                x = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, True, momentum, bn.eps)
            if torch.is_grad_enabled() and x.device.type == "cpu" and not _functorch_active():
                x = _DenseGradient.apply(x)
        return x.flatten(2).transpose(1, 2)  # (B, C, H', W') -> (B, H'*W', C)


def sync_batch_norm(x: torch.Tensor, bn: nn.BatchNorm2d, momentum: float) -> torch.Tensor:
    """Training-mode BatchNorm of `x` (B, C, H, W) with the statistics of the batch over all processes, so that
    N DDP processes normalise as one process with the whole batch would. PyTorch's SyncBatchNorm runs on GPUs
    only; this runs on any backend (gloo on CPU included), with the same maths: each process's mean, variance
    and count are exchanged and combined (Chan et al.), and gradients flow back through the exchange."""
    from torch.distributed.nn.functional import all_reduce

    c = x.shape[1]
    xf = x.float()  # statistics in float32 under autocast, as F.batch_norm keeps them
    var, mean = torch.var_mean(xf, dim=(0, 2, 3), correction=0)
    count = xf.new_full((1,), xf.numel() // c)
    world, rank = dist.get_world_size(), dist.get_rank()
    # An all-gather written as an all-reduce of rows that are zero except each process's own: autograd's
    # all_gather needs reduce-scatter or all-to-all, which gloo lacks; all_reduce's backward is an all_reduce.
    mine = torch.cat([mean, var, count])[None]
    rows = all_reduce(torch.cat([mine.new_zeros(rank, 2 * c + 1), mine, mine.new_zeros(world - rank - 1, 2 * c + 1)]))
    means, variances, counts = rows[:, :c], rows[:, c : 2 * c], rows[:, 2 * c :]
    total = counts.sum()
    mean = (counts * means).sum(0) / total
    var = (counts * (variances + (means - mean) ** 2)).sum(0) / total
    if momentum and bn.running_mean is not None:
        with torch.no_grad():  # as F.batch_norm: the running variance is the unbiased one
            bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), momentum)
            unbiased = var * total / (total - 1).clamp(min=1)
            bn.running_var.lerp_(unbiased.to(bn.running_var.dtype), momentum)
    scale = torch.rsqrt(var + bn.eps) * bn.weight
    out = (xf - mean.view(1, c, 1, 1)) * scale.view(1, c, 1, 1) + bn.bias.view(1, c, 1, 1)
    return out.to(x.dtype)


class Attention(nn.Module):
    """Multi-head attention whose q/k/v come from depthwise-convolved token maps (k, v subsampled by stride_kv)."""

    def __init__(self, dim: int, num_heads: int, cfg: CvTConfig, attn_drop: float, proj_drop: float):
        super().__init__()
        self.num_heads = num_heads
        # authors: the scale is the whole width's dim ** -0.5, not head_dim ** -0.5; the weights depend on it.
        self.scale = dim**-0.5
        self.attn_drop = attn_drop
        self.conv_proj_q = ConvProjection(dim, cfg.kernel_qkv, cfg.stride_q)
        self.conv_proj_k = ConvProjection(dim, cfg.kernel_qkv, cfg.stride_kv)
        self.conv_proj_v = ConvProjection(dim, cfg.kernel_qkv, cfg.stride_kv)
        self.proj_q = nn.Linear(dim, dim, bias=cfg.qkv_bias)
        self.proj_k = nn.Linear(dim, dim, bias=cfg.qkv_bias)
        self.proj_v = nn.Linear(dim, dim, bias=cfg.qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, h: int, w: int, has_cls: bool) -> torch.Tensor:
        return self.proj_drop(_linear(self.attend(x, h, w, has_cls), self.proj))

    def attend(self, x: torch.Tensor, h: int, w: int, has_cls: bool) -> torch.Tensor:
        """Attention up to, not including, the output projection: (B, T, C) -> (B, T, C)."""
        spatial = x[:, 1:] if has_cls else x  # (B, H*W, C)
        if has_cls:
            # Without the cls row the map is strided by 1 + H*W tokens per image, which the convolutions would
            # each copy into a dense layout; one copy here serves all three.
            spatial = spatial.contiguous()
        # (B, H*W, C) -> (B, C, H, W) as a view: the map is channels-last in memory, which the depthwise
        # convolutions take without a copy. q, k and v all read this one map.
        feat = spatial.transpose(1, 2).unflatten(2, (h, w))
        q = self.conv_proj_q(feat)  # (B, Tq, C)
        k = self.conv_proj_k(feat)  # (B, Tkv, C), Tkv = ceil(H/s) * ceil(W/s)
        v = self.conv_proj_v(feat)
        if has_cls:
            # authors: the cls token skips the convolution and joins q, k and v unchanged.
            cls = x[:, :1]
            q, k, v = (torch.cat((cls, t), dim=1) for t in (q, k, v))
        nh = self.num_heads
        q = _linear(q, self.proj_q).unflatten(-1, (nh, -1)).transpose(1, 2)  # (B, nh, Tq, hd)
        k = _linear(k, self.proj_k).unflatten(-1, (nh, -1)).transpose(1, 2)  # (B, nh, Tkv, hd)
        v = _linear(v, self.proj_v).unflatten(-1, (nh, -1)).transpose(1, 2)
        x = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.attn_drop if self.training else 0.0, scale=self.scale
        )  # (B, nh, Tq, hd)
        return x.transpose(1, 2).flatten(2)  # (B, Tq, C), a view: the kernel writes (B, Tq, nh, hd) memory


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str, drop: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = _make_act(act)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)
        self.checkpointed = False  # as ConvProjection's

    def plain(self) -> bool:
        """fc1, act and fc2 are as built, so the fused path below may read their weights and kernel; otherwise
        (a LoRA wrapper of fc1, another activation, a hook) they are called as modules."""
        linears = _as_built(self.fc1, nn.Linear) and _as_built(self.fc2, nn.Linear)
        return linears and _as_built(self.act, (QuickGELU, GELU))

    # act(h) = kernel(s h) / s (QuickGELU: SiLU, s = 1.702; GELU: itself, s = 1), so fc1 computes s h and fc2
    # takes 1/s, both inside their matmuls: the hidden tensor sees the one fused kernel and nothing else.
    def scale(self) -> float:
        return self.act.scale or 1.0

    def fc1_scaled(self, x: torch.Tensor) -> torch.Tensor:
        """s * fc1(x), the input of `act.kernel`: (B, T, dim) -> (B, T, hidden). Only for `plain()` MLPs."""
        s = self.scale()
        return _scaled_linear(x, self.fc1, s, s)

    def add_to_inference(self, residual: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """`residual + mlp(x)`, written into `residual` (a contiguous tensor the caller made): the MLP half of
        `Block._forward_inference`. Only for `plain()` MLPs, without autograd.

        On oneDNN each fc1 is one GEMM with the activation's kernel as its post-op and each fc2 one GEMM with the
        residual add as its post-op, `_MLP_ROWS` tokens at a time: the 4x-wide hidden tensor is made and consumed
        in cache-sized pieces instead of going to memory and back (CvT-13's MLPs at batch 32: 7-30% faster, the
        most in stage 1). Otherwise, the kernel runs in place on fc1's output and fc2 accumulates into `residual`.
        """
        s = self.scale()
        fc1, fc2 = self.fc1, self.fc2
        post = self.act.onednn_post
        if post is None or not _onednn_linear_ok(x, fc1.weight) or residual.dtype != torch.float32:
            hidden = self.act.kernel_(self.fc1_scaled(x))
            return _residual_linear(residual, hidden, fc2, inplace=True, alpha=1.0 / s)
        # kernel(s * fc1(x)) / s = act(fc1(x)): s on fc1's weight and bias, 1 / s on fc2's weight
        w1, b1, w2 = _scaled(fc1.weight, s), _scaled(fc1.bias, s), _scaled(fc2.weight, 1.0 / s)
        rows = x.reshape(-1, x.shape[-1])  # (N, C)
        out = residual.view(-1, residual.shape[-1])  # (N, C), the caller's tensor
        for i in range(0, rows.shape[0], _MLP_ROWS):
            hidden = _onednn_linear(rows[i : i + _MLP_ROWS], w1, b1, post)  # (n, 4C), n <= _MLP_ROWS
            out[i : i + _MLP_ROWS] = _LINEAR_POINTWISE.binary(hidden, out[i : i + _MLP_ROWS], w2, fc2.bias, "add")
        return residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.plain():
            return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))
        h = self.fc1_scaled(x)
        fc2 = functools.partial(_scaled_linear, linear=self.fc2, alpha=1.0 / self.scale())
        if (
            h.numel() >= _RECOMPUTE_MIN_NUMEL
            and torch.is_grad_enabled()
            and not (self.training and self.drop.p > 0)
            and not (self.checkpointed and _CHECKPOINTED.get())
            and not torch.compiler.is_compiling()  # the compiler decides for itself what to recompute
        ):
            return self.drop(_linear_of_recomputed(fc2, self.act.kernel, h))
        return self.drop(fc2(self.drop(self.act.kernel(h))))


class Block(nn.Module):
    """Pre-norm transformer block: x + drop_path(attn(norm1 x)), then x + drop_path(mlp(norm2 x))."""

    def __init__(self, dim: int, num_heads: int, drop_path: float, cfg: CvTConfig):
        super().__init__()
        self.norm1 = LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.attn = Attention(dim, num_heads, cfg, cfg.attn_drop_rate, cfg.drop_rate)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio), cfg.act, cfg.drop_rate)

    def forward(self, x: torch.Tensor, h: int, w: int, has_cls: bool) -> torch.Tensor:
        if not self.training and _eager_inference(x) and _as_built(self.attn.proj, nn.Linear) and self.mlp.plain():
            return self._forward_inference(x, h, w, has_cls)
        x = x + self.drop_path(self.attn(self.norm1(x), h, w, has_cls))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def _forward_inference(self, x: torch.Tensor, h: int, w: int, has_cls: bool) -> torch.Tensor:
        """The same arithmetic in fewer passes over memory: each residual add rides on the matmul of the
        branch's last Linear (a oneDNN post-op, or MKL's addmm accumulating into the residual), and the activation
        is fc1's post-op or runs in place. Only tensors made here are written in place; the input `x` is left as
        it is. Only for an as-built proj and MLP, whose weights it reads."""
        y = _residual_linear(x, self.attn.attend(self.norm1(x), h, w, has_cls), self.attn.proj, inplace=False)
        return self.mlp.add_to_inference(y, self.norm2(y))


# ---------------------------------------------------------------------------------------------------------------
# Stage
# ---------------------------------------------------------------------------------------------------------------
class Stage(nn.Module):
    """Token embedding, an optional cls token, then `depth` blocks. Map in, tokens out."""

    def __init__(self, index: int, in_chans: int, cfg: CvTConfig):
        super().__init__()
        dim = cfg.embed_dims[index]
        self.patch_embed = ConvEmbed(
            in_chans, dim, cfg.patch_sizes[index], cfg.patch_strides[index], cfg.patch_paddings[index],
            cfg.layer_norm_eps,
        )
        last = index == cfg.num_stages - 1
        # authors: the cls token exists in the last stage only
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if cfg.cls_token and last else None
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        # authors: stochastic depth rises linearly within each stage, from 0 to the stage's rate
        rates = torch.linspace(0, cfg.drop_path_rate[index], cfg.depths[index], device="cpu").tolist()
        self.blocks = nn.ModuleList(Block(dim, cfg.num_heads[index], r, cfg) for r in rates)
        self.grad_checkpointing = False

    @property
    def grad_checkpointing(self) -> bool:
        return self._grad_checkpointing

    @grad_checkpointing.setter
    def grad_checkpointing(self, enable: bool) -> None:
        self._grad_checkpointing = enable
        for m in self.blocks.modules():  # the layers that read the recomputation ContextVars, only when they may be set
            if isinstance(m, (ConvProjection, Mlp)):
                m.checkpointed = enable

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x, h, w = self.patch_embed(x)  # (B, H*W, C)
        has_cls = self.cls_token is not None
        if has_cls:
            x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)  # (B, 1 + H*W, C)
        x = self.pos_drop(x)
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                # Compiled, the recomputation is traced into the graph once and the contexts are not needed (and
                # torch.compile accepts only selective-checkpoint contexts there).
                contexts = {} if torch.compiler.is_compiling() else {"context_fn": _checkpoint_contexts}
                x = checkpoint(block, x, h, w, has_cls, use_reentrant=False, **contexts)
            else:
                x = block(x, h, w, has_cls)
        return x, h, w


def _tokens_to_map(x: torch.Tensor, h: int, w: int, has_cls: bool) -> torch.Tensor:
    if has_cls:
        x = x[:, 1:]
    return x.transpose(1, 2).unflatten(2, (h, w))  # (B, H*W, C) -> (B, C, H, W)


# ---------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------
class CvT(nn.Module):
    """A CvT classifier, or a backbone returning NCHW feature maps (`features_only=True`).

    The interface is timm's: `forward_features`, `forward_head`, `reset_classifier`, `set_grad_checkpointing`,
    `feature_info`, `forward_intermediates`. Parameter names follow the authors' checkpoints, with
    `stage{i}.` written `stages.{i}.` (see `cvt.weights`).
    """

    def __init__(self, cfg: CvTConfig, features_only: bool = False, out_indices: Sequence[int] = (0, 1, 2)):
        super().__init__()
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.class_names: list[str] | None = None  # set when weights come with names (cvt, Hugging Face formats)
        # True when weights were loaded but not the classifier's (the file had none, or another class count): its
        # head is untrained, so eval and predict refuse such a model.
        self.fresh_classifier = False
        self.num_features = self.head_hidden_size = cfg.num_features
        stages, in_chans = [], cfg.in_chans
        for i in range(cfg.num_stages):
            stages.append(Stage(i, in_chans, cfg))
            in_chans = cfg.embed_dims[i]
        self.stages = nn.ModuleList(stages)
        self.norm = LayerNorm(cfg.num_features, eps=cfg.layer_norm_eps)
        self.head = nn.Linear(cfg.num_features, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.feature_info = [
            dict(num_chs=d, reduction=r, module=f"stages.{i}") for i, (d, r) in enumerate(zip(cfg.embed_dims, cfg.reductions))
        ]
        self.features_only = False
        self.out_indices: tuple[int, ...] = tuple(range(cfg.num_stages))
        self.apply(self._init_weights)
        for stage in self.stages:
            if stage.cls_token is not None:
                trunc_normal_(stage.cls_token, std=0.02)
        if features_only:
            self.as_backbone(out_indices)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # authors: Linear trunc_normal(0.02) with zero bias; norms 1/0; convolutions keep PyTorch's default.
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # ---- timm interface ------------------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {f"stages.{i}.cls_token" for i, s in enumerate(self.stages) if s.cls_token is not None}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def set_sync_batchnorm(self, enable: bool = True) -> None:
        """Under torch.distributed, train the BatchNorms of the q/k/v projections on the statistics of all
        processes' batches (`sync_batch_norm`) instead of each process's share. No effect in one process or in
        eval mode. (nn.SyncBatchNorm.convert_sync_batchnorm would not do it: the projections call F.batch_norm.)"""
        for m in self.modules():
            if isinstance(m, ConvProjection):
                m.sync_bn = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh head for `num_classes` classes (0: no head, `forward` returns pooled features)."""
        self.num_classes = num_classes
        self.class_names = None
        self.cfg = self.cfg.replace(num_classes=num_classes)
        device = self.norm.weight.device
        self.head = nn.Linear(self.num_features, num_classes, device=device) if num_classes > 0 else nn.Identity()
        self._init_weights(self.head)

    def as_backbone(self, out_indices: Sequence[int] = (0, 1, 2)) -> "CvT":
        """Turn this model into a backbone returning the maps of `out_indices`; drops the head, the final norm
        and the stages after the last index (they would be unused parameters, which DDP rejects)."""
        n = self.cfg.num_stages
        idx = tuple(int(i) % n if -n <= int(i) < n else n for i in out_indices)
        if not idx or any(i >= n for i in idx) or len(set(idx)) != len(idx):
            raise ValueError(f"out_indices {tuple(out_indices)} must name distinct stages among 0..{n - 1}")
        self.out_indices = tuple(sorted(idx))
        self.stages = self.stages[: max(idx) + 1]
        self.norm = nn.Identity()
        self.head = nn.Identity()
        self.num_classes = 0
        self.features_only = True
        self.feature_info = [self.feature_info[i] for i in self.out_indices]
        return self

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4:
            raise ValueError(f"CvT expects images as a (batch, channels, height, width) tensor, got shape {tuple(x.shape)}")
        if x.shape[1] != self.cfg.in_chans:
            raise ValueError(
                f"CvT was built for {self.cfg.in_chans}-channel images, got {x.shape[1]} channels (shape {tuple(x.shape)})"
            )
        min_size = self.min_input_size()
        if x.shape[-2] < min_size or x.shape[-1] < min_size:
            raise ValueError(
                f"input {x.shape[-2]}x{x.shape[-1]} is too small: this CvT needs at least {min_size}x{min_size} pixels"
            )

    def min_input_size(self) -> int:
        """Smallest side for which every stage's token embedding still yields at least one token."""
        size = 1
        cfg = self.cfg
        for k, s, p in reversed(list(zip(cfg.patch_sizes, cfg.patch_strides, cfg.patch_paddings))):
            size = max(1, (size - 1) * s + k - 2 * p)  # inverse of floor((L + 2p - k) / s) + 1 >= size
        return size

    def forward_intermediates(
        self, x: torch.Tensor, indices: Sequence[int] | None = None, intermediates_only: bool = False
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Maps `(B, C_i, H/r_i, W/r_i)` of the stages in `indices` (default all), and the final tokens unless
        `intermediates_only`."""
        self._check_input(x)
        n = len(self.stages)
        wanted = set(range(n)) if indices is None else {int(i) % n for i in indices}
        maps = []
        for i, stage in enumerate(self.stages):
            x, h, w = stage(x)  # tokens (B, [1 +] H*W, C)
            has_cls = stage.cls_token is not None
            fmap = _tokens_to_map(x, h, w, has_cls)
            if i in wanted:
                maps.append(fmap.contiguous())
            if i < n - 1:
                x = fmap
        if intermediates_only:
            return maps
        return self.norm(x), maps

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised last-stage tokens `(B, [1 +] H*W, C)`, the cls token first when the model has one."""
        self._check_input(x)
        for i, stage in enumerate(self.stages):
            x, h, w = stage(x)
            if i < len(self.stages) - 1:
                x = _tokens_to_map(x, h, w, stage.cls_token is not None)  # next stage embeds a map
        # LayerNorm is per token, so norming all tokens then taking the cls token equals the authors' order.
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        # authors: the cls token is the image's representation; without one, the mean of the tokens.
        # (Their torch.squeeze also dropped the batch dimension at batch size 1; indexing keeps it.)
        x = x[:, 0] if self.stages[-1].cls_token is not None else x.mean(dim=1)  # (B, C)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        if self.features_only:
            return self.forward_intermediates(x, self.out_indices, intermediates_only=True)
        return self.forward_head(self.forward_features(x))


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def output_size(cfg: CvTConfig, height: int, width: int) -> list[tuple[int, int]]:
    """Spatial size of each stage's map for an input of `height` x `width`."""
    sizes = []
    for k, s, p in zip(cfg.patch_sizes, cfg.patch_strides, cfg.patch_paddings):
        height = math.floor((height + 2 * p - k) / s) + 1
        width = math.floor((width + 2 * p - k) / s) + 1
        sizes.append((height, width))
    return sizes
