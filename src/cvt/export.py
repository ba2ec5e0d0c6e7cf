"""Export a CvT for deployment: ONNX (dynamic batch, height and width) or TorchScript.

The model is exported in eval mode, where each BatchNorm is already folded into its depthwise convolution, so
the exported graph is the inference graph. `export(checkpoint, out, format)` is what `cvt export` runs.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import nn

from .utils import atomic_write

FORMATS = ("onnx", "torchscript")


def _example(model: nn.Module, img_size: int, batch: int = 2) -> torch.Tensor:
    param = next(model.parameters())
    return torch.randn(batch, model.cfg.in_chans, img_size, img_size, device=param.device, dtype=param.dtype)


def export_onnx(model: nn.Module, path: str | os.PathLike, img_size: int = 224, opset: int | None = None) -> Path:
    """Write `model` (eval mode) as one ONNX file with input `images` `(batch, C, height, width)` and output
    `logits` (or the backbone's maps `map0`, `map1`, ...), batch, height and width all dynamic."""
    path = Path(path)
    model = model.eval()
    x = _example(model, img_size)
    Dim, side = torch.export.Dim, model.min_input_size()
    dims = {
        0: Dim("batch", min=1, max=1 << 16),
        2: Dim("height", min=side, max=1 << 14),
        3: Dim("width", min=side, max=1 << 14),
    }
    outputs = [f"map{i}" for i in range(len(model.out_indices))] if model.features_only else ["logits"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's progress chatter and deprecation notes
        program = torch.onnx.export(
            model,
            (x,),
            dynamo=True,
            input_names=["images"],
            output_names=outputs,
            dynamic_shapes={"x": dims},
            opset_version=opset,
            verbose=False,
        )
    atomic_write(path, lambda p: program.save(str(p), external_data=False))  # --force never leaves half a file
    return path


def export_torchscript(model: nn.Module, path: str | os.PathLike, img_size: int = 224) -> Path:
    """Write `model` (eval mode) traced to TorchScript; it runs at any batch size and image size."""
    path = Path(path)
    model = model.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, (_example(model, img_size),), check_trace=False)
    atomic_write(path, lambda p: traced.save(str(p)))
    return path


def export(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    fmt: str = "onnx",
    img_size: int = 224,
    opset: int | None = None,
) -> Path:
    """Load `checkpoint` (any format `cvt.from_pretrained` reads) and export it as `fmt`."""
    from .registry import from_pretrained

    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    model = from_pretrained(checkpoint).eval()
    if img_size < model.min_input_size():
        raise ValueError(f"--img-size {img_size} is below this model's minimum input of {model.min_input_size()} px")
    if fmt == "onnx":
        return export_onnx(model, out, img_size, opset)
    return export_torchscript(model, out, img_size)
