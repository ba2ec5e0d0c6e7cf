"""What a benchmark compares: contestants named on the command line, built by a registry of families.

A contestant's name is `family` or `family:model`, with an optional `+compile` for its `torch.compile`d self:

    ours                   this project's CvT, the benchmark's `--model` (exact GELU, as the port)
    hf                     transformers' `CvtForImageClassification` with ours's weights copied over
    timm:resnet18          any timm model by name, e.g. timm:vit_small_patch16_224
    tv:resnet50            any torchvision model by name
    ours+compile           torch.compile(ours): a derived contestant, timed beside the one it derives from

Every contestant is built for the same images (side, channels) and classes as `--model`, with random weights, and
is called as `images -> logits`. A new family is one `@register` function; the harness and the report need
nothing else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

COMPILED = "+compile"


@dataclass(frozen=True)
class Setting:
    """What every contestant of one run is built for."""

    model: str  # the registered cvt model: `ours`, and the shape of the task (classes, channels) for the others
    img_size: int
    num_classes: int
    in_chans: int
    grad_checkpointing: bool = False  # for the contestants that have it (ours)

    @classmethod
    def of(cls, model: str, img_size: int, grad_checkpointing: bool = False) -> Setting:
        from cvt.registry import default_config

        cfg = default_config(model)  # one line for an unknown model
        return cls(model, img_size, cfg.num_classes, cfg.in_chans, grad_checkpointing)


@dataclass(frozen=True)
class Family:
    build: Callable[[str, Setting, nn.Module | None], nn.Module]  # (model name, setting, ours or None)
    label: Callable[[str], str]  # the report's name for a model of the family
    takes_model: bool  # `family:model` (timm, tv) rather than the bare family (ours, hf)
    same_function_as: str | None = None  # computes what that contestant does, with its weights
    packages: tuple[str, ...] = ()  # imported by every memory worker of a run with it, so they share a baseline


FAMILIES: dict[str, Family] = {}


def register(prefix: str, label: Callable[[str], str], takes_model: bool, same_function_as: str | None = None,
             packages: tuple[str, ...] = ()):
    def add(build):
        FAMILIES[prefix] = Family(build, label, takes_model, same_function_as, packages)
        return build

    return add


@dataclass(frozen=True)
class Contestant:
    name: str  # as given: "ours", "timm:resnet18", "ours+compile"
    family: str
    model: str  # the family's model name ("" for ours and hf)
    compiled: bool = False

    @property
    def base(self) -> str:
        """The eager contestant a compiled one derives from (itself when eager)."""
        return self.name.removesuffix(COMPILED)

    @property
    def label(self) -> str:
        text = FAMILIES[self.family].label(self.model)
        return text + " + torch.compile" if self.compiled else text

    @property
    def same_function_as(self) -> str | None:
        other = FAMILIES[self.family].same_function_as
        return None if other is None else other + (COMPILED if self.compiled else "")

    @property
    def packages(self) -> tuple[str, ...]:
        return FAMILIES[self.family].packages


def known() -> str:
    return ", ".join(p + (":<model>" if f.takes_model else "") for p, f in FAMILIES.items())


def parse(name: str) -> Contestant:
    """`Contestant` of a name; ValueError naming the families when it is not one."""
    base = name.removesuffix(COMPILED)
    family, _, model = base.partition(":")
    f = FAMILIES.get(family)
    if f is None or f.takes_model != bool(model):
        raise ValueError(f"unknown contestant {name!r}; choose from {known()} (each may end in {COMPILED})")
    return Contestant(name, family, model, compiled=base != name)


def derived(name: str) -> str:
    return name + COMPILED


def build(c: Contestant, setting: Setting, ours: nn.Module | None = None) -> nn.Module:
    """The eager model of `c` (a compiled contestant's too: the harness compiles it), in eval mode."""
    return FAMILIES[c.family].build(c.model, setting, ours).eval()


# ---------------------------------------------------------------------------------------------------------------
# The families
# ---------------------------------------------------------------------------------------------------------------
@register("ours", lambda _: "cvt (ours)", takes_model=False)
def build_ours(_: str, setting: Setting, ours: nn.Module | None = None) -> nn.Module:
    from cvt.registry import create_model

    # Exact GELU, as in the port: the two compute the same function (ours defaults to the authors' QuickGELU).
    model = create_model(setting.model, act="gelu")
    if setting.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


class _Logits(nn.Module):
    """transformers' model as `images -> logits`, so every contestant is called the same way."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(pixel_values=x).logits


@register("hf", lambda _: "transformers port", takes_model=False, same_function_as="ours", packages=("transformers",))
def build_hf(_: str, setting: Setting, ours: nn.Module | None = None) -> nn.Module:
    """The port, with `ours`'s weights (random ones of the setting's model without it)."""
    import transformers

    from cvt.registry import default_config
    from cvt.weights import config_to_hf, from_ours

    cfg = ours.cfg if ours is not None else default_config(setting.model)
    if any(depth <= i for i, depth in enumerate(cfg.depths)):
        # transformers indexes stage i's drop-path rates with i instead of the block (its drop-path bug)
        raise ValueError(f"transformers' port cannot build depths {cfg.depths}: it needs more than i blocks in stage i")
    hf = transformers.CvtForImageClassification(transformers.CvtConfig(**config_to_hf(cfg)))
    if ours is not None:
        hf.load_state_dict(from_ours(ours.state_dict(), "hf"), strict=True)
    return _Logits(hf)


@register("timm", lambda m: f"timm {m}", takes_model=True, packages=("timm",))
def build_timm(name: str, setting: Setting, ours: nn.Module | None = None) -> nn.Module:
    import timm

    if name not in timm.list_models():
        raise ValueError(f"timm has no model {name!r} (timm.list_models() lists them)")
    return _sized(timm.create_model, "img_size", setting.img_size, name, pretrained=False,
                  num_classes=setting.num_classes, in_chans=setting.in_chans)


@register("tv", lambda m: f"torchvision {m}", takes_model=True, packages=("torchvision",))
def build_torchvision(name: str, setting: Setting, ours: nn.Module | None = None) -> nn.Module:
    import torchvision

    if name not in torchvision.models.list_models():
        raise ValueError(f"torchvision has no model {name!r} (torchvision.models.list_models() lists them)")
    if setting.in_chans != 3:
        raise ValueError(f"torchvision's models take 3 channels, {setting.model} has {setting.in_chans}")
    return _sized(torchvision.models.get_model, "image_size", setting.img_size, name, weights=None,
                  num_classes=setting.num_classes)


def _sized(create: Callable[..., nn.Module], size_arg: str, size: int, name: str, **kwargs) -> nn.Module:
    """`create(name, **kwargs)` for images of side `size`: transformers (ViT, ...) size their position embeddings
    by the image and take it as `size_arg`; convolutional networks take any size and refuse the argument."""
    try:
        return create(name, **{size_arg: size}, **kwargs)
    except TypeError as e:
        if size_arg not in str(e):
            raise
    return create(name, **kwargs)


def info(c: Contestant, model: nn.Module) -> dict:
    return dict(label=c.label, family=c.family, model=c.model or None, compiled=c.compiled,
                same_function_as=c.same_function_as, params=sum(p.numel() for p in model.parameters()))


__all__ = ["Contestant", "FAMILIES", "Setting", "build", "derived", "info", "known", "parse", "register"]
