"""Data-parallel training: every rank holds the whole model and computes its part of a batch.

One step on every rank of ``comm``::

    ids   = the rank's slice of global batch k            (data.batches.Batches)
    x, y  = rows ids of the training split                (data.datasets.Split)
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
from typing import Any, Dict, Optional, Tuple

from ..comm.auto import choose
from ..comm.codecs import wire_of
from ..comm.exchange import Exchange, plan_buckets
from ..comm.overlap import plan_overlap
from ..comm.topology import Grid, make_grid
from ..data.batches import Batches
from ..model.optim import Optimizer
from ..model.sequential import Sequential
from ..runtime import ConfigError, literal
from ..timeline import span
from .base import TrainerBase
from .evaluation import evaluate_split
from .recipe import split_options
from .reproducible import GroupedSteps

__all__ = ["Trainer"]


class Trainer(TrainerBase):
    """Data-parallel training of ``model`` with ``optimizer`` over the ranks of ``comm``.

    ``loss``: a loss object or name, or None for the task's own; ``data``: a
    dataset (``ArrayDataset``, a dataset directory...); the task comes from
    the data.  The exchange's options (``comm.exchange``): ``allreduce`` (mpi,
    ring, shm), ``bucket_mb``, ``overlap``, ``progress`` (None: chosen by where
    the ranks are, ``comm.overlap.plan_overlap``) and ``grad_dtype`` (a 16-bit
    wire, with ring).  ``groups``: with a number, the reproducible step (fixed
    groups added in one fixed order: the same bits at any rank count).  ``check_start``:
    refuse replicas that start from different parameters (a healing, which hands them one
    state next, turns it off).  Every
    other option is the ``Recipe``'s (``batch_size``, ``seed``, ``accumulate``,
    ``clip_grad_norm``...)::

        trainer = Trainer(model, None, Adam(lr=1e-3), data, comm, batch_size=64)
        loss, metrics, batch = trainer.step(0)
    """

    OPTIONS = ("allreduce", "bucket_mb", "overlap", "progress", "grad_dtype", "groups")

    def __init__(self, model: Sequential, loss: Any, optimizer: Optimizer, data: Any,
                 comm: Any, *, allreduce: str = "auto", bucket_mb: Optional[float] = None,
                 overlap: Optional[bool] = None, progress: Optional[str] = None,
                 grad_dtype: Optional[str] = None, groups: Optional[int] = None,
                 check_start: bool = True, **options):
        comm = comm.world if isinstance(comm, Grid) else comm
        self.check_start = check_start
        self.model, self.optimizer, self.comm = _model(model), optimizer, comm
        recipe = split_options("Trainer", options)
        self._begin(loss, data, comm, recipe, dtype=self.model.dtype,
                    replicas=comm.Get_size(), who="ranks")
        self._check_model(comm, self.model.layers)
        self._check_pieces(comm, comm.Get_size(), recipe.accumulate,
                           f"{{accumulate}} {recipe.accumulate}")
        self.grid = make_grid(comm, 1)  # pp = 1: the replicas are ``comm`` itself
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.shapes = dict(self.model.shapes)
        self.stage_names = [list(self.model.shapes)]
        wire = wire_of(grad_dtype)
        n, w = self.model.size, 2 + self.task.width
        # The exchange buffer (n + w,): gradients, then the loss sum, the number of
        # ranks asked to stop (pre-emption) and the task's metric sums, all in one
        # all-reduce.  Buckets from the end of the buffer (the last layer's gradients
        # and the metrics come first), each summed as soon as backward has made it
        # final.  With a 16-bit wire the metric slots stay out of the buckets and are
        # summed exactly (a float16 loss sum would overflow at 65504).
        covered = n if wire else n + w
        self.metrics = slice(n, n + w)
        chosen = {}
        if allreduce == "auto":  # shm where it serves (comm.auto)
            allreduce, why = choose(comm, wire=wire, progress=progress, ordered=groups or 0,
                                   ordered_on_shm=True)
            chosen = {"allreduce": allreduce, "allreduce_why": why}
        overlap, bucket_mb, progress = plan_overlap(comm, overlap, bucket_mb, progress)
        self.exchange = Exchange(
            comm, n + w, self.model.dtype, algorithm=allreduce,
            buckets=plan_buckets(covered, bucket_mb * 2 ** 20, self.model.dtype.itemsize),
            overlap=overlap, progress=progress, wire=wire,
            exact=self.metrics if wire else None, needed=self.metrics)
        self.check_replicas()  # before a node's ranks come to share one copy (shm)
        optimizer.attach(self.model.params, self.model.grads)
        self.exchange.adopt(self.model, optimizer)
        self.xbuf = self.exchange.buffer
        self.batches = Batches(self.train, self.sampler, self.rank, self.size, groups=groups)
        self._finish(comm, groups, resolved=dict(overlap=overlap, bucket_mb=bucket_mb,
                                                 progress=progress, **chosen))
        # groups: fixed groups added in one fixed order (parallel.reproducible).
        self.grouped = GroupedSteps(self, groups) if groups else None

    def close(self) -> None:
        """Stop the helper threads and free the exchange (collective)."""
        super().close()
        self.xbuf = self.exchange.buffer  # a private copy once the window is gone

    def step(self, step: int, stop: Any = False) -> Tuple[float, Dict[str, object], int]:
        """Run global step ``step`` (0-based); return (mean loss, the task's metrics of
        the batch, global batch).

        ``stop``: whether this rank was asked to stop (a bool, or an object whose
        truth is read as the step's exchange starts: a ``Preemption``); afterwards
        ``stop_agreed`` tells every rank alike whether any rank was.
        """
        if self.grouped is not None:
            return self.grouped.step(step, stop)
        t0 = time.perf_counter()
        with span("data", "data"):
            ids, x, y, batch = self.batches.get(step)  # read ahead while the last step ran
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

    def evaluate(self) -> Optional[Dict[str, object]]:
        """{"loss": mean loss, task metrics...} on the validation split, each rank a
        slice, summed exactly in float64 (collective); None without one."""
        if self.grouped is not None:
            return self.grouped.evaluate()
        if self.val is None or len(self.val) == 0:
            return None
        self.on_phase("evaluation")
        return evaluate_split(self.model, self.loss, self.task, self.val, self.comm)


def _model(model: Any) -> Sequential:
    """A ``Sequential``, or the refusal naming what was given."""
    if isinstance(model, Sequential):
        return model
    raise ConfigError(f"{{model}}: expected a mpitrain.Sequential (a list of layers: wrap it, "
                      f"Sequential(layers, seed=0)), got {literal(type(model).__name__)}",
                      ["model"])
