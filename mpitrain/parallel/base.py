"""What every trainer shares: how it is made, the end of a step, its life cycle.

Every trainer is made from the same arguments (``parallel.recipe``)::

    Trainer(model, loss, optimizer, data, comm, **options)
    PSTrainer(model, loss, optimizer, data, comm, servers=1, **options)
    PipelineTrainer(model, loss, optimizer, data, comm, pp=2, microbatches=4, **options)

and keeps the same protocol, which the training loop drives without knowing
which one runs: ``step(k)``, ``evaluate()``, ``set_lr``, ``prefetch``, the
checkpoint protocol (``parallel.state``: ``capture``, ``mismatch``,
``restore``), ``close`` and, after a rank died, ``abandon``.
"""
from __future__ import annotations

import hashlib
import math
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from mpi4py import MPI

from ..model.registry import modules_of
from ..model.spec import names_in
from ..process import init
from ..runtime import ConfigError, MpitrainError, agreed
from ..timeline import span
from .compute import Computing
from .recipe import Recipe, check_batch, connect, loss_for, sampler_for, task_of, walk_shapes
from .reproducible import norm_sq_by_tensor
from .speed import SpeedBalancer
from .state import CheckpointState

__all__ = ["TrainerBase"]


class TrainerBase(Computing, CheckpointState):
    """Made by ``_begin`` (the data, task, loss, sample order, the model checked against
    them) then the strategy's own constructor, which sets ``grid`` (a
    ``comm.topology.Grid``), ``model`` (this rank's stage, a ``Sequential``),
    ``optimizer`` (attached), ``exchange`` (a ``comm.exchange.Exchange`` over
    ``grid.dp_comm``), ``batches`` (``data.batches.Batches``), ``stage_names`` (the
    parameter names of each stage, in full-model order) and ``shapes`` (every
    parameter's shape), then calls ``_finish``.

    A step's metric vector (summed over ranks) is ``[loss sum, stop requests,
    *task sums]``: ``2 + task.width`` numbers.
    """

    def _begin(self, loss, data, comm, recipe: Recipe, *, dtype, replicas: int,
               who: str) -> None:
        """The parts every strategy needs, checked on every rank alike (collective):
        ``replicas`` parts of each batch (``who`` names them in messages)."""
        init()  # threads, malloc, the job-ending excepthook: once per process
        self.recipe = recipe
        self.data = connect(data, comm, recipe, dtype)
        self.train, self.val = self.data.train, self.data.val
        self.task = agreed(comm, lambda: task_of(self.data))
        self.loss = agreed(comm, lambda: loss_for(loss, self.task))
        check_batch(comm, recipe, self.data, replicas, who)
        self.sampler = agreed(comm, lambda: sampler_for(self.data, recipe))
        self.accumulate, self.seed = recipe.accumulate, recipe.seed
        self.clip_grad_norm = recipe.clip_grad_norm  # None: no clipping

    def _check_model(self, comm, layers: Sequence[Any]) -> List[Tuple[int, ...]]:
        """A sample's shape before each layer, the model checked against the data and
        the task (collective: the same error on every rank)."""
        return agreed(comm, lambda: walk_shapes(layers, self.data.features,
                                                self.task.outputs))

    def _check_pieces(self, comm, replicas: int, pieces: int, what: str) -> None:
        """Each replica's part of a batch gives every one of ``pieces`` micro-batches a
        sample; ``what`` names the options that cut it (a ConfigError template)."""

        def check() -> None:
            smallest = self.recipe.batch_size // replicas
            if pieces > smallest:
                raise ConfigError(f"{what} cuts each replica's part of {{batch_size}} "
                                  f"{self.recipe.batch_size} ({smallest} samples for "
                                  f"{replicas} replicas) into {pieces} micro-batches: more "
                                  "than it has samples")

        agreed(comm, check)

    def _finish(self, comm, groups: Optional[int] = None,
                resolved: Optional[Dict[str, Any]] = None, computes: bool = True) -> None:
        """The state every trainer keeps; the speed balancer if the recipe asks for it
        (``computes``: whether this rank computes gradients; collective then)."""
        # The parameters left to the trainer (None) and what it chose, by name: the run's
        # record (run.jsonl) shows what ran, e.g. {"overlap": False, "bucket_mb": 0.0}.
        self.resolved: Dict[str, Any] = dict(resolved or {})
        self.groups = groups  # reproducible: the fixed groups of each batch (else None)
        text = self.model_text()
        # What checkpoints record of the model: its text, a sample's shape, and the module
        # of each registered layer it uses (a loading process that lacks one is told which).
        self.spec: Dict[str, Any] = {"spec": text, "input_shape": list(self.data.features)}
        registered = modules_of(names_in(text)) if text else {}
        if registered:
            self.spec["registered"] = registered
        self.clipped = 0  # steps whose gradient was scaled down
        self.times = {"data": 0.0, "compute": 0.0, "exchange": 0.0}
        self.stop_agreed = False  # set by step(): some rank was asked to stop
        self.on_phase: Callable[[str], None] = lambda phase: None  # for the watchdog
        self.peak_activation_bytes = 0  # saved for backward at once (measured by pipelines)
        # With a healing pipeline: the state before the last update, so a step applied by
        # some stages only can be undone (run.recovery); (arrays, optimizer steps, clipped).
        self.keep_before_update = False
        self._before: Optional[Tuple[List[np.ndarray], int, int]] = None
        # Local SGD: keep the last sync point's state for a healing (keep_sync), sum the
        # stop flags every step (watch_stop); a stop that went back to it (stopped_at).
        self.keep_sync = self.watch_stop = False
        self.stopped_at: Optional[int] = None
        # Speed-balanced batches (parallel.speed); its changes are reported through
        # ``on_event(line, record)``, set by the loop.
        self.balancer: Optional[SpeedBalancer] = None
        if self.recipe.balance == "speed":
            self.balancer = SpeedBalancer(comm, self.recipe.batch_size,
                                          self.recipe.balance_every, computes)
            self.batches.shares = self.balancer.shares
        self.on_event: Callable[[str, Dict[str, Any]], None] = lambda line, record: None

    def whole_params(self) -> np.ndarray:
        """The whole model's flat parameters on this rank (after ``close``)."""
        return self.model.params

    def describe_model(self) -> str:
        """The model, for the run's first lines."""
        return f"layers {self.model}"

    def describe_loss(self) -> str:
        """The loss, for the run's first lines."""
        return type(self.loss).__name__

    def describe_optimizer(self) -> str:
        """The optimizer's name, for the run's first lines."""
        return self.optimizer.name

    def model_text(self) -> Optional[str]:
        """The whole model as text (``model.spec``), None if a layer has none."""
        return self.model.text()

    # -- when the replicas agree -----------------------------------------------------------
    def ends_at(self, total: int) -> None:
        """The run ends after ``total`` steps (local SGD syncs there; a synchronous trainer
        needs nothing)."""

    def syncs_at(self, done: int) -> bool:
        """Whether every replica holds the same state after ``done`` steps, so the loop may
        log, evaluate, checkpoint or stop there: after every step of a synchronous trainer."""
        return True

    def since_sync(self, done: int) -> int:
        """Steps since the previous such point, at one (``done``): 1 when every step syncs."""
        return 1

    def rewind(self, completed: int) -> int:
        """After a rank died (local): go back to a state every replica held and return
        its step count.  A synchronous trainer's state after ``completed`` steps is one."""
        return completed

    def describe_sync(self) -> Optional[str]:
        """How the replicas combine, for the run's first lines (None: the exchange says)."""
        return None

    # -- life cycle ------------------------------------------------------------------------
    def prefetch(self, start: int, stop: int) -> None:
        """Read the batches of steps ``start``..``stop - 1`` ahead, in the background."""
        self.batches.prefetch(start, stop)

    def _restart_prefetch(self, start: int) -> None:
        self.batches.shares = self.shares()
        self.batches.restart(start)

    def close(self) -> None:
        """Release threads, windows and communicators (collective); the model's and the
        optimizer's arrays stay readable."""
        self.batches.close()
        self.exchange.close()

    def stop(self) -> None:
        """After an error (local, nothing collective): stop the threads reading ahead and
        exchanging, so nothing of this trainer runs on in a process that goes on."""
        self.batches.close()
        stop = getattr(self.exchange, "stop", None)
        if stop is not None:
            stop()

    def abandon(self) -> List[MPI.Comm]:
        """After a rank died (local): stop the helper threads, revoke the exchange and
        close the data; the arrays stay readable.  Returns this trainer's own
        communicators, which the healing revokes and frees."""
        self.batches.close()
        comms = self.exchange.abandon()
        self.data.abandon()
        return comms

    def close_data(self) -> None:
        """Close the data (collective: an ArrayDataset held by one rank frees its windows)."""
        self.data.close()

    def set_lr(self, lr: float) -> None:
        """The learning rate of the next update (a schedule sets it before each step)."""
        self.optimizer.lr = lr

    def evaluate(self) -> Optional[Dict[str, object]]:
        """{"loss": mean loss, task metrics...} on the validation split (collective);
        None without one."""
        raise NotImplementedError

    # -- the end of a step -----------------------------------------------------------------
    def check_replicas(self) -> None:
        """Check that the replicas of each stage start from the same parameters (collective;
        not with ``check_start=False``: a trainer rebuilt after a healing, whose ranks
        ``take_over`` one state next)."""
        if not self.check_start:
            return
        digest = hashlib.sha256(self.model.params.tobytes()).hexdigest()
        digests = self.grid.dp_comm.allgather(digest)
        bad = [r for r, d in enumerate(digests) if d != digests[0]]
        bad = sorted(self.grid.world.allreduce(
            [self.grid.world_rank(self.grid.pp_rank, r) for r in bad]
            if self.grid.dp_rank == 0 else [], op=MPI.SUM))
        if bad:
            raise MpitrainError(f"initial parameters differ between ranks: ranks {bad} "
                                f"differ from rank 0 of their stage", everywhere=True)

    def _conclude(self, step: int, batch: int, sums: np.ndarray, t: Sequence[float],
                  idle: float = 0.0) -> Tuple[float, Dict[str, object], int]:
        """After the exchange: agree on stopping, check the loss, update the parameters.

        ``sums`` holds the global metric vector (loss sum, stop requests, task
        sums); ``t`` the times the step started, read its data, computed,
        exchanged; ``idle`` the part of the computing time spent waiting for
        other stages.  Returns (mean loss, the task's metrics, global batch).
        """
        self.stop_agreed = bool(sums[1] > 0)
        loss = float(sums[0]) / batch
        if not np.isfinite(loss):
            epoch, _ = self.sampler.locate(step)
            raise MpitrainError(f"loss is {loss} at step {step + 1} (epoch {epoch}); "
                                f"try a lower lr (now {self.optimizer.lr})", everywhere=True)
        metrics = self.task.summarize(np.asarray(sums[2:], np.float64), batch)
        if self.clip_grad_norm is not None:
            metrics.update(self._clip(self.clip_grad_norm))
        if self.keep_before_update:  # a healing may have to undo this step (pipelines)
            flats, _ = self._flats()
            self._before = ([f.copy() for f in flats], self.optimizer.steps, self.clipped)
        with span("optimizer", "update"):
            self.exchange.update(self.optimizer)
        t0, t1, t2, t3 = t
        self.times["data"] += t1 - t0
        self.times["compute"] += (t2 - t1 - idle) + (time.perf_counter() - t3)
        self.times["exchange"] += t3 - t2
        return loss, metrics, batch

    def grad_norm(self) -> float:
        """The global L2 norm of the summed gradient (after the exchange), the same bits on
        every rank: each stage's squared norm, added over the stages in stage order."""
        if self.groups:  # each tensor's, added exactly: the same bits in any layout
            mine = norm_sq_by_tensor(self.model.grads,
                                     [(sl.start, sl.stop) for sl in self.model.slices.values()])
            if self.grid.pp > 1:
                counts = [len(names) for names in self.stage_names]
                every = np.empty(sum(counts))
                self.grid.pp_comm.Allgatherv(mine, [every, counts])
                mine = every
            return math.sqrt(math.fsum(mine))
        mine = self.exchange.norm_sq(self.model.size)
        if self.grid.pp == 1:
            return math.sqrt(mine)
        parts = np.empty(self.grid.pp)
        self.grid.pp_comm.Allgather(np.array([mine]), parts)
        return math.sqrt(math.fsum(parts))

    def _clip(self, limit: float) -> Dict[str, object]:
        """Scale the summed gradient to norm ``limit`` if it is larger (every rank alike)."""
        norm = self.grad_norm()
        clipped = norm > limit
        if clipped:
            self.exchange.scale(limit / norm, self.model.size)
            self.clipped += 1
        return {"grad_norm": norm, "clipped": clipped}

    def _evaluated(self, sums: np.ndarray, n: int) -> Dict[str, object]:
        """{"loss": ..., task metrics} from the global float64 [loss sum, *task sums]."""
        return {"loss": float(sums[0]) / n, **self.task.summarize(sums[1:], n)}
