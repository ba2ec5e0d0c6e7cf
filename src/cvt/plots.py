"""PNG plots of a run: training curves (any task's metrics) and a confusion matrix (matplotlib, Agg: no display)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(history: Sequence[dict], path: str | Path,
                metrics: Mapping[str, str] | None = None, ylabel: str = "accuracy (%)",
                title: str = "validation accuracy") -> Path:
    """Train and validation loss, and the validation `metrics` (column -> label; default top-1 and top-5), per
    epoch (the lines of metrics.jsonl)."""
    plt = _pyplot()
    metrics = {"val_top1": "top-1", "val_top5": "top-5"} if metrics is None else metrics
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train loss")
    val = [h for h in history if h.get("val_loss") is not None]
    if val:
        ax_loss.plot([h["epoch"] for h in val], [h["val_loss"] for h in val], marker="o", label="val loss")
    for key, label in metrics.items():
        scored = [h for h in history if h.get(key) is not None]
        if scored:
            ax_acc.plot([h["epoch"] for h in scored], [h[key] for h in scored], marker="o", label=label)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel=ylabel, title=title)
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_confusion(matrix: torch.Tensor, class_names: Sequence[str], path: str | Path, title: str = "") -> Path:
    """Rows: true class, columns: predicted; cells are row-normalised percentages (written in the cells, and the
    classes named, up to 30 classes)."""
    plt = _pyplot()
    m = matrix.double()
    norm = (m / m.sum(1, keepdim=True).clamp(min=1) * 100).numpy()
    k = len(class_names)
    side = min(2 + 0.6 * k, 30)
    fig, ax = plt.subplots(figsize=(side, side * 0.85))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=100)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="% of the true class")
    if k <= 30:
        ax.set_xticks(range(k), labels=class_names, rotation=45, ha="right")
        ax.set_yticks(range(k), labels=class_names)
        for i in range(k):
            for j in range(k):
                if matrix[i, j]:
                    ax.text(j, i, f"{norm[i, j]:.0f}", ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 50 else "black")
    ax.set(xlabel="predicted", ylabel="true", title=title or "confusion matrix")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
