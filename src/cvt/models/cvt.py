"""The CvT models as timm builds them: `timm.create_model("cvt_13")` after `import cvt`.

The second half of a timm model file, read top to bottom: the checkpoint filter that lets timm's loader take every
format cvt reads, the builder, the pretrained configs as data, and one short `@register_model` entry point per
variant. The architecture is `cvt.model` and the variants' configs are `cvt.registry`; this module only builds them
timm's way (`build_model_with_cfg`), so every model carries a `pretrained_cfg`, works with timm's `features_only`
wrappers and loads weights through timm's `load_pretrained`. The module's name is what timm lists:
`timm.list_models(module="cvt")`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import register_notrace_module
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from ..config import CvTConfig
from ..model import Block, CvT, min_input_side
from ..registry import default_config, get_variant
from ..weights import CheckpointError, fit_state_dict, to_ours, weights_in_folder

__all__ = ["build_cvt", "checkpoint_filter_fn"]


# ---------------------------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------------------------
def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: CvT) -> dict[str, torch.Tensor]:
    """The authors', Hugging Face's or cvt's state dict in this model's key names, fitted strictly.

    timm calls it between reading a checkpoint and `load_state_dict`: the keys are renamed (`cvt.weights.to_ours`,
    idempotent), and anything that does not fit the model (missing, unexpected or mis-shaped keys) is a
    `CheckpointError` naming them, as in `cvt.create_model`. Left to timm: a head for another class count than the
    pretrained cfg's (timm drops it) and the first convolution for another channel count (timm adapts it)."""
    state_dict = to_ours(state_dict)
    own = model.state_dict()
    pretrained_cfg = getattr(model, "pretrained_cfg", None) or {}  # set by timm's builder before it loads
    source = _source_name(pretrained_cfg)
    if "head.weight" in own and model.num_classes != pretrained_cfg.get("num_classes", model.num_classes):
        # A new head was asked for: the file's is not loaded (timm discards it too) and the model keeps its own.
        state_dict.update({k: v for k, v in own.items() if k.startswith("head.")})
        model.fresh_classifier = True
    return fit_state_dict(model, state_dict, source, adapt_first_conv=False)


def _source_name(pretrained_cfg: dict[str, Any]) -> str:
    return str(pretrained_cfg.get("file") or pretrained_cfg.get("hf_hub_id") or pretrained_cfg.get("url") or
               "the checkpoint")


def _local_weights(overlay: dict[str, Any] | None, pretrained: Any) -> dict[str, Any]:
    """The pretrained_cfg overlay with a local `file` timm can read: `pretrained=<path>` is taken as that file, and
    a folder saved by transformers' `save_pretrained` (which timm's loader does not open) becomes its weights file,
    as `cvt.read_checkpoint` would choose it."""
    overlay = dict(overlay or {})
    if isinstance(pretrained, (str, os.PathLike)):
        overlay.setdefault("file", os.fspath(pretrained))
    if overlay.get("file"):
        path = Path(overlay["file"]).expanduser()
        if not path.exists():
            raise CheckpointError(f"checkpoint {path} does not exist")
        overlay["file"] = str(weights_in_folder(path) if path.is_dir() else path)
    return overlay


# ---------------------------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------------------------
# timm's FX tracer (feature_cls="fx", its tests) keeps a block whole, so the graph runs the block's own forward,
# fast paths included, and computes exactly what the module does; torch.fx's default tracer still traces through it.
register_notrace_module(Block)


def _cvt(cfg: CvTConfig, output_stride: int | None = None, **fields: Any) -> CvT:
    # timm hands the model its keyword arguments (num_classes, in_chans, drop_path_rate, ...): config fields, so
    # an unknown one is CvTConfig's one-line error naming the known fields.
    cfg = cfg.replace(**fields) if fields else cfg
    # timm's output_stride (smp's DeepLabV3 asks for 16): a CvT has no dilated variant, so only its own last
    # reduction can be honoured.
    if output_stride is not None and output_stride != cfg.reductions[-1]:
        raise ValueError(f"output_stride {output_stride}: this CvT's maps end at stride {cfg.reductions[-1]} and it "
                         "has no dilated form to change that")
    return CvT(cfg)


def build_cvt(variant: str | None, cfg: CvTConfig, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """timm's `build_model_with_cfg` for a CvT config: the one builder behind `timm.create_model` and
    `cvt.create_model`. `variant` names the pretrained cfg (None: a generic one without weights, for an
    architecture of its own); `kwargs` are timm's (`features_only`, `out_indices`, `feature_cls`,
    `pretrained_cfg_overlay`, ...) and config fields."""
    feature_cfg = dict(feature_cls="getter", out_indices=tuple(range(cfg.num_stages)))
    feature_cfg.update(kwargs.pop("feature_cfg", None) or {})
    if variant is None:
        variant = "cvt"
        kwargs.setdefault("pretrained_cfg", _cfg_for(cfg, cfg.in_chans, 224, origin_url=None))
    return build_model_with_cfg(
        _cvt, variant, pretrained, model_cfg=cfg, feature_cfg=feature_cfg, pretrained_filter_fn=checkpoint_filter_fn,
        **kwargs,
    )


def _create_cvt(variant: str, pretrained: Any = False, **kwargs: Any) -> nn.Module:
    if pretrained:
        kwargs["pretrained_cfg_overlay"] = _local_weights(kwargs.get("pretrained_cfg_overlay"), pretrained)
    try:
        return build_cvt(variant, default_config(variant), bool(pretrained), **kwargs)
    except RuntimeError as e:
        # timm reads pickles with torch.load(weights_only=True) and refuses one that would import or run code;
        # say so as cvt does, naming the file.
        if "weights_only" not in str(e):
            raise
        file = (kwargs.get("pretrained_cfg_overlay") or {}).get("file", "the checkpoint")
        raise CheckpointError(
            f"refused to load {file}: it is a pickle that would import or run code; only plain tensors are loaded "
            f"({e})"
        ) from None


# ---------------------------------------------------------------------------------------------------------------
# Pretrained configs
# ---------------------------------------------------------------------------------------------------------------
def _cfg_for(cfg: CvTConfig, in_chans: int, side: int, **kwargs: Any) -> dict[str, Any]:
    smallest = min_input_side(cfg)
    return {
        "num_classes": cfg.num_classes,
        "input_size": (in_chans, side, side),
        "min_input_size": (in_chans, smallest, smallest),  # what CvT._check_input accepts
        "fixed_input_size": False,  # no position embedding: any size
        "pool_size": None,  # the head reads the cls token, not a pooled map
        "crop_pct": 0.875,
        "crop_mode": "center",
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stages.0.patch_embed.proj",
        "classifier": "head",
        "license": "mit",
        "paper_ids": "arXiv:2103.15808",
        "paper_name": "CvT: Introducing Convolutions to Vision Transformers",
        "origin_url": "https://github.com/microsoft/CvT",
        **kwargs,
    }


def _cfg(variant: str, **kwargs: Any) -> dict[str, Any]:
    v = get_variant(variant)
    return _cfg_for(v.config, v.config.in_chans, v.input_size, **kwargs)


# The authors' evaluation (REFERENCE, training recipe): at 224 resize then centre-crop 87.5%; at 384 the whole
# image resized to 384 x 384, no crop (timm's crop_mode "squash").
_AT_384 = dict(input_size=(3, 384, 384), crop_pct=1.0, crop_mode="squash")
# The released weights, as the Hugging Face Hub keeps them (transformers' layout; `checkpoint_filter_fn` renames
# them). Every one has a 1000-class ImageNet-1k head; the 22k ones were pre-trained on ImageNet-22k.
_MS = "The authors' released weights (microsoft/CvT) as the Hugging Face Hub keeps them, in transformers' layout."
default_cfgs = generate_default_cfgs({
    "cvt_13.ms_in1k": _cfg("cvt_13", hf_hub_id="microsoft/cvt-13", description=_MS),
    "cvt_13.ms_in1k_384": _cfg("cvt_13", hf_hub_id="microsoft/cvt-13-384", description=_MS, **_AT_384),
    "cvt_13.ms_in22k_ft_in1k_384": _cfg("cvt_13", hf_hub_id="microsoft/cvt-13-384-22k", description=_MS, **_AT_384),
    "cvt_21.ms_in1k": _cfg("cvt_21", hf_hub_id="microsoft/cvt-21", description=_MS),
    "cvt_21.ms_in1k_384": _cfg("cvt_21", hf_hub_id="microsoft/cvt-21-384", description=_MS, **_AT_384),
    "cvt_21.ms_in22k_ft_in1k_384": _cfg("cvt_21", hf_hub_id="microsoft/cvt-21-384-22k", description=_MS, **_AT_384),
    "cvt_w24.ms_in22k_ft_in1k_384": _cfg("cvt_w24", hf_hub_id="microsoft/cvt-w24-384-22k", description=_MS,
                                         **_AT_384),
    # Not from the paper, no published weights: for 28-64 px images, which are not cropped.
    "cvt_tiny": _cfg("cvt_tiny", crop_pct=1.0, origin_url=None, paper_ids=None, paper_name=None),
    "cvt_small": _cfg("cvt_small", crop_pct=1.0, origin_url=None, paper_ids=None, paper_name=None),
})


# ---------------------------------------------------------------------------------------------------------------
# Entry points (the variants' configs: cvt.registry)
# ---------------------------------------------------------------------------------------------------------------
@register_model
def cvt_13(pretrained: bool = False, **kwargs: Any) -> CvT:
    """CvT-13 (paper, Table 2)."""
    return _create_cvt("cvt_13", pretrained, **kwargs)


@register_model
def cvt_21(pretrained: bool = False, **kwargs: Any) -> CvT:
    """CvT-21 (paper, Table 2)."""
    return _create_cvt("cvt_21", pretrained, **kwargs)


@register_model
def cvt_w24(pretrained: bool = False, **kwargs: Any) -> CvT:
    """CvT-W24 (paper, Table 2; wide)."""
    return _create_cvt("cvt_w24", pretrained, **kwargs)


@register_model
def cvt_tiny(pretrained: bool = False, **kwargs: Any) -> CvT:
    """Not from the paper: a small CvT for 28-64 px images (output strides 2/4/8)."""
    return _create_cvt("cvt_tiny", pretrained, **kwargs)


@register_model
def cvt_small(pretrained: bool = False, **kwargs: Any) -> CvT:
    """Not from the paper: a small CvT for 32-64 px images (output strides 2/4/8)."""
    return _create_cvt("cvt_small", pretrained, **kwargs)
