"""$ python -m mpitrain plot RUN_DIR_OR_LOG [...] [--out plot.png]

Loss, validation accuracy and samples/s against step, for one run or
several overlaid (one colour per run).  Needs matplotlib (the ``plot`` extra).
"""
from __future__ import annotations

import os
from typing import List, Sequence

from .metrics import read_log
from ..runtime import MpitrainError

__all__ = ["plot_runs"]


def plot_runs(paths: Sequence[str], out: str) -> str:
    """Draw the runs at ``paths`` (run directories or metrics files) into ``out`` (PNG)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise MpitrainError("mpitrain plot needs matplotlib: pip install 'mpitrain[plot]' "
                            "(or pip install matplotlib)") from None
    runs = []
    for path in paths:
        if not os.path.exists(path):
            raise MpitrainError(f"{path}: no such run directory or metrics file")
        try:
            records = read_log(path)
        except (OSError, ValueError) as exc:
            raise MpitrainError(f"{path}: cannot read the metrics: {exc}") from None
        if not records:
            raise MpitrainError(f"{path}: no step records to plot")
        runs.append((path.rstrip("/"), records))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = [("loss", "loss (global batch)"), ("val_accuracy", "validation accuracy"),
              ("samples_per_s", "samples/s")]
    for ax, (key, title) in zip(axes, panels):
        for label, records in runs:
            points = [(r["step"], r[key]) for r in records if key in r]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o" if key == "val_accuracy" else None, markersize=3,
                        label=label)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def default_out(paths: List[str]) -> str:
    """Where the PNG goes by default: beside the first run's metrics."""
    first = paths[0]
    base = first if os.path.isdir(first) else os.path.dirname(first) or "."
    return os.path.join(base, "plot.png")
