"""Benchmark cvt's CvT against transformers' port: `python benchmarks/bench.py [cvt bench options]`.

The same as `cvt bench`, writing its results into this folder: `results/<setting>.json` and a section of
`RESULTS.md` (a rerun replaces its own section; notes outside the sections stay). See `cvt.bench` for what is
measured and how.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from pathlib import Path

from cvt.bench import section_key
from cvt.commands import bench

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="benchmarks/bench.py", description=__doc__.splitlines()[0])
    bench.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.json is None:
        args.json = HERE / "results" / f"{section_key(dataclasses.asdict(bench.config_from_args(args)))}.json"
    if args.markdown is None:
        args.markdown = HERE / "RESULTS.md"
    command = "python benchmarks/bench.py " + " ".join(shlex.quote(a) for a in argv)
    return bench.run(args, command=command.strip())


if __name__ == "__main__":
    sys.exit(main())
