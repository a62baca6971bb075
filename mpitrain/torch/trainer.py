"""``TorchTrainer``: a PyTorch model on mpitrain's loop, keeping the trainer protocol.

The loop (``run.loop``) drives it as it drives the numpy trainers: ``step``,
``evaluate``, ``set_lr``, the checkpoint protocol (``capture``, ``mismatch``,
``restore``; ``take_over`` after a healing), ``close``.  One step::

    ids, x, y  = this rank's part of global batch k        (mpitrain's sampler and reader)
    for each of ``accumulate`` micro-batches:
        loss_fn(model(x), y) x rows / B  -> backward        (into views of the exchange's
                                                              buffer, buckets reported)
    the loss sum and the task's sums ride at the buffer's end: one sum for everything
    clip (optional); optimizer.step(); scheduler.step()

Dropout and every other random draw of the model come from torch's generator,
seeded at each micro-batch from (seed, step, its first global sample id): a
resume draws the same, and so does a run of another rank count whose
micro-batches start at the same samples.  The model's buffers (BatchNorm) are rank 0's
before every forward pass in training.
"""
from __future__ import annotations

import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from mpi4py import MPI

from ..balance import rank_slice
from ..comm.auto import choose
from ..comm.codecs import wire_of
from ..comm.topology import Grid, make_grid
from ..data.batches import Batches
from ..model.tasks import make_task
from ..parallel.base import TrainerBase
from ..parallel.evaluation import evaluate_split
from ..parallel.recipe import split_options
from ..runtime import ConfigError, MpitrainError, agreed, literal
from ..timeline import span
from .broadcast import broadcast_parameters
from .optimizer import DistributedOptimizer
from .owned import COUPLED
from .checkpoints import TorchCheckpoints
from .reproducible import TorchGroups, seed_for, seed_torch

__all__ = ["TorchTrainer"]

class _Stepper:
    """The user's optimizer (and scheduler) as the loop's end of a step calls it."""

    def __init__(self, optimizer: torch.optim.Optimizer, scheduler: Any = None,
                 apply: Any = None):
        self.torch, self.scheduler, self.steps = optimizer, scheduler, 0
        self.apply = apply or optimizer.step  # DistributedOptimizer.apply: sharded or not
        self.name = type(optimizer).__name__.lower()

    @property
    def lr(self) -> float:
        return self.torch.param_groups[0]["lr"]

    def step(self) -> None:
        self.apply()
        if self.scheduler is not None:
            self.scheduler.step()
        self.steps += 1


class _Flat:
    """What the base trainer reads of a model: the flat gradients, their size, type and
    each parameter's place (the reproducible clipping's norm, by tensor)."""

    def __init__(self, grads: np.ndarray, offsets: List[int]):
        self.size, self.grads, self.dtype = len(grads), grads, grads.dtype
        self.slices = {k: slice(a, b) for k, (a, b) in enumerate(zip(offsets, offsets[1:]))}


class TorchTrainer(TorchCheckpoints, TrainerBase):
    """Data-parallel training of a ``torch.nn.Module`` over the ranks of ``comm``.

    ``loss``: ``loss_fn(outputs, targets)``, the mean over a batch's rows (as torch's
    losses are by default); ``optimizer``: a ``torch.optim.Optimizer`` over the
    model's parameters (``scheduler``: its lr scheduler, stepped after each update,
    saved and restored); ``data``: an mpitrain dataset or a ``TorchDataset``.  The
    exchange's options as ``Trainer`` takes them; ``groups``: the reproducible step
    (``torch.reproducible``); ``device``: where the model computes (its parameters'
    device by default).
    """

    OPTIONS = ("allreduce", "bucket_mb", "overlap", "progress", "grad_dtype", "groups")

    def __init__(self, model: torch.nn.Module, loss: Any, optimizer: torch.optim.Optimizer,
                 data: Any, comm: Any, *, allreduce: str = "auto",
                 bucket_mb: Optional[float] = None, overlap: Optional[bool] = None,
                 progress: Optional[str] = None, grad_dtype: Optional[str] = None,
                 groups: Optional[int] = None, check_start: bool = True,
                 scheduler: Any = None, **options):
        comm = comm.world if isinstance(comm, Grid) else comm
        if not isinstance(model, torch.nn.Module) or not callable(loss) \
                or not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigError("{model}, {loss}, {optimizer}: expected a torch.nn.Module, a "
                              "loss function and a torch.optim.Optimizer, got "
                              f"{literal(type(model).__name__)}, "
                              f"{literal(type(loss).__name__)}, "
                              f"{literal(type(optimizer).__name__)}",
                              ["model", "loss", "optimizer"])
        self.torch_model, self.loss_fn, self.comm = model, loss, comm
        self.check_start = check_start
        recipe = split_options("TorchTrainer", options)
        first = next(model.parameters())
        self.device, dtype = first.device, first.dtype
        self._begin(None, data, comm, recipe,
                    dtype=torch.empty(0, dtype=dtype).numpy().dtype,
                    replicas=comm.Get_size(), who="ranks")
        record = dict(self.data.task)
        record.pop("mean", None), record.pop("std", None)  # the user's loss sees raw targets
        self.task = make_task(record)
        self.loss = _LossOnArrays(loss, self.device, dtype)
        self._check_pieces(comm, comm.Get_size(), recipe.accumulate,
                           f"{{accumulate}} {recipe.accumulate}")
        self.grid = make_grid(comm, 1)
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self._check_outputs(comm)
        if check_start:  # every rank starts from rank 0's values, as DDP does
            broadcast_parameters(model, 0, comm)
        width = 2 + self.task.width
        why = ""
        if allreduce == "auto" and groups:  # shm for the fixed-order sum where it serves
            allreduce, why = choose(comm, wire=wire_of(grad_dtype), progress=progress,
                                    ordered=groups, ordered_on_shm=True)
        self.dist = DistributedOptimizer(
            optimizer, model, comm=comm, allreduce=allreduce, bucket_mb=bucket_mb,
            overlap=overlap, progress=progress, grad_dtype=grad_dtype, average=False,
            extra=width, sync_buffers=not groups,  # grouped: buffers in group order
            # with shm: one copy per node, each rank its own parameters' update (not with
            # clipping: the norm, added by shares, would round otherwise than unsharded)
            shard_update=type(optimizer).__name__ not in COUPLED
            and recipe.clip_grad_norm is None)
        self.dist.why = why or self.dist.why
        self.exchange, self.grads = self.dist.exchange, self.dist.grads
        n = self.grads.size
        self.metrics = slice(n, n + width)
        self.model = _Flat(self.exchange.buffer[:n], self.grads.offsets)
        self.optimizer = _Stepper(optimizer, scheduler, self.dist.apply)
        self.scheduler = scheduler
        self._shapes_and_names()
        reads_ahead = getattr(self.data, "prefetch", True)
        self.batches = Batches(self.train, self.sampler, self.rank, self.size, groups=groups)
        self.batches.ahead = reads_ahead
        self._finish(comm, groups, resolved=dict(self.dist.resolved))
        kind = type(model)
        self.spec = {"torch": f"{kind.__module__}.{kind.__qualname__}",
                     "input_shape": list(self.data.features)}
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        self.peak: Optional[float] = None  # the schedule's peak lr (set by the loop's lr)
        self.grouped = TorchGroups(self, groups) if groups else None
        self.keep_buffers = False  # set by a healing loop (settle_buffers)
        self.settled: Dict[str, torch.Tensor] = {}

    def _check_outputs(self, comm) -> None:
        """The model's output for one training sample fits the task (collective)."""

        def check() -> None:
            x, _ = self.train.read(np.arange(1))
            was = self.torch_model.training
            self.torch_model.eval()
            try:
                with torch.no_grad():
                    out = self.torch_model(torch.from_numpy(x).to(self.device))
            except Exception as exc:  # noqa: BLE001 - the user's model may raise anything
                raise MpitrainError(f"model: on a sample of shape {tuple(x.shape[1:])} from "
                                    f"{self.data.name} it raised {type(exc).__name__}: "
                                    f"{exc}") from None
            finally:
                self.torch_model.train(was)
            if tuple(out.shape) != (1, self.task.outputs):
                raise MpitrainError(f"model: it gives {tuple(out.shape[1:])} for a sample, "
                                    f"and the task needs ({self.task.outputs},)")

        agreed(comm, check)

    def model_text(self) -> Optional[str]:
        """None: a torch model has no text (checkpoints check its tensors' names, shapes)."""
        return None

    def describe_model(self) -> str:
        """The model's class, size and device, for the run's first lines."""
        return (f"torch model {type(self.torch_model).__name__}: {self.grads.size:,} "
                f"trainable parameters, on {self.device}")

    def describe_loss(self) -> str:
        """The loss function's name."""
        return getattr(self.loss_fn, "__name__", type(self.loss_fn).__name__)

    def describe_optimizer(self) -> str:
        """The torch optimizer's class."""
        return f"torch {type(self.optimizer.torch).__name__}"

    def set_lr(self, lr: float) -> None:
        """The schedule's lr: each parameter group's own lr scaled by lr / its peak (with
        a torch scheduler of one's own, that scheduler's)."""
        if self.scheduler is not None or self.peak is None:
            return
        for g, base in zip(self.optimizer.torch.param_groups, self.base_lrs):
            g["lr"] = base * lr / self.peak

    def whole_params(self) -> np.ndarray:
        """Nothing: the torch model itself is trained in place."""
        return self.exchange.buffer[:0]

    def check_replicas(self) -> None:
        """Every rank starts from rank 0's parameters (broadcast), nothing to compare."""

    def _forward_backward(self, step: int, ids: np.ndarray, x: np.ndarray, y: np.ndarray,
                          batch: int, metrics: np.ndarray) -> None:
        """Forward and backward of rows ``x`` (targets ``y``) of a batch of ``batch``, in
        ``accumulate`` micro-batches, into the gradients; the loss and task sums added
        to ``metrics`` (``[loss sum, stop, task sums]``)."""
        count = max(1, min(self.accumulate, len(x)))
        for k, (lo, hi) in enumerate(rank_slice(len(x), j, count) for j in range(count)):
            self.grads.begin(reporting=k == count - 1)  # the last pass makes them final
            seed_torch(seed_for(self.seed, step, int(ids[lo])), self.device)
            xb = torch.from_numpy(x[lo:hi]).to(self.device)
            yb = self.loss.targets(y[lo:hi])
            with span("forward", "compute", samples=hi - lo):
                out = self.torch_model(xb)
                loss = self.loss_fn(out, yb)
            with span("backward", "compute", samples=hi - lo):
                (loss * ((hi - lo) / batch)).backward()
            metrics[0] += float(loss.detach()) * (hi - lo)
            metrics[2:] += self.task.sums(out.detach().cpu().numpy(), y[lo:hi])

    def step(self, step: int, stop: Any = False) -> Tuple[float, Dict[str, object], int]:
        """Run global step ``step`` (see the module); ``stop`` as ``Trainer.step``."""
        out = self.grouped.step(step, stop) if self.grouped is not None else \
            self._step(step, stop)
        self.settle_buffers()
        return out

    def settle_buffers(self) -> None:
        """With ``keep_buffers`` (a job that heals), a copy of the buffers as this step left
        them: a forward pass of a step a rank's death cut short changes them in place, and
        the state handed over after the healing must not hold that."""
        if self.keep_buffers:
            self.settled = {n: b.detach().clone() for n, b in self.torch_model.named_buffers()}

    def _step(self, step: int, stop: Any) -> Tuple[float, Dict[str, object], int]:
        t0 = time.perf_counter()
        with span("data", "data"):
            ids, x, y, batch = self.batches.get(step)
        t1 = time.perf_counter()
        self.on_phase("computing")
        metrics = self.exchange.buffer[self.metrics]
        metrics[:] = 0
        self.grads.zero()
        self.torch_model.train()
        with np.errstate(over="ignore", invalid="ignore"):
            self._forward_backward(step, ids, x, y, batch, metrics)
        metrics[1] = 1.0 if stop else 0.0
        self.grads.settle()
        t2 = time.perf_counter()
        self.on_phase("exchange")
        with span("exchange wait", "exchange"):
            self.exchange.wait()
        self.grads.unstage()
        out = self._conclude(step, batch, self.exchange.buffer[self.metrics],
                             (t0, t1, t2, time.perf_counter()))
        self.dist.sync_buffers()
        self._observe(step, t2 - t1, len(ids))
        return out

    def evaluate(self) -> Optional[Dict[str, object]]:
        """{"loss": ..., task metrics} on the validation split (collective)."""
        if self.grouped is not None:
            return self.grouped.evaluate()
        if self.val is None or len(self.val) == 0:
            return None
        self.on_phase("evaluation")
        return evaluate_split(self.forward, self.loss, self.task, self.val, self.comm)

    def forward(self, x: np.ndarray) -> np.ndarray:
        """The model's outputs for rows ``x``, in evaluation mode, as an array."""
        self.torch_model.eval()
        try:
            with torch.no_grad():
                return self.torch_model(torch.from_numpy(x).to(self.device)).cpu().numpy()
        finally:
            self.torch_model.train()

    def close(self) -> None:
        """Free the exchange (collective); the model keeps its trained values."""
        self.batches.close()
        self.dist.close()
        self.dist.remove()

    def stop(self) -> None:
        """After an error (local): as every trainer's, and the parameters moved out of the
        node's shared window (which is not freed now), so the model stays usable."""
        super().stop()
        if self.dist.owned is not None:
            self.dist.owned.detach()

    def abandon(self) -> List[MPI.Comm]:
        """After a rank died (local): as every trainer, and the hooks off the model."""
        comms = super().abandon()
        self.dist.remove()
        return comms


class _LossOnArrays:
    """The user's loss as the evaluation loop calls a loss: on arrays, giving the sum over
    the rows (torch's losses give the mean)."""

    def __init__(self, loss_fn, device, dtype):
        self.loss_fn, self.device, self.dtype = loss_fn, device, dtype

    def targets(self, y: np.ndarray) -> torch.Tensor:
        """Targets as the loss takes them: labels as int64, values as the model's type."""
        t = torch.from_numpy(np.require(y, requirements="C")).to(self.device)
        return t.to(self.dtype) if t.is_floating_point() else t

    def __call__(self, out: np.ndarray, targets: np.ndarray, scale: float):
        with torch.no_grad():
            o = torch.from_numpy(np.require(out, requirements="C")).to(self.device)
            return float(self.loss_fn(o, self.targets(targets))) * len(out), None
