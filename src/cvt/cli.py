"""The `cvt` command: a thin layer over the library. Each subcommand lives in `cvt.commands.<name>` as
`add_arguments(parser)` + `run(args) -> int`, imported only when used so `cvt --help` stays fast.

Errors a user can act on (bad paths, bad values, unreadable checkpoints) print one line and exit non-zero;
`--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> one-line help; the module cvt.commands.<name> implements it
COMMANDS = {
    "train": "train a CvT (Fashion-MNIST by default, or an image folder)",
    "eval": "evaluate a checkpoint: top-1/top-5, per-class accuracy, confusion matrix",
    "predict": "classify images with a checkpoint",
    "zoo": "list the registered models with parameters and MACs",
    "convert": "convert weights between the authors', Hugging Face's and cvt's formats",
    "export": "export a checkpoint to ONNX or TorchScript",
    "bench": "benchmark against the Hugging Face port (speed and memory)",
}

# Exceptions that carry a message meant for the user; anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, KeyError, RuntimeError, OSError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cvt", description="Convolutional Vision Transformer (CvT) for PyTorch")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
        p.set_defaults(_module=f"cvt.commands.{name}")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    # Parse the command name first, then let that command's module add its own arguments.
    known, _ = parser.parse_known_args(argv) if argv and argv[0] in COMMANDS else (None, None)
    if known is not None:
        module = importlib.import_module(known._module)
        sub = parser._subparsers._group_actions[0].choices[argv[0]]  # noqa: SLF001 - argparse has no public handle
        module.add_arguments(sub)
    args = parser.parse_args(argv)
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except KeyboardInterrupt:
        print("cvt: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        if args.debug:
            raise
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"cvt {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
