"""Speed and memory of several models measured side by side: the harness behind `benchmarks/bench.py`.

The contestants (`contestants.py`: this project's CvT, transformers' port with the same weights, any timm or
torchvision model by name, and `torch.compile`d versions of them) run in one process, alternately (A B C A B C ...,
a few rounds), and every figure is the median over the rounds: a slow period on a shared machine then hits all of
them, and the ratios stay fair. Each ratio is the median of the per-round ratios, reported with their spread
(min-max). The one thing that cannot share a process is peak memory, so each contestant's training step runs in a
fresh subprocess for that (`python benchmarks/harness.py --memory-worker SPEC`).

What is measured (`run_benchmark`):
- inference images/s at each of `infer_batches` (batch 1 is latency);
- a full training step (forward, cross-entropy, backward, AdamW step) in images/s at `train_batch`;
- the peak memory of a training step in its own process: peak RSS on CPU, peak allocated on CUDA;
- the rate of a large square matmul in the same run, and each contestant's forward multiply-accumulate rate
  (counted with `cvt.count_macs`) as a fraction of it: how close a model runs to what the machine can do;
- page faults and kernel time per call, where a CPU's allocation cost shows;
- optionally ONNX Runtime on our exported model, against our PyTorch forward.

Results are plain dicts (JSON); `report.py` writes them as the Markdown of `benchmarks/RESULTS.md`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:
    import resource  # Unix only
except ImportError:  # pragma: no cover - Windows
    resource = None

import torch
import torch.nn.functional as F
from torch import nn

import contestants
from cvt.layers.config import cpu_model
from cvt.recipe import COMPILE_MODES

HERE = Path(__file__).resolve().parent
DEFAULT_IMPLS = ("ours", "hf")
DEFAULT_BASELINE = "hf"
TASKS = ("infer", "train", "memory", "matmul", "onnx")
DTYPES = ("fp32", "bf16")


@dataclass(frozen=True)
class BenchConfig:
    model: str = "cvt_13"  # the registered cvt model of `ours`; every contestant gets its classes and channels
    img_size: int = 224
    infer_batches: tuple[int, ...] = (1, 32)
    train_batch: int = 32
    rounds: int = 5
    memory_rounds: int = 5  # fresh processes per contestant for peak memory, alternating between contestants
    device: str = "cpu"
    # "bf16": forward (and loss) under torch.autocast(bfloat16); weights and optimizer stay fp32.
    dtype: str = "fp32"
    threads: int | None = None  # CPU threads for every contestant (None: torch's default)
    impls: tuple[str, ...] = DEFAULT_IMPLS  # contestant names (contestants.py)
    # Every ratio is "X vs baseline". None: hf where it runs, else the first contestant.
    baseline: str | None = None
    tasks: tuple[str, ...] = ("infer", "train", "memory", "matmul")
    compile: bool = False  # also time ours+compile, with its compile time
    compile_port: bool = False  # with `compile`: hf+compile as well, for a compiled-vs-compiled ratio
    compile_mode: str = "default"  # torch.compile's mode; "reduce-overhead" captures CUDA graphs on a GPU
    grad_checkpointing: bool = False  # ours only (the port has none): for the memory figures
    min_time: float = 1.0  # seconds per timed measurement: short calls repeat until they fill it
    matmul_size: int = 2048
    seed: int = 0

    def __post_init__(self) -> None:
        bad = [v for v in self.tasks if v not in TASKS]
        if bad:
            raise ValueError(f"tasks: unknown {', '.join(bad)}; choose from {', '.join(TASKS)}")
        if not self.impls or len(set(self.impls)) != len(self.impls):
            raise ValueError(f"impls must name each contestant once, got {', '.join(self.impls) or 'none'}")
        for c in map(contestants.parse, self.impls):  # one line for a name no family knows
            if c.compiled and c.base not in self.impls:
                raise ValueError(f"{c.name} is timed beside {c.base}: add {c.base} to the contestants")
        names = self.contestants()
        baseline = self.baseline or (DEFAULT_BASELINE if DEFAULT_BASELINE in names else names[0])
        if baseline not in names:
            raise ValueError(f"baseline {baseline!r} is not among the contestants {', '.join(names)}")
        object.__setattr__(self, "baseline", baseline)  # the JSON records the one used
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.rounds < 1 or self.memory_rounds < 1 or self.train_batch < 1 or any(b < 1 for b in self.infer_batches):
            raise ValueError("rounds and batch sizes must be >= 1")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be one of {', '.join(COMPILE_MODES)}, got {self.compile_mode!r}")
        if self.compile_port and not self.compile:
            raise ValueError("compile_port (--compile-port) needs compile (--compile)")
        if (self.threads is not None and self.threads < 1) or self.matmul_size < 1 or self.min_time < 0:
            raise ValueError("threads and the matmul size must be >= 1, the minimum time >= 0")
        from cvt.engine import pick_device

        pick_device(self.device)  # one line for "foo", for "cuda" without a GPU and for "cuda:5" on one GPU

    def contestants(self) -> tuple[str, ...]:
        """Every contestant timed: `impls`, then the compiled ones `compile` and `compile_port` derive."""
        extra = [("ours", self.compile), ("hf", self.compile_port)]
        derived = [contestants.derived(n) for n, on in extra if on and n in self.impls]
        return tuple(self.impls) + tuple(d for d in derived if d not in self.impls)


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
    return per_call(fn, device, min_time)[0]


def _os_counters() -> tuple[float, float]:
    """(minor page faults, seconds of kernel CPU time) of this process so far; zeros where `resource` is missing."""
    if resource is None:
        return 0.0, 0.0
    r = resource.getrusage(resource.RUSAGE_SELF)
    return float(r.ru_minflt), r.ru_stime


def per_call(fn: Callable[[], Any], device: torch.device, min_time: float) -> tuple[float, float, float]:
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
            samples[name].append(per_call(fn, device, min_time))
    _sync(device)
    out = {}
    for name, rows in samples.items():
        seconds, faults, kernel = (list(column) for column in zip(*rows))
        out[name] = dict(
            seconds=statistics.median(seconds), samples=seconds, first_call_s=first[name],
            page_faults_per_call=statistics.median(faults), kernel_s_per_call=statistics.median(kernel),
        )
    return out


def speedup(a: list[float], b: list[float]) -> dict[str, float]:
    """How many times faster the calls timed `a` ran than those timed `b`: the median of the per-round ratios
    b/a (rounds pair up in time, so this is the fairest ratio on a machine whose speed drifts) and their spread."""
    ratios = [y / x for x, y in zip(a, b)]
    return dict(median=statistics.median(ratios), min=min(ratios), max=max(ratios))


# ---------------------------------------------------------------------------------------------------------------
# Machine description
# ---------------------------------------------------------------------------------------------------------------


# Environment variables that change how memory is allocated, inherited by the memory workers. CPU tensors have no
# caching allocator in PyTorch, so glibc's settings decide how often large ones are faulted in fresh from the
# kernel: with `MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647` freed memory is reused instead
# (RESULTS.md: the port's CPU times move most).
ALLOCATOR_ENV_PREFIXES = ("MALLOC_", "GLIBC_TUNABLES", "LD_PRELOAD", "THP_MEM_ALLOC_ENABLE")


def allocator_env() -> dict[str, str]:
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith(ALLOCATOR_ENV_PREFIXES)}


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = dict(
        cpu=cpu_model(),
        allocator_env=allocator_env(),
        cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        platform=platform.platform(),
        python=platform.python_version(),
        torch=torch.__version__,
        gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        load_average=list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    )
    for module in ("transformers", "onnxruntime", "cvt", "timm", "torchvision"):
        try:
            info[module] = __import__(module).__version__
        except ImportError:
            info[module] = None
    return info


def cvt_cli(cmd: list[str]) -> list[str]:
    """A `cvt ...` command line as this interpreter runs it (`python -m cvt ...`): the scripts print `cvt ...` for
    the reader but must not depend on the virtual environment's bin/ being on PATH."""
    return [sys.executable, "-m", "cvt", *cmd[1:]] if cmd[:1] == ["cvt"] else cmd


# ---------------------------------------------------------------------------------------------------------------
# Peak memory of a training step, one fresh process per contestant
# ---------------------------------------------------------------------------------------------------------------
def peak_rss_bytes() -> int:
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
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB, macOS bytes


def train_step_fn(model: nn.Module, device: torch.device, dtype: str, batch: int, img_size: int, seed: int = 0,
                  *, num_classes: int | None = None, in_chans: int | None = None):
    """A closure running one training step (forward, cross-entropy, backward, AdamW) on a fixed random batch.
    The classes and channels default to a cvt model's (or the port's) own."""
    if num_classes is None or in_chans is None:
        if hasattr(model, "cfg"):
            own = model.cfg.num_classes, model.cfg.in_chans
        else:  # transformers' port, wrapped as images -> logits
            own = model.model.config.num_labels, model.model.config.num_channels
        num_classes = own[0] if num_classes is None else num_classes
        in_chans = own[1] if in_chans is None else in_chans
    g = torch.Generator().manual_seed(seed)
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
    """Run in a fresh process: build one contestant, take two training steps (the first creates AdamW's state),
    report the process's peak memory. Every contestant's process imports the same libraries first (`packages`:
    those of the whole run, and transformers, as every figure in RESULTS.md had), so the baseline they share is
    the same."""
    for package in ("transformers", *spec.get("packages", ())):
        with contextlib.suppress(ImportError):
            __import__(package)

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec.get("seed", 0))
    device = torch.device(spec["device"])
    setting = contestants.Setting(**spec["setting"])
    model = contestants.build(contestants.parse(spec["impl"]), setting).to(device)
    step = train_step_fn(model, device, spec["dtype"], spec["batch"], setting.img_size,
                         num_classes=setting.num_classes, in_chans=setting.in_chans)
    rss_before = peak_rss_bytes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(spec.get("steps", 2)):
        step()
    _sync(device)
    out = dict(
        impl=spec["impl"],
        peak_rss_bytes=peak_rss_bytes(),
        rss_before_steps_bytes=rss_before,
        seconds=time.perf_counter() - start,
        steps=spec.get("steps", 2),
    )
    if device.type == "cuda":
        out["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    return out


class MeasurementError(ValueError):
    """A measuring subprocess failed (out of memory, a missing library, a model the port cannot build); the
    message carries the child's last line. A ValueError so the command shows it as one line: the child's own
    traceback is in its stderr, not in this process, so ours would only point at this function."""


def measure_memory(spec: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
    """`memory_worker(spec)` in a fresh Python process; raises MeasurementError with the child's error on failure."""
    cmd = [sys.executable, str(HERE / "harness.py"), "--memory-worker", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
        raise MeasurementError(f"memory measurement of {spec['impl']} failed: {tail[0]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------------------------
def run_benchmark(cfg: BenchConfig, log: Callable[[str], None] | None = None, command: str | None = None) -> dict:
    """Run the benchmark `cfg` describes; returns a JSON-serialisable dict (`report.to_markdown` writes it)."""
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg, log or (lambda _msg: None), command)
    finally:
        torch.set_num_threads(threads)


def _comparisons(c: contestants.Contestant, baseline: str) -> list[str]:
    """Whom contestant `c` is compared with: the baseline; a compiled one also its eager self and the compiled
    baseline, where they run."""
    others = [baseline]
    if c.compiled:
        others += [c.base, contestants.derived(baseline)]
    return [o for o in dict.fromkeys(others) if o != c.name]


def _run(cfg: BenchConfig, log: Callable[[str], None], command: str | None) -> dict:
    from cvt.flops import count_macs

    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    setting = contestants.Setting.of(cfg.model, cfg.img_size, cfg.grad_checkpointing)
    entrants = [contestants.parse(n) for n in cfg.contestants()]
    # ours is always built: its weights go into the port, and its MACs are the model's figures.
    ours = contestants.build(contestants.parse("ours"), dataclasses.replace(setting, grad_checkpointing=False))
    ours = ours.to(device).eval()
    macs = count_macs(ours, cfg.img_size)
    result: dict[str, Any] = dict(
        config=dataclasses.asdict(cfg),
        command=command,
        machine=machine_info(device),
        model=dict(name=cfg.model, macs_per_image=macs, params=sum(p.numel() for p in ours.parameters())),
        contestants={},
    )

    # The eager models, then their compiled versions ("<name>+compile").
    models: dict[str, nn.Module] = {}
    macs_of: dict[str, int | None] = {}
    for c in entrants:
        if c.compiled:
            continue
        models[c.name] = ours if c.name == "ours" else contestants.build(c, setting, ours).to(device).eval()
        # MACs of a model of its own; one computing another's function is measured by the speed ratio alone.
        # count_macs feeds 3 channels to a model without a cvt config.
        if c.name == "ours":
            macs_of[c.name] = macs
        elif c.same_function_as is None and (hasattr(models[c.name], "cfg") or setting.in_chans == 3):
            macs_of[c.name] = count_macs(models[c.name], cfg.img_size)
        else:
            macs_of[c.name] = None
    for c in entrants:
        if c.compiled:
            models[c.name] = torch.compile(models[c.base], mode=cfg.compile_mode, dynamic=False)
            macs_of[c.name] = macs_of[c.base]
    for c in entrants:
        result["contestants"][c.name] = dict(contestants.info(c, models[c.base]), macs_per_image=macs_of[c.name])
    in_chans = setting.in_chans
    g = torch.Generator().manual_seed(cfg.seed)

    # A contestant computing another's function with its weights (the port) is checked against it before timing.
    for c in entrants:
        if not c.compiled and c.same_function_as in models:
            x = torch.randn(2, in_chans, cfg.img_size, cfg.img_size, generator=g).to(device)
            with torch.inference_mode():
                diff = (models[c.same_function_as](x) - models[c.name](x)).abs().max().item()
            result.setdefault("max_abs_logit_diff", {})[c.name] = diff
            log(f"same weights, same function as {c.same_function_as}: {c.name}'s max |logit diff| {diff:.2e}")

    # The matmul runs as one more contestant in every alternation, so its rate is measured under the same
    # conditions as the models it is compared with.
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

    def alternate(calls: dict[str, Callable[[], Any]], batch: int, passes: int) -> dict[str, Any]:
        """One row: the calls interleaved (with the matmul), their ratios, and each model's share of the matmul
        rate (`passes`: the forward's MACs per image times this; a training step counts 3)."""
        if mm_call is not None:
            calls = dict(calls, matmul=mm_call)
        t = interleaved(calls, device, cfg.rounds, cfg.min_time)
        mm = t.pop("matmul", None)
        row = _summarise(t, batch, entrants, cfg.baseline)
        if mm is not None:
            mm_samples.extend(mm["samples"])
            row["matmul_macs_per_s"] = cfg.matmul_size**3 / mm["seconds"]
            for name in t:
                if macs_of.get(name):
                    if passes == 1:
                        row[name]["macs_per_s"] = macs_of[name] * row[name]["images_per_s"]
                    row[name]["fraction_of_matmul"] = fraction_of_matmul(t[name], mm, passes * macs_of[name] * batch)
        return row

    if "infer" in cfg.tasks:
        result["infer"] = {}
        for batch in cfg.infer_batches:
            x = torch.randn(batch, in_chans, cfg.img_size, cfg.img_size, generator=g).to(device)
            calls = {}
            for name, m in models.items():
                def call(m=m, x=x):
                    with torch.inference_mode(), _autocast(device, cfg.dtype):
                        return m(x)

                calls[name] = call
            log(f"inference, batch {batch}: {cfg.rounds} round(s) of {', '.join(calls)}"
                + (", matmul" if mm_call else ""))
            result["infer"][str(batch)] = alternate(calls, batch, passes=1)

    if "train" in cfg.tasks:
        calls = {}
        for c in entrants:  # a copy of each model in training mode; compiled ones compile their own copy
            tm = _clone_for_training(models[c.base], device)
            if c.compiled:
                tm = torch.compile(tm, mode=cfg.compile_mode, dynamic=False)
            calls[c.name] = train_step_fn(tm, device, cfg.dtype, cfg.train_batch, cfg.img_size, cfg.seed,
                                          num_classes=setting.num_classes, in_chans=in_chans)
        log(f"training step, batch {cfg.train_batch}: {cfg.rounds} round(s) of {', '.join(calls)}")
        # Model FLOP utilization of the step: forward + backward counted as 3x the forward's MACs (the usual
        # convention; BatchNorm, softmax and the optimizer are not counted), against the matmul's rate.
        result["train"] = {str(cfg.train_batch): alternate(calls, cfg.train_batch, passes=3)}
        del calls

    if mm_samples:
        rate = cfg.matmul_size**3 / statistics.median(mm_samples)
        result["matmul"] = dict(n=cfg.matmul_size, dtype=cfg.dtype, macs_per_s=rate, samples_s=mm_samples)

    if "memory" in cfg.tasks:
        result["memory"] = _memory(cfg, entrants, setting, device, log)

    if "onnx" in cfg.tasks and "ours" in models:
        result["onnx"] = _bench_onnx(ours, cfg, device, log)

    result["machine"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return result


def _memory(cfg: BenchConfig, entrants: list[contestants.Contestant], setting: contestants.Setting,
            device: torch.device, log: Callable[[str], None]) -> dict[str, Any]:
    """Peak memory of a training step, each contestant in a fresh process, `memory_rounds` rounds alternating
    between them: per contestant the median round (its figures) and every round's peak; against the baseline the
    median of the per-round ratios and their range."""
    packages = sorted({p for c in entrants for p in c.packages})
    key = "peak_allocated_bytes" if device.type == "cuda" else "peak_rss_bytes"
    eager = [c for c in entrants if not c.compiled]  # an eager model's memory; a compiled one is its own study
    rounds: dict[str, list[dict[str, Any]]] = {c.name: [] for c in eager}
    for i in range(cfg.memory_rounds):
        for c in eager:
            spec = dict(
                impl=c.name, setting=dataclasses.asdict(setting), device=cfg.device, dtype=cfg.dtype,
                batch=cfg.train_batch, threads=cfg.threads or torch.get_num_threads(), seed=cfg.seed,
                packages=packages,
            )
            log(f"peak memory of a training step, batch {cfg.train_batch}: {c.name} (own process, round {i + 1}/"
                f"{cfg.memory_rounds})")
            rounds[c.name].append(measure_memory(spec))
    out: dict[str, Any] = {}
    for name, runs in rounds.items():
        median = sorted(runs, key=lambda r: r[key])[(len(runs) - 1) // 2]
        out[name] = {**median, "samples_bytes": [r[key] for r in runs]}
    base = rounds.get(cfg.baseline)
    for name, runs in rounds.items():
        if base is not None and name != cfg.baseline:
            # a ratio below 1 is less memory: speedup(a, b) is the median of b/a, so the baseline goes first
            out[name]["ratio_vs"] = {cfg.baseline: speedup([r[key] for r in base], [r[key] for r in runs])}
    return out


def _clone_for_training(m: nn.Module, device: torch.device) -> nn.Module:
    return copy.deepcopy(m).to(device).train()


def _summarise(t: dict[str, dict[str, Any]], batch: int, entrants: list[contestants.Contestant],
               baseline: str) -> dict[str, Any]:
    row: dict[str, Any] = {}
    compiled = {c.name for c in entrants if c.compiled}
    for name, r in t.items():
        row[name] = dict(
            images_per_s=batch / r["seconds"],
            seconds_per_call=r["seconds"],
            samples_s=r["samples"],
            first_call_s=r["first_call_s"],
            page_faults_per_call=r["page_faults_per_call"],
            kernel_s_per_call=r["kernel_s_per_call"],
        )
        if name in compiled:
            row[name]["compile_s"] = r["first_call_s"] - r["seconds"]
    for c in entrants:
        if c.name in t:
            vs = {o: speedup(t[c.name]["samples"], t[o]["samples"]) for o in _comparisons(c, baseline) if o in t}
            if vs:
                row[c.name]["speedup_vs"] = vs
    return row


def _bench_onnx(ours: nn.Module, cfg: BenchConfig, device: torch.device, log: Callable[[str], None]) -> dict:
    """ONNX Runtime (CPU) on our exported model against our PyTorch forward, interleaved, per inference batch."""
    import numpy as np
    import onnxruntime as ort

    from cvt.export import export_onnx

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

            def torch_call(x=x):
                with torch.inference_mode():
                    return ours(x)

            calls = {"ours": torch_call, "onnxruntime": lambda xn=xn: session.run(None, {"images": xn})}
            log(f"ONNX Runtime vs PyTorch, batch {batch}: {cfg.rounds} round(s)")
            t = interleaved(calls, device, cfg.rounds, cfg.min_time)
            row = _summarise(t, batch, [], cfg.baseline)
            row["onnxruntime"]["speedup_vs"] = {"ours": speedup(t["onnxruntime"]["samples"], t["ours"]["samples"])}
            row["max_abs_diff"] = diff
            out[str(batch)] = row
    out["onnxruntime"] = ort.__version__
    return out


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--memory-worker":
        print(json.dumps(memory_worker(json.loads(sys.argv[2]))))
    else:
        sys.exit("internal entry point: python benchmarks/harness.py --memory-worker SPEC_JSON "
                 "(use python benchmarks/bench.py)")
