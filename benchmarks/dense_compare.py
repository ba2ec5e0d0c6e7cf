"""CvT against ResNet-18 as the backbone of the same detector and the same segmenter (issue 22), on the scenes.

    python benchmarks/dense_compare.py                       # both tasks, both backbones, then the JSON
    python benchmarks/dense_compare.py --tasks detection     # one task
    python benchmarks/dense_compare.py --dry-run             # print the `cvt train` commands only

Each pair shares everything but the backbone: the head and its widths, the input size, the recipe (optimizer,
learning rate, warm-up, clipping, augmentation, seed) and the number of training images seen (epochs x steps x
batch). Backbones train from scratch. Each run is an ordinary `cvt train` run folder under `--runs`; a run whose
folder exists but has no summary.json is resumed (`--resume`), a finished one is read as it is, so the script can be
stopped and started again. The figures (scores, training seconds and images/s as each run's summary.json counts
them, parameters, the machine) go to `--json`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from harness import cvt_cli, machine_info

# A CvT-13 cut to the scale of 100 px scenes: the three stages at strides 4/8/16 that make the P2-P6 pyramid,
# narrower and shallower (CvT-13 is 64/192/384 wide, 1/2/10 deep).
SMALL_CVT = "{embed_dims: [32, 96, 192], depths: [1, 1, 2], num_heads: [1, 2, 3]}"
# Stage 3 at CvT-13's width and twice its small depth: the stride-16 stage, where tokens are few, holds the extra
# parameters (still fewer than ResNet-18's), so a step costs little more than the small one's.
WIDE_CVT = "{embed_dims: [32, 96, 384], depths: [1, 1, 4], num_heads: [1, 2, 6]}"
BACKBONES = {
    "cvt": ["--model", "cvt_13", "--set", f"model_args={SMALL_CVT}"],
    "cvt_wide": ["--model", "cvt_13", "--set", f"model_args={WIDE_CVT}"],
    "resnet18": ["--model", "timm:resnet18"],
}
# One recipe a task, the same for both backbones; sized so that ResNet-18 (the slower of the two here) trains in
# under 15 minutes on two CPU cores.
TASKS = {
    "detection": dict(
        data="coco:{scenes}",
        args=["--batch-size", "8", "--epochs", "3", "--set", "steps_per_epoch=250", "--lr", "1e-3",
              "--warmup-epochs", "0.3", "--clip-grad", "5"],
        score="val_box_map",
        scores=["final_box_map", "final_box_map_50", "final_box_map_75", "final_box_map_small",
                "final_box_map_medium", "final_box_map_large"],
    ),
    "segmentation": dict(
        data="seg:{scenes}",
        args=["--set", "head=upernet", "--img-size", "128", "--batch-size", "16", "--epochs", "5",
              "--set", "steps_per_epoch=125", "--lr", "1e-3",
              "--warmup-epochs", "0.5", "--clip-grad", "5"],
        score="val_miou",
        scores=["final_miou", "final_pixel_acc"],
    ),
}


def command(task: str, backbone: str, scenes: Path, out: Path, resume: bool) -> list[str]:
    spec = TASKS[task]
    cmd = ["cvt", "train", "--data", spec["data"].format(scenes=scenes), *BACKBONES[backbone], *spec["args"],
           "--seed", "0", "--out", str(out)]
    return [*cmd, "--resume"] if resume else cmd


def backbone_params(backbone: str) -> int:
    """Parameters of the backbone alone (features_only: its classifier left out), as each head receives it."""
    import timm

    import cvt

    if backbone.startswith("cvt"):
        import yaml

        args = yaml.safe_load(SMALL_CVT if backbone == "cvt" else WIDE_CVT)
        model = cvt.create_model("cvt_13", features_only=True, **args)
    else:
        model = timm.create_model("resnet18", features_only=True, pretrained=False)
    return sum(p.numel() for p in model.parameters())


def markdown(results: dict) -> str:
    """The comparison as a Markdown table, one row a run."""
    lines = ["| task | backbone | backbone params | model params | images seen | training s | images/s | scores |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for key, r in results["runs"].items():
        task, backbone = key.split("/")
        scores = ", ".join(f"{k.removeprefix('final_')} {v:.4g}" for k, v in r.items()
                           if k.startswith("final_") and v is not None)
        lines.append(f"| {task} | {backbone} | {r['backbone_params']:,} | {r['params']:,} | {r['images_seen']:,} | "
                     f"{r['train_seconds']:.0f} | {r['images_per_s']:.1f} | {scores} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenes", type=Path, default=Path("data/scenes"), help="`cvt data scenes` output")
    p.add_argument("--runs", type=Path, default=Path("runs/dense_compare"), help="folder of the run folders")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--backbones", nargs="+", default=["cvt", "resnet18"], choices=list(BACKBONES))
    p.add_argument("--json", type=Path, default=Path("benchmarks/results/issue22/dense_compare.json"))
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--markdown", action="store_true", help="print the JSON's table as Markdown, run nothing")
    args = p.parse_args(argv)

    if not args.dry_run and not (args.scenes / "annotations").is_dir():
        print(f"dense_compare: no scenes at {args.scenes}; run `cvt data scenes {args.scenes}` first", file=sys.stderr)
        return 2
    results = json.loads(args.json.read_text()) if args.json.exists() else {}
    if args.markdown:
        print(markdown(results))
        return 0
    results.setdefault("runs", {})
    for task in args.tasks:
        for backbone in args.backbones:
            out = args.runs / f"{task}_{backbone}"
            summary = out / "summary.json"
            if not summary.exists():
                cmd = command(task, backbone, args.scenes, out, resume=(out / "checkpoint.pt").exists())
                print("+", shlex.join(cmd), flush=True)
                if args.dry_run:
                    continue
                started = time.time()
                rc = subprocess.call(cvt_cli(cmd), env={**os.environ, "PYTHONUNBUFFERED": "1"})
                if rc != 0:
                    print(f"dense_compare: {task}/{backbone} failed (exit {rc}); rerun to resume", file=sys.stderr)
                    return rc
                print(f"dense_compare: {task}/{backbone} done in {time.time() - started:.0f} s", flush=True)
            elif args.dry_run:
                print(f"# {out} finished", flush=True)
                continue
            s = json.loads(summary.read_text())
            results["runs"][f"{task}/{backbone}"] = dict(
                command=shlex.join(command(task, backbone, args.scenes, out, resume=False)),
                params=s["params"], backbone_params=backbone_params(backbone), train_seconds=s["train_seconds"],
                images_per_s=s["images_per_s"],
                images_seen=s["config"]["epochs"] * s["config"]["steps_per_epoch"] * s["config"]["batch_size"],
                **{k: s.get(k) for k in TASKS[task]["scores"]},
                per_class=s.get("per_class_box_ap") or s.get("per_class_iou"),
                epochs=[{k: row.get(k) for k in ("epoch", "images_per_s", "seconds", TASKS[task]["score"])}
                        for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())],
            )
    if args.dry_run:
        return 0
    results["machine"] = machine_info(torch.device("cpu"))
    results["date"] = time.strftime("%Y-%m-%d")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
