"""Data-parallel training: every rank holds the whole model and computes its part of a batch.

One step on every rank of ``comm``::

    ids   = the rank's slice of global batch k            (data.sampler.Sampler)
    x, y  = rows ids of the shards                        (data.shards.Shards)
    grads = d/dθ [ sum of the rank's per-sample losses / B ]   (B: global batch)
            (with ``accumulate`` K: in K sequential micro-batches, added up)
    exchange(grads)  ->  sum over ranks = d/dθ [ mean loss of the global batch ]
    (clip the sum to a global norm)
    optimizer.step()

Dividing by the global batch B before the sum, rather than averaging the
ranks' means, makes the result exact when the ranks' parts are unequal.  The
batch's loss sum, the stop requests and the task's metric sums (the correct
count, the squared errors...) ride in extra slots at the end of the exchange
buffer, so one all-reduce per step gives gradients and metrics, and every
rank sees the same loss (and stops together if it is not finite).
"""
from __future__ import annotations

import time
from typing import Dict, List, Optional, Tuple

import numpy as np
from mpi4py import MPI

from ..balance import rank_slice
from ..comm.exchange import Exchange, plan_buckets
from ..comm.overlap import plan_overlap
from ..comm.topology import make_grid
from ..data.prefetch import Prefetcher
from ..data.sampler import Sampler
from ..data.shards import Shards
from ..model.optim import Optimizer
from ..model.sequential import Sequential
from ..model.tasks import Classification, Task
from ..timeline import span
from .base import TrainerBase
from .reproducible import GroupedSteps

__all__ = ["Trainer"]


class Trainer(TrainerBase):
    """Data-parallel training of ``model`` with ``optimizer`` over the ranks of ``comm``.

    ``task`` says what the targets are and which metrics to compute (default:
    classification into the model's output width).  ``allreduce``,
    ``bucket_mb``, ``overlap``, ``progress`` and ``grad_dtype`` choose how the
    gradients are summed (see ``comm.exchange``; ``overlap`` and ``bucket_mb``
    None: chosen by where the ranks are, ``progress`` None: thread, by
    ``comm.overlap.plan_overlap``).  ``accumulate``: micro-batches per step;
    ``clip_grad_norm``: the summed gradient's largest norm; ``seed`` keys
    dropout's draws.
    """

    def __init__(self, model: Sequential, loss, optimizer: Optimizer, train: Shards,
                 sampler: Sampler, comm: MPI.Comm, val: Optional[Shards] = None, *,
                 task: Optional[Task] = None, allreduce: str = "mpi",
                 bucket_mb: Optional[float] = None, overlap: Optional[bool] = None,
                 progress: Optional[str] = None,
                 grad_dtype: Optional[str] = None, accumulate: int = 1,
                 clip_grad_norm: Optional[float] = None, seed: int = 0,
                 groups: Optional[int] = None):
        self.model, self.loss, self.optimizer, self.comm = model, loss, optimizer, comm
        self.accumulate = accumulate
        if task is None:
            last = model.layers[-1].shapes().get("weight", (2,))  # (out, in)
            task = Classification(last[0])
        self.task = task
        self.grid = make_grid(comm, 1)  # pp = 1: the replicas are ``comm`` itself
        self.train, self.val, self.sampler = train, val, sampler
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.shapes = dict(model.shapes)
        self.stage_names = [list(model.shapes)]
        n, w = model.size, 2 + task.width
        # The exchange buffer (n + w,): gradients, then the loss sum, the number of
        # ranks asked to stop (pre-emption) and the task's metric sums, all in one
        # all-reduce.  Buckets from the end of the buffer (the last layer's gradients
        # and the metrics come first), each summed as soon as backward has made it
        # final.  With a 16-bit wire the metric slots stay out of the buckets and are
        # summed exactly (a float16 loss sum would overflow at 65504).
        covered = n if grad_dtype else n + w
        self.metrics = slice(n, n + w)
        overlap, bucket_mb, progress = plan_overlap(comm, overlap, bucket_mb, progress)
        self.exchange = Exchange(
            comm, n + w, model.dtype, algorithm=allreduce,
            buckets=plan_buckets(covered, bucket_mb * 2 ** 20, model.dtype.itemsize),
            overlap=overlap, progress=progress, wire=grad_dtype,
            exact=self.metrics if grad_dtype else None, needed=self.metrics)
        self.check_replicas()  # before a node's ranks come to share one copy (shm)
        self.exchange.adopt(model, optimizer)
        self.xbuf = self.exchange.buffer
        self._prefetch: Optional[Prefetcher] = None
        self._stop = 0  # the step the read-ahead ends at
        self._init_common(clip_grad_norm, seed, groups, resolved=dict(
            overlap=overlap, bucket_mb=bucket_mb, progress=progress))
        # --reproducible: fixed groups added in group order (parallel.reproducible).
        self.grouped = GroupedSteps(self, groups) if groups else None

    def prefetch(self, start: int, stop: int) -> None:
        """Read the batches of steps ``start``..``stop - 1`` ahead, in the background."""
        self.close_prefetch()
        self._stop = stop
        self._prefetch = Prefetcher(self.train, self.sampler, self.rank, self.size, start, stop,
                                    shares=self.shares(), groups=self.groups)

    def _restart_prefetch(self, start: int) -> None:
        if self._prefetch is not None and start < self._stop:
            self.prefetch(start, self._stop)

    def close_prefetch(self) -> None:
        """Stop reading ahead."""
        if self._prefetch is not None:
            self._prefetch.close()
            self._prefetch = None

    def close(self) -> None:
        """Stop the helper threads and free the exchange (collective)."""
        self.close_prefetch()
        super().close()
        self.xbuf = self.exchange.buffer  # a private copy once the window is gone

    def abandon(self) -> List[MPI.Comm]:
        """After a rank died (local): stop reading ahead, then as every trainer."""
        self.close_prefetch()
        return super().abandon()

    def step(self, step: int, stop: bool = False) -> Tuple[float, Dict[str, object], int]:
        """Run global step ``step`` (0-based); return (mean loss, the task's metrics of
        the batch, global batch).

        ``stop`` says this rank was asked to stop; afterwards ``stop_agreed``
        tells every rank alike whether any rank was.
        """
        if self.grouped is not None:
            return self.grouped.step(step, stop)
        t0 = time.perf_counter()
        with span("data", "data"):
            if self._prefetch is not None:
                ids, x, y, batch = self._prefetch.get(step)  # read while the last step computed
            else:
                ids, batch = self.sampler.local(step, self.rank, self.size, self.shares())
                x, y = self.train.read(ids)  # (b, *features), (b, *targets)
        t1 = time.perf_counter()
        self.on_phase("computing")
        metrics = self.xbuf[self.metrics]  # (2 + task.width,): loss sum, stop, task sums
        # Reporting what is final even without overlap keeps both paths' bits equal.
        self._compute(step, ids, x, y, batch, metrics, self.exchange.ready)
        metrics[1] = 1.0 if stop else 0.0
        t2 = time.perf_counter()
        self.on_phase("exchange")
        with span("exchange wait", "exchange"):
            self.exchange.wait()  # only what backward did not hide
        out = self._conclude(step, batch, self.xbuf[self.metrics],
                             (t0, t1, t2, time.perf_counter()))
        self._observe(step, t2 - t1, len(ids))
        return out

    def evaluate(self, chunk: int = 4096) -> Optional[Dict[str, object]]:
        """{"loss": mean loss, task metrics...} on the validation split, each rank a
        slice, summed exactly in float64 (collective); None without one."""
        if self.grouped is not None:
            return self.grouped.evaluate()
        if self.val is None or len(self.val) == 0:
            return None
        self.on_phase("evaluation")
        lo, hi = rank_slice(len(self.val), self.rank, self.size)
        sums = np.zeros(1 + self.task.width)  # loss sum, task sums
        for a in range(lo, hi, chunk):
            x, y = self.val.read_range(a, min(hi, a + chunk))
            out = self.model(x)  # evaluation: no dropout
            sums[0] += self.loss(out, self.task.targets(y, out.dtype), 1.0)[0]
            sums[1:] += self.task.sums(out, y)
        self.comm.Allreduce(MPI.IN_PLACE, sums, op=MPI.SUM)
        return self._evaluated(sums, len(self.val))
