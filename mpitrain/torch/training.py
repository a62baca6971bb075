"""``mpitrain.torch.fit``: a PyTorch model on mpitrain's loop, and the command line's
``train --torch MODULE:FUNCTION``::

    # mpirun -n 4 python train.py
    import mpitrain.torch as mt
    model, summary = mt.fit(model, torch.optim.AdamW(model.parameters(), lr=1e-3),
                            torch.nn.functional.cross_entropy, data, epochs=5,
                            ckpt_dir="ckpt")

The same loop as ``mpitrain.fit`` (``run.fit.run_training``): checkpoints and
bit-identical resume (also on another rank count), the watchdog, pre-emption
(``Preempted``, exit 75), healing (``on_failure``), early stopping and
``best.h5``, metrics.jsonl, the timeline, ``reproducible``, the lr schedules
(each parameter group's lr scaled by the schedule, its peak the first group's
lr unless ``lr`` is given) or a torch scheduler of one's own (``scheduler=``).
"""
from __future__ import annotations

import importlib
import os
import sys
from typing import Any, Dict, Optional, TextIO, Tuple

import torch
from mpi4py import MPI

from ..config import Config
from ..run.build import resolve_allreduce
from ..config.rules import TORCH_LR
from ..data.datasets import Dataset, as_dataset
from ..process import init
from ..run.fit import FitResult, run_training
from ..runtime import ConfigError, Preempted, agreed, literal
from .data import TorchDataset
from .trainer import TorchTrainer

__all__ = ["fit", "train_torch", "load_factory"]

def _config(model, options: Dict[str, Any], optimizer, scheduler) -> Config:
    """The run's Config: ``options`` checked as the command line's are, ``torch`` naming
    the model's class and ``lr`` the optimizer's."""
    if "lr" in options:
        raise ConfigError(f"{{lr}} {options['lr']!r} does not apply: it {TORCH_LR}", ["lr"])
    if "torch" in options:
        raise ConfigError("{torch} does not apply to mpitrain.torch.fit: it is given the "
                          "model itself", ["torch"])
    name = f"{type(model).__module__}:{type(model).__qualname__}"
    cfg = Config(**{**options, "torch": name, "lr": optimizer.param_groups[0]["lr"]})
    return check_torch_config(cfg, scheduler is not None)


def check_torch_config(cfg: Config, scheduler: bool) -> Config:
    """A scheduler of one's own and mpitrain's lr schedule are one or the other."""
    if scheduler and cfg.lr_schedule != "constant":
        raise ConfigError(f"{{lr_schedule}} {cfg.lr_schedule} does not apply: the torch "
                          "scheduler given sets the lr", ["lr_schedule"])
    if scheduler and cfg.warmup_steps:
        raise ConfigError(f"{{warmup_steps}} {cfg.warmup_steps} does not apply: the torch "
                          "scheduler given sets the lr", ["warmup_steps"])
    return cfg


def _make(model, loss_fn, optimizer, scheduler, data):
    """The trainer factory the loop calls (again after a healing, on the same objects)."""

    def make(cfg: Config, comm: MPI.Comm, check_start: bool):
        cfg, chosen = resolve_allreduce(cfg, comm)
        dtype = torch.empty(0, dtype=next(model.parameters()).dtype).numpy().dtype.name
        connected = data.connect(comm, dtype=dtype, cache_mb=cfg.cache_mb,
                                 check=cfg.check_data)
        options = {k: getattr(cfg, k) for k in TorchTrainer.OPTIONS if k != "groups"}
        options["grad_dtype"] = cfg.wire()
        from ..parallel.recipe import RECIPE_KEYS

        recipe = {k: getattr(cfg, k) for k in RECIPE_KEYS}
        trainer = TorchTrainer(model, loss_fn, optimizer, connected, comm,
                               groups=cfg.groups if cfg.reproducible else None,
                               check_start=check_start, scheduler=scheduler,
                               **options, **recipe)
        trainer.resolved.update(chosen)
        trainer.peak = cfg.lr
        trainer.keep_buffers = cfg.on_failure != "abort"
        trainer.settle_buffers()
        return trainer, connected

    return make


def as_torch_data(data: Any) -> Dataset:
    """An mpitrain dataset from what a torch user passes: a torch ``Dataset`` (wrapped
    in ``TorchDataset``), an mpitrain dataset, or a path."""
    if isinstance(data, torch.utils.data.Dataset):
        return TorchDataset(data)
    return as_dataset(data)


def fit(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Any, data: Any,
        *, comm: Optional[MPI.Comm] = None, scheduler: Any = None,
        device: Any = None, out: Optional[TextIO] = None, **options) -> FitResult:
    """Train the torch ``model`` with ``optimizer`` and ``loss_fn(outputs, targets)`` (the
    mean over rows) on ``data`` over the ranks of ``comm`` (collective); returns ``(model,
    summary)``, the model trained in place (the same parameters on every rank).

    ``data``: a map-style ``torch.utils.data.Dataset`` of ``(x, y)`` items (its task read
    from its targets; wrap it in ``TorchDataset`` for a validation split), or any
    mpitrain dataset (``ArrayDataset``, a dataset directory...).  ``options``: ``Config``
    keys, as ``mpitrain.fit`` takes them, except those the torch objects say
    (``optimizer``, ``loss``, ``model``...).  ``scheduler``: a torch lr scheduler of one's
    own, stepped after each update and kept in the checkpoints.  ``device``: where the
    model computes (``model.to(device)``; default: where its parameters are); on a GPU
    the gradients are summed through a page-locked host buffer (any MPI).
    """
    init()
    if device is not None:
        model.to(device)  # in place: the optimizer keeps its parameters
    comm = comm if comm is not None else MPI.COMM_WORLD
    cfg = agreed(comm, lambda: _config(model, options, optimizer, scheduler))
    dataset = agreed(comm, lambda: as_torch_data(data))
    summary, _, comm = run_training(cfg, comm, out=out,
                                    make=_make(model, loss_fn, optimizer, scheduler, dataset))
    if summary["preempted"]:
        raise Preempted(summary["end_step"], summary.get("signal"))
    return FitResult(model, summary, comm)


def load_factory(spec: str) -> Tuple[Any, ...]:
    """Call ``MODULE:FUNCTION`` (the module found from the working directory) and check
    what it returns: (model, optimizer, loss_fn) or (model, optimizer, loss_fn,
    scheduler).  A ConfigError naming ``torch`` otherwise."""
    if spec.count(":") != 1 or not all(spec.split(":")):
        raise ConfigError(f"{{torch}} {literal(spec)}: expected MODULE:FUNCTION, e.g. "
                          "mymodels.mlp:make", ["torch"])
    module, name = spec.split(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        made = getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as exc:
        raise ConfigError(f"{{torch}} {literal(spec)}: no module {literal(exc.name or module)} "
                          f"(looked from {literal(os.getcwd())})", ["torch"]) from None
    except AttributeError:
        raise ConfigError(f"{{torch}} {literal(spec)}: module {module} has no {name}",
                          ["torch"]) from None
    except Exception as exc:  # noqa: BLE001 - the user's module may raise anything
        raise ConfigError(f"{{torch}} {literal(spec)}: importing {module} raised "
                          f"{type(exc).__name__}: {literal(str(exc))}", ["torch"]) from None
    try:
        got = made()
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"{{torch}} {literal(spec)}: {name}() raised {type(exc).__name__}: "
                          f"{literal(str(exc))}", ["torch"]) from None
    ok = isinstance(got, tuple) and len(got) in (3, 4) and isinstance(
        got[0], torch.nn.Module) and isinstance(got[1], torch.optim.Optimizer) and callable(got[2])
    if not ok:
        raise ConfigError(f"{{torch}} {literal(spec)}: {name}() should return (model, optimizer, "
                          "loss_fn) or (model, optimizer, loss_fn, scheduler): a "
                          "torch.nn.Module, a torch.optim.Optimizer, a function; got "
                          f"{literal(_kinds(got))}", ["torch"])
    return got if len(got) == 4 else (*got, None)


def _kinds(got: Any) -> str:
    if isinstance(got, tuple):
        return "(" + ", ".join(type(g).__name__ for g in got) + ")"
    return type(got).__name__


def train_torch(cfg: Config, comm: MPI.Comm, out: Optional[TextIO] = None) -> Dict[str, Any]:
    """``mpitrain train --torch MODULE:FUNCTION``: the factory's model on ``cfg``'s data
    (collective); the summary."""
    model, optimizer, loss_fn, scheduler = agreed(comm, lambda: load_factory(cfg.torch))
    cfg = agreed(comm, lambda: check_torch_config(
        cfg.replace(lr=optimizer.param_groups[0]["lr"]), scheduler is not None))
    from ..data.builtin import builtin_dataset

    data = agreed(comm, lambda: as_dataset(cfg.data or builtin_dataset(comm)))
    summary, _, _ = run_training(cfg, comm, out=out,
                                 make=_make(model, loss_fn, optimizer, scheduler, data))
    return summary

