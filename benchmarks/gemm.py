"""The CPU GEMM behind a Linear layer: PyTorch's addmm (MKL) against oneDNN's (`torch.ops.mkldnn._linear_pointwise`,
which `cvt.model` uses on CPU in fp32), at CvT-13's shapes at batch 32 and 224 px: `python benchmarks/gemm.py`.

Rows are (N, K, M): an (N, K) input times a (K, M) weight, as the forward of a Linear with K inputs and M outputs
over N tokens; `x W` is the backward's input gradient (N, M) x (M, K), `xT g` its weight gradient. GMAC/s, median
of interleaved calls in one process.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

# (N, K, M): stage 3 (32 x 197 tokens, width 384, MLP 1536), stage 2 (32 x 784, 192, 768), stage 1 (32 x 3136,
# 64, 256), a square reference, and batch-1 inference in stage 3
SHAPES = [(2048, 2048, 2048), (6304, 384, 1536), (6304, 1536, 384), (6304, 384, 384), (25088, 192, 768),
          (25088, 768, 192), (25088, 192, 192), (100352, 64, 256), (100352, 256, 64), (100352, 64, 64),
          (197, 384, 1536), (197, 1536, 384)]


def median_times(fns: dict, rounds: int) -> dict:
    times = {k: [] for k in fns}
    for f in fns.values():
        f()
    for _ in range(rounds):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def calls(linear, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, g: torch.Tensor) -> dict:
    """The GEMMs of one Linear: input x (N, K), weight w (M, K), bias b (M,), output gradient g (N, M)."""
    return {
        "fwd_mkl": lambda: torch.addmm(b, x, w.t()),
        "fwd_onednn": lambda: linear(x, w, b, "none", [], ""),
        "dx_mkl": lambda: g.mm(w),
        "dx_onednn": lambda: linear(g, w.t().contiguous(), None, "none", [], ""),
        "dw_mkl": lambda: g.t().mm(x),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=8)
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    linear = torch.ops.mkldnn._linear_pointwise
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}; `python benchmarks/gemm.py --rounds {args.rounds}`\n")
    print("| N | K | M | forward, MKL | forward, oneDNN | input grad, MKL | input grad, oneDNN | weight grad, MKL |")
    print("|---|---|---|---|---|---|---|---|")
    torch.manual_seed(0)
    for n, k, m in SHAPES:
        fns = calls(linear, torch.randn(n, k), torch.randn(m, k), torch.randn(m), torch.randn(n, m))
        t = median_times(fns, args.rounds)
        gmac = n * k * m / 1e9
        print(f"| {n} | {k} | {m} | " + " | ".join(f"{gmac / t[key]:.1f}" for key in fns) + " |")
    print("\nGMAC/s (multiply-accumulates per second, 1e9).")


if __name__ == "__main__":
    main()
