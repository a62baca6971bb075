"""Local SGD: each replica takes ``sync_every`` steps alone, then the replicas average.

Every rank reads its slice of global batch k exactly as a synchronous run
does, but between syncs no gradient crosses ranks::

    grads = d/dθ [ mean loss over the rank's OWN samples of batch k ]
    optimizer.step()                                    (the rank's own copy)
    after steps H, 2H, ... and the run's last step (a sync point):
        one sum (in place) of [params | optimizer state | metric sums | flag], by
        ``allreduce`` (auto: through the node's shared memory where its ranks share
        one, else MPI's Allreduce); the parameters and the state live in that buffer,
        so nothing is copied in or out
        params, state = sum x (1/replicas)              (weighted by samples if uneven)
        with outer_lr (DiLoCo): delta = anchor - average; m = mu m + delta;
                                anchor -= outer_lr (delta + mu m); params = anchor

Averaging the optimizer's state as well leaves every replica identical after
a sync, so a checkpoint (taken only at a sync point) is an ordinary one plus
the outer optimizer's ``outer_anchor`` and ``outer_momentum``.  A non-finite
loss rides in the same buffer and is raised by every rank alike at the sync.
A stop request (pre-emption) rides there too, and with a checkpoint directory
each step's flags are also summed without blocking and read a step later:
agreed between syncs, every rank goes back to the last sync point (a copy of
it is kept) and the run stops there.  A healing goes back to it too.  Between syncs
``step`` returns the rank's own loss and metrics of the step; at a sync, the
mean over every replica's samples since the previous sync.
"""
from __future__ import annotations

import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
from mpi4py import MPI

from ..comm.auto import choose
from ..comm.algorithms import make_allreduce
from ..comm.exchange import Exchange
from ..comm.topology import Grid, make_grid
from ..data.batches import Batches
from ..fault.checkpoint import State
from ..model.optim import Optimizer
from ..model.sequential import Sequential
from ..runtime import ConfigError, MpitrainError, literal
from ..timeline import span
from .data_parallel import Trainer, _model
from .recipe import split_options
from .state import OPTIONAL_STATE as OUTER_KEYS

__all__ = ["LocalSGDTrainer", "OUTER_KEYS", "check_local_options"]


def check_local_options(sync_every: Any, outer_lr: Any, outer_momentum: Any) -> None:
    """Refuse values local SGD cannot take (ConfigError naming the parameter)."""
    if isinstance(sync_every, bool) or not isinstance(sync_every, int) or sync_every < 1:
        raise ConfigError(f"{{sync_every}}: expected an integer >= 1, got "
                          f"{literal(repr(sync_every))}", ["sync_every"])
    if outer_lr is not None and (isinstance(outer_lr, bool) or not isinstance(
            outer_lr, (int, float)) or not 0 < outer_lr < float("inf")):
        raise ConfigError(f"{{outer_lr}}: expected a value > 0 (or None: plain averaging), "
                          f"got {literal(repr(outer_lr))}", ["outer_lr"])
    if isinstance(outer_momentum, bool) or not isinstance(outer_momentum, (int, float)) \
            or not 0 <= outer_momentum < 1:
        raise ConfigError(f"{{outer_momentum}}: expected a value in [0, 1), got "
                          f"{literal(repr(outer_momentum))}", ["outer_momentum"])


class LocalSGDTrainer(Trainer):
    """Data-parallel local SGD (and DiLoCo, with ``outer_lr``) of ``model`` over ``comm``.

    Made like ``Trainer`` (the same data, batches and recipe options), with
    ``sync_every`` H (steps between averages), ``outer_lr`` (None: the average
    is the new parameters; a number: a Nesterov outer step of that size on the
    averaged change) and ``outer_momentum``.  Call ``ends_at(total)`` so the
    last step syncs even when it is not a multiple of H::

        trainer = LocalSGDTrainer(model, None, SGD(lr=0.1), data, comm, sync_every=8)
        trainer.ends_at(100)
        loss, metrics, batch = trainer.step(0)   # the rank's own, until step 8
    """

    OPTIONS = ("sync_every", "outer_lr", "outer_momentum", "allreduce")

    def __init__(self, model: Sequential, loss: Any, optimizer: Optimizer, data: Any,
                 comm: Any, *, sync_every: int = 8, outer_lr: Optional[float] = None,
                 outer_momentum: float = 0.9, allreduce: str = "auto",
                 check_start: bool = True, **options):
        comm = comm.world if isinstance(comm, Grid) else comm
        check_local_options(sync_every, outer_lr, outer_momentum)
        self.sync_every, self.outer_lr, self.outer_momentum = sync_every, outer_lr, outer_momentum
        self.check_start = check_start
        self.model, self.optimizer, self.comm = _model(model), optimizer, comm
        recipe = split_options("LocalSGDTrainer", options)
        if recipe.balance != "none":
            raise ConfigError("{balance} speed with {sync_every}: not supported: the speed "
                              "split is for synchronous steps; local steps already run at "
                              "each rank's pace", ["balance", "sync_every"])
        self._begin(loss, data, comm, recipe, dtype=self.model.dtype,
                    replicas=comm.Get_size(), who="ranks")
        self._check_model(comm, self.model.layers)
        self._check_pieces(comm, comm.Get_size(), recipe.accumulate,
                           f"{{accumulate}} {recipe.accumulate}")
        self.grid = make_grid(comm, 1)
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.shapes = dict(self.model.shapes)
        self.stage_names = [list(self.model.shapes)]
        n, w = self.model.size, 2 + self.task.width
        self.metrics = slice(n, n + w)
        # No gradient crosses ranks: an exchange over this process alone keeps the
        # trainer protocol (gradients in its buffer, update, local norm for clipping).
        self.exchange = Exchange(MPI.COMM_SELF, n + w, self.model.dtype, algorithm="mpi",
                                 overlap=False)
        self.check_replicas()
        optimizer.attach(self.model.params, self.model.grads)
        self.exchange.adopt(self.model, optimizer)
        self.xbuf = self.exchange.buffer
        self.batches = Batches(self.train, self.sampler, self.rank, self.size)
        self._finish(comm, None, resolved={})
        self.grouped = None
        self.end: Optional[int] = None  # the run's last step, which syncs too
        inner, _ = self._inner()
        # [params | optimizer state | loss sum, stop, task sums | non-finite flag], summed
        # where auto would sum gradients (shm: the buffer is this rank's window segment).
        count = len(inner) * n + w + 1
        self.sync_by, self.sync_why = (choose(comm) if allreduce == "auto"
                                       else (allreduce, "asked for"))
        self.sync_sum = make_allreduce(self.sync_by, comm, count, self.model.dtype)
        syncbuf = (self.sync_sum.buffer if self.sync_by == "shm"
                   else np.zeros(count, self.model.dtype))
        for k, flat in enumerate(inner):
            syncbuf[k * n:(k + 1) * n] = flat
        self._bind_sync(syncbuf)
        self._reset_interval()
        self.anchor = self.model.params.copy() if outer_lr is not None else None
        self.outer_m = np.zeros_like(self.model.params) if outer_lr is not None else None
        # With keep_sync (a job that heals) or watch_stop: a copy of the state at the last
        # sync point, which every replica held alike; a healing or a stop goes back to it.
        self._synced: Optional[Tuple[List[np.ndarray], int, int, int]] = None
        # A stop request (pre-emption) between syncs, where the loop can stop (watch_stop:
        # a checkpoint directory): each step's flag summed without blocking on a
        # communicator of its own, read one step later; agreed, the job goes back to the
        # last sync (kept) and stops there.  It keeps a rank at most a step or so ahead.
        self.stop_comm = comm.Dup()
        self._stop_flag, self._stop_out = np.zeros(1), np.zeros(1)
        self._stop_req: Optional[MPI.Request] = None

    # -- what the loop asks ----------------------------------------------------------------
    def ends_at(self, total: int) -> None:
        """The run ends after ``total`` steps: that step syncs too."""
        self.end = total

    def syncs_at(self, done: int) -> bool:
        """Whether the step that makes ``done`` steps ends with a sync."""
        return done % self.sync_every == 0 or done == self.end

    def since_sync(self, done: int) -> int:
        """Steps since the previous sync point, at the sync point ``done``."""
        return done - (done - 1) // self.sync_every * self.sync_every

    def describe_sync(self) -> str:
        """How the replicas combine, for the run's first lines."""
        outer = (f", outer Nesterov step lr {self.outer_lr:g} momentum {self.outer_momentum:g}"
                 if self.outer_lr is not None else "")
        by = {"shm": "shared memory (shm)", "ring": "mpitrain's ring"}.get(self.sync_by,
                                                                         "MPI Allreduce")
        return (f"local SGD: parameters and optimizer state averaged through {by} every "
                f"{self.sync_every} steps{outer}")

    # -- a step ----------------------------------------------------------------------------
    def _reset_interval(self) -> None:
        self.sums = np.zeros(self.tail.size, np.float64)  # local sums since the last sync
        self.counts = [0, 0]  # this rank's samples, the global batches' samples
        self.uneven = False  # some batch did not split evenly among the replicas
        self.first = None  # the interval's first step

    def step(self, step: int, stop: Any = False) -> Tuple[float, Dict[str, object], int]:
        """Run global step ``step`` on this replica alone, and sync if it ends an interval;
        return (mean loss, metrics, global batch): this rank's own between syncs, every
        replica's since the previous sync at a sync point."""
        if (self.keep_sync or self.watch_stop) and self._synced is None:  # the start: one too
            self._keep(step)
        t0 = time.perf_counter()
        with span("data", "data"):
            ids, x, y, batch = self.batches.get(step)
        t1 = time.perf_counter()
        self.on_phase("computing")
        metrics = self.xbuf[self.metrics]
        self._compute(step, ids, x, y, len(ids), metrics, None)  # the mean of its own
        metrics[1] = 0.0
        local = metrics.astype(np.float64)
        w = local.size
        self.sums[:w] += local
        self.sums[1] = max(self.sums[1], 1.0 if stop else 0.0)
        if not np.isfinite(local[0]):
            self.sums[w] = 1.0  # raised at the sync by every rank, never by one alone
        self.counts[0] += len(ids)
        self.counts[1] += batch
        self.uneven = self.uneven or batch % self.size != 0
        self.first = step if self.first is None else self.first
        out_metrics = {} if self.clip_grad_norm is None else self._clip(self.clip_grad_norm)
        with span("optimizer", "update"):
            self.exchange.update(self.optimizer)
        t2 = time.perf_counter()
        asked = self._stop_asked(bool(stop)) if self.watch_stop else False
        if self.syncs_at(step + 1):
            self.on_phase("exchange")
            loss, summed = self._sync(step)
        else:
            loss = float(local[0]) / len(ids)
            summed = self.task.summarize(local[2:], len(ids))
            if asked:
                self.stopped_at = self.rewind(step + 1)  # stop at the last sync point
                self.stop_agreed = True
        t3 = time.perf_counter()
        self.times["data"] += t1 - t0
        self.times["compute"] += t2 - t1
        self.times["exchange"] += t3 - t2
        return loss, {**summed, **out_metrics}, batch

    def _sync(self, step: int) -> Tuple[float, Dict[str, object]]:
        """Average the replicas (one Allreduce) and agree on stopping and the loss."""
        inner, _ = self._inner()
        n, dt = self.model.size, self.model.dtype.type
        # Uneven slices: each replica weighs by its share of the interval's samples.
        weight = dt(self.counts[0] / self.counts[1]) if self.uneven else None
        if weight is not None:
            self.syncbuf[:len(inner) * n] *= weight
        self.tail[...] = self.sums
        with span("allreduce", "exchange", lo=0, hi=self.syncbuf.size):
            self.sync_sum(self.syncbuf)
        sums = self.tail.astype(np.float64)
        samples, first = self.counts[1], self.first
        self.stop_agreed = bool(sums[1] > 0)
        loss = float(sums[0]) / samples
        self._reset_interval()
        if sums[-1] > 0 or not np.isfinite(loss):
            self._settle_stop()  # every rank raises here: no request left pending
            epoch, _ = self.sampler.locate(step)
            raise MpitrainError(f"loss is {loss if np.isfinite(loss) else 'not finite'} in "
                                f"steps {first + 1}-{step + 1} (epoch {epoch}) on some "
                                f"replica; try a lower lr (now {self.optimizer.lr})",
                                everywhere=True)
        if weight is None:  # the parameters and state are the buffer: averaged in place
            self.syncbuf[:len(inner) * n] *= dt(1.0 / self.size)
        if self.outer_lr is not None:
            self._outer_step()
        if self.keep_sync or self.watch_stop:
            self._keep(step + 1)
        return loss, self.task.summarize(sums[2:-1], samples)

    def _stop_asked(self, stop: bool) -> bool:
        """Whether some rank was asked to stop by the step before (its flags' sum is done
        by now); this step's flag starts on its way (collective, without blocking)."""
        asked = False
        if self._stop_req is not None:
            self._stop_req.Wait()
            asked = bool(self._stop_out[0] > 0)
        self._stop_flag[0] = 1.0 if stop else 0.0
        self._stop_req = self.stop_comm.Iallreduce(self._stop_flag, self._stop_out, op=MPI.MAX)
        return asked

    def _settle_stop(self) -> None:
        """Complete the pending stop-flag sum (collective: every rank has posted it)."""
        if self._stop_req is not None:
            self._stop_req.Wait()
            self._stop_req = None

    def _bind_sync(self, syncbuf: np.ndarray) -> None:
        """Make the parameters and the optimizer's state views of ``syncbuf`` (which holds
        their values), so a sync sums them where they are: no copy in, no copy out."""
        n = self.model.size
        _, keys = self._inner()
        self.syncbuf, self.tail = syncbuf, syncbuf[(1 + len(keys)) * n:]
        self.model.bind_params(syncbuf[:n])
        self.optimizer.bind(self.model.params, self.model.grads,
                            {key: syncbuf[(1 + k) * n:(2 + k) * n] for k, key in enumerate(keys)})

    def _keep(self, done: int) -> None:
        """Keep the state after ``done`` steps, a sync point (local)."""
        flats, _ = self._flats()
        if self._synced is None:
            self._synced = ([f.copy() for f in flats], 0, 0, 0)
        else:
            for kept, flat in zip(self._synced[0], flats):
                kept[...] = flat
        self._synced = (self._synced[0], self.optimizer.steps, self.clipped, done)

    def rewind(self, completed: int) -> int:
        """After a rank died, or a stop between syncs (local): go back to the state of the
        last sync point and return its step count; ``completed`` (the steps applied)
        without a kept state."""
        if self._synced is None:
            return completed
        kept, steps, clipped, done = self._synced
        flats, _ = self._flats()
        for flat, k in zip(flats, kept):
            flat[...] = k
        self.optimizer.steps, self.clipped = steps, clipped
        self._reset_interval()
        return done

    def close(self) -> None:
        """As every trainer's, and the sync's sum closed (collective; shm: its window)."""
        super().close()
        self._settle_stop()
        self.stop_comm.Free()
        if self.sync_by == "shm":  # the window is freed: the arrays move out of it
            self._bind_sync(self.syncbuf.copy())
        self.sync_sum.close()

    def abandon(self) -> List[MPI.Comm]:
        """After a rank died (local): as every trainer's, and the stop requests'
        communicator, revoked (so the pending sum ends), for the healing to free."""
        if self._stop_req is not None:
            self.stop_comm.Revoke()
            try:
                self._stop_req.Wait()
            except MPI.Exception:
                pass
            self._stop_req = None
        return super().abandon() + [self.stop_comm]

    def _outer_step(self) -> None:
        """DiLoCo's outer Nesterov step on the averaged change since the last sync."""
        dt = self.model.dtype.type
        p, anchor, m = self.model.params, self.anchor, self.outer_m
        delta = anchor - p  # the outer "gradient"
        m *= dt(self.outer_momentum)
        m += delta
        np.multiply(m, dt(self.outer_momentum), out=p)  # p is overwritten below anyway
        delta += p
        delta *= dt(self.outer_lr)
        anchor -= delta
        p[...] = anchor

    # -- checkpoints -----------------------------------------------------------------------
    def _inner(self) -> Tuple[List[np.ndarray], List[str]]:
        """What the replicas average: the parameters, then the optimizer's state by key."""
        return super()._flats()

    def _flats(self) -> Tuple[List[np.ndarray], List[str]]:
        """The parameters, the optimizer's state, then the outer optimizer's arrays."""
        flats, keys = self._inner()
        if self.outer_lr is None:
            return flats, keys
        return flats + [self.anchor, self.outer_m], keys + list(OUTER_KEYS)

    def restore(self, state: Optional[State]) -> None:
        """Load ``state`` (collective); one without the outer arrays (a synchronous run's,
        an older one) starts the outer optimizer afresh at its parameters."""
        if state is not None and self.outer_lr is not None:
            fresh = {OUTER_KEYS[0]: {k: a.copy() for k, a in state.params.items()},
                     OUTER_KEYS[1]: {k: np.zeros_like(a) for k, a in state.params.items()}}
            for key in OUTER_KEYS:
                state.optimizer_state.setdefault(key, fresh[key])
        super().restore(state)
        self._reset_interval()

