"""mpitrain: data-parallel and pipeline training of numpy models over MPI.

Importing mpitrain limits BLAS/OpenMP threads to the cores available per
rank (unless the user set them), so import it before numpy.  The public
objects below are loaded on first use::

    import mpitrain
    from mpi4py import MPI
    model = mpitrain.Sequential(mpitrain.mlp(784, [256], 10), seed=0)
"""
from .runtime import limit_threads

limit_threads()

__version__ = "0.1.0"

# name -> module that defines it (imported lazily, so `import mpitrain` stays light)
_API = {
    "MpitrainError": "runtime", "run_or_abort": "runtime", "Watchdog": "runtime",
    "Config": "config",
    "Layer": "nn", "Linear": "nn", "ReLU": "nn", "Tanh": "nn", "Sequential": "nn", "mlp": "nn",
    "SoftmaxCrossEntropy": "nn", "MSELoss": "nn",
    "make_optimizer": "optim", "SGD": "optim", "Momentum": "optim", "Adam": "optim",
    "Manifest": "data", "read_manifest": "data", "check_dataset": "data", "Shards": "data",
    "Sampler": "data", "Prefetcher": "data",
    "Grid": "topology", "make_grid": "topology",
    "RingAllreduce": "ring", "ring_allreduce": "ring",
    "Trainer": "trainer", "build": "trainer", "train": "trainer",
    "builtin_dataset": "trainer", "save_checkpoint": "trainer", "resume": "trainer",
    "PipelineTrainer": "pipeline",
    "State": "checkpoint", "load_checkpoint": ("checkpoint", "load"),
}

__all__ = ["__version__", "limit_threads", *_API]


def __getattr__(name):
    if name not in _API:
        raise AttributeError(f"module 'mpitrain' has no attribute {name!r}")
    import importlib

    where = _API[name]
    module, attr = where if isinstance(where, tuple) else (where, name)
    value = getattr(importlib.import_module(f".{module}", __name__), attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)
