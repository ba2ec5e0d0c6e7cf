"""`cvt bench`: speed and memory of this CvT against transformers' port, side by side (see `cvt.bench`).

Prints the Markdown table; `--json` and `--markdown` also write it (`benchmarks/bench.py` writes the JSON into
`benchmarks/results/` and the table into `benchmarks/RESULTS.md`). `--quick` is a smoke run of a minute or two.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from ..recipe import COMPILE_MODES


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="cvt_13", help="registered model (default cvt_13)")
    parser.add_argument("--img-size", type=int, default=None, help="image side (default 224; --quick: 224)")
    parser.add_argument("--batch-sizes", type=_ints, default=None, help="inference batch sizes, e.g. 1,32 (default 1,32)")
    parser.add_argument("--train-batch", type=int, default=None, help="training-step and memory batch size (default 32)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of A B alternation; medians over them (default 5)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16: forward under autocast")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for both (default: torch's)")
    parser.add_argument("--impls", type=_names, default=("ours", "hf"), help="ours,hf (default both)")
    parser.add_argument("--tasks", type=_names, default=None, help="any of infer,train,memory,matmul,onnx (default: all but onnx)")
    parser.add_argument("--onnx", action="store_true", help="also time ONNX Runtime on the exported model (CPU)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(ours), with its compile time")
    parser.add_argument("--compile-mode", choices=COMPILE_MODES, default="default",
                        help="torch.compile mode for --compile (reduce-overhead: CUDA graphs on a GPU)")
    parser.add_argument("--compile-port", action="store_true",
                        help="with --compile: compile the transformers port too (a compiled-vs-compiled ratio)")
    parser.add_argument("--grad-checkpointing", action="store_true", help="ours with gradient checkpointing (memory)")
    parser.add_argument("--matmul-size", type=int, default=None,
                        help="side of the reference fp32/bf16 matmul (default 2048 on CPU, 8192 on GPU)")
    parser.add_argument("--min-time", type=float, default=None, help="seconds per timed measurement (default 1)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 rounds, batches 1,8, training batch 8")
    parser.add_argument("--json", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--markdown", type=Path, default=None, help="put the table into this Markdown file (own section)")


def config_from_args(args: argparse.Namespace):
    from ..bench import BenchConfig

    quick = args.quick
    tasks = args.tasks or ("infer", "train", "memory", "matmul")
    if args.onnx and "onnx" not in tasks:
        tasks = tuple(tasks) + ("onnx",)
    pick = lambda value, normal, fast: value if value is not None else (fast if quick else normal)  # noqa: E731
    return BenchConfig(
        model=args.model,
        img_size=pick(args.img_size, 224, 224),
        infer_batches=pick(args.batch_sizes, (1, 32), (1, 8)),
        train_batch=pick(args.train_batch, 32, 8),
        rounds=pick(args.rounds, 5, 2),
        device=args.device,
        dtype=args.dtype,
        threads=args.threads,
        impls=tuple(args.impls),
        tasks=tuple(tasks),
        compile=args.compile,
        compile_mode=args.compile_mode,
        compile_port=args.compile_port,
        grad_checkpointing=args.grad_checkpointing,
        min_time=pick(args.min_time, 1.0, 0.3),
        # A GPU needs a large product to reach its rate (a 2048 one is launch- and wave-bound there).
        matmul_size=args.matmul_size or (8192 if args.device.startswith("cuda") else 2048),
    )


def run(args: argparse.Namespace, command: str | None = None) -> int:
    from ..bench import run_benchmark, section_key, to_markdown, write_markdown_section

    cfg = config_from_args(args)
    command = command or "cvt " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    result = run_benchmark(cfg, log=lambda msg: print(f"[bench] {msg}", file=sys.stderr, flush=True), command=command)
    text = to_markdown(result)
    print(text)
    if args.json is not None:
        from ..utils import atomic_write

        atomic_write(args.json, lambda p: p.write_text(json.dumps(result, indent=1) + "\n"))
        print(f"wrote {args.json}", file=sys.stderr)
    if args.markdown is not None:
        write_markdown_section(args.markdown, section_key(result["config"], result["machine"]), text)
        print(f"updated {args.markdown}", file=sys.stderr)
    return 0
