"""A PyTorch model's and optimizer's state as mpitrain's checkpoint arrays, and back.

A checkpoint holds named arrays and JSON (``fault.checkpoint``), whatever
trainer wrote it.  A torch model's ``state_dict`` (parameters and buffers)
becomes ``params/<name>``; its optimizer's per-parameter state ``optimizer/<key>/
<parameter name>`` (``momentum_buffer``, ``exp_avg``, its ``step``...); the
optimizer's class, its parameter groups (hyper-parameters, parameter names) and
the scalars of its state go into the checkpoint's ``optimizer`` record, with
the scheduler's state when there is one::

    state = mpitrain.torch.load_state("ckpt/ckpt-000000500.h5")   # a model state_dict
    model.load_state_dict(state)
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

__all__ = ["model_arrays", "optimizer_arrays", "to_model_state", "to_optimizer_state",
           "load_state", "param_names"]


def _array(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().contiguous().numpy().copy()


def model_arrays(model: torch.nn.Module) -> Dict[str, np.ndarray]:
    """Every tensor of ``model.state_dict()`` (parameters and buffers), as arrays."""
    return {name: _array(t) for name, t in model.state_dict().items()}


def param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> List[str]:
    """The name of each parameter of ``optimizer``, in its state dict's numbering."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in names:
                from ..runtime import ConfigError

                raise ConfigError("{optimizer}: it holds a parameter that is not the "
                                  "model's (give it model.parameters())", ["optimizer"])
            out.append(names[id(p)])
    return out


def optimizer_arrays(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     scheduler: Any = None) -> Tuple[Dict[str, Dict[str, np.ndarray]],
                                                     Dict[str, Any]]:
    """(arrays by key and parameter name, the JSON record) of ``optimizer``'s state."""
    names = param_names(model, optimizer)
    sd = optimizer.state_dict()
    arrays: Dict[str, Dict[str, np.ndarray]] = {}
    scalars: Dict[str, Dict[str, Any]] = {}
    for index, entry in sd["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                arrays.setdefault(key, {})[names[index]] = _array(value)
            else:
                scalars.setdefault(names[index], {})[key] = value
    groups = [{**{k: v for k, v in g.items() if k != "params"},
               "params": [names[i] for i in g["params"]]} for g in sd["param_groups"]]
    record = {"class": type(optimizer).__name__, "groups": _jsonable(groups),
              "scalars": _jsonable(scalars)}
    if scheduler is not None:
        record["scheduler"] = {"class": type(scheduler).__name__,
                               "state": _jsonable(scheduler.state_dict())}
    return arrays, record


def _jsonable(value: Any) -> Any:
    """``value`` with tuples as lists and tensors as numbers (JSON can hold it)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if torch.is_tensor(value):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    from ..runtime import MpitrainError

    raise MpitrainError(f"a value of type {type(value).__name__} in the optimizer's or "
                        "scheduler's state cannot be checkpointed as JSON")


def to_model_state(arrays: Dict[str, np.ndarray]) -> "OrderedDict[str, torch.Tensor]":
    """A model ``state_dict`` from checkpoint arrays."""
    return OrderedDict((n, torch.from_numpy(np.require(a, requirements="C")).clone())
                       for n, a in arrays.items())


def to_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                       arrays: Dict[str, Dict[str, np.ndarray]],
                       record: Dict[str, Any]) -> Dict[str, Any]:
    """An optimizer ``state_dict`` for ``optimizer`` (over ``model``) from checkpoint
    arrays and the JSON record ``optimizer_arrays`` made."""
    names = param_names(model, optimizer)
    index = {n: i for i, n in enumerate(names)}
    state: Dict[int, Dict[str, Any]] = {}
    for key, named in arrays.items():
        for name, a in named.items():
            state.setdefault(index[name], {})[key] = torch.from_numpy(
                np.require(a, requirements="C")).clone()
    for name, values in (record.get("scalars") or {}).items():
        state.setdefault(index[name], {}).update(values)
    groups = []
    for g, mine in zip(record["groups"], optimizer.state_dict()["param_groups"]):
        restored = {k: (tuple(v) if isinstance(mine.get(k), tuple) else v)
                    for k, v in g.items() if k != "params"}
        groups.append({**restored, "params": [index[n] for n in g["params"]]})
    return {"state": state, "param_groups": groups}


def load_state(path: str) -> "OrderedDict[str, torch.Tensor]":
    """The model ``state_dict`` a checkpoint holds (checksums verified), for use outside
    mpitrain: ``model.load_state_dict(mpitrain.torch.load_state(path))``."""
    from ..fault.checkpoint import load

    return to_model_state(load(path).params)


def restore_scheduler(scheduler: Any, record: Optional[Dict[str, Any]]) -> None:
    """Load a scheduler's state from the optimizer record (if it holds one)."""
    if scheduler is not None and record and record.get("scheduler"):
        scheduler.load_state_dict(record["scheduler"]["state"])
