"""`cvt data scenes OUT`: write the Fashion-MNIST scenes (`cvt.datasets.scenes`), a detection and segmentation
set in both layouts (`--data coco:OUT` and `--data seg:OUT` read it), from the real items, offline."""

from __future__ import annotations

import argparse
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    scenes = sub.add_parser("scenes", help="write Fashion-MNIST scenes in COCO and segmentation-folder layouts",
                            description="write Fashion-MNIST scenes in COCO and segmentation-folder layouts: "
                            "train canvases from its train split, val canvases from its test split")
    scenes.add_argument("out", help="output folder (refused if not empty, unless --overwrite)")
    scenes.add_argument("--seed", type=int, default=0, help="the scenes are a function of the seed (default 0)")
    scenes.add_argument("--train-images", type=int, default=2000, help="training canvases (default 2000)")
    scenes.add_argument("--val-images", type=int, default=300, help="validation canvases (default 300)")
    scenes.add_argument("--data-dir", default=None,
                        help="folder of the Fashion-MNIST IDX files (default /usr/share/datasets/fashion-mnist)")
    scenes.add_argument("--overwrite", action="store_true",
                        help="replace the scenes in a non-empty OUT (only annotations/, train/, val/, classes.txt)")


def run(args: argparse.Namespace) -> int:
    from ..datasets.scenes import write_scenes

    start = time.perf_counter()
    counts = write_scenes(args.out, fmnist_dir=args.data_dir, seed=args.seed, train_images=args.train_images,
                          val_images=args.val_images, overwrite=args.overwrite)
    seconds = time.perf_counter() - start
    for split, c in counts.items():
        sizes = ", ".join(f"{k} {v}" for k, v in c["sizes"].items())
        print(f"{split}: {c['images']} canvases, {c['objects']} objects ({c['objects'] / c['images']:.2f} a canvas); "
              f"sizes (WxH) {sizes}")
    print(f"wrote {args.out} in {seconds:.1f} s: --data coco:{args.out} (detection) or seg:{args.out} (segmentation)")
    return 0
