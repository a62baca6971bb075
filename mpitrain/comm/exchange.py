"""Gradient exchange: the one interface every trainer uses to sum its gradients.

Three algorithms sum a slice of a flat buffer over a communicator, in place:
MPI's own ``Allreduce``, mpitrain's ring (``ring.py``) and the shared-memory
all-reduce (``shm.py``).  Each declares what it can do (``wires``: 16-bit
formats it can send; ``progress``: how an overlapped exchange can move;
``sharded``: the ranks of a node share one copy of the model and each updates
the share it summed), and ``check_options`` refuses what it cannot, for the
configuration and for ``Exchange`` alike.

``Exchange`` owns the flat buffer (the shm all-reduce needs it in shared
memory), cuts it into buckets from its end (the last layer's gradients,
which backward produces first) and starts each bucket's sum as soon as
backward has made it final::

    ex = Exchange(comm, count, dtype, algorithm="mpi", buckets=plan_buckets(...))
    ex.adopt(model, optimizer)   # gradients into ex.buffer; parameters where the update runs
    # backward computes into ex.buffer, calling ex.ready(offset) whenever
    # buffer[offset:] is final (or nothing: without overlap)
    ex.wait()                    # every bucket summed
    ex.norm_sq(n), ex.scale(f, n)  # (clipping) the sums' squared norm; scale them
    ex.update(optimizer)         # the optimizer applied to the sums (sharded: by shares)
    ex.close()

Without overlap the same buckets are summed after backward, so overlap
changes no bit: with ``progress="thread"`` by the very same calls; with
``"test"`` or ``"none"`` by ``Iallreduce`` where the blocking path calls
``Allreduce``, which MPICH reduces alike but the standard does not promise
beyond two ranks.  How an overlapped exchange moves (``progress``):

- ``thread``: a helper thread owns the exchange: it runs the ring, or MPI's
  Allreduce, while the main thread computes (numpy and MPI release the GIL);
- ``test``: ``Iallreduce`` requests posted by the main thread, pushed along
  by ``MPI_Testall`` between layers (mpi only);
- ``none``: requests simply wait until ``wait`` (the ring and shm then sum
  each bucket at once, blocking).
"""
from __future__ import annotations

import math
import queue
import threading
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
from mpi4py import MPI

from ..runtime import require_thread_multiple
from ..timeline import span
from .algorithms import ALGORITHMS, PROGRESS, MPIAllreduce, check_options, make_allreduce
from .polling import blocking_yields, wait_yielding
from .shm import NodeSharedModel

__all__ = ["MPIAllreduce", "ALGORITHMS", "PROGRESS", "check_options", "make_allreduce",
           "plan_buckets", "Exchange", "PrivateModel"]


def plan_buckets(total: int, bucket_bytes: float, itemsize: int) -> List[Tuple[int, int]]:
    """Buckets [lo, hi) of a buffer of ``total`` items, in the order they are started:
    from the end (where backward starts), each ``bucket_bytes`` long but the last.
    ``bucket_bytes <= 0``: one bucket."""
    step = int(bucket_bytes // itemsize)
    if step <= 0 or step >= total:
        return [(0, total)]
    return [(max(0, hi - step), hi) for hi in range(total, 0, -step)]


class PrivateModel:
    """Each rank holds its own copy of the model: the update is a plain optimizer step."""

    def adopt(self, model, optimizer) -> None:
        """Nothing to move: the parameters and state stay in the rank's memory."""

    def update(self, optimizer, shares: Optional[List[slice]]) -> None:
        """Apply the optimizer to all of the summed gradients."""
        optimizer.step()

    def write(self, fn: Callable[[], None]) -> None:
        """Run ``fn``, which writes the parameters or optimizer state."""
        fn()

    def release(self) -> None:
        """Nothing to release."""


class Exchange:
    """Bucketed, optionally overlapped, sum of its flat ``buffer`` over ``comm``.

    The caller computes into ``buffer`` (``count`` items of ``dtype``), calls
    ``ready(offset)`` whenever everything from ``offset`` to the end of the
    buffer is final (backward has produced it), then ``wait()``.  The slice
    ``exact``, outside the buckets, is summed last at full precision (the
    trainer's loss and counts, when the buckets travel in 16 bits); with a
    sharded update, ``needed`` is the slice every rank needs whole (the metrics).
    ``shared`` False: each rank updates the whole model (PyTorch's optimizers), not shares.
    ``memory``: where the update runs, if not the default (``NodeSharedModel`` when
    sharded, else ``PrivateModel``): a caller that updates the shares itself
    (``torch.owned``) passes ``PrivateModel()``.
    """

    def __init__(self, comm: MPI.Comm, count: int, dtype, *, algorithm: str = "mpi",
                 buckets: Optional[Sequence[Tuple[int, int]]] = None, overlap: bool = True,
                 progress: str = "thread", wire: Optional[str] = None,
                 exact: Optional[slice] = None, needed: Optional[slice] = None,
                 shared: bool = True, memory: Optional[object] = None):
        check_options(algorithm, progress, wire)
        self.size = comm.Get_size()
        self.overlap, self.progress, self.wire = overlap, progress, wire
        self.threaded = overlap and progress == "thread" and self.size > 1
        if self.threaded:
            require_thread_multiple(comm, "the exchange's helper thread ({progress} none "
                                          "avoids it, as does turning {overlap} off)")
        self.comm = comm.Dup()  # its own context: never mixed up with other traffic
        self.algorithm = algorithm
        self.blocking = make_allreduce(algorithm, self.comm, count, np.dtype(dtype), wire)
        self.owns_buffer = algorithm == "shm"  # its buffer is a shared-memory window
        self.buffer = self.blocking.buffer if self.owns_buffer else np.zeros(count, dtype)
        self.buckets = list(buckets or [(0, count)])
        self.exact = exact  # summed at full precision by MPI at the end (not in the buckets)
        # Sharded (shm, more than one rank): each rank keeps only its share of each
        # bucket's sum, and updates that share of parameters the node's ranks share.
        self.sharded = ALGORITHMS[algorithm].sharded and self.size > 1 and shared
        self.needed = needed
        self.memory = memory or (NodeSharedModel(self.blocking) if self.sharded
                                 else PrivateModel())
        self.owned: List[Tuple[int, int]] = []  # this rank's shares, this step
        # Each bucket's sum; with shm peers may still read the buffer after it: one fence
        # in ``wait`` ends every bucket's reads.
        self._sum = self._reduce_scatter if self.sharded else self.blocking.reduce
        # MPI's sums of the buckets, as persistent requests (made once, started each
        # step, waited for without spinning: ``comm.polling``); the blocking path too, so
        # overlap changes no bit.  Not where MPI's blocking calls yield the core by
        # themselves (Open MPI): there its blocking Allreduce is the cheaper.  (Agreed,
        # as Allreduce_init is collective: persistent if any rank's blocking calls spin.)
        self._persistent = {}
        if algorithm == "mpi" and self.size > 1 and progress == "thread" \
                and self.comm.allreduce(not blocking_yields(), op=MPI.LOR):  # agreed:
            self._persistent = {(lo, hi): self.blocking.persistent(self.buffer[lo:hi])
                                for lo, hi in self.buckets}
        self._adopted: Optional[Tuple[object, object]] = None  # (model, optimizer)
        self._requests: List[MPI.Request] = []
        self._next = 0  # buckets started so far
        self._jobs: "queue.Queue[Optional[Tuple[int, int]]]" = queue.Queue()
        self._error: Optional[BaseException] = None
        self._worker: Optional[threading.Thread] = None
        if self.threaded:
            self._worker = threading.Thread(target=self._work, name="mpitrain-exchange",
                                            daemon=True)
            self._worker.start()

    def describe(self) -> str:
        """How the buckets are summed, for the run's header ("one bucket after backward")."""
        when = "overlapped with backward" if self.overlap else "after backward"
        if self.sharded:
            when += "; each rank updates its share of the node's one copy of the model"
        if len(self.buckets) == 1:
            return f"one bucket {when}"
        lo, hi = self.buckets[0]
        return (f"{len(self.buckets)} buckets of "
                f"{(hi - lo) * self.buffer.dtype.itemsize / 2 ** 20:.3g} MiB {when}")

    # -- where the model lives -------------------------------------------------------------
    def adopt(self, model, optimizer) -> None:
        """Make ``model``'s gradients views of the start of ``buffer`` and place its
        parameters and ``optimizer``'s state where the update runs: the rank's own
        memory, or memory the ranks of a node share (sharded).  Collective; once."""
        model.bind_grads(self.buffer[:model.size])
        optimizer.bind(model.params, model.grads)
        self.memory.adopt(model, optimizer)
        self._adopted = (model, optimizer)

    def update(self, optimizer) -> None:
        """Apply ``optimizer`` to the summed gradients (after ``wait``): sharded, each
        rank updates its shares and the node sees the result before anyone reads it."""
        self.memory.update(optimizer, [slice(a, b) for a, b in self.owned]
                           if self.sharded else None)
        self.owned.clear()

    def _sums(self, count: int) -> List[Tuple[int, int]]:
        """The parts of ``buffer[:count]`` whose sums this rank holds (after ``wait``)."""
        if not self.sharded:
            return [(0, count)]
        return [(a, min(b, count)) for a, b in self.owned if a < count]

    def norm_sq(self, count: int) -> float:
        """The squared L2 norm of the summed ``buffer[:count]`` (after ``wait``), the same
        bits on every rank: added in float64 in a fixed order; sharded, each rank adds its
        shares and the node's ranks add those in local-rank order (collective then)."""
        total = 0.0
        block = 1 << 16
        for a, b in self._sums(count):
            for lo in range(a, b, block):
                v = self.buffer[lo:min(b, lo + block)].astype(np.float64)
                total += float(v @ v)
        if not self.sharded:
            return total
        node = self.blocking.node
        parts = np.empty(node.Get_size())
        node.Allgather(np.array([total]), parts)
        return math.fsum(parts)

    def scale(self, factor: float, count: int) -> None:
        """Multiply the summed ``buffer[:count]`` by ``factor`` (after ``wait``; sharded:
        the shares this rank owns, which are the ones its update reads)."""
        f = self.buffer.dtype.type(factor)
        for a, b in self._sums(count):
            self.buffer[a:b] *= f

    def fold_scale(self, factor: float, count: int) -> bool:
        """Multiply the sums of ``buffer[:count]`` by ``factor`` as part of the sum, where
        that saves a pass: with ``shm`` (not sharded), each rank scales the share it
        summed before the others copy it (the same products as ``scale`` after
        ``wait``).  Returns whether it will; if not, call ``scale`` after ``wait``."""
        if self.algorithm != "shm" or self.sharded or self.size == 1:
            return False
        self._folded = (self.buffer.dtype.type(factor), count)
        self._sum = self._reduce_scaled
        return True

    def _reduce_scaled(self, part: np.ndarray) -> None:
        a, b = self.blocking.reduce_scatter(part)
        factor, count = self._folded
        if a < min(b, count):
            self.buffer[a:min(b, count)] *= factor
        self.blocking.gather(part)

    def write(self, fn: Callable[[], None]) -> None:
        """Run ``fn``, which writes the adopted parameters or optimizer state (a restore),
        where it must run: on every rank, or (sharded) once per node (collective)."""
        self.memory.write(fn)

    # -- summing ---------------------------------------------------------------------------
    def _reduce_scatter(self, part: np.ndarray) -> None:
        self.owned.append(self.blocking.reduce_scatter(part))

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                self._jobs.task_done()
                return
            try:
                if self._error is None:
                    self._bucket(job)
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                self._error = exc
            finally:
                self._jobs.task_done()

    def _bucket(self, job: Tuple[int, int]) -> None:
        """Sum bucket ``job`` = (lo, hi), blocking."""
        with span("allreduce", "exchange", lo=job[0], hi=job[1]):
            request = self._persistent.get(job)
            if request is None:
                self._sum(self.buffer[job[0]:job[1]])
            else:
                request.Start()
                wait_yielding(request)

    def start(self, lo: int, hi: int) -> None:
        """Begin summing ``buffer[lo:hi]`` (blocking unless overlapped)."""
        if self.size == 1:
            return
        if self._worker is not None:
            with span("bucket ready", "exchange", lo=lo, hi=hi):  # handed to the thread
                self._jobs.put((lo, hi))
        elif self.overlap and self.algorithm == "mpi" and self.progress in ("test", "none"):
            self._requests.append(self.comm.Iallreduce(MPI.IN_PLACE, self.buffer[lo:hi],
                                                       op=MPI.SUM))
        else:  # no helper thread, no requests: the sum runs here, blocking
            self._bucket((lo, hi))

    def ready(self, offset: int) -> None:
        """Everything from ``offset`` on is final: start the buckets that lie there."""
        if not self.overlap:
            return
        while self._next < len(self.buckets) and self.buckets[self._next][0] >= offset:
            self.start(*self.buckets[self._next])
            self._next += 1
        if self.progress == "test" and self._requests:
            MPI.Request.Testall(self._requests)

    def wait(self) -> None:
        """Start what is left and return when every bucket is summed on every rank
        (sharded: when this rank's share of each is, and ``needed`` everywhere)."""
        for lo, hi in self.buckets[self._next:]:
            self.start(lo, hi)
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
            # gather fences first); ``update`` fences before this buffer is written again.
            lo, hi = (self.needed.start, self.needed.stop) if self.needed else (0, 0)
            hits = [(a, b) for a, b in self.buckets if max(a, lo) < min(b, hi)]
            for a, b in hits:
                self.blocking.gather(self.buffer[max(a, lo):min(b, hi)],
                                     within=self.buffer[a:b])
            if not hits:
                self.blocking.fence()
        elif self.size > 1:
            self.blocking.fence()  # shm: peers have read this buffer, the next step may write
        if self.exact is not None and self.size > 1:
            self.comm.Allreduce(MPI.IN_PLACE, self.buffer[self.exact], op=MPI.SUM)

    def stop(self) -> None:
        """Stop the helper thread (local; after an error: nothing collective)."""
        if self._worker is not None:
            self._jobs.put(None)
            self._worker.join()
            self._worker = None

    def abandon(self) -> List[MPI.Comm]:
        """After a rank died (local): revoke the communicator, so a sum in flight ends
        with an error, and stop the helper thread.  The buffer stays readable; returns
        the communicator, for the healing to free (``fault.elastic.heal``)."""
        self.comm.Revoke()
        self._persistent = {}  # on a revoked communicator: freed with it
        if self._worker is not None:
            self._jobs.put(None)
            self._worker.join()
            self._worker = None
        self._requests.clear()
        return [self.comm]

    def close(self) -> None:
        """Stop the helper thread, move the adopted arrays out of shared memory (they
        stay readable) and free the communicator and windows (collective)."""
        if self._worker is not None:
            self._jobs.put(None)
            self._worker.join()
            self._worker = None
        for request in self._persistent.values():
            request.Free()
        self._persistent = {}
        self.memory.release()
        if self.owns_buffer:  # the window is freed below: keep a private copy
            self.buffer = self.buffer.copy()
            if self._adopted is not None:
                model, optimizer = self._adopted
                model.bind_grads(self.buffer[:model.size])
                optimizer.bind(model.params, model.grads)
        self.blocking.close()
        self.comm.Free()

