"""Semantic segmentation over a CvT (or any timm) backbone: segmentation_models_pytorch's UPerNet and FPN decoders
through smp's timm encoder (`tu-<name>`), which reads the backbone's timm `FeatureInfo`.

    from cvt.segmentation import segmenter
    model = segmenter("cvt_tiny", num_classes=11, decoder="upernet")              # logits (B, 11, H, W)
    model = segmenter("cvt_13", num_classes=11, decoder="upernet", backbone_weights="runs/cls/model.safetensors")
    model = segmenter("timm:resnet18", num_classes=11, decoder="upernet")          # the same decoder on ResNet-18

How smp reads a backbone (`TimmUniversalEncoder`): its maps' reductions decide the layout. Reductions 4/8/16(/32)
(cvt_13, cvt_21, cvt_w24) are "transformer-style": smp puts a 0-channel dummy at stride 2, and `encoder_depth` counts
it, so three stages are `encoder_depth=4`. Reductions 2/4/8 (cvt_tiny, cvt_small) or 2..32 (ResNet) are read as they
are: `encoder_depth` is the number of maps (3 for cvt_tiny, 5 for ResNet-18). Either way the depth is log2 of the
deepest reduction, which `default_encoder_depth` computes, and smp needs inputs divisible by 2**depth: `Segmenter`
pads each input to that multiple and crops the logits back, so any image size gives logits at its own size.

The decoders, as smp builds them, on a backbone whose deepest reduction is R = 2**depth:
- UPerNet: a pyramid-pooling module on the deepest map and an FPN over the maps from stride 4 on, fused at stride 4,
  upsampled 4x. A stride-2 map (cvt_tiny's first stage, ResNet's stem) is not read.
- FPN (Semantic FPN, Kirillov et al.): the four deepest levels of smp's feature list, merged at the finest of them,
  whose stride is R/8: 4 for ResNet (2..32), 2 for cvt_13 (the 0-channel dummy is that level: it adds only a
  bias), 1 for cvt_tiny (the image itself is that level). `upsampling` is set to that stride.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

DECODERS = ("upernet", "fpn")
TIMM_PREFIX = "timm:"
IGNORE_INDEX = 255  # mask value of pixels that are neither scored nor trained on (mmseg, Cityscapes, ADE20K)

__all__ = ["DECODERS", "IGNORE_INDEX", "Segmenter", "SegmenterConfig", "default_encoder_depth", "load_segmenter",
           "segmenter"]


# ---------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class SegmenterConfig:
    """Everything that builds a `Segmenter` (without its weights); config.json of a run holds it."""

    backbone: str = "cvt_tiny"  # a registered CvT variant (`cvt zoo`), or "timm:<name>" for any timm model
    num_classes: int
    decoder: str = "upernet"  # "upernet" or "fpn"
    # UPerNet's width; FPN's pyramid width (its segmentation branches are half as wide). smp's defaults (256, 128)
    # are made for 512 px ADE20K crops; 128 suits the 96-128 px scenes and is the same for every backbone.
    decoder_channels: int = 128
    encoder_depth: int | None = None  # None: `default_encoder_depth(backbone)`
    # The CvT's config fields that differ from the variant's (a checkpoint's own architecture, model_args).
    backbone_args: dict[str, Any] = field(default_factory=dict)
    class_names: list[str] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.backbone, str) or not self.backbone or self.backbone == TIMM_PREFIX:
            raise ValueError(f"backbone must be a CvT variant or 'timm:<name>', got {self.backbone!r}")
        if self.decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {', '.join(DECODERS)}, got {self.decoder!r}")
        if not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {self.num_classes!r}")
        if not isinstance(self.decoder_channels, int) or self.decoder_channels < 2:
            raise ValueError(f"decoder_channels must be an integer >= 2, got {self.decoder_channels!r}")
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} class names for {self.num_classes} classes")
        if self.encoder_depth is None:
            self.encoder_depth = default_encoder_depth(self.backbone, self.backbone_args)
        if not 3 <= self.encoder_depth <= 5:
            raise ValueError(f"encoder_depth must be 3 to 5 (smp's decoders), got {self.encoder_depth}")

    @property
    def is_cvt(self) -> bool:
        return not self.backbone.startswith(TIMM_PREFIX)

    @property
    def timm_name(self) -> str:
        return self.backbone.removeprefix(TIMM_PREFIX)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SegmenterConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def _reductions(backbone: str, backbone_args: dict[str, Any]) -> list[int]:
    if not backbone.startswith(TIMM_PREFIX):
        from .registry import default_config

        return list(default_config(backbone).replace(**_tuples(backbone_args)).reductions)
    import timm

    with torch.device("meta"):  # shapes only: no memory, no initialisation
        probe = timm.create_model(backbone.removeprefix(TIMM_PREFIX), features_only=True, pretrained=False)
    return list(probe.feature_info.reduction())


def default_encoder_depth(backbone: str, backbone_args: dict[str, Any] | None = None) -> int:
    """smp's `encoder_depth` that uses every map of `backbone` (at most 5): log2 of its deepest reduction. 4 for
    cvt_13 (4/8/16 and smp's stride-2 dummy), 3 for cvt_tiny (2/4/8), 5 for ResNet-18 (2..32)."""
    reductions = _reductions(backbone, backbone_args or {})
    depth = min(5, int(math.log2(reductions[min(len(reductions), 5) - 1])))
    return max(3, depth)


def _tuples(d: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


# ---------------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------------
class Segmenter(nn.Module):
    """An smp segmentation model (`net`) whose input is padded to the encoder's stride multiple and whose logits are
    cropped back: `forward(images (B, 3, H, W)) -> logits (B, num_classes, H, W)` for any H, W (inputs are
    normalised images; padding is 0, the mean colour)."""

    def __init__(self, cfg: SegmenterConfig):
        super().__init__()
        import segmentation_models_pytorch as smp

        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.class_names = cfg.class_names
        depth = cfg.encoder_depth
        # the timm model's own keyword arguments (smp passes them on); a CvT's are its config fields
        timm_args = _tuples(cfg.backbone_args)
        common = dict(encoder_name=f"tu-{cfg.timm_name}", encoder_depth=depth, encoder_weights=None,
                      in_channels=3, classes=cfg.num_classes, **timm_args)
        if cfg.decoder == "upernet":
            self.net = smp.UPerNet(decoder_channels=cfg.decoder_channels, **common)
        else:
            # the finest of the four levels FPN merges is at stride 2**depth / 8 (module docstring)
            self.net = smp.FPN(decoder_pyramid_channels=cfg.decoder_channels,
                               decoder_segmentation_channels=max(1, cfg.decoder_channels // 2),
                               upsampling=2 ** (depth - 3), **common)
        self.stride = self.net.encoder.output_stride

    @property
    def backbone(self) -> nn.Module:
        """The timm model inside smp's encoder (for a CvT, the `CvT` module itself)."""
        inner = self.net.encoder.model
        return getattr(inner, "model", inner)  # timm's features_only wrappers hold the model as `.model`

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """The backbone's own exemptions (a CvT's cls token), by their names in this model."""
        prefix = next(name for name, m in self.named_modules() if m is self.backbone)
        skip = self.backbone.no_weight_decay() if hasattr(self.backbone, "no_weight_decay") else set()
        return {f"{prefix}.{name}" for name in skip}

    def config(self) -> dict[str, Any]:
        return self.cfg.to_dict()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        pad_h, pad_w = -h % self.stride, -w % self.stride
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))  # right and bottom: the crop below is then the image's own pixels
        logits = self.net(x)  # (B, K, H + pad_h, W + pad_w)
        return logits[..., :h, :w]


def _cvt_backbone(name: str, weights: str | os.PathLike | None, args: dict[str, Any]):
    """The CvT's config fields that differ from the variant's, and the weights' backbone (None without weights)."""
    from .registry import default_config, from_pretrained

    if weights is not None:
        # every format cvt reads; the checkpoint's own architecture (its config, or the variant its shapes match)
        # wins over the named variant's
        source = from_pretrained(weights, features_only=True, in_chans=3, **_tuples(args))
        full = source.cfg
    else:
        source, full = None, default_config(name).replace(**_tuples(args))
    base = default_config(name).to_dict()
    diff = {k: v for k, v in full.to_dict().items() if k not in ("num_classes", "in_chans") and v != base[k]}
    return diff, source


def segmenter(
    backbone: str = "cvt_tiny",
    num_classes: int = 2,
    decoder: str = "upernet",
    backbone_weights: str | os.PathLike | None = None,
    *,
    decoder_channels: int = 128,
    encoder_depth: int | None = None,
    class_names: list[str] | None = None,
    **backbone_args: Any,
) -> Segmenter:
    """A semantic segmenter: smp's `decoder` ("upernet" or "fpn") over `backbone`, a CvT variant (`cvt zoo`) or
    "timm:<name>" (e.g. "timm:resnet18", the comparison), with `num_classes` output channels.

    backbone_weights: a CvT backbone's weights in any format cvt reads (a `cvt train` run or its
        model.safetensors, the authors' .pth, a Hugging Face folder; classifier heads are dropped, a grey model's
        first convolution adapted to RGB); for a timm backbone, a file timm's loader reads. None: from scratch.
    backbone_args: CvTConfig fields for a CvT (e.g. depths=(1, 1, 2)), timm.create_model arguments otherwise.
    """
    source = None
    if not backbone.startswith(TIMM_PREFIX):
        from .registry import default_config, get_variant

        get_variant(backbone)  # an unknown name is one clear line before anything is built
        backbone_args, source = _cvt_backbone(backbone, backbone_weights, backbone_args)
        first = default_config(backbone).replace(**_tuples(backbone_args)).reductions[0]
        if decoder == "fpn" and first == 4:
            # smp 0.6 gives maps starting at stride 4 a 0-channel level at stride 2, which its FPN then reads
            raise ValueError(f"decoder 'fpn' cannot take {backbone}, whose maps start at stride 4 (smp's FPN reads "
                             "the empty stride-2 level it adds to such encoders); use decoder 'upernet'")
    cfg = SegmenterConfig(backbone=backbone, num_classes=num_classes, decoder=decoder,
                          decoder_channels=decoder_channels, encoder_depth=encoder_depth,
                          backbone_args=dict(backbone_args), class_names=class_names)
    if not cfg.is_cvt and backbone_weights is not None:
        return _timm_with_weights(cfg, backbone_weights)
    model = Segmenter(cfg)
    if source is not None:
        model.backbone.load_state_dict(source.state_dict(), strict=True)
    return model


def _timm_with_weights(cfg: SegmenterConfig, weights: str | os.PathLike) -> Segmenter:
    """A timm backbone's local weights, loaded by timm (its pretrained_cfg overlay), as `timm.create_model` would."""
    import timm

    path = Path(weights).expanduser()
    if not path.is_file():
        raise ValueError(f"backbone weights {path} do not exist")
    model = Segmenter(cfg)
    loaded = timm.create_model(cfg.timm_name, pretrained=True, features_only=True,
                               out_indices=tuple(model.net.encoder.model.feature_info.out_indices),
                               pretrained_cfg_overlay={"file": str(path)}, **_tuples(cfg.backbone_args))
    model.net.encoder.model.load_state_dict(loaded.state_dict(), strict=True)
    return model


# ---------------------------------------------------------------------------------------------------------------
# Saved segmenters
# ---------------------------------------------------------------------------------------------------------------
CONFIG_FORMAT = "cvt-segmentation"


def save_segmenter(model: Segmenter, folder: Path, extra: dict[str, Any] | None = None) -> Path:
    """`folder/model.safetensors` and `folder/config.json`, which describes the whole model (task, decoder, backbone,
    classes and `extra`: input size, normalisation), so that `load_segmenter(folder)` needs nothing else."""
    from .weights import save_described

    config = {"format": CONFIG_FORMAT, "task": "segmentation", **model.config(), **(extra or {}),
              "weights": "model.safetensors"}
    return save_described(model, config, folder)


def load_segmenter(checkpoint: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[Segmenter, dict]:
    """A saved segmenter (a run folder, its best/ folder, or the model.safetensors in one) in eval mode, and its
    config.json."""
    from .weights import load_safetensors_into

    path = Path(checkpoint).expanduser()
    if not path.exists():
        raise ValueError(f"{path} does not exist: no config.json, so not a segmentation run's weights")
    folder = path if path.is_dir() else path.parent
    config_path = folder / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except OSError:
        raise ValueError(f"{folder} holds no config.json: not a segmentation run's weights") from None
    except ValueError as e:
        raise ValueError(f"{config_path} is not valid JSON ({e})") from None
    if config.get("format") != CONFIG_FORMAT:
        raise ValueError(f"{config_path} does not describe a segmenter (task {config.get('task', 'classification')!r})")
    weights = path if path.is_file() else folder / config.get("weights", "model.safetensors")
    model = Segmenter(SegmenterConfig.from_dict(config))
    load_safetensors_into(model, weights, "its config.json")
    return model.to(device).eval(), config
