"""From a Config to a ready trainer: the data checked, the model made, the strategy chosen.

This is the one place that chooses how a step is split over the ranks: the
data-parallel trainer, or the pipeline trainer (stages, or micro-batches on
one stage).  A new synchronisation strategy plugs in here, and the training
loop does not know which one runs.
"""
from __future__ import annotations

import math
import os
from typing import Tuple

import numpy as np
from mpi4py import MPI

from ..comm.topology import make_grid
from ..config import Config
from ..data.builtin import builtin_dataset
from ..data.checks import check_dataset
from ..data.manifest import Manifest, read_manifest
from ..data.sampler import Sampler
from ..data.shards import Shards
from ..model.losses import make_loss
from ..model.optim import make_optimizer
from ..model.schedule import Schedule
from ..model.sequential import Sequential
from ..model.spec import SpecError, build as build_layers, canonical, mlp_spec
from ..model.tasks import make_task
from ..parallel.base import TrainerBase
from ..parallel.data_parallel import Trainer
from ..parallel.pipeline.partition import shapes_along, stage_ranges
from ..parallel.pipeline.stage import PipelineTrainer
from ..parallel.ps.trainer import PSTrainer
from ..parallel.speed import SpeedBalancer
from ..runtime import ConfigError, MpitrainError, agreed, literal
from ..threads import blas_control, limit_threads, single_threaded_env

__all__ = ["build", "open_data", "model_spec", "lr_schedule"]


def open_data(cfg: Config, comm: MPI.Comm, replicas: int) -> Tuple[Manifest, Shards, Shards]:
    """The manifest, checked against the run, and the train and val readers (collective).
    ``replicas``: how many parts each global batch is cut into."""
    who = "ranks" if cfg.pp == 1 else "data-parallel replicas"
    root = cfg.data or builtin_dataset(comm)

    def manifest() -> Manifest:  # each rank's view: a node may see another file system
        m = read_manifest(root)
        n_train = m.rows("train")
        if n_train < replicas:
            raise MpitrainError(f"{m.path}: {n_train} training samples for {replicas} {who}; "
                                "need at least one each")
        if cfg.batch_size < replicas:
            raise ConfigError(f"{{batch_size}} {cfg.batch_size} is smaller than the "
                              f"{replicas} {who}; each needs at least one sample")
        if cfg.batch_size > n_train:
            raise ConfigError(f"{{batch_size}} {cfg.batch_size} is larger than the {n_train} "
                              f"training samples of {literal(root)}")
        return m

    m = agreed(comm, manifest)
    check_dataset(m, comm, full=cfg.check_data == "full")
    cache = int(cfg.cache_mb * 2 ** 20)
    train = Shards(m, "train", cfg.dtype, cache_bytes=cache)
    val = Shards(m, "val", cfg.dtype, cache_bytes=cache) if m.rows("val") else None
    return m, train, val


def task_and_loss(cfg: Config, m: Manifest):
    """The data's task and the loss for it: ``cfg.loss``, or the task's own with 'auto'."""
    task = make_task(m.task)
    name = task.losses[0] if cfg.loss == "auto" else cfg.loss
    if name not in task.losses:
        raise ConfigError(f"{{loss}} {name} does not fit the data's task, {task.name} (it "
                          f"takes {', '.join(task.losses)})")
    return task, make_loss(name)


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
        return build_layers(text, features, outputs), canonical(text)
    except SpecError as exc:
        raise ConfigError(f"{{{param}}} {literal(text)}: {literal(str(exc))}", [param],
                          everywhere=True) from None


def lr_schedule(cfg: Config, steps_per_epoch: int, total: int) -> Schedule:
    """The learning rate of each step, as the options say."""
    return Schedule(cfg.lr, cfg.lr_schedule, total=total, warmup=cfg.warmup_steps,
                    lr_min=cfg.lr_min, step_every=cfg.lr_step_every or steps_per_epoch,
                    gamma=cfg.lr_gamma)


def _check_accumulate(cfg: Config, replicas: int) -> None:
    """Each replica's part of a batch must give every micro-batch a sample."""
    pieces = cfg.accumulate * (cfg.micro() if cfg.pipelined() else 1)
    smallest = cfg.batch_size // replicas
    if pieces > smallest:
        what = ("{accumulate} %d x %d {microbatches}" % (cfg.accumulate, cfg.micro())
                if cfg.pipelined() else "{accumulate} %d" % cfg.accumulate)
        raise ConfigError(f"{what} cuts each replica's part of {{batch_size}} "
                          f"{cfg.batch_size} ({smallest} samples for {replicas} replicas) "
                          f"into {pieces} micro-batches: more than it has samples",
                          ["accumulate", "batch_size"], everywhere=True)


def build(cfg: Config, comm: MPI.Comm) -> Tuple[TrainerBase, Manifest]:
    """Check the data and make the grid, model, optimizer and trainer (collective)."""
    if cfg.ps() and cfg.servers >= comm.Get_size():
        raise ConfigError(f"{{servers}} {cfg.servers} with {comm.Get_size()} ranks leaves no "
                          "worker: the parameter server needs at least one rank that "
                          f"computes (at most {comm.Get_size() - 1} servers)", ["servers"],
                          everywhere=True)
    grid = make_grid(comm, cfg.pp)
    if cfg.reproducible and not grid.dp <= cfg.groups <= cfg.batch_size:
        who = (f"{grid.dp} replicas ({comm.Get_size()} ranks / {{pp}} {cfg.pp})"
               if cfg.pp > 1 else f"{comm.Get_size()} ranks")
        raise ConfigError(f"{{groups}} {cfg.groups} with {who} and {{batch_size}} "
                          f"{cfg.batch_size}: each replica needs a group and each group a "
                          "sample (replicas <= groups <= batch size)",
                          ["groups", "batch_size", "pp"], everywhere=True)
    if cfg.reproducible and not blas_control() and not single_threaded_env():
        raise ConfigError("{reproducible} computes at one BLAS thread (a product's bits "
                          "depend on the thread count), and mpitrain cannot set the threads "
                          "of this process's BLAS (not OpenBLAS, and threadpoolctl is not "
                          "installed): launch with OMP_NUM_THREADS=1 (and the BLAS's own "
                          "variable), or pip install threadpoolctl", ["reproducible"])
    replicas = comm.Get_size() - cfg.servers if cfg.ps() else grid.dp
    m, train, val = open_data(cfg, comm, replicas)
    task, loss = agreed(comm, lambda: task_and_loss(cfg, m))
    layers, spec = make_layers(cfg, m.features, task.outputs)
    _check_accumulate(cfg, replicas)
    stages = (stage_ranges(layers, cfg.pp, cfg.stage_layers, shape=m.features)
              if cfg.pp > 1 else [(0, len(layers))])
    check_memory(cfg, comm, layers, stages, m.features)
    chunks = cfg.shuffle == "chunks" or (cfg.shuffle == "auto" and train.chunked())
    window = train.chunk_bytes() * cfg.shuffle_window
    if chunks and window > cfg.cache_mb * 2 ** 20:
        raise ConfigError(f"{{shuffle_window}} {cfg.shuffle_window} chunks of "
                          f"{train.chunk_bytes() / 2 ** 20:.1f} MiB need {window / 2 ** 20:.0f} "
                          f"MiB of decoded chunks at once, more than {{cache_mb}} "
                          f"{cfg.cache_mb:g}: every chunk would be decompressed again and "
                          "again; give a larger cache or a smaller window", everywhere=True)
    sampler = Sampler(len(train), cfg.batch_size, cfg.seed, cfg.drop_last,
                      blocks=train.blocks() if chunks else None, window=cfg.shuffle_window)
    opt_args = dict(lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum)
    trainer: TrainerBase
    if cfg.pipelined():
        trainer = PipelineTrainer(layers, grid, loss, cfg.optimizer, opt_args, train, sampler,
                                  shape=m.features, microbatches=cfg.micro(),
                                  schedule=cfg.schedule, allreduce=cfg.allreduce, val=val,
                                  grad_dtype=cfg.wire(), dtype=cfg.dtype, seed=cfg.seed,
                                  stage_layers=cfg.stage_layers, task=task,
                                  accumulate=cfg.accumulate, clip_grad_norm=cfg.clip_grad_norm,
                                  groups=cfg.groups if cfg.reproducible else None)
    elif cfg.ps():
        model = Sequential(layers, dtype=cfg.dtype, seed=cfg.seed)
        trainer = PSTrainer(model, loss, cfg.optimizer, opt_args, train, sampler, comm, val,
                            task=task, servers=cfg.servers, staleness=cfg.staleness,
                            bucket_mb=cfg.bucket_mb, overlap=cfg.overlap,
                            accumulate=cfg.accumulate, clip_grad_norm=cfg.clip_grad_norm,
                            seed=cfg.seed)
    else:
        model = Sequential(layers, dtype=cfg.dtype, seed=cfg.seed)
        optimizer = make_optimizer(cfg.optimizer, model.params, model.grads, **opt_args)
        trainer = Trainer(model, loss, optimizer, train, sampler, comm, val, task=task,
                          allreduce=cfg.allreduce, bucket_mb=cfg.bucket_mb,
                          overlap=cfg.overlap, progress=cfg.progress, grad_dtype=cfg.wire(),
                          accumulate=cfg.accumulate, clip_grad_norm=cfg.clip_grad_norm,
                          seed=cfg.seed, groups=cfg.groups if cfg.reproducible else None)
    trainer.spec = {"spec": spec, "input_shape": list(m.features)}
    if cfg.balance == "speed":  # the servers of a parameter server take no share
        computes = not (cfg.ps() and comm.Get_rank() < cfg.servers)
        trainer.balancer = SpeedBalancer(comm, cfg.batch_size, cfg.balance_every, computes)
    return trainer, m
