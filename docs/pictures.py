"""$ python docs/pictures.py   (from the checkout, with the mpich, plot and examples extras)

Makes the documentation's pictures in docs/_static from real runs: ``plot.png``
(``mpitrain plot`` of two real runs on the built-in set at 2 ranks), ``timeline.png``
(the trace of two ranks' steps, drawn from the ``--timeline`` file a run wrote: what
Perfetto shows when the file is opened at ui.perfetto.dev) and ``grid.png`` (the rank
grid of a 2-stage x 2-replica pipeline job and its communicators).
"""
import json
import os
import subprocess
import sys
import tempfile

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
STATIC = os.path.join(HERE, "_static")
MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")


def run(*args: str, cwd: str) -> None:
    subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-m", "mpitrain", *args], cwd=cwd,
                   check=True, stdout=subprocess.DEVNULL, timeout=900)


def plot(work: str) -> None:
    """Two real runs on the built-in set (a CNN and an MLP), overlaid by mpitrain plot."""
    common = ["train", "--epochs", "3", "--eval-every", "50", "--log-every", "10", "--quiet",
              "--lr-schedule", "cosine", "--optimizer", "adam", "--lr", "0.002"]
    run(*common, "--run-dir", "mlp", cwd=work)
    run(*common, "--run-dir", "wide", "--hidden", "512,512", cwd=work)
    subprocess.run([sys.executable, "-m", "mpitrain", "plot", "mlp", "wide", "--out",
                    os.path.join(STATIC, "plot.png"), "--overwrite"], cwd=work, check=True)


def timeline(work: str) -> None:
    """Three steps of two ranks from a real --timeline trace, nested as Perfetto shows
    them: each rank's steps, their phases, and the layers' forward and backward passes."""
    trace = os.path.join(work, "trace.json")
    run("train", "--steps", "24", "--quiet", "--hidden", "1024,1024", "--timeline", trace,
        "--timeline-steps", "20:22", "--run-dir", "traced", cwd=work)
    events = [e for e in json.load(open(trace))["traceEvents"] if e.get("ph") == "X"]
    start = min(e["ts"] for e in events)
    colours = {"data": "#8da0cb", "compute": "#66c2a5", "exchange": "#fc8d62",
               "update": "#e78ac3"}
    depth = {"step": 0, "layer": 2}  # the phases between
    fig, ax = plt.subplots(figsize=(10, 3.2))
    ranks = sorted({e["pid"] for e in events})
    for e in events:
        row = ranks.index(e["pid"]) * 4 + depth.get(e["cat"], 1)
        colour = colours.get(e["cat"], "#d9d9d9" if e["cat"] == "step" else "#a6d854")
        ax.broken_barh([((e["ts"] - start) / 1e3, e["dur"] / 1e3)], (row - 0.42, 0.84),
                       color=colour, edgecolor="white", linewidth=0.5)
        if e["cat"] == "step":
            ax.text((e["ts"] - start + e["dur"] / 2) / 1e3, row, e["name"], ha="center",
                    va="center", fontsize=7)
    ticks = [r * 4 + d for r in range(len(ranks)) for d in range(3)]
    ax.set_yticks(ticks, [f"rank {p}: {what}" for p in ranks
                          for what in ("steps", "phases", "layers")], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("ms")
    ax.legend(handles=[matplotlib.patches.Patch(color=c, label=k) for k, c in
                       {**colours, "layer": "#a6d854"}.items()],
              ncol=5, loc="lower right", fontsize=7)
    ax.set_title("mpitrain train --timeline: 3 steps of 2 ranks (MLP 784-1024-1024-10)")
    fig.tight_layout()
    fig.savefig(os.path.join(STATIC, "timeline.png"), dpi=110)


def grid() -> None:
    """World ranks of pp=2 x dp=2: stages (columns), replicas (rows), their comms."""
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for stage in range(2):
        for replica in range(2):
            rank = stage * 2 + replica  # comm.topology.grid_rank
            ax.add_patch(plt.Rectangle((stage * 2.2, (1 - replica) * 1.4), 1.6, 1.0,
                                       color="#66c2a5" if stage == 0 else "#8da0cb"))
            ax.text(stage * 2.2 + 0.8, (1 - replica) * 1.4 + 0.5,
                    f"world rank {rank}\nstage {stage}, replica {replica}", ha="center",
                    va="center", fontsize=9)
        ax.annotate("", xy=(stage * 2.2 + 0.8, 1.4), xytext=(stage * 2.2 + 0.8, 1.0),
                    arrowprops=dict(arrowstyle="<->", color="#fc8d62"))
    for replica in range(2):
        y = (1 - replica) * 1.4 + 0.5
        ax.annotate("", xy=(2.2, y), xytext=(1.6, y), arrowprops=dict(arrowstyle="->"))
    ax.text(1.9, 2.55, "pp_comm: activations forward, gradients back (Send/Recv)",
            ha="center", fontsize=8)
    ax.text(1.9, -0.25, "dp_comm: each stage's gradients summed over its replicas",
            ha="center", fontsize=8, color="#d95f02")
    ax.set_xlim(-0.2, 4.0)
    ax.set_ylim(-0.5, 2.8)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(os.path.join(STATIC, "grid.png"), dpi=110)


def main() -> None:
    os.makedirs(STATIC, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        plot(work)
        timeline(work)
    grid()


if __name__ == "__main__":
    main()
