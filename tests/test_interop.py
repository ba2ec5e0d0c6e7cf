"""The model inside other libraries' machinery: tracers and compilers, swapped norm layers, PEFT's LoRA.

Each test uses the other library's own entry point, as its users would, at tiny sizes.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cvt
from cvt.layers import BatchNorm2d


def _tiny(**overrides) -> cvt.CvT:
    torch.manual_seed(0)
    args = dict(in_chans=3, drop_path_rate=0.0, num_classes=5)
    args.update(overrides)
    model = cvt.create_model("cvt_tiny", **args)
    for m in model.modules():  # non-trivial statistics, so that a norm that is skipped or misread shows
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    return model


X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------------------------------------------
# Tracers and compilers
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_fx_symbolic_trace_matches_eager(mode):
    model = getattr(_tiny(), mode)()
    graph = torch.fx.symbolic_trace(model)
    start = copy.deepcopy(model.state_dict())
    eager = model(X)
    model.load_state_dict(start)  # a train-mode forward moved the BatchNorm statistics
    assert torch.allclose(graph(X), eager, atol=1e-5)
    if mode == "train":  # the graph updates the running statistics as the module does
        ours = model.state_dict()
        stats = {k: v for k, v in graph.state_dict().items() if "running_" in k}
        assert len(stats) == sum("running_" in k for k in ours)
        for name, value in stats.items():
            assert torch.allclose(value, ours[name], atol=1e-6), name


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_torchvision_feature_extractor(mode):
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    model = getattr(_tiny(), mode)()
    train_nodes, eval_nodes = get_graph_node_names(model)
    nodes = train_nodes if mode == "train" else eval_nodes
    assert "head" in nodes
    wanted = {"stages.0.blocks.0.mlp.fc2": "s0_mlp", "norm": "tokens", "head": "logits"}
    extractor = create_feature_extractor(model, return_nodes=wanted)
    captured = {}
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, i, o, k=k: captured.__setitem__(k, o))
             for n, k in wanted.items()]
    start = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        model(X)
        for h in hooks:
            h.remove()
        model.load_state_dict(start)
        out = extractor(X)
    assert set(out) == set(wanted.values())
    for key, value in out.items():
        assert torch.allclose(value, captured[key], atol=1e-5), key


def test_torch_export_matches_eager():
    model = _tiny().eval()
    program = torch.export.export(model, (X,))
    with torch.no_grad():
        assert torch.allclose(program.module()(X), model(X), atol=1e-5)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_torch_compile_fullgraph(mode):
    model = getattr(_tiny(), mode)()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=False)
    start = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        out = compiled(X)
        model.load_state_dict(start)
        assert torch.allclose(out, model(X), atol=1e-5)
    torch._dynamo.reset()


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_torchscript_script_matches_eager(mode):
    """torch.jit.script compiles the reference forward (the fast paths sit behind `torch.jit.is_scripting()`)."""
    model = getattr(_tiny(), mode)()
    scripted = torch.jit.script(model)
    start = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        out = scripted(X)
        model.load_state_dict(start)
        assert torch.allclose(out, model(X), atol=1e-5)


def test_fx_graph_scripts():
    """What timm's tests do with a traced model: script the FX graph (its tracer keeps blocks whole)."""
    from timm.models import get_notrace_functions, get_notrace_modules
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    model = _tiny().eval()
    tracer_kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    graph = create_feature_extractor(model, train_return_nodes=train_nodes[-1:], eval_return_nodes=eval_nodes[-1:],
                                     tracer_kwargs=tracer_kwargs)
    with torch.no_grad():
        expected = model(X)
        assert torch.equal(next(iter(graph(X).values())), expected)  # blocks run as the module runs them
        # scripted, the blocks are compiled too, on their reference forward
        assert torch.allclose(next(iter(torch.jit.script(graph)(X).values())), expected, atol=1e-5)


def test_torchscript_trace_matches_eager():
    model = _tiny().eval()
    with torch.no_grad():
        traced = torch.jit.trace(model, X)
        assert torch.allclose(traced(X), model(X), atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Norm layers as modules
# ---------------------------------------------------------------------------------------------------------------
def _projection_norms(model: nn.Module) -> list[tuple[nn.Module, str]]:
    return [(m, "bn") for m in model.modules() if type(m).__name__ == "ConvProjection"]


def _training_step(model: nn.Module) -> torch.Tensor:
    model.train().zero_grad()
    loss = F.cross_entropy(model(X), torch.tensor([1, 2]))
    loss.backward()
    return loss.detach()


def test_frozen_batchnorm_from_torchvision_trains_with_fixed_statistics():
    """torchvision's detection models freeze a backbone's BatchNorms this way: the projections then normalise with
    the frozen statistics in training mode too, and nothing about them changes."""
    from torchvision.ops import FrozenBatchNorm2d

    model, reference = _tiny(), _tiny()
    for owner, attr in _projection_norms(model):
        bn = getattr(owner, attr)
        frozen = FrozenBatchNorm2d(bn.num_features, eps=bn.eps)
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(frozen, name).copy_(getattr(bn, name).detach())
        setattr(owner, attr, frozen)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss = _training_step(model)
    assert torch.isfinite(loss)
    for key, value in model.state_dict().items():
        if "conv_proj" in key and ".bn." in key:
            assert torch.equal(value, before[key]), key  # buffers, not parameters: not trained
    # the frozen model's training forward is the reference model's eval-mode projections inside a training forward
    reference.train()
    for owner, _ in _projection_norms(reference):
        owner.bn.eval()
    assert torch.allclose(model.train()(X), reference(X), atol=1e-5)


def test_timm_freeze_batch_norm_2d():
    from timm.layers import freeze_batch_norm_2d

    model = freeze_batch_norm_2d(_tiny())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert torch.isfinite(_training_step(model))


def test_sync_batchnorm_conversion_is_what_the_projections_call():
    model = _tiny()
    count = sum(isinstance(m, BatchNorm2d) for m in model.modules())
    reference = copy.deepcopy(model)
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in converted.modules()) == count
    called = []
    for m in converted.modules():
        if isinstance(m, nn.SyncBatchNorm):
            m.register_forward_hook(lambda *_: called.append(1))
    # one process, no process group: SyncBatchNorm normalises as BatchNorm does, and updates the same statistics
    assert torch.allclose(converted.train()(X), reference.train()(X), atol=1e-5)
    assert len(called) == count
    for (key, a), b in zip(converted.state_dict().items(), reference.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), key


def test_identity_norm():
    model = _tiny()
    for owner, attr in _projection_norms(model):
        setattr(owner, attr, nn.Identity())
    expected = []
    for owner, _ in _projection_norms(model):
        owner.register_forward_hook(
            lambda m, i, o: expected.append(torch.allclose(o, m.conv(i[0]).flatten(2).transpose(1, 2))))
    for mode in ("eval", "train"):
        getattr(model, mode)()
        with torch.no_grad():
            assert torch.isfinite(model(X)).all()
    assert expected and all(expected)


def test_checkpointing_updates_statistics_once_with_the_builtin_norm():
    model = _tiny()
    plain = copy.deepcopy(model)
    model.set_grad_checkpointing(True)
    _training_step(model), _training_step(plain)
    for (key, a), b in zip(model.state_dict().items(), plain.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), key


# ---------------------------------------------------------------------------------------------------------------
# PEFT
# ---------------------------------------------------------------------------------------------------------------
def test_lora_trains_merges_and_equals_the_merged_model():
    peft = pytest.importorskip("peft")

    model = _tiny()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["proj_q", "proj_k", "proj_v", "fc1", "fc2"],
                             modules_to_save=["head"])
    lora = peft.get_peft_model(model, config)
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "head" in n for n in trainable)
    optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):  # moves lora_B off zero, so the merge has something to merge
        optimizer.zero_grad()
        F.cross_entropy(lora.train()(X), torch.tensor([1, 2])).backward()
        optimizer.step()
    lora.eval()
    with torch.no_grad():
        adapted = lora(X)
        merged = lora.merge_and_unload()
        assert not any("lora_" in n for n, _ in merged.named_parameters())
        assert torch.allclose(merged(X), adapted, atol=1e-4)
        assert (merged(X) - _tiny().eval()(X)).abs().max() > 1e-3  # the adaptation is in the merged weights


# ---------------------------------------------------------------------------------------------------------------
# segmentation_models_pytorch's timm encoders
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("decoder, kwargs", [
    ("Unet", {"decoder_channels": (128, 64, 32, 16)}), ("UPerNet", {}), ("Segformer", {}),
])
def test_smp_decoders_take_a_cvt_encoder(decoder, kwargs):
    """smp's `tu-` encoders read timm's FeatureInfo: strides 4/8/16 are a "transformer-style" encoder with a
    0-channel level at stride 2, so encoder_depth is 4 (REFERENCE.md); masks come back at the input's size.
    (FPN with upsampling=2, DeepLabV3 and DeepLabV3Plus with encoder_output_stride=16 fail inside smp 0.6 on that
    0-channel level at encoder_depth=4; UnetPlusPlus refuses such encoders.)"""
    smp = pytest.importorskip("segmentation_models_pytorch")

    torch.manual_seed(0)
    net = getattr(smp, decoder)(encoder_name="tu-cvt_13", encoder_depth=4, encoder_weights=None, classes=3,
                                depths=(1, 1, 1), embed_dims=(32, 64, 96), num_heads=(1, 2, 3), **kwargs)
    x = torch.randn(2, 3, 64, 96)
    out = net.train()(x)
    assert out.shape == (2, 3, 64, 96)
    out.square().mean().backward()
    assert all(p.grad is not None for p in net.encoder.parameters() if p.requires_grad)
