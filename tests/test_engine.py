"""The training engine's pieces on their own: which parameters are decayed, the learning-rate schedule, and
evaluation with test-time augmentation, and the loop with a task other than classification."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator

import pytest
import torch

import cvt
from cvt.data import BatchTransform, Preprocess
from cvt.engine import WarmupCosine, build_optimizer, evaluate, log_probs
from cvt.tasks import Evaluation, Task


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


# ---------------------------------------------------------------------------------------------------------------
# The loop with a task that is not classification
# ---------------------------------------------------------------------------------------------------------------
class _Locator(torch.nn.Module):
    """A detector's shape of interface on a tiny CvT: a list of images and target dicts in, a dict of losses out
    (training), a (N, 2) point per image in eval mode."""

    def __init__(self):
        super().__init__()
        self.backbone = cvt.create_model("cvt_tiny", in_chans=1, num_classes=2, depths=(1, 1, 1),
                                         embed_dims=(16, 32, 64), num_heads=(1, 1, 2))

    def forward(self, images, targets=None):
        points = self.backbone(torch.stack(images))  # (N, 2)
        if targets is None:
            return points
        truth = torch.stack([t["point"] for t in targets])
        return {"loss_l2": torch.nn.functional.mse_loss(points, truth),
                "loss_l1": torch.nn.functional.l1_loss(points, truth)}


class _Points(Task):
    """Batches of (list of images, list of {"point": (2,)} dicts, errors); the loss is the sum of the model's loss
    dict; the score is an error, lower is better, scripted by the test (`scores`)."""

    name, score, higher_is_better, metrics = "points", "val_err", False, ("val_err",)
    scores: Iterator[float]
    evaluated: list[dict[str, torch.Tensor]]  # the weights of each evaluation

    def build(self, *, state, device, dist, micro_batch):
        g = torch.Generator().manual_seed(0)
        self.batches = [([torch.rand(1, 16, 16, generator=g) for _ in range(micro_batch)],
                         [{"point": torch.rand(2, generator=g)} for _ in range(micro_batch)], []) for _ in range(3)]
        self.train, self.val = self.batches, self.batches[:1]
        model = _Locator()
        if state is not None:
            model.load_state_dict(state["model"])
        return model.to(device)

    def set_epoch(self, epoch, start):
        self.train = self.batches[start:]

    def prepare(self, batch, device):
        images, targets, _ = batch
        return (images, targets), len(images)

    def loss(self, net, inputs):
        return sum(net(*inputs).values())

    def evaluate(self, model, *, device, dtype, dist):
        self.evaluated.append({k: v.clone() for k, v in model.state_dict().items()})
        return Evaluation(metrics={"val_err": next(self.scores)}, count=len(self.val[0][0]))

    def save_weights(self, model, folder):
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))

    def files(self):
        return {"points.json": "{}"}


def test_the_loop_trains_a_task_with_list_batches_a_loss_dict_and_a_lower_is_better_score(tmp_path, monkeypatch,
                                                                                          one_thread):
    """Nothing in the loop assumes (x, y) tensors, classes or top-1: a detection-shaped task trains, records its
    own columns, keeps the weights of its lowest error in best/, and a resumed run keeps its task."""
    from safetensors.torch import load_file

    from cvt import engine, tasks
    from cvt.recipe import TrainConfig

    monkeypatch.setitem(tasks._TASKS, "points", _Points)
    monkeypatch.setattr(_Points, "scores", iter([3.0, 1.0, 1.0, 2.0, 0.5]), raising=False)
    monkeypatch.setattr(_Points, "evaluated", [], raising=False)
    out = tmp_path / "run"
    cfg = TrainConfig(task="points", batch_size=2, epochs=4, lr=1e-3, ema_decay=0.5, device="cpu", out=str(out),
                      grad_checkpointing=True)
    summary = engine.fit(cfg)
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [list(r) for r in rows] == [["epoch", "train_loss", "val_err", "lr", "images_per_s", "seconds"]] * 4
    assert [r["val_err"] for r in rows] == [3.0, 1.0, 1.0, 2.0] and all(math.isfinite(r["train_loss"]) for r in rows)
    assert rows[0]["images_per_s"] > 0
    assert (summary["task"], summary["best_err"], summary["best_epoch"]) == ("points", 1.0, 2)  # the first of equals
    assert summary["best_weights"] == str(out / "best") and summary["final_err"] == 2.0 and summary["val_images"] == 2
    assert json.load(open(out / "best" / "best.json")) == {"epoch": 2, "val_err": 1.0}
    assert (out / "best" / "points.json").exists() and (out / "points.json").exists()
    best = load_file(out / "best" / "model.safetensors")
    assert all(torch.equal(best[k], _Points.evaluated[1][k]) for k in best)  # epoch 2's (EMA) weights
    state = engine.load_state(out)[0]
    assert state["task"] == "points" and state["config"]["task"] == "points" and state["epoch"] == 4

    summary = engine.fit(cfg.replace(epochs=5), resume=out)
    assert (summary["best_err"], summary["best_epoch"]) == (0.5, 5)
    kept = "a resumed run keeps its task; task 'classification' differs from the run's 'points'"
    with pytest.raises(ValueError, match=kept):
        engine.fit(cfg.replace(task="classification", epochs=6), resume=out)


def test_task_registry_and_defaults_from_the_data():
    from cvt.recipe import TrainConfig, default_task
    from cvt.tasks import get_task, task_names

    assert "classification" in task_names() and get_task("classification").score == "val_top1"
    assert get_task("classification").higher_is_better
    assert TrainConfig().task == "classification" and TrainConfig(data="imagefolder:/x").task == "classification"
    assert (default_task("coco:/data/coco"), default_task("seg:/data/ade")) == ("detection", "segmentation")
    assert {"detection", "segmentation"} <= set(task_names())
    assert (get_task("detection").score, get_task("segmentation").score) == ("val_box_map", "val_miou")
    with pytest.raises(ValueError, match="unknown task 'detectoin'; known tasks: classification, detection"):
        get_task("detectoin")
