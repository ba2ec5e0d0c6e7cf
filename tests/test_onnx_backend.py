"""`cvt predict --backend onnxruntime`: the same answers as PyTorch's, from a model exported once per checkpoint
into the cache folder and reused after that; the refusals and the missing-package line.

One real export for the whole module (the `exported` fixture: several seconds on a busy machine); the tests of the
cache's keying swap the exporter for one that copies that file and counts its calls."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import sys

import pytest
import torch

pytest.importorskip("onnxruntime")

import cvt  # noqa: E402
import cvt.export  # noqa: E402
from conftest import CLASSES, TINY_ARGS, write_image_folder  # noqa: E402
from cvt.cli import main  # noqa: E402
from cvt.weights import save_weights  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _save(path, seed: int):
    torch.manual_seed(seed)
    model = cvt.create_model("cvt_tiny", num_classes=3, **TINY_ARGS)
    with torch.no_grad():
        model.get_classifier().weight.mul_(20)  # probabilities far apart, so the top-k order is the same in both
    save_weights(model.state_dict(), model.cfg, path, class_names=CLASSES)
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A checkpoint, six images and a cache folder of the module's own ($XDG_CACHE_HOME)."""
    root = tmp_path_factory.mktemp("onnx_backend")
    ckpt = _save(root / "run" / "model.safetensors", seed=0)
    images = write_image_folder(root / "images", seed=3, counts={"val": 2}) / "val"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(root / "cache"))
        yield dict(root=root, ckpt=str(ckpt), images=str(images), cache=root / "cache" / "cvt" / "onnx")


def _predict(capsys, env, *extra, ckpt=None, size=28) -> list[dict]:
    rc = main(["predict", "--checkpoint", ckpt or env["ckpt"], env["images"], "--json", "--img-size", str(size),
               *extra])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return json.loads(captured.out)


@pytest.fixture(scope="module")
def exported(env):
    """The first onnxruntime run, which exports into the (empty) cache: its JSON and the cached file."""
    out, threads = io.StringIO(), torch.get_num_threads()
    torch.set_num_threads(1)  # as the tests' one_thread, which a module-scoped fixture runs before
    with contextlib.redirect_stdout(out):
        assert main(["predict", "--checkpoint", env["ckpt"], env["images"], "--json", "--img-size", "28",
                     "--backend", "onnxruntime"]) == 0
    torch.set_num_threads(threads)
    files = list(env["cache"].glob("*.onnx"))
    assert len(files) == 1, files
    return json.loads(out.getvalue()), files[0]


def _same(a: list[dict], b: list[dict]) -> None:
    assert [r["image"] for r in a] == [r["image"] for r in b] and len(a) == 6
    for ra, rb in zip(a, b):
        assert [p["class"] for p in ra["predictions"]] == [p["class"] for p in rb["predictions"]], (ra, rb)
        for pa, pb in zip(ra["predictions"], rb["predictions"]):
            assert pa["probability"] == pytest.approx(pb["probability"], abs=1e-4)


def _no_export(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("exported again instead of using the cached file")

    monkeypatch.setattr(cvt.export, "export_onnx", fail)


def test_onnxruntime_answers_as_torch_does(capsys, env, exported):
    _same(exported[0], _predict(capsys, env))


def test_the_cached_export_is_reused_also_with_tta(capsys, env, exported, monkeypatch):
    _, path = exported
    mtime, entries = path.stat().st_mtime_ns, set(env["cache"].iterdir())
    _no_export(monkeypatch)
    ort_runs = [_predict(capsys, env, "--backend", "onnxruntime", *tta) for tta in ([], ["--tta", "hflip"])]
    _same(ort_runs[0], exported[0])
    _same(ort_runs[1], _predict(capsys, env, "--tta", "hflip"))
    assert ort_runs[1] != ort_runs[0]  # the mirror views changed the probabilities
    assert path.stat().st_mtime_ns == mtime and set(env["cache"].iterdir()) == entries


def test_the_key_is_the_checkpoint_content(capsys, env, exported, monkeypatch):
    """A copy of the checkpoint, or the same weights written again, is the same entry; other weights a new one."""
    _, path = exported
    root = env["root"]
    copy = root / "copy"
    shutil.copytree(root / "run", copy)
    _no_export(monkeypatch)
    _predict(capsys, env, "--backend", "onnxruntime", ckpt=str(copy))
    _save(copy / "model.safetensors", seed=0)  # rewritten: a new mtime, the same content
    _predict(capsys, env, "--backend", "onnxruntime", ckpt=str(copy))

    calls = []

    def copying_export(model, out, img_size=224, opset=None):
        calls.append(out)
        shutil.copyfile(path, out)  # the old graph: these tests check the keying, not the new weights' answers
        return out

    monkeypatch.setattr(cvt.export, "export_onnx", copying_export)
    _save(copy / "model.safetensors", seed=1)
    _predict(capsys, env, "--backend", "onnxruntime", ckpt=str(copy))
    _predict(capsys, env, "--backend", "onnxruntime", ckpt=str(copy))  # and then that entry is reused
    assert len(calls) == 1 and calls[0] != path and calls[0].parent == path.parent
    assert {path, calls[0]} <= set(env["cache"].glob("*.onnx"))
    _predict(capsys, env, "--backend", "onnxruntime", size=32)  # another image side: another entry
    assert len(calls) == 2 and calls[1] not in (path, calls[0])


def one_line_error(capsys, argv: list[str], needle: str) -> None:
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("cvt predict: error: "), err
    assert needle in lines[0], lines[0]


def test_without_onnxruntime_one_line_says_what_to_install(capsys, env, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ModuleNotFoundError
    _no_export(monkeypatch)
    one_line_error(capsys, ["predict", "--checkpoint", env["ckpt"], env["images"], "--backend", "onnxruntime"],
                   "pip install 'cvt[onnx]'")


def test_refusals_are_one_line(capsys, env, tmp_path):
    argv = ["predict", env["images"], "--backend", "onnxruntime"]
    one_line_error(capsys, [*argv, "--checkpoint", env["ckpt"], "--device", "cuda"], "runs on the CPU")
    dense = tmp_path / "det"
    dense.mkdir()
    (dense / "config.json").write_text(json.dumps({"task": "detection"}))
    one_line_error(capsys, [*argv, "--checkpoint", str(dense)], "runs classifiers only")
