"""The public switch for cvt's fast paths, and the checks that say where a fast path may run at all.

Every fast path computes what the model's reference forward computes (up to float rounding; each is tested against
it with the path switched off) and changes only speed or memory. All are on by default. Turn them off

- for the process: `cvt.layers.set_fast_paths(False)`, or one by one `set_fast_paths(onednn_linear=False)`;
- for a block of code: `with cvt.layers.fast_paths(False): ...` (restores the previous setting on exit);
- from the environment, read once at import: `CVT_FAST_PATHS=0` (all off), `CVT_FAST_PATHS=-onednn_linear,
  -recompute_act` (those off), `CVT_FAST_PATHS=fused_inference,fold_batchnorm` (only those on).

The setting is global to the process, as timm's `set_fused_attn` is; it is read at each forward.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator

import torch
from torch import nn

FAST_PATHS: dict[str, str] = {
    "fused_inference": "eager inference adds each residual inside the matmul of the branch's last Linear and runs "
    "the MLP's activation in place (`cvt.layers.fused.block_inference`)",
    "fold_batchnorm": "in eval mode the q/k/v projections' BatchNorm is folded into the depthwise convolution "
    "(one pass instead of two)",
    "onednn_linear": "CPU fp32 Linear layers run through oneDNN's GEMM, with the MLP's activation and the residual "
    "add as GEMM post-ops in inference (`cvt.layers.linear`)",
    "mlp_in_pieces": "with oneDNN, inference runs each MLP a slice of tokens at a time, so its 4x-wide hidden "
    "tensor stays in cache",
    "recompute_act": "training recomputes the MLP's activation in backward instead of storing it",
    "dense_gradient": "on CPU the q/k/v BatchNorms' backward receives a dense channels-last gradient",
    "quick_gelu_as_silu": "QuickGELU runs as SiLU(1.702 x) / 1.702, with the two scales moved into the MLP's matmuls",
}

ENV_VAR = "CVT_FAST_PATHS"

_enabled: dict[str, bool] = dict.fromkeys(FAST_PATHS, True)


def _check_names(names) -> None:
    unknown = [n for n in names if n not in FAST_PATHS]
    if unknown:
        raise ValueError(f"unknown fast path {unknown[0]!r}; the fast paths are {', '.join(FAST_PATHS)}")


def parse_spec(spec: str) -> dict[str, bool]:
    """The setting a `CVT_FAST_PATHS` value describes: "1"/"all" (all on), "0"/"none" (all off), a comma list of
    names (only those on), or of "-name"s (those off, the rest on)."""
    text = spec.strip().lower()
    if text in ("", "1", "all", "on", "true"):
        return dict.fromkeys(FAST_PATHS, True)
    if text in ("0", "none", "off", "false"):
        return dict.fromkeys(FAST_PATHS, False)
    tokens = [t.strip() for t in text.split(",") if t.strip()]
    off = {t[1:] for t in tokens if t.startswith("-")}
    on = {t for t in tokens if not t.startswith("-")}
    _check_names(off | on)
    setting = {name: (name in on if on else True) for name in FAST_PATHS}
    setting.update(dict.fromkeys(off, False))
    return setting


def is_enabled(name: str) -> bool:
    """Whether the fast path `name` is on (a KeyError names a path that does not exist)."""
    return _enabled[name]


def fast_path_config() -> dict[str, bool]:
    """A copy of the current setting, name -> on."""
    return dict(_enabled)


def set_fast_paths(enable: bool | None = None, /, **paths: bool) -> None:
    """`set_fast_paths(False)` turns every fast path off, `set_fast_paths(True)` on; keywords set single paths,
    after `enable`: `set_fast_paths(False, fused_inference=True)` leaves only that one on."""
    _check_names(paths)
    if enable is not None:
        _enabled.update(dict.fromkeys(FAST_PATHS, bool(enable)))
    _enabled.update({name: bool(on) for name, on in paths.items()})


@contextlib.contextmanager
def fast_paths(enable: bool | None = None, /, **paths: bool) -> Iterator[None]:
    """`set_fast_paths(enable, **paths)` for the duration of a `with` block."""
    saved = fast_path_config()
    set_fast_paths(enable, **paths)
    try:
        yield
    finally:
        _enabled.update(saved)


def _from_environment() -> None:
    spec = os.environ.get(ENV_VAR)
    if spec is None:
        return
    try:
        _enabled.update(parse_spec(spec))
    except ValueError as e:  # a typo in the environment should not stop `import cvt`
        warnings.warn(f"{ENV_VAR}={spec!r} ignored: {e}", stacklevel=2)


_from_environment()


# ---------------------------------------------------------------------------------------------------------------
# Where a fast path may run
# ---------------------------------------------------------------------------------------------------------------
# torch.fx exports these only from its private module. The symbolic-only query (newer torch) is not also true
# inside torch.compile and torch.export, which handle Python branches themselves.
_FX_TRACING = getattr(torch.fx._symbolic_trace, "is_fx_symbolic_tracing", None) or torch.fx._symbolic_trace.is_fx_tracing  # noqa: SLF001,E501


def fx_tracing() -> bool:
    """torch.fx is tracing the model symbolically: tensors are Proxies, which no Python branch may read."""
    return _FX_TRACING()


def tracing_or_compiling() -> bool:
    """A tracer (torch.fx, TorchScript), torch.compile or torch.export is recording the model, or a dispatch mode
    watches its ops (FlopCounterMode counts only the ops it knows): they should see ordinary, out-of-place ops."""
    return (
        fx_tracing()
        or torch.jit.is_tracing()
        or torch.jit.is_scripting()
        or torch.compiler.is_compiling()
        or torch.compiler.is_exporting()
        or torch._C._len_torch_dispatch_stack() > 0  # noqa: SLF001 - no public query for an active mode
    )


def eager_inference(x: torch.Tensor) -> bool:
    """Plain eager inference, where in-place tricks are safe: no autograd, no autocast (whose casts a fused path
    would bypass), no tracer or compiler."""
    return not (torch.is_grad_enabled() or tracing_or_compiling() or torch.is_autocast_enabled(x.device.type))


# No public API tells whether a torch.func transform is active.
_PEEK_FUNCTORCH = getattr(torch._C._functorch, "peek_interpreter_stack", None)  # noqa: SLF001


def functorch_active() -> bool:
    """Inside a torch.func transform (grad, vmap, jacrev...), which cvt's autograd Functions do not support: the
    model then runs on ordinary ops (per-sample gradients with torch.func keep working)."""
    return _PEEK_FUNCTORCH is not None and _PEEK_FUNCTORCH() is not None


def as_built(module: nn.Module, kind: type | tuple[type, ...]) -> bool:
    """`module` is exactly `kind` (not a subclass or a wrapper such as LoRA's) and nothing hooks its forward: the
    fused paths read its weights or its kernel directly, which would bypass a wrapper, a hook or a pruning mask."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return (
        type(module) in kinds
        and not module._forward_hooks  # noqa: SLF001 - nn.Module has no public accessor for its hooks
        and not module._forward_pre_hooks  # noqa: SLF001
        and not getattr(nn.modules.module, "_global_forward_hooks", None)
        and not getattr(nn.modules.module, "_global_forward_pre_hooks", None)
    )
