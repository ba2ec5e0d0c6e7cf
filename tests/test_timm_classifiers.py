"""timm classifiers through the classification loop (`cvt train --model timm:<name>`): a run's folder, `cvt eval` and
`cvt predict` on it, exact resume, fine-tuning from a run, a ViT at 28 px; and the baselines of
`cvt.models.baselines` (CIFAR-stem ResNets, 28 px ViTs) with their parameter counts."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import cvt
import cvt.data
from conftest import sigterm_at
from cvt.cli import main
from cvt.tasks.classification import load_timm_classifier, timm_model_args

pytestmark = pytest.mark.usefixtures("one_thread")

# resnet_cifar_small cut down to a few thousand parameters: a step takes milliseconds.
RESNET = ["--model", "timm:resnet_cifar_small", "--set", "model_args.channels=[4,8,8,8]",
          "--set", "model_args.layers=[1,1,1,1]", "--num-workers", "0"]
RESNET_ARGS = {"channels": [4, 8, 8, 8], "layers": [1, 1, 1, 1]}


def _train(tmp, fake_fmnist, *extra: str, out: str = "run", model=RESNET) -> tuple[int, str]:
    run = str(tmp / out)
    return main(["train", *model, "--data-dir", str(fake_fmnist), "--batch-size", "16", "--out", run, *extra]), run


@pytest.fixture(scope="module")
def trained(tmp_path_factory, fake_fmnist):
    rc, run = _train(tmp_path_factory.mktemp("timm"), fake_fmnist, "--epochs", "1", "--lr", "3e-3",
                     "--ema-decay", "0.9")
    assert rc == 0
    return run


# ---------------------------------------------------------------------------------------------------------------
def test_run_folder_of_a_timm_classifier(trained):
    summary = json.load(open(f"{trained}/summary.json"))
    assert summary["model"] == "timm:resnet_cifar_small" and summary["classes"] == 10
    assert summary["val_images"] == 20 and summary["img_size"] == 28
    rows = [json.loads(line) for line in open(f"{trained}/metrics.jsonl")]
    assert rows[-1]["val_top1"] is not None and summary["final_top1"] == rows[-1]["val_top1"]
    config = json.load(open(f"{trained}/config.json"))
    assert config == {
        "format": "cvt-timm-classifier", "task": "classification", "timm_model": "resnet_cifar_small",
        "model_args": RESNET_ARGS, "num_classes": 10, "in_chans": 1,  # (a ResNet takes no img_size)
        "class_names": cvt.data.FASHION_MNIST_CLASSES, "weights": "model.safetensors",
    }
    assert sorted(os.listdir(f"{trained}/best")) == ["best.json", "config.json", "model.safetensors",
                                                     "preprocess.json"]
    model = load_timm_classifier(trained)
    assert isinstance(model, timm.models.ResNet) and not model.training
    assert summary["params"] == cvt.param_count(model) and model.class_names == cvt.data.FASHION_MNIST_CLASSES
    state = torch.load(f"{trained}/checkpoint.pt", weights_only=True)
    recorded = ("timm_model", "model_args", "num_classes", "in_chans")
    assert "model_config" not in state and state["timm_config"] == {k: config[k] for k in recorded}
    # the saved weights are the evaluated ones: the EMA
    saved = model.state_dict()
    assert all(torch.equal(saved[k], v) for k, v in state["ema"].items())
    assert load_timm_classifier(f"{trained}/checkpoint.pt") is None  # not its weights file


def test_eval_and_predict_a_timm_run(trained, fake_fmnist, tmp_path, capsys):
    summary = json.load(open(f"{trained}/summary.json"))
    for checkpoint in (trained, f"{trained}/model.safetensors"):
        assert main(["eval", "--checkpoint", checkpoint, "--data-dir", str(fake_fmnist), "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["images"] == 20 and report["classes"] == cvt.data.FASHION_MNIST_CLASSES
        assert report["top1"] == pytest.approx(summary["final_top1"], abs=1e-6)  # the same weights, the same data

    images, _ = cvt.data.load_fashion_mnist("test", fake_fmnist)
    image = tmp_path / "item.png"
    Image.fromarray(images[3, 0].numpy()).save(image)
    assert main(["predict", "--checkpoint", trained, str(image), "--top-k", "3", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)[0]["predictions"]
    model = load_timm_classifier(trained)
    pre = cvt.data.preprocess_for(trained, 1, None, 224)
    pixels = cvt.data.file_transform(pre, train=False)(cvt.data.open_image(str(image), 1))
    x = cvt.data.BatchTransform(pre)(pixels[None])
    with torch.no_grad():
        probs = model(x).softmax(-1)[0]
    top = probs.topk(3)
    assert [p["index"] for p in got] == top.indices.tolist()
    assert [p["class"] for p in got] == [cvt.data.FASHION_MNIST_CLASSES[i] for i in top.indices.tolist()]
    assert [p["probability"] for p in got] == pytest.approx(top.values.tolist(), abs=2e-6)


def test_resume_of_a_timm_classifier_matches_uninterrupted(tmp_path, fake_fmnist):
    """SIGTERM mid-epoch, then --resume: the same weights (and EMA) as a run never stopped."""
    extra = ["--epochs", "2", "--ema-decay", "0.9", "--set", "mixup=0.8", "--set", "cutmix=1.0",
             "--set", "shift=2", "--set", "reprob=0.25"]
    rc, straight = _train(tmp_path, fake_fmnist, *extra, out="straight")
    assert rc == 0

    with sigterm_at(epoch=1, step=2):
        rc, resumed = _train(tmp_path, fake_fmnist, *extra, out="resumed")
    assert rc == 128 + signal.SIGTERM
    assert torch.load(f"{resumed}/checkpoint.pt", weights_only=True)["step"] == 2
    assert main(["train", "--out", resumed, "--resume"]) == 0

    a = torch.load(f"{straight}/checkpoint.pt", weights_only=True)
    b = torch.load(f"{resumed}/checkpoint.pt", weights_only=True)
    assert a["timm_config"] == b["timm_config"]
    for key in ("model", "ema"):
        diff = max((a[key][k].double() - b[key][k].double()).abs().max().item() for k in a[key])
        assert diff <= 1e-6, (key, diff)
    ma = [json.loads(x)["val_top1"] for x in open(f"{straight}/metrics.jsonl")]
    assert ma == [json.loads(x)["val_top1"] for x in open(f"{resumed}/metrics.jsonl")] and len(ma) == 2


def test_finetune_from_a_timm_run(tmp_path, trained, fake_fmnist):
    """--pretrained RUN with the same timm model: its weights, loaded by timm (at lr ~0 they stay)."""
    rc, run = _train(tmp_path, fake_fmnist, "--pretrained", trained, "--epochs", "1", "--lr", "1e-9",
                     "--warmup-epochs", "0", "--set", "min_lr=0", "--set", "weight_decay=0")
    assert rc == 0
    before, after = load_timm_classifier(trained).state_dict(), load_timm_classifier(run).state_dict()
    for k in ("conv1.weight", "layer4.0.conv2.weight", "fc.weight"):
        assert torch.allclose(after[k], before[k], atol=1e-6), k


def test_vit_at_28_px_trains_a_step(tmp_path, fake_fmnist):
    """A ViT takes the training side as img_size (its position embedding fixes it); grad checkpointing is timm's."""
    vit = ["--model", "timm:vit_fmnist_small", "--set", "model_args.embed_dim=32", "--set", "model_args.depth=1",
           "--set", "model_args.num_heads=2", "--num-workers", "0"]
    rc, run = _train(tmp_path, fake_fmnist, "--epochs", "1", "--set", "steps_per_epoch=1", "--grad-checkpointing",
                     model=vit)
    assert rc == 0
    config = json.load(open(f"{run}/config.json"))
    assert config["model_args"] == {"embed_dim": 32, "depth": 1, "num_heads": 2, "img_size": 28}
    model = load_timm_classifier(run)
    assert isinstance(model, timm.models.VisionTransformer) and model.pos_embed.shape == (1, 50, 32)

    from cvt.engine import build_optimizer

    groups = build_optimizer(model, 1e-3, 0.05).param_groups
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert {id(model.pos_embed), id(model.cls_token), id(model.norm.weight), id(model.head.bias)} <= no_decay
    assert id(model.blocks[0].attn.qkv.weight) not in no_decay


def test_img_size_goes_only_to_models_with_a_fixed_input_size():
    assert timm_model_args("vit_fmnist_small", {}, 28) == {"img_size": 28}
    assert timm_model_args("vit_fmnist_small", {"img_size": 32}, 28) == {"img_size": 32}
    assert timm_model_args("resnet_cifar_small", {"layers": [1, 1, 1, 1]}, 28) == {"layers": [1, 1, 1, 1]}
    assert timm_model_args("resnet18", {}, 28) == {}


def test_timm_model_errors_are_one_line(tmp_path, fake_fmnist, capsys):
    rc, _ = _train(tmp_path, fake_fmnist, model=["--model", "timm:resnet_cifar_smal"], out="a")
    err = capsys.readouterr().err
    assert rc == 2 and "timm has no model 'resnet_cifar_smal'; did you mean timm:resnet_cifar_small" in err
    rc, _ = _train(tmp_path, fake_fmnist, model=["--model", "timm:resnet_cifar_small", "--set", "model_args.depth=2"],
                   out="b")
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("cvt train: error:")]
    assert rc == 2 and len(errors) == 1
    assert "unexpected keyword argument 'depth'" in errors[0] and "model_args are its keyword arguments" in errors[0]


# ---------------------------------------------------------------------------------------------------------------
# The baselines
# ---------------------------------------------------------------------------------------------------------------
PARAMS = {"resnet_cifar_small": 701_178, "resnet_cifar_base": 3_538_918,
          "vit_fmnist_small": 678_730, "vit_fmnist_base": 3_574_282}


def test_baselines_are_timm_models_with_their_parameter_counts():
    assert set(timm.list_models(module="baselines")) == set(PARAMS)
    for name, count in PARAMS.items():
        model = timm.create_model(name)  # the defaults: 10 classes, 1 channel, 28 px
        assert cvt.param_count(model) == count, name
        assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert cvt.param_count(cvt.create_model("cvt_tiny")) == 722_954  # what they are compared with


def test_cifar_stem_keeps_the_full_resolution():
    model = timm.create_model("resnet_cifar_small", channels=(4, 8, 8, 8), layers=(1, 1, 1, 1))
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, torch.nn.Identity)
    assert model.forward_features(torch.zeros(1, 1, 28, 28)).shape == (1, 8, 4, 4)
    backbone = timm.create_model("resnet_cifar_small", features_only=True, channels=(4, 8, 8, 8), layers=(1, 1, 1, 1))
    assert backbone.feature_info.reduction() == [1, 1, 2, 4, 8]
    assert [m.shape[-1] for m in backbone(torch.zeros(1, 1, 28, 28))] == [28, 28, 14, 7, 4]
    with pytest.raises(ValueError, match="builds its own stem"):
        timm.create_model("resnet_cifar_small", stem_type="deep")


def test_predict_refuses_onnxruntime_for_a_timm_model(trained, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(image)
    assert main(["predict", "--checkpoint", trained, str(image), "--backend", "onnxruntime"]) == 2
    assert "runs CvT classifiers only" in capsys.readouterr().err
