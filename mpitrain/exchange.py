"""Gradient exchange: sum a flat buffer across the ranks of a communicator, in place.

Three algorithms (MPI's own ``Allreduce``, mpitrain's ring, or the
shared-memory all-reduce of ``shm.py``) behind one small interface.
``Exchange`` owns the flat buffer (the shm all-reduce needs it in shared
memory), cuts it into buckets of ``bucket_mb``
from its end (the last layer's gradients, which backward produces first) and
starts each bucket's reduction as soon as backward has made it final
(``ready``; a Linear layer reports its weight gradient block by block), so
the exchange runs while backward computes the rest; ``wait`` returns when
every bucket is summed.  Without overlap the same buckets are started after
backward, so both paths give the same bits.

How progress is driven while backward computes (``progress``):

- ``thread``: a helper thread owns the exchange: it runs the ring, or posts
  ``Iallreduce`` and waits on it, while the main thread computes (numpy's
  matmul and MPI calls release the GIL);
- ``test``: ``Iallreduce`` requests posted by the main thread, pushed along
  by ``MPI_Testall`` between layers (mpi only);
- ``none``: requests simply wait until ``wait``; MPICH's asynchronous
  progress thread (``MPIR_CVAR_ASYNC_PROGRESS=1``) may move them meanwhile.
"""
from __future__ import annotations

import queue
import threading
from typing import List, Optional, Tuple

import numpy as np
from mpi4py import MPI

__all__ = ["MPIAllreduce", "make_exchange", "plan_buckets", "Exchange", "PROGRESS"]

PROGRESS = ("thread", "test", "none")


class MPIAllreduce:
    """MPI's own ``Allreduce``, in place and buffer-based (no pickling)."""

    name = "mpi"

    def __init__(self, comm: MPI.Comm):
        self.comm = comm

    def __call__(self, buffer: np.ndarray) -> None:
        """Replace ``buffer`` by its elementwise sum over all ranks."""
        self.comm.Allreduce(MPI.IN_PLACE, buffer, op=MPI.SUM)


def make_exchange(name: str, comm: MPI.Comm, wire: Optional[str] = None,
                  count: int = 0, dtype=np.float32):
    """The blocking all-reduce called ``name`` ('mpi', 'ring' or 'shm') on ``comm``.

    ``wire`` ('float16' or 'bfloat16') sends 16-bit values; only the ring
    can, since MPI's Allreduce would also add in 16 bits.  'shm' sums slices
    of its own shared ``.buffer`` of ``count`` items of ``dtype``.
    """
    if name == "shm":
        if wire:
            raise ValueError(f"a {wire} wire needs the ring all-reduce: the shm all-reduce "
                             "sends nothing")
        from .shm import ShmAllreduce

        return ShmAllreduce(comm, count, dtype)
    if name == "ring":
        from .ring import RingAllreduce

        return RingAllreduce(comm, wire=wire)
    if name == "mpi":
        if wire:
            raise ValueError(f"a {wire} wire needs the ring all-reduce: MPI's Allreduce "
                             "would add in 16 bits")
        return MPIAllreduce(comm)
    raise ValueError(f"allreduce must be 'mpi', 'ring' or 'shm', got {name!r}")


def plan_buckets(total: int, bucket_bytes: float, itemsize: int) -> List[Tuple[int, int]]:
    """Buckets [lo, hi) of a buffer of ``total`` items, in the order they are started:
    from the end (where backward starts), each ``bucket_bytes`` long but the last.
    ``bucket_bytes <= 0``: one bucket."""
    step = int(bucket_bytes // itemsize)
    if step <= 0 or step >= total:
        return [(0, total)]
    return [(max(0, hi - step), hi) for hi in range(total, 0, -step)]


class Exchange:
    """Bucketed, optionally overlapped, sum of its flat ``buffer`` over ``comm``.

    The caller computes into ``buffer`` (``count`` items of ``dtype``), calls
    ``ready(offset)`` whenever everything from ``offset`` to the end of the
    buffer is final (backward has produced it), then ``wait()``.  The slice
    ``exact``, outside the buckets, is summed last at full precision (the
    trainer's loss and counts, when the buckets travel in 16 bits).
    """

    def __init__(self, comm: MPI.Comm, count: int, dtype, buckets: List[Tuple[int, int]],
                 algorithm: str = "mpi", overlap: bool = True, progress: str = "thread",
                 wire: Optional[str] = None, exact: Optional[slice] = None,
                 sharded: bool = False, needed: Optional[slice] = None):
        if progress not in PROGRESS:
            raise ValueError(f"progress must be one of {PROGRESS}, got {progress!r}")
        if progress == "test" and algorithm != "mpi":
            raise ValueError(f"progress 'test' drives MPI requests; {algorithm} needs 'thread'")
        self.comm = comm.Dup()  # its own context: never mixed up with other traffic
        self.blocking = make_exchange(algorithm, self.comm, wire, count, dtype)
        self.buffer = (self.blocking.buffer if algorithm == "shm"
                       else np.zeros(count, dtype))  # (count,)
        self.buckets = buckets
        self.algorithm, self.overlap, self.progress = algorithm, overlap, progress
        self.exact = exact  # summed at full precision by MPI at the end (not in the buckets)
        self.size = comm.Get_size()
        # Sharded (shm): each rank keeps only its share of each bucket's sum, and
        # updates that share of parameters the node's ranks share (``owned``,
        # ``shared``); ``needed`` (the metrics) is copied to every rank.
        self.sharded = sharded and algorithm == "shm" and self.size > 1
        self.needed = needed
        self.owned: List[Tuple[int, int]] = []  # this rank's shares, this step
        # shm: a bucket's sum leaves peers reading this buffer; one fence ends them all.
        self._sum = (self._reduce_scatter if self.sharded
                     else getattr(self.blocking, "reduce", self.blocking))
        self._requests: List[MPI.Request] = []
        self._next = 0  # buckets started so far
        self._jobs: "queue.Queue[Optional[Tuple[int, int]]]" = queue.Queue()
        self._error: Optional[BaseException] = None
        self._worker: Optional[threading.Thread] = None
        if progress == "thread" and self.size > 1:
            self._worker = threading.Thread(target=self._work, name="mpitrain-exchange",
                                            daemon=True)
            self._worker.start()

    def _reduce_scatter(self, part: np.ndarray) -> None:
        self.owned.append(self.blocking.reduce_scatter(part))

    def shared(self, count: int, dtype=None) -> np.ndarray:
        """A zeroed array the ranks of a node share when sharded, else a private one."""
        if self.sharded:
            return self.blocking.shared(count, dtype or self.buffer.dtype)
        return np.zeros(count, dtype or self.buffer.dtype)

    @property
    def leader(self) -> bool:
        """Whether this rank writes what the ranks of its node share (local rank 0)."""
        return not self.sharded or self.blocking.local_rank == 0

    def shares(self) -> Optional[List[slice]]:
        """Sharded: the slices of the buffer this rank summed this step; else None (all)."""
        return [slice(a, b) for a, b in self.owned] if self.sharded else None

    def fence(self) -> None:
        """Sharded: every rank has updated its share; the shared arrays may be read and
        this buffer written again (collective).  Otherwise nothing to do."""
        if self.sharded:
            self.blocking.fence()
            self.owned.clear()

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                self._jobs.task_done()
                return
            try:
                if self._error is None:
                    self._sum(self.buffer[job[0]:job[1]])
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                self._error = exc
            finally:
                self._jobs.task_done()

    def _start(self, lo: int, hi: int) -> None:
        if self.size == 1:
            return
        if self._worker is not None:
            self._jobs.put((lo, hi))
        elif self.algorithm != "mpi":  # no helper thread: the sum runs here, blocking
            self._sum(self.buffer[lo:hi])
        else:
            self._requests.append(self.comm.Iallreduce(MPI.IN_PLACE, self.buffer[lo:hi],
                                                       op=MPI.SUM))

    def ready(self, offset: int) -> None:
        """Everything from ``offset`` on is final: start the buckets that lie there."""
        if not self.overlap:
            return
        while self._next < len(self.buckets) and self.buckets[self._next][0] >= offset:
            self._start(*self.buckets[self._next])
            self._next += 1
        if self.progress == "test" and self._requests:
            MPI.Request.Testall(self._requests)

    def wait(self) -> None:
        """Start what is left and return when every bucket is summed on every rank
        (sharded: when this rank's share of each is, and ``needed`` everywhere)."""
        for lo, hi in self.buckets[self._next:]:
            self._start(lo, hi)
        self._next = 0
        if self._worker is not None:
            self._jobs.join()
        MPI.Request.Waitall(self._requests)
        self._requests.clear()
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        if self.sharded:
            # Every share is summed: copy the needed slots from their owners (each
            # gather fences first).  The caller updates its shares, then fences
            # before this buffer is written again.
            lo, hi = (self.needed.start, self.needed.stop) if self.needed else (0, 0)
            hits = [(a, b) for a, b in self.buckets if max(a, lo) < min(b, hi)]
            for a, b in hits:
                self.blocking.gather(self.buffer[max(a, lo):min(b, hi)],
                                     within=self.buffer[a:b])
            if not hits:
                self.blocking.fence()
        elif self.algorithm == "shm" and self.size > 1:
            self.blocking.fence()  # peers have read this buffer: the next step may write it
        if self.exact is not None and self.size > 1:
            self.comm.Allreduce(MPI.IN_PLACE, self.buffer[self.exact], op=MPI.SUM)

    def close(self) -> None:
        """Stop the helper thread and free the communicator (collective)."""
        if self._worker is not None:
            self._jobs.put(None)
            self._worker.join()
            self._worker = None
        if hasattr(self.blocking, "close"):
            self.blocking.close()
        self.comm.Free()


