"""PyTorch models on mpitrain: its exchange, data, checkpoints and healing (needs torch).

The only part of mpitrain that imports torch.  Two levels:

- Horovod's pattern in a loop of one's own: ``DistributedOptimizer`` (the
  gradients averaged over the ranks, as views of the exchange's buffer, summed
  by ``mpi``, ``ring`` or ``shm``), ``broadcast_parameters``,
  ``broadcast_optimizer_state``;
- ``fit(model, optimizer, loss_fn, data, **options)``: mpitrain's loop, with
  every guarantee of ``mpitrain train`` (checkpoints and bit-identical resume,
  the watchdog, pre-emption, healing, ``reproducible``...); ``load_state``
  reads a checkpoint back as a ``state_dict``.
"""
try:
    import torch as _torch  # noqa: F401 - the real PyTorch (absolute import)
except ImportError:  # pragma: no cover - torch is an optional dependency
    from ..runtime import MpitrainError

    raise MpitrainError("mpitrain.torch needs PyTorch, which is not installed here: "
                        "pip install 'mpitrain[torch]' (or torch)") from None

from .broadcast import broadcast_optimizer_state, broadcast_parameters
from .optimizer import DistributedOptimizer

__all__ = ["DistributedOptimizer", "broadcast_parameters", "broadcast_optimizer_state",
           "fit", "load_state", "TorchDataset", "TorchTrainer"]


def __getattr__(name):
    if name in ("fit",):
        from .training import fit

        return fit
    if name == "load_state":
        from .state import load_state

        return load_state
    if name == "TorchDataset":
        from .data import TorchDataset

        return TorchDataset
    if name == "TorchTrainer":
        from .trainer import TorchTrainer

        return TorchTrainer
    raise AttributeError(f"module 'mpitrain.torch' has no attribute {name!r}")
