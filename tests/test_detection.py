"""Detection: the COCO evaluation against answers computed by hand, the P2-P6 pyramid of the builders for CvT and
timm backbones, frozen BatchNorm with pretrained weights, and the task end to end on a tiny generated COCO
dataset (train, resume, eval, predict)."""

from __future__ import annotations

import contextlib
import io
import json
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from cvt import engine
from cvt.cli import main
from cvt.detection import build_detector, fasterrcnn_cvt_fpn, maskrcnn_cvt_fpn
from cvt.tasks.detection import coco_evaluate, to_coco_results

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_CVT = dict(depths=[1, 1, 1], embed_dims=[16, 32, 64], num_heads=[1, 1, 2])  # cvt_13's strides 4/8/16
TINY_HEAD = dict(fpn_channels=16, representation_size=32, mask_channels=16, min_size=64, max_size=64)
CATEGORIES = [(3, "square"), (7, "bar")]  # sparse ids, as COCO's


def _coco(dataset: dict):
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _box_gt(boxes: list[tuple[int, list[float]]]) -> dict:
    """One 100x100 image per box (image id, bbox xywh), all of category 3."""
    return {
        "images": [{"id": i, "width": 100, "height": 100, "file_name": f"{i}.png"} for i, _ in boxes],
        "annotations": [{"id": k + 1, "image_id": i, "category_id": 3, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
                        for k, (i, b) in enumerate(boxes)],
        "categories": [{"id": c, "name": n} for c, n in CATEGORIES],
    }


# ---------------------------------------------------------------------------------------------------------------
# COCO evaluation: known answers
# ---------------------------------------------------------------------------------------------------------------
def test_coco_eval_perfect_predictions_give_one():
    gt = _coco(_box_gt([(1, [10, 10, 10, 10]), (2, [40, 20, 40, 30])]))
    # (the model's output for image 1 and 2, through to_coco_results: label 1 is category id 3)
    out = [{"boxes": torch.tensor([[10.0, 10, 20, 20]]), "labels": torch.tensor([1]), "scores": torch.tensor([0.9])},
           {"boxes": torch.tensor([[40.0, 20, 80, 50]]), "labels": torch.tensor([1]), "scores": torch.tensor([0.8])}]
    results = [r for i, o in zip((1, 2), out) for r in to_coco_results(o, i, [3, 7], masks=False)]
    assert results[0]["category_id"] == 3 and results[0]["bbox"] == [10.0, 10.0, 10.0, 10.0]
    r = coco_evaluate(gt, results, category_names=dict(CATEGORIES))
    assert r["map"] == r["map_50"] == r["map_75"] == 1.0
    assert r["map_small"] == 1.0 and r["map_medium"] == 1.0 and r["map_large"] is None  # no large object at all
    assert r["per_class"] == {"square": 1.0, "bar": None}  # "bar" has no ground truth: COCO says -1


def test_coco_eval_known_shift_gives_known_ap():
    """Two 10x10 boxes; the second prediction is shifted 2 px: IoU 80/120 = 0.667, a match at the IoU thresholds
    0.50-0.65 (4 of 10) only. There AP is 1; above, the first (higher-scored) prediction finds half the objects at
    precision 1 and the second is a false positive: COCO's 101 recall points give 51/101 (recall 0.00-0.50)."""
    gt = _coco(_box_gt([(1, [0, 0, 10, 10]), (2, [50, 50, 10, 10])]))
    results = [{"image_id": 1, "category_id": 3, "bbox": [0, 0, 10, 10], "score": 0.9},
               {"image_id": 2, "category_id": 3, "bbox": [52, 50, 10, 10], "score": 0.8}]
    r = coco_evaluate(gt, results)
    expected = (4 * 1.0 + 6 * 51 / 101) / 10
    assert r["map"] == pytest.approx(expected, abs=1e-4)
    assert r["map_50"] == 1.0 and r["map_75"] == pytest.approx(51 / 101, abs=1e-4)
    assert r["map_small"] == pytest.approx(expected, abs=1e-4) and r["map_medium"] is None


def test_coco_eval_nothing_detected_is_zero():
    gt = _coco(_box_gt([(1, [0, 0, 10, 10])]))
    assert coco_evaluate(gt, [])["map"] == 0.0


# ---------------------------------------------------------------------------------------------------------------
# Builders: P2-P6 for CvT and timm backbones, frozen BatchNorm with weights
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backbone, args", [("cvt_13", TINY_CVT), ("timm:resnet18", {})])
def test_builders_give_p2_to_p6(backbone, args):
    model = fasterrcnn_cvt_fpn(backbone, num_classes=3, backbone_args=args, **TINY_HEAD)
    maps = model.backbone(torch.rand(1, 3, 64, 128))
    assert list(maps) == ["0", "1", "2", "3", "pool"]
    assert [(64 // m.shape[-2], 128 // m.shape[-1]) for m in maps.values()] == [(s, s) for s in (4, 8, 16, 32, 64)]
    assert {m.shape[1] for m in maps.values()} == {model.backbone.out_channels} == {16}
    # from scratch: BatchNorms train and every stage learns, as torchvision's
    body = model.backbone.body
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in body.modules())
    assert all(p.requires_grad for p in body.parameters())
    model.eval()
    with torch.no_grad():
        out = model([torch.rand(3, 50, 70)])[0]
    assert set(out) == {"boxes", "labels", "scores"}


def test_unsupported_strides_are_one_clear_error():
    with pytest.raises(ValueError, match="strides 4/8/16"):
        fasterrcnn_cvt_fpn("cvt_tiny", num_classes=3, **TINY_HEAD)


def test_pretrained_cvt_backbone_gets_frozen_batchnorm(tmp_path):
    from torchvision.ops import FrozenBatchNorm2d

    import cvt
    from cvt.weights import save_weights

    classifier = cvt.create_model("cvt_13", num_classes=10, in_chans=1, **TINY_CVT)  # a Fashion-MNIST classifier
    for m in classifier.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
    path = save_weights(classifier.state_dict(), classifier.cfg, tmp_path / "model.safetensors")
    model = maskrcnn_cvt_fpn("cvt_13", num_classes=3, backbone_weights=path, backbone_args=TINY_CVT, **TINY_HEAD)
    body = model.backbone.body
    frozen = {n: m for n, m in body.named_modules() if isinstance(m, FrozenBatchNorm2d)}
    assert frozen and not any(isinstance(m, torch.nn.BatchNorm2d) for m in body.modules())
    name = next(iter(frozen))  # e.g. stages.0.blocks.0.attn.conv_proj_q.bn
    assert torch.equal(frozen[name].running_mean, classifier.get_submodule(name).running_mean)
    # stage 0 (stride 4) frozen, as torchvision freezes ResNet's stem and layer1; the later stages train
    assert not any(p.requires_grad for n, p in body.named_parameters() if n.startswith("stages.0."))
    assert all(p.requires_grad for n, p in body.named_parameters() if n.startswith(("stages.1.", "stages.2.")))
    model.train()
    losses = model([torch.rand(3, 64, 64)], [{"boxes": torch.tensor([[4.0, 4, 30, 30]]), "labels": torch.tensor([1]),
                                             "masks": torch.ones(1, 64, 64, dtype=torch.uint8)}])
    assert {"loss_mask", "loss_objectness"} <= set(losses) and all(torch.isfinite(v) for v in losses.values())


def test_pretrained_timm_backbone_freezes_like_torchvision(tmp_path):
    import timm
    from safetensors.torch import save_file
    from torchvision.ops import FrozenBatchNorm2d

    save_file(timm.create_model("resnet18").state_dict(), str(tmp_path / "resnet18.safetensors"))
    model = fasterrcnn_cvt_fpn("timm:resnet18", num_classes=3, backbone_weights=tmp_path / "resnet18.safetensors",
                               **TINY_HEAD)
    body = model.backbone.body
    assert isinstance(body.bn1, FrozenBatchNorm2d)
    trained = {n.split(".")[0] for n, p in body.named_parameters() if p.requires_grad}
    assert trained == {"layer2", "layer3", "layer4"}  # torchvision's default: 3 of 5 for a pretrained ResNet


@pytest.mark.parametrize("head", ["retinanet", "fcos"])
def test_single_stage_heads_train_on_the_same_pyramid(head):
    # (FCOS's head has GroupNorm(32): its width is a multiple of 32)
    # and at 128 px its 'pool' level is 2x2: GroupNorm over one value a group cannot train)
    model = build_detector(head, "cvt_13", num_classes=3, backbone_args=TINY_CVT, fpn_channels=32, min_size=128,
                           max_size=128, anchor_sizes=(16, 32, 64, 128, 256))
    target = {"boxes": torch.tensor([[4.0, 4, 30, 30]]), "labels": torch.tensor([2])}
    losses = model([torch.rand(3, 128, 128)], [target])
    assert all(torch.isfinite(v) for v in losses.values())


# ---------------------------------------------------------------------------------------------------------------
# The task end to end on a tiny COCO dataset
# ---------------------------------------------------------------------------------------------------------------
def write_tiny_coco(root: Path, seed: int = 0, counts=(("train", 6), ("val", 3))) -> Path:
    """root/annotations/instances_{split}.json, root/{split}/*.png: 64x48 or 48x64 images of one or two filled
    rectangles ("square" or "bar", sparse ids 3 and 7) on noise, with polygon masks."""
    rng = np.random.default_rng(seed)
    ann_id = 1
    for split, n in counts:
        (root / split).mkdir(parents=True)
        images, anns = [], []
        for i in range(n):
            w, h = (64, 48) if i % 2 else (48, 64)
            arr = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
            for k in range(1 + i % 2):
                cat, (bw, bh) = CATEGORIES[(i + k) % 2][0], ((14, 14) if (i + k) % 2 == 0 else (22, 8))
                x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
                arr[y:y + bh, x:x + bw] = 230 if cat == 3 else (40, 220, 40)
                poly = [x, y, x + bw, y, x + bw, y + bh, x, y + bh]
                anns.append({"id": ann_id, "image_id": i + 1, "category_id": cat, "bbox": [x, y, bw, bh],
                             "area": bw * bh, "iscrowd": 0, "segmentation": [poly]})
                ann_id += 1
            Image.fromarray(arr).save(root / split / f"{i}.png")
            images.append({"id": i + 1, "file_name": f"{i}.png", "width": w, "height": h})
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(
            {"images": images, "annotations": anns, "categories": [{"id": c, "name": n} for c, n in CATEGORIES]}))
    return root


@pytest.fixture(scope="module")
def coco_dir(tmp_path_factory):
    pytest.importorskip("cvt.datasets")
    return write_tiny_coco(tmp_path_factory.mktemp("coco"))


def _train_argv(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", f"coco:{data}", "--model", "cvt_13", "--set", f"model_args={json.dumps(TINY_CVT)}",
            "--set", "head_args={fpn_channels: 16, representation_size: 32, mask_channels: 16}",
            "--set", "min_size=64", "--set", "max_size=64", "--batch-size", "2", "--set", "steps_per_epoch=2",
            "--num-workers", "0", "--lr", "1e-3", "--out", str(out), *extra]


def test_train_eval_predict_end_to_end(tmp_path, coco_dir, capsys):
    run = tmp_path / "run"
    assert main(_train_argv(coco_dir, run, "--epochs", "1", "--set", "head=maskrcnn")) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["task"] == "detection" and summary["model"] == "cvt_13"
    for key in ("final_box_map", "final_box_map_50", "final_mask_map"):
        assert 0.0 <= summary[key] <= 1.0
    assert set(summary["per_class_box_ap"]) == {"square", "bar"}
    config = json.loads((run / "config.json").read_text())
    assert config["task"] == "detection" and config["class_names"] == ["square", "bar"] and config["cat_ids"] == [3, 7]
    assert config["detector"]["head"] == "maskrcnn" and config["detector"]["min_size"] == 64
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["val_box_map"] == summary["final_box_map"] and "val_mask_map" in row

    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run), "--data", f"coco:{coco_dir}"]) == 0
    printed = capsys.readouterr().out
    assert "box AP 50" in printed and "mask AP" in printed and "box AP square" in printed
    report = json.loads((run / "eval" / "eval.json").read_text())
    assert report["images"] == 3 and report["box"]["map"] == summary["final_box_map"]  # the same weights, data

    image = str(coco_dir / "val" / "0.png")
    assert main(["predict", "--checkpoint", str(run), image, "--json", "--score-threshold", "0",
                 "--save", str(tmp_path / "drawn")]) == 0
    (record,) = json.loads(capsys.readouterr().out)
    assert record["image"] == image and (record["width"], record["height"]) == (48, 64)
    for d in record["detections"]:
        x1, y1, x2, y2 = d["box"]
        assert 0 <= x1 <= x2 <= 48 and 0 <= y1 <= y2 <= 64 and d["class"] in ("square", "bar")
        assert set(d["mask"]) == {"size", "counts"} and d["mask"]["size"] == [64, 48]
    assert Image.open(tmp_path / "drawn" / "0.png").size == (48, 64)


def test_interrupted_run_resumes_to_the_same_weights(tmp_path, coco_dir, monkeypatch):
    """Stopped (Ctrl-C) before epoch 2's evaluation, --resume from the epoch-1 checkpoint ends with the weights of
    the run that never stopped: the data order, augmentation and every random draw continue exactly."""
    straight, run = tmp_path / "straight", tmp_path / "stopped"
    assert main(_train_argv(coco_dir, straight, "--epochs", "2")) == 0
    real = engine._evaluate  # noqa: SLF001 - the phase to interrupt

    def stop_at_epoch_2(r, epoch, stats):
        if epoch == 1:
            raise KeyboardInterrupt
        return real(r, epoch, stats)

    monkeypatch.setattr(engine, "_evaluate", stop_at_epoch_2)
    assert main(_train_argv(coco_dir, run, "--epochs", "2")) == 130
    monkeypatch.setattr(engine, "_evaluate", real)
    state, _ = engine.load_state(run)
    assert (state["epoch"], state["step"]) == (1, 0)
    assert main(["train", "--out", str(run), "--resume"]) == 0
    a, b = load_file(straight / "model.safetensors"), load_file(run / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted(tmp_path, coco_dir):
    from test_reliability import _child, _wait_for_line

    straight, run = tmp_path / "straight", tmp_path / "killed"
    assert main(_train_argv(coco_dir, straight, "--epochs", "3")) == 0
    with _child(_train_argv(coco_dir, run, "--epochs", "3")) as proc:
        _wait_for_line(proc, "epoch 2/3 step 1/2")  # after the epoch-1 checkpoint
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert main(["train", "--out", str(run), "--resume"]) == 0
    a, b = load_file(straight / "model.safetensors"), load_file(run / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
