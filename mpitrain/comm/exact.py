"""An exact sum of float gradients over groups and ranks: the same bits at any rank count.

A float sum's bits depend on its order, and the order of a gradient sum
changes with the number of ranks (how a batch is split, how MPI pairs the
ranks).  A sum is exact, so its order does not matter, when every term is a
multiple of one unit and no partial sum needs more than 53 bits of them.  So
each group's gradient is rounded to a multiple of a unit every rank agrees
on, the groups are added in float64 (here, then by MPI's ``Allreduce``, exact
whatever the algorithm pairs), and the total rounded to the gradient's dtype
once::

    unit   = 2**(ceil(log2(G * max |g|)) - 52)      per tensor, agreed: an Allreduce
    r_k    = (g_k + 1.5 * 2**52 * unit) - 1.5 * 2**52 * unit    a multiple of unit
    sum    = sum over groups and ranks of r_k       |sum| <= 2**52 units: exact

``unit`` is a power of two, and the two float64 operations round each value
once, to the same multiple whatever rank holds the group (fixed-point
arithmetic carried in floats, as ReproBLAS's binned sums do).  The result
differs from the float sum by about 2**-48 of the largest value, far below
float32's own 2**-24.  The cost: two passes over each group's gradient and a
float64 (twice as wide) all-reduce.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
from mpi4py import MPI

__all__ = ["ExactSum"]

CHUNK = 1 << 16  # items converted at once: the temporaries stay in cache


class ExactSum:
    """Sums the group gradients added with ``add`` over this rank and ``comm``, exactly.

    ``groups``: how many groups the whole job adds each step (all ranks together),
    which bounds the sum.
    """

    def __init__(self, comm: MPI.Comm, count: int, groups: int,
                 segments: Optional[Sequence[Tuple[int, int]]] = None):
        self.comm, self.count, self.groups = comm, count, groups
        # One scale per segment (a parameter tensor): each tensor's rounding then depends
        # on that tensor alone, whatever else the buffer holds (a pipeline stage's).
        self.segments = list(segments or [(0, count)])
        self.acc = np.zeros(count, np.float64)
        self._pool: List[np.ndarray] = []  # the groups' gradients, reused step after step
        self._kept: List[np.ndarray] = []
        self._copies = 0  # of the pool's arrays, in use this step
        self._tmp = np.empty(min(count, CHUNK), np.float64)

    def add(self, grads: np.ndarray, keep: bool = True) -> None:
        """Take one group's gradient for this step's sum: copied, or with ``keep=False``
        used where it lies (the caller leaves it alone until ``finish``)."""
        if not keep:
            self._kept.append(grads)
            return
        if len(self._pool) == self._copies:
            self._pool.append(np.empty_like(grads))
        kept = self._pool[self._copies]
        self._copies += 1
        kept[...] = grads
        self._kept.append(kept)

    def _units(self) -> np.ndarray:
        """Each segment's unit: the power of two every value is rounded to (collective)."""
        most = np.zeros(len(self.segments))
        for g in self._kept:
            for k, (a, b) in enumerate(self.segments):
                if b > a:  # without np.abs's temporary
                    most[k] = max(most[k], float(g[a:b].max()), -float(g[a:b].min()))
        self.comm.Allreduce(MPI.IN_PLACE, most, op=MPI.MAX)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            exponent = np.where(most > 0, np.ceil(np.log2(self.groups * most)), 0.0)
        return np.where(np.isfinite(exponent), np.exp2(exponent - 52.0), np.nan)

    def finish(self, out: np.ndarray) -> None:
        """Write the exact sum of every group added on every rank into ``out`` and start
        the next step (collective)."""
        units = self._units()
        if not np.all(np.isfinite(units)):  # a diverged step: the loss check stops it
            out[...] = np.nan
            self._kept.clear()
            self._copies = 0
            return
        acc = self.acc
        if not self._kept:
            acc[...] = 0
        for (lo, hi), unit in zip(self.segments, units):
            big = 1.5 * 2.0 ** 52 * unit  # (x + big) - big: x rounded to a multiple of unit
            for a in range(lo, hi, CHUNK):  # chunk by chunk: the temporaries stay in cache
                b = min(hi, a + CHUNK)
                t = self._tmp[:b - a]
                for k, g in enumerate(self._kept):
                    if k == 0:
                        np.add(g[a:b], big, out=acc[a:b])
                        acc[a:b] -= big
                    else:
                        np.add(g[a:b], big, out=t)
                        t -= big
                        acc[a:b] += t  # exact: multiples of unit, below 2**53 units
        self._kept.clear()
        self._copies = 0
        if self.comm.Get_size() > 1:
            self.comm.Allreduce(MPI.IN_PLACE, acc, op=MPI.SUM)  # exact in any order
        out[...] = acc  # rounded once to the gradient's dtype
