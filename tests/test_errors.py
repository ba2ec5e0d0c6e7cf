"""Bad input is one clear line naming the thing and what is wrong, exit status 2, no traceback (`--debug` shows
it): the CLI's error policy, config validation, image decoding (16-bit, CMYK, truncated and fake files), data
folders, checkpoints. The end-to-end training tests live in test_train.py, the shared fixtures in conftest.py."""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import cvt
from conftest import CLASSES, TINY, TINY_ARGS, make_image
from cvt import engine
from cvt.cli import main
from cvt.config import CvTConfig
from cvt.data import open_image, scan_image_folder
from cvt.recipe import TrainConfig, check_randaugment
from cvt.weights import save_weights


@pytest.fixture(autouse=True)
def in_tmp_path(one_thread, monkeypatch, tmp_path):
    # A run folder left by a failing command lands in tmp_path.
    monkeypatch.chdir(tmp_path)


def one_line_error(capsys, argv: list[str], *needles: str, started: bool = False) -> str:
    """Run the CLI and check the error policy: exit status 2, one stderr line naming the command, no traceback,
    holding each of `needles`. Returns the line. `started`: training had begun, so its log lines come first."""
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, err
    assert "Traceback" not in err and lines and (started or len(lines) == 1), err
    command = next(a for a in argv if not a.startswith("-"))
    assert lines[-1].startswith(f"cvt {command}: error: "), err
    assert sum("error" in line for line in lines) == 1, err
    for needle in needles:
        assert needle in lines[-1], (needle, lines[-1])
    return lines[-1]


def _folder(root, splits=(("train", 4), ("val", 2)), classes=CLASSES, seed=0):
    """ROOT/split/<class>/<i>.png of small RGB images whose dominant colour is the class."""
    rng = np.random.default_rng(seed)
    for split, n in splits:
        for c, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(make_image(rng, c % 3)).save(d / f"{i}.png")
    return root


def _truncated(path, fmt: str) -> None:
    """A file of `fmt` with a valid header, cut off in the middle of its pixel data."""
    full = path.with_suffix(".full" + path.suffix)
    Image.fromarray(make_image(np.random.default_rng(7), 0, (64, 64))).save(full, format=fmt)
    data = full.read_bytes()
    full.unlink()
    path.write_bytes(data[: len(data) // 2])


# ---------------------------------------------------------------------------------------------------------------
# The CLI's error policy
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [["--debug", "train", "--epochs", "0"], ["train", "--epochs", "0", "--debug"]])
def test_debug_before_or_after_the_command_shows_the_traceback(argv):
    # Before the fix, a global --debug hid the command's own options from the parser: "unrecognized arguments".
    with pytest.raises(ValueError, match="epochs must be an integer >= 1, got 0"):
        main(argv)


def test_without_debug_a_user_error_is_one_line(capsys):
    one_line_error(capsys, ["train", "--epochs", "0"], "epochs must be an integer >= 1, got 0")


def test_devices_that_are_not_there_are_one_line(capsys, monkeypatch, tmp_path):
    out = ["--out", str(tmp_path / "run")]
    one_line_error(capsys, ["train", "--device", "tpu", *out], "--device must be cpu, cuda or cuda:N, got 'tpu'")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    one_line_error(capsys, ["train", "--device", "cuda", *out], "PyTorch sees no CUDA GPU here; use --device cpu")
    # One GPU, and the user names a second (a torch "invalid device ordinal" traceback before).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    one_line_error(capsys, ["train", "--device", "cuda:1", *out], "--device cuda:1: PyTorch sees 1 CUDA GPU(s) here")


@pytest.fixture
def zoo_raises(monkeypatch):
    """Make `cvt zoo` raise the given exception, as a command deep in the library would."""
    from cvt.commands import zoo

    def set_error(error: BaseException) -> None:
        def fail(args):
            raise error

        monkeypatch.setattr(zoo, "run", fail)

    return set_error


@pytest.mark.parametrize("error", [
    RuntimeError("a bug in cvt or torch"), KeyError("layer.weight"), TypeError("x"),
    OSError(errno.EIO, "Input/output error"),  # not something a setting fixes
])
def test_bugs_keep_their_traceback(zoo_raises, capsys, error):
    zoo_raises(error)
    with pytest.raises(type(error)):
        main(["zoo"])
    assert capsys.readouterr().err == ""  # not also reported as a user error


@pytest.mark.parametrize("error,needle", [
    (FileExistsError("out.onnx exists; pass --force to overwrite it"), "out.onnx exists"),
    (IsADirectoryError("runs is a folder"), "runs is a folder"),
    (OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
    (ValueError("first line\nsecond line"), "first line; second line"),
])
def test_user_errors_are_one_line(zoo_raises, capsys, error, needle):
    zoo_raises(error)
    one_line_error(capsys, ["zoo"], needle)


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to "
                 "allocate 1099511627776 bytes"),
])
def test_out_of_memory_is_one_line_with_what_to_change(zoo_raises, capsys, error):
    zoo_raises(error)
    one_line_error(capsys, ["zoo"], "out of memory", "lower the batch size")
    with pytest.raises(type(error)):
        main(["--debug", "zoo"])


# ---------------------------------------------------------------------------------------------------------------
# Config values
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value,message", [
    (None, "depths must be a list with one entry per stage, got None"),
    ("1,2,4", "depths must be a list with one entry per stage, got '1,2,4'"),
    ({"a": 1}, "depths must be a list with one entry per stage"),
    ([[1], 2, 4], r"depths must be positive integers, got \(\[1\], 2, 4\)"),
    ([1, 2.0, 4], r"depths must be positive integers, got \(1, 2.0, 4\)"),  # range(2.0) fails in the model
    ([1, -2, 4], "depths must be positive integers"),
    ([1, True, 4], "depths must be positive integers"),
])
def test_wrong_typed_per_stage_fields_are_value_errors(value, message):
    with pytest.raises(ValueError, match=message):
        CvTConfig(embed_dims=(32, 64, 128), num_heads=(1, 2, 4), depths=value)


@pytest.mark.parametrize("field", ["embed_dims", "num_heads", "patch_sizes", "patch_strides", "patch_paddings"])
@pytest.mark.parametrize("value", [None, "abc", 3.5, [None, 1, 1], [1.5, 1, 1]])
def test_every_per_stage_field_names_itself(field, value):
    with pytest.raises(ValueError, match=f"^{field} "):
        CvTConfig(**{field: value})


@pytest.mark.parametrize("rate", [None, "0.1", True, [0.0, None, 0.1], float("nan")])
def test_bad_drop_path_rate_is_a_value_error(rate):
    with pytest.raises(ValueError, match="drop_path_rate must be a number or a list"):
        CvTConfig(drop_path_rate=rate)


@pytest.mark.parametrize("setting,needles", [
    ("model_args.depths=null", ["depths must be a list with one entry per stage, got None"]),
    ("model_args.depths=[1, x, 2]", ["depths must be positive integers", "'x'"]),
    ("model_args.depths=[]", ["depths has 0 entries", "one per stage"]),
    ("model_args.embed_dims=[32, 63, 128]", ["embed_dims[1]=63 is not divisible by num_heads[1]=2"]),
    ("model_args.drop_path_rate=high", ["drop_path_rate must be a number"]),
    ("model_args.depht=[1, 1, 1]", ["unknown CvT config field(s) depht"]),
    ("model_args.mlp_ratio=yes", ["mlp_ratio must be a positive number, got True"]),  # was: accepted as 1
    ("model_args.attn_drop_rate=false", ["attn_drop_rate must be in [0, 1), got False"]),  # was: accepted as 0
    ("randaugment=rand-foo", ["randaugment 'rand-foo': cannot read 'foo'"]),
    ("compile=maybe", ["compile must be true or false, got 'maybe'"]),  # was: compile on ('maybe' is truthy)
    ("strict_data=1", ["strict_data must be true or false, got 1"]),
    ("data_dir=5", ["data_dir must be a path or null, got 5"]),  # was: a TypeError traceback from Path(5)
    ("checkpoint_minutes=-1", ["checkpoint_minutes must be >= 0 (0: off), got -1"]),
    ("task=detectoin", ["task must be one of classification, detection, segmentation, got 'detectoin'"]),
    ("data=coco:/data/coco", ["COCO folder /data/coco does not exist"]),
])
def test_bad_model_settings_through_the_cli(capsys, tmp_path, setting, needles):
    one_line_error(capsys, ["train", "--set", setting, "--out", str(tmp_path / "run")], *needles)


def test_settings_that_were_tracebacks(capsys, tmp_path):
    # `out` is read before the settings are checked when resuming (to find the run): was a TypeError from Path(2024)
    one_line_error(capsys, ["train", "--resume", "--set", "out=2024"], "out must be a folder path, got 2024")
    # a dotted model_args key after model_args itself was set to a non-mapping: was a TypeError
    one_line_error(capsys, ["train", "--set", "model_args=5", "--set", "model_args.depths=[1, 2, 4]"],
                   "--set model_args.depths: model_args was set to 5, not a mapping")


@pytest.mark.parametrize("spec", ["rand-m9-mstd0.5-inc1", "rand", "rand-m9-n2-p0.5-mmax10-inc0-tweights",
                                  "rand-mstd101-t3a", "rand-n3-t3aw"])
def test_good_randaugment_specs_pass(spec):
    check_randaugment(spec)
    assert TrainConfig(randaugment=spec).randaugment == spec


@pytest.mark.parametrize("spec,message", [
    ("rand-foo", "cannot read 'foo'"),  # timm skips this silently: RandAugment at its defaults
    ("rand-m", "cannot read 'm'"),  # timm skips a key without a value too
    ("rand-tfoo", "unknown transform set 'tfoo'"),  # timm falls back to its default set
    ("rand-w0", "cannot read 'w0'"),  # timm 1.0 dropped the old 'w' key
    ("rand-m9.5", "bad value in 'm9.5'; expected m<int>"),
    ("rand-p2", r"bad value in 'p2'; expected p<float>: probability of each operation, in \[0, 1\]"),
    ("rand-n0", "bad value in 'n0'"),
    ("rand-inc2", "bad value in 'inc2'"),
    ("rand-mstd0.5.5", "bad value in 'mstd0.5.5'"),
    ("rand--m9", "cannot read ''"),
    ("augmix-m5", "must start with 'rand'"),
    ("randm9", "must start with 'rand'"),
])
def test_bad_randaugment_specs_name_the_part(spec, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(randaugment=spec)


# A RandAugment spec part: a key (timm's, or not) and a value (a number, a transform set's name, or junk).
RA_PART = st.tuples(
    st.sampled_from(["m", "n", "p", "mstd", "mmax", "inc", "t", "w", "x", ""]),
    st.one_of(st.integers(0, 12).map(str), st.sampled_from(["0.5", "1.5", "9.", ".5", "", "weights", "3a", "foo"])),
).map("".join)


@settings(max_examples=100, deadline=None)
@given(st.one_of(
    st.lists(RA_PART, max_size=3).map(lambda parts: "-".join(["rand", *parts])),
    st.text(alphabet="rand-m0123456789.", max_size=12),
))
def test_randaugment_check_accepts_only_what_timm_applies_as_written(spec):
    try:
        check_randaugment(spec)
    except ValueError:
        return  # never another exception type
    from timm.data.auto_augment import rand_augment_transform

    # Accepted: timm builds it with the values asked for (the last of a repeated key wins, as in timm), not its
    # defaults for a part it could not read.
    ra = rand_augment_transform(spec, {})
    last = {}
    for part in spec.split("-")[1:]:
        key = "mstd" if part.startswith("mstd") else "mmax" if part.startswith("mmax") else part[:1]
        last[key] = part[len(key):]
    assert ra.num_layers == int(last.get("n", 2))
    assert all(op.magnitude == int(last.get("m", 10)) for op in ra.ops)
    assert all(op.prob == float(last.get("p", 0.5)) for op in ra.ops)


# Values for TrainConfig fields: valid ones (with the dependencies between fields: min_lr <= lr, cooldown <
# epochs, an even batch for mixup) and, in most examples, one field replaced by a value that may be out of range or
# of the wrong type.
VALID = dict(
    lr=st.floats(1e-6, 0.1), min_lr=st.sampled_from([0, 0.0, 1e-6]), warmup_lr=st.floats(0, 1e-3),
    warmup_epochs=st.one_of(st.floats(0, 5), st.integers(0, 5)), epochs=st.integers(1, 5),
    cooldown_epochs=st.floats(0, 0.99), batch_size=st.integers(1, 9), accum_steps=st.integers(1, 3),
    label_smoothing=st.floats(0, 0.99), ema_decay=st.floats(0, 0.999),
    clip_grad=st.one_of(st.none(), st.floats(0.01, 5)), mixup=st.sampled_from([0.0, 0.8]),
    randaugment=st.sampled_from([None, "rand-m9-mstd0.5-inc1", "rand-n1-p0.3"]),
    compile_mode=st.sampled_from(["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]),
)
ANYTHING = st.one_of(
    st.floats(-2, 2), st.integers(-2, 10),
    st.sampled_from(
        [None, "1", "", True, False, [1], float("nan"), float("inf"), -float("inf"), "rand-foo", "rand-p2"]
    ),
)


@st.composite
def train_values(draw):
    values = {name: draw(strategy) for name, strategy in VALID.items()}
    broken = draw(st.sampled_from([None] * 6 + list(VALID)))  # about a third of the examples unbroken
    if broken is not None:
        values[broken] = draw(ANYTHING)
    return values


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _valid(v: dict) -> bool:
    """TrainConfig's rules for these fields, written out independently of recipe.py."""
    return (
        _is_num(v["lr"]) and v["lr"] > 0
        and _is_num(v["min_lr"]) and 0 <= v["min_lr"] <= v["lr"]
        and _is_num(v["warmup_lr"]) and v["warmup_lr"] >= 0
        and _is_num(v["warmup_epochs"]) and v["warmup_epochs"] >= 0
        and _is_int(v["epochs"]) and v["epochs"] >= 1
        and _is_num(v["cooldown_epochs"]) and 0 <= v["cooldown_epochs"] < v["epochs"]
        and _is_int(v["batch_size"]) and v["batch_size"] >= 1
        and _is_int(v["accum_steps"]) and v["accum_steps"] >= 1
        and _is_num(v["label_smoothing"]) and 0 <= v["label_smoothing"] < 1
        and _is_num(v["ema_decay"]) and 0 <= v["ema_decay"] < 1
        and (v["clip_grad"] is None or (_is_num(v["clip_grad"]) and v["clip_grad"] > 0))
        and _is_num(v["mixup"]) and v["mixup"] >= 0 and (v["mixup"] == 0 or v["batch_size"] % 2 == 0)
        and v["randaugment"] in (None, "rand-m9-mstd0.5-inc1", "rand-n1-p0.3")
        and v["compile_mode"] in ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
    )


@settings(max_examples=100, deadline=None)
@given(train_values())
def test_train_config_accepts_exactly_the_valid_values(values):
    if _valid(values):
        cfg = TrainConfig(**values)
        assert all(getattr(cfg, k) == v for k, v in values.items())
    else:
        with pytest.raises(ValueError):  # never a TypeError or another exception
            TrainConfig(**values)


# ---------------------------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------------------------
def test_16_bit_images_scale_by_the_full_range(tmp_path):
    """A pixel's level depends on its value only: 200/65535 is near black even when it is the brightest pixel
    (the old code picked the scale from the image's maximum and kept 200 as 200)."""
    levels = np.array([[0, 200, 300, 257 * 128, 65535]], dtype=np.uint16)
    expected = [0, 1, 1, 128, 255]  # round(v * 255 / 65535)
    dim = np.array([[0, 100, 200]], dtype=np.uint16)
    Image.fromarray(levels).save(tmp_path / "a.png")  # Pillow: mode I;16
    Image.fromarray(levels).save(tmp_path / "a.pgm")  # Pillow decodes 16-bit PGM as mode I
    Image.frombytes("I;16B", (5, 1), levels.astype(">u2").tobytes()).save(tmp_path / "b.tif")
    Image.fromarray(dim).save(tmp_path / "dim.png")
    for name in ("a.png", "a.pgm", "b.tif"):
        assert np.asarray(open_image(tmp_path / name, 1)).tolist() == [expected], name
        rgb = np.asarray(open_image(tmp_path / name, 3))
        assert rgb.shape == (1, 5, 3) and rgb[0, :, 1].tolist() == expected, name
    assert np.asarray(open_image(tmp_path / "dim.png", 1)).tolist() == [[0, 0, 1]]
    # 32-bit integer TIFF: white is 2**31 - 1
    Image.fromarray(np.array([[0, 2**30, 2**31 - 1]], dtype=np.int32)).save(tmp_path / "c.tif")
    assert np.asarray(open_image(tmp_path / "c.tif", 1)).tolist() == [[0, 128, 255]]


def test_grey_and_cmyk_images_convert_to_the_model_channels(tmp_path):
    Image.fromarray(np.full((4, 6), 77, np.uint8)).save(tmp_path / "grey.png")
    Image.new("CMYK", (6, 4), (0, 255, 255, 0)).save(tmp_path / "red.jpg")  # CMYK pure red
    grey3 = np.asarray(open_image(tmp_path / "grey.png", 3))
    assert grey3.shape == (4, 6, 3) and (grey3 == 77).all()
    red = np.asarray(open_image(tmp_path / "red.jpg", 3)).astype(int)
    assert red.shape == (4, 6, 3) and (red[..., 0] > 230).all() and (red[..., 1:] < 25).all()
    assert np.asarray(open_image(tmp_path / "red.jpg", 1)).shape == (4, 6)


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    """An image folder with every kind of file a real one has: grey, CMYK, 16-bit, palette, an upper-case
    extension, an image smaller than the crop, hidden files and folders, and three unreadable files (a truncated
    PNG, a truncated JPEG, text named .png). 12 training files: three full batches of 4, so every file is read."""
    root = _folder(tmp_path_factory.mktemp("messy"), splits=(("train", 1), ("val", 2)))
    rng = np.random.default_rng(3)
    bird, cat, dog = (root / "train" / c for c in CLASSES)
    Image.fromarray(make_image(rng, 0)).convert("L").save(bird / "grey.png")
    Image.fromarray(make_image(rng, 0)).convert("CMYK").save(bird / "cmyk.jpg")
    Image.fromarray(make_image(rng, 0)[..., 0].astype(np.uint16) * 257).save(bird / "deep.png")  # 16-bit grey
    Image.fromarray(make_image(rng, 1)).convert("P").save(cat / "palette.gif")
    Image.fromarray(make_image(rng, 1)).save(cat / "UPPER.PNG")
    Image.fromarray(make_image(rng, 1, (5, 7))).save(cat / "small.png")  # the crop is 32 px
    _truncated(dog / "cut.png", "PNG")
    _truncated(dog / "cut.jpg", "JPEG")
    (dog / "fake.png").write_text("not an image at all")
    # never read: hidden files and folders, a hidden class folder, a file that is not an image
    (dog / ".fake.png").write_text("hidden")
    (cat / ".thumbs").mkdir()
    (cat / ".thumbs" / "broken.png").write_text("hidden folder")
    (root / "train" / ".cache").mkdir()
    Image.fromarray(make_image(rng, 2)).save(root / "train" / ".cache" / "0.png")
    (bird / "readme.txt").write_text("not an image extension")
    return root


BROKEN = ("cut.png", "cut.jpg", "fake.png")


def test_scan_sees_exactly_the_visible_image_files(messy):
    samples, classes = scan_image_folder(messy, "train")
    assert classes == CLASSES  # not .cache
    names = sorted(os.path.basename(p) for p, _ in samples)
    assert len(names) == 12 and "UPPER.PNG" in names and "palette.gif" in names
    assert not any(n.startswith(".") or n.endswith(".txt") or n == "broken.png" for n in names)
    for path, label in samples:
        if os.path.basename(path) in BROKEN:
            with pytest.raises(OSError):  # PIL's "truncated" / "cannot identify image file"
                open_image(path, 3)
        else:
            img = open_image(path, 3)
            assert img.mode == "RGB" and CLASSES[label] in path


def _train_messy(tmp_path, messy, *extra):
    run = tmp_path / "run"
    argv = ["train", *TINY, "--data", f"imagefolder:{messy}", "--img-size", "32", "--batch-size", "4",
            "--epochs", "1", "--out", str(run), *extra]
    return argv, run


def test_unreadable_files_are_skipped_with_one_warning_each_and_counted(tmp_path, messy, capsys):
    argv, run = _train_messy(tmp_path, messy)
    assert main(argv) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("skipping unreadable image")]
    assert sorted(os.path.basename(w.split()[3]) for w in warnings) == sorted(BROKEN)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["skipped_files"] == 3
    assert sorted(os.path.basename(p) for p in summary["skipped"]) == sorted(BROKEN)
    assert summary["classes"] == 3 and summary["val_images"] == 6


def test_strict_data_makes_the_first_unreadable_file_an_error(tmp_path, messy, capsys):
    argv, run = _train_messy(tmp_path, messy, "--strict-data")
    line = one_line_error(capsys, argv, "unreadable image", "drop --strict-data", started=True)
    assert any(f"{messy}/train/dog/{name}" in line for name in BROKEN)
    assert not (run / "summary.json").exists()


def test_an_unreadable_validation_image_keeps_the_epoch_trained(tmp_path, capsys):
    root = _folder(tmp_path / "data", splits=(("train", 4), ("val", 1)))
    bad = root / "val" / "cat" / "0.png"
    good = bad.read_bytes()
    bad.write_bytes(b"not a PNG")
    run = tmp_path / "run"
    argv = ["train", *TINY, "--data", f"imagefolder:{root}", "--img-size", "32", "--batch-size", "4", "--epochs",
            "1", "--out", str(run), "--strict-data"]
    one_line_error(capsys, argv, "unreadable image", str(bad), started=True)
    state, _ = engine.load_state(run)
    assert (state["epoch"], state["step"]) == (0, 3) and state["partial"]["taken"] == 3  # all 3 steps were kept
    bad.write_bytes(good)
    assert main(["train", "--out", str(run), "--resume"]) == 0
    row = json.loads((run / "metrics.jsonl").read_text())
    assert row["val_top1"] is not None and row["train_loss"] > 0 and row["images_per_s"] > 0


# ---------------------------------------------------------------------------------------------------------------
# Data folders
# ---------------------------------------------------------------------------------------------------------------
def _data_error(capsys, tmp_path, root, *needles):
    return one_line_error(capsys, ["train", *TINY, "--data", f"imagefolder:{root}", "--img-size", "32",
                                   "--batch-size", "4", "--epochs", "1", "--out", str(tmp_path / "run")], *needles)


def test_data_root_that_is_a_file(capsys, tmp_path):
    (tmp_path / "data.zip").write_bytes(b"PK")
    _data_error(capsys, tmp_path, tmp_path / "data.zip", "data.zip is a file, not a folder")


def test_data_root_without_a_train_folder(capsys, tmp_path):
    (tmp_path / "d" / "training").mkdir(parents=True)
    _data_error(capsys, tmp_path, tmp_path / "d", "has no 'train' folder", "/train/<class>/<image>")


def test_train_split_without_class_folders(capsys, tmp_path):
    (tmp_path / "d" / "train").mkdir(parents=True)
    Image.fromarray(make_image(np.random.default_rng(0), 0)).save(tmp_path / "d" / "train" / "loose.png")
    (tmp_path / "d" / "train" / ".git").mkdir()  # hidden: not a class
    _data_error(capsys, tmp_path, tmp_path / "d", "train has no class folders")


def test_empty_class_folder_in_train_is_an_error(capsys, tmp_path):
    """A class with no training images cannot be learned; its index would shift every later class's."""
    root = _folder(tmp_path / "d")
    for f in (root / "train" / "cat").iterdir():
        f.unlink()
    (root / "train" / "cat" / "notes.txt").write_text("no images here")
    _data_error(capsys, tmp_path, root, f"class folder {root}/train/cat holds no images")


def test_empty_class_folder_in_val_is_allowed(tmp_path):
    """A val split may cover a subset of the classes; labels follow the train split's classes."""
    root = _folder(tmp_path / "d")
    shutil.rmtree(root / "val" / "cat")
    (root / "val" / "cat").mkdir()
    samples, classes = scan_image_folder(root, "val", CLASSES)
    assert classes == CLASSES and sorted({y for _, y in samples}) == [0, 2]


def test_val_class_that_train_lacks_is_named(capsys, tmp_path):
    root = _folder(tmp_path / "d")
    _folder(root, splits=(("val", 1),), classes=["emu"])
    _data_error(capsys, tmp_path, root, "val has class folder(s) the train split lacks: emu")


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """An untrained 3-class cvt_tiny, with and without class names, and a truncated copy: no training needed."""
    root = tmp_path_factory.mktemp("weights")
    model = cvt.create_model("cvt_tiny", num_classes=3, **TINY_ARGS)
    save_weights(model.state_dict(), model.cfg, root / "named" / "model.safetensors", class_names=CLASSES)
    save_weights(model.state_dict(), model.cfg, root / "anonymous" / "model.safetensors")
    data = (root / "named" / "model.safetensors").read_bytes()
    (root / "cut").mkdir()
    (root / "cut" / "model.safetensors").write_bytes(data[: len(data) // 2])
    torch.save({"fc.weight": torch.zeros(3, 8), "fc.bias": torch.zeros(3)}, root / "resnet.pth")
    return root


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return _folder(tmp_path_factory.mktemp("images"), splits=(("train", 4), ("val", 1)))


@pytest.mark.parametrize("command", ["eval", "predict", "train"])
def test_truncated_checkpoint(capsys, weights, images, command, tmp_path):
    ckpt = str(weights / "cut" / "model.safetensors")
    argv = {
        "eval": ["eval", "--checkpoint", ckpt, "--data", f"imagefolder:{images}"],
        "predict": ["predict", "--checkpoint", ckpt, str(images / "val" / "cat" / "0.png")],
        "train": ["train", "--pretrained", ckpt, "--data", f"imagefolder:{images}", "--out", str(tmp_path / "r")],
    }[command]
    one_line_error(capsys, argv, f"could not read {ckpt}: truncated or not a safetensors file")


@pytest.mark.parametrize("size", ["0", "-8"])
def test_eval_and_predict_reject_a_size_of_no_pixels(capsys, weights, images, size):
    ckpt = str(weights / "named" / "model.safetensors")
    message = f"--img-size must be a positive number of pixels, got {size}"
    one_line_error(capsys, ["eval", "--checkpoint", ckpt, "--data", f"imagefolder:{images}", "--img-size", size],
                   message)
    one_line_error(capsys, ["predict", "--checkpoint", ckpt, str(images / "val" / "cat" / "0.png"), "--img-size", size],
                   message)


def test_checkpoint_of_another_architecture(capsys, weights, images, tmp_path):
    ckpt = str(weights / "named" / "model.safetensors")
    one_line_error(capsys, ["train", "--model", "cvt_13", "--pretrained", ckpt, "--data", f"imagefolder:{images}",
                            "--out", str(tmp_path / "r")], f"{ckpt} holds another architecture than 'cvt_13'")
    resnet = str(weights / "resnet.pth")
    one_line_error(capsys, ["eval", "--checkpoint", resnet, "--data", f"imagefolder:{images}"], resnet,
                   "not a CvT state dict")


def test_eval_on_data_with_other_classes(capsys, weights, images, tmp_path):
    four = _folder(tmp_path / "four", splits=(("val", 1),), classes=[*CLASSES, "emu"])
    named, anonymous = weights / "named" / "model.safetensors", weights / "anonymous" / "model.safetensors"
    # with class names, the one the checkpoint lacks is named; without, the counts are compared
    one_line_error(capsys, ["eval", "--checkpoint", str(named), "--data", f"imagefolder:{four}"],
                   "has class folder(s) the checkpoint lacks: emu")
    one_line_error(capsys, ["eval", "--checkpoint", str(anonymous), "--data", f"imagefolder:{four}"],
                   "has 3 classes but", "has 4")


def test_unknown_model_suggests_close_names(capsys, tmp_path):
    one_line_error(capsys, ["train", "--model", "cvt_14", "--out", str(tmp_path / "r")],
                   "unknown model 'cvt_14'; did you mean", "cvt_13")


def test_resume_from_a_truncated_checkpoint(capsys, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    state = {"format": "x", "model": {"w": torch.zeros(1000)}}
    torch.save(state, run / "checkpoint.pt")
    data = (run / "checkpoint.pt").read_bytes()
    (run / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    one_line_error(capsys, ["train", "--out", str(run), "--resume"],
                   f"cannot resume from {run}/checkpoint.pt: truncated or not a training checkpoint")


@pytest.mark.parametrize("edit,message", [
    (lambda cfg: cfg.pop("embed_dim"), "lacks the entry 'embed_dim'"),  # was a KeyError traceback
    (lambda cfg: cfg.update(depth=None), "depths must be a list with one entry per stage, got None"),
    (lambda cfg: cfg.update(id2label={"a": "cat"}), "lacks the entry '0'"),
])
def test_hand_edited_hugging_face_config(capsys, weights, images, tmp_path, edit, message):
    model = cvt.create_model("cvt_tiny", num_classes=3, **TINY_ARGS)
    folder = save_weights(model.state_dict(), model.cfg, tmp_path / "hf", fmt="hf", class_names=CLASSES)
    cfg = json.loads((folder / "config.json").read_text())
    edit(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))
    one_line_error(capsys, ["eval", "--checkpoint", str(folder), "--data", f"imagefolder:{images}"],
                   f"{folder}/config.json", message)


@pytest.mark.slow
def test_a_reader_that_goes_away_is_no_traceback():
    """`cvt eval ... | head`: the closed pipe stops the command quietly (exit 141, as SIGPIPE would), no traceback."""
    import subprocess

    script = (
        "import sys, cvt.commands.zoo as zoo\n"
        "from cvt.cli import main\n"
        "zoo.run = lambda args: [print('row', i) for i in range(200000)] and 0\n"
        "sys.exit(main(['zoo']))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline() == b"row 0\n"
    proc.stdout.close()  # the reader leaves after one line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141 and "Traceback" not in err and "Broken pipe" not in err, err
