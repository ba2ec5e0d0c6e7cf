"""The model library: sizes, costs, the timm interface over every registered variant, and clear errors."""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
from torch import nn

import cvt
from cvt.layers import fast_paths
from cvt.model import CvT, LayerNorm, Mlp
from cvt.weights import CheckpointError

PAPER_PARAMS = {"cvt_13": 19_997_480, "cvt_21": 31_622_696, "cvt_w24": 277_196_392}


@pytest.mark.parametrize("name,expected", PAPER_PARAMS.items())
def test_paper_parameter_counts(name, expected):
    with torch.device("meta"):
        model = cvt.create_model(name, num_classes=1000)
    assert cvt.param_count(model) == expected


def test_cvt13_macs_match_the_paper():
    model = cvt.create_model("cvt_13")
    assert 4.5e9 <= cvt.count_macs(model, 224) <= 4.6e9
    assert 16.2e9 <= cvt.count_macs(model, 384) <= 16.4e9


# A tiny input that every variant accepts (the paper's models need 3x3 at least; the small ones 1x1).
def _tiny_size(name: str) -> tuple[int, int]:
    return (40, 48) if name in PAPER_PARAMS else (20, 24)


def _shrunk(name: str) -> CvT:
    """The variant with 1 block a stage: same code paths (cls token, strides, widths), a fraction of the time."""
    cfg = cvt.default_config(name)
    return cvt.create_model(name, depths=(1,) * cfg.num_stages, num_classes=7)


@pytest.mark.parametrize("name", cvt.list_models())
def test_variant_trains_and_is_finite(name):
    torch.manual_seed(0)
    model = _shrunk(name).train()
    x = torch.randn(2, model.cfg.in_chans, *_tiny_size(name))
    out = model(x)
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    # The logits read the cls token only, so the last block's spatial queries get no gradient through them
    # (in the authors' model too); the tokens' loss reaches those.
    (out.square().sum() + model.forward_features(x).square().mean()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad, f"parameters without a finite gradient: {no_grad}"
    zero = [n for n, p in model.named_parameters() if p.grad.abs().sum() == 0]
    assert not zero, f"parameters whose gradient is all zero: {zero}"


@pytest.mark.parametrize("name", cvt.list_models())
def test_grad_checkpointing_same_outputs_and_grads(name):
    torch.manual_seed(0)
    model = _shrunk(name).train()
    x = torch.randn(2, model.cfg.in_chans, *_tiny_size(name))
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def run(checkpointing: bool):
        model.load_state_dict(state)
        model.zero_grad()
        model.set_grad_checkpointing(checkpointing)
        torch.manual_seed(1)
        out = model(x)
        out.square().sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        return out.detach(), grads, {k: v.clone() for k, v in model.state_dict().items()}

    out_plain, grads_plain, buffers_plain = run(False)
    out_ckpt, grads_ckpt, buffers_ckpt = run(True)
    assert torch.allclose(out_plain, out_ckpt, atol=1e-6)
    for n in grads_plain:
        assert torch.allclose(grads_plain[n], grads_ckpt[n], atol=1e-5, rtol=1e-4), n
    # BatchNorm running statistics are updated once, not again by the recomputation
    for k in buffers_plain:
        assert torch.allclose(buffers_plain[k], buffers_ckpt[k], atol=1e-6), k


@pytest.mark.parametrize("name", cvt.list_models())
def test_feature_info_matches_maps(name):
    model = _shrunk(name).eval()
    backbone = cvt.create_model(name, depths=(1,) * model.cfg.num_stages, features_only=True).eval()
    h, w = _tiny_size(name)
    maps = backbone(torch.randn(1, model.cfg.in_chans, h, w))
    assert len(maps) == len(backbone.feature_info) == model.cfg.num_stages
    for fmap, info in zip(maps, backbone.feature_info):
        assert fmap.shape[1] == info["num_chs"]
        r = info["reduction"]
        # each token embedding pads by (kernel - 1) / 2, so sizes are ceil(side / reduction)
        assert fmap.shape[-2:] == (-(-h // r), -(-w // r))


def test_features_only_subset_and_no_unused_parameters():
    backbone = cvt.create_model("cvt_13", depths=(1, 1, 1), features_only=True, out_indices=(0, 1))
    assert [i["reduction"] for i in backbone.feature_info] == [4, 8]
    assert len(backbone.stages) == 2  # the third stage would never run
    maps = backbone(torch.randn(1, 3, 64, 64))
    sum(m.sum() for m in maps).backward()
    assert all(p.grad is not None for p in backbone.parameters())
    with pytest.raises(ValueError, match="out_indices"):
        cvt.create_model("cvt_13", features_only=True, out_indices=(0, 5))


def test_any_input_size_and_batch_one():
    model = cvt.create_model("cvt_13", depths=(1, 1, 1)).eval()
    with torch.no_grad():
        for shape in [(1, 3, 224, 224), (1, 3, 97, 131), (3, 3, 64, 32), (1, 3, 3, 3)]:
            out = model(torch.randn(*shape))
            assert out.shape == (shape[0], 1000) and torch.isfinite(out).all()


def test_eval_matches_train_mode_batchnorm_math():
    """The eval fast path folds BatchNorm into the depthwise convolution; it must equal conv then BN."""
    from cvt.model import ConvProjection

    proj = ConvProjection(8, 3, 2)
    with torch.no_grad():
        proj.bn.running_mean.normal_()
        proj.bn.running_var.uniform_(0.5, 2)
        proj.bn.weight.normal_()
        proj.bn.bias.normal_()
    proj.eval()
    x = torch.randn(2, 8, 9, 7)
    expected = proj.bn(proj.conv(x)).flatten(2).transpose(1, 2)
    assert torch.allclose(proj(x), expected, atol=1e-5)


class _PlusDelta(nn.Module):
    """What a LoRA wrapper looks like to the model: the original Linear plus a trainable change."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.base = linear
        self.delta = nn.Parameter(torch.full((linear.out_features,), 0.5))

    def forward(self, x):
        return self.base(x) + self.delta


class _CountingReLU(nn.ReLU):
    calls = 0

    def forward(self, x):
        type(self).calls += 1
        return super().forward(x)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("layer", ["fc1", "fc2"])
def test_replaced_mlp_layers_are_called(training, layer):
    """The fused MLP reads fc1/fc2's weights and the activation's kernel (QuickGELU as a SiLU with its scales in
    the matmuls); a replaced Linear (a LoRA wrapper), a hooked one or another activation must be called instead."""
    torch.manual_seed(0)
    model = cvt.create_model("cvt_13", depths=(1, 1, 1), num_classes=5, drop_path_rate=0.0).train(training)
    nn.init.normal_(model.head.weight, std=0.1)
    unchanged = copy.deepcopy(model)
    reference = copy.deepcopy(model)  # plain layers whose bias is 0.5 larger: the fused path, same function
    hooked = copy.deepcopy(model)  # plain layers with a forward hook adding 0.5 (pruning and capture use hooks)
    mlps = {name: [m for m in net.modules() if isinstance(m, Mlp)] for name, net in
            [("model", model), ("reference", reference), ("hooked", hooked)]}
    for wrapped, plain, with_hook in zip(*mlps.values(), strict=True):
        setattr(wrapped, layer, _PlusDelta(getattr(wrapped, layer)))
        with torch.no_grad():
            getattr(plain, layer).bias += 0.5
        getattr(with_hook, layer).register_forward_hook(lambda mod, inputs, out: out + 0.5)
    x = torch.randn(2, 3, 64, 64)
    with torch.set_grad_enabled(training):
        expected = reference(x)
        assert (expected - unchanged(x)).abs().max() > 1e-3  # the 0.5 shows, so the comparisons below can fail
        assert torch.allclose(model(x), expected, rtol=1e-5, atol=1e-5)
        assert torch.allclose(hooked(x), expected, rtol=1e-5, atol=1e-5)
        _CountingReLU.calls = 0
        for m in mlps["model"]:
            m.act = _CountingReLU()
        model(x)
    assert _CountingReLU.calls == 3


def test_timm_interface():
    import timm

    model = timm.create_model("cvt_13", depths=(1, 1, 1), num_classes=5)
    assert isinstance(model, CvT) and model.num_classes == 5
    x = torch.randn(2, 3, 64, 64)
    feats = model.forward_features(x)
    assert feats.shape == (2, 1 + 4 * 4, 384)
    assert model.forward_head(feats, pre_logits=True).shape == (2, 384)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)
    model.reset_classifier(0)
    assert model(x).shape == (2, 384)
    assert model.no_weight_decay() == {"stages.2.cls_token"}


def test_drop_path_rises_within_each_stage():
    model = cvt.create_model("cvt_13")
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for b in model.stages[2].blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.1)
    assert all(a < b for a, b in zip(rates, rates[1:]))
    assert all(getattr(b.drop_path, "drop_prob", 0.0) == 0.0 for s in model.stages[:2] for b in s.blocks)


def test_layernorm_runs_in_float32_under_autocast():
    ln = LayerNorm(16)
    x = (torch.randn(4, 16) * 100 + 1000).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ln(x)
    assert out.dtype == torch.bfloat16
    expected = torch.nn.functional.layer_norm(x.float(), (16,)).bfloat16()
    assert torch.equal(out, expected)


def test_bf16_autocast_forward_is_finite():
    model = cvt.create_model("cvt_13", depths=(1, 1, 1)).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 64, 64))
    assert torch.isfinite(out.float()).all()


def test_training_forward_compiles_as_one_graph(monkeypatch):
    """torch.compile traces the training forward (drop path on, no gradient checkpointing) as one graph, reading no
    ContextVar: before torch 2.14 such a read broke the graph, and on an H200 (torch 2.11) the break split every
    block and recompiled it per drop-path rate until the limit, then crashed Inductor (benchmarks/GPU_NOTES.md)."""
    from cvt.layers import checkpoint, fused

    class Unreadable:
        def get(self):
            raise AssertionError("a ContextVar was read while compiling")

    monkeypatch.setattr(checkpoint, "_RECOMPUTING", Unreadable())
    monkeypatch.setattr(checkpoint, "_CHECKPOINTED", Unreadable())
    monkeypatch.setattr(fused, "_RECOMPUTE_MIN_NUMEL", 0)  # the MLP's recomputation check is reached too
    torch._dynamo.reset()
    model = cvt.create_model("cvt_13", depths=(1, 1, 2), drop_path_rate=0.1, num_classes=3).train()
    explained = torch._dynamo.explain(model)(torch.randn(2, 3, 32, 32))
    torch._dynamo.reset()
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons


def test_compiled_grad_checkpointing_same_grads_and_statistics():
    """torch.compile of a model under gradient checkpointing (it once refused our checkpoint contexts): the same
    gradients, and BatchNorm's running statistics updated once, as without checkpointing."""
    torch.manual_seed(0)
    model = cvt.create_model("cvt_13", depths=(1, 1, 2), num_classes=3).train()
    plain = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32)
    plain(x).square().sum().backward()
    model.set_grad_checkpointing(True)
    torch._dynamo.reset()
    torch.compile(model, backend="aot_eager", dynamic=False)(x).square().sum().backward()
    torch._dynamo.reset()
    for (name, a), b in zip(plain.state_dict().items(), model.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), name
    for (name, a), b in zip(plain.named_parameters(), model.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-4, rtol=1e-4), name


# ---- bad input ----------------------------------------------------------------------------------------------
def test_wrong_channels_too_small_wrong_rank():
    model = cvt.create_model("cvt_13", depths=(1, 1, 1))
    with pytest.raises(ValueError, match="3-channel images, got 1 channels"):
        model(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match="too small.*at least 3x3"):
        model(torch.randn(1, 3, 2, 64))
    with pytest.raises(ValueError, match=r"\(batch, channels, height, width\)"):
        model(torch.randn(3, 64, 64))


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(embed_dims=(64, 190, 384)), "not divisible by num_heads"),
        (dict(depths=()), "one per stage"),
        (dict(embed_dims=(), num_heads=(), depths=(), patch_sizes=(), patch_strides=(), patch_paddings=(),
              drop_path_rate=()), "at least one stage"),
        (dict(act="relu"), "act must be one of"),
        (dict(depths=(1, 0, 2)), "positive integers"),
        (dict(drop_path_rate=1.5), r"drop_path_rate must be in \[0, 1\)"),
        (dict(num_classes=-1), "num_classes"),
        (dict(stride_q=2), "stride_q must be 1"),
        (dict(mystery=3), "unknown CvT config field"),
    ],
)
def test_invalid_config_is_a_clear_error(fields, message):
    with pytest.raises(ValueError, match=message):
        cvt.create_model("cvt_13", **fields)


def test_unknown_model_suggests_close_names():
    with pytest.raises(ValueError, match="did you mean cvt_13"):
        cvt.create_model("cvt13")


def test_hub_ids_get_a_local_file_hint():
    for spec in ("microsoft/cvt-13", True):
        with pytest.raises(CheckpointError, match="never downloaded; pass a local file"):
            cvt.create_model("cvt_13", pretrained=spec)


def test_a_mistyped_local_path_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for spec in ("runs/demo", "weights/model.safetensors"):  # an existing folder; a weights file's extension
        with pytest.raises(CheckpointError, match=f"checkpoint {spec} does not exist"):
            cvt.create_model("cvt_13", pretrained=spec)


def test_checkpoint_of_another_architecture(tmp_path):
    other = cvt.create_model("cvt_13", depths=(1, 2, 3), embed_dims=(64, 192, 256), num_heads=(1, 3, 4))
    path = tmp_path / "other.pth"
    torch.save(cvt.weights.from_ours(other.state_dict(), "authors"), path)
    with pytest.raises(CheckpointError, match=r"does not fit.*unexpected|does not fit.*missing"):
        cvt.create_model("cvt_13", depths=(1, 2, 4), pretrained=path)
    with pytest.raises(CheckpointError, match="shape mismatch"):
        cvt.create_model("cvt_13", depths=(1, 2, 3), pretrained=path)
    # a config-carrying checkpoint names the fields that differ
    cvt.save_weights(other.state_dict(), other.cfg, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="another architecture.*embed_dims"):
        cvt.create_model("cvt_13", pretrained=tmp_path / "other.safetensors")


def test_truncated_and_foreign_files(tmp_path):
    model = cvt.create_model("cvt_13", depths=(1, 1, 1), num_classes=3)
    full = tmp_path / "full.pth"
    torch.save(model.state_dict(), full)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or not a PyTorch checkpoint"):
        cvt.from_pretrained(cut)
    cvt.save_weights(model.state_dict(), model.cfg, tmp_path / "w.safetensors")
    cut_st = tmp_path / "cut.safetensors"
    cut_st.write_bytes((tmp_path / "w.safetensors").read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="truncated or not a safetensors"):
        cvt.from_pretrained(cut_st)
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "resnet.pth")
    with pytest.raises(CheckpointError, match="not a CvT state dict"):
        cvt.from_pretrained(tmp_path / "resnet.pth")
    with pytest.raises(CheckpointError, match="does not exist"):
        cvt.from_pretrained(tmp_path / "nope.pth")


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save({"state_dict": {"x": _Evil(str(marker))}}, buf)
    assert not marker.exists()
    path = tmp_path / "evil.pth"
    path.write_bytes(buf.getvalue())
    with pytest.raises(CheckpointError, match="refused"):
        cvt.from_pretrained(path)
    assert not marker.exists()
    # plain pickle too (not a torch zip file)
    path2 = tmp_path / "evil2.pth"
    path2.write_bytes(pickle.dumps({"x": _Evil(str(marker))}))
    with pytest.raises(CheckpointError):
        cvt.from_pretrained(path2)
    assert not marker.exists()


def test_other_class_count_reinitialises_head_with_warning(tmp_path):
    model = cvt.create_model("cvt_13", depths=(1, 1, 1), num_classes=10)
    cvt.save_weights(model.state_dict(), model.cfg, tmp_path / "w.safetensors", class_names=list("abcdefghij"))
    same = cvt.create_model("cvt_13", depths=(1, 1, 1), pretrained=tmp_path / "w.safetensors")
    assert same.num_classes == 10 and same.class_names == list("abcdefghij")
    with pytest.warns(UserWarning, match="10-class head.*re-initialised"):
        other = cvt.create_model("cvt_13", depths=(1, 1, 1), pretrained=tmp_path / "w.safetensors", num_classes=4)
    assert other.head.weight.shape == (4, 384) and other.class_names is None
    assert torch.equal(other.stages[0].patch_embed.proj.weight, model.stages[0].patch_embed.proj.weight)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        headless = cvt.create_model("cvt_13", depths=(1, 1, 1), pretrained=tmp_path / "w.safetensors", num_classes=0)
    assert headless.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 384)


def test_key_mappings_are_idempotent_and_invertible():
    from cvt.weights import from_ours, to_ours

    sd = cvt.create_model("cvt_13", depths=(1, 1, 2)).state_dict()
    for fmt in ("hf", "authors", "cvt"):
        theirs = from_ours(sd, fmt)
        assert to_ours(theirs).keys() == sd.keys()
        assert to_ours(to_ours(theirs)).keys() == sd.keys()
    ddp = {"module." + k: v for k, v in from_ours(sd, "authors").items()}
    assert to_ours(ddp).keys() == sd.keys()


def test_cli_errors_are_one_line(tmp_path, capsys):
    from cvt.cli import main

    assert main(["convert", "microsoft/cvt-13", str(tmp_path / "x.safetensors")]) == 2
    assert main(["convert", "--model", "cvt13", str(tmp_path / "nope"), str(tmp_path / "x.safetensors")]) == 2
    assert main(["convert", str(tmp_path / "nope.pth"), str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3
    assert "never downloaded" in err[0] and "did you mean cvt_13" in err[1] and "does not exist" in err[2]
    assert not (tmp_path / "x.safetensors").exists()


def test_per_sample_gradients_with_torch_func():
    """torch.func transforms (here vmap of grad: per-sample gradients, as differential privacy needs) run the model
    on ordinary ops, outside our custom autograd Functions, and agree with plain autograd."""
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(0)
    model = cvt.create_model("cvt_tiny", in_chans=1).eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())
    x, y = torch.randn(3, 1, 28, 28), torch.tensor([1, 2, 3])

    F = nn.functional

    def loss(p, xi, yi):
        return F.cross_entropy(functional_call(model, (p, buffers), (xi[None],)), yi[None])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no batching rule" performance warnings from PyTorch's own kernels
        per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    for i in range(3):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        for name, p in model.named_parameters():
            assert torch.allclose(per_sample[name][i], p.grad, atol=1e-5), name


def test_bias_only_fine_tuning_gets_gradients(monkeypatch):
    """Training only some biases (BitFit-style): where neither a Linear's input nor its weight needs a gradient,
    its bias still gets one, the same on the oneDNN path as on PyTorch's own."""
    torch.manual_seed(0)
    model = cvt.create_model("cvt_tiny", in_chans=1).train()
    trained = "stages.2.blocks.3.mlp.fc1.bias"  # the last block: nothing before it trains
    for name, p in model.named_parameters():
        p.requires_grad_(name == trained)
    x, y = torch.randn(4, 1, 28, 28), torch.tensor([1, 2, 3, 4])
    state = copy.deepcopy(model.state_dict())  # train-mode forwards move the BatchNorm statistics
    grads = []
    for onednn in (True, False):
        model.load_state_dict(state)
        model.zero_grad()
        with fast_paths(onednn_linear=onednn):
            nn.functional.cross_entropy(model(x), y).backward()
        grads.append(dict(model.named_parameters())[trained].grad)
    assert grads[0] is not None and torch.allclose(grads[0], grads[1], atol=1e-6)
