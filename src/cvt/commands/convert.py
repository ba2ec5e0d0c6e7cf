"""`cvt convert SRC DST`: weights from any supported format to any other.

The destination format follows DST unless `--to` says: a `.safetensors` file -> cvt's own, a `.pth`/`.pt`/`.bin` file ->
the authors', anything else (a folder) -> Hugging Face's `save_pretrained` layout.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="checkpoint file or folder (authors' .pth, Hugging Face folder, cvt .safetensors)")
    parser.add_argument("dst", help="output: NAME.safetensors (cvt), NAME.pth (authors'), or a folder (Hugging Face)")
    parser.add_argument(
        "--to", choices=("cvt", "hf", "authors"), default=None, help="output format (default: from DST)"
    )
    parser.add_argument("--model", default=None, help="registered model name, when SRC carries no config")
    parser.add_argument("--force", action="store_true", help="overwrite DST if it exists")


def _is_cvt_config(path: Path) -> bool:
    try:
        return json.loads(path.read_text()).get("format") == "cvt"
    except (OSError, ValueError, AttributeError):
        return False


def target_format(dst: Path) -> str:
    if dst.suffix == ".safetensors":
        return "cvt"
    if dst.suffix in (".pth", ".pt", ".bin"):
        return "authors"
    return "hf"


def run(args: argparse.Namespace) -> int:
    from ..config import ARCHITECTURE_FIELDS, COMPUTE_FIELDS
    from ..registry import create_model, from_pretrained
    from ..weights import CheckpointError, save_weights

    src, dst = Path(args.src), Path(args.dst)
    fmt = args.to or target_format(dst)
    if dst.exists() and not args.force and (dst.is_file() or any(dst.iterdir())):
        raise FileExistsError(f"{dst} exists; pass --force to overwrite it")
    if src.resolve() == dst.resolve():
        raise ValueError("SRC and DST are the same path")
    beside = dst.parent / "config.json"
    if fmt == "cvt" and beside.is_file() and not args.force and not _is_cvt_config(beside):
        # cvt's .safetensors writes its config.json beside it: another one there (a Hugging Face folder's) would be
        # lost.
        raise FileExistsError(
            f"{beside} belongs to another model (it would be replaced by {dst.name}'s); "
            "write to another folder or pass --force"
        )
    model = create_model(args.model, pretrained=src) if args.model else from_pretrained(src)
    class_names = getattr(model, "class_names", None)
    save_weights(model.state_dict(), model.cfg, dst, fmt=fmt, class_names=class_names)
    print(f"wrote {dst} ({fmt} format, {model.cfg.num_classes} classes)")
    # The authors' format has no config, and Hugging Face's lacks some of ours: say what a reader would get wrong.
    try:
        back = from_pretrained(dst).cfg
    except CheckpointError:  # widths no registered model has
        print(f"cvt convert: warning: {dst} cannot be read back without naming its model and settings "
              "(the authors' format has no config); keep a cvt .safetensors", file=sys.stderr)
        return 0
    lost = [f for f in (*ARCHITECTURE_FIELDS, *COMPUTE_FIELDS) if getattr(back, f) != getattr(model.cfg, f)]
    if lost:
        print(
            f"cvt convert: warning: the {fmt} format cannot carry this model's {', '.join(lost)}: read back, {dst} "
            f"builds {', '.join(f'{f}={getattr(back, f)}' for f in lost)}; pass those settings when loading it, or "
            "keep a cvt .safetensors",
            file=sys.stderr,
        )
    return 0
