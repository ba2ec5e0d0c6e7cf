"""`cvt bench [options]`: `python benchmarks/bench.py [options]` of the source checkout cvt is installed from.

The benchmarks (their harness, contestants and report) live in the repository's `benchmarks/`, not in the library;
with cvt installed from a checkout (`pip install -e .`) this command runs them, and otherwise says so.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path


def script() -> Path:
    """benchmarks/bench.py beside the source tree this module was loaded from (src/cvt/commands/bench.py)."""
    return Path(__file__).resolve().parents[3] / "benchmarks" / "bench.py"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # Every word after `cvt bench`, --help included, is the script's: with no prefix character of its own, this
    # parser reads them all as the one list below (argparse's REMAINDER alone refuses a leading option).
    parser.prefix_chars = "\0"
    parser.add_argument("words", nargs=argparse.REMAINDER, help="options of benchmarks/bench.py (see its --help)")


def run(args: argparse.Namespace) -> int:
    path = script()
    if not path.is_file():
        raise ValueError("cvt bench runs benchmarks/bench.py of a source checkout, and this cvt is not installed "
                         "from one: git clone the repository, pip install -e . in it, and run it there")
    words = list(args.words)
    if words[:1] == ["--"]:
        words = words[1:]
    if args.debug and "--debug" not in words:  # `cvt --debug bench ...`
        words.append("--debug")
    return subprocess.run([sys.executable, str(path), *words]).returncode
