"""mpitrain: data-parallel and pipeline training over MPI, from HDF5 datasets or arrays.

Importing mpitrain changes nothing in the process; ``mpitrain.init()`` makes
the settings a training process needs (BLAS threads per rank, Open MPI's
yielding waits, malloc, an excepthook that ends the whole job on an error),
and ``fit``, the trainers and the command line call it.  The public objects
below are loaded on first use::

    import mpitrain

    model = mpitrain.Sequential([mpitrain.Linear(64, 32), mpitrain.ReLU(),
                                 mpitrain.Linear(32, 10)], seed=0)
    model, summary = mpitrain.fit(model, mpitrain.ArrayDataset(x, y, val_fraction=0.1),
                                  epochs=5, optimizer="adam", lr=1e-3)

The subpackages show the architecture, dependencies pointing one way::

    run (fit, loop, build) -> parallel (trainers) -> comm, model, data, fault -> runtime
"""
__version__ = "0.4.0"

# name -> module that defines it (imported lazily, so `import mpitrain` stays light)
_API = {
    "init": "process",
    "MpitrainError": "runtime", "ConfigError": "runtime", "Preempted": "runtime",
    "run_or_abort": "runtime", "job_comm": "runtime",
    "Config": "config",
    # models
    "Layer": "model.layers", "Context": "model.layers", "Linear": "model.layers",
    "ReLU": "model.layers", "Tanh": "model.layers", "Sigmoid": "model.layers",
    "GELU": "model.layers", "SiLU": "model.layers", "Flatten": "model.layers",
    "mlp": "model.layers", "Conv2d": "model.conv", "MaxPool2d": "model.conv",
    "AvgPool2d": "model.conv", "LayerNorm": "model.blocks", "Dropout": "model.blocks",
    "Residual": "model.blocks", "Sequential": "model.sequential",
    "register_layer": "model.registry", "check_layer": "model.gradcheck",
    "GradientCheckError": "model.gradcheck",
    "SoftmaxCrossEntropy": "model.losses", "MSELoss": "model.losses",
    "make_optimizer": "model.optim", "Optimizer": "model.optim", "SGD": "model.optim",
    "Momentum": "model.optim", "Adam": "model.optim", "AdamW": "model.optim",
    # data
    "Dataset": "data.datasets", "DirectoryDataset": "data.datasets",
    "HDF5File": "data.datasets", "ArrayDataset": "data.arrays",
    "Manifest": "data.manifest", "read_manifest": "data.manifest",
    "check_dataset": "data.checks", "Shards": "data.shards", "Sampler": "data.sampler",
    "Prefetcher": "data.prefetch", "builtin_dataset": "data.builtin",
    # the exchange and the grid
    "Grid": "comm.topology", "make_grid": "comm.topology",
    "Exchange": "comm.exchange",
    "RingAllreduce": "comm.ring", "ring_allreduce": "comm.ring",
    "ShmAllreduce": "comm.shm",
    # trainers
    "Trainer": "parallel.data_parallel", "LocalSGDTrainer": "parallel.local_sgd",
    "PipelineTrainer": "parallel.pipeline.stage",
    "PSTrainer": "parallel.ps.trainer", "ParameterServer": "parallel.ps.shard",
    "Recipe": "parallel.recipe",
    # the run: fit, and the pieces of a loop of one's own
    "fit": "run.fit", "train": "run.fit", "FitResult": "run.fit",
    "DistributedTrainer": "run.distributed", "build": "run.build",
    "load_model": "run.predict",
    "Checkpoints": "fault.resume", "Watchdog": "fault.watchdog",
    "Preemption": "fault.preemption", "MetricsLog": "run.metrics",
    "State": "fault.checkpoint", "load_checkpoint": ("fault.checkpoint", "load"),
}

__all__ = ["__version__", *_API]


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
