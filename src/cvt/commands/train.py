"""`cvt train`: a thin layer over `cvt.engine.fit`. Settings: TrainConfig defaults < --config recipe < flags.

    cvt train --config configs/fashion_mnist_demo.yaml --out runs/demo
    torchrun --nproc_per_node 2 -m cvt.cli train --config ...      # DistributedDataParallel, same global batch
    cvt train --out runs/demo --resume                              # continue runs/demo/checkpoint.pt
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

# flag -> TrainConfig field (the flags every user reaches for; --set KEY=VALUE reaches every other field)
FLAGS: list[tuple[str, str, Any, str]] = [
    ("--data", "data", str,
     "fashion-mnist (default) or imagefolder:PATH with PATH/train/<class>/*, PATH/val/<class>/*"),
    ("--data-dir", "data_dir", str,
     "folder of the four Fashion-MNIST .gz files (default: /usr/share/datasets/fashion-mnist)"),
    ("--model", "model", str, "a model from `cvt zoo` (default cvt_tiny, or the --pretrained checkpoint's), or "
     "timm:NAME for a timm classifier (model_args: its keyword arguments)"),
    ("--pretrained", "pretrained", str,
     "start from these weights (authors' .pth, Hugging Face folder, cvt .safetensors)"),
    ("--epochs", "epochs", int, "epochs to train"),
    ("--batch-size", "batch_size", int, "images per optimizer step, over all processes"),
    ("--accum-steps", "accum_steps", int, "gradient accumulation steps per optimizer step"),
    ("--img-size", "img_size", int, "training/eval image side (default: 28 for Fashion-MNIST, else the model's)"),
    ("--lr", "lr", float, "peak learning rate"),
    ("--weight-decay", "weight_decay", float, "AdamW weight decay (never on norms, biases, cls token)"),
    ("--warmup-epochs", "warmup_epochs", float, "linear warm-up epochs"),
    ("--ema-decay", "ema_decay", float, "EMA of the weights (0: off)"),
    ("--clip-grad", "clip_grad", float, "clip the global gradient norm to this"),
    ("--amp", "amp", str, "mixed precision: auto, none, bf16, fp16 (auto: bf16 on CUDA, none on CPU)"),
    ("--seed", "seed", int, "random seed (data order, augmentation, initialisation)"),
    ("--device", "device", str, "cpu, cuda or cuda:N (default: cuda when available)"),
    ("--num-workers", "num_workers", int,
     "DataLoader workers per process (default: 0 for Fashion-MNIST, else a share of the CPUs)"),
    ("--eval-every", "eval_every", int, "evaluate every N epochs (the last always)"),
    ("--checkpoint-minutes", "checkpoint_minutes", float,
     "also checkpoint within an epoch every N minutes (default 30; 0: at epoch ends only)"),
    ("--time-budget", "time_budget", str,
     "wall-clock time the run may take (e.g. 9m, 540s, 1h30m): the schedule is fitted to the steps that end, "
     "evaluation included, inside it (at most --epochs)"),
    ("--out", "out", str, "run folder (default runs/train)"),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="YAML", help="a recipe from configs/ (flags override it)")
    for flag, name, kind, help_text in FLAGS:
        parser.add_argument(flag, dest=name, type=kind, default=None, help=help_text)
    parser.add_argument("--compile", dest="compile", action="store_const", const=True, default=None,
                        help="torch.compile the model")
    parser.add_argument("--grad-checkpointing", dest="grad_checkpointing", action="store_const", const=True,
                        default=None, help="recompute activations in backward to save memory")
    parser.add_argument("--strict-data", dest="strict_data", action="store_const", const=True, default=None,
                        help="an unreadable image is an error (default: skipped, counted in summary.json)")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                        help="any other recipe setting, value in YAML (e.g. --set mixup=0.8, "
                             "--set model_args.drop_path_rate=0.1); repeatable")
    parser.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                        help="continue a run: its checkpoint.pt or run folder (no value: the --out folder)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start a new run in an --out folder that already holds one (its files are replaced)")


def parse_settings(items: list[str]) -> dict[str, Any]:
    import yaml

    from ..recipe import read_yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set takes KEY=VALUE, got {item!r}")
        try:
            value = read_yaml(raw) if raw else None
        except yaml.YAMLError:
            raise ValueError(f"--set {key}: cannot read {raw!r} as a YAML value") from None
        if key.startswith("model_args."):
            if not isinstance(out.setdefault("model_args", {}), dict):
                raise ValueError(f"--set {key}: model_args was set to {out['model_args']!r}, not a mapping, before it")
            out["model_args"][key.split(".", 1)[1]] = value
        else:
            out[key] = value
    return out


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time of each record: `main` may run many times in one process
    (tests, notebooks) with sys.stderr replaced in between, and a handler holding an old stream would write where
    nobody reads, or fail on a closed one."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass  # StreamHandler.__init__ sets it; the property above always answers


def setup_logging() -> None:
    """Log lines to stderr; under torchrun only rank 0 says more than warnings."""
    logger = logging.getLogger("cvt")
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING)


RUN_FILES = ("checkpoint.pt", "summary.json", "model.safetensors")  # what makes a folder hold a run


def _refuse_to_replace_a_run(out: Path, overwrite: bool) -> None:
    """A new run into a folder holding one would replace its weights and checkpoint epoch by epoch: refuse unless
    --overwrite says so (a forgotten --resume must not cost a run)."""
    found = [name for name in RUN_FILES if (out / name).exists()]
    if not found:
        return
    if not overwrite:
        raise FileExistsError(
            f"{out} already holds a run ({', '.join(found)}); continue it with --resume, "
            "start over in it with --overwrite, or pick another --out"
        )
    # With --overwrite nothing is removed here: `fit` clears the old run's summary and best weights only once the
    # new run's model and data are built, so a mistyped model or data path costs nothing.


def run(args: argparse.Namespace) -> int:
    from ..engine import Interrupted, fit, load_state
    from ..recipe import TrainConfig, build_config, load_recipe
    from ..tasks import get_task

    setup_logging()
    flags = {name: getattr(args, name) for _, name, _, _ in FLAGS if getattr(args, name) is not None}
    for name in ("compile", "grad_checkpointing", "strict_data"):
        if getattr(args, name):
            flags[name] = True
    settings = parse_settings(args.settings)
    recipe = load_recipe(args.config) if args.config else {}
    base, resume = None, None
    if args.resume:
        out = flags.get("out") or settings.get("out") or recipe.get("out") or TrainConfig.out
        if not isinstance(out, (str, os.PathLike)):
            raise ValueError(f"out must be a folder path, got {out!r}")
        resume = out if args.resume is True else args.resume
        state, state_path = load_state(resume)
        base = dict(state["config"])
        # Runs from before ema_warmup was a setting had timm's EMA warm-up always on: they resume as they began.
        base.setdefault("ema_warmup", True)
        # and runs from before tasks were classification (their data implies it; this says it whatever the data)
        base.setdefault("task", state.get("task", "classification"))
        if args.resume is not True and "out" not in flags and "out" not in settings:
            # The run continues where its checkpoint is (a copied or moved run folder), not in the folder it was
            # first written to, which the checkpoint names and a recipe may name too.
            flags["out"] = str(Path(state_path).parent)
    cfg = build_config(base, recipe, settings, flags)
    if not args.resume:
        _refuse_to_replace_a_run(Path(cfg.out), args.overwrite)
    try:
        summary = fit(cfg, resume=resume, progress=True)
    except Interrupted as e:
        print(f"cvt train: {e}", file=sys.stderr)
        return 128 + int(e.signum)
    if os.environ.get("RANK", "0") == "0":
        print(
            f"{summary['model']}: {get_task(summary['task']).headline(summary)}; {summary['train_seconds']:.0f} s "
            f"training, {summary['images_per_s']:.0f} images/s; run folder {cfg.out}"
        )
        if summary["skipped_files"]:
            print(f"skipped {summary['skipped_files']} unreadable file(s); listed in {cfg.out}/summary.json")
    return 0
