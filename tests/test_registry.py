"""The model contract, over every registered variant at tiny sizes (as timm's tests/test_models.py does).

tests/test_model.py already runs, for every variant: a training forward and backward (shape, finite, every
parameter a non-zero gradient), gradient checkpointing against none in training (outputs, gradients, BatchNorm
statistics) and the backbone's map shapes against `feature_info`. This file adds the rest of the interface: the
inference forward, `forward_features`/`forward_head` composing to `forward`, backbones of any `out_indices` (timm's
`FeatureInfo` accepts them, their maps are the classifier's intermediates, every parameter gets a gradient, and
checkpointing changes nothing), `reset_classifier`, `no_weight_decay` and timm's `create_model`.
"""

from __future__ import annotations

import copy

import pytest
import torch

import cvt
from cvt.registry import get_variant

NUM_CLASSES = 7


def _overrides(name: str) -> dict:
    """One block a stage (the same code paths: cls token, strides, widths, drop path) and, for the giant CvT-W24
    (277M parameters), 16 channels a head instead of 64, so that every variant builds and runs in milliseconds."""
    cfg = cvt.default_config(name)
    overrides = dict(depths=(1,) * cfg.num_stages, num_classes=NUM_CLASSES)
    if max(cfg.embed_dims) > 384:
        overrides["embed_dims"] = tuple(16 * h for h in cfg.num_heads)
    return overrides


def _model(name: str, **kwargs) -> cvt.CvT:
    torch.manual_seed(0)
    return cvt.create_model(name, **{**_overrides(name), **kwargs})


def _input(model: cvt.CvT, name: str, batch: int = 2) -> torch.Tensor:
    # Not a multiple of every reduction, and not square: the maps' sizes are ceil(side / reduction).
    h, w = (40, 48) if get_variant(name).input_size >= 224 else (20, 24)
    return torch.randn(batch, model.cfg.in_chans, h, w, generator=torch.Generator().manual_seed(1))


MODELS = cvt.list_models()


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("batch", [1, 3])
def test_inference_forward_shape_and_finite(name, batch):
    model = _model(name).eval()
    with torch.no_grad():
        out = model(_input(model, name, batch))
    assert out.shape == (batch, NUM_CLASSES)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("training", [False, True])
def test_forward_features_and_head_compose_to_forward(name, training):
    model = _model(name).train(training)
    x = _input(model, name)
    with torch.no_grad():
        torch.manual_seed(2)  # drop path draws the same masks in both passes
        out = model(x)
        torch.manual_seed(2)
        feats = model.forward_features(x)
        pooled = model.forward_head(feats, pre_logits=True)
    assert feats.ndim == 3 and feats.shape[0] == 2 and feats.shape[-1] == model.num_features
    assert pooled.shape == (2, model.num_features)
    assert torch.allclose(model.forward_head(feats), out, atol=1e-5)
    assert torch.allclose(model.get_classifier()(pooled), out, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("out_indices", [(0, 1, 2), (1, 2), (-1,)])
def test_backbone_maps_are_the_intermediates_feature_info_describes(name, out_indices):
    from timm.models import FeatureInfo

    classifier = _model(name).eval()
    backbone = copy.deepcopy(classifier).as_backbone(out_indices)
    x = _input(classifier, name)
    with torch.no_grad():
        maps = backbone(x)
        expected = classifier.forward_intermediates(x, indices=backbone.out_indices, intermediates_only=True)
    # timm's own checks of a feature_info (channels > 0, reductions not decreasing, a module name each)
    info = FeatureInfo([dict(i) for i in backbone.feature_info], out_indices=tuple(range(len(maps))))
    assert info.channels() == [m.shape[1] for m in maps]
    assert info.reduction() == [classifier.cfg.reductions[i] for i in backbone.out_indices]
    assert len(maps) == len(expected) == len({i % classifier.cfg.num_stages for i in out_indices})
    for fmap, ref, r in zip(maps, expected, info.reduction()):
        assert fmap.shape[-2:] == (-(-x.shape[-2] // r), -(-x.shape[-1] // r))
        assert torch.allclose(fmap, ref, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_backbone_gradients_and_checkpointing(name):
    backbone = _model(name, features_only=True).train()
    x = _input(backbone, name)
    state = copy.deepcopy(backbone.state_dict())

    def run(checkpointing: bool):
        backbone.load_state_dict(state)
        backbone.zero_grad(set_to_none=True)
        backbone.set_grad_checkpointing(checkpointing)
        torch.manual_seed(3)
        maps = backbone(x)
        sum(m.square().mean() for m in maps).backward()
        return [m.detach() for m in maps], {n: p.grad for n, p in backbone.named_parameters()}

    maps, grads = run(False)
    missing = [n for n, g in grads.items() if g is None or not torch.isfinite(g).all()]
    assert not missing, f"backbone parameters without a finite gradient: {missing}"
    maps_ckpt, grads_ckpt = run(True)
    for a, b in zip(maps, maps_ckpt):
        assert torch.allclose(a, b, atol=1e-6)
    for n in grads:
        assert torch.allclose(grads[n], grads_ckpt[n], atol=1e-5, rtol=1e-4), n


@pytest.mark.parametrize("name", MODELS)
def test_reset_classifier(name):
    model = _model(name).eval()
    x = _input(model, name)
    model.reset_classifier(3)
    assert model.num_classes == model.cfg.num_classes == 3
    head = model.get_classifier()
    assert isinstance(head, torch.nn.Linear) and (head.in_features, head.out_features) == (model.num_features, 3)
    with torch.no_grad():
        assert model(x).shape == (2, 3)
        model.reset_classifier(0)
        assert model.num_classes == 0
        pooled = model(x)
        assert pooled.shape == (2, model.num_features)
        assert torch.allclose(pooled, model.forward_head(model.forward_features(x), pre_logits=True))


@pytest.mark.parametrize("name", MODELS)
def test_no_weight_decay_names_parameters(name):
    model = _model(name)
    params = dict(model.named_parameters())
    assert model.no_weight_decay() <= params.keys()
    # the cls token (last stage only, as in the authors' model) is the one parameter excluded by name
    assert all(params[n].ndim == 3 for n in model.no_weight_decay())


@pytest.mark.parametrize("name", MODELS)
def test_timm_create_model_builds_the_same_variant(name):
    import timm

    ours = _model(name)
    torch.manual_seed(0)
    theirs = timm.create_model(name, **_overrides(name))
    assert isinstance(theirs, cvt.CvT)
    assert theirs.cfg == ours.cfg
    assert {k: v.shape for k, v in theirs.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()}
