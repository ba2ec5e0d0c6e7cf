"""The comparison's figures as tables and plots, from benchmarks/results/issue23/*.json alone (nothing is run):

    python benchmarks/comparison.py report

writes the plots to docs/img/comparison/ and the tables into docs/comparison.md, between its
`<!-- measured:begin -->` and `<!-- measured:end -->` lines (the prose around them is written by hand).
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from comparison import RESULTS
from comparison import load as _load

HERE = Path(__file__).resolve().parent
DOC = HERE.parent / "docs" / "comparison.md"
IMG = HERE.parent / "docs" / "img" / "comparison"
BEGIN, END = "<!-- measured:begin -->", "<!-- measured:end -->"
FAMILY_OF = {"cvt": "CvT", "resnet": "ResNet", "vit": "ViT"}
COLOURS = {"CvT": "tab:blue", "ResNet": "tab:green", "ViT": "tab:red", "Swin": "tab:purple"}


def _mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f} (1 seed)"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f} ({len(values)} seeds)"


def _machine(data: dict[str, Any]) -> str:
    m = data.get("machine", {})
    return (f"{m.get('cpu', '?')} ({m.get('cpu_count', '?')} CPUs, {m.get('torch_threads', '?')} torch threads), "
            f"torch {m.get('torch', '?')}, {data.get('date') or m.get('date') or ''}").rstrip(", ")


def _slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log y against log x (NaN from fewer than two sides)."""
    if len(set(xs)) < 2:
        return float("nan")
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = statistics.mean(lx), statistics.mean(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


# ---------------------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------------------
def scratch_table(runs: dict[str, Any]) -> list[str]:
    lines = ["| size | family | model | params | test top-1 % | held-out top-1 % | images seen | training s | "
             "images/s |", "|---|---|---|---:|---|---|---:|---:|---:|"]
    for size in ("small", "base"):
        for f in FAMILY_OF:
            rs = [r for r in runs.values() if r["contestant"] == f"{f}_{size}" and r["fraction"] == 1]
            if not rs:
                continue
            model = rs[0]["command"].split("--model ")[1].split()[0]
            lines.append(
                f"| {size} | {FAMILY_OF[f]} | `{model}` | {rs[0]['params']:,} | "
                f"{_mean_sd([r['test_top1'] for r in rs])} | {_mean_sd([r['val_top1'] for r in rs])} | "
                f"{rs[0]['images_seen']:,} | {statistics.mean(r['train_seconds'] for r in rs):.0f} | "
                f"{statistics.mean(r['images_per_s'] for r in rs):.0f} |")
    return lines


def data_table(runs: dict[str, Any]) -> list[str]:
    fractions = sorted({r["fraction"] for r in runs.values() if r["group"] in ("data", "scratch")})
    lines = ["| family | " + " | ".join(f"{f:g} of the training set" for f in fractions) + " |",
             "|---|" + "---:|" * len(fractions)]
    for f in FAMILY_OF:
        cells = []
        for fraction in fractions:
            r = runs.get(f"{f}_small_s0_f{fraction:g}")
            cells.append(f"{r['test_top1']:.2f} ({r['train_images']:,} images x {r['epochs']} epochs)" if r else "")
        lines.append(f"| {FAMILY_OF[f]} | " + " | ".join(cells) + " |")
    return lines


def ablation_table(runs: dict[str, Any]) -> list[str]:
    lines = ["| model (seed 0) | params | test top-1 % | held-out top-1 % | training s |", "|---|---:|---:|---:|---:|"]
    for key in ("cvt_small_s0_f1", "cvt_small_pos_s0_f1", "cvt_small_linear_s0_f1", "vit_small_s0_f1",
                "vit_small_nopos_s0_f1"):
        r = runs.get(key)
        if r:
            lines.append(f"| {r['family']} (`{key}`) | {r['params']:,} | {r['test_top1']:.2f} | {r['val_top1']:.2f} | "
                         f"{r['train_seconds']:.0f} |")
    return lines


SHIFT_VIEWS = {"window": "28 px window (the training side)", "canvas": "whole 36 px canvas"}


def shift_table(shift: dict[str, Any]) -> list[str]:
    lines = ["| size | family | model input | consistency % (Zhang) | same prediction 1 px apart, x / y % | "
             "accuracy over offsets, min-max % | mean % |", "|---|---|---|---|---|---|---|"]
    models = shift.get("models", {})
    for size in ("small", "base"):
        for f in FAMILY_OF:
            for view, label in SHIFT_VIEWS.items():
                rs = [v[view] for k, v in models.items() if k.startswith(f"{f}_{size}_s")]
                if rs:
                    lines.append(
                        f"| {size} | {FAMILY_OF[f]} | {label} | {_mean_sd([r['consistency'] for r in rs])} | "
                        f"{statistics.mean(r['adjacent_same_x'] for r in rs):.2f} / "
                        f"{statistics.mean(r['adjacent_same_y'] for r in rs):.2f} | "
                        f"{min(r['accuracy_min'] for r in rs):.2f}-{max(r['accuracy_max'] for r in rs):.2f} | "
                        f"{statistics.mean(r['accuracy_mean'] for r in rs):.2f} |")
    return lines


def attention_table(att: dict[str, Any]) -> list[str]:
    lines = ["| model (seed 0) | layer | query / key grid | mean distance per head, px | uniform attention, px |",
             "|---|---|---|---|---:|"]
    for key, rows in att.get("models", {}).items():
        for r in rows:
            layer = f"stage {r['stage']} block {r['block']}" if "stage" in r else f"block {r['block']}"
            heads = ", ".join(f"{h:.1f}" for h in r["heads"])
            grids = f"{'x'.join(map(str, r['query_grid']))} / {'x'.join(map(str, r['key_grid']))}"
            lines.append(f"| `{key}` | {layer} | {grids} | {heads} | {r['uniform']:.1f} |")
    return lines


def hierarchy_table(h: dict[str, Any]) -> list[str]:
    lines = ["| model | family | side | output strides (`feature_info`) | channels | pyramid levels | "
             "torchvision FPN as it is |", "|---|---|---:|---|---|---:|---|"]
    for name, r in h.get("models", {}).items():
        fpn = "yes" if r["fpn_takes_it"] else "no: timm gives its maps channels-last (NHWC), permute first"
        lines.append(f"| `{name}` | {r['family']} | {r['side']} | {', '.join(map(str, r['reductions']))} | "
                     f"{', '.join(map(str, r['channels']))} | {len(set(r['reductions']))} | {fpn} |")
    return lines


def posenc_table(p: dict[str, Any]) -> list[str]:
    models = p.get("models", {})
    if not models:
        return []
    cols = list(next(iter(models.values())))
    lines = ["| model (seed 0) | " + " | ".join(c.replace("_", " ") + " px" for c in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for key, row in models.items():
        lines.append(f"| `{key}` | " + " | ".join(f"{row.get(c, float('nan')):.2f}" for c in cols) + " |")
    return lines


def resolution_tables(res: dict[str, Any]) -> list[str]:
    sides = sorted(res.get("sides", {}), key=int)
    if not sides:
        return []
    names = list(res["sides"][sides[0]])
    lines = [f"Batch {res['batch']} for every model; images/s are medians over {res['rounds']} alternating rounds; "
             "activation memory is the training process's peak RSS less its RSS before the first step.", "",
             "| side | " + " | ".join(res["sides"][sides[0]][n]["label"] for n in names) + " |",
             "|---:|" + "---|" * len(names)]
    for side in sides:
        row = res["sides"][side]
        cells = [f"{row[n]['infer_images_per_s']:.1f} / {row[n]['train_images_per_s']:.2f} / "
                 f"{(row[n]['peak_rss_bytes'] - row[n]['rss_before_steps_bytes']) / 2**20:.0f} MiB" for n in names]
        lines.append(f"| {side} | " + " | ".join(cells) + " |")
    lines += ["", "Log-log slopes against pixel count (1: linear in pixels, 2: quadratic), over all sides and over "
              f"{sides[len(sides) // 2]} px and up:", "",
              "| model | inference time | training-step time | activation memory | MACs |", "|---|---|---|---|---|"]
    for n in names:
        cells = []
        for key in ("infer", "train", "memory", "macs"):
            pts = []
            for side in sides:
                r = res["sides"][side][n]
                y = {"infer": 1 / r["infer_images_per_s"], "train": 1 / r["train_images_per_s"],
                     "memory": max(1, r["peak_rss_bytes"] - r["rss_before_steps_bytes"]),
                     "macs": r["macs_per_image"] or float("nan")}[key]
                pts.append((int(side) ** 2, y))
            if any(math.isnan(y) for _, y in pts):
                cells.append("")
                continue
            upper = pts[len(pts) // 2:]
            cells.append(f"{_slope(*zip(*pts)):.2f} / {_slope(*zip(*upper)):.2f}")
        lines.append(f"| {res['sides'][sides[0]][n]['label']} | " + " | ".join(cells) + " |")
    return lines


def kv_tables(kv: dict[str, Any]) -> list[str]:
    lines = []
    acc = kv.get("accuracy", {})
    if acc:
        strides = list(next(iter(acc.values())))
        lines += ["| small CvT, stage-1 k/v stride | " + " | ".join(strides) + " |", "|---|" + "---:|" * len(strides),
                  "| test top-1 % | " + " | ".join(_mean_sd([r[s] for r in acc.values()]) for s in strides) + " |", ""]
    speed = kv.get("speed", {})
    if speed:
        lines += ["| CvT-13 side | stage-1 k/v stride | GMACs per image | inference images/s | training images/s |",
                  "|---:|---:|---:|---:|---:|"]
        for side, rows in speed.items():
            for stride, r in rows.items():
                lines.append(f"| {side} | {stride} | {r['macs_per_image'] / 1e9:.2f} | {r['infer_images_per_s']:.2f} | "
                             f"{r['train_images_per_s']:.2f} |")
    return lines


# ---------------------------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_data_efficiency(runs: dict[str, Any], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for f, name in FAMILY_OF.items():
        pts = sorted((r["fraction"], r["test_top1"]) for k, r in runs.items()
                     if r["contestant"] == f"{f}_small" and r["seed"] == 0)
        if pts:
            ax.plot(*zip(*pts), "o-", label=name, color=COLOURS[name])
    ax.set(xscale="log", xlabel="fraction of the training set (images seen constant)", ylabel="test top-1 %",
           title="Data efficiency, ~0.7M parameters")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_shift(shift: dict[str, Any], path: Path) -> None:
    plt = _plt()
    models = {k: v["window"] for k, v in shift.get("models", {}).items() if "_small_s0" in k}
    if not models:
        return
    fig, axes = plt.subplots(1, len(models), figsize=(3.3 * len(models), 3.2))
    axes = list(axes) if len(models) > 1 else [axes]
    lo = min(v["accuracy_min"] for v in models.values())
    hi = max(v["accuracy_max"] for v in models.values())
    for ax, (key, r) in zip(axes, models.items()):
        margin = (r["offsets_per_axis"] - 1) // 2
        im = ax.imshow(r["accuracy_by_offset"], cmap="viridis", vmin=lo, vmax=hi,
                       extent=(-margin - 0.5, margin + 0.5, margin + 0.5, -margin - 0.5))
        ax.set(title=f"{FAMILY_OF[key.split('_')[0]]}: consistency {r['consistency']:.1f}%", xlabel="x shift (px)",
               ylabel="y shift (px)")
    fig.colorbar(im, ax=axes, label="test top-1 % at the shift")
    fig.suptitle("Small models, seed 0: the item shifted inside its 28 px frame", fontsize=9)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_attention(att: dict[str, Any], path: Path) -> None:
    plt = _plt()
    models = att.get("models", {})
    if not models:
        return
    fig, ax = plt.subplots(figsize=(7, 3.6))
    x = 0
    ticks, labels = [], []
    for key, rows in models.items():
        colour = COLOURS["ViT" if key.startswith("vit") else "CvT"]
        for r in rows:
            ax.scatter([x] * len(r["heads"]), r["heads"], color=colour, s=12)
            ax.plot([x - 0.4, x + 0.4], [r["uniform"]] * 2, color="grey", lw=1)
            ticks.append(x)
            labels.append(f"{key.split('_s0')[0]} {('s' + str(r['stage']) + '.') if 'stage' in r else ''}b{r['block']}")
            x += 1
        x += 1
    ax.set_xticks(ticks, labels, rotation=90, fontsize=6)
    ax.set(ylabel="mean attention distance (px)", title="Per head (dots) and under uniform attention (bars)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_resolution(res: dict[str, Any], path: Path) -> None:
    plt = _plt()
    sides = sorted(res.get("sides", {}), key=int)
    if not sides:
        return
    names = list(res["sides"][sides[0]])
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for n in names:
        label = res["sides"][sides[0]][n]["label"]
        family = next((f for f in ("CvT", "ViT", "Swin") if f.lower() in label.lower()), "ResNet")
        px = [int(s) ** 2 for s in sides]
        rows = [res["sides"][s][n] for s in sides]
        axes[0].plot(px, [1e3 / r["infer_images_per_s"] for r in rows], "o-", label=label, color=COLOURS[family])
        axes[1].plot(px, [1e3 / r["train_images_per_s"] for r in rows], "o-", color=COLOURS[family])
        axes[2].plot(px, [(r["peak_rss_bytes"] - r["rss_before_steps_bytes"]) / 2**20 for r in rows], "o-",
                     color=COLOURS[family])
    for ax, what in zip(axes, ("inference ms / image", "training step ms / image", "training activation MiB")):
        ax.set(xscale="log", yscale="log", xlabel="pixels (side²)", ylabel=what)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_input_size(p: dict[str, Any], path: Path) -> None:
    plt = _plt()
    models = p.get("models", {})
    if not models:
        return
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
    for key, row in models.items():
        for ax, how in zip(axes, ("resize", "pad")):
            pts = sorted((int(c.split("_")[1]), v) for c, v in row.items()
                         if c.startswith(how) or c == "resize_28")
            ax.plot(*zip(*pts), "o-", label=key.split("_s0")[0])
    axes[0].set(title="resized", xlabel="input side (px)", ylabel="test top-1 %")
    axes[1].set(title="padded (or centre-cropped)", xlabel="input side (px)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------
# The document
# ---------------------------------------------------------------------------------------------------------------
def report() -> str:
    IMG.mkdir(parents=True, exist_ok=True)
    runs_data = _load("runs")
    runs = runs_data.get("runs", {})
    shift, att, hier = _load("shift"), _load("attention"), _load("hierarchy")
    pos, res, kv = _load("posenc"), _load("resolution"), _load("kv_stride")
    gpu = {p.stem: _load(p.stem) for p in sorted(RESULTS.glob("resolution_*.json"))}  # resolution_cuda_bf16, ...
    plot_data_efficiency(runs, IMG / "data_efficiency.png")
    plot_shift(shift, IMG / "shift.png")
    plot_attention(att, IMG / "attention_distance.png")
    plot_resolution(res, IMG / "resolution.png")
    plot_input_size(pos, IMG / "input_size.png")
    sections = [
        ("1. From scratch, same recipe and images seen", "train", runs_data, scratch_table(runs)),
        ("2. Data efficiency (seed 0; epochs x 1/fraction)", "train --only data", runs_data, data_table(runs)),
        ("3a. Shift consistency (every 20th test image moved over a 36 px canvas, 81 offsets)", "shift", shift,
         shift_table(shift)),
        ("3b. Mean attention distance (500 test images)", "attention", att, attention_table(att)),
        ("4. Hierarchy (timm `features_only`, torchvision `FeaturePyramidNetwork`)", "hierarchy", hier,
         hierarchy_table(hier)),
        ("5. Position embeddings: test top-1 % at other input sides", "posenc", pos, posenc_table(pos)),
        ("6a. Efficiency against input side: inference images/s / training images/s / activation memory",
         "resolution", res, resolution_tables(res)),
        *[(f"6a. The same on {name.split('_', 1)[1].replace('_', ', ')}", "resolution --device cuda", data,
           resolution_tables(data)) for name, data in gpu.items()],
        ("6b. A larger stage-1 key/value stride, without new weights", "kv-stride", kv, kv_tables(kv)),
        ("7. Convolutional against linear projection, and the position-embedding ablation (seed 0)",
         "train --only ablation", runs_data, ablation_table(runs)),
    ]
    out = [BEGIN, "", "_Generated by `python benchmarks/comparison.py report` from benchmarks/results/issue23/; "
           "do not edit by hand._", ""]
    for title, command, data, table in sections:
        if not table or len(table) <= 2:
            out += [f"#### {title}", "", f"Not measured yet: `python benchmarks/comparison.py {command}`.", ""]
            continue
        out += [f"#### {title}", "", f"`python benchmarks/comparison.py {command}`; {_machine(data)}.", "",
                *table, ""]
    out.append(END)
    return "\n".join(out)


def write() -> None:
    text = DOC.read_text() if DOC.exists() else f"# CNN, ViT and CvT, measured\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{DOC} lacks the {BEGIN} / {END} lines the tables go between")
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    DOC.write_text(head + report() + tail)
