"""Another version of cvt against this one, the same weights, interleaved in one process:
`python benchmarks/ab_versions.py OLD_CHECKOUT [--rounds N]`.

For "did this change keep the speed": two runs of `benchmarks/bench.py` compare each version with the port in
separate processes, so the machine's drift between them shows up as a difference; here the two versions alternate
call by call. OLD_CHECKOUT is a source tree of cvt (`git worktree add /tmp/old REV`); its package is imported under
another name from a temporary copy. CvT-13 at 224 in fp32 with exact GELU, as the bench.
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch

import cvt
from harness import time_per_call, train_step_fn


def import_other(checkout: Path):
    """The package at CHECKOUT/src/cvt, imported as `cvt_other` (its modules import one another relatively)."""
    tmp = Path(tempfile.mkdtemp())
    shutil.copytree(checkout / "src" / "cvt", tmp / "cvt_other")
    sys.path.insert(0, str(tmp))
    return importlib.import_module("cvt_other.model"), importlib.import_module("cvt_other.config")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("old", type=Path, help="a source checkout of the other version")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--min-time", type=float, default=1.0)
    args = p.parse_args(argv)
    other_model, other_config = import_other(args.old)
    torch.manual_seed(0)
    new = cvt.create_model("cvt_13", act="gelu").eval()
    old = other_model.CvT(other_config.CvTConfig(act="gelu")).eval()
    old.load_state_dict(new.state_dict())
    x32, x1 = torch.randn(32, 3, 224, 224), torch.randn(1, 3, 224, 224)
    cpu = torch.device("cpu")
    with torch.inference_mode():
        assert torch.allclose(old(x32[:2]), new(x32[:2]), atol=1e-4), "the two versions compute different things"

    def infer(m, x):
        def run():
            with torch.inference_mode():
                return m(x)
        return run

    pairs = {
        "inference, batch 1": (infer(old, x1), infer(new, x1)),
        "inference, batch 32": (infer(old, x32), infer(new, x32)),
        "training step, batch 32": (train_step_fn(old.train(), cpu, "fp32", 32, 224),
                                    train_step_fn(new.train(), cpu, "fp32", 32, 224)),
    }
    print(f"`python benchmarks/ab_versions.py {args.old} --rounds {args.rounds}`, {torch.get_num_threads()} threads")
    print()
    print(f"| measurement | other (s per call) | this (s per call) | this one's speed / the other's: median "
          f"(range over {args.rounds} rounds) |")
    print("|---|---|---|---|")
    for label, (f_old, f_new) in pairs.items():
        f_old(), f_new()
        times = {"old": [], "new": []}
        for r in range(args.rounds):  # alternating which goes first, so neither always runs on a warmer machine
            order = (("old", f_old), ("new", f_new)) if r % 2 == 0 else (("new", f_new), ("old", f_old))
            for name, f in order:
                times[name].append(time_per_call(f, cpu, args.min_time))
        ratios = [o / n for o, n in zip(times["old"], times["new"], strict=True)]
        print(f"| {label} | {statistics.median(times['old']):.3f} | {statistics.median(times['new']):.3f} | "
              f"{statistics.median(ratios):.3f}x ({min(ratios):.3f}-{max(ratios):.3f}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
