"""The dense datasets (cvt.datasets): COCO files as real ones are, segmentation folders, loaders and exact resume,
the Fashion-MNIST scenes, and each kind of bad input as one clear line or a counted skip. Tiny data made here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from PIL import Image

from cvt.cli import main
from cvt.data import data_info, parse_data
from cvt.datasets import CocoDetection, SegFolder, build_loaders, collate_detection, collate_segmentation
from cvt.datasets.coco import detection_transforms
from cvt.datasets.scenes import _fill_holes, _polygons_or_rle, write_scenes


# ---------------------------------------------------------------------------------------------------------------
# A COCO file with what real ones hold
# ---------------------------------------------------------------------------------------------------------------
def rle_of(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode()}


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's crowd format: run lengths (background first) of the column-major pixels."""
    flat = mask.flatten(order="F")
    counts, value, run = [], 0, 0
    for v in flat:
        if v == value:
            run += 1
        else:
            counts.append(run)
            value, run = v, 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


def box_mask(h, w, x0, y0, x1, y1) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def write_coco(root: Path, split="train", images=None, annotations=None, categories=None, naming="plain") -> Path:
    """root/annotations/instances_{split}.json and root/{split}/: a 48x64 JPEG with a compressed-RLE object, a
    polygon object partly outside and a crowd region; a 40x24 grey PNG with a degenerate box only; a 32x32 PNG
    without annotations. Category ids 3 and 17 (sparse), listed out of order."""
    ann_dir, img_dir = root / "annotations", root / (split if naming == "plain" else f"{split}2017")
    ann_dir.mkdir(parents=True, exist_ok=True)
    img_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(img_dir / "a.jpg")
    Image.fromarray(rng.integers(0, 255, (40, 24), dtype=np.uint8)).save(img_dir / "b.png")
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(img_dir / "c.png")
    if images is None:
        images = [{"id": 5, "file_name": "a.jpg", "height": 48, "width": 64},
                  {"id": 2, "file_name": "b.png", "height": 40, "width": 24},
                  {"id": 9, "file_name": "c.png", "height": 32, "width": 32}]
    if categories is None:
        categories = [{"id": 17, "name": "dog"}, {"id": 3, "name": "cat"}]
    if annotations is None:
        annotations = [
            {"id": 1, "image_id": 5, "category_id": 17, "bbox": [10, 5, 20, 10], "iscrowd": 0,
             "segmentation": rle_of(box_mask(48, 64, 10, 5, 30, 15)), "area": 200},
            # partly outside the 64-wide image: clipped to x 50..64
            {"id": 2, "image_id": 5, "category_id": 3, "bbox": [50, 30, 20, 10], "iscrowd": 0,
             "segmentation": [[50, 30, 70, 30, 70, 40, 50, 40]], "area": 200},
            {"id": 3, "image_id": 5, "category_id": 3, "bbox": [0, 40, 8, 8], "iscrowd": 1,
             "segmentation": uncompressed_rle(box_mask(48, 64, 0, 40, 8, 48)), "area": 64},
            {"id": 4, "image_id": 2, "category_id": 3, "bbox": [3, 3, 0, 6], "iscrowd": 0,
             "segmentation": [[3, 3, 3, 9, 3, 9]], "area": 0},
        ]
    name = f"instances_{split}.json" if naming == "plain" else f"instances_{split}2017.json"
    (ann_dir / name).write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return root


def test_coco_reads_what_real_files_hold(tmp_path):
    ds = CocoDetection(write_coco(tmp_path), "train", masks=True)
    assert ds.categories == ["cat", "dog"] and ds.cat_ids == [3, 17] and ds.num_classes == 3
    assert ds.ids == [2, 5, 9]
    assert ds.skipped["crowd"] == 1 and ds.skipped["degenerate_boxes"] == 1
    assert len(ds.coco.getAnnIds(iscrowd=True)) == 1  # crowd kept for COCOeval
    image, t = ds[1]  # the JPEG
    assert image.shape == (3, 48, 64) and image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1
    assert t["image_id"] == 5 and t["labels"].tolist() == [2, 1]  # dog (id 17) is label 2, cat (id 3) label 1
    assert t["boxes"].tolist() == [[10, 5, 30, 15], [50, 30, 64, 40]]  # the second clipped at the border
    assert t["masks"].shape == (2, 48, 64) and t["masks"].dtype == torch.uint8
    assert torch.equal(t["masks"][0], torch.from_numpy(box_mask(48, 64, 10, 5, 30, 15)))  # compressed RLE
    assert torch.equal(t["masks"][1], torch.from_numpy(box_mask(48, 64, 50, 30, 64, 40)))  # polygon, clipped
    assert t["iscrowd"].tolist() == [0, 0] and t["area"].tolist() == [200, 140]
    grey, t = ds[0]  # the grey PNG, whose only box is degenerate: an image without objects
    assert grey.shape == (3, 40, 24) and torch.equal(grey[0], grey[2])
    assert t["boxes"].shape == (0, 4) and t["labels"].shape == (0,) and t["masks"].shape == (0, 40, 24)
    _, t = ds[2]
    assert t["boxes"].shape == (0, 4)


def test_coco_uncompressed_rle_and_crowd_in_evaluation(tmp_path):
    """The ground truth in `coco` serves pycocotools' COCOeval: the true boxes score AP 1, and a detection on
    the crowd region is neither a hit nor a false positive."""
    from pycocotools.cocoeval import COCOeval

    ds = CocoDetection(write_coco(tmp_path, split="val"), "val")
    crowd = ds.coco.loadAnns(ds.coco.getAnnIds(iscrowd=True))[0]
    assert mask_utils.decode(mask_utils.frPyObjects(crowd["segmentation"], 48, 64)).sum() == 64
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
            for a in ds.coco.loadAnns(ds.coco.getAnnIds()) if a["bbox"][2] > 0]  # the crowd box among them
    ev = COCOeval(ds.coco, ds.coco.loadRes(dets), "bbox")
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        ev.evaluate(), ev.accumulate(), ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)


def test_coco_torchvision_naming(tmp_path):
    ds = CocoDetection(write_coco(tmp_path, naming="2017"), "train")
    assert ds.image_dir.name == "train2017" and len(ds) == 3 and ds[1][0] is not None


def test_detection_transforms_move_boxes_and_masks_with_the_image(tmp_path):
    root = write_coco(tmp_path)
    flip = CocoDetection(root, "train", masks=True, transforms=detection_transforms(True, hflip=1.0,
                                                                                    scale_range=(1.0, 1.0)))
    plain = CocoDetection(root, "train", masks=True)
    (x, t), (x0, t0) = flip[1], plain[1]
    assert torch.equal(x, x0.flip(-1)) and torch.equal(t["masks"], t0["masks"].flip(-1))
    assert t["boxes"].tolist() == [[34, 5, 54, 15], [0, 30, 14, 40]]
    from torchvision.ops import masks_to_boxes

    jitter = CocoDetection(root, "train", masks=True, train=True, seed=3)
    for epoch in range(3):
        jitter.set_epoch(epoch)
        _, t = jitter[1]
        kept = t["masks"].flatten(1).any(1)
        assert len(t["boxes"]) == len(t["labels"]) == len(t["masks"])
        # a box still bounds its mask after flip, scaling and crop (within the resampling of the mask)
        assert torch.allclose(masks_to_boxes(t["masks"][kept]).float() + torch.tensor([0, 0, 1, 1]),
                              t["boxes"][kept].as_subclass(torch.Tensor), atol=2.0)


def test_augmentation_is_a_function_of_seed_epoch_and_index(tmp_path):
    ds = CocoDetection(write_coco(tmp_path), "train", masks=True, train=True, seed=0)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a, ta = ds[1]
    assert torch.equal(torch.get_rng_state(), state)  # the caller's generator is left alone
    b, tb = ds[1]
    assert torch.equal(a, b) and torch.equal(ta["boxes"], tb["boxes"]) and torch.equal(ta["masks"], tb["masks"])
    outputs = []
    for epoch in range(4):
        ds.set_epoch(epoch)
        outputs.append(ds[1][0])
    assert any(not torch.equal(outputs[0], o) for o in outputs[1:])


def test_loaders_resume_mid_epoch_as_uninterrupted(tmp_path):
    root = write_coco(tmp_path)
    # six images: the three of write_coco twice (the copies under other ids)
    ann = json.loads((root / "annotations" / "instances_train.json").read_text())
    ann["images"] += [{**im, "id": im["id"] + 100} for im in ann["images"]]
    ann["annotations"] += [{**a, "id": a["id"] + 100, "image_id": a["image_id"] + 100} for a in ann["annotations"]]
    (root / "annotations" / "instances_train.json").write_text(json.dumps(ann))

    def run(start):
        ds = CocoDetection(root, "train", train=True)
        train, val = build_loaders(ds, CocoDetection(root, "train"), collate=collate_detection, batch_size=2,
                                   eval_batch_size=4, rank=0, world=1, seed=7, num_workers=0)
        train.batch_sampler.set_epoch(2, start)
        return [(imgs, tgts) for imgs, tgts, _ in train], val

    full, val = run(0)
    resumed, _ = run(1)
    assert len(full) == 3 and len(resumed) == 2
    for (ia, ta), (ib, tb) in zip(full[1:], resumed):
        assert all(torch.equal(a, b) for a, b in zip(ia, ib))
        assert all(torch.equal(a["boxes"], b["boxes"]) and a["image_id"] == b["image_id"] for a, b in zip(ta, tb))
    assert [len(imgs) for imgs, _, _ in val] == [4, 2]


def test_parse_data_coco_and_seg(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "scenes").mkdir()
    assert parse_data("coco:~/scenes") == ("coco", str(tmp_path / "scenes"))
    assert parse_data("seg:~/scenes") == ("seg", str(tmp_path / "scenes"))
    assert data_info("coco:~/scenes") == (3, None)
    with pytest.raises(FileNotFoundError, match="COCO folder .*nowhere does not exist"):
        parse_data("coco:~/nowhere")
    with pytest.raises(ValueError, match="coco:PATH"):
        parse_data("cocoa:x")


# ---------------------------------------------------------------------------------------------------------------
# Bad COCO input: one line, or a counted skip
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, message", [
    ('{"images": [{"id": 1,', "not valid JSON: .* the file looks truncated"),
    ('{"images": [] ]', "not valid JSON: Expecting"),
    ("[1, 2]", "holds a JSON list, not a COCO object"),
    ('{"annotations": []}', "has no 'images' list"),
    ('{"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}]}', "lists no images"),
    ('{"images": [{"id": 1, "file_name": "a.jpg", "height": 48, "width": 64}], "annotations": [], '
     '"categories": [{"id": 1, "name": "a"}]}', "has no annotations at all"),
    ('{"images": [{"id": 1, "file_name": "a.jpg", "height": 48, "width": 64}], "annotations": [], '
     '"categories": []}', "lists no categories"),
    ('{"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"id": 1}], "categories": [{"id": 1, '
     '"name": "a"}]}',
     r"images\[0\] needs an integer id, a file_name and positive integer height"),
])
def test_coco_bad_files_are_one_line(tmp_path, text, message):
    write_coco(tmp_path)
    (tmp_path / "annotations" / "instances_train.json").write_text(text)
    with pytest.raises(ValueError, match=message) as e:
        CocoDetection(tmp_path, "train")
    assert "\n" not in str(e.value)


def test_coco_missing_folders_are_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CocoDetection(tmp_path / "nowhere", "train")
    (tmp_path / "annotations").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no annotations/instances_val.json \(nor instances_val2017"):
        CocoDetection(tmp_path, "val")
    (tmp_path / "annotations" / "instances_val.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no image folder val/"):
        CocoDetection(tmp_path, "val")


def test_coco_annotations_naming_unknown_images_or_categories_are_counted(tmp_path):
    anns = [{"id": 1, "image_id": 5, "category_id": 17, "bbox": [1, 1, 5, 5]},
            {"id": 2, "image_id": 77, "category_id": 17, "bbox": [1, 1, 5, 5]},
            {"id": 3, "image_id": 5, "category_id": 4, "bbox": [1, 1, 5, 5]},
            {"id": 4, "image_id": 5, "category_id": 3, "bbox": "not a box"},
            {"image_id": 5, "category_id": 3, "bbox": [2, 2, 4, 4]}]  # no id, area or segmentation: filled in
    ds = CocoDetection(write_coco(tmp_path, annotations=anns), "train", masks=True)
    assert {k: ds.skipped[k] for k in ("unknown_image", "unknown_category", "bad_annotations")} == \
        {"unknown_image": 1, "unknown_category": 1, "bad_annotations": 1}
    assert sorted(ds.coco.anns) == [1, 5] and ds.coco.anns[5]["area"] == 16
    _, t = ds[1]
    assert t["labels"].tolist() == [2, 1] and t["masks"][1].sum() == 16  # a box-only object: its box as mask
    bad = [{"id": 1, "image_id": 77, "category_id": 17, "bbox": [1, 1, 5, 5]}]
    with pytest.raises(ValueError, match="none of its 1 annotations is usable .*unknown image 1"):
        CocoDetection(write_coco(tmp_path / "b", annotations=bad), "train")


def test_coco_missing_unreadable_or_wrong_size_images_are_reported_not_raised(tmp_path):
    root = write_coco(tmp_path)
    (root / "train" / "b.png").write_bytes(b"not a png")
    (root / "train" / "c.png").unlink()
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(root / "train" / "a.jpg")
    ds = CocoDetection(root, "train")
    images, targets, errors = collate_detection([ds[i] for i in range(len(ds))])
    assert images == [] and targets == [] and len(errors) == 3
    assert "b.png: UnidentifiedImageError" in errors[0]
    assert "a.jpg: image is 10x10 pixels, instances_train.json says 64x48" in errors[1]
    assert errors[2].endswith("c.png: file not found")


# ---------------------------------------------------------------------------------------------------------------
# Segmentation folders
# ---------------------------------------------------------------------------------------------------------------
def write_seg(root: Path, split="train", n=3, classes: list[str] | None = None, palette=False) -> Path:
    """n pairs of different sizes: JPEG images, index masks with classes 0..2 and a 255 border."""
    (root / split / "images").mkdir(parents=True, exist_ok=True)
    (root / split / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for i in range(n):
        h, w = 24 + 8 * i, 32
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / split / "images" / f"{i}.jpg")
        mask = np.zeros((h, w), np.uint8)
        mask[4:12, 4:20] = 1 + i % 2
        mask[3, 4:20] = 255
        img = Image.fromarray(mask)
        if palette:  # VOC's masks: palette indices are the classes
            img = Image.frombytes("P", (w, h), mask.tobytes())
            img.putpalette([v for i in range(256) for v in (i, 255 - i, 0)])
        img.save(root / split / "masks" / f"{i}.png")
    if classes:
        (root / "classes.txt").write_text("\n".join(classes) + "\n")
    return root


def test_segfolder_pairs_classes_and_collate(tmp_path):
    ds = SegFolder(write_seg(tmp_path), "train")
    assert ds.classes == ["class_0", "class_1", "class_2"] and len(ds) == 3
    image, mask = ds[2]
    assert image.shape == (3, 40, 32) and image.dtype == torch.float32
    assert mask.shape == (40, 32) and mask.dtype == torch.int64 and set(mask.unique().tolist()) == {0, 1, 255}
    images, masks, errors = collate_segmentation([ds[i] for i in range(3)])
    assert images.shape == (3, 3, 40, 32) and masks.shape == (3, 40, 32) and errors == []
    assert (masks[0, 24:] == 255).all() and (images[0, :, 24:] == 0).all()  # padding is ignored
    named = SegFolder(write_seg(tmp_path / "p", palette=True, classes=["bg", "a", "b", "c"]), "train")
    assert named.classes == ["bg", "a", "b", "c"] and named[1][1].max() == 255
    assert SegFolder(tmp_path, "train", classes=["x", "y", "z", "w"]).classes == ["x", "y", "z", "w"]


def test_segfolder_training_crops_to_size_reproducibly(tmp_path):
    ds = SegFolder(write_seg(tmp_path), "train", size=16, train=True, seed=0)
    images, masks, _ = collate_segmentation([ds[i] for i in range(3)])
    assert images.shape == (3, 3, 16, 16) and masks.shape == (3, 16, 16)
    assert set(masks.unique().tolist()) <= {0, 1, 2, 255}
    again = collate_segmentation([ds[i] for i in range(3)])
    assert torch.equal(images, again[0]) and torch.equal(masks, again[1])


def test_segfolder_unpaired_files_named(tmp_path):
    root = write_seg(tmp_path, n=6)
    for i in range(5):
        (root / "train" / "masks" / f"{i}.png").rename(root / "train" / "masks" / f"x{i}.png")
    with pytest.raises(ValueError, match=r"do not pair up by file name: 5 image\(s\) without a mask \(0.jpg, "
                                         r"1.jpg, 2.jpg and 2 more\); 5 mask\(s\) without an image \(x0.png"):
        SegFolder(root, "train")
    with pytest.raises(FileNotFoundError, match="has no val/images/ folder"):
        SegFolder(root, "val")


def test_segfolder_bad_masks_are_reported_not_raised(tmp_path):
    root = write_seg(tmp_path, n=4, classes=["bg", "a"])  # class 2 in the masks of 1.png, 3.png: not in classes
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(root / "train" / "masks" / "0.png")  # wrong size
    Image.fromarray(np.zeros((40, 32, 3), np.uint8)).save(root / "train" / "masks" / "2.png")  # RGB
    ds = SegFolder(root, "train")
    images, masks, errors = collate_segmentation([ds[i] for i in range(4)])
    assert images.shape[0] == 0 and len(errors) == 4
    assert "0.png: mask is 5x5 pixels, its image 0.jpg 32x24" in errors[0]
    assert "1.png: mask values 2 are outside the 2 classes (0-1) and not 255 (ignore)" in errors[1]
    assert "2.png: ValueError: mask mode RGB is not single-channel" in errors[2]


# ---------------------------------------------------------------------------------------------------------------
# Scenes
# ---------------------------------------------------------------------------------------------------------------
def fake_items() -> dict:
    """Blobs as Fashion-MNIST items: train items of classes 0-4, test items of classes 5-9 (so val canvases show
    where their items came from)."""
    rng = np.random.default_rng(0)
    out = {}
    for split, offset in (("train", 0), ("test", 5)):
        images = np.zeros((20, 28, 28), np.uint8)
        yy, xx = np.mgrid[:28, :28]
        for i in range(20):
            r = rng.uniform(7, 12)
            images[i] = np.clip((r - np.hypot(yy - 14, xx - 14)) * 60, 0, 255) * rng.uniform(0.6, 1)
        images[:10, 12:16, 12:16] = 0  # a hole in half of them
        out[split] = (images, np.arange(20) % 5 + offset)
    return out


def test_scenes_write_both_layouts_deterministically(tmp_path):
    counts = write_scenes(tmp_path / "s", items=fake_items(), seed=1, train_images=6, val_images=3)
    assert counts["train"]["images"] == 6 and counts["val"]["images"] == 3 and counts["train"]["objects"] >= 12
    assert sum(counts["val"]["per_class"][:5]) == 0 and sum(counts["train"]["per_class"][5:]) == 0
    write_scenes(tmp_path / "t", items=fake_items(), seed=1, train_images=6, val_images=3)
    for rel in ("annotations/instances_train.json", "train/images/000005.png", "val/masks/000002.png"):
        assert (tmp_path / "s" / rel).read_bytes() == (tmp_path / "t" / rel).read_bytes()

    coco = CocoDetection(tmp_path / "s", "train", masks=True)
    seg = SegFolder(tmp_path / "s", "train")
    assert coco.categories[0] == "T-shirt/top" and coco.cat_ids == list(range(1, 11))
    assert seg.classes[0] == "background" and len(seg.classes) == 11
    assert sum(coco.skipped.values()) == 0
    for i in range(len(coco)):
        image, t = coco[i]
        seg_image, mask = seg[i]
        assert torch.equal(image, seg_image)
        for m, label in zip(t["masks"].bool(), t["labels"]):
            # each object's pixels are its class in the index mask, or 255 at its anti-aliased border
            assert set(mask[m].unique().tolist()) <= {int(label), 255}
            assert (mask[m] == label).float().mean() > 0.5
        ann = coco.coco.loadAnns(coco.coco.getAnnIds(imgIds=coco.ids[i]))
        for a, m in zip(ann, t["masks"]):
            assert a["area"] == int(m.sum())  # polygons and RLEs decode to exactly the object's pixels
    assert any(isinstance(a["segmentation"], list) for a in coco.coco.anns.values())
    assert len({coco.coco.imgs[i]["height"] * 1000 + coco.coco.imgs[i]["width"] for i in coco.ids}) > 1


def test_scene_masks_as_polygons_or_rle():
    ring = box_mask(20, 24, 3, 4, 15, 16)
    ring[7:11, 7:11] = 0  # a hole (an item seen through an occluder's gap, or a bag's handle)
    solid = box_mask(20, 24, 3, 4, 15, 16)
    solid[4:6, 3:6] = 0
    assert isinstance(_polygons_or_rle(ring), dict) and isinstance(_polygons_or_rle(solid), list)
    for m in (ring, solid):
        seg = _polygons_or_rle(m)
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, 20, 24)) if isinstance(seg, list) else seg
        assert np.array_equal(mask_utils.decode(rle), m)
    assert np.array_equal(_fill_holes(ring.astype(bool)), solid.astype(bool) | box_mask(20, 24, 3, 4, 15, 16))


def test_scenes_command_and_overwrite(tmp_path, fake_fmnist, capsys):
    out = tmp_path / "scenes"
    argv = ["data", "scenes", str(out), "--data-dir", str(fake_fmnist), "--train-images", "3", "--val-images", "2"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "train: 3 canvases" in printed and "val: 2 canvases" in printed and f"coco:{out}" in printed
    before = (out / "annotations" / "instances_val.json").read_bytes()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"cvt data: error: {out} is not empty; pass --overwrite to replace its scenes"
    assert (out / "annotations" / "instances_val.json").read_bytes() == before
    (out / "notes.txt").write_text("mine")
    assert main([*argv, "--overwrite", "--seed", "4"]) == 0
    assert (out / "notes.txt").read_text() == "mine" and len(CocoDetection(out, "val")) == 2
    assert main(["data", "scenes", str(tmp_path / "x"), "--data-dir", str(tmp_path / "none")]) == 2
    assert "Fashion-MNIST not found" in capsys.readouterr().err


def test_dense_predict_reads_images_as_training_does(tmp_path):
    """`cvt predict` of a dense run reads a file as the datasets do: a 16-bit grey image by its full range (PIL's own
    convert would clip it at 255), a palette image by its colours."""
    from cvt.datasets.coco import read_rgb, read_rgb_tensor

    grey = np.full((4, 6), 32768, dtype=np.uint16)
    Image.fromarray(grey).save(tmp_path / "g16.png")
    x = read_rgb_tensor(tmp_path / "g16.png")
    assert x.shape == (3, 4, 6) and x.dtype == torch.uint8 and int(x.min()) == int(x.max()) == 128
    pal = Image.new("P", (3, 2))
    pal.putpalette([10, 20, 30] * 256)
    pal.save(tmp_path / "p.png")
    assert torch.equal(read_rgb_tensor(tmp_path / "p.png"), torch.from_numpy(read_rgb(tmp_path / "p.png").copy())
                       .permute(2, 0, 1))
    assert read_rgb_tensor(tmp_path / "p.png")[:, 0, 0].tolist() == [10, 20, 30]
