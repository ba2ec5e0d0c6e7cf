"""CvT with one of its design choices undone, for the paper's ablations on small data (docs/comparison.md):
`timm.create_model(name)` after `import cvt`, `cvt train --model timm:<name>`
(`timm.list_models(module="ablations")`).

- `cvt_tiny_pos`: cvt_tiny plus a learned absolute position embedding added to every stage's tokens after its
  convolutional embedding (the paper's Table 5 "every stage" row; the authors' code carries the option, off and
  unused). The embeddings are sized for `img_size` (default 28) and interpolated bicubically at any other size, as
  timm interpolates a ViT's.
- `cvt_tiny_linear`: cvt_tiny with the depthwise-convolution + BatchNorm projections of q, k and v removed (the
  authors' `method="linear"`, the paper's Table 6 "none" row): q, k and v are the tokens through their Linear
  layers only, and k/v are not subsampled, so each stage attends over all of its tokens.

Both keep cvt_tiny's every other weight and hyper-parameter; neither has published weights.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models import generate_default_cfgs, register_model
from torch import nn

from ..model import ConvEmbed, ConvProjection, CvT, output_size
from ..registry import default_config
from .baselines import FASHION_MNIST_MEAN, FASHION_MNIST_STD
from .cvt import build_cvt

__all__ = ["PositionalConvEmbed", "TokenProjection", "add_position_embeddings", "remove_conv_projections"]


class PositionalConvEmbed(ConvEmbed):
    """A stage's convolutional token embedding followed by a learned absolute position embedding of `grid` tokens
    (interpolated bicubically to any other token grid)."""

    def __init__(self, embed: ConvEmbed, grid: tuple[int, int]):
        super().__init__(embed.proj.in_channels, embed.proj.out_channels, embed.proj.kernel_size[0],
                         embed.proj.stride[0], embed.proj.padding[0], embed.norm.eps)
        self.load_state_dict(embed.state_dict())
        self.pos_embed = nn.Parameter(torch.zeros(1, embed.proj.out_channels, *grid))  # (1, C, H, W)
        trunc_normal_(self.pos_embed, std=0.02)  # as timm's ViT

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x, h, w = super().forward(x)  # (B, H*W, C)
        pos = self.pos_embed
        if pos.shape[-2:] != (h, w):
            pos = F.interpolate(pos, size=(h, w), mode="bicubic", align_corners=False)
        return x + pos.flatten(2).transpose(1, 2), h, w  # (1, C, H, W) -> (1, H*W, C)


class TokenProjection(nn.Module):
    """The identity in place of a q/k/v convolutional projection: map in, the same tokens out (no subsampling)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, H*W, C)


def add_position_embeddings(model: CvT, img_size: int) -> CvT:
    """`model` with a `PositionalConvEmbed` in every stage, sized for `img_size` x `img_size` inputs."""
    grids = output_size(model.cfg, img_size, img_size)
    for stage, grid in zip(model.stages, grids):
        stage.patch_embed = PositionalConvEmbed(stage.patch_embed, grid)
    return model


def remove_conv_projections(model: CvT) -> CvT:
    """`model` with every q/k/v `ConvProjection` replaced by a `TokenProjection`."""
    for attn in [m for m in model.modules() if hasattr(m, "conv_proj_q")]:
        for name in ("conv_proj_q", "conv_proj_k", "conv_proj_v"):
            assert isinstance(getattr(attn, name), ConvProjection)
            setattr(attn, name, TokenProjection())
    return model


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "", "num_classes": 10, "input_size": (1, 28, 28), "pool_size": None, "crop_pct": 1.0,
        "interpolation": "bicubic", "mean": FASHION_MNIST_MEAN, "std": FASHION_MNIST_STD,
        "first_conv": "stages.0.patch_embed.proj", "classifier": "head", "license": "apache-2.0", **kwargs,
    }


default_cfgs = generate_default_cfgs({
    # Not fixed in fact (the embedding is interpolated at other sizes), but flagged so that timm and `cvt train`
    # pass the training side as `img_size`, which sizes the embedding's grid.
    "cvt_tiny_pos": _cfg(fixed_input_size=True),
    "cvt_tiny_linear": _cfg(),
})


def _tiny(variant: str, pretrained: bool, kwargs: dict[str, Any]) -> CvT:
    if pretrained:
        raise ValueError(f"{variant} has no published weights")
    if kwargs.get("features_only"):
        raise ValueError(f"{variant} is built for classification only (no features_only)")
    kwargs.setdefault("in_chans", 1)
    # timm adds `img_size` for a cfg with a fixed input size; it sizes the position embedding, not the CvT
    return build_cvt(variant, default_config("cvt_tiny"), False, kwargs_filter=("img_size",), **kwargs)


@register_model
def cvt_tiny_pos(pretrained: bool = False, img_size: int = 28, **kwargs: Any) -> CvT:
    """cvt_tiny with a learned absolute position embedding in every stage, sized for `img_size` px."""
    return add_position_embeddings(_tiny("cvt_tiny_pos", pretrained, kwargs), img_size)


@register_model
def cvt_tiny_linear(pretrained: bool = False, **kwargs: Any) -> CvT:
    """cvt_tiny with linear q/k/v projections (no depthwise convolution, no k/v subsampling)."""
    return remove_conv_projections(_tiny("cvt_tiny_linear", pretrained, kwargs))
