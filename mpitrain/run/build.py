"""From a Config to a ready trainer: the data checked, the model made, the strategy chosen.

This is the one place that chooses how a step is split over the ranks: the
data-parallel trainer, or the pipeline trainer (stages, or micro-batches on
one stage).  A new synchronisation strategy plugs in here, and the training
loop does not know which one runs.
"""
from __future__ import annotations

import math
import os
from typing import Any, Dict, Tuple, Type

import numpy as np
from mpi4py import MPI

from ..comm.auto import choose
from ..config import Config
from ..data.builtin import builtin_dataset
from ..data.datasets import Data, as_dataset
from ..model.optim import optimizer_named
from ..model.schedule import Schedule
from ..model.sequential import Sequential
from ..model.spec import SpecError, build as build_layers, mlp_spec
from ..parallel.base import TrainerBase
from ..parallel.data_parallel import Trainer
from ..parallel.local_sgd import LocalSGDTrainer
from ..parallel.pipeline.partition import shapes_along, stage_ranges
from ..parallel.pipeline.stage import PipelineTrainer
from ..parallel.ps.trainer import PSTrainer
from ..parallel.recipe import RECIPE_KEYS
from ..runtime import ConfigError, agreed, literal
from ..threads import blas_control, limit_threads, single_threaded_env

# How the gradients are combined (the Config's strategy) -> its trainer.
STRATEGIES: Dict[str, Type[TrainerBase]] = {"allreduce": Trainer, "ps": PSTrainer}

__all__ = ["build", "open_data", "model_spec", "lr_schedule", "trainer_class", "resolve_allreduce",
           "trainer_options", "text_model", "STRATEGIES"]


def open_data(cfg: Config, comm: MPI.Comm, data: Any = None) -> Data:
    """The run's data, connected and checked (collective): ``data`` (a dataset, or a
    path), else ``cfg.data``, else the built-in synthetic set."""
    source = data if data is not None else (cfg.data or builtin_dataset(comm))
    dataset = agreed(comm, lambda: as_dataset(source))
    return dataset.connect(comm, dtype=cfg.dtype, cache_mb=cfg.cache_mb,
                           check=cfg.check_data)


def node_memory() -> int:
    """Bytes of memory this process may use: the node's, or its cgroup's limit if lower."""
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def _size(nbytes: float) -> str:
    for unit, scale in (("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if nbytes >= scale:
            return f"{nbytes / scale:,.1f} {unit}"
    return f"{nbytes / 1e3:,.1f} kB"


def check_memory(cfg: Config, comm: MPI.Comm, layers, stages, shape) -> None:
    """Refuse, before anything is allocated, a model whose arrays cannot fit in this
    node's memory, naming what they would need (collective)."""
    itemsize = np.dtype(cfg.dtype).itemsize
    counts = [sum(math.prod(s) for layer in layers[a:b] for s in layer.shapes().values())
              for a, b in stages]
    state = {"sgd": 0, "momentum": 1}.get(cfg.optimizer, 2)
    arrays = 3 + state  # parameters, gradients, the exchange buffer, the optimizer's state
    if cfg.local():  # the outer step's two; the copy of the last sync point's state
        outer = 2 if cfg.outer_lr is not None else 0
        kept = cfg.on_failure != "abort" or cfg.ckpt_dir is not None
        arrays += outer + ((1 + state + outer) if kept else 0)
    if cfg.reproducible:  # a buffer for each group held apart (comm.ordered)
        arrays += _group_buffers(cfg.groups, max(1, comm.Get_size() // cfg.pp), cfg.pp)
    along = shapes_along(layers, shape)
    # A micro-batch's activations: what each layer keeps, and as much again in flight
    # in backward; a pipeline stage may hold several micro-batches (counted as all).
    rows = -(-cfg.batch_size // max(1, comm.Get_size() // cfg.pp) // cfg.accumulate)
    per_sample = max(math.prod(along[a]) + sum(layers[i].activation_elems(along[i])
                                               for i in range(a, b)) for a, b in stages)
    activations = 2 * rows * per_sample * itemsize
    per_rank = max(counts) * itemsize * arrays + activations
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    here = node.Get_size()
    node.Free()
    agreed(comm, lambda: _fits(cfg, counts, itemsize, arrays, per_rank, here))


def _group_buffers(groups: int, replicas: int, pp: int) -> int:
    """Gradient-sized buffers a rank of ``--reproducible`` may hold besides its own: a
    later replica's groups, each apart, and the sharded sum's receive shards; or, alone,
    the groups of all its threads but the first (a pipeline computes them in turn)."""
    if replicas > 1:
        return -(-groups // replicas) + 1
    threads = limit_threads()["threads"]
    threads = min(groups, threads) if isinstance(threads, int) and pp == 1 else 1
    return groups - -(-groups // threads)


def _fits(cfg: Config, counts, itemsize: int, arrays: int, per_rank: int, here: int) -> None:
    """This node's verdict (nodes differ in memory and ranks): ConfigError if it does not
    fit."""
    have = node_memory()
    if per_rank * here > have:
        what = f"{max(counts):,} parameters" + (" in the largest stage" if len(counts) > 1
                                                else "")
        model = "model" if cfg.model is not None else "hidden"
        raise ConfigError(
            f"the model does not fit in memory: {what} x {itemsize} bytes x {arrays} arrays "
            f"(parameters, gradients, the exchange buffer, {cfg.optimizer}'s state"
            + (", the groups' buffers of {reproducible}" if cfg.reproducible else "") + ") and "
            f"the activations need {_size(per_rank)} per rank, {_size(per_rank * here)} for "
            f"the {here} ranks on this node, which has {_size(have)}: choose a smaller "
            f"{{{model}}} or {{batch_size}}, or {{accumulate}} the batch in parts (or check "
            "the data's features and classes)",
            [model, "batch_size", "accumulate", *(["reproducible"] if cfg.reproducible else [])])


def model_spec(cfg: Config, features, outputs: int) -> str:
    """The run's model as text: ``cfg.model``, or the MLP ``cfg.hidden`` describes."""
    if cfg.model is not None:
        return cfg.model
    return mlp_spec(cfg.hidden, outputs, cfg.activation, flatten=len(features) > 1,
                    dropout=cfg.dropout)


def make_layers(cfg: Config, features, outputs: int):
    """(layers, canonical spec) of the run's model for samples of shape ``features``:
    every shape checked, a mismatch a ConfigError naming the layer and both shapes."""
    text = model_spec(cfg, features, outputs)
    param = "model" if cfg.model is not None else "hidden"
    try:
        return build_layers(text, features, outputs), text
    except SpecError as exc:
        raise ConfigError(f"{{{param}}} {literal(text)}: {literal(str(exc))}", [param],
                          everywhere=True) from None


def lr_schedule(cfg: Config, steps_per_epoch: int, total: int) -> Schedule:
    """The learning rate of each step, as the options say."""
    return Schedule(cfg.lr, cfg.lr_schedule, total=total, warmup=cfg.warmup_steps,
                    lr_min=cfg.lr_min, step_every=cfg.lr_step_every or steps_per_epoch,
                    gamma=cfg.lr_gamma)


def trainer_class(cfg: Config) -> Type[TrainerBase]:
    """The trainer of the run's layout and strategy: the one place that chooses."""
    if cfg.local():  # local SGD: the replicas average every sync_every steps
        return LocalSGDTrainer
    return PipelineTrainer if cfg.pipelined() else STRATEGIES[cfg.strategy]


def trainer_options(cfg: Config, cls: Type[TrainerBase]) -> Dict[str, Any]:
    """The options of ``cls`` (its own and the recipe's), from ``cfg``."""
    special = {"groups": cfg.groups if cfg.reproducible else None,
               "microbatches": cfg.micro(), "grad_dtype": cfg.wire()}
    return {k: special[k] if k in special else getattr(cfg, k)
            for k in (*cls.OPTIONS, *RECIPE_KEYS)}


def text_model(cfg: Config, comm: MPI.Comm, data: Data):
    """The model ``cfg.model`` (or ``hidden``) describes, for ``data``: the layers of a
    pipeline (each stage builds its own), else a Sequential; refused before anything
    is allocated if it cannot fit in memory (collective)."""
    layers, _ = make_layers(cfg, data.features, data.outputs)
    stages = (agreed(comm, lambda: stage_ranges(layers, cfg.pp, cfg.stage_layers,
                                                shape=data.features))
              if cfg.pp > 1 else [(0, len(layers))])
    check_memory(cfg, comm, layers, stages, data.features)
    return layers if cfg.pipelined() else Sequential(layers, dtype=cfg.dtype, seed=cfg.seed)


def build(cfg: Config, comm: MPI.Comm, model: Any = None, data: Any = None, *,
          check_start: bool = True) -> Tuple[TrainerBase, Data]:
    """Check the data and make the model (``model``, or the one ``cfg`` describes), the
    optimizer and the trainer (collective); returns (trainer, connected data).
    ``check_start``: compare the replicas' starting parameters (not after a healing)."""
    _check_reproducible(cfg, comm)
    connected = open_data(cfg, comm, data)
    if model is None:
        model = text_model(cfg, comm, connected)
    optimizer = optimizer_named(cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                momentum=cfg.momentum)
    cls = trainer_class(cfg)
    cfg, chosen = resolve_allreduce(cfg, comm)
    trainer = cls(model, cfg.loss, optimizer, connected, comm, check_start=check_start,
                  **trainer_options(cfg, cls))
    trainer.resolved.update(chosen)
    return trainer, connected


def resolve_allreduce(cfg: Config, comm: MPI.Comm) -> Tuple[Config, Dict[str, str]]:
    """``cfg`` with ``allreduce`` "auto" made an algorithm (``comm.auto``), and the choice
    with its reason for the run's record; unchanged otherwise (collective).  A
    reproducible sum adds on shared memory but in a pipeline's stages."""
    if cfg.allreduce != "auto" or cfg.ps():
        return cfg, {}
    algorithm, why = choose(comm, wire=cfg.wire(), progress=cfg.progress,
                            heals=cfg.on_failure != "abort",
                            ordered=cfg.groups if cfg.reproducible else 0,
                            ordered_on_shm=cfg.pp == 1)
    return cfg.replace(allreduce=algorithm), {"allreduce": algorithm, "allreduce_why": why}


def _check_reproducible(cfg: Config, comm: MPI.Comm) -> None:
    """The groups fit the replicas and the batch; the BLAS's threads can be set."""
    if not cfg.reproducible:
        return
    replicas = comm.Get_size() // cfg.pp
    if not replicas <= cfg.groups <= cfg.batch_size:
        who = (f"{replicas} replicas ({comm.Get_size()} ranks / {{pp}} {cfg.pp})"
               if cfg.pp > 1 else f"{comm.Get_size()} ranks")
        raise ConfigError(f"{{groups}} {cfg.groups} with {who} and {{batch_size}} "
                          f"{cfg.batch_size}: each replica needs a group and each group a "
                          "sample (replicas <= groups <= batch size)",
                          ["groups", "batch_size", "pp"], everywhere=True)
    if not blas_control() and not single_threaded_env():
        raise ConfigError("{reproducible} computes at one BLAS thread (a product's bits "
                          "depend on the thread count), and mpitrain cannot set the threads "
                          "of this process's BLAS (not OpenBLAS, and threadpoolctl is not "
                          "installed): launch with OMP_NUM_THREADS=1 (and the BLAS's own "
                          "variable), or pip install threadpoolctl", ["reproducible"])
