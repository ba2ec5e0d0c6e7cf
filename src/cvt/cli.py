"""The `cvt` command: a thin layer over the library. Each subcommand lives in `cvt.commands.<name>` as
`add_arguments(parser)` + `run(args) -> int`, imported only when used so `cvt --help` stays fast.

Errors a user can act on (bad paths, bad values, unreadable checkpoints) print one line and exit non-zero;
`--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys

# name -> one-line help; the module cvt.commands.<name> implements it
COMMANDS = {
    "train": "train a CvT (Fashion-MNIST by default, or an image folder)",
    "eval": "evaluate a checkpoint: top-1/top-5, per-class accuracy, confusion matrix",
    "predict": "classify images with a checkpoint",
    "zoo": "list the registered models with parameters and MACs",
    "tune": "measure which CPU-dependent fast paths pay on this machine and keep the choice for its CPU",
    "convert": "convert weights between the authors', Hugging Face's and cvt's formats",
    "export": "export a checkpoint to ONNX or TorchScript",
    "data": "write datasets: the Fashion-MNIST scenes for detection and segmentation (cvt data scenes OUT)",
    "bench": "run benchmarks/bench.py of a source checkout: speed and memory against transformers' port, "
    "timm or torchvision models",
}

# Exceptions that carry a message meant for the user; anything else is a bug and keeps its traceback. The
# library raises ValueError (CheckpointError, NonFiniteLoss, config errors subclass it) for everything a user can
# fix, and the OSErrors below for paths. Not RuntimeError or KeyError: those are how bugs (ours or torch's) show,
# and a bug squashed into one line cannot be reported.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)
# Other OSErrors are environment trouble the user must fix (disk full, read-only file system, quota), not bugs.
USER_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT}
# Packages only some commands use (bench, ONNX export, semantic segmentation), so not installed with cvt itself:
# which extra brings them.
OPTIONAL_PACKAGES = {"transformers": "bench", "onnx": "onnx", "onnxscript": "onnx", "onnxruntime": "onnx",
                     "segmentation_models_pytorch": "seg"}


def user_message(e: BaseException) -> str | None:
    """The one line to show for an error the user can act on; None for a bug (its traceback is shown)."""
    missing = (e.name or "").partition(".")[0] if isinstance(e, ImportError) else ""
    if missing in OPTIONAL_PACKAGES:
        return (f"this needs the package {missing}, which is not installed: pip install {missing} "
                f"(or pip install 'cvt[{OPTIONAL_PACKAGES[missing]}]')")
    if isinstance(e, USER_ERRORS) or (isinstance(e, OSError) and e.errno in USER_ERRNOS):
        # One line even when a third-party message spans several.
        return "; ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
    # Out of memory is a setting (batch size, image size, AMP), not a bug, and torch's traceback points into its
    # allocator, not at the cause; say what to change instead. torch is only imported if a command used it.
    torch = sys.modules.get("torch")
    if isinstance(e, MemoryError) or (torch is not None and isinstance(e, torch.OutOfMemoryError)) or (
        isinstance(e, RuntimeError) and "can't allocate memory" in str(e)  # torch's CPU allocator
    ):
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        return f"out of memory ({first}); lower the batch size or the image size"
    return None


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
    # Find the command word, then let that command's module add its own arguments before the real parse. The
    # global options (--debug, --help) take no value, so the command is the first word that is not an option;
    # anything else (no command, a typo) is left to argparse, which says what is wrong.
    command = next((a for a in argv if not a.startswith("-")), None)
    if command in COMMANDS:
        module = importlib.import_module(f"cvt.commands.{command}")
        sub = parser._subparsers._group_actions[0].choices[command]  # noqa: SLF001 - argparse has no public handle
        module.add_arguments(sub)
    args = parser.parse_args(argv)
    try:
        return int(importlib.import_module(args._module).run(args) or 0)  # noqa: SLF001 - set by build_parser
    except KeyboardInterrupt:
        print("cvt: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`cvt eval ... | head`): stop quietly, as a shell tool does, and point stdout at
        # /dev/null so that Python's flush at exit does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as e:
        message = user_message(e)
        if message is None or args.debug:
            raise
        print(f"cvt {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
