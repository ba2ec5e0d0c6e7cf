"""The training engine's pieces on their own: which parameters are decayed, the learning-rate schedule, and
evaluation with test-time augmentation."""

from __future__ import annotations

import math

import pytest
import torch

import cvt
from cvt.data import BatchTransform, Preprocess
from cvt.engine import WarmupCosine, build_optimizer, evaluate, log_probs


def test_no_weight_decay_on_norms_biases_and_the_cls_token():
    model = cvt.create_model("cvt_tiny", depths=(1, 1, 1))
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    kept = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert decayed | kept == set(names.values()) and not decayed & kept
    assert "stages.2.cls_token" in kept
    for name in kept - {"stages.2.cls_token"}:
        assert name.endswith(".bias") or "norm" in name.split(".")[-2] or ".bn." in name, name
    for name in decayed:  # every weight matrix and convolution kernel
        assert name.endswith(".weight") and model.get_parameter(name).ndim >= 2, name
    assert "stages.0.blocks.0.attn.proj_q.weight" in decayed and "stages.0.patch_embed.proj.weight" in decayed


def test_warmup_then_cosine_then_cooldown():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    s = WarmupCosine(opt, lr=1e-3, total=100, warmup=10, warmup_lr=1e-6, min_lr=1e-5, cooldown=20)
    lrs = [s.get_last_lr()]
    for _ in range(100):
        s.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(1e-6)
    assert lrs[5] == pytest.approx(1e-6 + (1e-3 - 1e-6) * 0.5)  # linear warm-up
    assert lrs[10] == pytest.approx(1e-3)  # the peak, where the cosine starts
    assert lrs[45] == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * 35 / 70)))
    assert all(a >= b for a, b in zip(lrs[10:80], lrs[11:81]))  # decreasing through the cosine
    assert all(lr == pytest.approx(1e-5) for lr in lrs[80:])  # cool-down at min_lr
    # the state is the step counter: a fresh schedule loaded from it continues where this one is
    again = WarmupCosine(torch.optim.SGD([param], lr=1.0), lr=1e-3, total=100, warmup=10, min_lr=1e-5, cooldown=20)
    again.load_state_dict({"step": 45})
    assert again.get_last_lr() == pytest.approx(lrs[45])


def test_gpu_process_group_has_a_cpu_backend_beside_nccl(monkeypatch):
    """The stop flag and gathered objects are CPU tensors, which NCCL alone cannot reduce."""
    from cvt import engine

    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(engine, "pick_device", lambda pref, local_rank=0: torch.device("cuda", local_rank))
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(engine.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(engine.dist, "init_process_group", lambda backend, **kw: seen.update(backend=backend, **kw))
    info, device = engine.setup_distributed("cuda")
    assert seen == {"backend": "cpu:gloo,cuda:nccl", "rank": 1, "world_size": 2} and info.enabled


def test_hflip_tta_is_the_mean_of_the_two_views_probabilities():
    torch.manual_seed(0)
    model = cvt.create_model("cvt_tiny", depths=(1, 1, 1), in_chans=1, num_classes=4).eval()
    raw, y = torch.randint(0, 256, (6, 1, 28, 28), dtype=torch.uint8), torch.tensor([0, 1, 2, 3, 0, 1])
    to_model = BatchTransform(Preprocess(28, 1, (0.5,), (0.25,)))
    x = to_model(raw)
    with torch.no_grad():
        plain, mirrored = model(x).softmax(-1), model(x.flip(-1)).softmax(-1)
        both = log_probs(model, x, "hflip")
        assert torch.allclose(log_probs(model, x), plain.log(), atol=1e-6)
    assert not torch.allclose(plain, mirrored)  # the mirror is a different view, so the test can tell them apart
    assert torch.allclose(both.exp(), (plain + mirrored) / 2, atol=1e-6)
    # evaluate() scores the averaged probabilities: top-1, loss and confusion follow from them
    batches = [(raw[:4], y[:4], []), (raw[4:], y[4:], [])]
    result = evaluate(model, batches, to_model, torch.device("cpu"), 4, tta="hflip")
    assert result.top1 == pytest.approx((both.argmax(-1) == y).float().mean().item() * 100)
    assert result.loss == pytest.approx(-both[torch.arange(6), y].mean().item(), rel=1e-5)
    assert result.confusion.sum() == 6
    single = evaluate(model, batches, to_model, torch.device("cpu"), 4)
    assert single.loss == pytest.approx(torch.nn.functional.cross_entropy(model(x), y).item(), rel=1e-5)
    with pytest.raises(ValueError, match="tta must be one of none, hflip"):
        log_probs(model, x, "vflip")
