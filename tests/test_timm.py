"""timm's contracts, kept: models built by timm's own builder (a `pretrained_cfg` on every one, registered from the
module `cvt`), the authors', Hugging Face and cvt checkpoints loaded through timm's loader (strictly, no code-running
pickles), `features_only` returning timm's `FeatureInfo` with the getter, hook and FX wrappers, and
`forward_intermediates` / `prune_intermediate_layers` as timm's hierarchical models define them.

timm's own tests/test_models.py over every cvt_* is run by hand (docs/timm_suite.md); these are the fast checks.
"""

from __future__ import annotations

import math

import pytest
import timm
import torch
from timm.models import FeatureInfo

import cvt
from cvt.models import checkpoint_filter_fn
from cvt.weights import CheckpointError, from_ours

SMALL = dict(depths=(1, 1, 1))
NAMES = cvt.list_models()


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest's


def _shrunk(name: str) -> dict:
    """One block a stage and, for CvT-W24, 16 channels a head: every variant builds in milliseconds."""
    cfg = cvt.default_config(name)
    overrides = dict(depths=(1,) * cfg.num_stages)
    if max(cfg.embed_dims) > 384:
        overrides["embed_dims"] = tuple(16 * h for h in cfg.num_heads)
    return overrides


def _timm(name: str = "cvt_13", seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    return timm.create_model(name, **{**_shrunk(name), **kwargs}).eval()


def _x(side: int = 48, batch: int = 2, chans: int = 3) -> torch.Tensor:
    return torch.randn(batch, chans, side, side + 16, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------------------------------------------
# Registration and pretrained cfgs
# ---------------------------------------------------------------------------------------------------------------
def test_timm_lists_the_models_under_module_cvt():
    assert timm.list_models(module="cvt") == NAMES
    with_weights = {n.split(".")[0] for n in timm.list_models("cvt_*", pretrained=True)}
    assert with_weights == {"cvt_13", "cvt_21", "cvt_w24"}  # the paper's; the small variants have none


@pytest.mark.parametrize("name", NAMES)
def test_every_model_carries_its_pretrained_cfg(name):
    for model in (_timm(name), cvt.create_model(name, **_shrunk(name)).eval()):
        cfg = model.pretrained_cfg
        assert model.default_cfg is cfg and cfg["architecture"] == name
        for key in ("input_size", "mean", "std", "crop_pct", "interpolation", "first_conv", "classifier",
                    "min_input_size", "license", "num_classes"):
            assert key in cfg, key
        state = model.state_dict()
        assert cfg["first_conv"] + ".weight" in state and cfg["classifier"] + ".weight" in state
        assert cfg["min_input_size"][1:] == (model.min_input_size(),) * 2
        assert cfg["input_size"][1] == cvt.registry.get_variant(name).input_size
        assert ("hf_hub_id" in cfg) == cvt.registry.get_variant(name).from_paper
    # the smallest input the cfg announces runs; one pixel less is a clear error
    side = model.min_input_size()
    with torch.no_grad():
        assert model(torch.randn(1, 3, side, side)).shape == (1, model.num_classes)
    if side > 1:
        with pytest.raises(ValueError, match="too small"):
            model(torch.randn(1, 3, side - 1, side - 1))


def test_tagged_cfgs_and_the_authors_evaluation():
    cfg_384 = timm.models.get_pretrained_cfg("cvt_13.ms_in22k_ft_in1k_384")
    assert cfg_384.input_size == (3, 384, 384) and (cfg_384.crop_pct, cfg_384.crop_mode) == (1.0, "squash")
    assert cfg_384.hf_hub_id == "microsoft/cvt-13-384-22k"
    assert timm.models.get_pretrained_cfg("cvt_13").crop_pct == 0.875
    model = timm.create_model("cvt_21.ms_in1k_384", depths=(1, 1, 1))
    assert model.pretrained_cfg["tag"] == "ms_in1k_384"
    data = timm.data.resolve_data_config(model=model)
    assert data["input_size"] == (3, 384, 384) and data["crop_pct"] == 1.0


def test_timm_kwargs_are_config_fields():
    model = _timm("cvt_13", num_classes=5, in_chans=1, drop_path_rate=0.2, act="gelu")
    assert (model.cfg.num_classes, model.cfg.in_chans, model.cfg.drop_path_rate[-1], model.cfg.act) == (5, 1, 0.2,
                                                                                                        "gelu")
    with pytest.raises(ValueError, match="unknown CvT config field.*global_pool"):
        timm.create_model("cvt_13", global_pool="avg")


# ---------------------------------------------------------------------------------------------------------------
# Weights through timm's loader
# ---------------------------------------------------------------------------------------------------------------
def _save(model: cvt.CvT, tmp_path, fmt: str):
    if fmt == "authors":
        path = tmp_path / "CvT-13-224x224-IN-1k.pth"
        torch.save(from_ours(model.state_dict(), "authors"), path)
    elif fmt == "hf":
        path = cvt.save_weights(model.state_dict(), model.cfg, tmp_path / "hf", fmt="hf")
    elif fmt == "hf-file":
        path = cvt.save_weights(model.state_dict(), model.cfg, tmp_path / "hf", fmt="hf") / "model.safetensors"
    elif fmt == "hf-bin":
        (tmp_path / "hf").mkdir()
        torch.save(from_ours(model.state_dict(), "hf"), tmp_path / "hf" / "pytorch_model.bin")
        path = tmp_path / "hf"
    elif fmt == "ddp":  # a training checkpoint: DDP's prefix, the EMA first (timm's own rule for its files)
        path = tmp_path / "checkpoint-9.pth.tar"
        sd = {"module." + k: v for k, v in from_ours(model.state_dict(), "authors").items()}
        torch.save({"epoch": 9, "state_dict": {k: v + 1 for k, v in sd.items()}, "state_dict_ema": sd}, path)
    else:
        path = cvt.save_weights(model.state_dict(), model.cfg, tmp_path / "w.safetensors")
    return path


@pytest.mark.parametrize("fmt", ["authors", "hf", "hf-file", "hf-bin", "cvt", "ddp"])
def test_every_format_loads_through_timm(tmp_path, fmt):
    source = cvt.create_model("cvt_13", **SMALL).eval()
    path = _save(source, tmp_path, fmt)
    x = _x()
    loaded = timm.create_model("cvt_13", **SMALL, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), source(x))
    assert loaded.pretrained_cfg["file"].endswith((".pth", ".safetensors", ".bin", ".tar"))
    # a new head for another class count (timm's rule), the rest the file's
    five = timm.create_model("cvt_13", **SMALL, num_classes=5, pretrained=True,
                             pretrained_cfg_overlay=dict(file=str(path))).eval()
    with torch.no_grad():
        assert five(x).shape == (2, 5) and torch.equal(five.forward_features(x), source.forward_features(x))
    assert five.fresh_classifier


def test_pretrained_path_and_grey_images(tmp_path):
    source = cvt.create_model("cvt_13", **SMALL).eval()
    path = _save(source, tmp_path, "authors")
    x = _x()
    with torch.no_grad():
        assert torch.equal(timm.create_model("cvt_13", **SMALL, pretrained=path).eval()(x), source(x))
        # timm adapts the first convolution to one channel (summed), as cvt.create_model does
        grey = timm.create_model("cvt_13", **SMALL, in_chans=1, pretrained=True,
                                 pretrained_cfg_overlay=dict(file=str(path))).eval()
        with pytest.warns(UserWarning, match="summed over channels"):
            ours = cvt.create_model("cvt_13", **SMALL, in_chans=1, pretrained=path).eval()
        g = x[:, :1]
        assert torch.allclose(grey(g), ours(g), atol=1e-6)
        assert torch.allclose(grey(g), source(g.expand(-1, 3, -1, -1)), atol=1e-5)


def test_filter_is_idempotent_and_strict(tmp_path):
    source = cvt.create_model("cvt_13", **SMALL).eval()
    model = _timm("cvt_13")
    authors = from_ours(source.state_dict(), "authors")
    once = checkpoint_filter_fn(authors, model)
    assert once.keys() == model.state_dict().keys()
    twice = checkpoint_filter_fn(once, model)
    assert all(torch.equal(once[k], twice[k]) for k in once)
    del authors["stage1.blocks.0.mlp.fc1.bias"]
    torch.save(authors, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError, match="broken.pth does not fit.*1 missing key.*stages.1.blocks.0.mlp.fc1.bias"):
        timm.create_model("cvt_13", **SMALL, pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path /
                                                                                                     "broken.pth")))
    # another architecture under the same name is refused, not half-loaded
    path = _save(cvt.create_model("cvt_21", depths=(1, 1, 2)), tmp_path, "cvt")
    with pytest.raises(CheckpointError, match="unexpected key.*stages.2.blocks.1"):
        timm.create_model("cvt_13", **SMALL, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


class _Trap:
    """Unpickling would run code: it creates the file named in its arguments."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        import pathlib

        return pathlib.Path.touch, (pathlib.Path(self.path),)


def test_code_running_pickle_is_refused_through_timm(tmp_path):
    marker = tmp_path / "ran"
    sd = from_ours(cvt.create_model("cvt_13", **SMALL).state_dict(), "authors")
    torch.save({"state_dict": sd, "trap": _Trap(marker)}, tmp_path / "trap.pth")
    with pytest.raises(CheckpointError, match="refused to load .*trap.pth.*import or run code") as err:
        timm.create_model("cvt_13", **SMALL, pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / "trap.pth")))
    assert not marker.exists() and "\n" not in str(err.value)


def test_missing_files_and_variants_without_weights():
    with pytest.raises(CheckpointError, match="nowhere.pth does not exist"):
        timm.create_model("cvt_13", pretrained=True, pretrained_cfg_overlay=dict(file="nowhere.pth"))
    with pytest.raises(RuntimeError, match="No pretrained weights exist for cvt_tiny"):
        timm.create_model("cvt_tiny", pretrained=True)


def test_hub_weights_go_through_the_filter(monkeypatch):
    """Without a file, timm fetches the Hub copy (transformers' layout); here the fetch is faked, nothing is
    downloaded."""
    source = cvt.create_model("cvt_13", **SMALL).eval()
    asked = []

    def fake_hub(model_id, *args, **kwargs):
        asked.append(model_id)
        return from_ours(source.state_dict(), "hf")

    monkeypatch.setattr(timm.models._builder, "load_state_dict_from_hf", fake_hub)
    monkeypatch.setattr(timm.models._builder, "has_hf_hub", lambda necessary=False: True)
    model = timm.create_model("cvt_13.ms_in1k_384", **SMALL, pretrained=True).eval()
    x = _x()
    with torch.no_grad():
        assert asked == ["microsoft/cvt-13-384"] and torch.equal(model(x), source(x))


# ---------------------------------------------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_features_only_through_timm_is_feature_info(name):
    backbone = _timm(name, features_only=True)
    info = backbone.feature_info
    cfg = cvt.default_config(name)
    assert isinstance(info, FeatureInfo)
    assert info.reduction() == list(cfg.reductions)
    assert info.channels() == [d for d in _shrunk(name).get("embed_dims", cfg.embed_dims)]
    assert info.module_name() == ["maps.0", "maps.1", "maps.2"]
    x = _x(24)
    with torch.no_grad():
        maps = backbone(x)
    for fmap, c, r in zip(maps, info.channels(), info.reduction(), strict=True):
        assert fmap.shape == (2, c, math.ceil(24 / r), math.ceil(40 / r))
    two = _timm(name, features_only=True, out_indices=(1, 2))
    assert two.feature_info.reduction() == list(cfg.reductions[1:])
    assert len(two.model.stages) == 3 and isinstance(two.model.head, torch.nn.Identity)


@pytest.mark.parametrize("feature_cls", ["fx", "hook"])
def test_fx_and_hook_features_equal_the_getter(feature_cls):
    getter = _timm("cvt_13", features_only=True, out_indices=(0, 2))
    other = _timm("cvt_13", features_only=True, out_indices=(0, 2), feature_cls=feature_cls)
    assert other.feature_info.reduction() == [4, 16] and other.feature_info.channels() == [64, 384]
    x = _x()
    with torch.no_grad():
        for a, b in zip(getter(x), other.eval()(x), strict=True):
            assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5)  # (FX records the reference ops)


def test_cvt_backbone_feature_info_is_timm_feature_info():
    backbone = cvt.create_model("cvt_13", **SMALL, features_only=True, out_indices=(0, 1))
    info = backbone.feature_info
    assert isinstance(info, FeatureInfo)
    assert (info.reduction(), info.channels(), info.module_name()) == ([4, 8], [64, 192], ["maps.0", "maps.1"])
    assert [d["reduction"] for d in info] == [4, 8] and len(info) == 2 and info[1]["num_chs"] == 192


# ---------------------------------------------------------------------------------------------------------------
# forward_intermediates and prune_intermediate_layers
# ---------------------------------------------------------------------------------------------------------------
def test_forward_intermediates_contract():
    model = _timm("cvt_13")
    x = _x()
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        assert torch.equal(final, model.forward_features(x))
        assert [m.shape[1] for m in maps] == [64, 192, 384] and all(m.is_contiguous() for m in maps)
        last = model.forward_intermediates(x, indices=1, intermediates_only=True)
        assert len(last) == 1 and torch.equal(last[0], maps[2])
        picked = model.forward_intermediates(x, indices=[-3, 1], intermediates_only=True)
        assert [torch.equal(a, b) for a, b in zip(picked, maps[:2], strict=True)] == [True, True]
        nhwc = model.forward_intermediates(x, output_fmt="NHWC", intermediates_only=True)
        assert all(torch.equal(a.permute(0, 3, 1, 2), b) for a, b in zip(nhwc, maps, strict=True))
        # norm: the last map after the final LayerNorm, i.e. forward_features' tokens as a map
        normed = model.forward_intermediates(x, norm=True, intermediates_only=True)
        assert torch.equal(normed[0], maps[0])
        assert torch.allclose(normed[2], final[:, 1:].transpose(1, 2).reshape(maps[2].shape), atol=1e-6)
        # stop_early: nothing after the last stage asked for; the tokens returned are that stage's
        tokens, early = model.forward_intermediates(x, indices=[0], stop_early=True)
        assert len(early) == 1 and torch.equal(early[0], maps[0])
        assert tokens.shape == (2, maps[0].shape[2] * maps[0].shape[3], 64)
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(x, output_fmt="NLC")


def test_prune_intermediate_layers():
    model = _timm("cvt_13")
    x = _x()
    with torch.no_grad():
        maps = model.forward_intermediates(x, intermediates_only=True)
    assert model.prune_intermediate_layers(indices=[0, 1]) == [0, 1]
    assert len(model.stages) == len(model.maps) == 2 and model.num_classes == 0
    assert model.num_features == model.head_hidden_size == 192 and isinstance(model.norm, torch.nn.Identity)
    with torch.no_grad():
        pruned = model.forward_intermediates(x, intermediates_only=True)
        assert all(torch.equal(a, b) for a, b in zip(pruned, maps[:2], strict=True))
        assert model(x).shape == (2, 192)  # pooled features of the last stage kept
    whole = _timm("cvt_13")
    assert whole.prune_intermediate_layers(indices=1, prune_head=False) == [2]  # the last one: nothing to drop
    assert len(whole.stages) == 3 and whole.num_classes == 1000 and not isinstance(whole.norm, torch.nn.Identity)
    train = _timm("cvt_13", features_only=True, out_indices=(1,)).train()
    sum(m.mean() for m in train(_x())).backward()
    assert all(p.grad is not None for p in train.parameters())  # no unused parameters left for DDP to reject
