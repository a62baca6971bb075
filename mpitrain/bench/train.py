"""$ mpirun -n 2 python -m mpitrain bench train [--variants mpi,ring] [--json out.json]

Training throughput at 1, 2, ... ranks (sub-communicators of this job,
the other ranks idle and asleep), measured interleaved in one run: global
samples/s, scaling efficiency (samples/s at p / (p x samples/s at 1)), and
the step time split into compute, exposed exchange (not hidden by overlap)
and data (waiting for the reader).  Beside each rank count, the ceiling:
that many independent one-rank trainers running at once, with no exchange
(what the machine can do), and every figure as a share of it.  The model
and batch default to the reference: MLP 784-1024-1024-10, 128 samples per
rank, SGD, one BLAS thread per rank.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Dict, List

import numpy as np
from mpi4py import MPI

from ..config import Config
from ..config import flag
from ..runtime import ConfigError, MpitrainError
from .common import quiet_barrier, write_json

# name -> Config overrides
VARIANTS = {
    "mpi": dict(allreduce="mpi", overlap=True, progress="thread"),
    "mpi-test": dict(allreduce="mpi", overlap=True, progress="test"),
    "mpi-none": dict(allreduce="mpi", overlap=True, progress="none"),
    "mpi-nooverlap": dict(allreduce="mpi", overlap=False, bucket_mb=0),
    "ring": dict(allreduce="ring", overlap=True, progress="thread"),
    "shm": dict(allreduce="shm", overlap=True, progress="thread"),
    "shm-nooverlap": dict(allreduce="shm", overlap=False, bucket_mb=0),
    "ring-nooverlap": dict(allreduce="ring", overlap=False, bucket_mb=0),
    "ring-fp16": dict(allreduce="ring", overlap=True, grad_dtype="float16"),
    "ring-bf16": dict(allreduce="ring", overlap=True, grad_dtype="bfloat16"),
    "reproducible": dict(allreduce="mpi", reproducible=True),
    "reproducible-g4": dict(allreduce="mpi", reproducible=True, groups=4),
    "reproducible-g2": dict(allreduce="mpi", reproducible=True, groups=2),
}


def _bench_name(param: str) -> str:
    """How this benchmark's errors name a training parameter (it sets some itself)."""
    return {"batch_size": "the global batch (--batch-per-rank x ranks)"}.get(param, flag(param))


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``bench train``."""
    p.add_argument("--ranks", default=None, help="rank counts to measure, e.g. 1,2 "
                                                 "(default: 1, 2, 4, ... up to this job's)")
    p.add_argument("--variants", default="mpi", help=f"comma-separated, of: {', '.join(VARIANTS)}")
    p.add_argument("--hidden", default="1024,1024")
    p.add_argument("--batch-per-rank", type=int, default=128)
    p.add_argument("--steps", type=int, default=100, help="timed steps per sample")
    p.add_argument("--warmup", type=int, default=20, help="untimed steps first (cold caches, page faults)")
    p.add_argument("--repeats", type=int, default=3, help="samples per setting; medians reported")
    p.add_argument("--bucket-mb", type=float, default=None, help="override the bucket size")
    p.add_argument("--data", default=None,
                   help="dataset (default: the built-in set); several, compared interleaved: "
                        "LABEL=DIR,LABEL=DIR")
    p.add_argument("--json", metavar="FILE", help="write the figures as a list of records")


def _sample(cfg: Config, comm: MPI.Comm, steps: int, warmup: int) -> Dict[str, float]:
    """One timed run of ``steps`` steps on ``comm``: samples/s and the time split."""
    from ..run.build import build

    trainer, _ = build(cfg, comm)
    trainer.prefetch(0, warmup + steps)
    for k in range(warmup):
        trainer.step(k)
    for key in trainer.times:
        trainer.times[key] = 0.0
    comm.Barrier()
    t0 = time.perf_counter()
    for k in range(warmup, warmup + steps):
        trainer.step(k)
    # The slowest rank's elapsed time and phase times, in one Allreduce.
    keys = list(trainer.times)
    slowest = np.array([time.perf_counter() - t0, *(trainer.times[k] for k in keys)])
    comm.Allreduce(MPI.IN_PLACE, slowest, op=MPI.MAX)
    elapsed, times = float(slowest[0]), dict(zip(keys, slowest[1:].tolist()))
    trainer.close()
    trainer.close_data()
    return {"samples_per_s": steps * cfg.batch_size / elapsed, "step_s": elapsed / steps,
            **{f"share_{k}": v / elapsed for k, v in times.items()}}


def run(args: argparse.Namespace, comm: MPI.Comm) -> List[Dict[str, object]]:
    """Measure, print the table on rank 0, and return the records."""
    from ..threads import thread_report
    from ..data.builtin import builtin_dataset

    size, rank = comm.Get_size(), comm.Get_rank()
    try:
        counts = ([int(r) for r in args.ranks.split(",")] if args.ranks else
                  sorted({min(size, 2 ** k) for k in range(size.bit_length() + 1)}))
        hidden = [int(h) for h in args.hidden.split(",")]
    except ValueError:
        raise MpitrainError("--ranks and --hidden take comma-separated integers",
                            everywhere=True) from None
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or any(not 1 <= c <= size for c in counts):
        raise MpitrainError(f"--variants must be of {', '.join(VARIANTS)} (got {unknown}) and "
                            f"--ranks within 1..{size} (got {counts})", everywhere=True)
    datasets = [(part.split("=", 1) if "=" in part else (os.path.basename(part.rstrip("/")), part))
                for part in (args.data or "").split(",") if part]
    datasets = datasets or [("builtin", builtin_dataset(comm))]
    out = print if rank == 0 else (lambda *a, **k: None)
    out(f"# train: MLP {hidden}, {args.batch_per_rank} samples per rank, SGD; median of "
        f"{args.repeats} x {args.steps} steps; threads per rank {thread_report()}")
    samples: Dict[tuple, List[Dict[str, float]]] = {}
    subs = {n: comm.Split(0 if rank < n else MPI.UNDEFINED, rank) for n in counts}
    for _ in range(args.repeats):  # interleaved: every setting sees the same noise
        for n in counts:
            sub = subs[n]
            for label, data in datasets:  # the ceiling: n one-rank trainers at once
                error = None
                if sub != MPI.COMM_NULL:
                    try:
                        cfg = Config(data=data, hidden=hidden, batch_size=args.batch_per_rank,
                                     optimizer="sgd", lr=0.01, check_data="meta", watchdog=0)
                        sub.Barrier()  # started together, each on its own
                        alone = _sample(cfg, MPI.COMM_SELF, args.steps, args.warmup)
                        got = {"samples_per_s": alone["samples_per_s"]}
                    except MpitrainError as exc:  # each rank alone: agreed below
                        got = {"samples_per_s": 0.0}
                        error = (exc.render(_bench_name) if isinstance(exc, ConfigError)
                                 else str(exc))
                    total = sub.allreduce(got["samples_per_s"], op=MPI.SUM)
                    errors = sub.allgather(error)
                    error = next((e for e in errors if e), None)
                    if rank == 0 and error is None:
                        samples.setdefault((n, "ceiling", label), []).append(
                            {"samples_per_s": total})
                quiet_barrier(comm)  # idle ranks sleep, so they take no core
                error = comm.bcast(error, root=0)  # rank 0 is in every sub-communicator
                if error:
                    raise MpitrainError(error, everywhere=True)
            for name, (label, data) in [(v, d) for v in variants for d in datasets]:
                extra = dict(VARIANTS[name])
                if args.bucket_mb is not None:
                    extra["bucket_mb"] = args.bucket_mb
                cfg = Config(data=data, hidden=hidden, batch_size=n * args.batch_per_rank,
                             optimizer="sgd", lr=0.01, check_data="meta", watchdog=0,
                             **extra)
                error = None
                if sub != MPI.COMM_NULL:
                    try:
                        got = _sample(cfg, sub, args.steps, args.warmup)
                        if rank == 0:
                            samples.setdefault((n, name, label), []).append(got)
                    except MpitrainError as exc:  # agreed on `sub` only: tell the others
                        error = (exc.render(_bench_name) if isinstance(exc, ConfigError)
                                 else str(exc))
                quiet_barrier(comm)  # idle ranks sleep, so they take no core
                error = comm.bcast(error, root=0)  # rank 0 is in every sub-communicator
                if error:
                    raise MpitrainError(error, everywhere=True)
    for sub in subs.values():
        if sub != MPI.COMM_NULL:
            sub.Free()
    records: List[Dict[str, object]] = []
    if rank == 0:
        out(f"# {'ranks':>5} {'variant':<15} {'samples/s':>10} {'range':>17} {'efficiency':>10}"
            f" {'ceiling':>9} {'of ceiling':>10} {'compute':>8} {'exchange':>8} {'data':>6}")
        for name, (label, _) in [(v, d) for v in variants for d in datasets]:
            base = statistics.median(s["samples_per_s"]
                                     for s in samples[(counts[0], name, label)])
            base *= 1 / counts[0]
            shown = name if len(datasets) == 1 else f"{name} {label}"
            for n in counts:
                got = samples[(n, name, label)]
                sps = [s["samples_per_s"] for s in got]
                med = {k: statistics.median(s[k] for s in got) for k in got[0]}
                ceiling = statistics.median(s["samples_per_s"]
                                            for s in samples[(n, "ceiling", label)])
                rec = {"ranks": n, "variant": name, **med,
                       "samples_per_s_min": min(sps), "samples_per_s_max": max(sps),
                       "efficiency": med["samples_per_s"] / (n * base),
                       "ceiling_samples_per_s": ceiling,
                       "of_ceiling": med["samples_per_s"] / ceiling,
                       "of_ceiling_min": min(sps) / ceiling,
                       "oversubscribed": n > (os.cpu_count() or n)}
                if len(datasets) > 1:
                    rec["data"] = label
                records.append(rec)
                mark = "*" if rec["oversubscribed"] else " "
                out(f"  {n:>4}{mark} {shown:<15} {med['samples_per_s']:>10,.0f} "
                    f"{min(sps):>8,.0f}-{max(sps):<8,.0f} {rec['efficiency']:>10.2f} "
                    f"{ceiling:>9,.0f} {rec['of_ceiling']:>10.2f} "
                    f"{med['share_compute']:>8.1%} {med['share_exchange']:>8.1%} "
                    f"{med['share_data']:>6.1%}", flush=True)
        out("# efficiency = samples/s at p / (p x samples/s at the first rank count); "
            "ceiling: p independent one-rank trainers at once (no exchange), the most p "
            "ranks can do here; of ceiling = samples/s / ceiling; exchange: the part not "
            "hidden behind backward; * oversubscribed (more ranks than cores)")
    if args.json and rank == 0:
        write_json(args.json, records)
    return records
