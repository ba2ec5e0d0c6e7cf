"""Semantic segmentation: the mIoU against hand computations and torchmetrics, the builders' logits for CvT and ResNet
backbones under both smp decoders, saved segmenters, and the task end to end (train, exact resume, eval, predict)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import cvt
from cvt import engine
from cvt.recipe import TrainConfig
from cvt.segmentation import default_encoder_depth, load_segmenter, save_segmenter, segmenter
from cvt.tasks.segmentation import Segmentation, SegResult, confusion_update

pytestmark = pytest.mark.usefixtures("one_thread")


def _tu_cvt_works() -> bool:
    """timm's features_only wrapper over a cvt_* model (smp's tu- encoder builds one)."""
    import timm

    try:
        timm.create_model("cvt_tiny", features_only=True)
    except Exception:  # noqa: BLE001 - any failure means the timm-native backbone has not landed
        return False
    return True


# Transitional: the timm-native CvT (FeatureInfo through timm's features_only) is being finished in cvt.model.
needs_tu_cvt = pytest.mark.skipif(not _tu_cvt_works(), reason="timm.create_model('cvt_*', features_only=True) fails")
CVT = pytest.param("cvt_tiny", marks=needs_tu_cvt)

TINY_CVT = dict(depths=(1, 1, 1), embed_dims=(16, 32, 64), num_heads=(1, 1, 2))
CLASSES = ["background", "red", "green"]


def _result(pairs: list[tuple[list[list[int]], list[list[int]]]], k: int) -> SegResult:
    confusion = torch.zeros(k * k, dtype=torch.long)
    for pred, target in pairs:
        confusion_update(confusion, torch.tensor(pred), torch.tensor(target))
    return SegResult(confusion=confusion.view(k, k), loss=0.0, count=len(pairs))


# ---------------------------------------------------------------------------------------------------------------
# mIoU
# ---------------------------------------------------------------------------------------------------------------
def test_miou_by_hand_with_ignored_pixels():
    # target row-major 2x4; 255 pixels are not scored whatever is predicted there
    target = [[0, 0, 1, 1], [2, 255, 255, 1]]
    pred = [[0, 1, 1, 1], [2, 2, 0, 0]]
    r = _result([(pred, target)], 3)
    # class 0: TP 1 (0,0); FP 0 (the 0 at (1,3) is on a 1; (1,2) is ignored) -> FP 1; FN 1 ((0,1) predicted 1)
    #          IoU = 1 / (1 + 1 + 1) = 1/3
    # class 1: TP 2 ((0,2), (0,3)); FP 1 ((0,1)); FN 1 ((1,3) predicted 0): IoU 2/4
    # class 2: TP 1 ((1,0)); FP 0 ((1,1) is ignored); FN 0: IoU 1
    assert r.iou == pytest.approx([100 / 3, 50.0, 100.0])
    assert r.miou == pytest.approx((100 / 3 + 50 + 100) / 3)
    assert r.pixel_acc == pytest.approx(4 / 6 * 100)  # 6 scored pixels, 4 right


def test_miou_is_the_dataset_level_mean_not_the_per_image_mean():
    from torchmetrics.classification import MulticlassJaccardIndex

    # image A: 1 pixel of class 1, predicted right, and 3 of class 0, right. image B: 4 of class 1, all predicted 0.
    a = ([[0, 0], [0, 1]], [[0, 0], [0, 1]])
    b = ([[0, 0], [0, 0]], [[1, 1], [1, 1]])
    r = _result([a, b], 2)
    # dataset: class 0 TP 3, FP 4 -> 3/7; class 1 TP 1, FN 4 -> 1/5. Per image: A (1 + 1)/2 = 1, B (0 + 0)/2 = 0
    assert r.iou == pytest.approx([300 / 7, 20.0])
    assert r.miou == pytest.approx((300 / 7 + 20) / 2)
    per_image = np.mean([_result([p], 2).miou for p in (a, b)])
    assert abs(per_image - r.miou) > 10

    metric = MulticlassJaccardIndex(num_classes=2, ignore_index=255, average="macro")
    for pred, target in (a, b):
        metric.update(torch.tensor(pred)[None], torch.tensor(target)[None])
    assert metric.compute().item() * 100 == pytest.approx(r.miou)


def test_miou_matches_torchmetrics_with_ignore_and_an_absent_class():
    from torchmetrics.classification import MulticlassJaccardIndex

    g = torch.Generator().manual_seed(0)
    k = 5
    metric = MulticlassJaccardIndex(num_classes=k, ignore_index=255, average="macro")
    per_class = MulticlassJaccardIndex(num_classes=k, ignore_index=255, average="none")
    confusion = torch.zeros(k * k, dtype=torch.long)
    for _ in range(3):
        target = torch.randint(0, k - 1, (2, 9, 7), generator=g)  # class 4 never in the masks ...
        pred = torch.randint(0, k - 1, (2, 9, 7), generator=g)  # ... nor predicted: it is left out of the mean
        target[torch.rand(target.shape, generator=g) < 0.2] = 255
        metric.update(pred, target)
        per_class.update(pred, target)
        confusion_update(confusion, pred, target)
    r = SegResult(confusion=confusion.view(k, k), loss=0.0, count=6)
    assert r.iou[-1] is None
    assert r.miou == pytest.approx(metric.compute().item() * 100, abs=1e-4)
    assert r.iou[:-1] == pytest.approx((per_class.compute()[:-1] * 100).tolist(), abs=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("decoder", ["upernet", "fpn"])
@pytest.mark.parametrize("backbone, args", [
    pytest.param("cvt_tiny", TINY_CVT, marks=needs_tu_cvt), pytest.param("cvt_13", dict(depths=(1, 1, 1)),
                                                                          marks=needs_tu_cvt), ("timm:resnet18", {})])
def test_logits_at_the_input_size(backbone, args, decoder):
    if backbone == "cvt_13" and decoder == "fpn":
        with pytest.raises(ValueError, match="use decoder 'upernet'"):
            segmenter(backbone, num_classes=4, decoder=decoder, **args)
        return
    model = segmenter(backbone, num_classes=4, decoder=decoder, **args).eval()
    for h, w in ((64, 64), (45, 37)):  # a multiple of every stride, and neither
        with torch.no_grad():
            out = model(torch.randn(2, 3, h, w))
        assert out.shape == (2, 4, h, w)
        assert torch.isfinite(out).all()


@needs_tu_cvt
def test_encoder_depths_follow_the_backbones_reductions():
    import segmentation_models_pytorch as smp

    assert default_encoder_depth("cvt_13") == 4  # 4/8/16 and smp's stride-2 dummy
    assert default_encoder_depth("cvt_tiny") == 3  # 2/4/8
    assert default_encoder_depth("timm:resnet18") == 5
    # smp's own tu- encoder over timm's cvt_* models (timm FeatureInfo), as a user would write it
    model = smp.UPerNet(encoder_name="tu-cvt_13", encoder_depth=4, encoder_weights=None, classes=11, depths=(1, 1, 1))
    assert model.encoder.out_channels == [3, 0, 64, 192, 384]
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 11, 64, 64)


@needs_tu_cvt
def test_every_parameter_learns_and_no_weight_decay_names_the_cls_token():
    model = segmenter("cvt_13", num_classes=3, decoder="upernet", depths=(1, 1, 1))
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    dead = [n for n, p in model.named_parameters() if p.numel() and (p.grad is None or not p.grad.any())]
    assert dead == []
    skip = model.no_weight_decay()
    assert skip and all(dict(model.named_parameters())[n].ndim == 3 for n in skip)  # the cls token


@needs_tu_cvt
def test_backbone_weights_from_a_classifier_checkpoint(tmp_path):
    # a grey 10-class classifier, as `cvt train` on Fashion-MNIST saves it
    clf = cvt.create_model("cvt_tiny", num_classes=10, in_chans=1, **TINY_CVT)
    cvt.save_weights(clf.state_dict(), clf.cfg, tmp_path / "model.safetensors")
    with pytest.warns(UserWarning, match="input channels"):
        model = segmenter("cvt_tiny", num_classes=3, backbone_weights=tmp_path / "model.safetensors")
    assert model.cfg.backbone_args["depths"] == [1, 1, 1]  # the checkpoint's own architecture, recorded
    got = model.backbone.state_dict()
    want = clf.state_dict()
    deep = "stages.2.blocks.0.attn.conv_proj_q.conv.weight"
    assert torch.equal(got[deep], want[deep])
    # the grey kernel tiled over RGB and scaled by 1/3: a grey image seen in colour gives the same first map
    first = "stages.0.patch_embed.proj.weight"
    assert torch.allclose(got[first].sum(1, keepdim=True), want[first], atol=1e-6)


@needs_tu_cvt
def test_saved_segmenter_loads_without_the_recipe(tmp_path):
    model = segmenter("cvt_tiny", num_classes=3, decoder="fpn", class_names=CLASSES, **TINY_CVT).eval()
    save_segmenter(model, tmp_path, {"img_size": 32})
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["task"], config["decoder"], config["backbone"], config["num_classes"], config["class_names"],
            config["img_size"]) == ("segmentation", "fpn", "cvt_tiny", 3, CLASSES, 32)
    loaded, _ = load_segmenter(tmp_path)
    x = torch.randn(1, 3, 40, 24)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    with pytest.raises(ValueError, match="no config.json"):
        load_segmenter(tmp_path / "nothing")


# ---------------------------------------------------------------------------------------------------------------
# The task end to end
# ---------------------------------------------------------------------------------------------------------------
def write_seg_folder(root: Path, counts=None, seed: int = 0) -> Path:
    """root/{train,val}/images/*.png and masks/*.png: a red and a green square on noise (classes 1, 2), a ring of
    255 around each square, canvases of two sizes; root/classes.txt."""
    rng = np.random.default_rng(seed)
    for split, n in (counts or {"train": 4, "val": 2}).items():
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir(parents=True)
        for i in range(n):
            h, w = (32, 32) if i % 2 == 0 else (40, 32)
            img = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
            mask = np.zeros((h, w), dtype=np.uint8)
            for cls, channel in ((1, 0), (2, 1)):
                y, x = rng.integers(1, h - 12), rng.integers(1, w - 12)
                mask[y - 1 : y + 11, x - 1 : x + 11] = 255
                mask[y : y + 10, x : x + 10] = cls
                img[y : y + 10, x : x + 10, channel] = 230
            Image.fromarray(img).save(root / split / "images" / f"{i}.png")
            Image.fromarray(mask).save(root / split / "masks" / f"{i}.png")
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    return root


@pytest.fixture(scope="module")
def seg(tmp_path_factory):
    return write_seg_folder(tmp_path_factory.mktemp("seg"))


def _cfg(seg: Path, out: Path, **kw) -> TrainConfig:
    args = dict(data=f"seg:{seg}", model="cvt_tiny", model_args=dict(TINY_CVT), head="upernet", img_size=32,
                batch_size=2, epochs=2, lr=1e-3, warmup_epochs=0, num_workers=0, device="cpu", out=str(out))
    return TrainConfig(**{**args, **kw})


@pytest.mark.parametrize("backbone", [CVT, "timm:resnet18"])
def test_train_eval_predict(seg, tmp_path, backbone):
    run = tmp_path / "run"
    args = dict(model_args={}) if backbone.startswith("timm:") else {}
    summary = engine.fit(_cfg(seg, run, epochs=1, head="fpn", model=backbone, **args))
    assert summary["task"] == "segmentation"
    assert 0 <= summary["final_miou"] <= 100 and 0 <= summary["final_pixel_acc"] <= 100
    assert set(summary["per_class_iou"]) == set(CLASSES)
    assert summary["val_images"] == 2
    for name in ("model.safetensors", "config.json", "metrics.jsonl", "per_class_iou.png", "curves.png",
                 "best/model.safetensors", "best/config.json"):
        assert (run / name).is_file(), name
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["val_miou"] == summary["final_miou"]

    cpu = torch.device("cpu")
    model, settings = Segmentation.load_for_inference(run, cpu)
    report = Segmentation.evaluate_files(model, settings, data=f"seg:{seg}", device=cpu, dtype=None, batch_size=1,
                                         num_workers=0, out=tmp_path)
    assert report["miou"] == pytest.approx(summary["final_miou"], abs=1e-3)  # the same weights, the same images
    assert (tmp_path / "per_class_iou.png").is_file() and report["figures"]
    assert dict(report["table"])["mIoU (%)"] == report["miou"] and "IoU green (%)" in dict(report["table"])
    json.dumps(report)  # what cvt eval writes

    image = str(seg / "val" / "images" / "1.png")
    pred, bad = Segmentation.predict_files(model, settings, [image, str(tmp_path / "none.png")], device=cpu,
                                           save_dir=tmp_path / "pred")
    assert "error" in bad
    assert (pred["height"], pred["width"]) == (40, 32)
    assert sum(pred["class_fractions"].values()) == pytest.approx(1.0, abs=1e-4)
    mask = np.asarray(Image.open(tmp_path / "pred" / "1_mask.png"))
    assert mask.shape == (40, 32) and mask.max() < 3
    assert Image.open(tmp_path / "pred" / "1_overlay.png").size == (32, 40)
    assert Segmentation.format_prediction(pred).startswith(image)


@needs_tu_cvt
def test_resume_after_interruption_equals_uninterrupted(seg, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    engine.fit(_cfg(seg, straight))

    # SIGINT in the middle of epoch 2 (step 1 of 2): the run checkpoints that step and stops
    calls = {"n": 0}
    loss = Segmentation.loss

    def interrupting(self, net, inputs):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return loss(self, net, inputs)

    monkeypatch.setattr(Segmentation, "loss", interrupting)
    run = tmp_path / "run"
    with pytest.raises(engine.Interrupted):
        engine.fit(_cfg(seg, run))
    state, _ = engine.load_state(run)
    assert (state["epoch"], state["step"]) == (1, 1)
    monkeypatch.setattr(Segmentation, "loss", loss)
    engine.fit(_cfg(seg, run), resume=run)

    a, b = load_file(straight / "model.safetensors"), load_file(run / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [[json.loads(x) for x in open(r / "metrics.jsonl")] for r in (straight, run)]
    assert [r["train_loss"] for r in rows[0]] == [r["train_loss"] for r in rows[1]]
    assert [r["val_miou"] for r in rows[0]] == [r["val_miou"] for r in rows[1]]


@pytest.mark.slow
@needs_tu_cvt
def test_cli_train_sigkill_resume_eval_predict(seg, tmp_path):
    """`cvt train --data seg:` SIGKILLed after its first epoch's checkpoint, resumed: the uninterrupted run's weights;
    then `cvt eval` and `cvt predict` on it."""
    import subprocess
    import sys

    from cvt.cli import main

    argv = ["train", "--data", f"seg:{seg}", "--model", "cvt_tiny", "--set", "model_args.depths=[1,1,1]",
            "--set", "model_args.embed_dims=[16,32,64]", "--set", "model_args.num_heads=[1,1,2]", "--set",
            "head=upernet", "--img-size", "32", "--batch-size", "2", "--epochs", "3", "--num-workers", "0"]
    assert main([*argv, "--out", str(tmp_path / "straight")]) == 0

    run = tmp_path / "killed"
    src = str(Path(cvt.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "cvt.cli", *argv, "--out", str(run)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:
            if line.startswith("epoch 2/3 step 1/2"):
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait(timeout=120)
    finally:
        proc.kill()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it was killed: the test proved nothing"
    assert main(["train", "--out", str(run), "--resume"]) == 0
    a, b = load_file(tmp_path / "straight" / "model.safetensors"), load_file(run / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)

    assert main(["eval", "--checkpoint", str(run), "--data", f"seg:{seg}"]) == 0
    assert json.loads((run / "eval" / "eval.json").read_text())["task"] == "segmentation"
    assert main(["predict", "--checkpoint", str(run), str(seg / "val" / "images" / "0.png"), "--save",
                 str(tmp_path / "pred")]) == 0
    assert (tmp_path / "pred" / "0_mask.png").is_file()

