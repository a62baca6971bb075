"""Making every rank hold the same model and optimizer state: broadcasts of tensors.

Buffer-based: each tensor goes out through ``Bcast`` on a numpy view of its
memory (a CPU tensor's own; a GPU tensor's host copy); only the small
description of an optimizer's state (its keys, shapes, types and scalar
hyper-parameters) travels as a Python object.  ``BufferSync`` broadcasts a
model's buffers (BatchNorm's running statistics) from rank 0 after each step.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Dict, List, Optional

import torch
from mpi4py import MPI

__all__ = ["broadcast_parameters", "broadcast_optimizer_state", "broadcast_tensors",
           "BufferSync"]


def broadcast_tensors(tensors: List[torch.Tensor], root: int, comm: MPI.Comm) -> None:
    """Give every rank ``root``'s values of ``tensors`` (the same shapes and types on every
    rank; collective), in place, one ``Bcast`` per type."""
    by_dtype: "OrderedDict[torch.dtype, List[torch.Tensor]]" = OrderedDict()
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for dtype, group in by_dtype.items():
        flat = torch.cat([t.detach().reshape(-1).cpu() for t in group]) if len(group) > 1 \
            else group[0].detach().reshape(-1).cpu().clone()
        comm.Bcast(flat.numpy(), root=root)
        offset = 0
        with torch.no_grad():
            for t in group:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()


def broadcast_parameters(model: torch.nn.Module, root: int = 0,
                         comm: Optional[MPI.Comm] = None) -> None:
    """Give every rank ``root``'s parameters and buffers of ``model`` (collective)."""
    comm = comm if comm is not None else MPI.COMM_WORLD
    broadcast_tensors(list(model.state_dict(keep_vars=True).values()), root, comm)


def _describe(value: Any):
    if torch.is_tensor(value):
        return ("tensor", tuple(value.shape), str(value.dtype).replace("torch.", ""))
    return ("value", value)


def broadcast_optimizer_state(optimizer: torch.optim.Optimizer, root: int = 0,
                              comm: Optional[MPI.Comm] = None) -> None:
    """Give every rank ``root``'s state of ``optimizer`` (its per-parameter tensors and its
    hyper-parameters), loaded with ``load_state_dict`` (collective)."""
    comm = comm if comm is not None else MPI.COMM_WORLD
    mine = optimizer.state_dict() if comm.Get_rank() == root else None
    meta = comm.bcast(None if mine is None else {
        "groups": mine["param_groups"],
        "state": {k: {n: _describe(v) for n, v in s.items()}
                  for k, s in mine["state"].items()}}, root=root)
    tensors: List[torch.Tensor] = []
    state: Dict[int, Dict[str, Any]] = {}
    for k in sorted(meta["state"]):
        state[k] = {}
        for name in sorted(meta["state"][k]):
            kind, *rest = meta["state"][k][name]
            if kind == "value":
                state[k][name] = rest[0]
                continue
            shape, dtype = rest
            t = (mine["state"][k][name].detach().cpu().clone() if mine is not None else
                 torch.empty(shape, dtype=getattr(torch, dtype)))
            state[k][name] = t
            tensors.append(t)
    for t in tensors:  # in one order on every rank
        buf = t.reshape(-1).numpy()
        comm.Bcast(buf, root=root)
    optimizer.load_state_dict({"state": state, "param_groups": meta["groups"]})


class BufferSync:
    """``root``'s buffers of ``model`` on every rank, after each step (collective):
    BatchNorm's running statistics are then rank 0's everywhere, as with PyTorch's DDP
    (which broadcasts them before each forward pass), and every rank holds the same
    state between steps."""

    def __init__(self, model: torch.nn.Module, comm: MPI.Comm, root: int = 0):
        self.model, self.comm, self.root = model, comm, root

    def sync(self) -> None:
        """Give every rank ``root``'s buffers now (collective)."""
        buffers = [b for b in self.model.buffers() if b.numel()]
        if buffers and self.comm.Get_size() > 1:
            broadcast_tensors(buffers, self.root, self.comm)
