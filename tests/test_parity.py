"""Parity with code that is not ours: transformers' CvtForImageClassification, and the authors' key layout.

The HF model is built with random weights and random BatchNorm statistics, saved with `save_pretrained`, and
loaded through `cvt.create_model(..., pretrained=folder)`. The authors'-format checkpoint is built from the HF
weights with a key table written here from the key names of the authors' microsoft/CvT code (not with cvt's own
mapping), so the test does not compare cvt to itself.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import cvt

transformers = pytest.importorskip("transformers")

CVT13_HF = dict(
    embed_dim=[64, 192, 384], num_heads=[1, 3, 6], depth=[1, 2, 10], drop_path_rate=[0.0, 0.0, 0.1], num_labels=1000
)


def _randomize_bn(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(1 + 0.2 * torch.randn(m.num_features, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.num_features, generator=g))
                m.num_batches_tracked.fill_(7)


@pytest.fixture(scope="module")
def hf_cvt13(tmp_path_factory):
    torch.manual_seed(0)
    hf = transformers.CvtForImageClassification(transformers.CvtConfig(**CVT13_HF)).eval()
    _randomize_bn(hf)
    folder = tmp_path_factory.mktemp("hf_cvt13")
    hf.save_pretrained(folder)
    return hf, folder


@pytest.mark.parametrize("batch,size", [(1, (224, 224)), (3, (224, 224)), (1, (160, 192)), (3, (160, 192))])
def test_logits_match_transformers(hf_cvt13, batch, size):
    hf, folder = hf_cvt13
    ours = cvt.create_model("cvt_13", pretrained=folder, act="gelu").eval()
    x = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        expected = hf(x).logits
        got = ours(x)
    assert got.shape == expected.shape == (batch, 1000)
    assert (got - expected).abs().max().item() <= 1e-4


def test_features_only_maps_equal_hidden_states(hf_cvt13):
    hf, folder = hf_cvt13
    backbone = cvt.create_model("cvt_13", pretrained=folder, act="gelu", features_only=True).eval()
    x = torch.randn(2, 3, 160, 192)
    with torch.no_grad():
        hidden = hf(x, output_hidden_states=True).hidden_states
        maps = backbone(x)
    assert len(maps) == len(hidden) == 3
    for ours_map, hf_map, info in zip(maps, hidden, backbone.feature_info):
        assert ours_map.shape == hf_map.shape
        assert ours_map.shape[1] == info["num_chs"] and ours_map.shape[-1] == 192 // info["reduction"]
        assert (ours_map - hf_map).abs().max().item() <= 1e-4


# The authors' and Hugging Face's key layouts (microsoft/CvT's lib/models/cls_cvt.py, transformers'
# modeling_cvt.py), written out independently of cvt.weights.
_LAYER = r"^cvt\.encoder\.stages\.(\d+)\.layers\.(\d+)\."
_ATTN = _LAYER + r"attention\.attention\."
_HF_TO_AUTHORS = [
    (r"^cvt\.encoder\.stages\.(\d+)\.embedding\.convolution_embeddings\.projection\.", r"stage\1.patch_embed.proj."),
    (r"^cvt\.encoder\.stages\.(\d+)\.embedding\.convolution_embeddings\.normalization\.", r"stage\1.patch_embed.norm."),
    (r"^cvt\.encoder\.stages\.(\d+)\.cls_token$", r"stage\1.cls_token"),
    (_LAYER + r"layernorm_before\.", r"stage\1.blocks.\2.norm1."),
    (_LAYER + r"layernorm_after\.", r"stage\1.blocks.\2.norm2."),
    (_ATTN + r"convolution_projection_query\.convolution_projection\.convolution\.",
     r"stage\1.blocks.\2.attn.conv_proj_q.conv."),
    (_ATTN + r"convolution_projection_key\.convolution_projection\.convolution\.",
     r"stage\1.blocks.\2.attn.conv_proj_k.conv."),
    (_ATTN + r"convolution_projection_value\.convolution_projection\.convolution\.",
     r"stage\1.blocks.\2.attn.conv_proj_v.conv."),
    (_ATTN + r"convolution_projection_query\.convolution_projection\.normalization\.",
     r"stage\1.blocks.\2.attn.conv_proj_q.bn."),
    (_ATTN + r"convolution_projection_key\.convolution_projection\.normalization\.",
     r"stage\1.blocks.\2.attn.conv_proj_k.bn."),
    (_ATTN + r"convolution_projection_value\.convolution_projection\.normalization\.",
     r"stage\1.blocks.\2.attn.conv_proj_v.bn."),
    (_ATTN + r"projection_query\.", r"stage\1.blocks.\2.attn.proj_q."),
    (_ATTN + r"projection_key\.", r"stage\1.blocks.\2.attn.proj_k."),
    (_ATTN + r"projection_value\.", r"stage\1.blocks.\2.attn.proj_v."),
    (_LAYER + r"attention\.output\.dense\.", r"stage\1.blocks.\2.attn.proj."),
    (_LAYER + r"intermediate\.dense\.", r"stage\1.blocks.\2.mlp.fc1."),
    (_LAYER + r"output\.dense\.", r"stage\1.blocks.\2.mlp.fc2."),
    (r"^layernorm\.", "norm."),
    (r"^classifier\.", "head."),
]


def _authors_state_dict(hf_state: dict) -> dict:
    out = {}
    for key, value in hf_state.items():
        for pattern, repl in _HF_TO_AUTHORS:
            new, n = re.subn(pattern, repl, key)
            if n:
                out[new] = value
                break
        else:
            raise AssertionError(f"unmapped HF key {key}")
    return out


class _QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


@pytest.mark.parametrize("wrapper", [None, "state_dict", "model"])
def test_authors_checkpoint_with_quick_gelu(hf_cvt13, tmp_path, wrapper):
    hf, _ = hf_cvt13
    authors = _authors_state_dict(hf.state_dict())
    assert "stage2.cls_token" in authors and authors["stage2.cls_token"].shape == (1, 1, 384)
    path = tmp_path / "CvT-13-224x224-IN-1k.pth"
    torch.save(authors if wrapper is None else {wrapper: authors, "epoch": 300}, path)

    ours = cvt.create_model("cvt_13", pretrained=path).eval()  # default activation: the authors' QuickGELU
    assert ours.cfg.act == "quick_gelu"
    # The HF port with its GELU swapped for QuickGELU computes the authors' model.
    reference = transformers.CvtForImageClassification(hf.config).eval()
    reference.load_state_dict(hf.state_dict())
    for layer in reference.modules():
        if type(layer).__name__ == "CvtIntermediate":
            layer.activation = _QuickGELU()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        got, expected = ours(x), reference(x).logits
    assert (got - expected).abs().max().item() <= 1e-4
    # and the name is not needed: the shapes identify CvT-13
    assert cvt.from_pretrained(path).cfg.depths == (1, 2, 10)


def test_convert_round_trip_back_to_transformers(hf_cvt13, tmp_path):
    """HF folder -> cvt .safetensors -> authors' .pth -> HF folder, loaded by transformers itself."""
    hf, folder = hf_cvt13
    from cvt.cli import main

    # cvt's .safetensors brings its config.json: into the HF folder itself it would replace the port's config.
    hf_config = (folder / "config.json").read_bytes()
    assert main(["convert", str(folder), str(folder / "w.safetensors")]) == 2
    assert (folder / "config.json").read_bytes() == hf_config and not (folder / "w.safetensors").exists()

    assert main(["convert", str(folder), str(tmp_path / "w.safetensors")]) == 0
    assert main(["convert", str(tmp_path / "w.safetensors"), str(tmp_path / "authors.pth")]) == 0
    assert main(["convert", str(tmp_path / "authors.pth"), str(tmp_path / "hf_again")]) == 0
    back = transformers.CvtForImageClassification.from_pretrained(tmp_path / "hf_again").eval()
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        assert torch.equal(back(x).logits, hf(x).logits)
    for key, value in hf.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


@pytest.mark.parametrize("act", ["gelu", "quick_gelu"])
def test_training_step_matches_transformers(tmp_path, monkeypatch, act):
    """Train mode (BatchNorm on batch statistics), loss and every parameter's gradient against the port's: this
    covers our training-only paths (the MLP recomputing its activation in backward instead of storing it, and
    the Linear layers' oneDNN input gradient, which a model this small only takes with the size thresholds
    lowered; QuickGELU run as a SiLU with its scales moved into the MLP's matmuls, against the port with the
    authors' formula swapped in)."""
    from cvt.layers import fused, linear

    monkeypatch.setattr(fused, "_RECOMPUTE_MIN_NUMEL", 0)
    monkeypatch.setattr(linear, "_ONEDNN_GRAD_MIN_TOKENS", 0)  # oneDNN's input gradient, also a size threshold
    torch.manual_seed(0)
    config = transformers.CvtConfig(
        embed_dim=[16, 32, 48], num_heads=[1, 2, 3], depth=[1, 2, 3], drop_path_rate=[0.0, 0.0, 0.0], num_labels=5
    )
    hf = transformers.CvtForImageClassification(config)
    _randomize_bn(hf)
    hf.save_pretrained(tmp_path)
    ours = cvt.from_pretrained(tmp_path, act=act)
    if act == "quick_gelu":
        for layer in hf.modules():
            if type(layer).__name__ == "CvtIntermediate":
                layer.activation = _QuickGELU()
    hf.train(), ours.train()
    x = torch.randn(3, 3, 64, 80)
    y = torch.tensor([0, 3, 4])
    loss_hf = nn.functional.cross_entropy(hf(x).logits, y)
    loss_ours = nn.functional.cross_entropy(ours(x), y)
    loss_hf.backward()
    loss_ours.backward()
    assert abs(loss_hf.item() - loss_ours.item()) <= 1e-5
    ours_params = dict(ours.named_parameters())
    hf_grads = _authors_state_dict({k: p.grad for k, p in hf.named_parameters()})
    assert len(hf_grads) == len(ours_params)
    for key, grad in hf_grads.items():
        name = re.sub(r"^stage(\d)\.", r"stages.\1.", key)
        # relative to the tensor's largest gradient; absolute for the ones that are zero in exact arithmetic
        # (the key projection's bias: softmax ignores a shift shared by all keys)
        tolerance = max(1e-4 * grad.abs().max().item(), 1e-7)
        assert (ours_params[name].grad - grad).abs().max().item() <= tolerance, name
    # and the BatchNorm running statistics moved the same way
    hf_buffers = _authors_state_dict(dict(hf.named_buffers()))
    ours_buffers = dict(ours.named_buffers())
    for key, value in hf_buffers.items():
        name = re.sub(r"^stage(\d)\.", r"stages.\1.", key)
        assert torch.allclose(ours_buffers[name].float(), value.float(), atol=1e-5), name
