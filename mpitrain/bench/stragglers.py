"""$ mpirun -n 3 python -m mpitrain bench stragglers [--ranks 3,4] [--accuracy-data DIR]

Samples/s of all-reduce, all-reduce with speed-balanced batches, the synchronous
parameter server and stale-synchronous ones (S = 1, 4), with no straggler, one
persistent 2x straggler (the last rank: a worker under either strategy) and
jitter (each rank's step 3x as long with probability 0.2), all measured
interleaved in one run, medians over repeats; the same global batch for all.
Then the validation accuracy each reaches after a fixed number of epochs
(``--accuracy-data``, e.g. the digits of examples/digits.py; default the
built-in set), under each scenario.  Stragglers are the ``slow`` and ``jitter``
drills, which sleep the difference, so the effect is the same on any machine.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Dict, List, Optional

from mpi4py import MPI

from ..config import Config
from ..fault.drills import Faults
from ..runtime import MpitrainError
from .common import quiet_barrier, write_json

__all__ = ["add_arguments", "run", "VARIANTS", "SCENARIOS"]

VARIANTS = {
    "allreduce": dict(),
    "allreduce-speed": dict(balance="speed", balance_every=10),
    "ps-sync": dict(strategy="ps"),
    "ps-ssp1": dict(strategy="ps", staleness=1),
    "ps-ssp4": dict(strategy="ps", staleness=4),
}
SCENARIOS = {"none": "", "slow": "slow:rank={last}:factor=2", "jitter": "jitter:prob=0.2:factor=3"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``bench stragglers``."""
    p.add_argument("--ranks", default=None, help="rank counts, e.g. 3,4 (default: this job's)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated, of: {', '.join(VARIANTS)}")
    p.add_argument("--scenarios", default=",".join(SCENARIOS),
                   help=f"comma-separated, of: {', '.join(SCENARIOS)}")
    p.add_argument("--hidden", default="1024,1024")
    p.add_argument("--batch", type=int, default=256, help="the global batch of every variant")
    p.add_argument("--steps", type=int, default=60, help="timed steps per sample")
    p.add_argument("--warmup", type=int, default=30, help="untimed steps first (the speed "
                                                          "split settles)")
    p.add_argument("--repeats", type=int, default=3, help="samples per setting; medians")
    p.add_argument("--data", default=None, help="throughput data (default: the built-in set)")
    p.add_argument("--accuracy-data", default=None, help="dataset of the accuracy runs "
                                                         "(default: the built-in set)")
    p.add_argument("--epochs", type=int, default=20, help="epochs of each accuracy run (0: none)")
    p.add_argument("--json", metavar="FILE", help="write the figures as a list of records")


def _sample(cfg: Config, comm: MPI.Comm, fault: str, steps: int, warmup: int) -> float:
    """Samples/s of ``steps`` steps on ``comm`` with the drill ``fault`` (slowest rank)."""
    from ..run.build import build

    trainer, _ = build(cfg, comm)
    faults = Faults(fault)
    faults.arm(trainer, comm.rank, cfg.seed)
    trainer.prefetch(0, warmup + steps)
    for k in range(warmup):
        trainer.step(k)
    comm.Barrier()
    t0 = time.perf_counter()
    for k in range(warmup, warmup + steps):
        trainer.set_lr(cfg.lr)
        trainer.step(k)
    elapsed = comm.allreduce(time.perf_counter() - t0, op=MPI.MAX)
    trainer.close()
    trainer.close_data()
    return steps * cfg.batch_size / elapsed


def _accuracy(cfg: Config, comm: MPI.Comm) -> Optional[float]:
    """The validation accuracy (or the task's headline) after ``cfg``'s epochs."""
    import tempfile

    from ..run.fit import train

    from ..data.manifest import read_manifest

    where = tempfile.mkdtemp(prefix="mpitrain-bench-") if comm.rank == 0 else None
    cfg = cfg.replace(run_dir=comm.bcast(where, root=0))
    if cfg.balance == "speed":  # re-split at least twice, however short the run
        samples = read_manifest(cfg.data).rows("train")
        total = cfg.total_steps(-(-samples // cfg.batch_size))
        cfg = cfg.replace(balance_every=max(1, min(cfg.balance_every, total // 3)))
    with open(os.devnull, "w") as devnull:
        summary = train(cfg, comm, out=devnull)
    if comm.rank == 0:
        import shutil

        shutil.rmtree(where, ignore_errors=True)
    return summary.get("val_accuracy")


def run(args: argparse.Namespace, comm: MPI.Comm) -> List[Dict[str, object]]:
    """Measure, print the tables on rank 0, and return the records."""
    from ..data.builtin import builtin_dataset
    from ..threads import thread_report

    size, rank = comm.Get_size(), comm.Get_rank()
    counts = [int(r) for r in args.ranks.split(",")] if args.ranks else [size]
    variants, scenarios = args.variants.split(","), args.scenarios.split(",")
    bad = [v for v in variants if v not in VARIANTS] + [s for s in scenarios
                                                        if s not in SCENARIOS]
    if bad or any(not 2 <= c <= size for c in counts):
        raise MpitrainError(f"unknown variants or scenarios {bad}, or --ranks outside "
                            f"2..{size} ({counts})", everywhere=True)
    hidden = [int(h) for h in args.hidden.split(",")]
    data = args.data or builtin_dataset(comm)
    out = print if rank == 0 else (lambda *a, **k: None)
    out(f"# stragglers: MLP {hidden}, global batch {args.batch}, SGD; median of "
        f"{args.repeats} x {args.steps} steps (after {args.warmup}); threads per rank "
        f"{thread_report()}")
    subs = {n: comm.Split(0 if rank < n else MPI.UNDEFINED, rank) for n in counts}
    got: Dict[tuple, List[float]] = {}
    for _ in range(args.repeats):  # interleaved: every setting sees the same noise
        for n in counts:
            for v in variants:
                for s in scenarios:
                    cfg = Config(data=data, hidden=hidden, batch_size=args.batch,
                                 optimizer="sgd", lr=0.01, check_data="meta", watchdog=0,
                                 **VARIANTS[v])
                    if subs[n] != MPI.COMM_NULL:
                        sps = _sample(cfg, subs[n], SCENARIOS[s].format(last=n - 1),
                                      args.steps, args.warmup)
                        got.setdefault((n, v, s), []).append(sps)
                    quiet_barrier(comm)  # idle ranks sleep, so they take no core
    records: List[Dict[str, object]] = []
    for n in counts:
        out(f"# {n} ranks{' (oversubscribed)' if n > (os.cpu_count() or n) else ''}: "
            "samples/s, median (min-max); x: against allreduce in the same scenario")
        out(f"  {'variant':<16}" + "".join(f"{s:>28}" for s in scenarios))
        for v in variants:
            cells = []
            for s in scenarios:
                if rank != 0:
                    continue
                sps = got[(n, v, s)]
                med = statistics.median(sps)
                ref = statistics.median(got.get((n, "allreduce", s), sps))
                records.append({"ranks": n, "variant": v, "scenario": s, "samples_per_s": med,
                                "min": min(sps), "max": max(sps), "vs_allreduce": med / ref})
                cells.append(f"{med:>9,.0f} ({min(sps):,.0f}-{max(sps):,.0f}) x{med / ref:.2f}")
            out(f"  {v:<16}" + "".join(f"{c:>28}" for c in cells))
    if args.epochs > 0:
        acc_data = args.accuracy_data or data
        n = counts[0]
        out(f"# validation accuracy after {args.epochs} epochs at {n} ranks ({acc_data}), "
            "MLP 64,64, batch 64, Adam")
        out(f"  {'variant':<16}" + "".join(f"{s:>10}" for s in scenarios))
        for v in variants:
            cells = []
            for s in scenarios:
                acc = None
                if subs[n] != MPI.COMM_NULL:
                    cfg = Config(data=acc_data, hidden=[64, 64], batch_size=64,
                                 epochs=args.epochs, optimizer="adam", lr=3e-3, eval_every=0,
                                 quiet=True, watchdog=0, check_data="meta",
                                 fault=SCENARIOS[s].format(last=n - 1) or None, **VARIANTS[v])
                    acc = _accuracy(cfg, subs[n])
                quiet_barrier(comm)
                if rank == 0:
                    records.append({"ranks": n, "variant": v, "scenario": s,
                                    "val_accuracy": acc, "epochs": args.epochs})
                    cells.append(f"{acc:>10.3f}" if acc is not None else f"{'-':>10}")
            out(f"  {v:<16}" + "".join(cells))
    for sub in subs.values():
        if sub != MPI.COMM_NULL:
            sub.Free()
    if args.json and rank == 0:
        write_json(args.json, records)
    return records

