"""The public switch for cvt's fast paths, and the checks that say where a fast path may run at all.

Every fast path computes what the model's reference forward computes (up to float rounding; each is tested against
it with the path switched off) and changes only speed or memory. All are on by default. Turn them off

- for the process: `cvt.layers.set_fast_paths(False)`, or one by one `set_fast_paths(onednn_linear=False)`;
- for a block of code: `with cvt.layers.fast_paths(False): ...` (restores the previous setting on exit);
- from the environment, read once at import: `CVT_FAST_PATHS=0` (all off), `CVT_FAST_PATHS=-onednn_linear,
  -recompute_act` (those off), `CVT_FAST_PATHS=fused_inference,fold_batchnorm` (only those on).

The setting is global to the process, as timm's `set_fused_attn` is; it is read at each forward.

Which paths are on before any of that depends on the CPU, since what oneDNN's GEMM buys does (benchmarks/RESULTS.md,
"Per CPU kind"): `CPU_DEFAULTS` by the vector ISA PyTorch dispatches to (`torch.backends.cpu.get_cpu_capability()`),
then, where `cvt tune` has measured this CPU model under this torch version, its choice
(`cvt.layers.calibrate`, cached in $XDG_CACHE_HOME/cvt/fast_paths.json). `fast_path_origin()` says which applied.
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

# The paths whose worth depends on the CPU: oneDNN's GEMM against MKL's (and the MLP slicing that serves it). The
# rest change the algorithm (fewer passes, less memory) and pay on every CPU measured.
CPU_DEPENDENT = ("onednn_linear", "mlp_in_pieces")
# Per vector ISA, the CPU-dependent paths that are off. AVX-512 (Zen 4 EPYC, Sapphire Rapids Xeon): oneDNN pays in
# inference and training. AVX2 only (Zen 3 EPYC): it costs, 0.85x inference and 0.94x training step for cvt_tiny,
# `mlp_in_pieces` 0.88x. Kinds never measured (ARM, POWER, pre-AVX2 x86) keep PyTorch's own GEMM.
CPU_DEFAULTS: dict[str, tuple[str, ...]] = {
    "avx512": (),
    "avx2": ("onednn_linear", "mlp_in_pieces"),
    "other": ("onednn_linear", "mlp_in_pieces"),
}

_enabled: dict[str, bool] = dict.fromkeys(FAST_PATHS, True)
_origin: list[str] = ["all on"]


def _check_names(names) -> None:
    unknown = [n for n in names if n not in FAST_PATHS]
    if unknown:
        raise ValueError(f"unknown fast path {unknown[0]!r}; the fast paths are {', '.join(FAST_PATHS)}")


def parse_spec(spec: str) -> dict[str, bool]:
    """The setting a `CVT_FAST_PATHS` value describes: "1"/"all" (all on), "0"/"none" (all off), a comma list of
    names (only those on), or of "-name"s (those off, the rest as this CPU's defaults have them: only the names
    are returned)."""
    text = spec.strip().lower()
    if text in ("", "1", "all", "on", "true"):
        return dict.fromkeys(FAST_PATHS, True)
    if text in ("0", "none", "off", "false"):
        return dict.fromkeys(FAST_PATHS, False)
    tokens = [t.strip() for t in text.split(",") if t.strip()]
    off = {t[1:] for t in tokens if t.startswith("-")}
    on = {t for t in tokens if not t.startswith("-")}
    _check_names(off | on)
    setting = {name: name in on for name in FAST_PATHS} if on else {}
    setting.update(dict.fromkeys(off, False))
    return setting


def is_enabled(name: str) -> bool:
    """Whether the fast path `name` is on (a KeyError names a path that does not exist)."""
    return _enabled[name]


def fast_path_config() -> dict[str, bool]:
    """A copy of the current setting, name -> on."""
    return dict(_enabled)


def fast_path_origin() -> str:
    """Where the process's setting came from, in order: the CPU kind's defaults, a `cvt tune` calibration, the
    environment, `set_fast_paths` calls."""
    return "; ".join(_origin)


def cpu_kind() -> str:
    """"avx512", "avx2" or "other": the x86 vector ISA PyTorch's CPU kernels dispatch to on this machine (which
    ATEN_CPU_CAPABILITY can lower)."""
    capability = torch.backends.cpu.get_cpu_capability().upper()
    if capability.startswith("AVX512"):
        return "avx512"
    return "avx2" if capability == "AVX2" else "other"


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), or the platform's processor string."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def set_fast_paths(enable: bool | None = None, /, **paths: bool) -> None:
    """`set_fast_paths(False)` turns every fast path off, `set_fast_paths(True)` on; keywords set single paths,
    after `enable`: `set_fast_paths(False, fused_inference=True)` leaves only that one on."""
    _check_names(paths)
    if enable is not None:
        _enabled.update(dict.fromkeys(FAST_PATHS, bool(enable)))
    _enabled.update({name: bool(on) for name, on in paths.items()})
    _origin.append("set_fast_paths(" + ", ".join(
        ([repr(bool(enable))] if enable is not None else []) + [f"{k}={bool(v)}" for k, v in paths.items()]) + ")")


@contextlib.contextmanager
def fast_paths(enable: bool | None = None, /, **paths: bool) -> Iterator[None]:
    """`set_fast_paths(enable, **paths)` for the duration of a `with` block."""
    saved, origin = fast_path_config(), list(_origin)
    set_fast_paths(enable, **paths)
    try:
        yield
    finally:
        _enabled.update(saved)
        _origin[:] = origin


def _from_cpu() -> None:
    kind = cpu_kind()
    off = CPU_DEFAULTS[kind]
    _enabled.update({name: name not in off for name in FAST_PATHS})
    _origin[:] = [f"{kind} defaults" + (f" ({', '.join(off)} off)" if off else " (all on)")]
    from .calibrate import cached_choice  # (imports nothing heavy)

    choice = cached_choice()
    if choice is not None:
        _enabled.update(choice)
        _origin.append("cvt tune for this CPU (" + ", ".join(f"{k} {'on' if v else 'off'}" for k, v in choice.items())
                       + ")")


def _from_environment() -> None:
    spec = os.environ.get(ENV_VAR)
    if spec is None:
        return
    try:
        _enabled.update(parse_spec(spec))
        _origin.append(f"{ENV_VAR}={spec}")
    except ValueError as e:  # a typo in the environment should not stop `import cvt`
        warnings.warn(f"{ENV_VAR}={spec!r} ignored: {e}", stacklevel=2)


_from_cpu()
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
