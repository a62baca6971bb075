"""$ mpirun -n 2 python -m mpitrain bench allreduce [--sizes 4K,1M,64M] [--json out.json]

The ring all-reduce against MPI's own ``Allreduce``, both in place, measured
interleaved in the same run, reported as nccl-tests does:
algbw = bytes / time, busbw = algbw * 2 (p - 1) / p.  A reference line gives
this machine's memory bandwidth (rank 0 alone: ``a += b``).
"""
from __future__ import annotations

import argparse
from typing import Dict, List

import numpy as np
from mpi4py import MPI

from ..ring import RingAllreduce
from .common import format_size, median, parse_size, quiet_barrier, timed, write_json

DEFAULT_SIZES = "4K,16K,64K,256K,1M,4M,16M,64M,256M"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes", default=DEFAULT_SIZES,
                   help=f"buffer sizes in bytes, comma-separated (default: {DEFAULT_SIZES})")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--repeats", type=int, default=5, help="timed samples per size and "
                                                          "algorithm; the median is reported")
    p.add_argument("--warmup", type=int, default=2, help="untimed samples first")
    p.add_argument("--segment", default="4M", help="ring segment size (default: 4M)")
    p.add_argument("--json", metavar="FILE", help="write the figures as a list of records")


def _iters(nbytes: int) -> int:
    """Calls per timed sample: enough that a sample lasts a few milliseconds."""
    return max(1, min(500, (8 << 20) // max(nbytes, 1)))


def _record(algorithm: str, ranks: int, nbytes: int, seconds: float) -> Dict[str, object]:
    algbw = nbytes / seconds / 1e9
    factor = 2 * (ranks - 1) / ranks if ranks > 1 else 1.0
    return {"algorithm": algorithm, "ranks": ranks, "bytes": nbytes, "time_s": seconds,
            "algbw_GBps": algbw, "busbw_GBps": algbw * factor}


def memory_bandwidth(comm: MPI.Comm, nbytes: int, repeats: int) -> Dict[str, object]:
    """Rank 0 alone times ``a += b`` on float32 arrays of ``nbytes`` (collective)."""
    seconds = 0.0
    if comm.Get_rank() == 0:
        a = np.ones(nbytes // 4, np.float32)
        b = np.ones(nbytes // 4, np.float32)
        import time

        samples = []
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            a += b
            samples.append(time.perf_counter() - t0)
        seconds = median(samples[1:])
    quiet_barrier(comm)
    seconds = comm.bcast(seconds, root=0)
    return {"algorithm": "memory", "ranks": 1, "bytes": nbytes, "time_s": seconds,
            "algbw_GBps": nbytes / seconds / 1e9, "busbw_GBps": 3 * nbytes / seconds / 1e9}


def run(args: argparse.Namespace, comm: MPI.Comm) -> List[Dict[str, object]]:
    """Measure, print the table on rank 0, and return the records."""
    from ..runtime import MpitrainError

    try:
        sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
        segment = parse_size(args.segment)
    except ValueError as exc:
        raise MpitrainError(f"--sizes/--segment: {exc}", everywhere=True) from None
    if args.repeats < 1 or args.warmup < 0 or segment < 1:
        raise MpitrainError(f"need --repeats >= 1, --warmup >= 0, --segment >= 1; got "
                            f"{args.repeats}, {args.warmup}, {args.segment}", everywhere=True)
    dtype = np.dtype(args.dtype)
    ranks, rank = comm.Get_size(), comm.Get_rank()
    ring = RingAllreduce(comm, segment_bytes=segment)
    out = print if rank == 0 else (lambda *a, **k: None)
    out(f"# all-reduce, {ranks} ranks, {dtype}, in place; median of {args.repeats} "
        f"(min-max); busbw = algbw * 2(p-1)/p")
    out(f"# {'size':>6} {'mpi time':>10} {'algbw':>7} {'busbw':>7}   {'ring time':>10} "
        f"{'algbw':>7} {'busbw':>7}   {'ring/mpi':>8}   {'ring busbw range':>16}")
    records: List[Dict[str, object]] = []
    for nbytes in sizes:
        n = nbytes // dtype.itemsize
        # A correctness check first: the ring must agree with MPI on random data.
        check = np.random.default_rng([rank, n]).normal(size=n).astype(dtype)
        expect = check.copy()
        comm.Allreduce(MPI.IN_PLACE, expect, op=MPI.SUM)
        ring(check)
        tol = 1e-4 if dtype == np.float32 else 1e-10
        ok = comm.allreduce(bool(np.allclose(check, expect, rtol=tol, atol=tol * ranks)),
                            op=MPI.LAND)
        if not ok:
            raise MpitrainError(f"ring result differs from MPI_Allreduce at {nbytes} bytes",
                                everywhere=True)
        buf = np.zeros(n, dtype)  # zeros stay zeros: no overflow over many calls
        algos = {"mpi": lambda: comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM),
                 "ring": lambda: ring(buf)}
        iters = _iters(nbytes)
        samples: Dict[str, List[float]] = {k: [] for k in algos}
        for r in range(args.warmup + args.repeats):
            for name, fn in algos.items():  # interleaved, so both see the same noise
                t = timed(comm, fn, iters)
                if r >= args.warmup:
                    samples[name].append(t)
        row = {k: _record(k, ranks, n * dtype.itemsize, median(v)) for k, v in samples.items()}
        records += [row["mpi"], row["ring"]]
        m, g = row["mpi"], row["ring"]
        lo, hi = (g["busbw_GBps"] * g["time_s"] / t for t in (max(samples["ring"]),
                                                             min(samples["ring"])))
        out(f"  {format_size(nbytes):>6} {m['time_s'] * 1e6:>8.1f}us {m['algbw_GBps']:>7.2f} "
            f"{m['busbw_GBps']:>7.2f}   {g['time_s'] * 1e6:>8.1f}us {g['algbw_GBps']:>7.2f} "
            f"{g['busbw_GBps']:>7.2f}   {m['time_s'] / g['time_s']:>8.2f}   "
            f"{lo:>7.2f}-{hi:<7.2f}", flush=True)
    mem = memory_bandwidth(comm, 64 << 20, args.repeats)
    records.append(mem)
    out(f"# memory bandwidth (rank 0 alone, a += b on 64M float32): "
        f"{mem['algbw_GBps']:.1f} GB/s of array bytes ({mem['busbw_GBps']:.1f} GB/s "
        f"counting 2 reads + 1 write)")
    out("# ring/mpi > 1: the ring is faster (ratio of busbw = MPI time / ring time)")
    if args.json and rank == 0:
        write_json(args.json, records)
    return records
