"""Speed and memory of this CvT against transformers' port (`CvtForImageClassification`), measured side by side.

Both models carry the same random weights (ours copied into the port with `cvt.weights.from_ours`) and the same
activation (exact GELU, the port's), so they compute the same function; the benchmark checks that before timing.
They run in one process, alternately (A B A B ..., a few rounds), and every figure is the median over the rounds:
a slow period on a shared machine then hits both, and the ratios stay fair. The one thing that cannot share a
process is peak memory, so each implementation's training step runs in a fresh subprocess for that.

What is measured (`run_benchmark`):
- inference images/s at each of `infer_batches` (batch 1 is latency);
- a full training step (forward, cross-entropy, backward, AdamW step) in images/s at `train_batch`;
- the peak memory of a training step in its own process: peak RSS on CPU, peak allocated on CUDA;
- the rate of a large square matmul in the same run, and our forward's multiply-accumulate rate (counted with
  `cvt.count_macs`) as a fraction of it: how close the model runs to what the machine can do;
- optionally `torch.compile` (its gain and its compile time) and ONNX Runtime on the exported model.

The library returns plain dicts and never prints; `cvt bench` (and `benchmarks/bench.py`) write them as JSON and as
the Markdown table of `benchmarks/RESULTS.md`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

try:
    import resource  # Unix only
except ImportError:  # pragma: no cover - Windows
    resource = None

import torch
import torch.nn.functional as F
from torch import nn

from .recipe import COMPILE_MODES
from .utils import atomic_write

IMPLS = ("ours", "hf")
TASKS = ("infer", "train", "memory", "matmul", "onnx")
DTYPES = ("fp32", "bf16")


@dataclass(frozen=True)
class BenchConfig:
    model: str = "cvt_13"
    img_size: int = 224
    infer_batches: tuple[int, ...] = (1, 32)
    train_batch: int = 32
    rounds: int = 5
    device: str = "cpu"
    # "bf16": forward (and loss) under torch.autocast(bfloat16); weights and optimizer stay fp32.
    dtype: str = "fp32"
    threads: int | None = None  # CPU threads for both implementations (None: torch's default)
    impls: tuple[str, ...] = IMPLS
    tasks: tuple[str, ...] = ("infer", "train", "memory", "matmul")
    compile: bool = False  # also time torch.compile(ours), with its compile time
    compile_port: bool = False  # with `compile`: torch.compile the port as well, for a compiled-vs-compiled ratio
    compile_mode: str = "default"  # torch.compile's mode; "reduce-overhead" captures CUDA graphs on a GPU
    grad_checkpointing: bool = False  # ours only (the port has none): for the memory figures
    min_time: float = 1.0  # seconds per timed measurement: short calls repeat until they fill it
    matmul_size: int = 2048
    seed: int = 0

    def __post_init__(self) -> None:
        for name, allowed in (("impls", IMPLS), ("tasks", TASKS)):
            bad = [v for v in getattr(self, name) if v not in allowed]
            if bad:
                raise ValueError(f"{name}: unknown {', '.join(bad)}; choose from {', '.join(allowed)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.rounds < 1 or self.train_batch < 1 or any(b < 1 for b in self.infer_batches):
            raise ValueError("rounds and batch sizes must be >= 1")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be one of {', '.join(COMPILE_MODES)}, got {self.compile_mode!r}")
        if self.compile_port and not self.compile:
            raise ValueError("compile_port (--compile-port) needs compile (--compile)")
        if (self.threads is not None and self.threads < 1) or self.matmul_size < 1 or self.min_time < 0:
            raise ValueError("threads and the matmul size must be >= 1, the minimum time >= 0")
        from .engine import pick_device

        pick_device(self.device)  # one line for "foo", for "cuda" without a GPU and for "cuda:5" on one GPU


# ---------------------------------------------------------------------------------------------------------------
# Building the two implementations
# ---------------------------------------------------------------------------------------------------------------
class _Logits(nn.Module):
    """transformers' model as `images -> logits`, so both implementations are called the same way."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


def build_ours(name: str, **overrides: Any) -> nn.Module:
    from .registry import create_model

    # Exact GELU, as in the port: the two compute the same function (ours defaults to the authors' QuickGELU).
    return create_model(name, act="gelu", **overrides)


def build_hf(ours: nn.Module | None = None, name: str | None = None) -> nn.Module:
    """The port, with `ours`'s weights (or random ones for the registered `name`)."""
    import transformers

    from .registry import default_config
    from .weights import config_to_hf, from_ours

    cfg = ours.cfg if ours is not None else default_config(name)
    if any(depth <= i for i, depth in enumerate(cfg.depths)):
        # transformers indexes stage i's drop-path rates with i instead of the block (its drop-path bug)
        raise ValueError(f"transformers' port cannot build depths {cfg.depths}: it needs more than i blocks in stage i")
    hf = transformers.CvtForImageClassification(transformers.CvtConfig(**config_to_hf(cfg)))
    if ours is not None:
        hf.load_state_dict(from_ours(ours.state_dict(), "hf"), strict=True)
    return _Logits(hf)


# ---------------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, dtype: str):
    if dtype == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def time_per_call(fn: Callable[[], Any], device: torch.device, min_time: float) -> float:
    """Seconds per call of `fn` (already warm): repeated until `min_time` has passed, at least once."""
    return _per_call(fn, device, min_time)[0]


def _os_counters() -> tuple[float, float]:
    """(minor page faults, seconds of kernel CPU time) of this process so far; zeros where `resource` is missing."""
    if resource is None:
        return 0.0, 0.0
    r = resource.getrusage(resource.RUSAGE_SELF)
    return float(r.ru_minflt), r.ru_stime


def _per_call(fn: Callable[[], Any], device: torch.device, min_time: float) -> tuple[float, float, float]:
    """`time_per_call`, with the minor page faults and the kernel CPU seconds per call: each page a tensor gets
    fresh from the kernel is a fault, zero-filled in kernel time (PyTorch has no caching allocator for CPU
    tensors, so that is how allocation shows)."""
    faults0, kernel0 = _os_counters()
    n, start = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        _sync(device)
        elapsed = time.perf_counter() - start
        if elapsed >= min_time:
            faults1, kernel1 = _os_counters()
            return elapsed / n, (faults1 - faults0) / n, (kernel1 - kernel0) / n


def _first_call(fn: Callable[[], Any], device: torch.device) -> float:
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def interleaved(
    calls: dict[str, Callable[[], Any]], device: torch.device, rounds: int, min_time: float
) -> dict[str, dict[str, Any]]:
    """Time each call in turn, round after round (A B A B ...). Per name: seconds per call of every round, the
    median, the duration of the first (warm-up) call, and the medians of the page faults and kernel seconds per
    call."""
    first = {name: _first_call(fn, device) for name, fn in calls.items()}
    for fn in calls.values():  # a second warm-up: allocator and kernel caches settle after the first
        fn()
    samples: dict[str, list[tuple[float, float, float]]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            samples[name].append(_per_call(fn, device, min_time))
    _sync(device)
    out = {}
    for name, rows in samples.items():
        seconds, faults, kernel = (list(column) for column in zip(*rows))
        out[name] = dict(
            seconds=statistics.median(seconds), samples=seconds, first_call_s=first[name],
            page_faults_per_call=statistics.median(faults), kernel_s_per_call=statistics.median(kernel),
        )
    return out


# ---------------------------------------------------------------------------------------------------------------
# Machine description
# ---------------------------------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# Environment variables that change how memory is allocated, inherited by the memory workers. CPU tensors have no
# caching allocator in PyTorch, so glibc's settings decide how often large ones are faulted in fresh from the
# kernel: with `MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647` freed memory is reused instead
# (RESULTS.md: the port's CPU times move most).
ALLOCATOR_ENV_PREFIXES = ("MALLOC_", "GLIBC_TUNABLES", "LD_PRELOAD", "THP_MEM_ALLOC_ENABLE")


def allocator_env() -> dict[str, str]:
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith(ALLOCATOR_ENV_PREFIXES)}


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = dict(
        cpu=_cpu_model(),
        allocator_env=allocator_env(),
        cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        platform=platform.platform(),
        python=platform.python_version(),
        torch=torch.__version__,
        gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        load_average=list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    )
    for module in ("transformers", "onnxruntime", "cvt"):
        try:
            info[module] = __import__(module).__version__
        except ImportError:
            info[module] = None
    return info


# ---------------------------------------------------------------------------------------------------------------
# Peak memory of a training step, one fresh process per implementation
# ---------------------------------------------------------------------------------------------------------------
def _peak_rss_bytes() -> int:
    """This process's peak resident set size. Linux: `VmHWM` of /proc/self/status. Not `getrusage`'s ru_maxrss
    there: a child started by fork + exec inherits its parent's peak in ru_maxrss, so a measuring subprocess of a
    big benchmark process would report the parent's figure."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB, macOS bytes


def _train_step_fn(model: nn.Module, device: torch.device, dtype: str, batch: int, img_size: int, seed: int = 0):
    """A closure running one training step (forward, cross-entropy, backward, AdamW) on a fixed random batch."""
    g = torch.Generator().manual_seed(seed)
    num_classes = model.cfg.num_classes if hasattr(model, "cfg") else model.model.config.num_labels
    in_chans = model.cfg.in_chans if hasattr(model, "cfg") else model.model.config.num_channels
    x = torch.randn(batch, in_chans, img_size, img_size, generator=g).to(device)
    y = torch.randint(0, num_classes, (batch,), generator=g).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    model.train()

    def step() -> None:
        # Gradients cleared before the forward, as a training loop does: under CUDA graphs (torch.compile's
        # "reduce-overhead") the last step's gradients live in the graphs' memory pool, and must be gone before
        # the next forward is replayed into it.
        opt.zero_grad(set_to_none=True)
        with _autocast(device, dtype):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    return step


def memory_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Run in a fresh process: build one implementation, take two training steps (the first creates AdamW's
    state), report the process's peak memory. Both implementations import the same libraries first, so the
    baseline they share is the same."""
    with contextlib.suppress(ImportError):
        import transformers  # noqa: F401

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec.get("seed", 0))
    device = torch.device(spec["device"])
    if spec["impl"] == "ours":
        model = build_ours(spec["model"])
        if spec.get("grad_checkpointing"):
            model.set_grad_checkpointing(True)
    else:
        model = build_hf(name=spec["model"])
    model.to(device)
    step = _train_step_fn(model, device, spec["dtype"], spec["batch"], spec["img_size"])
    rss_before = _peak_rss_bytes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(spec.get("steps", 2)):
        step()
    _sync(device)
    out = dict(
        impl=spec["impl"],
        peak_rss_bytes=_peak_rss_bytes(),
        rss_before_steps_bytes=rss_before,
        seconds=time.perf_counter() - start,
        steps=spec.get("steps", 2),
    )
    if device.type == "cuda":
        out["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    return out


class MeasurementError(ValueError):
    """A measuring subprocess failed (out of memory, a missing library, a model the port cannot build); the
    message carries the child's last line. A ValueError so the CLI shows it as one line: the child's own
    traceback is in its stderr, not in this process, so ours would only point at this function."""


def measure_memory(spec: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
    """`memory_worker(spec)` in a fresh Python process; raises MeasurementError with the child's error on failure."""
    cmd = [sys.executable, "-m", "cvt.bench", "--memory-worker", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
        raise MeasurementError(f"memory measurement of {spec['impl']} failed: {tail[0]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------------------------
def _median_ratio(a: list[float], b: list[float]) -> float:
    """Median of the per-round ratios b/a (times: a faster when > 1); rounds pair up in time, so this is the
    fairest ratio on a machine whose speed drifts."""
    return statistics.median(y / x for x, y in zip(a, b))


def run_benchmark(cfg: BenchConfig, log: Callable[[str], None] | None = None, command: str | None = None) -> dict:
    """Run the benchmark `cfg` describes; returns a JSON-serialisable dict (see `to_markdown`)."""
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg, log or (lambda _msg: None), command)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: BenchConfig, log: Callable[[str], None], command: str | None) -> dict:
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    from .flops import count_macs

    ours = build_ours(cfg.model).to(device).eval()
    models: dict[str, nn.Module] = {"ours": ours}
    if "hf" in cfg.impls:
        models["hf"] = build_hf(ours).to(device).eval()
    if "ours" not in cfg.impls:
        del models["ours"]
    macs = count_macs(ours, cfg.img_size)
    result: dict[str, Any] = dict(
        config=dataclasses.asdict(cfg),
        command=command,
        machine=machine_info(device),
        model=dict(name=cfg.model, macs_per_image=macs, params=sum(p.numel() for p in ours.parameters())),
    )
    in_chans = ours.cfg.in_chans
    g = torch.Generator().manual_seed(cfg.seed)

    if "hf" in models and "ours" in models:
        x = torch.randn(2, in_chans, cfg.img_size, cfg.img_size, generator=g).to(device)
        with torch.inference_mode():
            diff = (models["ours"](x) - models["hf"](x)).abs().max().item()
        result["max_abs_logit_diff"] = diff
        log(f"same weights, same function: max |logit diff| {diff:.2e}")

    # The compiled contestants, "<impl>_compiled": ours, and the port too with `compile_port`.
    compiled: dict[str, nn.Module] = {}
    if cfg.compile:
        for name in ("ours", "hf") if cfg.compile_port else ("ours",):
            if name in models:
                compiled[f"{name}_compiled"] = torch.compile(models[name], mode=cfg.compile_mode, dynamic=False)

    # The matmul runs as one more contestant in every alternation, so its rate is measured under the same
    # conditions as the model it is compared with.
    mm_call = None
    if "matmul" in cfg.tasks:
        n, mm_dtype = cfg.matmul_size, torch.bfloat16 if cfg.dtype == "bf16" else torch.float32
        a, b = (torch.randn(n, n, generator=g).to(device, mm_dtype) for _ in range(2))
        mm_out = torch.empty(n, n, device=device, dtype=mm_dtype)
        mm_call = lambda: torch.mm(a, b, out=mm_out)  # noqa: E731 - preallocated output: the multiply alone
    mm_samples: list[float] = []

    def fraction_of_matmul(timed: dict[str, Any], mm: dict[str, Any], macs_per_call: float) -> float:
        """A call's MACs per second over the matmul's, median of the per-round ratios."""
        rounds = zip(timed["samples"], mm["samples"])
        return statistics.median(macs_per_call / s / (cfg.matmul_size**3 / m) for s, m in rounds)

    def alternate(calls: dict[str, Callable[[], Any]], batch: int) -> dict[str, Any]:
        if mm_call is not None:
            calls = dict(calls, matmul=mm_call)
        t = interleaved(calls, device, cfg.rounds, cfg.min_time)
        mm = t.pop("matmul", None)
        row = _summarise(t, batch)
        if mm is not None:
            mm_samples.extend(mm["samples"])
            row["matmul_macs_per_s"] = cfg.matmul_size**3 / mm["seconds"]
        return row, t, mm

    if "infer" in cfg.tasks:
        result["infer"] = {}
        for batch in cfg.infer_batches:
            x = torch.randn(batch, in_chans, cfg.img_size, cfg.img_size, generator=g).to(device)
            calls = {}
            for name, m in list(models.items()) + list(compiled.items()):
                def call(m=m):
                    with torch.inference_mode(), _autocast(device, cfg.dtype):
                        return m(x)

                calls[name] = call
            log(f"inference, batch {batch}: {cfg.rounds} round(s) of {', '.join(calls)}" + (", matmul" if mm_call else ""))
            row, t, mm = alternate(calls, batch)
            if mm is not None:
                # our forward's multiply-accumulate rate against the matmul's, round by round
                for name in ("ours", "ours_compiled"):
                    if name in t:
                        row[name]["macs_per_s"] = macs * row[name]["images_per_s"]
                        row[name]["fraction_of_matmul"] = fraction_of_matmul(t[name], mm, macs * batch)
            result["infer"][str(batch)] = row

    if "train" in cfg.tasks:
        calls = {}
        train_models = {}
        for name, m in models.items():
            tm = _clone_for_training(m, device)
            train_models[name] = tm
            calls[name] = _train_step_fn(tm, device, cfg.dtype, cfg.train_batch, cfg.img_size, cfg.seed)
        for name in compiled:
            tm = torch.compile(_clone_for_training(models[name.removesuffix("_compiled")], device),
                               mode=cfg.compile_mode, dynamic=False)
            calls[name] = _train_step_fn(tm, device, cfg.dtype, cfg.train_batch, cfg.img_size, cfg.seed)
        log(f"training step, batch {cfg.train_batch}: {cfg.rounds} round(s) of {', '.join(calls)}")
        row, t, mm = alternate(calls, cfg.train_batch)
        if mm is not None:
            # Model FLOP utilization of the step: forward + backward counted as 3x the forward's MACs (the
            # usual convention; BatchNorm, softmax and the optimizer are not counted), against the matmul's rate.
            for name in ("ours", "ours_compiled"):
                if name in t:
                    row[name]["fraction_of_matmul"] = fraction_of_matmul(t[name], mm, 3 * macs * cfg.train_batch)
        result["train"] = {str(cfg.train_batch): row}
        del train_models, calls

    if mm_samples:
        rate = cfg.matmul_size**3 / statistics.median(mm_samples)
        result["matmul"] = dict(n=cfg.matmul_size, dtype=cfg.dtype, macs_per_s=rate, samples_s=mm_samples)

    if "memory" in cfg.tasks:
        result["memory"] = {}
        for name in cfg.impls:
            spec = dict(
                impl=name, model=cfg.model, device=cfg.device, dtype=cfg.dtype, batch=cfg.train_batch,
                img_size=cfg.img_size, threads=cfg.threads or torch.get_num_threads(), seed=cfg.seed,
                grad_checkpointing=cfg.grad_checkpointing and name == "ours",
            )
            log(f"peak memory of a training step, batch {cfg.train_batch}: {name} (own process)")
            result["memory"][name] = measure_memory(spec)
        if {"ours", "hf"} <= set(result["memory"]):
            key = "peak_allocated_bytes" if device.type == "cuda" else "peak_rss_bytes"
            result["memory"]["ratio"] = result["memory"]["ours"][key] / result["memory"]["hf"][key]

    if "onnx" in cfg.tasks and "ours" in models:
        result["onnx"] = _bench_onnx(ours, cfg, device, log)

    result["machine"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return result


def _clone_for_training(m: nn.Module, device: torch.device) -> nn.Module:
    import copy

    return copy.deepcopy(m).to(device).train()


def _summarise(t: dict[str, dict[str, Any]], batch: int) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for name, r in t.items():
        row[name] = dict(
            images_per_s=batch / r["seconds"],
            seconds_per_call=r["seconds"],
            samples_s=r["samples"],
            first_call_s=r["first_call_s"],
            page_faults_per_call=r["page_faults_per_call"],
            kernel_s_per_call=r["kernel_s_per_call"],
        )
        if name.endswith("_compiled"):
            row[name]["compile_s"] = r["first_call_s"] - r["seconds"]
    for key, name, other in _SPEEDUPS:
        if name in t and other in t:
            row[key] = _median_ratio(t[name]["samples"], t[other]["samples"])
    return row


# The ratios a row reports where both contestants ran: (key, contestant, the one it is compared with).
_SPEEDUPS = (
    ("speedup_vs_hf", "ours", "hf"),
    ("compiled_speedup_vs_eager", "ours_compiled", "ours"),
    ("compiled_speedup_vs_hf", "ours_compiled", "hf"),
    ("compiled_speedup_vs_compiled_hf", "ours_compiled", "hf_compiled"),
    ("compiled_hf_speedup_vs_hf", "hf_compiled", "hf"),
)


def _bench_onnx(ours: nn.Module, cfg: BenchConfig, device: torch.device, log: Callable[[str], None]) -> dict:
    """ONNX Runtime (CPU) on our exported model against our PyTorch forward, interleaved, per inference batch."""
    import numpy as np
    import onnxruntime as ort

    from .export import export_onnx

    if device.type != "cpu":
        raise ValueError("the ONNX Runtime comparison runs on CPU only (use --device cpu)")
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        log("exporting to ONNX")
        start = time.perf_counter()
        export_onnx(ours, path, img_size=cfg.img_size)
        out["export_s"] = time.perf_counter() - start
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        opts.inter_op_num_threads = 1
        # ONNX Runtime's threads spin-wait after each run by default, which would steal the cores from the
        # PyTorch calls interleaved with it
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        g = torch.Generator().manual_seed(cfg.seed)
        for batch in cfg.infer_batches:
            x = torch.randn(batch, ours.cfg.in_chans, cfg.img_size, cfg.img_size, generator=g)
            xn = x.numpy()
            with torch.inference_mode():
                ref = ours(x)
            got = session.run(None, {"images": xn})[0]
            diff = float(np.abs(got - ref.numpy()).max())

            def torch_call():
                with torch.inference_mode():
                    return ours(x)

            calls = {"ours": torch_call, "onnxruntime": lambda: session.run(None, {"images": xn})}
            log(f"ONNX Runtime vs PyTorch, batch {batch}: {cfg.rounds} round(s)")
            t = interleaved(calls, device, cfg.rounds, cfg.min_time)
            row = _summarise(t, batch)
            row["onnxruntime_vs_torch"] = _median_ratio(t["onnxruntime"]["samples"], t["ours"]["samples"])
            row["max_abs_diff"] = diff
            out[str(batch)] = row
    out["onnxruntime"] = ort.__version__
    return out


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------
def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def to_markdown(r: dict) -> str:
    """The results as a Markdown section: machine, command, then one table per measured quantity."""
    c, m = r["config"], r["machine"]
    lines = [
        f"### {c['model']}, {c['img_size']}x{c['img_size']}, {c['device']} {c['dtype']}"
        + (f", torch.compile mode {c.get('compile_mode', 'default')}" if c.get("compile") else "")
        + (" (the port compiled too)" if c.get("compile_port") else ""),
        "",
        f"- machine: {m['cpu']} ({m['cpu_count']} CPUs, {m['torch_threads']} torch threads)"
        + (f", GPU {m['gpu']}" if m.get("gpu") else ""),
        f"- versions: python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, "
        f"onnxruntime {m['onnxruntime']}, cvt {m['cvt']}",
        f"- load average at start / end: {_load(m.get('load_average'))} / {_load(m.get('load_average_end'))}",
        f"- command: `{r.get('command') or 'run_benchmark(...)'}`",
        "- allocator: "
        + (" ".join(f"`{k}={v}`" for k, v in m["allocator_env"].items()) if m.get("allocator_env")
           else "the system's defaults"),
        f"- {c['rounds']} round(s), implementations alternating within each; medians; ratios are medians of the "
        "per-round ratios",
    ]
    if "max_abs_logit_diff" in r:
        lines.append(f"- same weights in both; max |logit difference| {r['max_abs_logit_diff']:.1e}")
    lines.append(f"- our forward: {r['model']['macs_per_image'] / 1e9:.2f} GMACs per image, {r['model']['params']:,} parameters")
    lines.append("")
    rows = []
    cpu = c["device"] == "cpu"
    for task, label in (("infer", "inference"), ("train", "training step")):
        for batch, row in r.get(task, {}).items():
            for name in ("ours", "hf", "ours_compiled", "hf_compiled"):
                if name not in row:
                    continue
                e = row[name]
                note = []
                if name == "ours" and "speedup_vs_hf" in row:
                    note.append(f"**{row['speedup_vs_hf']:.2f}x** the port")
                if "fraction_of_matmul" in e:
                    note.append(f"{e['fraction_of_matmul'] * 100:.0f}% of matmul rate")
                if name == "ours_compiled":
                    if "compiled_speedup_vs_hf" in row:
                        note.append(f"**{row['compiled_speedup_vs_hf']:.2f}x** the port")
                    if "compiled_speedup_vs_compiled_hf" in row:
                        note.append(f"**{row['compiled_speedup_vs_compiled_hf']:.2f}x** the compiled port")
                    note.append(f"{row['compiled_speedup_vs_eager']:.2f}x eager, compile {e['compile_s']:.0f} s")
                if name == "hf_compiled":
                    note.append(f"{row['compiled_hf_speedup_vs_hf']:.2f}x eager, compile {e['compile_s']:.0f} s")
                cells = [label, batch, _NAMES[name], f"{e['images_per_s']:.2f}"]
                if cpu:  # results from before the fault counter have an empty cell
                    faults = e.get("page_faults_per_call")
                    cells.append("" if faults is None else f"{faults:,.0f} / {e['kernel_s_per_call']:.2f} s")
                rows.append("| " + " | ".join(map(str, [*cells, "; ".join(note)])) + " |")
    if rows:
        # where allocation costs show on a CPU: pages faulted in fresh, zero-filled in kernel time
        header = ["measurement", "batch", "implementation", "images/s"]
        header += ["page faults / kernel time per call"] if cpu else []
        header.append("notes")
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *rows, ""]
    if "matmul" in r:
        mm = r["matmul"]
        lines.append(
            f"Matmul {mm['n']}x{mm['n']} ({mm['dtype']}): {2 * mm['macs_per_s'] / 1e9:.1f} GFLOP/s "
            f"({mm['macs_per_s'] / 1e9:.1f} GMAC/s), median over all alternations; \"% of matmul rate\" is our "
            "forward's MACs per second over the matmul's (training step: 3x the forward's MACs), median of the "
            "per-round ratios."
        )
        lines.append("")
    if "memory" in r:
        mem = r["memory"]
        key = "peak_allocated_bytes" if c["device"].startswith("cuda") else "peak_rss_bytes"
        what = "peak allocated (CUDA)" if key == "peak_allocated_bytes" else "peak RSS"
        lines += [
            f"| training-step memory, batch {c['train_batch']} | {what} | before the steps |",
            "|---|---|---|",
        ]
        for name in ("ours", "hf"):
            if name in mem:
                gc = " (gradient checkpointing)" if name == "ours" and c.get("grad_checkpointing") else ""
                lines.append(f"| {_NAMES[name]}{gc} | {_gb(mem[name][key])} | {_gb(mem[name]['rss_before_steps_bytes'])} RSS |")
        if "ratio" in mem:
            lines.append(f"| ratio ours / port | **{mem['ratio']:.2f}** | |")
        lines.append("")
    if "onnx" in r:
        o = r["onnx"]
        lines += [
            f"ONNX Runtime {o['onnxruntime']} (CPU) on the exported model, against our PyTorch forward "
            f"(export took {o['export_s']:.0f} s):",
            "",
            "| batch | PyTorch images/s | ONNX Runtime images/s | ORT / PyTorch | max abs diff |",
            "|---|---|---|---|---|",
        ]
        for batch, row in o.items():
            if isinstance(row, dict):
                lines.append(
                    f"| {batch} | {row['ours']['images_per_s']:.2f} | {row['onnxruntime']['images_per_s']:.2f} | "
                    f"{row['onnxruntime_vs_torch']:.2f}x | {row['max_abs_diff']:.1e} |"
                )
        lines.append("")
    return "\n".join(lines)


_NAMES = {"ours": "cvt (ours)", "hf": "transformers port", "ours_compiled": "cvt + torch.compile",
          "hf_compiled": "transformers port + torch.compile"}


def _load(v: Sequence[float] | None) -> str:
    return "n/a" if not v else " ".join(f"{x:.2f}" for x in v)


def write_markdown_section(path: str | os.PathLike, key: str, text: str) -> None:
    """Put `text` into the Markdown file between `<!-- bench:key -->` markers, replacing an earlier section with
    the same key and leaving the rest of the file (hand-written notes) as it is; appends when new."""
    start, end = f"<!-- bench:{key} -->", f"<!-- /bench:{key} -->"
    block = f"{start}\n{text.rstrip()}\n{end}\n"
    try:
        with open(path) as f:
            old = f.read()
    except FileNotFoundError:
        old = "# Benchmark results\n\n"
    if start in old and end in old:
        head, rest = old.split(start, 1)
        new = head + block + rest.split(end, 1)[1].lstrip("\n")
    else:
        new = old.rstrip("\n") + "\n\n" + block
    atomic_write(Path(path), lambda p: p.write_text(new))  # the hand-written notes survive a crash mid-write


def cpu_tag(cpu: str) -> str:
    """A short name for a CPU model: "AMD EPYC 9R14 96-Core Processor" -> "amd-epyc", "Intel(R) Xeon(R)
    Processor" -> "intel-xeon"."""
    words = [w for w in re.sub(r"\((R|TM)\)", " ", cpu, flags=re.IGNORECASE).split() if w.isalpha()]
    return "-".join(w.lower() for w in words[:2]) or "cpu"


def section_key(cfg: dict, machine: dict | None = None) -> str:
    """A name for one benchmark setting on one kind of machine, so a rerun replaces its own section of RESULTS.md
    (CPU runs name the CPU: this project's machines have been AMD and Intel ones, whose figures differ). `machine`
    is a result's `machine_info`; without it, this machine and environment (before a run)."""
    machine = machine if machine is not None else dict(cpu=_cpu_model(), allocator_env=allocator_env())
    device = cfg["device"].split(":")[0]
    if device == "cpu":
        device = f"cpu-{cpu_tag(machine['cpu'])}"
    parts = [cfg["model"], str(cfg["img_size"]), device, cfg["dtype"], f"b{cfg['train_batch']}"]
    if cfg.get("grad_checkpointing"):
        parts.append("gc")
    if machine.get("allocator_env"):
        parts.append("malloc-env")  # a run with a tuned allocator does not replace the default one
    if cfg.get("compile"):
        mode = cfg.get("compile_mode", "default")
        parts.append(("compile" if mode == "default" else f"compile={mode}") + ("+port" if cfg.get("compile_port") else ""))
    tasks = tuple(cfg.get("tasks", ()))
    if set(tasks) != {"infer", "train", "memory", "matmul"} | ({"onnx"} & set(tasks)):
        parts.append("+".join(tasks))  # a partial run gets its own section instead of replacing the full one
    return "-".join(parts)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--memory-worker":
        print(json.dumps(memory_worker(json.loads(sys.argv[2]))))
    else:
        sys.exit("internal entry point: python -m cvt.bench --memory-worker SPEC_JSON (use `cvt bench`)")
