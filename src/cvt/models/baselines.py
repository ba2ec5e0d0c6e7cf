"""Baselines for comparing CvT on 28 px images, built from timm's own classes: `timm.create_model(name)` after
`import cvt`, `cvt train --model timm:<name>` (`timm.list_models(module="baselines")`).

- `resnet_cifar_small`, `resnet_cifar_base`: timm's `ResNet` of `BasicBlock`s (ResNet-18's 2-2-2-2) at a quarter and
  at 9/16 of its width, with the CIFAR stem: one 3x3 stride-1 convolution and no max-pool. No timm argument builds
  that stem (its stems all stride 2, and a max-pool or a stride-2 convolution follows), and the ImageNet stem leaves
  a 28 px image 7x7 before the first stage.
- `vit_fmnist_small`, `vit_fmnist_base`: timm's `VisionTransformer` at 28 px with 4 px patches (7x7 tokens), a
  class token and a learned position embedding; the base one has ViT-Ti's width and heads.

Parameters with 10 classes and 1 input channel (the default: Fashion-MNIST), against cvt_tiny's 722,954:

    resnet_cifar_small   701,178      vit_fmnist_small   678,730
    resnet_cifar_base  3,538,918      vit_fmnist_base  3,574,282

None has published weights; every one takes `num_classes`, `in_chans` and its class's keyword arguments (e.g.
`channels=(8, 16, 32, 64)`, `depth=4`, `img_size=32` for a ViT).
"""

from __future__ import annotations

from typing import Any

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, ResNet
from timm.models.vision_transformer import VisionTransformer, _create_vision_transformer
from torch import nn

__all__ = ["CifarResNet"]

FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)  # cvt.data's (not imported: `import cvt` stays light)


class CifarResNet(ResNet):
    """timm's `ResNet` with the CIFAR stem: a 3x3 stride-1 convolution to `channels[0]`, BatchNorm, ReLU, no max-pool,
    so the first stage runs at the input's resolution (output strides 1/2/4/8 instead of 4/8/16/32)."""

    def __init__(self, *, channels: tuple[int, ...] = (64, 128, 256, 512), in_chans: int = 3, **kwargs: Any):
        if channels[0] % 2:
            raise ValueError(f"CifarResNet's first stage width must be even, got channels {tuple(channels)}")
        for name in ("stem_type", "stem_width", "replace_stem_pool"):
            if name in kwargs:
                raise ValueError(f"CifarResNet builds its own stem: {name} is not one of its arguments")
        # ResNet's plain stem is always 64 wide; its deep stem ends at 2 * stem_width, which sizes the first stage's
        # input (and bn1) at channels[0]. That stem is then replaced by the CIFAR one.
        super().__init__(channels=channels, in_chans=in_chans, stem_type="deep", stem_width=channels[0] // 2,
                         **kwargs)
        self.conv1 = nn.Conv2d(in_chans, channels[0], kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")  # as ResNet.init_weights
        self.maxpool = nn.Identity()
        self.feature_info[0]["reduction"] = 1  # the stem no longer halves the image ...
        for info in self.feature_info[1:]:
            info["reduction"] //= 4  # ... nor does the max-pool: every stage is 4x finer than ResNet's


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "", "num_classes": 10, "input_size": (1, 28, 28), "pool_size": (4, 4), "crop_pct": 1.0,
        "interpolation": "bicubic", "mean": FASHION_MNIST_MEAN, "std": FASHION_MNIST_STD, "first_conv": "conv1",
        "classifier": "fc", "license": "apache-2.0", **kwargs,
    }


# A ViT's position embedding fixes its input size: timm passes `img_size` to models whose cfg says so.
_VIT = dict(pool_size=None, fixed_input_size=True, first_conv="patch_embed.proj", classifier="head")
default_cfgs = generate_default_cfgs({
    "resnet_cifar_small": _cfg(),
    "resnet_cifar_base": _cfg(),
    "vit_fmnist_small": _cfg(**_VIT),
    "vit_fmnist_base": _cfg(**_VIT),
})


def _resnet(variant: str, pretrained: bool, **kwargs: Any) -> CifarResNet:
    return build_model_with_cfg(CifarResNet, variant, pretrained, **kwargs)


def _vit(variant: str, pretrained: bool, **kwargs: Any) -> VisionTransformer:
    # timm's own ViT builder (features_only, its checkpoint filter); the classic ViT whatever TIMM_USE_NAFLEXVIT says
    return _create_vision_transformer(variant, pretrained, use_naflex=False, **kwargs)


@register_model
def resnet_cifar_small(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-18 (2-2-2-2 BasicBlocks) at a quarter width, 16/32/64/128, CIFAR stem: 701,178 parameters."""
    model_args = dict(block=BasicBlock, layers=(2, 2, 2, 2), channels=(16, 32, 64, 128))
    return _resnet("resnet_cifar_small", pretrained, **dict(model_args, **kwargs))


@register_model
def resnet_cifar_base(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-18 (2-2-2-2 BasicBlocks) at 9/16 width, 36/72/144/288, CIFAR stem: 3,538,918 parameters."""
    model_args = dict(block=BasicBlock, layers=(2, 2, 2, 2), channels=(36, 72, 144, 288))
    return _resnet("resnet_cifar_base", pretrained, **dict(model_args, **kwargs))


@register_model
def vit_fmnist_small(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT at 28 px, 4 px patches, width 96, 6 blocks of 3 heads: 678,730 parameters."""
    model_args = dict(img_size=28, patch_size=4, embed_dim=96, depth=6, num_heads=3)
    return _vit("vit_fmnist_small", pretrained, **dict(model_args, **kwargs))


@register_model
def vit_fmnist_base(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT at 28 px, 4 px patches, width 192, 8 blocks of 3 heads (ViT-Ti's width): 3,574,282 parameters."""
    model_args = dict(img_size=28, patch_size=4, embed_dim=192, depth=8, num_heads=3)
    return _vit("vit_fmnist_base", pretrained, **dict(model_args, **kwargs))
