"""The checkpoint protocol every trainer keeps: named arrays and JSON metadata.

Three methods, whatever the trainer (data-parallel, pipeline, parameter
server; a new trainer adds its arrays without a new file format), so the
resume policy in ``fault/`` needs no trainer of its own:

- ``capture(step, config)``: the state after ``step`` steps, gathered on world
  rank 0 (``fault.checkpoint.State``; None on the other ranks);
- ``mismatch(state, config)``: why a state cannot continue this run, or None;
- ``restore(state)``: load a state given on world rank 0 into every rank,
  each receiving only its stage's part.

After a rank died, ``roll_back`` and ``take_over`` move the survivors to one
state (``run.recovery``).
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ..fault.checkpoint import State

__all__ = ["CheckpointState", "OPTIONAL_STATE"]

# Optimizer-state keys some runs add and others go without: local SGD's outer optimizer
# (parallel.local_sgd).  A run that keeps none ignores them; one that keeps them starts
# them afresh from a checkpoint without them.
OPTIONAL_STATE = ("outer_anchor", "outer_momentum")


class CheckpointState:
    """The checkpoint protocol over a trainer's ``grid``, ``model``, ``optimizer``,
    ``sampler``, ``task``, ``exchange``, ``stage_names`` and ``shapes`` (see
    ``TrainerBase``)."""

    TAG_STATE = 31000  # point-to-point tag of the checkpoint gather and restore, on grid.world

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
                state.optimizer_state) - set(OPTIONAL_STATE) != set(self.optimizer.state()):
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

    def take_over(self, source: int, old: Optional["CheckpointState"]) -> None:
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

