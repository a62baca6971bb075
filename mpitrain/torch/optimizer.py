"""``DistributedOptimizer``: a PyTorch optimizer whose step applies the gradient averaged
over the ranks, summed by mpitrain's exchange (Horovod's pattern, on MPI)::

    # mpirun -n 4 python train.py
    import mpitrain.torch as mt
    opt = mt.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    mt.broadcast_parameters(model)              # every rank starts from rank 0's
    mt.broadcast_optimizer_state(opt.optimizer)
    for x, y in batches:                        # each rank its own part of the data
        opt.zero_grad()
        loss_fn(model(x), y).backward()         # buckets summed as backward fills them
        opt.step()                              # the average over the ranks, applied

The gradients are views of the exchange's flat buffer (``torch.grads``):
backward's own tensor is copied in once as it is final, and the sum needs no
other copy: ``mpi`` (MPI's Allreduce), ``ring`` (mpitrain's, also with a
16-bit wire: ``grad_dtype``) or ``shm`` (the ranks of a node add from each
other's memory) sums them in place, in buckets of ``bucket_mb`` overlapped
with backward where the ranks span nodes (``comm.overlap``).  Parameters that
get no gradient in a step (an unused branch) are summed as zeros: no rank
waits for them, every rank applies the same update.  With ``accumulate`` K,
``step`` sums and applies every K-th call (one call after each backward).
"""
from __future__ import annotations

import os
from typing import Any, Optional

import torch
from mpi4py import MPI

from ..comm.auto import choose
from ..comm.codecs import wire_of
from ..comm.exchange import Exchange, PrivateModel, plan_buckets
from ..comm.overlap import plan_overlap
from ..process import init
from ..runtime import ConfigError
from .broadcast import BufferSync
from .grads import FlatGrads, trainable
from .owned import OwnedParams, refuse_coupled

__all__ = ["DistributedOptimizer", "flat_dtype", "match_threads"]


def match_threads() -> None:
    """torch's threads as ``init`` set OpenMP's (the rank's share of the node's cores, or
    the user's OMP_NUM_THREADS): torch read the variable when it loaded, maybe before."""
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0 and torch.get_num_threads() != int(threads):
        torch.set_num_threads(int(threads))


def flat_dtype(params) -> torch.dtype:
    """The one floating-point type of ``params`` (ConfigError for several, or none)."""
    kinds = sorted({str(p.dtype) for p in params})
    if len(kinds) != 1 or not params[0].dtype.is_floating_point:
        raise ConfigError(f"{{model}}: its trainable parameters are {', '.join(kinds) or 'none'}"
                          ": mpitrain sums one floating-point type (use model.float() or "
                          "model.double())", ["model"])
    return params[0].dtype


class DistributedOptimizer:
    """``optimizer`` (a ``torch.optim.Optimizer`` over ``model``'s parameters) whose
    ``step`` applies the gradient averaged over the ranks of ``comm`` (see the module).

    ``average`` False: the sum, not the average (a loss already divided by the global
    batch).  ``sync_buffers``: broadcast rank 0's buffers (BatchNorm statistics) after
    each step.  ``staged`` (default: the parameters are not on the
    CPU): the gradients stay on their device and go through the host buffer.

    ``shard_update`` (with ``shm``, on the CPU): the ranks of a node share one copy of
    the parameters and each updates the parameters it owns (``torch.owned``): about
    1/local_size of the optimizer's work and no copy of the summed gradients.  Then
    a parameter's ``.grad`` after ``synchronize`` holds the sum only on its owner, a
    parameter changed in place outside ``step`` is changed for the whole node, and
    the optimizer's state of a parameter lives on its owner: call ``consolidate()``
    on every rank before reading ``state_dict()``.  ``mpitrain.torch.fit`` turns it on.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module, *,
                 comm: Optional[MPI.Comm] = None, allreduce: str = "auto",
                 bucket_mb: Optional[float] = None, overlap: Optional[bool] = None,
                 progress: Optional[str] = None, grad_dtype: Optional[str] = None,
                 accumulate: int = 1, average: bool = True, sync_buffers: bool = True,
                 staged: Optional[bool] = None, extra: int = 0, shard_update: bool = False):
        init()
        match_threads()
        if not isinstance(accumulate, int) or accumulate < 1:
            raise ConfigError(f"{{accumulate}}: expected a value >= 1, got {accumulate!r}",
                              ["accumulate"])
        if shard_update:
            refuse_coupled(optimizer)
        self.optimizer, self.model = optimizer, model
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        params = trainable(model)
        dtype = flat_dtype(params)
        n = sum(p.numel() for p in params)
        np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
        wire = wire_of(grad_dtype)
        self.why = ""  # why "auto" chose the algorithm it chose
        if allreduce == "auto":  # shm where it serves (comm.auto)
            allreduce, self.why = choose(self.comm, wire=wire, progress=progress)
        overlap, bucket_mb, progress = plan_overlap(self.comm, overlap, bucket_mb, progress)
        staged = any(p.device.type != "cpu" for p in params) if staged is None else staged
        shard_update = (shard_update and allreduce == "shm" and not staged
                        and self.comm.Get_size() > 1)
        covered = n if wire else n + extra
        # ``extra`` slots after the gradients ride in the same sum (a trainer's metrics);
        # with a 16-bit wire they stay out of the buckets and are summed exactly.
        self.exchange = Exchange(
            self.comm, n + extra, np_dtype, algorithm=allreduce,
            buckets=plan_buckets(covered, bucket_mb * 2 ** 20, np_dtype.itemsize),
            overlap=overlap, progress=progress, wire=wire,
            exact=slice(n, n + extra) if wire and extra else None,
            needed=slice(n, n + extra) if extra else None, shared=shard_update,
            memory=PrivateModel())  # the update runs here: step (sharded: torch.owned)
        self.resolved = dict(overlap=overlap, bucket_mb=bucket_mb, progress=progress,
                             allreduce=allreduce)
        self.grads = FlatGrads(params, self.exchange.buffer, self.exchange.ready, staged)
        self.owned: Optional[OwnedParams] = None
        if shard_update:
            self.owned = OwnedParams(self.exchange, params, self.grads.offsets, optimizer)
        self.size, self.accumulate, self.average = n, accumulate, average
        # The mean's division inside the sum where the exchange can (shm), else after it.
        self.folded = average and extra == 0 and self.exchange.fold_scale(
            1.0 / (self.comm.Get_size() * accumulate), n)
        self.buffers = BufferSync(model, self.comm) if sync_buffers else None
        self.passes = 0  # step() calls so far (K per applied step with accumulate K)
        self.steps = 0  # updates applied
        self.grads.begin(reporting=accumulate == 1)

    @property
    def param_groups(self):
        """The wrapped optimizer's parameter groups (learning rates...)."""
        return self.optimizer.param_groups

    @property
    def state(self):
        """The wrapped optimizer's per-parameter state."""
        return self.optimizer.state

    def state_dict(self):
        """The wrapped optimizer's state dict."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state) -> None:
        """Load the wrapped optimizer's state dict."""
        self.optimizer.load_state_dict(state)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Start the next step's gradients: None (as torch's default), and backward's own
        tensors are copied into the flat buffer as they are final; ``set_to_none``
        False: zeros, views of the buffer.  Between the passes of an accumulation,
        nothing."""
        if self.passes % self.accumulate == 0:
            self.grads.zero(to_none=set_to_none is not False)

    def synchronize(self) -> None:
        """Sum the gradients over the ranks now (collective): what ``step`` does first."""
        self.grads.settle()
        self.exchange.wait()
        if self.average and not self.folded:
            self.exchange.scale(1.0 / (self.comm.Get_size() * self.accumulate), self.size)
        self.grads.unstage()

    def step(self, closure: Any = None) -> Any:
        """After each backward pass: on every ``accumulate``-th call, sum the gradients
        over the ranks (collective) and apply the wrapped optimizer's step."""
        self.passes += 1
        final_next = (self.passes + 1) % self.accumulate == 0
        if self.passes % self.accumulate:  # still accumulating
            self.grads.begin(reporting=final_next)
            return None
        self.synchronize()
        out = self.apply(closure)
        self.sync_buffers()
        self.steps += 1
        self.grads.begin(reporting=self.accumulate == 1)
        return out

    def apply(self, closure: Any = None) -> Any:
        """The wrapped optimizer's step on the summed gradients (after ``synchronize``);
        with ``shard_update``, each rank's own parameters (collective over the node)."""
        if self.owned is not None:
            return self.owned.step(self.optimizer, closure)
        return self.optimizer.step(closure)

    def consolidate(self) -> None:
        """With ``shard_update``: every rank gets the optimizer's state of every parameter
        from its owner (collective), so ``state_dict()`` is whole; otherwise nothing."""
        if self.owned is not None:
            self.owned.consolidate(self.optimizer)

    def fence(self) -> None:
        """With ``shard_update``: the node's ranks see each other's writes to the shared
        parameters (collective; after a restore); otherwise nothing."""
        if self.owned is not None:
            self.owned.fence()

    def sync_buffers(self) -> None:
        """Rank 0's buffers on every rank (collective; with ``sync_buffers``)."""
        if self.buffers is not None:
            self.buffers.sync()

    def close(self) -> None:
        """Free the exchange (collective); the gradients stay readable (with
        ``shard_update``: the parameters move to memory of their own, and every rank holds
        the whole optimizer state)."""
        if self.owned is not None:
            self.owned.release(self.optimizer)
            self.owned = None
        self.exchange.close()
        self.grads.bind(self.exchange.buffer)  # shm: a private copy of the window's sums

    def remove(self) -> None:
        """Take the hooks off the model (local)."""
        self.grads.remove()
