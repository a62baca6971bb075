"""A sum of the groups' gradients in one fixed order, whatever rank holds which group.

A float sum's bits depend on its order, and the order of a gradient sum
changes with the number of ranks (how a batch is split, how MPI pairs the
ranks).  So ``--reproducible`` fixes the order: the groups' gradients are
added left to right, in group order, on any number of ranks::

    S = (...((g_0 + g_1) + g_2) + ...) + g_{G-1}          G fixed groups

Rank r holds the contiguous groups [f_r, l_r).  The first rank with a
non-empty group *leads*: its backward passes add each group into the
gradient buffer as ``--accumulate`` does (``buffer = g_f``, then ``buffer +=
g``: exactly the additions above, for free).  Every later rank computes each
group into a buffer of its own, receives the sum of the groups before its
own from the rank before it, adds its groups to it one by one, and sends it
on; the last rank broadcasts the total.  The chain runs chunk by chunk, so
rank r + 1 adds chunk c while rank r sends chunk c + 1::

    rank 0 (leads)    g_0 .. g_3 accumulated by backward  --S_4-->
    rank 1            S_4 + g_4 + g_5 + g_6 + g_7          --S_8-->
    rank 2            S_8 + g_8 + ... + g_11 = S           Bcast(S, root=2)

With few terms per rank (at most ``SHARDED_TERMS``: the leader's buffer is
one term, every later rank's non-empty group one each) the same additions
are shared out instead: rank s adds up shard s of every rank's terms, in
order, and an Allgatherv spreads the shards.  Each rank then adds 1/p of the
values, not all of them, and sends its terms' shards (p - 1)/p of a buffer
each; with more terms the chain sends less.  Which of the two runs follows
from the cuts alone, so every rank picks the same::

    2 ranks, g_0 on rank 0, g_1 on rank 1:   rank 0: S[:h] = g_0[:h] + g_1[:h]
                                             rank 1: S[h:] = g_0[h:] + g_1[h:]

A rank whose cores compute several groups at once (``parallel.reproducible``)
places all but the first thread's groups ``alone``, even on the leader: each
in a buffer of its own, added in order after the first thread's, as a later
rank's groups are.

On one rank these are the additions of ``--accumulate G``.  The cost on more ranks:
each link carries the buffer once and the broadcast once, not overlapped
with backward; the ranks but the leader add their groups (one float pass a
group).  A group's gradient must have the same bits whatever rank computes
it: the trainers compute each group on its own, with the same shapes.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
from mpi4py import MPI

from ..balance import bounds, rank_slice

__all__ = ["OrderedSum", "TAG_ORDERED"]

CHUNK_BYTES = 1 << 20  # a message of the chain: the receiver adds it while the next travels
TAG_ORDERED = 32000  # point-to-point tag of the chain, on its communicator
# The most terms a rank may hold for the sharded sum: each term travels to every other
# rank in shards ((p - 1) / p of it), against the chain's one buffer and a broadcast.
SHARDED_TERMS = 2


class OrderedSum:
    """One step's fixed-order sum over ``comm`` of the groups each rank computed.

    ``cuts``: the G + 1 cut points of the step's batch into groups (so every
    rank knows which groups are empty and who holds them: ``start``).
    Use: for each non-empty group, in order, ``place(buffer)`` says where backward
    computes it and whether it adds to what is there; then ``finish(buffer)``
    (collective).
    """

    def __init__(self, comm: MPI.Comm, count: int, dtype=np.float32):
        self.comm, self.count, self.dtype = comm, count, np.dtype(dtype)
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self._pool: List[np.ndarray] = []  # the groups' gradients, reused step after step
        self._kept: List[np.ndarray] = []
        self._spare: List[np.ndarray] = []  # shards of other ranks' terms (sharded sum)
        self.chunk = max(1, CHUNK_BYTES // self.dtype.itemsize)
        self.start([0, 1])

    def start(self, cuts: Sequence[int]) -> None:
        """Begin a step whose groups are cut at ``cuts``; rank k holds groups
        ``rank_slice(G, k, p)``, as the trainers give them out."""
        self._kept.clear()
        groups = len(cuts) - 1
        first, last = rank_slice(groups, self.rank, self.size)
        # Each rank's terms of the sum: the leader's buffer (all its groups), then each
        # later rank's non-empty groups one by one; every rank knows them all.
        self.terms = []
        for f, l in (rank_slice(groups, k, self.size) for k in range(self.size)):
            filled = sum(cuts[g + 1] > cuts[g] for g in range(f, l))
            self.terms.append(min(filled, 1) if cuts[f] == 0 else filled)
        self.before = cuts[first] > 0  # a non-empty group precedes this rank's groups
        self.mine = cuts[last] > cuts[first]  # this rank has a non-empty group
        self.leads = not self.before  # backward adds this rank's groups into the buffer
        self._added = 0  # of which backward adds into the leader's buffer

    def place(self, buffer: np.ndarray, alone: bool = False) -> Tuple[np.ndarray, bool]:
        """Where backward computes this rank's next non-empty group, and whether it adds
        to what is there: the leader's groups add up in ``buffer`` (as --accumulate);
        every other rank's group gets a buffer of its own, added after the sum before.
        ``alone``: a buffer of its own even on the leader (a group another thread
        computes at the same time; ``finish`` adds it, in order, after the others)."""
        if self.leads and not alone:
            self._added += 1
            return buffer, self._added > 1
        if len(self._pool) == len(self._kept):
            self._pool.append(np.zeros(self.count, self.dtype))
        self._kept.append(self._pool[len(self._kept)])
        return self._kept[-1], False

    def finish(self, buffer: np.ndarray) -> None:
        """Write the sum of every rank's groups, in group order, into ``buffer``
        (collective).  A leader's ``buffer`` already holds its groups' sum."""
        if self.leads and not self._added:  # the leader's first group (g_f, not 0 + g_f:
            # -0.0 stays -0.0), or nothing so far: the next rank leads after this one
            buffer[...] = self._kept.pop(0) if self._kept else 0
        if self.size > 1 and max(self.terms) <= SHARDED_TERMS:
            self._sharded(buffer)
        else:
            self._chain(buffer)
        self._kept.clear()

    def _chain(self, buffer: np.ndarray) -> None:
        """The sum through the ranks in order, chunk by chunk; the last broadcasts it."""
        # The rank after this one receives only if something precedes its groups.
        sends = self.rank < self.size - 1 and (self.before or self.mine)
        sending: List[MPI.Request] = []
        for a in range(0, self.count, self.chunk):
            b = min(self.count, a + self.chunk)
            if self.before:
                self.comm.Recv(buffer[a:b], source=self.rank - 1, tag=TAG_ORDERED)
            for g in self._kept:  # left to right: (S + g_f) + g_f+1 ...
                buffer[a:b] += g[a:b]
            if sends:
                sending.append(self.comm.Isend(buffer[a:b], dest=self.rank + 1,
                                               tag=TAG_ORDERED))
        MPI.Request.Waitall(sending)
        if self.size > 1:
            self.comm.Bcast(buffer, root=self.size - 1)

    def _sharded(self, buffer: np.ndarray) -> None:
        """Rank s adds up shard s of every rank's terms, in order; then an Allgatherv."""
        if self.leads:  # the leader's other threads' groups, into its one term
            for g in self._kept:
                buffer += g
        own = [buffer] if self.leads and self.mine else self._kept
        edges = bounds(self.count, self.size)
        lo, hi = edges[self.rank], edges[self.rank + 1]
        sending = [self.comm.Isend(t[edges[s]:edges[s + 1]], dest=s, tag=TAG_ORDERED)
                   for t in own for s in range(self.size) if s != self.rank]
        parts: List[Tuple[Optional[MPI.Request], np.ndarray]] = []  # in group order
        spare = iter(self._spares(sum(self.terms) - len(own), hi - lo))
        for k in range(self.size):
            if k == self.rank:
                parts += [(None, t[lo:hi]) for t in own]
            for _ in range(self.terms[k] if k != self.rank else 0):
                into = next(spare)
                parts.append((self.comm.Irecv(into, source=k, tag=TAG_ORDERED), into))
        out = buffer[lo:hi]  # (t_0 + t_1) + t_2 ...: t_0 is the leader's buffer
        for i, (request, term) in enumerate(parts):
            if request is not None:
                request.Wait()
            if i > 0:
                out += term
            elif not (self.leads and self.mine):  # (the leader's is in place already)
                out[...] = term
        if not parts:
            out[...] = 0
        MPI.Request.Waitall(sending)
        counts = [b - a for a, b in zip(edges, edges[1:])]
        self.comm.Allgatherv(MPI.IN_PLACE, [buffer, (counts, edges[:-1])])

    def _spares(self, n: int, length: int) -> List[np.ndarray]:
        """``n`` receive buffers of ``length`` values, reused step after step."""
        while len(self._spare) < n:
            self._spare.append(np.empty(self.count // self.size + 1, self.dtype))
        return [b[:length] for b in self._spare[:n]]
