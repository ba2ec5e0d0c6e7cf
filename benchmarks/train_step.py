"""The demo's training step, timed and profiled: python benchmarks/train_step.py [--compile] [--profile].

The demo recipe's model (cvt_tiny) on 1-channel images at its side (28 px), 10 classes, with its loss (label
smoothing) and the training loop's AdamW (`cvt.engine.build_optimizer`) at its lr and weight decay, all read from
configs/fashion_mnist_demo.yaml, at each `--batches` size: images/s as the median (and range) of `--pairs` rounds
that alternate between the variants (eager; with --compile torch.compile'd, whose compile time is reported apart;
with --quick-gelu the model with the authors' QuickGELU, run by the `quick_gelu_as_silu` fast path, in place of
cvt_tiny's exact GELU). `--profile` prints torch.profiler's table of where one eager step's time goes. Figures
quoted in RESULTS.md ("The demo's training step") come from this script, with the machine it prints.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import cvt
from cvt.engine import build_optimizer
from cvt.layers.config import fast_path_origin
from cvt.recipe import build_config, load_recipe
from harness import cpu_model, speedup, time_per_call

DEMO = build_config(load_recipe(Path(__file__).resolve().parent.parent / "configs" / "fashion_mnist_demo.yaml"))


def step_fn(batch: int, compiled: bool, act: str = "gelu", seed: int = 0):
    torch.manual_seed(seed)
    model = cvt.create_model(DEMO.model, in_chans=1, num_classes=10, act=act).train()
    opt = build_optimizer(model, lr=DEMO.lr, weight_decay=DEMO.weight_decay)
    net = torch.compile(model, dynamic=False) if compiled else model
    x = torch.randn(batch, 1, DEMO.img_size, DEMO.img_size)
    y = torch.randint(0, 10, (batch,))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y, label_smoothing=DEMO.label_smoothing).backward()
        opt.step()

    return step


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=lambda s: [int(v) for v in s.split(",")], default=[128])
    p.add_argument("--pairs", type=int, default=5)
    p.add_argument("--min-time", type=float, default=2.0)
    p.add_argument("--compile", action="store_true", help="also time the torch.compile'd step")
    p.add_argument("--quick-gelu", action="store_true", help="also time the model with QuickGELU for exact GELU")
    p.add_argument("--profile", action="store_true", help="print where an eager step's time goes")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    given = sys.argv[1:] if argv is None else argv
    cpu = torch.device("cpu")
    out = {"cpu": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__,
           "fast_paths": fast_path_origin(), "command": " ".join(["python benchmarks/train_step.py", *given]),
           "rows": {}}
    print(f"{out['cpu']}, {out['threads']} threads, torch {out['torch']}; fast paths: {out['fast_paths']}")
    for batch in args.batches:
        variants = {"eager": step_fn(batch, False)}
        compile_s = None
        if args.compile:
            variants["compiled"] = step_fn(batch, True)
            start = time.perf_counter()
            variants["compiled"]()
            compile_s = time.perf_counter() - start
        if args.quick_gelu:
            variants["quick_gelu"] = step_fn(batch, False, act="quick_gelu")
        for fn in variants.values():
            fn()
            fn()
        samples: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(args.pairs):
            for name, fn in variants.items():
                samples[name].append(batch / time_per_call(fn, cpu, args.min_time))
        row = {name: {"images_per_s": statistics.median(v), "min": min(v), "max": max(v), "samples": v}
               for name, v in samples.items()}
        if compile_s is not None:
            row["compiled"]["compile_s"] = compile_s
        for name in variants.keys() - {"eager"}:
            # the samples are rates, so speedup(eager, variant) is the median of variant / eager
            row[name]["speedup"] = speedup(samples["eager"], samples[name])
        out["rows"][str(batch)] = row
        for name, r in row.items():
            extra = f", {r['speedup']['median']:.2f}x eager" if "speedup" in r else ""
            extra += f", compile {r['compile_s']:.0f} s" if "compile_s" in r else ""
            print(f"batch {batch} {name}: {r['images_per_s']:.0f} images/s ({r['min']:.0f}-{r['max']:.0f}){extra}")
        if args.profile:
            fn = variants["eager"]
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                for _ in range(5):
                    fn()
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
