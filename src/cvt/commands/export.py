"""`cvt export --format onnx|torchscript CHECKPOINT OUT`: a checkpoint as a deployable file.

ONNX: input `images` (batch, C, height, width) with batch, height and width dynamic; output `logits`.
TorchScript: a traced module (`torch.jit.load(OUT)`), any batch and image size.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint", help="checkpoint file or folder (cvt .safetensors, Hugging Face folder, authors' .pth)"
    )
    parser.add_argument("out", help="output file (e.g. model.onnx or model.pt)")
    parser.add_argument(
        "--format", choices=("onnx", "torchscript"), default=None,
        help="default: from OUT's suffix (.onnx -> onnx, else torchscript)",
    )
    parser.add_argument(
        "--img-size", type=int, default=224, help="side of the example input used to trace the model (default 224)"
    )
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    parser.add_argument("--force", action="store_true", help="overwrite OUT if it exists")


def run(args: argparse.Namespace) -> int:
    from ..export import export

    out = Path(args.out)
    fmt = args.format or ("onnx" if out.suffix == ".onnx" else "torchscript")
    if out.exists() and not args.force:
        raise FileExistsError(f"{out} exists; pass --force to overwrite it")
    if fmt != "onnx" and args.opset is not None:
        raise ValueError("--opset applies to --format onnx only")
    path = export(args.checkpoint, out, fmt, img_size=args.img_size, opset=args.opset)
    size = path.stat().st_size / 1e6
    extra = " (dynamic batch, height and width)" if fmt == "onnx" else ""
    print(f"wrote {path} ({fmt}, {size:.1f} MB){extra}")
    return 0
