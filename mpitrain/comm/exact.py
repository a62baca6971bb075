"""An exact sum of float gradients over groups and ranks: the same bits at any rank count.

A float sum's bits depend on its order, and the order of a gradient sum
changes with the number of ranks (how a batch is split, how MPI pairs the
ranks).  Integers add exactly in any order.  So each group's gradient is
turned into fixed-point integers with one scale every rank agrees on, the
integers are added (here, then by MPI's ``Allreduce`` on int64, whose sum is
exact whatever the algorithm), and the total turned back into floats once::

    scale  = 2**(61 - ceil(log2(G * max |g|)))     per tensor, agreed: an Allreduce
    q_k    = rint(g_k * scale)                      int64, |q_k| <= 2**61 / G
    sum    = (sum over groups and ranks of q_k) / scale

``scale`` is a power of two, so ``g * scale`` is exact, and ``rint`` rounds
each value once, to the same integer whatever rank holds the group.  No
partial sum can exceed 2**61 < 2**63.  The result differs from the float sum
by at most half a unit of 2**-scale per group: for the largest values about
2**-37 of the largest, far below float32's own 2**-24.  The cost is a pass
over each group's gradient and an int64 (twice as wide) all-reduce.
"""
from __future__ import annotations

import math
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
        self.acc = np.zeros(count, np.int64)
        self._pool: List[np.ndarray] = []  # the groups' gradients, reused step after step
        self._kept: List[np.ndarray] = []
        self._tmp = np.empty(min(count, CHUNK), np.float64)
        self._itmp = np.empty(min(count, CHUNK), np.int64)

    def add(self, grads: np.ndarray) -> None:
        """Keep one group's gradient (copied) for this step's sum."""
        if len(self._pool) == len(self._kept):
            self._pool.append(np.empty_like(grads))
        kept = self._pool[len(self._kept)]
        kept[...] = grads
        self._kept.append(kept)

    def _scales(self) -> np.ndarray:
        """Each segment's scale, agreed by every rank (collective)."""
        most = np.zeros(len(self.segments))
        for g in self._kept:
            for k, (a, b) in enumerate(self.segments):
                if b > a:
                    most[k] = max(most[k], float(np.max(np.abs(g[a:b]))))
        self.comm.Allreduce(MPI.IN_PLACE, most, op=MPI.MAX)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            exponent = np.where(most > 0, np.ceil(np.log2(self.groups * most)), 0.0)
        return np.where(np.isfinite(exponent), np.exp2(61.0 - exponent), np.nan)

    def finish(self, out: np.ndarray) -> None:
        """Write the exact sum of every group added on every rank into ``out`` and start
        the next step (collective)."""
        scales = self._scales()
        if not np.all(np.isfinite(scales)):  # a diverged step: the loss check stops it
            out[...] = np.nan
            self._kept.clear()
            return
        acc = self.acc
        acc[...] = 0
        for (lo, hi), scale in zip(self.segments, scales):
            for g in self._kept:
                for a in range(lo, hi, CHUNK):
                    b = min(hi, a + CHUNK)
                    t, it = self._tmp[:b - a], self._itmp[:b - a]
                    np.multiply(g[a:b], scale, out=t)  # exact: a power of two
                    np.rint(t, out=t)
                    it[...] = t
                    acc[a:b] += it
        self._kept.clear()
        if self.comm.Get_size() > 1:
            self.comm.Allreduce(MPI.IN_PLACE, acc, op=MPI.SUM)
        for (lo, hi), scale in zip(self.segments, scales):
            for a in range(lo, hi, CHUNK):
                b = min(hi, a + CHUNK)
                t = self._tmp[:b - a]
                t[...] = acc[a:b]  # rounded to 53 bits: the same integer, the same float
                out[a:b] = t / scale
