"""The parameter-server trainer: the first ``servers`` ranks serve, the others compute.

One step, as the loop sees it (``step(c)`` on every rank)::

    worker: read its part of batch c; forward; backward, pushing each chunk as it is
            final; push the metrics; pull until version >= c + 1 - S
    server: receive clock c's pushes; sum them in worker order; one optimizer step
            on its slice; answer the step's pulls

With ``staleness`` 0 every rank leaves step ``c`` with the parameters after
``c + 1`` updates, as all-reduce training does.  With S >= 1 a worker may run
up to S steps ahead of the slowest; evaluation and checkpoints gather the
newest parameters first (collectives), so they see the same state as a
synchronous run at that step would hold on the servers.

A stop request (pre-emption) of clock c is known to every rank at the end of
step ``c + S``, so all ranks stop there together.
"""
from __future__ import annotations

import math
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
from mpi4py import MPI

from ...balance import bounds
from ...comm.exchange import plan_buckets
from ...comm.overlap import BUCKET_MB
from ...comm.topology import Grid, make_grid
from ...data.batches import Batches
from ...fault.checkpoint import State
from ...model.optim import Optimizer
from ...model.sequential import Sequential
from ...runtime import ConfigError, MpitrainError
from ..base import TrainerBase
from ..data_parallel import _model
from ..evaluation import evaluate_split
from ..recipe import split_options
from .server import Server
from .shard import ServerShard
from .worker import Worker

__all__ = ["PSTrainer"]


class _NoExchange:
    """The parameter server has no all-reduce exchange: nothing to close or revoke."""

    def close(self) -> None:
        """Nothing to free."""

    def abandon(self) -> List[MPI.Comm]:
        """Nothing to revoke."""
        return []


class PSTrainer(TrainerBase):
    """Parameter-server training of ``model`` on the ranks of ``comm``: ranks
    0..``servers - 1`` serve, each a balanced contiguous slice of the parameters
    and its ``optimizer`` state (the optimizer object is attached to that slice);
    the others are workers, each computing its part of every global batch.
    ``staleness``: how many steps a worker may run ahead of the slowest (0:
    synchronous).  ``bucket_mb``: the size of a pushed chunk; ``overlap``: push
    each chunk as soon as backward has made it final (by default, wherever the
    ranks are, in ``BUCKET_MB`` chunks: the servers are other ranks).  The other
    arguments and options are every trainer's (``parallel.recipe``).
    """

    OPTIONS = ("servers", "staleness", "bucket_mb", "overlap")

    def __init__(self, model: Sequential, loss: Any, optimizer: Optimizer, data: Any,
                 comm: Any, *, servers: int = 1, staleness: int = 0,
                 bucket_mb: Optional[float] = None, overlap: Optional[bool] = None,
                 check_start: bool = True, **options):
        comm = comm.world if isinstance(comm, Grid) else comm
        self.check_start = check_start
        size = comm.Get_size()
        if not 1 <= servers < size:
            raise ConfigError(f"{{servers}} {servers} with {size} ranks leaves no worker: the "
                              "parameter server needs at least one rank that computes (at "
                              f"most {size - 1} servers)", ["servers"], everywhere=True)
        self.model, self.comm = _model(model), comm
        recipe = split_options("PSTrainer", options)
        self._begin(loss, data, comm, recipe, dtype=self.model.dtype, replicas=size - servers,
                    who="workers")
        self._check_model(comm, self.model.layers)
        self._check_pieces(comm, size - servers, recipe.accumulate,
                           f"{{accumulate}} {recipe.accumulate}")
        self.servers, self.staleness = servers, staleness
        self.rank, self.size = comm.Get_rank(), size
        self.workers = size - servers
        self.is_server = self.rank < servers
        self.grid = make_grid(comm, 1)
        self.shapes = dict(self.model.shapes)
        self.stage_names = [list(self.model.shapes)]
        self.exchange = _NoExchange()
        overlap = overlap is not False
        bucket_mb = BUCKET_MB if bucket_mb is None else bucket_mb
        self.overlap = overlap  # without it the same chunks go after backward
        self.check_replicas()  # every rank starts from the same parameters
        self._roles(optimizer, bucket_mb)
        balanced = recipe.balance == "speed"  # by world rank, the servers' shares 0
        self.batches = Batches(self.train, self.sampler, self.rank if balanced else
                               self.rank - servers, size if balanced else self.workers)
        self.done: Optional[int] = None  # steps done (every rank alike), once started
        self.gaps: List[int] = []  # each step's staleness on this worker: step - version used
        self._finish(comm, resolved=dict(overlap=overlap, bucket_mb=bucket_mb),
                     computes=not self.is_server)

    def _roles(self, optimizer: Optimizer, bucket_mb: float) -> None:
        """Each server's slice and chunks; this rank's server or worker."""
        model, comm, servers = self.model, self.comm, self.servers
        n, width = model.size, 2 + self.task.width
        cuts = bounds(n, servers)
        slices = [(cuts[s], cuts[s + 1]) for s in range(servers)]
        chunks = sorted(((s, lo + a, lo + b) for s, (lo, hi) in enumerate(slices)
                         for a, b in plan_buckets(hi - lo, bucket_mb * 2 ** 20,
                                                  model.dtype.itemsize) if hi > lo),
                        key=lambda c: -c[1])
        self.peers = comm.Split(0 if self.is_server else 1, self.rank)
        self.lo, self.hi = slices[self.rank] if self.is_server else (0, 0)
        self.counts = [hi - lo for lo, hi in slices] + [0] * self.workers
        self.displs = [lo for lo, _ in slices] + [n] * self.workers
        self.server: Optional[Server] = None
        self.worker: Optional[Worker] = None
        if self.is_server:
            shard = ServerShard(model.params[self.lo:self.hi], optimizer, width=width,
                                depth=self.staleness + 1)
            self.optimizer = shard.optimizer
            mine = [(lo, hi) for s, lo, hi in chunks if s == self.rank]
            self.server = Server(comm, self.peers, shard, self.lo, mine, self.staleness,
                                 servers, self.clip_grad_norm)
        else:
            # Attached to nothing: its name, state keys and step count, for checkpoints.
            self.optimizer = optimizer.attach(model.params[:0], model.grads[:0])
            self.worker = Worker(comm, model.params, model.grads, chunks, slices, width)

    # -- life cycle ------------------------------------------------------------------------
    def _start(self, step: int) -> None:
        """Start the message loop at ``step`` (the parameters hold version ``step``)."""
        if self.server is not None:
            self.server.start(step)
        else:
            self.worker.versions = [step] * self.servers
        self.done = step

    def prefetch(self, start: int, stop: int) -> None:
        """Start at ``start``; a worker reads the batches of steps up to ``stop - 1``
        ahead."""
        if self.done is None:
            self._start(start)
        if self.worker is not None:
            self.batches.prefetch(start, stop)

    def close(self) -> None:
        """Stop the message loop and read-ahead; every rank then holds the final
        parameters (collective)."""
        self.batches.close()
        (self.server or self.worker).close()
        self.gather_params()
        self.peers.Free()

    def gather_params(self) -> None:
        """Give every rank the servers' newest parameters (collective)."""
        self.comm.Allgatherv(MPI.IN_PLACE, [self.model.params, (self.counts, self.displs)])
        if self.worker is not None and self.done is not None:
            # Between steps every server has applied every step done: their version.
            self.worker.versions = [self.done] * self.servers

    # -- one step --------------------------------------------------------------------------

    def step(self, step: int, stop: Any = False) -> Tuple[float, Dict[str, object], int]:
        """Run global step ``step``; return (mean loss, the task's metrics, global batch):
        on a worker those of the newest clock its pull brought (``step - S`` or later)."""
        if self.done is None:
            self._start(step)
        out = self._serve(step, stop) if self.server is not None else self._work(step, stop)
        self.done = step + 1
        return out

    def _serve(self, step: int, stop: Any) -> Tuple[float, Dict[str, object], int]:
        t0 = time.perf_counter()
        self.on_phase("exchange")
        sums = self.server.step(step, self.optimizer.lr, stop)
        batch = self.sampler.size(step)
        loss = float(sums[0]) / batch
        if self.rank == 0 and not math.isfinite(loss):
            epoch, _ = self.sampler.locate(step)
            raise MpitrainError(f"loss is {loss} at step {step + 1} (epoch {epoch}); "
                                f"try a lower lr (now {self.optimizer.lr})")
        metrics = self.task.summarize(sums[2:], batch)
        if self.clip_grad_norm is not None:
            metrics.update({"grad_norm": self.server.last_norm, "clipped": self.server.clipped})
            self.clipped += int(self.server.clipped)
        first = self.server.first_stop
        self.stop_agreed = first >= 0 and step >= first + self.staleness
        self.times["exchange"] += time.perf_counter() - t0
        if self.balancer is not None:
            self._observe(step, 0.0, 0)
        return loss, metrics, batch

    def _work(self, step: int, stop: Any) -> Tuple[float, Dict[str, object], int]:
        t0 = time.perf_counter()
        ids, x, y, batch = self.batches.get(step)  # (b, *features), (b, *targets)
        t1 = time.perf_counter()
        self.on_phase("computing")
        w = self.worker
        self.gaps.append(step - min(w.versions))
        metrics = w.metrics  # (2 + task.width,) float64: loss sum, stop, task sums
        self._compute(step, ids, x, y, batch, metrics, w.ready if self.overlap else None)
        metrics[1] = 1.0 if stop else 0.0
        t2 = time.perf_counter()
        self.on_phase("exchange")
        w.push()
        info = w.pull(step, step + 1 - self.staleness)[0]
        t3 = time.perf_counter()
        first, clock = int(info[1]), int(info[2])
        self.stop_agreed = first >= 0 and step >= first + self.staleness
        known = self.sampler.size(clock) if clock >= 0 else batch
        loss = float(info[3]) / known if clock >= 0 else float("nan")
        task_metrics = self.task.summarize(info[5:], known) if clock >= 0 else {}
        self.times["data"] += t1 - t0
        self.times["compute"] += t2 - t1
        self.times["exchange"] += t3 - t2
        self._observe(step, t2 - t1, len(ids))
        return loss, task_metrics, batch

    # -- evaluation and checkpoints --------------------------------------------------------
    def evaluate(self) -> Optional[Dict[str, object]]:
        """{"loss": ..., task metrics} on the validation split with the servers' newest
        parameters, every rank a slice (collective); None without one."""
        if self.val is None or len(self.val) == 0:
            return None
        self.on_phase("evaluation")
        self.gather_params()
        return evaluate_split(self.model, self.loss, self.task, self.val, self.comm)

    def layout_extra(self) -> Dict[str, Any]:
        """The strategy, for the checkpoint's layout."""
        return {"strategy": "ps", "servers": self.servers, "staleness": self.staleness}

    def capture(self, step: int, config: Dict[str, Any]) -> Optional[State]:
        """The state after ``step`` steps, gathered on rank 0 (collective): the servers'
        slices of the parameters and of the optimizer state, in the usual format."""
        self.gather_params()
        state = self.optimizer.state()
        full = {}
        for key in sorted(state):
            buf = np.empty(self.model.size, self.model.dtype) if self.rank == 0 else None
            self.comm.Gatherv(state[key], [buf, (self.counts, self.displs)]
                              if self.rank == 0 else None, root=0)
            full[key] = buf
        if self.rank != 0:
            return None
        params = self.named(self.model.params.copy())
        opt_state = {k: self.named(v) for k, v in full.items()}
        return self._state(step, config, params, opt_state)

    def restore(self, state: Optional[State]) -> None:
        """Load ``state`` (on rank 0) everywhere: the parameters to every rank, each
        server its slice of the optimizer state (collective)."""
        steps = int(state.optimizer["steps"]) if self.rank == 0 else None
        self.optimizer.steps = self.comm.bcast(steps, root=0)
        if self.rank == 0:
            for name, view in self.named(self.model.params).items():
                view[...] = state.params[name]
        self.comm.Bcast(self.model.params, root=0)
        mine = self.optimizer.state()
        for key in sorted(mine):
            full = None
            if self.rank == 0:
                full = np.empty(self.model.size, self.model.dtype)
                for name, view in self.named(full).items():
                    view[...] = state.optimizer_state[key][name]
            self.comm.Scatterv([full, (self.counts, self.displs)]
                               if self.rank == 0 else None, mine[key], root=0)
        self._restore_shares(state)

    def extras(self, steps: int) -> Dict[str, Any]:
        """Messages and bytes sent per step (all ranks), and the workers' staleness
        (collective)."""
        # [messages, bytes, largest gap, gaps' sum, gaps] of every rank, in one collective.
        mine = np.array([*(self.server or self.worker).sent, max(self.gaps, default=0),
                         sum(self.gaps), len(self.gaps)], np.float64)
        every = np.empty((self.size, mine.size))
        self.comm.Allgather(mine, every)
        sent = every[:, :2].sum(axis=0)
        most, total, count = every[:, 2].max(), every[:, 3].sum(), every[:, 4].sum()
        steps = max(1, steps)
        return {"strategy": "ps", "servers": self.servers, "staleness": self.staleness,
                "messages_per_step": sent[0] / steps, "bytes_per_step": sent[1] / steps,
                "staleness_max": int(most), "staleness_mean": total / max(1.0, count)}
