"""The checkpoint protocol of ``TorchTrainer``: a torch model's and optimizer's state as
mpitrain's checkpoint (``torch.state``), gathered on rank 0 and given back to every rank.

Every rank holds the whole model (data parallelism), so rank 0 captures it
alone; a restore (or, after a healing, the hand-over from the rank that got
furthest) sends every array from one rank to all: first their names, shapes
and types, then each array by ``Bcast``.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ..fault.checkpoint import State
from .state import (model_arrays, optimizer_arrays, restore_scheduler, to_model_state,
                    to_optimizer_state)

__all__ = ["TorchCheckpoints"]


class TorchCheckpoints:
    """``capture``, ``mismatch``, ``restore``, ``take_over`` for a ``TorchTrainer``."""

    def _shapes_and_names(self) -> None:
        self.shapes = {n: tuple(t.shape) for n, t in self.torch_model.state_dict().items()}
        self.stage_names = [list(self.shapes)]

    def _arrays(self) -> Tuple[Dict[str, np.ndarray], Dict[str, Dict[str, np.ndarray]],
                               Dict[str, Any]]:
        params = model_arrays(self.torch_model)
        params.update({n: b.cpu().numpy() for n, b in self.settled.items()})  # (a healing)
        opt, record = optimizer_arrays(self.torch_model, self.optimizer.torch, self.scheduler)
        return params, opt, record

    def capture(self, step: int, config: Dict[str, Any]) -> Optional[State]:
        """The state after ``step`` steps, on rank 0 (None elsewhere); collective."""
        self.dist.consolidate()  # a sharded update: each parameter's state from its owner
        if self.comm.Get_rank() != 0:
            return None
        params, opt, record = self._arrays()
        epoch, epoch_step = self.sampler.locate(step)
        layout = {"world_size": self.size, "pp": 1, "dp": self.size}
        if self.shares() is not None:
            layout["shares"] = list(self.shares())
        return State(step=step, epoch=epoch, epoch_step=epoch_step, params=params,
                     optimizer_state=opt,
                     optimizer={"name": self.optimizer.name, "steps": self.optimizer.steps,
                                "torch": record},
                     config=config, layout=layout, sampler=self.sampler.meta(),
                     task=self.data.task, model=self.spec,
                     rng={"sample_order": f"numpy.random.default_rng([{self.sampler.seed}, "
                                          "epoch]).permutation of the samples",
                          "torch": "the model device's generator seeded with seed_for(seed, "
                                   "step, the first global sample id of the rows it draws "
                                   "for) before each micro-batch or group"})

    def mismatch(self, state: State, config: Dict[str, Any]) -> Optional[str]:
        """Why ``state`` cannot continue this run, or None (a ConfigError template)."""
        record = state.optimizer.get("torch")
        if not record:
            return "written for a model of mpitrain's layers, this run's is a PyTorch model"
        shapes = {n: a.shape for n, a in state.params.items()}
        for name in sorted(set(shapes) | set(self.shapes)):
            if shapes.get(name) != self.shapes.get(name):
                return (f"tensor {name!r} is {shapes.get(name)} in the checkpoint and "
                        f"{self.shapes.get(name)} in this model")
        if record.get("class") != type(self.optimizer.torch).__name__:
            return (f"written with the optimizer {record.get('class')}, this run has "
                    f"{type(self.optimizer.torch).__name__}")
        if bool(record.get("scheduler")) != (self.scheduler is not None):
            return "written with a scheduler of its own and run without one, or the reverse"
        if state.task and state.task != self.data.task:
            return (f"written for the task {state.task}, this run's data is "
                    f"{self.data.task} (check {{data}})")
        was = state.config or {}
        if was.get("reproducible") and config.get("reproducible") and \
                was.get("groups") != config.get("groups"):
            return (f"written with {{reproducible}} in {was.get('groups')} {{groups}}, this "
                    f"run has {config.get('groups')}")
        mine = self.sampler.meta()
        for key in sorted(set(mine) | set(state.sampler)):
            if state.sampler.get(key) != mine.get(key):
                return (f"written with {key} {state.sampler.get(key)}, this run has "
                        f"{mine.get(key)}: the sample order would differ")
        return None

    def restore(self, state: Optional[State]) -> None:
        """Load ``state`` (given on rank 0) into every rank (collective)."""
        if self.comm.Get_rank() == 0:
            held = (state.params, state.optimizer_state, state.optimizer["torch"],
                    int(state.optimizer["steps"]))
        else:
            held = None
        self._receive(held, 0, self.comm)
        self._restore_shares(state)

    def take_over(self, source: int, old: Any) -> None:
        """After a healing (collective): every rank takes rank ``source``'s state."""
        mine = self.comm.Get_rank() == source
        if mine:
            params, opt, record = (old or self)._arrays()
            held = (params, opt, record, (old or self).optimizer.steps)
        else:
            held = None
        self._receive(held, source, self.comm)

    def _receive(self, held, root: int, comm) -> None:
        """``root``'s arrays and record (``held`` there) into this rank's model and
        optimizer: the description by one small broadcast, each array by ``Bcast``."""
        if held is not None:
            params, opt, record, steps = held
            meta = {"params": [(n, a.shape, a.dtype.str) for n, a in params.items()],
                    "opt": {k: [(n, a.shape, a.dtype.str) for n, a in named.items()]
                            for k, named in opt.items()},
                    "record": record, "steps": steps}
        meta = comm.bcast(meta if held is not None else None, root=root)

        def arrays(spec: List, source: Optional[Dict[str, np.ndarray]]):
            out = {}
            for name, shape, dtype in spec:
                buf = (np.require(source[name], requirements="C") if source is not None
                       else np.empty(shape, np.dtype(dtype)))
                comm.Bcast(buf, root=root)
                out[name] = buf
            return out

        got_params = arrays(meta["params"], params if held is not None else None)
        got_opt = {k: arrays(spec, opt[k] if held is not None else None)
                   for k, spec in meta["opt"].items()}
        self.torch_model.load_state_dict(to_model_state(got_params))
        self.optimizer.torch.load_state_dict(to_optimizer_state(
            self.torch_model, self.optimizer.torch, got_opt, meta["record"]))
        restore_scheduler(self.scheduler, meta["record"])
        self.dist.fence()  # a node-shared model: every rank's copy-in done before reads
        self.optimizer.steps = meta["steps"]
        self.settle_buffers()

    def layout_extra(self) -> Dict[str, Any]:
        """Nothing beyond the grid."""
        return {}
