"""`CvTConfig`: one typed description of a CvT, validated on construction.

Per-stage fields are tuples with one entry per stage (the paper uses three stages). Every field is read by the
model; there are no dead options. Errors are `ValueError`s that name the field and say what is wrong, so the CLI
can show them as one line.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any

ACTIVATIONS = ("quick_gelu", "gelu")

# Fields that fix the shapes of the weights: two configs that agree on these can exchange state dicts.
ARCHITECTURE_FIELDS = (
    "embed_dims",
    "num_heads",
    "depths",
    "patch_sizes",
    "patch_strides",
    "patch_paddings",
    "mlp_ratio",
    "qkv_bias",
    "kernel_qkv",
    "cls_token",
    "in_chans",
)

# Fields that change what the weights compute without changing their shapes: a checkpoint that records them is
# built with them (training-only settings, the drop rates, are the caller's).
COMPUTE_FIELDS = ("stride_kv", "stride_q", "act", "layer_norm_eps")

_PER_STAGE = ("embed_dims", "num_heads", "depths", "patch_sizes", "patch_strides", "patch_paddings")


# numbers.* rather than int/float so NumPy scalars (read from checkpoints) pass; bool is an Integral but never
# means a count or a rate.
def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class CvTConfig:
    # Stage widths, heads and block counts (CvT-13: 64/192/384, 1/3/6, 1/2/10).
    embed_dims: tuple[int, ...] = (64, 192, 384)
    num_heads: tuple[int, ...] = (1, 3, 6)
    depths: tuple[int, ...] = (1, 2, 10)
    # Convolutional token embedding of each stage: kernel 7/3/3, stride 4/2/2, padding 2/1/1 give the
    # output strides 4/8/16 of the paper.
    patch_sizes: tuple[int, ...] = (7, 3, 3)
    patch_strides: tuple[int, ...] = (4, 2, 2)
    patch_paddings: tuple[int, ...] = (2, 1, 1)
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    # Depthwise convolutional projection of q/k/v: kernel 3 (padding kernel // 2); k and v are subsampled by
    # `stride_kv` (2 in the paper: 4x fewer keys), q by `stride_q` (1).
    kernel_qkv: int = 3
    stride_kv: int = 2
    stride_q: int = 1
    # A class token in the last stage only (the paper); without it the head mean-pools the last stage's tokens.
    cls_token: bool = True
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    # Stochastic depth: each stage's maximum rate. Within a stage the rate rises linearly from 0 to it
    # (the authors' rule). A single float means "this rate in the last stage, 0 elsewhere", as in every
    # official recipe (0, 0, 0.1).
    drop_path_rate: tuple[float, ...] | float = (0.0, 0.0, 0.1)
    # "quick_gelu" (x * sigmoid(1.702 x)) is what the authors trained with; "gelu" reproduces Hugging Face's port.
    act: str = "quick_gelu"
    in_chans: int = 3
    num_classes: int = 1000
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        # Normalise lists (YAML, JSON) to tuples so configs compare and hash as values. Values arrive from YAML,
        # JSON and `--set`, so any type can turn up: check before converting, so that a wrong type is a
        # ValueError naming the field rather than a TypeError from deep inside tuple() or the model.
        for name in _PER_STAGE:
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)):
                raise ValueError(f"{name} must be a list with one entry per stage, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        n = len(self.embed_dims)
        if n == 0:
            raise ValueError("embed_dims is empty: a CvT needs at least one stage")
        rate = self.drop_path_rate
        if _is_number(rate):
            object.__setattr__(self, "drop_path_rate", (0.0,) * (n - 1) + (float(rate),))
        elif isinstance(rate, (list, tuple)) and all(_is_number(r) for r in rate):
            object.__setattr__(self, "drop_path_rate", tuple(float(r) for r in rate))
        else:
            raise ValueError(f"drop_path_rate must be a number or a list of one number per stage, got {rate!r}")
        self._validate()

    def _validate(self) -> None:
        n = len(self.embed_dims)
        for name in _PER_STAGE + ("drop_path_rate",):
            value = getattr(self, name)
            if len(value) != n:
                raise ValueError(f"{name} has {len(value)} entries but embed_dims has {n}: give one per stage")
        # Integers proper, not 2.0: the model builds range(depth) and conv sizes from them.
        for name in ("embed_dims", "num_heads", "depths", "patch_sizes", "patch_strides"):
            if not all(_is_int(v) and v >= 1 for v in getattr(self, name)):
                raise ValueError(f"{name} must be positive integers, got {getattr(self, name)}")
        if not all(_is_int(v) and v >= 0 for v in self.patch_paddings):
            raise ValueError(f"patch_paddings must be integers >= 0, got {self.patch_paddings}")
        for i, (dim, heads) in enumerate(zip(self.embed_dims, self.num_heads)):
            if dim % heads:
                raise ValueError(
                    f"embed_dims[{i}]={dim} is not divisible by num_heads[{i}]={heads}: each head needs an equal share"
                )
        for name in ("kernel_qkv", "stride_kv", "stride_q", "in_chans"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if self.stride_q != 1:
            raise ValueError(
                f"stride_q must be 1 (got {self.stride_q}): a strided query changes the token count and breaks the "
                "residual connection, in the authors' code too"
            )
        if self.kernel_qkv % 2 == 0:
            raise ValueError(f"kernel_qkv must be odd (padding is kernel // 2), got {self.kernel_qkv}")
        if not _is_int(self.num_classes) or self.num_classes < 0:
            raise ValueError(f"num_classes must be an integer >= 0 (0: no classifier), got {self.num_classes!r}")
        if not (_is_number(self.mlp_ratio) and self.mlp_ratio > 0):
            raise ValueError(f"mlp_ratio must be a positive number, got {self.mlp_ratio!r}")
        for name in ("drop_rate", "attn_drop_rate"):
            v = getattr(self, name)
            if not (_is_number(v) and 0.0 <= v < 1.0):
                raise ValueError(f"{name} must be in [0, 1), got {v!r}")
        if any(not 0.0 <= r < 1.0 for r in self.drop_path_rate):
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        if self.act not in ACTIVATIONS:
            raise ValueError(f"act must be one of {', '.join(ACTIVATIONS)}, got {self.act!r}")
        if not isinstance(self.qkv_bias, bool) or not isinstance(self.cls_token, bool):
            raise ValueError("qkv_bias and cls_token must be true or false")
        if not (isinstance(self.layer_norm_eps, float) and self.layer_norm_eps > 0):
            raise ValueError(f"layer_norm_eps must be a positive float, got {self.layer_norm_eps!r}")

    # ---- derived facts -------------------------------------------------------------------------------------
    @property
    def num_stages(self) -> int:
        return len(self.embed_dims)

    @property
    def reductions(self) -> tuple[int, ...]:
        """Output stride of each stage (4, 8, 16 for the paper's models)."""
        out, r = [], 1
        for s in self.patch_strides:
            r *= s
            out.append(r)
        return tuple(out)

    @property
    def num_features(self) -> int:
        return self.embed_dims[-1]

    def replace(self, **changes: Any) -> CvTConfig:
        """A copy with some fields changed (validated); unknown names are a clear error."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            known = ", ".join(f.name for f in dataclasses.fields(self))
            raise ValueError(f"unknown CvT config field(s) {', '.join(unknown)}; known fields: {known}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CvTConfig:
        return cls().replace(**d)

    def same_architecture(self, other: CvTConfig) -> bool:
        return all(getattr(self, f) == getattr(other, f) for f in ARCHITECTURE_FIELDS)
