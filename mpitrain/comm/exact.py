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
float32's own 2**-24.  Each group's gradient is computed into a buffer of its
own (``scratch``), so none is copied.  The cost per group: a pass for its
largest value and three float64 operations per value (chunk by chunk, in
cache); then a float64 (twice as wide) all-reduce.
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
    which bounds the sum.  ``segments``: the tensors' [start, stop) in the buffer,
    each with its own unit.  A group's gradient is computed into ``scratch()``
    (or, for the step's last, into the buffer the sum is written to) and handed to
    ``add``; no group is copied.
    """

    def __init__(self, comm: MPI.Comm, count: int, groups: int,
                 segments: Optional[Sequence[Tuple[int, int]]] = None, dtype=np.float32):
        self.comm, self.count, self.groups = comm, count, groups
        # One unit per segment (a parameter tensor): each tensor's rounding then depends
        # on that tensor alone, whatever else the buffer holds (a pipeline stage's).
        self.segments = list(segments or [(0, count)])
        self.acc = np.zeros(count, np.float64)  # multiples of the units
        self.dtype = np.dtype(dtype)
        self._pool: List[np.ndarray] = []  # the groups' gradients, reused step after step
        self._kept: List[np.ndarray] = []
        self._lent = 0  # of the pool's arrays, handed out this step
        self._tmp = np.empty(min(count, CHUNK), np.float64)

    def scratch(self) -> np.ndarray:
        """A (count,) buffer to compute one group's gradient into, then ``add`` it."""
        if len(self._pool) == self._lent:
            self._pool.append(np.zeros(self.count, self.dtype))
        self._lent += 1
        return self._pool[self._lent - 1]

    def add(self, grads: np.ndarray) -> None:
        """Take one group's gradient for this step's sum; the caller leaves it alone until
        ``finish``."""
        self._kept.append(grads)

    def _units(self) -> np.ndarray:
        """Each segment's unit: the power of two every value is rounded to (collective)."""
        most = np.zeros(len(self.segments))
        for g in self._kept:
            for k, (a, b) in enumerate(self.segments):
                if b > a:  # without np.abs's temporary; a NaN stays NaN (a diverged step)
                    most[k] = np.max([most[k], g[a:b].max(), -g[a:b].min()])
        self.comm.Allreduce(MPI.IN_PLACE, most, op=MPI.MAX)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            exponent = np.where(most == 0, 0.0, np.ceil(np.log2(self.groups * most)))
        return np.where(np.isfinite(exponent), np.exp2(exponent - 52.0), np.nan)

    def finish(self, out: np.ndarray) -> None:
        """Write the exact sum of every group added on every rank into ``out`` and start
        the next step (collective)."""
        units = self._units()
        kept, self._kept, self._lent = self._kept, [], 0
        if not np.all(np.isfinite(units)):  # a diverged step: the loss check stops it
            out[...] = np.nan
            return
        acc, t = self.acc, self._tmp
        for (lo, hi), unit in zip(self.segments, units):
            big = 1.5 * 2.0 ** 52 * unit  # (x + big) - big: x rounded to a multiple of unit
            for a in range(lo, hi, CHUNK):  # chunk by chunk: the temporaries stay in cache
                b = min(hi, a + CHUNK)
                if not kept:
                    acc[a:b] = 0
                for i, g in enumerate(kept):
                    if i == 0:
                        np.add(g[a:b], big, out=acc[a:b])
                        acc[a:b] -= big
                    else:
                        np.add(g[a:b], big, out=t[:b - a])
                        t[:b - a] -= big
                        acc[a:b] += t[:b - a]  # exact: multiples of unit, below 2**53 units
        if self.comm.Get_size() > 1:
            self.comm.Allreduce(MPI.IN_PLACE, acc, op=MPI.SUM)  # exact in any order
        out[...] = acc  # rounded once to the gradient's dtype
