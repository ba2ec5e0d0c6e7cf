"""The model zoo: variants as data, `create_model` / `list_models`, and timm registration.

`create_model("cvt_13")` builds the paper's CvT-13; `pretrained=` takes a local checkpoint in any supported format
(see `cvt.weights`). Both it and `timm.create_model("cvt_13")` (after `import cvt`) build through the one builder
in `cvt.models.cvt`, timm's `build_model_with_cfg`, so every model carries timm's `pretrained_cfg`.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .config import ARCHITECTURE_FIELDS, COMPUTE_FIELDS, CvTConfig
from .model import CvT
from .weights import _FIRST_CONV, Checkpoint, CheckpointError, load_into, read_checkpoint


@dataclass(frozen=True)
class Variant:
    config: CvTConfig
    description: str
    input_size: int  # the side it is meant for (MACs in the zoo table are at this size)
    from_paper: bool


_VARIANTS: dict[str, Variant] = {}


def register_variant(name: str, description: str, input_size: int, from_paper: bool, **fields: Any) -> None:
    _VARIANTS[name] = Variant(CvTConfig(**fields), description, input_size, from_paper)


register_variant("cvt_13", "CvT-13 (paper, Table 2)", 224, True)
register_variant("cvt_21", "CvT-21 (paper, Table 2)", 224, True, depths=(1, 4, 16))
register_variant(
    "cvt_w24", "CvT-W24 (paper, Table 2; wide)", 384, True,
    embed_dims=(192, 768, 1024), num_heads=(3, 12, 16), depths=(2, 2, 20), drop_path_rate=0.3,
)
# Not from the paper: small CvTs for 28-64 px images (Fashion-MNIST, CIFAR). Same architecture; 3x3 token
# embeddings instead of the 7x7 stride-4 one (which would leave a 28 px image 7x7 tokens in stage 1).
# cvt_tiny's stride-2 first embedding, MLP ratio 2 and exact GELU were chosen by measurement to fit `make demo`'s
# time on a CPU (the figures: docs/variants.md).
register_variant(
    "cvt_tiny", "not from the paper: 28-64 px images, output strides 2/4/8", 28, False,
    embed_dims=(32, 64, 128), num_heads=(1, 2, 4), depths=(1, 2, 4), mlp_ratio=2.0,
    patch_sizes=(3, 3, 3), patch_strides=(2, 2, 2), patch_paddings=(1, 1, 1), drop_path_rate=0.0,
    act="gelu", num_classes=10,
)
register_variant(
    "cvt_small", "not from the paper: 32-64 px images, output strides 2/4/8", 32, False,
    embed_dims=(64, 128, 256), num_heads=(1, 2, 4), depths=(1, 2, 4),
    patch_sizes=(3, 3, 3), patch_strides=(2, 2, 2), patch_paddings=(1, 1, 1), drop_path_rate=0.1,
    num_classes=10,
)


def list_models(pattern: str = "*") -> list[str]:
    import fnmatch

    return sorted(n for n in _VARIANTS if fnmatch.fnmatch(n, pattern))


def get_variant(name: str) -> Variant:
    if name not in _VARIANTS:
        close = difflib.get_close_matches(name, list(_VARIANTS), n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(close)}?" if close else f"; known models: {', '.join(list_models())}"
        raise ValueError(f"unknown model {name!r}{hint}")
    return _VARIANTS[name]


def default_config(name: str) -> CvTConfig:
    return get_variant(name).config


def _fit_config(name: str | None, ckpt: Checkpoint | None, num_classes: int | None, overrides: dict) -> CvTConfig:
    """The config to build: the named variant's (or the checkpoint's) with the overrides, and the checkpoint's
    class count unless `num_classes` says otherwise."""
    if name is not None:
        cfg = default_config(name).replace(**overrides)
        if ckpt is not None and ckpt.config is not None:
            # Settings that change what the weights compute without changing their shapes come from the file
            # (a GELU model stays GELU under a QuickGELU variant's name), unless the caller set them.
            taken = [f for f in COMPUTE_FIELDS if f not in overrides and f not in ckpt.unrecorded]
            cfg = cfg.replace(**{f: getattr(ckpt.config, f) for f in taken})
            # (in_chans may differ: load_into adapts the first convolution to the channel count)
            diff = [f for f in ARCHITECTURE_FIELDS if f != "in_chans" and getattr(cfg, f) != getattr(ckpt.config, f)]
            if diff:
                raise CheckpointError(
                    f"{ckpt.path} holds another architecture than {name!r} (differs in {', '.join(diff)}); "
                    "build it with cvt.from_pretrained(path) or name the matching model"
                )
    elif ckpt is not None:
        cfg = (ckpt.config or infer_config(ckpt)).replace(**overrides)
    else:
        raise ValueError("name a model or give a checkpoint")
    first_conv = ckpt.state_dict.get(_FIRST_CONV) if ckpt is not None else None
    if first_conv is not None and "in_chans" not in overrides:
        cfg = cfg.replace(in_chans=first_conv.shape[1])  # the file's channel count unless the caller asks another
    if ckpt is not None and "head.weight" in ckpt.state_dict:
        cfg = cfg.replace(num_classes=ckpt.state_dict["head.weight"].shape[0])
    elif ckpt is not None and ckpt.config is not None:
        cfg = cfg.replace(num_classes=ckpt.config.num_classes)
    if num_classes is not None:
        cfg = cfg.replace(num_classes=num_classes)
    return cfg


def infer_config(ckpt: Checkpoint) -> CvTConfig:
    """The registered variant whose weight shapes match a config-less checkpoint (the authors' files)."""
    sd = ckpt.state_dict
    dims = tuple(sd[k].shape[0] for k in sorted(k for k in sd if k.endswith("patch_embed.proj.weight")))
    depths = tuple(
        len({k.split(".")[3] for k in sd if k.startswith(f"stages.{i}.blocks.")}) for i in range(len(dims))
    )
    # Widths and depths name a variant; widths alone name its family (CvT-13 and -21 differ only in depth), and the
    # depths are then the file's: the shapes cannot say more (heads, for one, change none).
    matches = [v.config for v in _VARIANTS.values() if v.config.embed_dims == dims and v.config.depths == depths]
    matches = matches or [v.config.replace(depths=depths) for v in _VARIANTS.values() if v.config.embed_dims == dims]
    if matches:
        num_classes = sd["head.weight"].shape[0] if "head.weight" in sd else 0
        return matches[0].replace(num_classes=num_classes, in_chans=sd[_FIRST_CONV].shape[1])
    raise CheckpointError(
        f"cannot tell which CvT {ckpt.path} holds (embed dims {dims}, depths {depths}); name the model, "
        f"one of {', '.join(list_models())}"
    )


def create_model(
    name: str,
    *,
    pretrained: str | os.PathLike | bool | None = None,
    num_classes: int | None = None,
    features_only: bool = False,
    out_indices: Sequence[int] = (0, 1, 2),
    **overrides: Any,
) -> CvT:
    """Build a registered CvT, optionally from local weights.

    num_classes: None keeps the checkpoint's (or the variant's: 1000 for the paper's models); another number
        than the checkpoint's gets a freshly initialised head (with a warning).
    features_only: a backbone whose forward returns the NCHW maps of `out_indices` (strides 4/8/16).
    overrides: any `CvTConfig` field, e.g. `depths=(1, 2, 2)`, `act="gelu"`, `drop_path_rate=0.2`.
    """
    get_variant(name)  # an unknown name is reported before any file is read
    ckpt = _read(pretrained)
    cfg = _fit_config(name, ckpt, num_classes, overrides)
    return _build(name, cfg, ckpt, features_only, out_indices)


def from_pretrained(
    path: str | os.PathLike, *, features_only: bool = False, out_indices: Sequence[int] = (0, 1, 2), **overrides: Any
) -> CvT:
    """Build the model a checkpoint describes (its config, or the registered variant its shapes match)."""
    ckpt = _read(path)
    num_classes = overrides.pop("num_classes", None)
    cfg = _fit_config(None, ckpt, num_classes, overrides)
    return _build(None, cfg, ckpt, features_only, out_indices)


def _read(pretrained: Any) -> Checkpoint | None:
    if pretrained is None or pretrained is False:
        return None
    return read_checkpoint(pretrained)


def _build(
    name: str | None, cfg: CvTConfig, ckpt: Checkpoint | None, features_only: bool, out_indices: Sequence[int]
) -> CvT:
    from .models.cvt import build_cvt

    # The checkpoint is read and fitted here (its config, class names, channel adaptation); timm's builder makes
    # the model and its pretrained_cfg. num_classes and in_chans are passed so that the cfg's do not replace them.
    model = build_cvt(name or _variant_like(cfg), cfg, num_classes=cfg.num_classes, in_chans=cfg.in_chans)
    if ckpt is not None:
        load_into(model, ckpt, backbone=features_only)
        if ckpt.class_names is not None and len(ckpt.class_names) == cfg.num_classes:
            model.class_names = list(ckpt.class_names)
    if features_only:
        model.as_backbone(out_indices)
    return model


def _variant_like(cfg: CvTConfig) -> str | None:
    """The registered variant whose pretrained cfg (input size, preprocessing) describes a model built from a
    checkpoint's own config: the one of the same widths and strides; None for an architecture of its own."""
    for name, v in _VARIANTS.items():
        if (v.config.embed_dims, v.config.patch_strides) == (cfg.embed_dims, cfg.patch_strides):
            return name
    return None
