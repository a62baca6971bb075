"""Shared-memory all-reduce: ranks on a node add straight from each other's buffers.

MPI's Allreduce and the ring move every byte through message queues: the
sender copies into shared cells, the receiver copies out, then adds.  Here
each rank's gradient buffer *is* its segment of one MPI shared-memory window
(``MPI_Win_allocate_shared``), so a rank reads its peers' gradients where
backward wrote them.  For a slice [lo, hi) cut into one part per local rank:

1. every rank's slice is final (a barrier);
2. local rank r sums part r over the node's buffers, in local-rank order
   (so the bits do not depend on which rank adds), into its own buffer;
   across nodes, the ranks with the same local rank sum that part with one
   ``Allreduce`` (the hierarchical all-reduce of Horovod and NCCL);
3. every part is summed (a barrier): each rank copies the other parts from
   their owners' buffers.

For 2 ranks that moves 5 half-buffers per rank instead of about 11, and the
sum has the same bits as MPI's.  A barrier (``fence``) must separate the last
copy from the next write into the buffer, since peers read it.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np
from mpi4py import MPI

from .runtime import MpitrainError

__all__ = ["ShmAllreduce"]


class ShmAllreduce:
    """In-place sum of slices of ``buffer`` over ``comm``, through a shared-memory window.

    ``buffer`` (``count`` items of ``dtype``) is allocated here: the caller
    computes into it and passes slices of it.  ``node`` groups the ranks that
    share memory (default: ``MPI_COMM_TYPE_SHARED``); every node must hold the
    same number of ranks of ``comm``.
    """

    name = "shm"

    def __init__(self, comm: MPI.Comm, count: int, dtype=np.float32,
                 node: Optional[MPI.Comm] = None):
        self.dtype = np.dtype(dtype)
        rank = comm.Get_rank()
        self.node = (node.Dup() if node is not None
                     else comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank))
        self.local_rank, self.local_size = self.node.Get_rank(), self.node.Get_size()
        sizes = comm.allgather(self.local_size)
        if len(set(sizes)) != 1:
            self.node.Free()
            raise MpitrainError("--allreduce shm needs the same number of ranks on every node; "
                                f"ranks per node are {sizes} (by rank)", everywhere=True)
        # The ranks with the same local rank, one per node, in node order.
        self.cross = comm.Split(self.local_rank, rank)
        info = MPI.Info.Create()
        info.Set("alloc_shared_noncontig", "true")  # each segment on its owner's pages
        self.win = MPI.Win.Allocate_shared(max(count, 1) * self.dtype.itemsize,
                                           self.dtype.itemsize, info, comm=self.node)
        info.Free()
        self.views: List[np.ndarray] = []
        for j in range(self.local_size):
            memory, _ = self.win.Shared_query(j)
            self.views.append(np.frombuffer(memory, self.dtype, count))
        self.buffer = self.views[self.local_rank]
        self.buffer[...] = 0
        self.win.Lock_all(MPI.MODE_NOCHECK)  # passive target: Win.Sync is the memory fence
        self.fence()

    def fence(self) -> None:
        """Every rank's writes are visible to the node, and every rank got here (collective)."""
        self.win.Sync()
        self.node.Barrier()
        self.win.Sync()

    def _offsets(self, part: np.ndarray) -> Tuple[int, int]:
        """[lo, hi) of ``part`` within ``buffer``, or ValueError if it is not a slice of it."""
        if isinstance(part, np.ndarray) and part.dtype == self.dtype and part.ndim == 1 \
                and part.flags.c_contiguous:
            where = part.__array_interface__["data"][0] - self.buffer.__array_interface__["data"][0]
            lo = where // self.dtype.itemsize
            if where % self.dtype.itemsize == 0 and 0 <= lo <= self.buffer.size - part.size:
                return lo, lo + part.size
        raise ValueError("the shm all-reduce sums contiguous slices of its own .buffer "
                         f"({self.buffer.size} x {self.dtype}), got another array")

    def reduce(self, part: np.ndarray) -> None:
        """Sum ``part`` (a slice of ``buffer``) over all ranks; peers may still read it after."""
        lo, hi = self._offsets(part)
        # Part j of [lo, hi) is summed by local rank j: [bounds[j], bounds[j + 1]).
        bounds = [lo + (hi - lo) * j // self.local_size for j in range(self.local_size + 1)]
        self.fence()  # every rank's slice is final
        a, b = bounds[self.local_rank], bounds[self.local_rank + 1]
        if b > a:
            mine, views = self.buffer[a:b], [v[a:b] for v in self.views]
            if self.local_size > 1:
                # g0 + g1 + g2 + ..., in local-rank order on every rank.  Ranks 0 and 1
                # may write g0 + g1 over their own gradients; the others still need theirs.
                total = mine if self.local_rank <= 1 else np.empty_like(mine)
                np.add(views[0], views[1], out=total)
                for j in range(2, self.local_size):
                    total += views[j]
                if total is not mine:
                    mine[...] = total
            if self.cross.Get_size() > 1:  # the same part on the other nodes
                self.cross.Allreduce(MPI.IN_PLACE, mine, op=MPI.SUM)
        self.fence()  # every part is summed
        for j in range(self.local_size):
            a, b = bounds[j], bounds[j + 1]
            if j != self.local_rank and b > a:
                self.buffer[a:b] = self.views[j][a:b]

    def __call__(self, part: np.ndarray) -> None:
        """Replace ``part`` (a slice of ``buffer``) by its sum over all ranks (collective)."""
        self.reduce(part)
        self.fence()  # peers are done reading before the caller writes again

    def close(self) -> None:
        """Free the window and the communicators (collective)."""
        self.win.Unlock_all()
        self.win.Free()
        self.cross.Free()
        self.node.Free()
