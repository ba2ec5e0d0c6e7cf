"""`cvt export`: the ONNX file runs in ONNX Runtime and matches PyTorch at other batch sizes and image sizes than the
one it was traced with (dynamic batch, height and width); the TorchScript file does too."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import cvt
from cvt.cli import main

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

# (batch, height, width): two batch sizes and two image sizes, none of them the traced 32x32 at batch 2
CASES = [(1, 32, 32), (3, 32, 32), (1, 40, 56), (3, 40, 56)]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = cvt.create_model("cvt_tiny")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # BatchNorm statistics that are not the identity, so the folded convolution matters
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.5 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
                m.weight.copy_(1 + 0.2 * torch.randn(m.num_features, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.num_features, generator=g))
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    cvt.save_weights(model.state_dict(), model.cfg, path)
    return path


@pytest.fixture(scope="module")
def reference(checkpoint):
    return cvt.from_pretrained(checkpoint).eval()


@pytest.fixture(scope="module")
def onnx_file(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    assert main(["export", "--format", "onnx", "--img-size", "32", str(checkpoint), str(out)]) == 0
    return out


@pytest.mark.parametrize("batch,height,width", CASES)
def test_onnx_matches_pytorch(onnx_file, reference, batch, height, width):
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    x = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(batch * height))
    (got,) = session.run(None, {"images": x.numpy()})
    with torch.no_grad():
        expected = reference(x)
    assert got.shape == (batch, 10)
    assert abs(torch.from_numpy(got) - expected).max().item() <= 1e-4


def test_onnx_declares_dynamic_axes(onnx_file):
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert inp.name == "images" and inp.shape == ["batch", 3, "height", "width"]
    assert out.name == "logits" and out.shape == ["batch", 10]


def test_torchscript_matches_pytorch(checkpoint, reference, tmp_path):
    out = tmp_path / "tiny.pt"
    assert main(["export", str(checkpoint), str(out)]) == 0  # format from the suffix: not .onnx -> torchscript
    traced = torch.jit.load(str(out))
    for batch, height, width in CASES[::3]:
        x = torch.randn(batch, 3, height, width)
        with torch.no_grad():
            assert abs(traced(x) - reference(x)).max().item() <= 1e-5


def test_export_refuses_to_overwrite_and_bad_sizes(checkpoint, tmp_path, capsys):
    out = tmp_path / "exists.onnx"
    out.write_text("keep me")
    assert main(["export", str(checkpoint), str(out)]) == 2
    assert "--force" in capsys.readouterr().err and out.read_text() == "keep me"
    assert main(["export", "--img-size", "0", str(checkpoint), str(tmp_path / "m.pt")]) == 2
    assert "minimum input" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "missing.safetensors"), str(tmp_path / "m.pt")]) == 2
