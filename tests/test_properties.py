"""Property-based tests (hypothesis): the model over input shapes and batch sizes, the validator over values."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cvt
from cvt import CvTConfig
from cvt.model import output_size

_MODEL = cvt.create_model(
    "cvt_13", depths=(1, 1, 1), embed_dims=(16, 32, 64), num_heads=(1, 2, 2), num_classes=5
).eval()
_BACKBONE = cvt.create_model(
    "cvt_13", depths=(1, 1, 1), embed_dims=(16, 32, 64), num_heads=(1, 2, 2), features_only=True
).eval()
_BACKBONE.load_state_dict({k: v for k, v in _MODEL.state_dict().items() if k in _BACKBONE.state_dict()})

sides = st.integers(min_value=3, max_value=70)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.integers(1, 4), h=sides, w=sides)
def test_any_shape_gives_finite_logits_and_consistent_maps(batch, h, w):
    x = torch.randn(batch, 3, h, w)
    with torch.no_grad():
        logits = _MODEL(x)
        maps = _BACKBONE(x)
    assert logits.shape == (batch, 5) and torch.isfinite(logits).all()
    for fmap, info, (mh, mw) in zip(maps, _BACKBONE.feature_info, output_size(_BACKBONE.cfg, h, w)):
        assert fmap.shape == (batch, info["num_chs"], mh, mw)
        # stride-r maps: the side is within one of side / r
        assert abs(mh - h / info["reduction"]) < 1 and abs(mw - w / info["reduction"]) < 1
    # each image is classified on its own: batching does not change the answer
    with torch.no_grad():
        alone = _MODEL(x[-1:])
    assert torch.allclose(alone, logits[-1:], atol=1e-4)


@settings(max_examples=15, deadline=None)
@given(h=st.integers(1, 2), w=st.integers(1, 80))
def test_too_small_inputs_are_rejected_clearly(h, w):
    with pytest.raises(ValueError, match="too small"):
        _MODEL(torch.randn(1, 3, h, w))


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 4),
    dim=st.integers(1, 64),
    heads=st.integers(1, 8),
    depth=st.integers(-1, 3),
    rate=st.floats(-0.5, 1.5, allow_nan=False),
    mlp=st.floats(-1, 8, allow_nan=False),
)
def test_validator_accepts_exactly_the_valid_configs(n, dim, heads, depth, rate, mlp):
    fields = dict(
        embed_dims=(dim,) * n, num_heads=(heads,) * n, depths=(depth,) * n, patch_sizes=(3,) * n,
        patch_strides=(2,) * n, patch_paddings=(1,) * n, drop_path_rate=rate, mlp_ratio=mlp,
    )
    valid = dim % heads == 0 and depth >= 1 and 0 <= rate < 1 and mlp > 0
    if valid:
        cfg = CvTConfig(**fields)
        assert cfg.num_stages == n and len(cfg.drop_path_rate) == n
        assert cfg.drop_path_rate[-1] == rate
    else:
        with pytest.raises(ValueError):
            CvTConfig(**fields)


@settings(max_examples=30, deadline=None)
@given(lengths=st.lists(st.integers(0, 4), min_size=6, max_size=6))
def test_mismatched_stage_counts_are_rejected(lengths):
    names = ("embed_dims", "num_heads", "depths", "patch_sizes", "patch_strides", "patch_paddings")
    fields = {name: (1,) * k for name, k in zip(names, lengths)}
    fields["drop_path_rate"] = 0.0
    if len(set(lengths)) == 1 and lengths[0] > 0:
        assert CvTConfig(**fields).num_stages == lengths[0]
    else:
        with pytest.raises(ValueError):
            CvTConfig(**fields)
