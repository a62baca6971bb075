"""Speed-balanced batches: each rank's part of a global batch in proportion to its speed.

A rank that is persistently slower (an older node, a busy neighbour) holds back
every synchronous step.  Since every rank's gradient is divided by the global
batch before the sum, a global batch cut unevenly still gives the exact
gradient of the global batch; so the ranks measure their compute time per
sample, agree on it every ``every`` steps (one small collective), and cut the
next batches in proportion to speed::

    shares = split(128, [1.0, 0.5])   # rank 1 runs at half speed
    # -> [85, 43]; a batch of 100 (an epoch's last) is cut at 100 * 85 // 128
    cut(100, shares)                   # -> [0, 66, 100]

The split is a pure function of the agreed measurements, so every rank
computes the same one; it is logged when it changes and a checkpoint records
it (``shares``).
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import numpy as np
from mpi4py import MPI

__all__ = ["split", "cut", "SpeedBalancer", "BALANCE"]

BALANCE = ("none", "speed")


def split(total: int, speeds: Sequence[float]) -> List[int]:
    """``total`` samples cut in proportion to ``speeds`` (largest remainders), each part
    at least 1 where its speed is positive and 0 where it is 0 (a rank that computes
    nothing: a parameter server)."""
    takers = [k for k, s in enumerate(speeds) if s > 0]
    if total < len(takers):
        raise ValueError(f"{total} samples for {len(takers)} ranks: need one each")
    out = [0] * len(speeds)
    for k in takers:
        out[k] = 1
    rest = total - len(takers)
    weight = math.fsum(speeds[k] for k in takers)
    exact = {k: rest * speeds[k] / weight for k in takers}
    for k in takers:
        out[k] += int(exact[k])
    left = total - sum(out)
    # The largest remainders get the samples left, ties to the lower rank: deterministic.
    for k in sorted(takers, key=lambda k: (-(exact[k] - int(exact[k])), k))[:left]:
        out[k] += 1
    return out


def cut(count: int, shares: Sequence[int]) -> List[int]:
    """The ``len(shares) + 1`` cut points of a batch of ``count`` samples into parts in
    proportion to ``shares`` (the parts of a full batch; a smaller batch, an epoch's
    last, is cut at the same proportions)."""
    total = sum(shares)
    points, acc = [0], 0
    for s in shares:
        acc += s
        points.append(count * acc // total)
    return points


class SpeedBalancer:
    """Measures this rank's compute time per sample and agrees on a split every ``every``
    steps over ``comm`` (collective then: every rank calls ``observe`` every step).

    ``computes``: whether this rank computes gradients (a parameter server's servers
    do not, and take no share).  ``shares`` is the current split of a full batch
    of ``batch_size`` among the ranks of ``comm``.
    """

    def __init__(self, comm: MPI.Comm, batch_size: int, every: int, computes: bool = True,
                 shares: Optional[List[int]] = None):
        self.comm, self.batch_size, self.every, self.computes = comm, batch_size, every, computes
        flags = comm.allgather(computes)
        self.takers = [r for r, c in enumerate(flags) if c]
        self.shares = shares or split(batch_size, [1.0 if c else 0.0 for c in flags])
        self._seconds = 0.0
        self._samples = 0
        self._steps = 0

    def part(self, count: int, rank: int) -> slice:
        """The part of a batch of ``count`` samples that ``rank`` computes."""
        points = cut(count, self.shares)
        return slice(points[rank], points[rank + 1])

    def observe(self, seconds: float, samples: int) -> Optional[List[int]]:
        """Add this step's compute time; every ``every`` steps agree on the ranks' speeds
        (collective) and return the new split if it changed by more than 2% of the batch
        (else None)."""
        self._seconds += seconds
        self._samples += samples
        self._steps += 1
        if self._steps < self.every:
            return None
        mine = np.array([self._seconds, self._samples], np.float64)
        every = np.empty((self.comm.Get_size(), 2), np.float64)
        self.comm.Allgather(mine, every)
        self._seconds, self._samples, self._steps = 0.0, 0, 0
        speeds = [float(n / t) if r in self.takers and t > 0 and n > 0 else 0.0
                  for r, (t, n) in enumerate(every)]
        if any(speeds[r] <= 0 for r in self.takers):
            return None  # a rank computed nothing in the window: nothing to go by
        new = split(self.batch_size, speeds)
        if max(abs(a - b) for a, b in zip(new, self.shares)) <= max(1, self.batch_size // 50):
            return None
        self.shares = new
        return new
