"""$ mpirun -n 2 python -m mpitrain bench allreduce [--sizes 4K,1M,64M] [--json out.json]

The ring and the shared-memory all-reduce against MPI's own ``Allreduce``,
all in place, measured interleaved in the same run, reported as nccl-tests does:
algbw = bytes / time, busbw = algbw * 2 (p - 1) / p.  A reference line gives
this machine's memory bandwidth (rank 0 alone: ``a += b``).
"""
from __future__ import annotations

import argparse
from typing import Dict, List, Optional

import numpy as np
from mpi4py import MPI

from ..comm.ring import RingAllreduce
from ..runtime import MpitrainError
from ..comm.shm import ShmAllreduce
from .common import format_size, median, parse_size, quiet_barrier, timed, write_json

DEFAULT_SIZES = "4K,16K,64K,256K,1M,4M,16M,64M,256M"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``bench allreduce``."""
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


def _measure(comm: MPI.Comm, args: argparse.Namespace, dtype: np.dtype, n: int,
             ring: RingAllreduce, shm: Optional[ShmAllreduce],
             out) -> List[Dict[str, object]]:
    """Check, then time, MPI, the ring and shm (if given) on ``n`` items; print a row
    (collective)."""
    ranks, rank = comm.Get_size(), comm.Get_rank()
    nbytes = n * dtype.itemsize
    # A correctness check first: each must agree with MPI on random data.
    given = np.random.default_rng([rank, n]).normal(size=n).astype(dtype)
    expect = given.copy()
    comm.Allreduce(MPI.IN_PLACE, expect, op=MPI.SUM)
    check = given.copy()
    ring(check)
    results = [("ring", check)]
    if shm is not None:
        shm.buffer[...] = given
        shm(shm.buffer)
        results.append(("shm", shm.buffer))
    tol = 1e-4 if dtype == np.float32 else 1e-10
    for name, got in results:
        ok = comm.allreduce(bool(np.allclose(got, expect, rtol=tol, atol=tol * ranks)),
                            op=MPI.LAND)
        if not ok:
            raise MpitrainError(f"{name} result differs from MPI_Allreduce at {nbytes} bytes",
                                everywhere=True)
    buf = np.zeros(n, dtype)  # zeros stay zeros: no overflow over many calls
    algos = {"mpi": lambda: comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM),
             "ring": lambda: ring(buf)}
    if shm is not None:
        shm.buffer[...] = 0
        algos["shm"] = lambda: shm(shm.buffer)
    iters = _iters(nbytes)
    samples: Dict[str, List[float]] = {k: [] for k in algos}
    for r in range(args.warmup + args.repeats):
        for name, fn in algos.items():  # interleaved, so all see the same noise
            t = timed(comm, fn, iters)
            if r >= args.warmup:
                samples[name].append(t)
    row = {k: _record(k, ranks, nbytes, median(v)) for k, v in samples.items()}
    m, g = row["mpi"], row["ring"]
    lo, hi = (m["time_s"] / t for t in (max(samples["ring"]), min(samples["ring"])))
    h = row.get("shm")
    shm_cols = (f"{h['time_s'] * 1e6:>8.1f}us {h['busbw_GBps']:>6.2f} "
                f"{m['time_s'] / h['time_s']:>7.2f}" if h else "")
    out(f"  {format_size(nbytes):>6} {m['time_s'] * 1e6:>8.1f}us {m['algbw_GBps']:>6.2f} "
        f"{m['busbw_GBps']:>6.2f}   {g['time_s'] * 1e6:>8.1f}us {g['busbw_GBps']:>6.2f} "
        f"{m['time_s'] / g['time_s']:>8.2f} {f'({lo:.2f}-{hi:.2f})':>11}   {shm_cols}",
        flush=True)
    return list(row.values())


def run(args: argparse.Namespace, comm: MPI.Comm) -> List[Dict[str, object]]:
    """Measure, print the table on rank 0, and return the records."""

    try:
        sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
        segment = parse_size(args.segment)
    except ValueError as exc:
        raise MpitrainError(f"--sizes/--segment: {exc}", everywhere=True) from None
    if args.repeats < 1 or args.warmup < 0 or segment < 1:
        raise MpitrainError(f"need --repeats >= 1, --warmup >= 0, --segment >= 1; got "
                            f"{args.repeats}, {args.warmup}, {args.segment}", everywhere=True)
    dtype = np.dtype(args.dtype)
    rank = comm.Get_rank()
    ring = RingAllreduce(comm, segment_bytes=segment)
    out = print if rank == 0 else (lambda *a, **k: None)
    out(f"# all-reduce, {comm.Get_size()} ranks, {dtype}, in place; median of {args.repeats}; "
        f"busbw = algbw * 2(p-1)/p; x/mpi = MPI's time / x's time")
    out(f"# {'size':>6} {'mpi time':>10} {'algbw':>6} {'busbw':>6}   {'ring time':>10} "
        f"{'busbw':>6} {'ring/mpi':>8} {'(range)':>11}   {'shm time':>10} {'busbw':>6} "
        f"{'shm/mpi':>7}")
    records: List[Dict[str, object]] = []
    for nbytes in sizes:
        n = nbytes // dtype.itemsize
        try:
            shm = ShmAllreduce(comm, n, dtype)  # sums slices of its own shared buffer
        except MpitrainError as exc:  # e.g. unequal ranks per node: agreed everywhere
            out(f"# no shm: {exc}")
            shm = None
        try:
            records += _measure(comm, args, dtype, n, ring, shm, out)
        finally:
            if shm is not None:
                shm.close()
    mem = memory_bandwidth(comm, 64 << 20, args.repeats)
    records.append(mem)
    out(f"# memory bandwidth (rank 0 alone, a += b on 64M float32): "
        f"{mem['algbw_GBps']:.1f} GB/s of array bytes ({mem['busbw_GBps']:.1f} GB/s "
        f"counting 2 reads + 1 write)")
    out("# ring/mpi > 1: the ring is faster; (range): over the ring's samples")
    if args.json and rank == 0:
        write_json(args.json, records)
    return records
