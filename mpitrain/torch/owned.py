"""A node's ranks share one copy of a torch model, and each updates the parameters it owns.

With the ``shm`` exchange the ranks of a node add each other's gradients from
shared memory, each rank one share of the buffer (``comm.shm``).  Without
this module every rank then copies the other shares and runs the optimizer on
the whole model, as every other rank of the node does too.  Here
(``DistributedOptimizer(shard_update=True)``, what ``mpitrain.torch.fit`` does
with ``shm``) the parameters live in one window the node shares, each
parameter is *owned* by the local rank that summed most of its gradient, and
a step is::

    each rank: its shares of the gradient summed (the exchange's reduce-scatter)
    fence      every share summed (and scaled: a mean, clipping)
    each rank: the parts of its parameters' gradients that other ranks summed,
               copied from them; the optimizer stepped with only its own
               parameters' gradients set (torch skips a parameter whose .grad is None)
    fence      the node sees every update before the next forward pass reads it

So a rank updates about 1/local_size of the model and copies only the few
gradient pieces of parameters that straddle two shares.  Ownership is by whole
parameter, so any optimizer that updates each parameter from its own gradient
and state (SGD, Adam, AdamW, RMSprop, Adagrad, Adafactor...) gives the same bits
as the unsharded step; one that couples parameters (LBFGS) is refused.  The
optimizer's state of a parameter lives on its owner: ``consolidate`` copies it to
every rank of the node (for a checkpoint, and when the exchange closes).  The
ranks with the same local rank on other nodes own the same parameters and make
the same updates to their node's copy.
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import torch

from ..runtime import ConfigError

__all__ = ["OwnedParams", "COUPLED", "refuse_coupled"]

# Optimizers whose step couples parameters (a global line search): not per parameter.
COUPLED = ("LBFGS",)


def refuse_coupled(optimizer: torch.optim.Optimizer) -> None:
    """ConfigError if ``optimizer``'s step couples the parameters (no sharded update)."""
    name = type(optimizer).__name__
    if name in COUPLED:
        raise ConfigError(f"{{shard_update}} with {{optimizer}} {name}: its step couples the "
                          "parameters, and a sharded update needs one that updates each "
                          "parameter from its own gradient and state", ["shard_update",
                                                                        "optimizer"])


class OwnedParams:
    """``params`` (whose gradients sit at ``offsets`` of ``exchange.buffer``) moved into
    memory the node's ranks share; ``step`` updates this rank's own (collective over
    the node)."""

    def __init__(self, exchange, params: Sequence[torch.nn.Parameter], offsets: List[int],
                 optimizer: torch.optim.Optimizer):
        refuse_coupled(optimizer)
        self.exchange, self.shm = exchange, exchange.blocking
        self.params, self.offsets = list(params), list(offsets)
        me, size = self.shm.local_rank, self.shm.local_size
        shares = [(j, a, b) for lo, hi in exchange.buckets
                  for j, (a, b) in enumerate(zip(self.shm.bounds(lo, hi)[:-1],
                                                 self.shm.bounds(lo, hi)[1:])) if b > a]
        self.owner: List[int] = []
        self.fetch: List[Tuple[int, int, int]] = []  # (local rank, lo, hi) to copy from
        for pa, pb in zip(self.offsets, self.offsets[1:]):
            held = np.zeros(size, np.int64)
            for j, a, b in shares:
                held[j] += max(0, min(b, pb) - max(a, pa))
            owner = int(np.argmax(held))  # the most of it; ties: the lowest local rank
            self.owner.append(owner)
            if owner == me:
                self.fetch += [(j, max(a, pa), min(b, pb)) for j, a, b in shares
                               if j != me and min(b, pb) > max(a, pa)]
        self.mine = [i for i, o in enumerate(self.owner) if o == me]
        dtype = exchange.buffer.dtype
        self.flat = self.shm.shared(self.offsets[-1], dtype)
        if me == 0:
            for p, a, b in zip(self.params, self.offsets, self.offsets[1:]):
                self.flat[a:b] = p.detach().reshape(-1).numpy()
        self.shm.fence()
        self._bind(self.flat)

    def _bind(self, flat: np.ndarray) -> None:
        with torch.no_grad():
            for p, a, b in zip(self.params, self.offsets, self.offsets[1:]):
                p.data = torch.from_numpy(flat[a:b]).view_as(p)

    def step(self, optimizer: torch.optim.Optimizer, closure: Any = None) -> Any:
        """Update the parameters this rank owns from the summed gradients (collective over
        the node; after the exchange's ``wait``).  No ``closure``: its forward pass would
        read the shared parameters while the node's ranks write them."""
        if closure is not None:
            raise ConfigError("{closure} with {shard_update}: a closure's forward pass "
                              "would read the node's shared parameters while its ranks "
                              "update them (shard_update False runs it)",
                              ["closure", "shard_update"])
        buffer, views = self.exchange.buffer, self.shm.views
        self.shm.fence()  # every share summed and scaled
        for j, lo, hi in self.fetch:
            buffer[lo:hi] = views[j][lo:hi]
        grads = [p.grad for p in self.params]
        for i, p in enumerate(self.params):
            if self.owner[i] != self.shm.local_rank:
                p.grad = None
        try:
            out = optimizer.step(closure)
        finally:
            for p, g in zip(self.params, grads):
                p.grad = g
        self.shm.fence()  # the node sees the updates; peers are done reading this buffer
        self.exchange.owned.clear()
        return out

    def fence(self) -> None:
        """Every rank of the node got here, and sees the others' writes (collective)."""
        self.shm.fence()

    def consolidate(self, optimizer: torch.optim.Optimizer) -> None:
        """Every rank of the node gets each parameter's optimizer state from its owner
        (collective over the node): what each rank holds described in one small
        ``allgather``, then each tensor by ``Bcast`` from its owner."""
        node, me = self.shm.node, self.shm.local_rank

        def described(state: Dict[str, Any]) -> Dict[str, Any]:
            return {k: (tuple(v.shape), str(v.dtype)) if torch.is_tensor(v) else ("value", v)
                    for k, v in state.items()}

        mine = {i: described(optimizer.state.get(self.params[i], {})) for i in self.mine}
        metas = {i: m for held in node.allgather(mine) for i, m in held.items()}
        for i, p in enumerate(self.params):
            owner, meta = self.owner[i], metas.get(i)
            if not meta:
                continue
            state = optimizer.state.get(p, {}) if owner == me else {}
            got: Dict[str, Any] = {}
            for key, (shape, kind) in meta.items():
                if shape == "value":
                    got[key] = kind
                    continue
                t = (state[key].detach().contiguous() if owner == me else
                     torch.empty(shape, dtype=getattr(torch, kind.split(".")[-1])))
                node.Bcast(t.reshape(-1).numpy(), root=owner)
                got[key] = t
            if owner != me:
                optimizer.state[p] = got

    def detach(self) -> None:
        """The parameters copied into memory of their own (local: after an error)."""
        self._bind(self.flat.copy())

    def release(self, optimizer: torch.optim.Optimizer) -> None:
        """Before the window is freed (collective over the node): the optimizer state on
        every rank, and the parameters copied into memory of their own."""
        self.consolidate(optimizer)
        self.fence()
        self._bind(self.flat.copy())
