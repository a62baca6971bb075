"""$ mpirun -n 2 python -m mpitrain bench pipeline [--microbatches 1,2,4,8] [--json out.json]

Pipeline step time against pp = 1 on the same ranks, the measured bubble
(the share of a step each stage spends waiting for its neighbours) beside
the theoretical (p - 1) / (m + p - 1), and the peak activation memory each
stage holds under GPipe and 1F1B.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Dict, List

import numpy as np
from mpi4py import MPI

from ..config import Config
from ..parallel.pipeline.partition import bubble
from ..runtime import MpitrainError
from .common import write_json


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``bench pipeline``."""
    p.add_argument("--pp", type=int, default=None, help="pipeline stages (default: all ranks)")
    p.add_argument("--microbatches", default="1,2,4,8,16",
                   help="micro-batch counts to measure (default: 1,2,4,8,16)")
    p.add_argument("--schedules", default="gpipe,1f1b")
    p.add_argument("--hidden", default="1024,1024,1024", help="MLP widths (default: "
                                                              "1024,1024,1024)")
    p.add_argument("--batch-size", type=int, default=256, help="global batch (default: 256)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per setting")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--data", default=None, help="dataset (default: the built-in set)")
    p.add_argument("--json", metavar="FILE", help="write the figures as a list of records")


def _measure(cfg: Config, comm: MPI.Comm, steps: int, warmup: int) -> Dict[str, object]:
    """Time ``steps`` steps of the trainer ``cfg`` builds; per-stage wait and memory."""
    from ..run.build import build

    trainer, _ = build(cfg, comm)
    for k in range(warmup):
        trainer.step(k)
    for key in trainer.times:
        trainer.times[key] = 0.0
    durations = []
    for k in range(warmup, warmup + steps):
        comm.Barrier()
        t0 = time.perf_counter()
        trainer.step(k)
        durations.append(comm.allreduce(time.perf_counter() - t0, op=MPI.MAX))
    busy = sum(durations)
    g = trainer.grid
    wait = trainer.times.get("wait", 0.0) / busy
    peak = trainer.peak_activation_bytes
    per_rank = comm.gather((g.pp_rank, wait, peak), root=0)
    trainer.close()
    trainer.close_data()
    result: Dict[str, object] = {"step_s": statistics.median(durations),
                                 "pp": g.pp, "dp": g.dp}
    if comm.Get_rank() == 0:
        stages = range(g.pp)
        result["bubble_by_stage"] = [float(np.mean([w for s, w, _ in per_rank if s == st]))
                                     for st in stages]
        result["activation_bytes_by_stage"] = [int(max(b for s, _, b in per_rank if s == st))
                                               for st in stages]
    return result


def run(args: argparse.Namespace, comm: MPI.Comm) -> List[Dict[str, object]]:
    """Measure, print the table on rank 0, and return the records."""
    from ..data.builtin import builtin_dataset

    size = comm.Get_size()
    pp = args.pp or size
    try:
        micro = [int(m) for m in args.microbatches.split(",")]
        hidden = [int(h) for h in args.hidden.split(",")]
    except ValueError:
        raise MpitrainError("--microbatches and --hidden take comma-separated integers",
                            everywhere=True) from None
    schedules = [s.strip() for s in args.schedules.split(",")]
    data = args.data or builtin_dataset(comm)
    base = dict(data=data, hidden=hidden, batch_size=args.batch_size, check_data="meta",
                watchdog=0, optimizer="sgd", lr=0.01)
    out = print if comm.Get_rank() == 0 else (lambda *a, **k: None)
    ref = _measure(Config(**base, pp=1), comm, args.steps, args.warmup)
    out(f"# pipeline, {size} ranks: pp={pp} x dp={size // pp} against pp=1 x dp={size}; "
        f"MLP {hidden}, global batch {args.batch_size}; median step of {args.steps}")
    out(f"# pp=1: {ref['step_s'] * 1e3:.2f} ms per step")
    out(f"# {'schedule':>8} {'M':>4} {'step ms':>8} {'/pp=1':>6} {'bubble':>7} {'theory':>7}"
        f"   {'bubble by stage':<24} peak activations by stage (MB)")
    records = [{"schedule": "none", "pp": 1, "dp": size, "microbatches": 1,
                "step_s": ref["step_s"]}]
    for schedule in schedules:
        for m in micro:
            r = _measure(Config(**base, pp=pp, microbatches=m, schedule=schedule), comm,
                         args.steps, args.warmup)
            if comm.Get_rank() != 0:
                continue
            stages = r["bubble_by_stage"]
            rec = {"schedule": schedule, "pp": pp, "dp": size // pp, "microbatches": m,
                   "step_s": r["step_s"], "vs_pp1": r["step_s"] / ref["step_s"],
                   "bubble_measured": float(np.mean(stages)), "bubble_by_stage": stages,
                   "bubble_theory": bubble(pp, m),
                   "activation_bytes_by_stage": r["activation_bytes_by_stage"]}
            records.append(rec)
            out(f"  {schedule:>8} {m:>4} {r['step_s'] * 1e3:>8.2f} {rec['vs_pp1']:>6.2f} "
                f"{rec['bubble_measured']:>7.2f} {rec['bubble_theory']:>7.2f}   "
                f"{' '.join(f'{b:.2f}' for b in stages):<24} "
                f"{' '.join(f'{b / 1e6:.1f}' for b in rec['activation_bytes_by_stage'])}",
                flush=True)
    out("# bubble: the share of the step a stage waits in recv_forward/recv_backward "
        "(mean over stages); theory: (p-1)/(m+p-1)")
    if args.json and comm.Get_rank() == 0:
        write_json(args.json, records)
    return records
