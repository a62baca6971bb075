"""$ python -m mpitrain plot RUN_DIR_OR_LOG [...] [--out plot.png]

Loss, validation loss, each task metric the runs logged (accuracy; RMSE,
MAE and R²; F1), and samples/s against step, for one run or several overlaid:
a run has the same colour in every panel; within a metric's panel the
training batches are dashed, the validation split solid.  Needs matplotlib
(the ``plot`` extra).
"""
from __future__ import annotations

import os
from typing import List, Sequence

from .metrics import read_log
from ..runtime import MpitrainError

__all__ = ["plot_runs", "METRICS"]

# The task metrics a panel each is drawn for, where the runs logged them.
METRICS = {"accuracy": "accuracy (dashed: training batches)", "rmse": "RMSE", "mae": "MAE",
           "r2": "R²", "f1": "F1 (mean over labels)"}


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
    panels = panels_for([records for _, records in runs])
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.8 * rows), squeeze=False)
    for ax, (key, title) in zip(axes.flat, panels):
        for i, (label, records) in enumerate(runs):
            colour = f"C{i % 10}"  # the run's colour, the same in every panel
            keys = [(key, "-", "validation" if key.startswith("val_") else None)]
            if key in METRICS:  # a task metric: the training batches dashed, validation solid
                keys = [(key, "--", "train"), (f"val_{key}", "-", "validation")]
            for k, style, part in keys:
                points = [(r["step"], r[k]) for r in records
                          if isinstance(r.get(k), (int, float))]
                if points:
                    xs, ys = zip(*points)
                    ax.plot(xs, ys, style, color=colour, markersize=3,
                            marker="o" if k.startswith("val_") else None,
                            label=label if part in (None, "validation") else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].set_yscale("log")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    from ..paths import replace

    with replace(out, "wb") as f:  # whole or not at all
        fig.savefig(f, dpi=100, format="png")
    plt.close(fig)
    return out


def panels_for(runs: Sequence[List[dict]]) -> List[tuple]:
    """(key, title) of each panel for runs' records: the losses, each task metric logged,
    samples/s."""
    metrics = [k for k in METRICS if any(k in r or f"val_{k}" in r for rs in runs for r in rs)]
    return ([("loss", "loss"), ("val_loss", "validation loss")]
            + [(k, METRICS[k]) for k in metrics] + [("samples_per_s", "samples/s")])


def default_out(paths: List[str]) -> str:
    """Where the PNG goes by default: beside the first run's metrics."""
    first = paths[0]
    base = first if os.path.isdir(first) else os.path.dirname(first) or "."
    return os.path.join(base, "plot.png")
