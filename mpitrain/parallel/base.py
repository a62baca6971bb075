"""What every trainer shares: the checkpoint protocol, the end of a step, the replica check.

The checkpoint protocol is three methods on named arrays and JSON metadata,
whatever the trainer (data-parallel, pipeline; a new trainer adds its arrays
without a new file format), so the resume policy in ``fault/`` needs no
trainer of its own:

- ``capture(step, config)``: the state after ``step`` steps, gathered on world
  rank 0 (``fault.checkpoint.State``; None on the other ranks);
- ``mismatch(state, config)``: why a state cannot continue this run, or None;
- ``restore(state)``: load a state given on world rank 0 into every rank,
  each receiving only its stage's part.
"""
from __future__ import annotations

import hashlib
import math
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from mpi4py import MPI

from ..fault.checkpoint import State
from ..runtime import MpitrainError
from ..timeline import span
from .compute import Computing
from .reproducible import norm_sq_by_tensor
from .speed import SpeedBalancer

__all__ = ["TrainerBase"]


class TrainerBase(Computing):
    """Checkpoint state across stages and replicas, and the end of a step.

    Subclasses set ``grid`` (a comm.topology.Grid), ``model`` (this rank's
    stage, a Sequential), ``optimizer``, ``exchange`` (a comm.exchange.Exchange
    over ``grid.dp_comm``), ``sampler``, ``train``, ``val``, ``loss``,
    ``task`` (a model.tasks.Task), ``stage_names`` (the parameter names of
    each stage, in full-model order) and ``shapes`` (every parameter's shape,
    in full-model order), then call ``_init_common``.  ``spec`` (the model's
    text and input shape, which checkpoints record) is set by whoever made the
    layers (``run.build``).

    A step's metric vector (summed over ranks) is ``[loss sum, stop requests,
    *task sums]``: ``2 + task.width`` numbers.
    """

    TAG_STATE = 31000  # point-to-point tag of the checkpoint gather and restore, on grid.world

    def _init_common(self, clip_grad_norm: Optional[float] = None, seed: int = 0,
                     groups: Optional[int] = None,
                     resolved: Optional[Dict[str, Any]] = None) -> None:
        # The parameters left to the trainer (None) and what it chose, by name: the run's
        # record (run.jsonl) shows what ran, e.g. {"overlap": False, "bucket_mb": 0.0}.
        self.resolved: Dict[str, Any] = dict(resolved or {})
        self.groups = groups  # --reproducible: the fixed groups of each batch (else None)
        self.spec: Dict[str, Any] = {}  # {"spec": model text, "input_shape": [...]}
        self.clip_grad_norm = clip_grad_norm  # None: no clipping
        self.seed = seed  # dropout's draws are keyed to it (model.blocks.Dropout)
        self.clipped = 0  # steps whose gradient was scaled down
        self.times = {"data": 0.0, "compute": 0.0, "exchange": 0.0}
        self.stop_agreed = False  # set by step(): some rank was asked to stop
        self.on_phase: Callable[[str], None] = lambda phase: None  # for the watchdog
        self.peak_activation_bytes = 0  # saved for backward at once (measured by pipelines)
        # With a healing pipeline: the state before the last update, so a step applied by
        # some stages only can be undone (run.recovery); (arrays, optimizer steps, clipped).
        self.keep_before_update = False
        self._before: Optional[Tuple[List[np.ndarray], int, int]] = None
        # Straggler drills (fault.drills): seconds to sleep before a forward or backward
        # pass, from (1-based step, that pass's seconds in the previous step); set by the
        # loop.  Sleeping before each pass, not once, keeps a slow rank's buckets as late
        # as a slow processor would make them.
        self.slowdown: Callable[[int, float], float] = lambda step, seconds: 0.0
        self._last_pass = {"forward": 0.0, "backward": 0.0}  # per micro-batch, no sleep
        # Speed-balanced batches (parallel.speed), set by run.build; its changes are
        # reported through ``on_event(line, record)``, set by the loop.
        self.balancer: Optional[SpeedBalancer] = None
        self.on_event: Callable[[str, Dict[str, Any]], None] = lambda line, record: None

    # -- life cycle ------------------------------------------------------------------------
    def prefetch(self, start: int, stop: int) -> None:
        """Read the batches of steps ``start``..``stop - 1`` ahead, if this trainer can."""

    def close(self) -> None:
        """Release threads, windows and communicators (collective); the model's and the
        optimizer's arrays stay readable."""
        self.exchange.close()

    def abandon(self) -> List[MPI.Comm]:
        """After a rank died (local): stop the helper threads, revoke the exchange and
        close the data; the arrays stay readable.  Returns this trainer's own
        communicators, which the healing revokes and frees."""
        comms = self.exchange.abandon()
        self.close_data()
        return comms

    def close_data(self) -> None:
        """Close the training and validation shard files."""
        self.train.close()
        if self.val:
            self.val.close()

    def set_lr(self, lr: float) -> None:
        """The learning rate of the next update (a schedule sets it before each step)."""
        self.optimizer.lr = lr

    # -- the end of a step -----------------------------------------------------------------
    def check_replicas(self) -> None:
        """Check that the replicas of each stage start from the same parameters (collective)."""
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

    # -- the checkpoint protocol -----------------------------------------------------------
    def named(self, flat: np.ndarray, names: Optional[List[str]] = None) -> Dict[str, np.ndarray]:
        """A flat buffer laid out like this stage's (or ``names``') parameters, by name."""
        out, offset = {}, 0
        for n in (self.stage_names[self.grid.pp_rank] if names is None else names):
            size = math.prod(self.shapes[n])
            out[n] = flat[offset:offset + size].reshape(self.shapes[n])
            offset += size
        return out

    def _flats(self) -> Tuple[List[np.ndarray], List[str]]:
        """This stage's parameters, then its optimizer state arrays by sorted key."""
        state = self.optimizer.state()
        return [self.model.params] + [state[k] for k in sorted(state)], sorted(state)

    def _stage_size(self, stage: int) -> int:
        return sum(math.prod(self.shapes[n]) for n in self.stage_names[stage])

    def capture(self, step: int, config: Dict[str, Any]) -> Optional[State]:
        """The state after ``step`` steps, gathered on world rank 0 (collective);
        None on the other ranks.  Stage leaders (dp_rank 0) send their arrays."""
        g, (flats, keys) = self.grid, self._flats()
        if g.rank != 0:
            if g.dp_rank == 0:
                for flat in flats:
                    g.world.Send(flat, dest=0, tag=self.TAG_STATE)
            return None
        params: Dict[str, np.ndarray] = {}
        opt_state: Dict[str, Dict[str, np.ndarray]] = {k: {} for k in keys}
        for s, names in enumerate(self.stage_names):
            if s == 0:  # copies: the state outlives this step (and a freed window)
                got = [flat.copy() for flat in flats]
            else:
                got = [np.empty(self._stage_size(s), self.model.dtype) for _ in flats]
                for buf in got:
                    g.world.Recv(buf, source=g.world_rank(s, 0), tag=self.TAG_STATE)
            params.update(self.named(got[0], names))
            for key, buf in zip(keys, got[1:]):
                opt_state[key].update(self.named(buf, names))
        return self._state(step, config, params, opt_state)

    def _state(self, step: int, config: Dict[str, Any], params: Dict[str, np.ndarray],
               opt_state: Dict[str, Dict[str, np.ndarray]]) -> State:
        """The checkpoint state of ``step`` steps from the gathered arrays (rank 0)."""
        g = self.grid
        epoch, epoch_step = self.sampler.locate(step)
        opt, s = self.optimizer, self.sampler
        layout: Dict[str, Any] = {"world_size": g.world.Get_size(), "pp": g.pp, "dp": g.dp}
        if self.shares() is not None:
            layout["shares"] = list(self.shares())
        layout.update(self.layout_extra())
        return State(
            step=step, epoch=epoch, epoch_step=epoch_step, params=params,
            optimizer_state=opt_state,
            optimizer={"name": self.optimizer.name, "steps": opt.steps, **opt.hyper()},
            config=config, layout=layout,
            sampler=s.meta(), task=self.task.describe(), model=dict(self.spec),
            rng={"sample_order": f"numpy.random.default_rng([{s.seed}, epoch]).permutation"
                                 f"({s.n}), cut into batches of {s.batch_size}",
                 "init": "numpy.random.default_rng([seed, layer index]) per layer",
                 "dropout": "a hash of (seed, step, global sample id, layer, unit)",
                 "stateful_generators": {}})

    def layout_extra(self) -> Dict[str, Any]:
        """What a checkpoint's layout records beyond the grid (the strategy's)."""
        return {}

    def _restore_shares(self, state: Optional[State]) -> None:
        """Take the checkpoint's speed split, if this run balances by speed and the split
        fits (the same ranks and batch); else keep the even start (collective)."""
        shares = self.grid.world.bcast(state.layout.get("shares") if state is not None
                                       else None, root=0)
        b = self.balancer
        if b is not None and shares and len(shares) == len(b.shares) and \
                sum(shares) == b.batch_size:
            b.shares = list(shares)

    def mismatch(self, state: State, config: Dict[str, Any]) -> Optional[str]:
        """Why ``state`` cannot continue this run, or None: a ConfigError template
        naming the parameters involved as ``{name}``."""
        spec = state.model.get("spec")
        if spec and self.spec and spec != self.spec.get("spec"):
            return (f"written for the model {spec}, this run's is {self.spec['spec']} "
                    "(check {model} or {hidden})")
        shapes = {n: a.shape for n, a in state.params.items()}
        if shapes != self.shapes:
            for name in sorted(set(shapes) | set(self.shapes)):
                if shapes.get(name) != self.shapes.get(name):
                    return (f"parameter {name!r} is {shapes.get(name)} in the checkpoint and "
                            f"{self.shapes.get(name)} in this model (check {{model}} or {{hidden}})")
        dtype = next(iter(state.params.values())).dtype
        if dtype != self.model.dtype:
            return (f"parameters are {dtype} in the checkpoint, {self.model.dtype} here "
                    "({dtype})")
        if state.optimizer.get("name") != self.optimizer.name or set(
                state.optimizer_state) != set(self.optimizer.state()):
            return (f"written with {{optimizer}} {state.optimizer.get('name')}, "
                    f"this run has {self.optimizer.name}")
        if state.task and state.task != self.task.describe():
            return (f"written for the task {state.task}, this run's data is "
                    f"{self.task.describe()} (check {{data}})")
        was = state.config or {}
        if was.get("reproducible") and config.get("reproducible") and \
                was.get("groups") != config.get("groups"):  # (the default was 12 once)
            return (f"written with {{reproducible}} in {was.get('groups')} {{groups}}, this "
                    f"run has {config.get('groups')}: the gradients would be summed "
                    f"otherwise (set {{groups}} {was.get('groups')})")
        mine = self.sampler.meta()
        for key in sorted(set(mine) | set(state.sampler)):
            if state.sampler.get(key) != mine.get(key):
                what = {"samples": "training samples in {data}",
                        "blocks": "the chunk layout of {data}"}.get(key, "{" + key + "}")
                return (f"written with {what} {state.sampler.get(key)}, this run has "
                        f"{mine.get(key)}: the sample order would differ")
        return None

    def restore(self, state: Optional[State]) -> None:
        """Load ``state`` (given on world rank 0, None elsewhere) on every rank (collective).

        Rank 0 sends each stage's part to that stage's first replica, which
        broadcasts it to the stage's other replicas: a rank receives only its
        stage's arrays, and any (pp, dp) layout can resume any other.
        """
        g, (flats, keys) = self.grid, self._flats()
        steps = int(state.optimizer["steps"]) if g.rank == 0 else None
        self.optimizer.steps = g.world.bcast(steps, root=0)
        received = [np.empty_like(flat) for flat in flats]  # this stage's values
        if g.rank == 0:
            sources = [state.params] + [state.optimizer_state[k] for k in keys]
            for s, names in enumerate(self.stage_names):
                packed = received if s == 0 else [
                    np.empty(self._stage_size(s), self.model.dtype) for _ in flats]
                for buf, source in zip(packed, sources):
                    for name, view in self.named(buf, names).items():
                        view[...] = source[name]
                    if s > 0:
                        g.world.Send(buf, dest=g.world_rank(s, 0), tag=self.TAG_STATE)
        elif g.dp_rank == 0:
            for buf in received:
                g.world.Recv(buf, source=0, tag=self.TAG_STATE)
        for buf in received:
            g.dp_comm.Bcast(buf, root=0)

        def write() -> None:
            for flat, buf in zip(flats, received):
                flat[...] = buf

        self.exchange.write(write)
        self._restore_shares(state)

    def roll_back(self) -> None:
        """Undo the last update (local): the state before it, kept by ``_conclude``."""
        flats, _ = self._flats()
        arrays, steps, clipped = self._before
        for flat, kept in zip(flats, arrays):
            flat[...] = kept
        self.optimizer.steps, self.clipped = steps, clipped
        self._before = None

    def take_over(self, source: int, old: Optional["TrainerBase"]) -> None:
        """After a healing (collective over ``grid.dp_comm``): every replica takes the
        parameters and optimizer state of replica ``source``, which copies them from
        ``old`` (its trainer from before the failure) and broadcasts them."""
        g, (flats, keys) = self.grid, self._flats()
        mine = g.dp_rank == source
        if mine:
            assert old is not None, "the source of a take-over has the old state"
            old_flats, old_keys = old._flats()
            assert old_keys == keys, (old_keys, keys)
        steps = g.dp_comm.bcast(old.optimizer.steps if mine else None, root=source)
        self.optimizer.steps = steps

        def write() -> None:
            for k, flat in enumerate(flats):
                if mine:
                    flat[...] = old_flats[k]
                g.dp_comm.Bcast(flat, root=source)

        self.exchange.write(write)
        self.clipped = g.dp_comm.bcast(old.clipped if mine else None, root=source)
