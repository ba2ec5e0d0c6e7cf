"""`cvt eval`: top-1, top-5, per-class accuracy and the confusion matrix of a checkpoint on a validation split;
for a dense-prediction run (detection: COCO box/mask AP), the metrics of its task (`Task.evaluate_files`).

    cvt eval --checkpoint runs/demo/model.safetensors                    # Fashion-MNIST's 10,000 test images
    cvt eval --checkpoint CvT-13-224x224-IN-1k.pth --data imagefolder:/data/imagenet
    cvt eval --checkpoint runs/fmnist_cpu80 --tta hflip                # mean over each image and its mirror
    cvt eval --checkpoint runs/det --data coco:data/scenes              # COCO AP on PATH's val split
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="weights in any format (cvt, Hugging Face, authors')")
    parser.add_argument("--data", help="fashion-mnist (test split, the default for classifiers), "
                        "imagefolder:PATH (PATH/val), or a dense run's coco:PATH / seg:PATH (default: the run's)")
    parser.add_argument("--data-dir", help="folder of the four Fashion-MNIST .gz files")
    parser.add_argument("--img-size", type=int, help="evaluation side (default: what the checkpoint was trained at)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--amp", default="auto", choices=("auto", "none", "bf16", "fp16"))
    parser.add_argument("--num-workers", type=int, help="DataLoader workers")
    parser.add_argument("--tta", default="none", choices=("none", "hflip"),
                        help="test-time augmentation: hflip averages each image's and its mirror's probabilities "
                             "(two forward passes; default none, the single-view figure)")
    parser.add_argument("--out", help="folder for eval.json and confusion_matrix.png (default: beside the "
                             "checkpoint, in eval/, or eval_hflip/ with --tta hflip)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    from ..data import BatchTransform, build_data, data_info, preprocess_for
    from ..engine import amp_dtype, pick_device
    from ..plots import plot_confusion
    from ..tasks.classification import evaluate, input_channels
    from ..utils import atomic_write
    from . import dense_task, load_classifier

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    device = pick_device(args.device)
    task = dense_task(args.checkpoint)
    if task is not None:
        return _run_dense(task, args, device)
    args.data = args.data or "fashion-mnist"
    model = load_classifier(args.checkpoint, device, "evaluate")
    _, native = data_info(args.data)
    pre = preprocess_for(args.checkpoint, input_channels(model), args.img_size, native or 224)
    names = model.class_names
    if names is not None and len(names) != model.num_classes:
        names = None
    data = build_data(args.data, pre, data_dir=args.data_dir, train=False, eval_batch_size=args.batch_size,
                      num_workers=args.num_workers, device=device, classes=names)
    if len(data.classes) != model.num_classes:
        raise ValueError(
            f"{args.checkpoint} has {model.num_classes} classes but {args.data} has {len(data.classes)}: "
            "evaluate on the data it was trained for"
        )
    classes = names or data.classes
    result = evaluate(model, data.val, BatchTransform(pre), device, model.num_classes, amp_dtype(args.amp, device),
                      tta=args.tta)
    for err in result.skipped:
        print(f"cvt eval: warning: skipped unreadable image {err}", file=sys.stderr)

    ckpt = Path(args.checkpoint)
    out = Path(args.out) if args.out else (ckpt if ckpt.is_dir() else ckpt.parent) / (
        "eval" if args.tta == "none" else f"eval_{args.tta}")  # a TTA report beside the single-view one, not over it
    report = {
        "checkpoint": str(args.checkpoint), "data": args.data, "images": result.count, "img_size": pre.img_size,
        "tta": args.tta,
        "top1": round(result.top1, 3), "top5": round(result.top5, 3), "loss": round(result.loss, 5),
        "per_class_top1": {c: round(a, 2) for c, a in zip(classes, result.per_class)},
        "confusion": result.confusion.tolist(), "classes": classes, "skipped_files": len(result.skipped),
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "eval.json", lambda p: p.write_text(json.dumps(report, indent=2)))
    png = plot_confusion(result.confusion, classes, out / "confusion_matrix.png",
                         f"top-1 {result.top1:.2f}% on {result.count} images")
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    views = " and their mirror images (--tta hflip)" if args.tta == "hflip" else ""
    print(f"{args.checkpoint} on {args.data}: {result.count} images at {pre.img_size} px{views}")
    print(f"top-1 {result.top1:.2f}%   top-5 {result.top5:.2f}%   loss {result.loss:.4f}")
    width = max(len(c) for c in classes)
    print("\nper-class top-1:")
    for c, a in zip(classes, result.per_class):
        print(f"  {c:<{width}}  {a:6.2f}%")
    if len(classes) <= 20:
        print("\nconfusion matrix (rows: true class, columns: predicted):")
        cell = max(5, len(str(int(result.confusion.max()))) + 1)
        print(" " * (width + 6) + "".join(f"{i:>{cell}}" for i in range(len(classes))))
        for i, c in enumerate(classes):
            print(f"  {i:>2}  {c:<{width}}" + "".join(f"{int(v):>{cell}}" for v in result.confusion[i]))
    print(f"\nwrote {out / 'eval.json'} and {png}")
    return 0


def _run_dense(task, args: argparse.Namespace, device) -> int:
    """A dense task's evaluation (`task.evaluate_files`), printed as a table and written to RUN/eval/eval.json."""
    from ..engine import amp_dtype
    from ..utils import atomic_write

    model, settings = task.load_for_inference(args.checkpoint, device)
    data = args.data or _run_data(args.checkpoint)
    ckpt = Path(args.checkpoint)
    out = Path(args.out) if args.out else (ckpt if ckpt.is_dir() else ckpt.parent) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    report = task.evaluate_files(model, settings, data=data, device=device, dtype=amp_dtype(args.amp, device),
                                 batch_size=args.batch_size, num_workers=args.num_workers, out=out)
    for err in report.get("skipped", []):
        print(f"cvt eval: warning: skipped unreadable image {err}", file=sys.stderr)
    table = report.pop("table")
    report = {"checkpoint": str(args.checkpoint), "data": data, **report}
    atomic_write(out / "eval.json", lambda p: p.write_text(json.dumps(report, indent=2)))
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{args.checkpoint} on {data}: {report.get('images', '?')} images ({task.name})")
    width = max((len(name) for name, _ in table), default=0)
    for name, value in table:
        shown = "n/a" if value is None else (f"{value:.4f}" if isinstance(value, float) else str(value))
        print(f"  {name:<{width}}  {shown:>8}")
    print(f"\nwrote {', '.join(map(str, [out / 'eval.json', *report.get('figures', [])]))}")
    return 0


def _run_data(checkpoint: str) -> str:
    """The data a run trained on (its recipe.yaml), for `cvt eval --checkpoint RUN` without --data."""
    from ..recipe import read_yaml

    ckpt = Path(checkpoint)
    recipe = (ckpt if ckpt.is_dir() else ckpt.parent) / "recipe.yaml"
    try:
        data = read_yaml(recipe.read_text()).get("data")
    except (OSError, ValueError, AttributeError):
        data = None
    if not isinstance(data, str):
        raise ValueError(f"--data is needed: no recipe.yaml beside {checkpoint} says what the run trained on")
    return data
