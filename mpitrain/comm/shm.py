"""Shared-memory all-reduce: ranks on a node add straight from each other's buffers.

MPI's Allreduce and the ring move every byte through message queues: the
sender copies into shared cells, the receiver copies out, then adds.  Here
each rank's gradient buffer *is* its segment of one MPI shared-memory window
(``MPI_Win_allocate_shared``), so a rank reads its peers' gradients where
backward wrote them.  For a slice [lo, hi) cut into one share per local rank:

1. every rank's slice is final (a barrier);
2. local rank r sums share r over the node's buffers, in local-rank order
   (so the bits do not depend on which rank adds), into its own buffer;
   across nodes, the ranks with the same local rank sum that share with one
   ``Allreduce`` (the hierarchical all-reduce of Horovod and NCCL);
3. every share is summed (a barrier): each rank copies the other shares from
   their owners' buffers.

For 2 ranks that moves 5 half-buffers per rank instead of about 11, and the
sum has the same bits as MPI's.  A barrier (``fence``) must separate the last
copy from the next write into the buffer, since peers read it.

The data-parallel trainer goes one step further and skips step 3 (a sharded
update): the ranks of a node share one copy of the parameters and of the
optimizer state (``shared``), and each updates its own share from the sums
it made; a fence then publishes the update to the node.  Every byte a rank
does not own still crosses between cores once per step (as parameters now,
not gradients), but nobody copies the summed gradients or updates the whole
model, and a node holds one copy of the model instead of one per rank.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np
from mpi4py import MPI

from ..runtime import MpitrainError
from .polling import wait_yielding

__all__ = ["ShmAllreduce", "NodeSharedModel"]


class ShmAllreduce:
    """In-place sum of slices of ``buffer`` over ``comm``, through a shared-memory window.

    ``buffer`` (``count`` items of ``dtype``) is allocated here: the caller
    computes into it and passes slices of it.  ``node`` groups the ranks that
    share memory (default: ``MPI_COMM_TYPE_SHARED``); every node must hold the
    same number of ranks of ``comm``.
    """

    name = "shm"
    wires = ()  # it sends nothing: peers read the values where they lie
    progress = ("thread", "none")
    sharded = True  # it can keep a node's model in one shared copy (NodeSharedModel)

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
            raise MpitrainError("the shm all-reduce needs the same number of ranks on every "
                                f"node; ranks per node are {sizes} (by rank)", everywhere=True)
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
        self._windows: List[MPI.Win] = []  # of shared()
        self.fence()

    def fence(self) -> None:
        """Every rank's writes are visible to the node, and every rank got here (collective)."""
        windows = [self.win, *self._windows]
        for win in windows:  # MPI_Win_sync: this rank's stores reach the window
            win.Sync()
        wait_yielding(self.node.Ibarrier())  # a spinning barrier takes a computing core
        for win in windows:  # ... and the other ranks' stores are seen here
            win.Sync()

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

    def bounds(self, lo: int, hi: int) -> List[int]:
        """Local rank j sums [bounds[j], bounds[j + 1]) of the slice [lo, hi)."""
        return [lo + (hi - lo) * j // self.local_size for j in range(self.local_size + 1)]

    def reduce_scatter(self, part: np.ndarray) -> Tuple[int, int]:
        """Sum this rank's share of ``part`` (a slice of ``buffer``) over all ranks, in
        place; return where that share lies in ``buffer``.  Peers still read the rest."""
        lo, hi = self._offsets(part)
        bounds = self.bounds(lo, hi)
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
            if self.cross.Get_size() > 1:  # the same share on the other nodes
                self.cross.Allreduce(MPI.IN_PLACE, mine, op=MPI.SUM)
        return a, b

    def gather(self, part: np.ndarray, within: Optional[np.ndarray] = None) -> None:
        """Copy the other ranks' sums of ``part`` into ``buffer``, once every share is
        summed (collective).  ``within``: the slice ``part`` was summed as (default itself)."""
        lo, hi = self._offsets(part)
        bounds = self.bounds(*self._offsets(part if within is None else within))
        self.fence()  # every share is summed
        for j in range(self.local_size):
            a, b = max(lo, bounds[j]), min(hi, bounds[j + 1])
            if j != self.local_rank and b > a:
                self.buffer[a:b] = self.views[j][a:b]

    def reduce(self, part: np.ndarray) -> None:
        """Sum ``part`` (a slice of ``buffer``) over all ranks; peers may still read it after."""
        self.reduce_scatter(part)
        self.gather(part)

    def shared(self, count: int, dtype=None) -> np.ndarray:
        """A zeroed array of ``count`` items that all ranks of the node share (collective).

        Each local rank zeroes its own share first, so on a multi-socket node
        the pages of a share sit next to the rank that updates them.
        """
        dtype = np.dtype(dtype or self.dtype)
        size = max(count, 1) * dtype.itemsize if self.local_rank == 0 else 0
        win = MPI.Win.Allocate_shared(size, dtype.itemsize, comm=self.node)
        memory, _ = win.Shared_query(0)
        array = np.frombuffer(memory, dtype, count)
        bounds = self.bounds(0, count)
        array[bounds[self.local_rank]:bounds[self.local_rank + 1]] = 0
        win.Lock_all(MPI.MODE_NOCHECK)
        self._windows.append(win)
        self.fence()
        return array

    def __call__(self, part: np.ndarray) -> None:
        """Replace ``part`` (a slice of ``buffer``) by its sum over all ranks (collective)."""
        self.reduce(part)
        self.fence()  # peers are done reading before the caller writes again

    def close(self) -> None:
        """Free the windows and the communicators (collective)."""
        for win in [self.win, *self._windows]:
            win.Unlock_all()
            win.Free()
        self._windows.clear()
        self.cross.Free()
        self.node.Free()


class NodeSharedModel:
    """The sharded update: a node's ranks share one copy of the parameters and the
    optimizer state, and each rank updates the shares of the sums it made.

    Nobody copies the summed gradients back or updates the whole model, and a
    node holds one copy of the model instead of one per rank.  Every write to
    the shared arrays is followed by a fence before anyone reads them: the
    update (each rank its shares), a restore (local rank 0 alone).
    """

    def __init__(self, shm: ShmAllreduce):
        self.shm = shm
        self.leader = shm.local_rank == 0  # writes what the node's ranks share
        self._adopted = None  # (model, optimizer)

    def adopt(self, model, optimizer) -> None:
        """Move the parameters and optimizer state into node-shared memory (collective)."""
        params = self.shm.shared(model.size, model.dtype)
        state = {k: self.shm.shared(a.size, a.dtype) for k, a in optimizer.state().items()}
        if self.leader:  # the replicas hold the same values (checked at start)
            params[...] = model.params
            for k, a in optimizer.state().items():
                state[k][...] = a
        model.bind_params(params)
        optimizer.bind(params, model.grads, state)
        self.shm.fence()
        self._adopted = (model, optimizer)

    def update(self, optimizer, shares: List[slice]) -> None:
        """Update this rank's shares, then wait until every rank has (collective)."""
        optimizer.step(shares)
        self.shm.fence()

    def write(self, fn) -> None:
        """Run ``fn`` (it writes the shared arrays) on local rank 0; the node sees it."""
        if self.leader:
            fn()
        self.shm.fence()

    def release(self) -> None:
        """Copy the parameters and state out of the windows, before they are freed."""
        if self._adopted is None:
            return
        model, optimizer = self._adopted
        model.bind_params(model.params.copy())
        optimizer.bind(model.params, model.grads,
                       {k: a.copy() for k, a in optimizer.state().items()})
        self._adopted = None
