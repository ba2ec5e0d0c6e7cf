"""A benchmark result (`harness.run_benchmark`) as Markdown, and the sections of `benchmarks/RESULTS.md` it goes into.

Every name, row and ratio comes from the result's own contestants and baseline: a run with ResNet or ViT added
is written by the same code as the default one.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cvt.utils import write_text
from harness import DEFAULT_IMPLS, allocator_env, cpu_model


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def _load(v: Sequence[float] | None) -> str:
    return "n/a" if not v else " ".join(f"{x:.2f}" for x in v)


# The CPU targets against transformers' port (fp32): forward at the largest batch and training step at least these
# many times faster, training-step peak memory at most this fraction. Judged by the median of the per-round ratios.
TARGETS = {"forward": 1.5, "training step": 1.3, "peak memory": 0.8}


def _targets(r: dict[str, Any], label: Callable[[str], str]) -> list[str]:
    """The targets table, where ours ran against the port on a CPU: each median with its range, met or not."""
    c = r["config"]
    if c["device"] != "cpu" or c["baseline"] != "hf" or c.get("dtype", "fp32") != "fp32":
        return []
    found = []
    infer, train, mem = r.get("infer", {}), r.get("train", {}), r.get("memory", {})
    if infer:
        batch = max(infer, key=int)
        s = infer[batch].get("ours", {}).get("speedup_vs", {}).get("hf")
        if s:
            found.append((f"forward, batch {batch}", s, TARGETS["forward"], True))
    for batch, row in train.items():
        s = row.get("ours", {}).get("speedup_vs", {}).get("hf")
        if s:
            found.append((f"training step, batch {batch}", s, TARGETS["training step"], True))
    s = mem.get("ours", {}).get("ratio_vs", {}).get("hf")
    if isinstance(s, (int, float)):
        s = dict(median=s, min=s, max=s)
    if s:
        found.append((f"training-step peak memory, batch {c['train_batch']}", s, TARGETS["peak memory"], False))
    if not found:
        return []
    lines = [f"| target against {label('hf')} | median (range over the rounds) | target | met by the median |",
             "|---|---|---|---|"]
    for what, s, target, higher in found:
        met = s["median"] >= target if higher else s["median"] <= target
        worst = s["min"] if higher else s["max"]
        also = "" if (worst >= target if higher else worst <= target) else " (not in every round)"
        lines.append(f"| {what} | {s['median']:.2f}x ({s['min']:.2f}-{s['max']:.2f}) | "
                     f"{'>=' if higher else '<='} {target}x | {'yes' if met else '**no**'}{also if met else ''} |")
    return [*lines, ""]


def _ratio(s: dict[str, float], what: str = "", bold: bool = True) -> str:
    """A median ratio, then the spread of the per-round ratios: "**1.60x** transformers port (1.55-1.66)"."""
    median = f"**{s['median']:.2f}x**" if bold else f"{s['median']:.2f}x"
    return f"{median}{' ' + what if what else ''} ({s['min']:.2f}-{s['max']:.2f})"


def to_markdown(r: dict) -> str:
    """The results as a Markdown section: machine, command, then one table per measured quantity."""
    c, m = r["config"], r["machine"]
    who = r["contestants"]
    label = lambda name: who[name]["label"]  # noqa: E731
    lines = [
        f"### {c['model']}, {c['img_size']}x{c['img_size']}, {c['device']} {c['dtype']}"
        + (f", torch.compile mode {c.get('compile_mode', 'default')}" if c.get("compile") else "")
        + (" (the port compiled too)" if c.get("compile_port") else ""),
        "",
        f"- machine: {m['cpu']} ({m['cpu_count']} CPUs, {m['torch_threads']} torch threads)"
        + (f", GPU {m['gpu']}" if m.get("gpu") else ""),
        f"- versions: python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, "
        f"onnxruntime {m['onnxruntime']}, timm {m.get('timm')}, torchvision {m.get('torchvision')}, cvt {m['cvt']}",
        f"- load average at start / end: {_load(m.get('load_average'))} / {_load(m.get('load_average_end'))}",
        f"- command: `{r.get('command') or 'run_benchmark(...)'}`",
        "- allocator: "
        + (" ".join(f"`{k}={v}`" for k, v in m["allocator_env"].items()) if m.get("allocator_env")
           else "the system's defaults"),
        f"- {c['rounds']} round(s), contestants alternating within each; medians; ratios against "
        f"{label(c['baseline'])} (the baseline) are medians of the per-round ratios, their range in brackets",
    ]
    for name, diff in r.get("max_abs_logit_diff", {}).items():
        lines.append(f"- same weights in {label(name)} and {label(who[name]['same_function_as'])}; "
                     f"max |logit difference| {diff:.1e}")
    own = r["model"]
    lines.append(f"- our forward: {own['macs_per_image'] / 1e9:.2f} GMACs per image, {own['params']:,} parameters")
    for w in who.values():
        if w["family"] != "ours" and not w["compiled"] and w.get("macs_per_image"):
            lines.append(f"- {w['label']}: {w['macs_per_image'] / 1e9:.2f} GMACs per image, {w['params']:,} parameters")
    lines.append("")
    rows = []
    cpu = c["device"] == "cpu"
    for task, what in (("infer", "inference"), ("train", "training step")):
        for batch, row in r.get(task, {}).items():
            for name in who:
                if name not in row:
                    continue
                e = row[name]
                eager = name.removesuffix("+compile") if who[name]["compiled"] else None
                note = [_ratio(s, "eager", bold=False) if other == eager else _ratio(s, label(other))
                        for other, s in e.get("speedup_vs", {}).items()]
                if "fraction_of_matmul" in e:
                    note.append(f"{e['fraction_of_matmul'] * 100:.0f}% of matmul rate")
                if "compile_s" in e:
                    note.append(f"compile {e['compile_s']:.0f} s")
                cells = [what, batch, label(name), f"{e['images_per_s']:.2f}"]
                if cpu:
                    cells.append(f"{e['page_faults_per_call']:,.0f} / {e['kernel_s_per_call']:.2f} s")
                rows.append("| " + " | ".join(map(str, [*cells, "; ".join(note)])) + " |")
    if rows:
        # where allocation costs show on a CPU: pages faulted in fresh, zero-filled in kernel time
        header = ["measurement", "batch", "contestant", "images/s"]
        header += ["page faults / kernel time per call"] if cpu else []
        header.append("notes (speed-up: median, range over the rounds)")
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *rows, ""]
    if "matmul" in r:
        mm = r["matmul"]
        lines.append(
            f"Matmul {mm['n']}x{mm['n']} ({mm['dtype']}): {2 * mm['macs_per_s'] / 1e9:.1f} GFLOP/s "
            f"({mm['macs_per_s'] / 1e9:.1f} GMAC/s), median over all alternations; \"% of matmul rate\" is a "
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
        for name, e in mem.items():
            gc = " (gradient checkpointing)" if who[name]["family"] == "ours" and c.get("grad_checkpointing") else ""
            lines.append(f"| {label(name)}{gc} | {_gb(e[key])} | {_gb(e['rss_before_steps_bytes'])} RSS |")
        for name, e in mem.items():
            for other, ratio in e.get("ratio_vs", {}).items():
                if not isinstance(ratio, dict):  # results from before memory had rounds: one process each
                    ratio = dict(median=ratio, min=ratio, max=ratio)
                lines.append(f"| ratio {label(name)} / {label(other)} | **{ratio['median']:.2f}** "
                             f"({ratio['min']:.2f}-{ratio['max']:.2f}) | |")
        lines.append("")
    lines += _targets(r, label)
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
                ort = row["onnxruntime"]
                lines.append(
                    f"| {batch} | {row['ours']['images_per_s']:.2f} | {ort['images_per_s']:.2f} | "
                    f"{_ratio(ort['speedup_vs']['ours'], bold=False)} | {row['max_abs_diff']:.1e} |"
                )
        lines.append("")
    return "\n".join(lines)


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
    write_text(Path(path), new)  # atomically: the hand-written notes survive a crash mid-write


def cpu_tag(cpu: str) -> str:
    """A short name for a CPU model: "AMD EPYC 9R14 96-Core Processor" -> "amd-epyc", "Intel(R) Xeon(R)
    Processor" -> "intel-xeon"."""
    words = [w for w in re.sub(r"\((R|TM)\)", " ", cpu, flags=re.IGNORECASE).split() if w.isalpha()]
    return "-".join(w.lower() for w in words[:2]) or "cpu"


def section_key(cfg: dict, machine: dict | None = None) -> str:
    """A name for one benchmark setting on one kind of machine, so a rerun replaces its own section of RESULTS.md
    (CPU runs name the CPU: this project's machines have been AMD and Intel ones, whose figures differ). `machine`
    is a result's `machine_info`; without it, this machine and environment (before a run)."""
    machine = machine if machine is not None else dict(cpu=cpu_model(), allocator_env=allocator_env())
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
        parts.append(("compile" if mode == "default" else f"compile={mode}")
                     + ("+port" if cfg.get("compile_port") else ""))
    # Contestants beyond ours and the port, and a baseline other than the usual, name their own section (a subset
    # of ours and the port keeps the key it always had).
    impls = tuple(cfg.get("impls", DEFAULT_IMPLS))
    others = [n for n in impls if n not in DEFAULT_IMPLS]
    if others:
        parts.append("+".join(n.replace(":", "-") for n in others))
    usual = "hf" if "hf" in impls else impls[0]
    if cfg.get("baseline", usual) != usual:
        parts.append(f"vs-{cfg['baseline'].replace(':', '-')}")
    tasks = tuple(cfg.get("tasks", ()))
    if set(tasks) != {"infer", "train", "memory", "matmul"} | ({"onnx"} & set(tasks)):
        parts.append("+".join(tasks))  # a partial run gets its own section instead of replacing the full one
    return "-".join(parts)
