"""Timing helpers shared by the benchmarks."""
from __future__ import annotations

import json
import statistics
import time
from typing import Callable, List, Optional, Sequence, Tuple

from ..runtime import quiet_barrier  # noqa: F401 - re-exported for the benchmarks

__all__ = ["parse_size", "format_size", "timed", "quiet_barrier", "median", "write_json",
           "cpu_ticks"]

UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    """'4K' -> 4096, '64M' -> 67108864, '100' -> 100 (bytes)."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1] if t and t[-1] in UNITS else ""
    number = t[:-1] if unit else t
    try:
        value = int(float(number) * UNITS[unit])
    except ValueError:
        raise ValueError(f"not a size: {text!r} (use e.g. 4K, 1M, 256M)") from None
    if value < 0:
        raise ValueError(f"size must be >= 0, got {text!r}")
    return value


def format_size(n: int) -> str:
    """67108864 -> '64M'."""
    for unit in ("G", "M", "K"):
        if n >= UNITS[unit] and n % UNITS[unit] == 0:
            return f"{n // UNITS[unit]}{unit}"
    return f"{n}B"


def timed(comm, fn: Callable[[], None], iters: int) -> float:
    """Seconds per call of ``fn``, slowest rank's, over ``iters`` calls started together."""
    comm.Barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    elapsed = (time.perf_counter() - t0) / iters
    return comm.allreduce(elapsed, op=_max())


def _max():
    from mpi4py import MPI

    return MPI.MAX


def median(values: Sequence[float]) -> float:
    """The median of ``values``."""
    return statistics.median(values)


def write_json(path: str, records: List[dict]) -> None:
    """Write ``records`` to ``path`` as an indented JSON list, whole or not at all."""
    from ..paths import replace

    with replace(path) as f:
        json.dump(records, f, indent=1)
        f.write("\n")


def cpu_ticks(stat: Optional[str] = None) -> Optional[Tuple[int, int]]:
    """(stolen, wanted) clock ticks of this node's CPUs so far, from /proc/stat; None
    where there is none (not Linux).

    wanted: the time the CPUs ran or wanted to run (all but idle and iowait); stolen:
    the part of it the hypervisor gave to other guests, which a synchronous step pays
    on every rank when it hits one."""
    if stat is None:
        try:
            with open("/proc/stat", encoding="ascii") as f:
                stat = f.readline()
        except OSError:
            return None
    fields = stat.split()
    if len(fields) < 9 or fields[0] != "cpu":
        return None
    # cpu user nice system idle iowait irq softirq steal [guest guest_nice]: the guest
    # fields are already counted in user and nice.
    user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    return steal, user + nice + system + irq + softirq + steal
