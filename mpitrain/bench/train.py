"""$ mpirun -n 2 python -m mpitrain bench train [--variants mpi,ring] [--json out.json]

Training throughput at 1, 2, ... ranks (sub-communicators of this job,
the other ranks idle and asleep): global samples/s, scaling efficiency
(samples/s at p / (p x samples/s at 1)), and the step time split into
compute, exposed exchange (not hidden by overlap) and data (waiting for the
reader).  Beside each rank count, two peers: the ceiling, that many
independent one-rank trainers running at once, with no exchange (what the
machine can do), and lockstep, the same trainers waiting for each other
after every step (what a synchronous step can do: the slowest rank sets the
pace of each step); every figure also as a share of both.  All settings of a
rank count are built once and take turns, ``--block`` steps each (5: about
70 ms, shorter than the machine's drifts; turns of 20 steps let a drift hit
one setting and miss its peers), and the rank counts take turns repeat by
repeat, so slow drifts of the machine's speed hit them alike; each repeat's
figure is paired with the peers' figures of the same repeat (the worst pair
is shown).  Under a hypervisor, each setting's figure comes with the share of
its cores' time the host gave to other guests (/proc/stat's steal), which a
synchronous step pays on every rank when it hits one.  The model
and batch default to the reference: MLP 784-1024-1024-10, 128 samples per
rank, SGD, one BLAS thread per rank.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
from mpi4py import MPI

from ..config import Config
from ..config import flag
from ..runtime import ConfigError, MpitrainError
from .common import cpu_ticks, quiet_barrier, write_json

# name -> Config overrides
CEILINGS = ("ceiling", "lockstep")  # the peers measured beside the variants
VARIANTS = {
    # mpi, shm, ring and the 16-bit rings: the defaults (overlapped in buckets only across
    # nodes: comm.overlap); *-overlap: in 2 MiB buckets during backward, wherever they run
    "auto": dict(allreduce="auto"),  # the default: shm where it serves (comm.auto)
    "mpi": dict(allreduce="mpi"),
    "mpi-overlap": dict(allreduce="mpi", overlap=True, progress="thread"),
    "mpi-test": dict(allreduce="mpi", overlap=True, progress="test"),
    "mpi-none": dict(allreduce="mpi", overlap=True, progress="none"),
    "mpi-nooverlap": dict(allreduce="mpi", overlap=False, bucket_mb=0),
    "ring": dict(allreduce="ring"),
    "ring-overlap": dict(allreduce="ring", overlap=True, progress="thread"),
    "shm": dict(allreduce="shm"),
    "shm-overlap": dict(allreduce="shm", overlap=True, progress="thread"),
    "shm-nooverlap": dict(allreduce="shm", overlap=False, bucket_mb=0),
    "ring-nooverlap": dict(allreduce="ring", overlap=False, bucket_mb=0),
    "ring-fp16": dict(allreduce="ring", grad_dtype="float16"),
    "ring-bf16": dict(allreduce="ring", grad_dtype="bfloat16"),
    "reproducible": dict(allreduce="auto", reproducible=True),
    "reproducible-g12": dict(allreduce="auto", reproducible=True, groups=12),
    "reproducible-g4": dict(allreduce="auto", reproducible=True, groups=4),
    "reproducible-g2": dict(allreduce="auto", reproducible=True, groups=2),
    # local SGD: H local steps, then one Allreduce of parameters and optimizer state
    "local-8": dict(sync_every=8),
    "local-16": dict(sync_every=16),
}


def _bench_name(param: str) -> str:
    """How this benchmark's errors name a training parameter (it sets some itself)."""
    return {"batch_size": "the global batch (--batch-per-rank x ranks)"}.get(param, flag(param))


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``bench train``."""
    p.add_argument("--ranks", default=None, help="rank counts to measure, e.g. 1,2 "
                                                 "(default: 1, 2, 4, ... up to this job's)")
    p.add_argument("--variants", default="auto", help=f"comma-separated, of: {', '.join(VARIANTS)}")
    p.add_argument("--hidden", default="1024,1024")
    p.add_argument("--batch-per-rank", type=int, default=128)
    p.add_argument("--steps", type=int, default=100, help="timed steps per sample")
    p.add_argument("--block", type=int, default=5, help="steps a setting runs before the "
                   "next takes its turn (all settings are built once, then alternate)")
    p.add_argument("--warmup", type=int, default=20, help="untimed steps first (cold caches, page faults)")
    p.add_argument("--repeats", type=int, default=3, help="samples per setting; medians reported")
    p.add_argument("--bucket-mb", type=float, default=None, help="override the bucket size")
    p.add_argument("--data", default=None,
                   help="dataset (default: the built-in set); several, compared interleaved: "
                        "LABEL=DIR,LABEL=DIR")
    p.add_argument("--json", metavar="FILE", help="write the figures as a list of records")


class _Timed:
    """One setting's trainer on ``comm``, built and warmed up once, then timed block by
    block (``run``), so that the settings can take turns and see the same noise.  Each
    block starts together on ``together`` (the ranks measured); with ``lockstep`` they
    also wait for each other after every step (one-rank trainers that keep the pace of
    a synchronous step, without exchanging anything)."""

    def __init__(self, cfg: Config, comm: MPI.Comm, together: MPI.Comm, steps: int,
                 warmup: int, lockstep: bool = False):
        from ..run.build import build

        self.cfg, self.comm, self.together, self.lockstep = cfg, comm, together, lockstep
        self.trainer, _ = build(cfg, comm)
        self.trainer.prefetch(0, warmup + steps)
        for k in range(warmup):
            self.trainer.step(k)
        self.next = warmup  # the next step to run
        self.start()

    def start(self) -> None:
        """Begin a sample: no time, no phase times."""
        self.elapsed = 0.0
        self.ticks: Optional[List[int]] = None  # stolen, wanted: this node's CPU ticks
        for key in self.trainer.times:
            self.trainer.times[key] = 0.0

    def run(self, count: int) -> None:
        """``count`` more steps of the sample, started together on every rank."""
        self.together.Barrier()
        before = cpu_ticks()
        t0 = time.perf_counter()
        for _ in range(count):
            self.trainer.step(self.next)
            self.next += 1
            if self.lockstep:
                self.together.Barrier()
        self.elapsed += time.perf_counter() - t0
        after = cpu_ticks()
        if before and after:  # in the sample's blocks so far
            self.ticks = [t + b - a for t, a, b in zip(self.ticks or (0, 0), before, after)]

    def stolen(self) -> float:
        """The share of the node's wanted CPU time the hypervisor took in this sample's
        blocks, the highest of the ranks' nodes (collective on ``together``; -1 where a
        node has no /proc/stat).  Ticks are 10 ms: blocks shorter than that average out
        over a sample."""
        if self.ticks is None:
            mine = -1.0
        else:
            mine = self.ticks[0] / self.ticks[1] if self.ticks[1] else 0.0
        every = self.together.allgather(mine)  # one float per rank
        return -1.0 if min(every) < 0 else max(every)

    def sample(self, steps: int) -> Dict[str, float]:
        """The sample's samples/s and time split, from the slowest rank (collective)."""
        keys = list(self.trainer.times)
        slowest = np.array([self.elapsed, *(self.trainer.times[k] for k in keys)])
        self.comm.Allreduce(MPI.IN_PLACE, slowest, op=MPI.MAX)
        elapsed, times = float(slowest[0]), dict(zip(keys, slowest[1:].tolist()))
        return {"samples_per_s": steps * self.cfg.batch_size / elapsed,
                "step_s": elapsed / steps,
                **{f"share_{k}": v / elapsed for k, v in times.items()}}

    def close(self) -> None:
        """Free the trainer (collective on ``comm``)."""
        self.trainer.close()
        self.trainer.close_data()


def _build(args: argparse.Namespace, n: int, sub: MPI.Comm, hidden: List[int],
           variants: List[str], datasets: List[Tuple[str, str]]
           ) -> Tuple[List[Tuple[tuple, _Timed]], Optional[str]]:
    """Every setting at ``n`` ranks (``sub``), built and warmed up; an error message every
    rank of ``sub`` agrees on (then the settings built so far are closed)."""
    settings: List[Tuple[tuple, _Timed]] = []
    total = args.warmup + args.repeats * args.steps
    error = None
    # The ceiling: n one-rank trainers at once; in lockstep: each waits for the others
    # after every step, the most a synchronous step can do.  Then the variants.
    wanted = [(peer, d) for d in datasets for peer in CEILINGS] + \
        [(v, d) for v in variants for d in datasets]
    for name, (label, data) in wanted:
        peer = name in CEILINGS
        extra = {} if peer else dict(VARIANTS[name])
        if args.bucket_mb is not None and not peer:
            extra["bucket_mb"] = args.bucket_mb
        cfg = Config(data=data, hidden=hidden, optimizer="sgd", lr=0.01, check_data="meta",
                     watchdog=0, batch_size=(1 if peer else n) * args.batch_per_rank, **extra)
        try:  # a peer's trainers are each alone: agree on an error here
            settings.append(((n, name, label), _Timed(
                cfg, MPI.COMM_SELF if peer else sub, sub, total - args.warmup, args.warmup,
                lockstep=name == "lockstep")))
        except MpitrainError as exc:
            error = exc.render(_bench_name) if isinstance(exc, ConfigError) else str(exc)
        error = next((e for e in sub.allgather(error) if e), None)
        if error:
            for _, timed in settings:
                timed.close()
            return [], error
    return settings, None


def _repeat(args: argparse.Namespace, sub: MPI.Comm, settings: List[Tuple[tuple, _Timed]],
            samples: Dict[tuple, List[Dict[str, float]]]) -> None:
    """One repeat of every setting on ``sub``, taking turns block by block; the samples
    into ``samples`` (on rank 0)."""
    for _, timed in settings:
        timed.start()
    for a in range(0, args.steps, args.block):  # every setting in turn
        for _, timed in settings:
            timed.run(min(args.block, args.steps - a))
    for key, timed in settings:
        if key[1] in CEILINGS:  # each rank alone: the ranks' throughputs add up
            mine = args.steps * timed.cfg.batch_size / timed.elapsed
            got = {"samples_per_s": sub.allreduce(mine, op=MPI.SUM)}
        else:
            got = timed.sample(args.steps)
        got["stolen"] = timed.stolen()
        if sub.Get_rank() == 0:
            samples.setdefault(key, []).append(got)


def _parse(args: argparse.Namespace, comm: MPI.Comm):
    """(rank counts, hidden widths, variants, datasets) of the command line, checked."""
    from ..data.builtin import builtin_dataset

    size = comm.Get_size()
    try:
        counts = ([int(r) for r in args.ranks.split(",")] if args.ranks else
                  sorted({min(size, 2 ** k) for k in range(size.bit_length() + 1)}))
        hidden = [int(h) for h in args.hidden.split(",")]
    except ValueError:
        raise MpitrainError("--ranks and --hidden take comma-separated integers",
                            everywhere=True) from None
    # the peers (ceiling, lockstep) are measured beside every variant anyway
    variants = [v for v in args.variants.split(",") if v not in CEILINGS]
    unknown = [v for v in variants if v not in VARIANTS]
    if args.block < 1 or args.steps < 1:
        raise MpitrainError(f"--block and --steps must be at least 1 (got {args.block} and "
                            f"{args.steps})", everywhere=True)
    if unknown or any(not 1 <= c <= size for c in counts):
        raise MpitrainError(f"--variants must be of {', '.join(VARIANTS)} (got {unknown}) and "
                            f"--ranks within 1..{size} (got {counts})", everywhere=True)
    datasets = [(part.split("=", 1) if "=" in part else (os.path.basename(part.rstrip("/")), part))
                for part in (args.data or "").split(",") if part]
    return counts, hidden, variants, datasets or [("builtin", builtin_dataset(comm))]


def _measure(args, comm: MPI.Comm, counts, hidden, variants, datasets):
    """Every setting of every rank count, built once, then timed in turns (collective);
    the samples on rank 0."""
    rank = comm.Get_rank()
    samples: Dict[tuple, List[Dict[str, float]]] = {}
    subs = {n: comm.Split(0 if rank < n else MPI.UNDEFINED, rank) for n in counts}
    built: Dict[int, List[Tuple[tuple, _Timed]]] = {}
    error = None
    for n in counts:
        built[n] = []
        if subs[n] != MPI.COMM_NULL:
            built[n], error = _build(args, n, subs[n], hidden, variants, datasets)
        quiet_barrier(comm)  # idle ranks sleep, so they take no core
        error = comm.bcast(error, root=0)  # rank 0 is in every sub-communicator
        if error:
            break
    for _ in range(args.repeats if error is None else 0):  # the rank counts take turns too
        for n in counts:
            if subs[n] != MPI.COMM_NULL:
                _repeat(args, subs[n], built[n], samples)
            quiet_barrier(comm)
    for n, settings in built.items():
        for _, timed in settings:
            timed.close()
    for sub in subs.values():
        if sub != MPI.COMM_NULL:
            sub.Free()
    if error:
        raise MpitrainError(error, everywhere=True)
    return samples


def run(args: argparse.Namespace, comm: MPI.Comm) -> List[Dict[str, object]]:
    """Measure, print the table on rank 0, and return the records."""
    from ..threads import thread_report

    counts, hidden, variants, datasets = _parse(args, comm)
    out = print if comm.Get_rank() == 0 else (lambda *a, **k: None)
    out(f"# train: MLP {hidden}, {args.batch_per_rank} samples per rank, SGD; median of "
        f"{args.repeats} x {args.steps} steps; threads per rank {thread_report()}")
    samples = _measure(args, comm, counts, hidden, variants, datasets)
    records: List[Dict[str, object]] = []
    if comm.Get_rank() == 0:
        out(f"# {'ranks':>5} {'variant':<15} {'samples/s':>10} {'range':>17} {'efficiency':>10}"
            f" {'ceiling':>9} {'of ceiling':>10} {'worst':>6} {'lockstep':>9} {'of it':>6}"
            f" {'compute':>8} {'exchange':>8} {'data':>6} {'stolen':>6}")
        for name, (label, _) in [(v, d) for v in variants for d in datasets]:
            base = statistics.median(s["samples_per_s"]
                                     for s in samples[(counts[0], name, label)]) / counts[0]
            shown = name if len(datasets) == 1 else f"{name} {label}"
            for n in counts:
                rec = _record(samples, n, name, label, base)
                if len(datasets) > 1:
                    rec["data"] = label
                records.append(rec)
                out(_row(rec, shown), flush=True)
        out(LEGEND)
    if args.json and comm.Get_rank() == 0:
        write_json(args.json, records)
    return records


def _record(samples, n: int, name: str, label: str, base: float) -> Dict[str, object]:
    """One setting's figures: medians, against the ceiling and lockstep of each repeat."""
    got = samples[(n, name, label)]
    sps = [s["samples_per_s"] for s in got]
    med = {k: statistics.median(s[k] for s in got) for k in got[0]}
    ceilings = [s["samples_per_s"] for s in samples[(n, "ceiling", label)]]
    ceiling = statistics.median(ceilings)
    # Each repeat against the ceiling of the same repeat (they took turns).
    paired = [v / c for v, c in zip(sps, ceilings)]
    locksteps = [s["samples_per_s"] for s in samples[(n, "lockstep", label)]]
    lockstep = statistics.median(locksteps)
    stolen = [s["stolen"] for s in got]
    stolen = None if min(stolen) < 0 else stolen  # no /proc/stat
    med["stolen"] = None if stolen is None else statistics.median(stolen)
    return {"ranks": n, "variant": name, **med,
            "samples_per_s_min": min(sps), "samples_per_s_max": max(sps),
            "efficiency": med["samples_per_s"] / (n * base),
            "ceiling_samples_per_s": ceiling,
            "of_ceiling": med["samples_per_s"] / ceiling,
            "of_ceiling_min": min(sps) / ceiling,
            "of_ceiling_each": paired, "of_ceiling_worst": min(paired),
            "lockstep_samples_per_s": lockstep,
            "of_lockstep": med["samples_per_s"] / lockstep,
            "of_lockstep_each": [v / c for v, c in zip(sps, locksteps)],
            "stolen_each": stolen,
            "ceiling_stolen_each": [s["stolen"] for s in samples[
                (n, "ceiling", label)]] if stolen else None,
            "oversubscribed": n > (os.cpu_count() or n)}


def _row(rec: Dict[str, object], shown: str) -> str:
    """One line of the table."""
    mark = "*" if rec["oversubscribed"] else " "
    stolen = "-" if rec["stolen"] is None else format(rec["stolen"], ".1%")
    return (f"  {rec['ranks']:>4}{mark} {shown:<15} {rec['samples_per_s']:>10,.0f} "
            f"{rec['samples_per_s_min']:>8,.0f}-{rec['samples_per_s_max']:<8,.0f} "
            f"{rec['efficiency']:>10.2f} {rec['ceiling_samples_per_s']:>9,.0f} "
            f"{rec['of_ceiling']:>10.2f} {rec['of_ceiling_worst']:>6.2f} "
            f"{rec['lockstep_samples_per_s']:>9,.0f} {rec['of_lockstep']:>6.2f} "
            f"{rec['share_compute']:>8.1%} {rec['share_exchange']:>8.1%} "
            f"{rec['share_data']:>6.1%} {stolen:>6}")


LEGEND = ("# efficiency = samples/s at p / (p x samples/s at the first rank count); "
          "ceiling: p independent one-rank trainers at once (no exchange), the most p "
          "ranks can do here; of ceiling = samples/s / ceiling; worst: the lowest of the "
          "repeats, each against the ceiling of the same repeat; lockstep: the same "
          "trainers waiting for each other after every step, the most a synchronous step "
          "can do (of it: samples/s / lockstep); exchange: the part not "
          "hidden behind backward; stolen: the share of the CPU time the ranks' cores "
          "wanted that the hypervisor gave to others (/proc/stat's steal; the highest "
          "node's, median); * oversubscribed (more ranks than cores)")
