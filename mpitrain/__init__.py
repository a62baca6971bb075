"""mpitrain: data-parallel and pipeline training of numpy models over MPI.

Importing mpitrain limits BLAS/OpenMP threads to the cores available per
rank (unless the user set them), so import it before numpy, asks Open MPI's
waits to yield the core (before MPI is initialised), and has glibc's
malloc keep freed memory for the next step (``malloc.py``).  The public
objects below are loaded on first use::

    import mpitrain
    from mpi4py import MPI
    model = mpitrain.Sequential(mpitrain.mlp(784, [256], 10), seed=0)

The subpackages show the architecture, dependencies pointing one way::

    run (build, loop, metrics) -> parallel (trainers) -> comm, model, data, fault -> runtime
"""
from .malloc import keep_freed_memory
from .threads import limit_threads, yield_when_idle

limit_threads()
yield_when_idle()
keep_freed_memory()

__version__ = "0.2.0"

# name -> module that defines it (imported lazily, so `import mpitrain` stays light)
_API = {
    "MpitrainError": "runtime", "ConfigError": "runtime", "run_or_abort": "runtime",
    "Config": "config",
    "Layer": "model.layers", "Linear": "model.layers", "ReLU": "model.layers",
    "Tanh": "model.layers", "mlp": "model.layers", "Sequential": "model.sequential",
    "SoftmaxCrossEntropy": "model.losses", "MSELoss": "model.losses",
    "make_optimizer": "model.optim", "SGD": "model.optim", "Momentum": "model.optim",
    "Adam": "model.optim",
    "Manifest": "data.manifest", "read_manifest": "data.manifest",
    "check_dataset": "data.checks", "Shards": "data.shards", "Sampler": "data.sampler",
    "Prefetcher": "data.prefetch", "builtin_dataset": "data.builtin",
    "Grid": "comm.topology", "make_grid": "comm.topology",
    "Exchange": "comm.exchange",
    "RingAllreduce": "comm.ring", "ring_allreduce": "comm.ring",
    "ShmAllreduce": "comm.shm",
    "Trainer": "parallel.data_parallel", "PipelineTrainer": "parallel.pipeline.stage",
    "PSTrainer": "parallel.ps.trainer", "ParameterServer": "parallel.ps.shard",
    "DistributedTrainer": "run.distributed",
    "build": "run.build", "train": "run.loop", "load_model": "run.predict",
    "Watchdog": "fault.watchdog",
    "State": "fault.checkpoint", "load_checkpoint": ("fault.checkpoint", "load"),
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
