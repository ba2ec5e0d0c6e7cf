"""Object detection and instance segmentation over a CvT feature pyramid, with torchvision's detectors.

CvT's three stages give maps at strides 4/8/16. `PyramidBackbone` names them '0', '1', '2', adds a stride-32 level
'3' by 2x2 max-pooling the last map (as ViTDet builds its coarser levels from one map), feeds the four into
torchvision's `FeaturePyramidNetwork`, whose `LastLevelMaxPool` adds 'pool' at stride 64. That is ResNet-FPN's
P2-P6 geometry, so torchvision's anchors (one size per level, three aspect ratios) and its `MultiScaleRoIAlign`
poolers over '0'..'3' apply unchanged; FPN, anchors, heads, losses, box coding, NMS and the resizing transform are
torchvision's own. Any timm `features_only` model is a backbone too (`backbone="timm:resnet18"`): its stride
4/8/16/32 maps are '0'..'3' directly, so CvT and ResNet-FPN can be compared with everything else equal.

    model = fasterrcnn_cvt_fpn("cvt_13", num_classes=11, backbone_weights="runs/cls/model.safetensors")
    model = maskrcnn_cvt_fpn("timm:resnet18", num_classes=11, fpn_channels=64, min_size=128, max_size=192)

The builders return torchvision models (`FasterRCNN`, `MaskRCNN`, `RetinaNet`, `FCOS`) and take their keyword
arguments (`min_size`, `max_size`, `box_batch_size_per_image`, `rpn_*`, ...). Their defaults are torchvision's,
made for 800 px COCO; `cvt.tasks.detection.SMALL_DEFAULTS` sizes them for 100 px images. As torchvision does, a
backbone with pretrained weights is fine-tuned with its BatchNorms frozen (`FrozenBatchNorm2d`: 1-2 images per
device give no usable batch statistics) and its first stages frozen (`trainable_layers`); a backbone trained from
scratch trains everything.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import FeaturePyramidNetwork, FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

HEADS = ("fasterrcnn", "maskrcnn", "retinanet", "fcos")
TIMM_PREFIX = "timm:"
# torchvision's RPN anchors for ResNet-FPN, one size per level P2-P6 (three aspect ratios each).
DEFAULT_ANCHOR_SIZES = (32, 64, 128, 256, 512)
ASPECT_RATIOS = (0.5, 1.0, 2.0)
PYRAMID_STRIDES = (4, 8, 16, 32)  # '0'..'3'; 'pool' (64) comes from LastLevelMaxPool


# ---------------------------------------------------------------------------------------------------------------
# The backbone: a features_only model, its maps as P2-P5 inputs, an FPN
# ---------------------------------------------------------------------------------------------------------------
class PyramidBackbone(nn.Module):
    """`body`'s maps at strides 4/8/16(/32) as an `OrderedDict` '0'..'3' through a `FeaturePyramidNetwork` with
    `LastLevelMaxPool`: torchvision's backbone contract (`out_channels`, named maps), ResNet-FPN's P2-P6.

    A body without a stride-32 map (CvT) gets one by 2x2 max-pooling its last map before the FPN."""

    def __init__(self, body: nn.Module, channels: list[int], reductions: list[int], out_channels: int = 256):
        super().__init__()
        if list(reductions) not in (list(PYRAMID_STRIDES[:3]), list(PYRAMID_STRIDES)):
            raise ValueError(
                "a detection backbone needs maps at strides 4/8/16 (and 32); this one has "
                f"{'/'.join(map(str, reductions))}"
                " (cvt_tiny and cvt_small stop at stride 8: use cvt_13-like strides, e.g. cvt_13 with smaller "
                "model_args embed_dims)"
            )
        self.body = body
        self.pool_last = len(reductions) == 3  # '3' = max-pool of '2'
        in_channels = list(channels) + ([channels[-1]] if self.pool_last else [])
        self.fpn = FeaturePyramidNetwork(in_channels, out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels  # torchvision's detectors read it

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        maps = list(self.body(x))  # [(B, C_i, H/4, W/4), (B, C_i, H/8, W/8), (B, C_i, H/16, W/16)(, H/32)]
        if self.pool_last:
            maps.append(F.max_pool2d(maps[-1], kernel_size=2, stride=2))  # (B, C_2, H/32, W/32), as ViTDet
        return self.fpn(OrderedDict((str(i), m) for i, m in enumerate(maps)))


def _freeze_batchnorm(module: nn.Module) -> int:
    """Replace every BatchNorm2d under `module` by torchvision's FrozenBatchNorm2d holding its statistics and affine
    parameters (CvT's q/k/v projections call their `.bn` as a module, so the swap reaches them). Returns the count."""
    count = 0
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            with torch.no_grad():
                if child.affine:
                    frozen.weight.copy_(child.weight)
                    frozen.bias.copy_(child.bias)
                if child.track_running_stats:
                    frozen.running_mean.copy_(child.running_mean)
                    frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
            count += 1
        else:
            count += _freeze_batchnorm(child)
    return count


def _stage_groups(body: nn.Module, is_cvt: bool) -> list[list[str]]:
    """The body's parameter-name prefixes stage by stage, input side first: what `trainable_layers` counts from the
    end. CvT: its stages. timm: the stem, then each feature stage with what precedes it (ResNet: conv1+bn1,
    maxpool+layer1, layer2, layer3, layer4, as torchvision counts ResNet's five)."""
    if is_cvt:
        return [[f"stages.{i}."] for i in range(len(body.stages))]
    ends = [info["module"].replace(".", "_") for info in body.feature_info.info]  # FeatureListNet's child names
    groups, current = [], []
    for name, _ in body.named_children():
        current.append(f"{name}.")
        if name in ends:
            groups.append(current)
            current = []
    if current:
        groups.append(current)
    return groups


def _default_trainable(body: nn.Module, is_cvt: bool, pretrained: bool) -> int:
    """All stages from scratch; with weights, those after the stride-4 stage (torchvision's ResNet default, 3 of 5,
    freezes the stem and layer1 likewise; CvT: 2 of 3)."""
    groups = _stage_groups(body, is_cvt)
    if not pretrained:
        return len(groups)
    reductions = _maps(body)[1] if is_cvt else [i["reduction"] for i in body.feature_info.info]
    return len(groups) - sum(1 for r in reductions[: len(groups)] if r <= 4)


def _maps(body: nn.Module) -> tuple[list[int], list[int]]:
    """Channels and strides of the maps `body` returns: timm's `FeatureInfo`, or a list of its dicts."""
    info = body.feature_info
    if hasattr(info, "channels"):
        return list(info.channels()), list(info.reduction())
    return [i["num_chs"] for i in info], [i["reduction"] for i in info]


def _freeze_stages(body: nn.Module, trainable_layers: int, is_cvt: bool) -> None:
    groups = _stage_groups(body, is_cvt)
    if not 0 <= trainable_layers <= len(groups):
        raise ValueError(f"trainable_layers must be between 0 and {len(groups)} for this backbone, "
                         f"got {trainable_layers}")
    train = tuple(p for group in groups[len(groups) - trainable_layers:] for p in group)
    for name, param in body.named_parameters():
        if not name.startswith(train):
            param.requires_grad_(False)


def build_body(backbone: str, weights: str | os.PathLike | None = None, **args: Any) -> tuple[nn.Module, dict]:
    """The features_only model named `backbone` ("cvt_13", any `cvt zoo` name, or "timm:<name>"), from `weights`
    when given (cvt: any format cvt loads; timm: a file timm's loader reads), and a record that rebuilds it
    (`{"backbone": ..., "backbone_args": ...}`, the CvT's whole config for a CvT)."""
    if backbone and backbone.startswith(TIMM_PREFIX):
        import timm

        name = backbone[len(TIMM_PREFIX):]
        extra = dict(pretrained=True, pretrained_cfg_overlay=dict(file=os.fspath(weights))) if weights else {}
        probe = timm.create_model(name, features_only=True, pretrained=False, **args)
        indices = [i for i, r in enumerate(probe.feature_info.reduction()) if r in PYRAMID_STRIDES]
        body = timm.create_model(name, features_only=True, out_indices=indices, **args, **extra)
        return body, {"backbone": backbone, "backbone_args": dict(args)}
    from .config import CvTConfig
    from .model import CvT
    from .registry import create_model, from_pretrained

    args = {"in_chans": 3, **args}  # detection images are RGB (grey ones repeated); a 1-channel stem is adapted
    if "config" in args:  # a saved detector's backbone: its whole config, no weights to read
        body = CvT(CvTConfig.from_dict(args["config"]), features_only=True, out_indices=(0, 1, 2))
    elif weights and not backbone:
        body = from_pretrained(weights, features_only=True, **args)
    else:
        body = create_model(backbone, pretrained=weights or None, features_only=True, **args)
    config = body.cfg.replace(num_classes=0).to_dict()
    return body, {"backbone": backbone or None, "backbone_args": {"config": config}}


def cvt_fpn_backbone(
    backbone: str = "cvt_13",
    *,
    backbone_weights: str | os.PathLike | None = None,
    trainable_layers: int | None = None,
    frozen_bn: bool | None = None,
    fpn_channels: int = 256,
    backbone_args: dict[str, Any] | None = None,
) -> tuple[PyramidBackbone, dict]:
    """The P2-P6 backbone of the builders below and the record (`build_detector` kwargs) that rebuilds it.

    trainable_layers: stages trained, counted from the output side (CvT: 0-3, timm ResNet: 0-5); default all of
        them from scratch, all but the first with `backbone_weights` (torchvision's rule: ResNet 3 of 5).
    frozen_bn: BatchNorms as FrozenBatchNorm2d; default: when `backbone_weights` are given, as torchvision."""
    is_cvt = not (backbone or "").startswith(TIMM_PREFIX)
    body, record = build_body(backbone, backbone_weights, **(backbone_args or {}))
    if frozen_bn is None:
        frozen_bn = backbone_weights is not None
    if frozen_bn:
        _freeze_batchnorm(body)
    if trainable_layers is None:
        trainable_layers = _default_trainable(body, is_cvt, backbone_weights is not None)
    _freeze_stages(body, trainable_layers, is_cvt)
    pyramid = PyramidBackbone(body, *_maps(body), fpn_channels)
    record.update(frozen_bn=frozen_bn, trainable_layers=trainable_layers, fpn_channels=fpn_channels)
    return pyramid, record


def anchor_generator(head: str, sizes: tuple[int, ...] = DEFAULT_ANCHOR_SIZES) -> AnchorGenerator:
    """Anchors per level P2-P6 from one base size a level (torchvision's RPN: 32..512 x ratios 0.5/1/2).
    RetinaNet: three octave scales a level, as torchvision's; FCOS: one point a level of side base/8, which for the
    default sizes is the level's stride, as FCOS defines its locations."""
    if len(sizes) != 5:
        raise ValueError(f"anchor_sizes needs one size for each of the 5 levels P2-P6, got {tuple(sizes)}")
    if head == "retinanet":
        per_level = tuple((s, int(s * 2 ** (1 / 3)), int(s * 2 ** (2 / 3))) for s in sizes)
        return AnchorGenerator(per_level, (ASPECT_RATIOS,) * 5)
    if head == "fcos":
        return AnchorGenerator(tuple((max(1, s // 8),) for s in sizes), ((1.0,),) * 5)
    return AnchorGenerator(tuple((s,) for s in sizes), (ASPECT_RATIOS,) * 5)


# ---------------------------------------------------------------------------------------------------------------
# Builders, named as torchvision's
# ---------------------------------------------------------------------------------------------------------------
def build_detector(
    head: str = "fasterrcnn",
    backbone: str = "cvt_13",
    *,
    num_classes: int = 91,
    backbone_weights: str | os.PathLike | None = None,
    trainable_layers: int | None = None,
    frozen_bn: bool | None = None,
    fpn_channels: int = 256,
    representation_size: int = 1024,
    mask_channels: int = 256,
    anchor_sizes: tuple[int, ...] = DEFAULT_ANCHOR_SIZES,
    backbone_args: dict[str, Any] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """A torchvision detector (`head`: one of HEADS) over the P2-P6 pyramid of `backbone`. `num_classes` counts the
    background (COCO: 91). `representation_size`: width of Faster/Mask R-CNN's two-layer box head (torchvision
    1024); `mask_channels`: width of Mask R-CNN's four mask convolutions (256). Other `kwargs` go to the
    torchvision class (min_size, max_size, box_batch_size_per_image, rpn_post_nms_top_n_train, ...).

    The model carries `detector_config`: these arguments (weights excepted), which `build_detector(**config)`
    rebuilds it from for weights saved from it."""
    if head not in HEADS:
        raise ValueError(f"head must be one of {', '.join(HEADS)}, got {head!r}")
    if head == "fcos" and fpn_channels % 32:
        raise ValueError(f"fcos: fpn_channels must be a multiple of 32 (its head's GroupNorm has 32 groups), "
                         f"got {fpn_channels}")
    pyramid, record = cvt_fpn_backbone(
        backbone, backbone_weights=backbone_weights, trainable_layers=trainable_layers, frozen_bn=frozen_bn,
        fpn_channels=fpn_channels, backbone_args=backbone_args,
    )
    anchors = anchor_generator(head, tuple(anchor_sizes))
    if head in ("fasterrcnn", "maskrcnn"):
        resolution = 7  # MultiScaleRoIAlign's output side, torchvision's default box pooler
        parts: dict[str, Any] = dict(
            rpn_anchor_generator=anchors, box_head=TwoMLPHead(fpn_channels * resolution**2, representation_size),
            box_predictor=FastRCNNPredictor(representation_size, num_classes),
        )
        if head == "maskrcnn":
            parts.update(mask_head=MaskRCNNHeads(fpn_channels, (mask_channels,) * 4, 1),
                         mask_predictor=MaskRCNNPredictor(mask_channels, mask_channels, num_classes))
            model = MaskRCNN(pyramid, num_classes=None, **parts, **kwargs)
        else:
            model = FasterRCNN(pyramid, num_classes=None, **parts, **kwargs)
    elif head == "retinanet":
        model = RetinaNet(pyramid, num_classes, anchor_generator=anchors, **kwargs)
    else:
        model = FCOS(pyramid, num_classes, anchor_generator=anchors, **kwargs)
    model.detector_config = dict(
        head=head, num_classes=num_classes, representation_size=representation_size, mask_channels=mask_channels,
        anchor_sizes=list(anchor_sizes), **record, **kwargs,
    )
    return model


def fasterrcnn_cvt_fpn(backbone: str = "cvt_13", *, num_classes: int = 91,
                       backbone_weights: str | os.PathLike | None = None, trainable_layers: int | None = None,
                       **kwargs: Any) -> FasterRCNN:
    """Faster R-CNN over a CvT (or "timm:<name>") FPN; see `build_detector`."""
    return build_detector("fasterrcnn", backbone, num_classes=num_classes, backbone_weights=backbone_weights,
                          trainable_layers=trainable_layers, **kwargs)


def maskrcnn_cvt_fpn(backbone: str = "cvt_13", *, num_classes: int = 91,
                     backbone_weights: str | os.PathLike | None = None, trainable_layers: int | None = None,
                     **kwargs: Any) -> MaskRCNN:
    """Mask R-CNN over a CvT (or "timm:<name>") FPN; see `build_detector`."""
    return build_detector("maskrcnn", backbone, num_classes=num_classes, backbone_weights=backbone_weights,
                          trainable_layers=trainable_layers, **kwargs)


def retinanet_cvt_fpn(backbone: str = "cvt_13", *, num_classes: int = 91,
                      backbone_weights: str | os.PathLike | None = None, trainable_layers: int | None = None,
                      **kwargs: Any) -> RetinaNet:
    """RetinaNet over a CvT (or "timm:<name>") FPN, on P2-P6 (torchvision's ResNet RetinaNet uses P3-P7)."""
    return build_detector("retinanet", backbone, num_classes=num_classes, backbone_weights=backbone_weights,
                          trainable_layers=trainable_layers, **kwargs)


def fcos_cvt_fpn(backbone: str = "cvt_13", *, num_classes: int = 91,
                 backbone_weights: str | os.PathLike | None = None, trainable_layers: int | None = None,
                 **kwargs: Any) -> FCOS:
    """FCOS over a CvT (or "timm:<name>") FPN, on P2-P6 (torchvision's ResNet FCOS uses P3-P7)."""
    return build_detector("fcos", backbone, num_classes=num_classes, backbone_weights=backbone_weights,
                          trainable_layers=trainable_layers, **kwargs)


def backbone_body(model: nn.Module) -> nn.Module:
    """The features_only model inside a detector built here."""
    return model.backbone.body
