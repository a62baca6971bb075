"""The Python API of the original design: train arrays on the MPI ranks in one call."""
from __future__ import annotations

import os
from typing import Any, Dict, Optional

import numpy as np
from mpi4py import MPI

from ..config import Config
from ..data.arrays import ArrayDataset
from ..process import init
from ..runtime import ConfigError, agreed, literal
from .fit import run_training

__all__ = ["DistributedTrainer"]

STRATEGIES = ("ps", "allreduce")


class DistributedTrainer:
    """Train on this job's ranks with the parameter server (``servers`` of them and
    ``num_workers`` workers: launch ``num_workers + servers`` ranks) or, with
    ``strategy="allreduce"``, on ``num_workers`` ranks that sum their gradients::

        # mpiexec -n 3 python script.py
        trainer = mpitrain.DistributedTrainer(num_workers=2)
        result = trainer.train(X, y, {"hidden": [64], "optimizer": "adam", "lr": 3e-3},
                               num_epochs=5)
        result["params"]      # {name: array}, the same on every rank
        result["summary"]     # what `mpitrain train` prints at the end, as a dict

    It runs ``fit``'s loop on an ``ArrayDataset``: nothing is written to disk.
    ``model_config`` takes any ``Config`` key (``hidden``, ``model``, ``lr``,
    ``batch_size``, ``staleness``...) and ``val_fraction`` (default 0.1).
    """

    def __init__(self, num_workers: int, *, servers: Optional[int] = None,
                 strategy: str = "ps", comm: Optional[MPI.Comm] = None):
        self.comm = comm or MPI.COMM_WORLD
        if strategy not in STRATEGIES:
            raise ConfigError(f"{{strategy}}: expected one of {', '.join(STRATEGIES)}, got "
                              f"{literal(repr(strategy))}", ["strategy"], everywhere=True)
        if strategy == "allreduce" and servers:
            raise ConfigError(f"{{servers}} {servers} does not apply: with {{strategy}} "
                              "allreduce every rank computes", ["servers", "strategy"],
                              everywhere=True)
        servers = (1 if servers is None else servers) if strategy == "ps" else 0
        need = num_workers + servers
        if self.comm.Get_size() != need:
            what = (f"{{num_workers}} {num_workers} + {{servers}} {servers}" if servers
                    else f"{{num_workers}} {num_workers}")
            raise ConfigError(f"{what} needs {need} ranks, and this job has "
                              f"{self.comm.Get_size()} (mpiexec -n {need})",
                              ["num_workers", "servers"], everywhere=True)
        self.num_workers, self.servers, self.strategy = num_workers, servers, strategy

    def train(self, X: Optional[np.ndarray], y: Optional[np.ndarray],
              model_config: Dict[str, Any], num_epochs: int,
              root: Optional[int] = None) -> Dict[str, Any]:
        """Train on ``X`` (samples, *features) and ``y`` (samples, ...) as ``model_config``
        says for ``num_epochs`` epochs (collective); returns {"params", "summary"}.
        ``root``: the rank that holds the arrays (the others pass None); None: every
        rank gives them."""
        init()
        options = dict(model_config)
        for key, why in (("epochs", "num_epochs"), ("strategy", "the trainer's strategy"),
                         ("servers", "the trainer's servers")):
            if key in options:
                raise ConfigError(f"{{model_config}}: {key!r} is given by {why}, not here",
                                  ["model_config"], everywhere=True)
        val_fraction = float(options.pop("val_fraction", 0.1))
        data = ArrayDataset(X, y, val_fraction=val_fraction, root=root)
        ps = {"servers": self.servers} if self.strategy == "ps" else {}
        cfg = agreed(self.comm, lambda: Config(**{"quiet": True, **options, **ps,
                                                  "strategy": self.strategy,
                                                  "epochs": num_epochs}))
        with open(os.devnull, "w") as devnull:
            summary, trainer, comm = run_training(cfg, self.comm, data=data, out=devnull)
        self.comm = comm  # a healed job's communicator, if it healed
        flat = trainer.whole_params()
        names = [n for names in trainer.stage_names for n in names]
        return {"params": {k: v.copy() for k, v in trainer.named(flat, names).items()},
                "summary": summary}
