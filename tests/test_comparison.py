"""What the CNN / ViT / CvT comparison (issue 23) stands on: the held-out validation split and the training-set
fractions (`holdout`, `train_fraction`), CvT's ablations (`cvt.models.ablations`), and the probes of
benchmarks/probes.py (shift consistency, attention distance, the stage-1 key/value stride) checked on models whose
answer is known."""

from __future__ import annotations

import json
import math

import pytest
import timm
import torch
from torch import nn

import cvt
import probes
from cvt.cli import main
from cvt.data import split_training
from cvt.models.ablations import PositionalConvEmbed, TokenProjection
from cvt.recipe import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------------------------
# The split
# ---------------------------------------------------------------------------------------------------------------
def test_split_is_class_balanced_fixed_and_nested():
    labels = torch.arange(1000) % 10
    train, held = split_training(labels, holdout=100)
    assert len(held) == 100 and len(train) == 900 and not set(train) & set(held)
    assert torch.bincount(labels[held]).tolist() == [10] * 10  # each class its share
    assert split_training(labels, holdout=100) == (train, held)  # no seed: the same images every time
    small, held_small = split_training(labels, holdout=100, fraction=0.1)
    assert held_small == held and len(small) == 90 and set(small) <= set(train)
    assert torch.bincount(labels[small]).tolist() == [9] * 10
    tiny, _ = split_training(labels, holdout=100, fraction=0.01)
    assert set(tiny) <= set(small) and torch.bincount(labels[tiny]).tolist() == [1] * 10  # one of every class


def test_split_refuses_to_hold_out_everything():
    with pytest.raises(ValueError, match="must leave training images"):
        split_training(torch.zeros(5, dtype=torch.long), holdout=5)


@pytest.mark.parametrize("fields, message", [
    (dict(holdout=-1), "holdout"), (dict(train_fraction=0), "train_fraction"),
    (dict(train_fraction=1.5), "train_fraction"),
    (dict(holdout=10, data="seg:/tmp/x"), "split a classification training set"),
])
def test_recipe_checks_the_split(fields, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**fields)


def test_a_run_validates_on_the_held_out_images(fake_fmnist, tmp_path):
    run = tmp_path / "run"
    rc = main(["train", "--data-dir", str(fake_fmnist), "--model", "cvt_tiny", "--set", "model_args.depths=[1,1,1]",
               "--epochs", "1", "--batch-size", "8", "--set", "holdout=20", "--set", "train_fraction=0.5",
               "--out", str(run)])
    assert rc == 0
    summary = json.load(open(run / "summary.json"))
    # 64 training images: 20 held out, half of the other 44 trained on; the 20 test images left alone
    assert summary["val_split"] == "held out of train" and summary["val_images"] == 20
    assert summary["train_images"] == 22


# ---------------------------------------------------------------------------------------------------------------
# CvT's ablations
# ---------------------------------------------------------------------------------------------------------------
def test_position_embedded_cvt_adds_one_embedding_per_stage_and_takes_any_side():
    model = timm.create_model("cvt_tiny_pos", depths=(1, 1, 1)).eval()
    embeds = [s.patch_embed for s in model.stages]
    assert all(isinstance(e, PositionalConvEmbed) for e in embeds)
    assert [tuple(e.pos_embed.shape[-2:]) for e in embeds] == [(14, 14), (7, 7), (4, 4)]  # 28 px
    plain = cvt.create_model("cvt_tiny", in_chans=1, depths=(1, 1, 1))
    extra = sum(e.pos_embed.numel() for e in embeds)
    assert cvt.param_count(model) == cvt.param_count(plain) + extra
    for side in (20, 28, 56):
        assert model(torch.randn(2, 1, side, side)).shape == (2, 10)
    # the embedding is added: zero it and the model is cvt_tiny with the same weights
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        for e in embeds:
            e.pos_embed.zero_()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if "pos_embed" not in k})
    torch.testing.assert_close(model(x), plain.eval()(x))
    assert timm.create_model("cvt_tiny_pos", img_size=36).stages[0].patch_embed.pos_embed.shape[-1] == 18


def test_linear_projection_cvt_attends_over_every_token():
    model = timm.create_model("cvt_tiny_linear", depths=(1, 1, 1)).eval()
    attn = model.stages[0].blocks[0].attn
    assert all(isinstance(getattr(attn, n), TokenProjection) for n in ("conv_proj_q", "conv_proj_k", "conv_proj_v"))
    seen = []
    hook = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append((q.shape[-2], k.shape[-2]))
        return hook(q, k, v, **kw)

    torch.nn.functional.scaled_dot_product_attention = spy
    try:
        model(torch.randn(1, 1, 28, 28))
    finally:
        torch.nn.functional.scaled_dot_product_attention = hook
    assert seen[0] == (196, 196)  # stage 1: 14x14 queries and as many keys (the conv projection keeps 7x7)


def test_ablations_have_no_weights_and_no_feature_form():
    with pytest.raises(ValueError, match="no published weights"):
        timm.create_model("cvt_tiny_linear", pretrained=True)
    with pytest.raises(ValueError, match="classification only"):
        timm.create_model("cvt_tiny_pos", features_only=True)


# ---------------------------------------------------------------------------------------------------------------
# The probes
# ---------------------------------------------------------------------------------------------------------------
class BrightestQuarter(nn.Module):
    """Class = which quarter of the image holds the most ink: moves with the item, a known shift behaviour."""

    def forward(self, x):
        h, w = x.shape[-2] // 2, x.shape[-1] // 2
        q = torch.stack([x[..., :h, :w].sum((1, 2, 3)), x[..., :h, w:].sum((1, 2, 3)),
                         x[..., h:, :w].sum((1, 2, 3)), x[..., h:, w:].sum((1, 2, 3))], -1)
        return q


def test_shift_consistency_of_a_constant_and_of_a_position_reading_model():
    images = torch.zeros(4, 1, 28, 28, dtype=torch.uint8)
    images[:, :, 10:18, 10:18] = 255
    labels = torch.zeros(4, dtype=torch.long)
    constant = nn.Sequential(nn.Flatten(), nn.LazyLinear(3))
    with torch.no_grad():
        constant(torch.zeros(1, 1, 36 * 36))
        constant[1].weight.zero_()
        constant[1].bias.copy_(torch.tensor([1.0, 0, 0]))
    r = probes.shift_consistency(constant, images, labels, (0.0,), (1.0,), canvas=36)
    assert r["consistency"] == 100 and r["accuracy_min"] == 100 and r["offsets_per_axis"] == 9
    constant_28 = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 3))
    constant_28[1].load_state_dict({"weight": torch.zeros(3, 28 * 28), "bias": torch.tensor([1.0, 0, 0])})
    r = probes.shift_consistency(constant_28, images, labels, (0.0,), (1.0,), canvas=36, window=True)
    assert r["consistency"] == 100 and r["model_input"] == 28
    r = probes.shift_consistency(BrightestQuarter(), images, labels, (0.0,), (1.0,), canvas=36)
    assert r["consistency"] < 50  # the predicted quarter follows the item round the canvas
    acc = torch.tensor(r["accuracy_by_offset"])
    assert acc[0, 0] == 100 and acc[-1, -1] == 0  # top-left placement: quarter 0; bottom-right: quarter 3
    # through the 28 px window the centred item (offset 4, 4) straddles the quarters alike; moved 4 px up and
    # left, it lies in quarter 0
    r = probes.shift_consistency(BrightestQuarter(), images, labels, (0.0,), (1.0,), canvas=36, window=True)
    assert r["accuracy_by_offset"][0][0] == 100 and r["accuracy_by_offset"][-1][-1] == 0


def test_attention_distance_of_a_uniform_cvt_is_the_uniform_distance():
    model = cvt.create_model("cvt_tiny", in_chans=1, depths=(1, 1, 1)).eval()
    for m in model.modules():
        if isinstance(m, cvt.model.Attention):
            nn.init.zeros_(m.proj_q.weight)  # q = bias: every query scores every key alike
            nn.init.zeros_(m.proj_q.bias)
    rows = probes.cvt_attention_distance(model, torch.randn(2, 1, 28, 28))
    assert [(r["stage"], r["query_grid"], r["key_grid"]) for r in rows] == [
        (1, [14, 14], [7, 7]), (2, [7, 7], [4, 4]), (3, [4, 4], [2, 2])]
    for r in rows:
        assert all(h == pytest.approx(r["uniform"], abs=1e-3) for h in r["heads"])
    # stage 3 of cvt_tiny: 4x4 queries 8 px apart (three stride-2 embeddings), 2x2 keys 16 px apart
    pairs = [math.dist((8 * i, 8 * j), (16 * a, 16 * b)) for i in range(4) for j in range(4)
             for a in range(2) for b in range(2)]
    assert rows[2]["uniform"] == pytest.approx(sum(pairs) / len(pairs), abs=1e-3)


def test_attention_distance_of_a_vit_is_zero_when_each_patch_attends_to_itself():
    model = timm.create_model("vit_fmnist_small", depth=1, num_heads=1).eval()
    attn = model.blocks[0].attn
    with torch.no_grad():
        attn.qkv.weight.zero_()
        attn.qkv.bias.zero_()
    rows = probes.vit_attention_distance(model, torch.randn(2, 1, 28, 28))
    assert rows[0]["query_grid"] == [7, 7] and rows[0]["heads"][0] == pytest.approx(rows[0]["uniform"], abs=1e-3)
    # A query-key product that peaks on the diagonal: near-zero distance.
    pos = torch.randn(1, 49, 96) * 10
    with torch.no_grad():
        model.pos_embed[:, 1:] = pos
        model.patch_embed.proj.weight.zero_()
        model.patch_embed.proj.bias.zero_()
        model.norm_pre = nn.Identity()
        model.blocks[0].norm1 = nn.Identity()
        attn.qkv.weight[:96] = torch.eye(96) * 3
        attn.qkv.weight[96:192] = torch.eye(96) * 3
    rows = probes.vit_attention_distance(model, torch.randn(2, 1, 28, 28))
    assert rows[0]["heads"][0] < 0.5


def test_stage_kv_stride_changes_the_key_count_and_keeps_the_weights():
    model = cvt.create_model("cvt_tiny", in_chans=1, depths=(1, 1, 1)).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    probes.set_stage_kv_stride(model, 0, 4)
    rows = probes.cvt_attention_distance(model, torch.randn(1, 1, 28, 28))
    assert rows[0]["key_grid"] == [4, 4] and rows[1]["key_grid"] == [4, 4]  # stage 2 keeps its stride 2
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_resize_and_pad_keep_uint8_and_the_content():
    images = torch.zeros(1, 1, 28, 28, dtype=torch.uint8)
    images[..., 4:24, 4:24] = 200
    padded = probes.pad_to(images, 36)
    assert padded.shape[-1] == 36 and padded.dtype == torch.uint8 and int(padded.sum()) == int(images.sum())
    assert probes.pad_to(images, 20).shape[-1] == 20
    resized = probes.resize(images, 56)
    assert resized.dtype == torch.uint8 and resized.shape[-1] == 56 and int(resized[0, 0, 28, 28]) == 200
