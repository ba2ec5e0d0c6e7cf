"""What each of the model's fast paths buys, measured by switching it off: `python benchmarks/ablation.py`.

Each row turns one fast path off through the public switch `cvt.layers.fast_paths(name=False)`; what each does is
in `cvt.layers.FAST_PATHS` (`python -c "import cvt.layers as l; print(*l.FAST_PATHS.items(), sep=chr(10))"`):

- `fused_inference`: eager inference adds each residual inside the matmul of the branch's last Linear and runs the
  activation in place; off, inference runs the reference block forward under no_grad.
- `recompute_act`: in training the MLP recomputes its activation in backward instead of storing it.
- `onednn_linear`: on CPU in fp32 the Linear layers run through oneDNN's GEMM (with the MLP's activation and the
  residual add as GEMM post-ops in inference); off, through PyTorch's addmm (MKL).
- `mlp_in_pieces`: with oneDNN, inference runs each MLP 1024 tokens at a time; off, on the whole token tensor.
- `quick_gelu_as_silu`: the authors' QuickGELU, x * sigmoid(1.702 x), runs as a SiLU with the 1.702 moved into
  the MLP's matmuls; off, it runs as the authors wrote it. Measured on the default (QuickGELU) model; the rows
  above it use exact GELU, as the benchmark against the port does.
- `fold_batchnorm`, `dense_gradient`: eval-mode BatchNorm folded into the depthwise convolution; a dense gradient
  for the CPU BatchNorm backward.

Times are interleaved (on, off, on, off, ...) in one process, medians of per-round ratios; peak memory of a
training step is measured in a fresh process per setting (peak RSS on CPU). Prints a Markdown table; the figures
quoted in RESULTS.md come from this script.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
from collections.abc import Callable

import torch

import cvt
from cvt.layers import FAST_PATHS, fast_paths
from harness import peak_rss_bytes, time_per_call, train_step_fn


def switched_off(path: str):
    """The model with one fast path turned off (a ValueError names an unknown one)."""
    if path not in FAST_PATHS:
        raise ValueError(f"unknown fast path {path!r}; the fast paths are {', '.join(FAST_PATHS)}")
    return fast_paths(**{path: False})


def alternate(fn: Callable[[], object], path: str, rounds: int, min_time: float) -> dict:
    cpu = torch.device("cpu")
    on, off = [], []
    fn()
    with switched_off(path):
        fn()
    for _ in range(rounds):
        on.append(time_per_call(fn, cpu, min_time))
        with switched_off(path):
            off.append(time_per_call(fn, cpu, min_time))
    return dict(on_s=statistics.median(on), off_s=statistics.median(off),
                speedup=statistics.median(b / a for a, b in zip(on, off)))


def memory_child(model: str, batch: int, img_size: int, path: str | None) -> int:
    torch.manual_seed(0)
    m = cvt.create_model(model, act="gelu")
    step = train_step_fn(m, torch.device("cpu"), "fp32", batch, img_size)
    with switched_off(path) if path else contextlib.nullcontext():
        for _ in range(2):
            step()
    return peak_rss_bytes()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="cvt_13")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--min-time", type=float, default=1.0)
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_child is not None:
        print(memory_child(args.model, args.batch, args.img_size, args.memory_child or None))
        return 0

    torch.manual_seed(0)
    m = cvt.create_model(args.model, act="gelu").eval()
    x = torch.randn(args.batch, m.cfg.in_chans, args.img_size, args.img_size)

    def inference(model: torch.nn.Module) -> Callable[[], torch.Tensor]:
        def run():
            with torch.inference_mode():
                return model(x)

        return run

    rows = [("inference", "fused_inference", alternate(inference(m), "fused_inference", args.rounds, args.min_time))]
    rows.append(("inference", "onednn_linear", alternate(inference(m), "onednn_linear", args.rounds, args.min_time)))
    rows.append(("inference", "mlp_in_pieces", alternate(inference(m), "mlp_in_pieces", args.rounds, args.min_time)))
    rows.append(("inference", "fold_batchnorm", alternate(inference(m), "fold_batchnorm", args.rounds, args.min_time)))
    cpu = torch.device("cpu")
    step = train_step_fn(cvt.create_model(args.model, act="gelu"), cpu, "fp32", args.batch, args.img_size)
    rows.append(("training step", "recompute_act", alternate(step, "recompute_act", args.rounds, args.min_time)))
    rows.append(("training step", "onednn_linear", alternate(step, "onednn_linear", args.rounds, args.min_time)))
    rows.append(("training step", "dense_gradient", alternate(step, "dense_gradient", args.rounds, args.min_time)))
    del step
    quick = cvt.create_model(args.model, act="quick_gelu").eval()
    rows.append(("inference, QuickGELU", "quick_gelu_as_silu",
                 alternate(inference(quick), "quick_gelu_as_silu", args.rounds, args.min_time)))
    step = train_step_fn(quick.train(), cpu, "fp32", args.batch, args.img_size)
    rows.append(("training step, QuickGELU", "quick_gelu_as_silu",
                 alternate(step, "quick_gelu_as_silu", args.rounds, args.min_time)))
    del step
    peaks = {}
    for setting in ("", "recompute_act", "onednn_linear"):
        cmd = [sys.executable, __file__, "--model", args.model, "--img-size", str(args.img_size), "--batch",
               str(args.batch), "--memory-child", setting]
        peaks[setting or "on"] = int(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.split()[-1])

    print(f"{args.model}, {args.img_size}x{args.img_size}, batch {args.batch}, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds; `" + " ".join(["python benchmarks/ablation.py", *(argv or sys.argv[1:])]) + "`")
    print()
    print("| measurement | fast path | with it (s) | without it (s) | speed-up |")
    print("|---|---|---|---|---|")
    for what, path, r in rows:
        print(f"| {what} | `{path}` | {r['on_s']:.3f} | {r['off_s']:.3f} | {r['speedup']:.2f}x |")
    print()
    print(f"Training-step peak RSS: {peaks['on'] / 1e9:.2f} GB with every fast path, "
          f"{peaks['recompute_act'] / 1e9:.2f} GB without `recompute_act`, "
          f"{peaks['onednn_linear'] / 1e9:.2f} GB without `onednn_linear`.")
    print(json.dumps(dict(rows={f"{w}: {p}": r for w, p, r in rows}, peak_rss=peaks)), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
