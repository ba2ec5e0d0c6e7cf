"""Linear layers through oneDNN's fp32 GEMM on CPU (fast path `onednn_linear`).

PyTorch's own CPU Linear goes to MKL (addmm); oneDNN's GEMM runs CvT's Linear shapes faster on the CPUs this
project has measured (benchmarks/RESULTS.md, `python benchmarks/gemm.py`) and fuses the MLP's activation and the
residual add into the GEMM. Exact fp32 (no reduced-precision math mode), so the parity tests hold.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import functorch_active, is_enabled, tracing_or_compiling

_LINEAR_POINTWISE = (
    getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None
)

# Below this many tokens (rows) the input gradient goes through MKL: the transposed weight's copy that oneDNN needs
# costs more than its faster GEMM gains (CvT-13's stage 3 at batch 1; benchmarks/RESULTS.md).
_ONEDNN_GRAD_MIN_TOKENS = 2048


def onednn_available() -> bool:
    """This PyTorch build has oneDNN's Linear entry point."""
    return _LINEAR_POINTWISE is not None


def onednn_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `x @ weight.T` runs through oneDNN: the fast path is on, fp32 on CPU, outside autocast (which would
    want its own casts), outside tracers and compilers (which should see ordinary ops: ONNX export,
    torch.compile) and outside torch.func transforms."""
    return (
        is_enabled("onednn_linear")
        and _LINEAR_POINTWISE is not None
        and not tracing_or_compiling()  # first: under torch.fx, `x` is a Proxy the checks below cannot read
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and not functorch_active()
    )


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, post: str = "none") -> torch.Tensor:
    """`post(x @ weight.T + bias)` in one oneDNN call (no autograd), post one of "none", "swish" (SiLU), "gelu"."""
    return _LINEAR_POINTWISE(x, weight, bias, post, [], "none" if post == "gelu" else "")


def onednn_linear_add(x: torch.Tensor, other: torch.Tensor, weight: torch.Tensor,
                      bias: torch.Tensor | None) -> torch.Tensor:
    """`other + x @ weight.T + bias` in one oneDNN call (no autograd), as a new tensor."""
    return _LINEAR_POINTWISE.binary(x, other, weight, bias, "add")


class _OneDNNLinear(torch.autograd.Function):
    """`x @ weight.T + bias` with the forward and the input gradient through oneDNN (both are (N, K) x (K, M)
    products, which it runs faster for N in the thousands) and the weight gradient through MKL (a (M, N) x (N, K)
    product, for which PyTorch has no oneDNN entry point). The tensors it saves go through any saved-tensor hooks,
    as built-in ops' do (the MLP's activation recomputation relies on that)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return onednn_linear(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        flat = grad.reshape(-1, grad.shape[-1])  # (N, M)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:  # (N, M) x (M, K)
            if flat.shape[0] >= _ONEDNN_GRAD_MIN_TOKENS:
                grad_x = onednn_linear(flat, weight.t().contiguous(), None).view(x.shape)
            else:  # few tokens: the transposed weight's copy costs more than oneDNN gains
                grad_x = flat.mm(weight).view(x.shape)
        if ctx.needs_input_grad[1]:
            grad_w = flat.t().mm(x.reshape(-1, x.shape[-1]))  # (M, N) x (N, K)
        if ctx.needs_input_grad[2]:  # False for a Linear without bias
            grad_b = flat.sum(0)
        return grad_x, grad_w, grad_b


def _scaled(t: torch.Tensor | None, s: float) -> torch.Tensor | None:
    """`t * s`, or `t` itself when there is nothing to scale (s = 1, or no tensor: a Linear without bias)."""
    return t * s if t is not None and s != 1.0 else t


def scaled_linear(x: torch.Tensor, linear: nn.Linear, alpha: float = 1.0, beta: float = 1.0) -> torch.Tensor:
    """`alpha * x @ W.T + beta * b` for `linear`'s W and b.

    Without autograd on MKL the scales ride inside the matmul (free in the GEMM). With autograd, addmm's backward
    would apply alpha and beta as extra passes over its (N, C_in) and (N, C_out) gradients, the size of the
    activations; scaling W and b instead costs passes the size of the weight. oneDNN takes no scales: it gets the
    scaled W and b."""
    flat = x.reshape(-1, x.shape[-1])  # (..., C_in) -> (N, C_in)
    onednn = onednn_applies(x, linear.weight)
    grad = torch.is_grad_enabled()
    if onednn or (grad and (alpha != 1.0 or beta != 1.0) and linear.weight.shape[0] < flat.shape[0]):
        weight, bias = _scaled(linear.weight, alpha), _scaled(linear.bias, beta)
        if onednn:
            # the Function under autograd whatever requires grad (bias-only fine-tuning: neither x nor W does)
            return _OneDNNLinear.apply(x, weight, bias) if grad else onednn_linear(x, weight, bias)
        out = torch.mm(flat, weight.t()) if bias is None else torch.addmm(bias, flat, weight.t())
    elif linear.bias is None:
        out = torch.mm(flat, linear.weight.t()) * alpha
    else:
        out = torch.addmm(linear.bias, flat, linear.weight.t(), beta=beta, alpha=alpha)
    return out.view(*x.shape[:-1], out.shape[-1])


def residual_linear(residual: torch.Tensor, x: torch.Tensor, linear: nn.Linear, inplace: bool,
                    alpha: float = 1.0) -> torch.Tensor:
    """`residual + alpha * x @ W.T + b` as one matmul accumulating into the residual (inference only; `inplace`
    may write into `residual` itself)."""
    if onednn_applies(x, linear.weight) and residual.dtype == torch.float32:
        return onednn_linear_add(x, residual, _scaled(linear.weight, alpha), linear.bias)  # a new tensor
    if inplace:
        out = residual.add_(linear.bias) if linear.bias is not None else residual
    else:
        out = residual + linear.bias if linear.bias is not None else residual.clone()
        out = out.contiguous()
    flat = out.view(-1, out.shape[-1])
    # addmm with out= aliasing its input: the same kernel as addmm_, but MAC counters see an addmm
    torch.addmm(flat, x.reshape(-1, x.shape[-1]), linear.weight.t(), alpha=alpha, out=flat)
    return out


class Linear(nn.Linear):
    """nn.Linear (same parameters, same function) whose CPU fp32 GEMMs go through oneDNN when `onednn_linear`
    is on. Anything that takes an nn.Linear takes it (PEFT's LoRA, pruning, quantization wrappers)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            if onednn_applies(x, self.weight):
                return scaled_linear(x, self)
        return F.linear(x, self.weight, self.bias)
