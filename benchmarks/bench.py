"""Speed and memory of cvt's CvT against transformers' port or any timm/torchvision model: python benchmarks/bench.py.

Prints the Markdown table and writes its results into this folder: `results/<setting>.json` and a section of
`RESULTS.md` (a rerun replaces its own section; notes outside the sections stay). `--json` and `--markdown` write
elsewhere; `--quick` is a smoke run of a minute or two, printed only unless they are given. `cvt bench` runs this
script from a source checkout. Contestants, e.g. `--impls ours,hf,timm:resnet18,tv:vit_b_16`: contestants.py;
how they are timed: harness.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
from pathlib import Path

import contestants
import harness
import report
from cvt.recipe import COMPILE_MODES
from cvt.utils import write_text

HERE = Path(__file__).resolve().parent


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="benchmarks/bench.py", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cvt_13", help="registered cvt model of ours (default cvt_13); every "
                        "contestant is built for its classes and channels")
    parser.add_argument("--img-size", type=int, default=None, help="image side (default 224; --quick: 224)")
    parser.add_argument("--batch-sizes", type=_ints, default=None,
                        help="inference batch sizes, e.g. 1,32 (default 1,32)")
    parser.add_argument("--train-batch", type=int, default=None,
                        help="training-step and memory batch size (default 32)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of alternation; medians over them (default 5)")
    parser.add_argument("--memory-rounds", type=int, default=None,
                        help="fresh processes per contestant for peak memory, alternating (default 5; --quick: 1)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--dtype", choices=harness.DTYPES, default="fp32", help="bf16: forward under autocast")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for all (default: torch's)")
    parser.add_argument("--impls", type=_names, default=harness.DEFAULT_IMPLS,
                        help=f"contestants, comma-separated: {contestants.known()}, each may end in +compile "
                        f"(default {','.join(harness.DEFAULT_IMPLS)})")
    parser.add_argument("--baseline", default=None, help="the contestant every ratio is against "
                        f"(default {harness.DEFAULT_BASELINE}, or the first contestant without it)")
    parser.add_argument("--tasks", type=_names, default=None,
                        help=f"any of {','.join(harness.TASKS)} (default: all but onnx)")
    parser.add_argument("--onnx", action="store_true", help="also time ONNX Runtime on our exported model (CPU)")
    parser.add_argument("--compile", action="store_true", help="also time ours+compile, with its compile time")
    parser.add_argument("--compile-mode", choices=COMPILE_MODES, default="default",
                        help="torch.compile mode of the compiled contestants (reduce-overhead: CUDA graphs on a GPU)")
    parser.add_argument("--compile-port", action="store_true",
                        help="with --compile: hf+compile too (a compiled-vs-compiled ratio)")
    parser.add_argument("--grad-checkpointing", action="store_true", help="ours with gradient checkpointing (memory)")
    parser.add_argument("--matmul-size", type=int, default=None,
                        help="side of the reference fp32/bf16 matmul (default 2048 on CPU, 8192 on GPU)")
    parser.add_argument("--min-time", type=float, default=None, help="seconds per timed measurement (default 1)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 rounds, batches 1,8, training batch 8")
    parser.add_argument("--json", type=Path, default=None, help="write the results as JSON here "
                        "(default results/<setting>.json in this folder)")
    parser.add_argument("--markdown", type=Path, default=None, help="put the table into this Markdown file, in its "
                        "own section (default RESULTS.md in this folder)")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    return parser


def config_from_args(args: argparse.Namespace) -> harness.BenchConfig:
    quick = args.quick
    tasks = args.tasks or ("infer", "train", "memory", "matmul")
    if args.onnx and "onnx" not in tasks:
        tasks = tuple(tasks) + ("onnx",)
    pick = lambda value, normal, fast: value if value is not None else (fast if quick else normal)  # noqa: E731
    return harness.BenchConfig(
        model=args.model,
        img_size=pick(args.img_size, 224, 224),
        infer_batches=pick(args.batch_sizes, (1, 32), (1, 8)),
        train_batch=pick(args.train_batch, 32, 8),
        rounds=pick(args.rounds, 5, 2),
        memory_rounds=pick(args.memory_rounds, 5, 1),
        device=args.device,
        dtype=args.dtype,
        threads=args.threads,
        impls=tuple(args.impls),
        baseline=args.baseline,
        tasks=tuple(tasks),
        compile=args.compile,
        compile_mode=args.compile_mode,
        compile_port=args.compile_port,
        grad_checkpointing=args.grad_checkpointing,
        min_time=pick(args.min_time, 1.0, 0.3),
        # A GPU needs a large product to reach its rate (a 2048 one is launch- and wave-bound there).
        matmul_size=args.matmul_size or (8192 if args.device.startswith("cuda") else 2048),
    )


def run(args: argparse.Namespace, command: str) -> int:
    cfg = config_from_args(args)
    json_path, markdown = args.json, args.markdown
    if not args.quick:  # a smoke run does not replace a real run's figures unless asked to
        json_path = json_path or HERE / "results" / f"{report.section_key(dataclasses.asdict(cfg))}.json"
        markdown = markdown or HERE / "RESULTS.md"
    result = harness.run_benchmark(cfg, log=lambda msg: print(f"[bench] {msg}", file=sys.stderr, flush=True),
                                   command=command)
    text = report.to_markdown(result)
    print(text)
    if json_path is not None:
        write_text(json_path, json.dumps(result, indent=1) + "\n")
        print(f"wrote {json_path}", file=sys.stderr)
    if markdown is not None:
        report.write_markdown_section(markdown, report.section_key(result["config"], result["machine"]), text)
        print(f"updated {markdown}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    from cvt.cli import user_message

    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        return run(args, command=f"python benchmarks/bench.py {shlex.join(argv)}".strip())
    except KeyboardInterrupt:
        print("benchmarks/bench.py: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # errors a user can act on as one line, as the cvt command shows them
        message = user_message(e)
        if message is None or args.debug:
            raise
        print(f"benchmarks/bench.py: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
