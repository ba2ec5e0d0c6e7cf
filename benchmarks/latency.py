"""Batch-1 inference latency: our PyTorch forward against ONNX Runtime on the exported model, `python
benchmarks/latency.py` (CvT-13 at 224 px by default; `--model`, `--img-size`, `--pairs`).

Both sides run as `cvt predict` runs them: PyTorch in eval mode under no_grad, ONNX Runtime through the session
`cvt predict --backend onnxruntime` makes (`cvt.commands.predict.onnx_session`: CPU, as many threads as PyTorch)
on the file `cvt.export.export_onnx` writes. The two are timed in alternating pairs in one process (torch, ort,
torch, ort, ...: `harness.interleaved`), so a machine whose speed drifts moves both sides of a pair alike; the
figure is the median of the per-pair ratios (torch ms / ort ms: above 1, ONNX Runtime is faster) with their
spread. Writes a small JSON (`--json PATH`, default benchmarks/results/latency-MODEL-SIZE-cpu-CPUTAG.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch

import cvt
from cvt.commands.predict import onnx_session
from cvt.export import export_onnx
from cvt.utils import write_text
from harness import interleaved, machine_info, speedup
from report import cpu_tag

RESULTS = Path(__file__).resolve().parent / "results"


def measure(model_name: str, img_size: int, pairs: int, min_time: float, log=print) -> dict:
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    model = cvt.create_model(model_name).eval()
    x = torch.randn(1, model.cfg.in_chans, img_size, img_size)
    xn = x.numpy()
    with tempfile.TemporaryDirectory() as tmp:
        log(f"exporting {model_name} at {img_size} px to ONNX")
        start = time.perf_counter()
        path = export_onnx(model, Path(tmp) / "model.onnx", img_size)
        export_s = time.perf_counter() - start
        session = onnx_session(path)

    def torch_call():
        with torch.no_grad():
            return model(x)

    def ort_call():
        return session.run(["logits"], {"images": xn})

    diff = float(np.abs(ort_call()[0] - torch_call().numpy()).max())
    log(f"timing batch 1: {pairs} pair(s) of torch, onnxruntime, {min_time:g} s each")
    t = interleaved({"torch": torch_call, "onnxruntime": ort_call}, cpu, pairs, min_time)
    ratios = [a / b for a, b in zip(t["torch"]["samples"], t["onnxruntime"]["samples"])]
    return dict(
        model=model_name, img_size=img_size, batch=1, pairs=pairs, min_time_s=min_time,
        torch_ms=1e3 * t["torch"]["seconds"], onnxruntime_ms=1e3 * t["onnxruntime"]["seconds"],
        torch_ms_per_pair=[1e3 * s for s in t["torch"]["samples"]],
        onnxruntime_ms_per_pair=[1e3 * s for s in t["onnxruntime"]["samples"]],
        onnxruntime_speedup=speedup(t["onnxruntime"]["samples"], t["torch"]["samples"]),
        onnxruntime_speedup_per_pair=ratios,
        max_abs_diff=diff, export_s=export_s,
        threads=torch.get_num_threads(), torch=torch.__version__, onnxruntime=onnxruntime.__version__,
        machine=machine_info(cpu),
        command=" ".join(["python", "benchmarks/latency.py", *sys.argv[1:]]),
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="cvt_13")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--pairs", type=int, default=7, help="alternating torch/onnxruntime pairs (default 7)")
    p.add_argument("--min-time", type=float, default=1.0, help="seconds per timed measurement (default 1)")
    p.add_argument("--threads", type=int, help="CPU threads for both (default: PyTorch's)")
    p.add_argument("--json", metavar="PATH", help="default: benchmarks/results/latency-MODEL-SIZE-cpu-CPUTAG.json")
    args = p.parse_args(argv)
    if args.pairs < 1 or args.min_time < 0 or (args.threads is not None and args.threads < 1):
        p.error("--pairs and --threads must be >= 1, --min-time >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    r = measure(args.model, args.img_size, args.pairs, args.min_time, log=lambda s: print(s, file=sys.stderr))
    s = r["onnxruntime_speedup"]
    print(f"{r['machine']['cpu']}, {r['threads']} thread(s), {r['model']} at {r['img_size']} px, batch 1: "
          f"torch {r['torch_ms']:.2f} ms, onnxruntime {r['onnxruntime_ms']:.2f} ms (medians); onnxruntime "
          f"{s['median']:.3f}x faster (median of {r['pairs']} pairs, {s['min']:.3f}-{s['max']:.3f}); "
          f"max |diff| {r['max_abs_diff']:.1e}")
    out = Path(args.json) if args.json else (
        RESULTS / f"latency-{args.model}-{args.img_size}-cpu-{cpu_tag(r['machine']['cpu'])}.json")
    write_text(out, json.dumps(r, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
