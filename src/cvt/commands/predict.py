"""`cvt predict`: the top-k classes of each image, with probabilities; class names come with the checkpoint.

    cvt predict --checkpoint runs/demo/model.safetensors shirt.png boot.jpg
    cvt predict --checkpoint runs/demo --json photos/          # a folder: every image in it

A dense-prediction run answers with its task's output (`Task.predict_files`; detection: boxes x1, y1, x2, y2 in
the image's pixels, class names, scores, masks as COCO RLE with --json); --save DIR draws them on each image:

    cvt predict --checkpoint runs/det scene.png --json --save drawn/

An unreadable file gets an error line and the others are still answered (exit status 1 when any failed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="weights in any format (cvt, Hugging Face, authors')")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders of images")
    parser.add_argument("--top-k", type=int, default=5, help="classes to show per image (default 5)")
    parser.add_argument("--img-size", type=int, help="input side (default: what the checkpoint was trained at)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--tta", default="none", choices=("none", "hflip"),
                        help="test-time augmentation: hflip averages the image's and its mirror's probabilities")
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout")
    parser.add_argument("--save", metavar="DIR", help="dense runs: write each image with its predictions drawn here")
    parser.add_argument("--score-threshold", type=float, default=0.5,
                        help="dense runs: keep detections scoring at least this (default 0.5)")


def _expand(paths: list[str]) -> list[str]:
    from ..data import IMAGE_EXTENSIONS

    out = []
    for p in paths:
        if os.path.isdir(p):
            for dirpath, dirnames, files in os.walk(p):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                out += [os.path.join(dirpath, f) for f in sorted(files)
                        if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
        else:
            out.append(p)
    return out


def run(args: argparse.Namespace) -> int:
    import torch

    from ..data import BatchTransform, file_transform, open_image, preprocess_for
    from ..engine import pick_device
    from ..tasks.classification import log_probs
    from . import dense_task, load_classifier

    if args.top_k < 1 or args.batch_size < 1:
        raise ValueError("--top-k and --batch-size must be >= 1")
    device = pick_device(args.device)
    task = dense_task(args.checkpoint)
    if task is not None:
        return _run_dense(task, args, device)
    if args.save:
        raise ValueError("--save draws a dense run's predictions; a classifier has none to draw")
    model = load_classifier(args.checkpoint, device, "predict")
    names = model.class_names if model.class_names and len(model.class_names) == model.num_classes else None
    names = names or [str(i) for i in range(model.num_classes)]
    pre = preprocess_for(args.checkpoint, model.cfg.in_chans, args.img_size, 224)
    to_tensor, to_model = file_transform(pre, train=False), BatchTransform(pre)
    k = min(args.top_k, model.num_classes)

    paths = _expand(args.images)
    if not paths:
        raise ValueError(f"no images found in {', '.join(args.images)}")
    results: dict[str, dict] = {}
    ready: list[tuple[str, torch.Tensor]] = []

    def flush() -> None:
        if not ready:
            return
        x = torch.stack([t for _, t in ready]).to(device)
        with torch.no_grad():
            probs = log_probs(model, to_model(x), args.tta).exp()
        top = probs.topk(k, dim=-1)
        for (path, _), p, i in zip(ready, top.values.tolist(), top.indices.tolist()):
            results[path] = {"image": path, "predictions": [
                {"class": names[c], "index": c, "probability": round(q, 6)} for q, c in zip(p, i)]}
        ready.clear()

    for path in paths:
        try:
            if not Path(path).is_file():
                raise FileNotFoundError("no such file")
            ready.append((path, to_tensor(open_image(path, pre.in_chans))))
        except Exception as e:  # noqa: BLE001 - one bad file must not stop the others
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            results[path] = {"image": path, "error": f"{type(e).__name__}: {reason}"}
            print(f"cvt predict: error: {path}: {reason}", file=sys.stderr)
        if len(ready) >= args.batch_size:
            flush()
    flush()

    ordered = [results[p] for p in paths]
    if args.json:
        print(json.dumps(ordered, indent=2))
    else:
        for r in ordered:
            if "predictions" in r:
                tops = ", ".join(f"{p['class']} {p['probability'] * 100:.1f}%" for p in r["predictions"])
                print(f"{r['image']}: {tops}")
    return 1 if any("error" in r for r in ordered) else 0


def _run_dense(task, args: argparse.Namespace, device) -> int:
    """A dense task's predictions (`task.predict_files`), one JSON document or a line per image."""
    model, settings = task.load_for_inference(args.checkpoint, device)
    paths = _expand(args.images)
    if not paths:
        raise ValueError(f"no images found in {', '.join(args.images)}")
    records = task.predict_files(model, settings, paths, device=device, score_threshold=args.score_threshold,
                                 save_dir=Path(args.save) if args.save else None)
    for r in records:
        if "error" in r:
            print(f"cvt predict: error: {r['image']}: {r['error']}", file=sys.stderr)
    if args.json:
        print(json.dumps(records, indent=2))
    else:
        for r in records:
            if "error" not in r:
                print(task.format_prediction(r))
    return 1 if any("error" in r for r in records) else 0
