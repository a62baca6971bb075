"""A sum of the groups' gradients in one fixed order, whatever rank holds which group.

A float sum's bits depend on its order, and the order of a gradient sum
changes with the number of ranks (how a batch is split, how MPI pairs the
ranks).  So ``--reproducible`` fixes the order: a fixed binary tree over the
step's non-empty groups, each node the sum of its two halves (the right one
the larger by at most a group, as ``rank_slice`` gives later ranks the larger
parts), on any number of ranks::

    G = 4:  S = (g_0 + g_1) + (g_2 + g_3)       G = 3:  S = g_0 + (g_1 + g_2)

A tree rather than a left-to-right chain because its subtrees add up where
their groups are: rank r holds the contiguous groups [f_r, l_r), covered by
a few whole subtrees (its *terms*), which it adds up alone, and only the
terms travel.  On 1, 2 or 4 ranks, and with G = 3 or 4 on 3 ranks, every rank
holds one term (12 groups on 3 ranks: up to 3).  Backward adds a group into
the buffer of its left sibling where that sibling is a group (``buffer += g``,
as ``--accumulate`` does: exactly the node's addition, for free); the other
nodes of a term are added when the step's groups are done.  Then rank s adds
up shard s of every rank's terms along the tree, and an Allgatherv spreads
the shards::

    4 groups, 2 ranks:  rank 0: t_0 = g_0 + g_1 (backward)   S[:h] = t_0[:h] + t_1[:h]
                        rank 1: t_1 = g_2 + g_3 (backward)   S[h:] = t_0[h:] + t_1[h:]

so a step costs what an unordered reduce-scatter and allgather cost, plus one
float pass per node that backward could not add.  On one rank with G = 4:
one such pass.  A group's gradient must have the same bits whatever rank
computes it: the trainers compute each group on its own, with the same shapes.
A rank whose cores compute several runs of its groups at once
(``parallel.reproducible``) places each run's groups in buffers of that run.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from mpi4py import MPI

from ..balance import bounds, rank_slice

__all__ = ["OrderedSum", "TAG_ORDERED", "most_terms", "tree_terms"]

TAG_ORDERED = 32000  # point-to-point tag of the terms' shards, on its communicator

Node = Tuple[int, int]  # [a, b) of the step's non-empty groups, by position among them


def halves(node: Node) -> Tuple[Node, Node]:
    """The two children of a node of two or more groups: the right the larger."""
    a, b = node
    m = a + (b - a) // 2
    return (a, m), (m, b)


def tree_terms(lo: int, hi: int, n: int) -> List[Node]:
    """The whole subtrees, left to right, that cover groups [lo, hi) of the tree over
    ``n`` groups: the terms of the rank that holds them."""
    out: List[Node] = []

    def cover(node: Node) -> None:
        a, b = node
        if b <= lo or a >= hi:
            return
        if lo <= a and b <= hi:
            out.append(node)
        else:
            for child in halves(node):
                cover(child)

    if hi > lo:
        cover((0, n))
    return out


def most_terms(groups: int, size: int) -> int:
    """The most terms any of ``size`` ranks holds when all ``groups`` groups are
    non-empty: 1 where the sum can add from shared memory (``OrderedSum.finish``)."""
    return max(len(tree_terms(*rank_slice(groups, k, size), groups)) for k in range(size))


# Where a node's value lies, if it lies somewhere: (its array, whether it may be written).
Held = Callable[[Node], Optional[Tuple[np.ndarray, bool]]]
NOTHING: Iterator[np.ndarray] = iter(())  # no spare arrays: every array may be written


def value(node: Node, get: Held, fresh: Iterator[np.ndarray]) -> Tuple[np.ndarray, bool]:
    """``node``'s value: where ``get`` says it lies, else the sum of its halves, added
    into the left half's array where that may be written, and into the next of
    ``fresh`` where not (another rank's memory); with whether the result may be."""
    held = get(node)
    if held is not None:
        return held
    (left, ours), (right, _) = (value(half, get, fresh) for half in halves(node))
    if not ours:
        return np.add(left, right, out=next(fresh)), True
    left += right
    return left, True


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two arrays are the same memory (views made at different times)."""
    return a.shape == b.shape and a.__array_interface__["data"][0] == \
        b.__array_interface__["data"][0]


class OrderedSum:
    """One step's fixed-order sum over ``comm`` of the groups each rank computed.

    Use: ``start(cuts)`` with the G + 1 cut points of the step's batch into groups
    (every rank knows which groups are empty and who holds them); for each of this
    rank's non-empty groups, in order, ``place(buffer)`` says where backward computes it
    and whether it adds to what is there; then ``finish(buffer)`` (collective) writes
    the sum into ``buffer``.
    """

    def __init__(self, comm: MPI.Comm, count: int, dtype=np.float32):
        self.comm, self.count, self.dtype = comm, count, np.dtype(dtype)
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self._pool: List[np.ndarray] = []  # the terms' buffers, reused step after step
        self._spare: List[np.ndarray] = []  # shards of other ranks' terms
        self.start([0, 1])

    def start(self, cuts: Sequence[int]) -> None:
        """Begin a step whose groups are cut at ``cuts``; rank k holds groups
        ``rank_slice(G, k, p)``, as the trainers give them out."""
        groups = len(cuts) - 1
        filled = np.cumsum([0] + [int(cuts[g + 1] > cuts[g]) for g in range(groups)])
        self.n = int(filled[-1])  # the tree's leaves: the non-empty groups
        # Every rank's terms: the subtrees over its non-empty groups.
        self.terms: List[List[Node]] = []
        for k in range(self.size):
            f, l = rank_slice(groups, k, self.size)
            self.terms.append(tree_terms(int(filled[f]), int(filled[l]), self.n))
        f, _ = rank_slice(groups, self.rank, self.size)
        self._next = int(filled[f])  # the position of this rank's next group
        self._held: Dict[Node, np.ndarray] = {}  # nodes whose value backward leaves in place
        self._open: Dict[int, Node] = {}  # each run's node that its next group may add to
        self._home: Optional[np.ndarray] = None
        self._used = 0  # buffers of the pool in use this step

    def place(self, buffer: np.ndarray, run: int = 0) -> Tuple[np.ndarray, bool]:
        """Where backward computes this rank's next non-empty group, and whether it adds
        to what is there.  ``buffer``: where the sum goes (the first group of run 0
        starts there); ``run``: groups computed one after the other share a run, and
        only a group of the same run adds to another's buffer (threads computing runs
        at once give each a different number)."""
        leaf = (self._next, self._next + 1)
        self._next += 1
        node = self._open.get(run)
        if node is not None and node[1] == leaf[0] and self._parent_of(node, leaf):
            array = self._held.pop(node)
            self._held[(node[0], leaf[1])] = array
            self._open[run] = (node[0], leaf[1])
            return array, True
        if run == 0 and self._home is None:
            self._home = array = buffer
        else:
            if self._used == len(self._pool):
                self._pool.append(np.empty(self.count, self.dtype))
            array = self._pool[self._used]
            self._used += 1
        self._held[leaf] = array
        self._open[run] = leaf
        return array, False

    def _parent_of(self, left: Node, leaf: Node) -> bool:
        """Whether ``left`` and the group ``leaf`` are the two halves of a node."""
        node = (left[0], leaf[1])
        at = (0, self.n)  # down from the root to where the node would be
        while at[1] - at[0] > 1 and at != node:
            low, high = halves(at)
            if node[1] <= low[1]:
                at = low
            elif node[0] >= high[0]:
                at = high
            else:
                return False
        return at == node and halves(node) == (left, leaf)

    def _root_into(self, out: np.ndarray, get: Held, fresh: Iterator[np.ndarray]) -> None:
        """Write the tree's sum (the root's ``value``) into ``out``."""
        root = (0, self.n)
        if self.n == 0:
            out[...] = 0
        elif get(root) is not None:
            if not _same(get(root)[0], out):
                out[...] = get(root)[0]
        else:  # the root's addition straight into place (a + b: commutative, exact)
            np.add(*(value(half, get, fresh)[0] for half in halves(root)), out=out)

    def finish(self, buffer: np.ndarray, shm=None, buckets: Sequence[Tuple[int, int]] = (),
               gather: bool = True) -> None:
        """Write the sum of every rank's groups, in the tree's order, into ``buffer``
        (collective).  ``shm``: the ``comm.shm.ShmAllreduce`` whose segment ``buffer``
        is, on a node that holds every rank of ``comm``: where no rank has more than
        one term, each rank adds its share of each of ``buckets`` from the others'
        segments (the shares ``shm`` sums), and ``gather`` copies the other shares."""
        held = {node: (array, True) for node, array in self._held.items()}
        mine = [value(t, held.get, NOTHING)[0] for t in self.terms[self.rank]]
        self._held.clear()
        if shm is not None and self.size > 1 and max(map(len, self.terms)) <= 1:
            if mine and not _same(mine[0], buffer):  # (no caller's: run 0 starts there)
                buffer[...] = mine[0]  # the others read it in this rank's segment
            self._on_shm(buffer, shm, buckets, gather)
        elif self.size == 1:
            self._root_into(buffer, {(0, self.n): (t, True) for t in mine}.get, NOTHING)
        else:
            self._sharded(buffer, mine)

    def _sharded(self, buffer: np.ndarray, own: List[np.ndarray]) -> None:
        """Rank s adds up shard s of every rank's terms (``own``: this rank's) along
        the tree; then an Allgatherv."""
        edges = bounds(self.count, self.size)
        lo, hi = edges[self.rank], edges[self.rank + 1]
        sending = [self.comm.Isend(t[edges[s]:edges[s + 1]], dest=s, tag=TAG_ORDERED)
                   for t in own for s in range(self.size) if s != self.rank]
        others = [(k, t) for k in range(self.size) if k != self.rank for t in self.terms[k]]
        spare = self._spares(len(others), hi - lo)
        shards: Dict[Node, Tuple[Optional[MPI.Request], np.ndarray]] = {
            t: (self.comm.Irecv(into, source=k, tag=TAG_ORDERED), into)
            for (k, t), into in zip(others, spare)}
        shards.update({t: (None, a[lo:hi]) for t, a in zip(self.terms[self.rank], own)})

        def shard(node: Node) -> Optional[Tuple[np.ndarray, bool]]:
            if node not in shards:
                return None
            request, into = shards[node]
            if request is not None:
                request.Wait()
            return into, True  # (a spare, or a shard of this rank's own term)

        self._root_into(buffer[lo:hi], shard, NOTHING)
        MPI.Request.Waitall(sending)
        counts = [b - a for a, b in zip(edges, edges[1:])]
        self.comm.Allgatherv(MPI.IN_PLACE, [buffer, (counts, edges[:-1])])

    def _on_shm(self, buffer: np.ndarray, shm, buckets: Sequence[Tuple[int, int]],
                gather: bool) -> None:
        """Each rank's share of each bucket added up along the tree from the terms where
        they lie (every rank's segment of ``shm``), into its own segment."""
        holder = {terms[0]: k for k, terms in enumerate(self.terms) if terms}
        me = shm.local_rank
        shm.fence()  # every rank's term is final
        for lo, hi in buckets:
            edges = shm.bounds(lo, hi)
            a, b = min(edges[me], self.count), min(edges[me + 1], self.count)
            if b <= a:
                continue
            # The terms read where they lie and never written (other ranks' segments).
            self._root_into(buffer[a:b], lambda node: (shm.views[holder[node]][a:b], False)
                            if node in holder else None, iter(self._spares(self.size, b - a)))
        if gather:
            for lo, hi in (bucket for bucket in buckets if bucket[0] < self.count):
                shm.gather(buffer[lo:min(hi, self.count)], within=shm.buffer[lo:hi])
            shm.fence()  # the others are done reading this segment

    def _spares(self, n: int, length: int) -> List[np.ndarray]:
        """``n`` receive buffers of ``length`` values, reused step after step."""
        self._spare = [b for b in self._spare if b.size >= length]
        while len(self._spare) < n:
            self._spare.append(np.empty(max(length, self.count // self.size + 1), self.dtype))
        return [b[:length] for b in self._spare[:n]]
