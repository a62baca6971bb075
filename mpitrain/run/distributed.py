"""The Python API of the original design: train arrays on the MPI ranks with the
parameter server, in one call."""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any, Dict, Optional

import numpy as np
from mpi4py import MPI

from ..config import Config
from ..runtime import ConfigError, agreed, on_root

__all__ = ["DistributedTrainer"]


class DistributedTrainer:
    """Train on this job's ranks: ``servers`` parameter servers and ``num_workers``
    workers (launch ``num_workers + servers`` ranks).

    A thin layer over ``mpitrain train --strategy ps``: the arrays are written
    as a dataset in a temporary directory (rank 0), trained on with the real
    strategy, and the final parameters returned on every rank::

        # mpiexec -n 3 python script.py
        trainer = mpitrain.DistributedTrainer(num_workers=2)
        result = trainer.train(X, y, {"hidden": [64], "optimizer": "adam", "lr": 3e-3},
                               num_epochs=5)
        result["params"]      # {name: array}, the same on every rank
        result["summary"]     # what `mpitrain train` prints at the end, as a dict

    ``model_config`` takes any ``Config`` key (``hidden``, ``model``, ``lr``,
    ``batch_size``, ``staleness``...) and ``val_fraction`` (default 0.1).
    """

    def __init__(self, num_workers: int, *, servers: int = 1, comm: Optional[MPI.Comm] = None):
        self.comm = comm or MPI.COMM_WORLD
        self.num_workers, self.servers = num_workers, servers
        if self.comm.Get_size() != num_workers + servers:
            raise ConfigError(f"{{num_workers}} {num_workers} + {{servers}} {servers} needs "
                              f"{num_workers + servers} ranks, and this job has "
                              f"{self.comm.Get_size()} (mpiexec -n {num_workers + servers})",
                              ["num_workers", "servers"], everywhere=True)

    def train(self, X: np.ndarray, y: np.ndarray, model_config: Dict[str, Any],
              num_epochs: int) -> Dict[str, Any]:
        """Train on ``X`` (samples, *features) and ``y`` (samples, ...) as ``model_config``
        says for ``num_epochs`` epochs (collective); returns {"params", "summary"}."""
        from ..data.prepare import from_npz
        from ..fault import checkpoint, store
        from .loop import train

        options = dict(model_config)
        val_fraction = float(options.pop("val_fraction", 0.1))
        work = self.comm.bcast(tempfile.mkdtemp(prefix="mpitrain-api-")
                               if self.comm.rank == 0 else None, root=0)
        try:
            def write() -> None:
                arrays = os.path.join(work, "arrays.npz")
                np.savez(arrays, x=np.asarray(X), y=np.asarray(y))
                from_npz(arrays, os.path.join(work, "data"), shards=1,
                         val_fraction=val_fraction)
                os.remove(arrays)

            on_root(self.comm, write)
            cfg = agreed(self.comm, lambda: Config(
                data=os.path.join(work, "data"), strategy="ps", servers=self.servers,
                epochs=num_epochs, ckpt_dir=os.path.join(work, "ckpt"), ckpt_every=0,
                keep_best=False, quiet=True, **options))
            with open(os.devnull, "w") as devnull:
                summary = train(cfg, self.comm, out=devnull)
            loaded: Dict[str, np.ndarray] = {}

            def newest() -> Dict[str, Any]:  # the arrays stay on rank 0; their shapes go out
                steps = store.listing(cfg.ckpt_dir)
                loaded.update(checkpoint.load(steps[-1][1]).params)
                return {k: (v.shape, v.dtype.str) for k, v in loaded.items()}

            out = {}
            for name, (shape, dtype) in on_root(self.comm, newest).items():
                buf = (np.ascontiguousarray(loaded[name]) if self.comm.rank == 0
                       else np.empty(shape, dtype))
                self.comm.Bcast(buf, root=0)
                out[name] = buf
            return {"params": out, "summary": summary}
        finally:
            self.comm.Barrier()
            if self.comm.rank == 0:
                shutil.rmtree(work, ignore_errors=True)
