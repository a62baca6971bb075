"""``reproducible`` for a PyTorch model: the same bits at any number of ranks.

As ``parallel.reproducible`` does for mpitrain's layers: each global batch is
cut into ``G`` fixed groups; rank r of p computes groups ``rank_slice(G, r, p)``,
each with the same rows, shapes and random draws (torch's generator seeded
from (seed, step, group)) wherever it runs, at one torch thread and with
``torch.use_deterministic_algorithms``; the groups' gradients are added in
one fixed order (``comm.ordered.OrderedSum``: a tree over the groups), their
loss and metric sums gathered and added in group order.  A group placed in a
buffer of its own gets autograd's own tensor (copied into place: -0.0 stays
-0.0); a group whose left sibling in the tree is a group adds to its buffer.
Dropout and every other draw of a group come from torch's generator seeded
from (seed, step, the group's first global sample id).

A model whose buffers change in training (BatchNorm's running statistics)
updates them group after group, in group order: each rank takes the buffers
from the rank before, runs its groups' forward passes, passes the buffers on,
then runs their backward passes; the last rank gives them to every rank.
The forward passes wait for each other then; the backward passes do not.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

from ..balance import bounds, rank_slice
from ..comm.ordered import OrderedSum
from ..parallel.evaluation import chunk_row
from ..parallel.reproducible import EVAL_CHUNK, eval_chunks, gathered_sums, on_shm
from ..runtime import MpitrainError
from ..threads import one_blas_thread
from ..timeline import span
from .at_once import AtOnce
from .broadcast import broadcast_tensors

__all__ = ["TorchGroups", "deterministic", "seed_for", "seed_torch"]

_K = (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9)


def seed_torch(seed: int, device: torch.device) -> None:
    """Seed the generator that draws on ``device`` (the CPU's, or that GPU's): not
    ``torch.manual_seed``, which also queues a seeding of every CUDA device."""
    if device.type == "cuda":
        torch.cuda.default_generators[device.index or 0].manual_seed(seed)
    else:
        torch.default_generator.manual_seed(seed)


def seed_for(*keys: int) -> int:
    """A 63-bit seed for torch's generator mixed from ``keys``: (seed, step, the first
    global sample id of the rows it draws for), whichever rank computes them."""
    z = 0
    for k in keys:
        z = ((z ^ (int(k) & (2 ** 64 - 1))) * _K[0]) & (2 ** 64 - 1)
        z ^= z >> 31
        z = (z * _K[1]) & (2 ** 64 - 1)
    return z >> 1


@contextmanager
def deterministic() -> Iterator[None]:
    """One torch thread and deterministic algorithms for the block (restored after); an
    operation without a deterministic implementation raises an ``MpitrainError`` naming
    it."""
    threads, was = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    # NaN in every new tensor finds code that reads memory it never wrote; the models'
    # operations write what they read, and the fill costs a pass over each allocation.
    torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        with one_blas_thread():
            yield
    except RuntimeError as exc:
        if "deterministic" not in str(exc):
            raise
        raise MpitrainError("{reproducible}: the model uses an operation with no "
                            f"deterministic implementation: {str(exc).splitlines()[0]}") from None
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = fill
        torch.use_deterministic_algorithms(was)
        torch.set_num_threads(threads)


class TorchGroups:
    """The grouped step and evaluation of a ``TorchTrainer``, ``groups`` groups a batch."""

    def __init__(self, trainer, groups: int):
        self.trainer, self.groups, self.comm = trainer, groups, trainer.comm
        self.sum = OrderedSum(self.comm, trainer.grads.size, trainer.model.dtype)
        # With shm on one node: the sum adds from the ranks' segments (comm.ordered), and
        # a sharded update (torch.owned) needs only each rank's shares.
        self.on_shm, _ = on_shm(trainer.exchange, trainer.clip_grad_norm is not None)
        # Buffers that training changes, passed from rank to rank in group order.
        self.has_buffers = any(b.numel() for b in trainer.torch_model.buffers())
        # A run of a rank's groups through the model at once where the bits allow it.
        self.at_once = AtOnce(trainer.torch_model, trainer.grads.params, trainer.grads.offsets)

    @property
    def buffers(self) -> List[torch.Tensor]:
        """The model's buffers now (``_fresh_buffers`` replaces them)."""
        return [b for b in self.trainer.torch_model.buffers() if b.numel()]

    def _fresh_buffers(self) -> None:
        """Each buffer a copy of itself: the next forward pass updates the copy in place,
        while the passes before keep, for their backward, the values they read."""
        for module in self.trainer.torch_model.modules():
            for name, b in module._buffers.items():
                if b is not None and b.numel():
                    module._buffers[name] = b.clone()

    def step(self, step: int, stop: bool) -> Tuple[float, Dict[str, object], int]:
        """One step of the trainer, bit-identical at any rank count."""
        tr = self.trainer
        t0 = time.perf_counter()
        with span("data", "data"):
            ids, x, y, batch = tr.batches.get(step)
        t1 = time.perf_counter()
        tr.on_phase("computing")
        first, last = rank_slice(self.groups, tr.rank, tr.size)
        cuts = bounds(batch, self.groups)
        rows = np.zeros((last - first, 2 + tr.task.width))
        home = tr.model.grads
        self.sum.start(cuts)
        tr.torch_model.train()
        try:
            with deterministic(), np.errstate(over="ignore", invalid="ignore"):
                self._groups(step, cuts, first, last, ids, x, y, batch, rows, home)
        finally:
            tr.grads.bind(tr.exchange.buffer)
        if stop and last > first:
            rows[0, 1] = 1.0
        t2 = time.perf_counter()
        tr.on_phase("exchange")
        with span("ordered sum", "exchange", groups=last - first):
            self.sum.finish(home, **self.on_shm)
            sums = gathered_sums(self.comm, rows, self.groups)
        return tr._conclude(step, batch, sums, (t0, t1, t2, time.perf_counter()))

    def _groups(self, step, cuts, first, last, ids, x, y, batch, rows, home) -> None:
        """Forward every non-empty group of this rank (the buffers handed on in group
        order), then backward each into where ``OrderedSum`` places it."""
        tr = self.trainer
        if self.has_buffers:
            self._receive_buffers()
        run = [(g, cuts[g] - cuts[first], cuts[g + 1] - cuts[first])
               for g in range(first, last) if cuts[g + 1] > cuts[g]]
        sizes = [hi - lo for _, lo, hi in run]
        fits = not self.has_buffers and self.at_once.known(sizes)  # (buffers: in turn)
        if fits is None:
            fits = self._check_at_once(step, run, ids, x, y, batch)
        if fits and self._run_at_once(step, first, run, ids, x, y, batch, rows, home):
            return
        if fits:  # the model took another path this time: group by group from now on
            self.at_once.shapes[tuple(sizes)] = False
        losses: List[torch.Tensor] = []
        for g, lo, hi in run:
            if self.has_buffers and losses:
                self._fresh_buffers()
            seed_torch(seed_for(tr.seed, step, int(ids[lo])), tr.device)
            with span("forward", "compute", samples=hi - lo):
                out = tr.torch_model(torch.from_numpy(x[lo:hi]).to(tr.device))
                losses.append(self._share(out, y[lo:hi], batch, rows[g - first]))
        if self.has_buffers:
            self._fresh_buffers()  # the last pass keeps what it read, too
            self._pass_buffers()
        for loss in losses:
            into, add = self.sum.place(home)
            self._backward(loss, into, add)

    def _share(self, out: torch.Tensor, y: np.ndarray, batch: int,
               row: Optional[np.ndarray] = None) -> torch.Tensor:
        """A group's share of the step's mean loss (its own mean x its rows / ``batch``);
        with ``row``, its loss sum and task sums written there for the step's record."""
        tr = self.trainer
        loss = tr.loss_fn(out, tr.loss.targets(y))
        if row is not None:
            row[0] = float(loss.detach()) * len(y)
            row[2:] = tr.task.sums(out.detach().cpu().numpy(), y)
        return loss * (len(y) / batch)

    def _run_at_once(self, step, first, run, ids, x, y, batch, rows, home) -> bool:
        """Forward the rank's groups ``run`` (g, lo, hi) at once, then backward, each
        group's gradients into where ``OrderedSum`` places it (``torch.at_once``); False
        (nothing placed) if the model took an input the path does not take."""
        tr = self.trainer
        start, end = run[0][1], run[-1][2]
        seed_torch(seed_for(tr.seed, step, int(ids[start])), tr.device)
        tr.grads.begin(reporting=False)
        with span("forward", "compute", samples=end - start):
            out, plan = self.at_once.forward(
                torch.from_numpy(x[start:end]).to(tr.device),
                [lo - start for _, lo, _ in run] + [end - start])
            if plan.unfit:
                return False
            losses = [self._share(part, y[lo:hi], batch, rows[g - first]) for (g, lo, hi), part
                      in zip(run, out.split([hi - lo for _, lo, hi in run]))]
        plan.set_places([self.sum.place(home) for _ in run])
        for p in tr.grads.params:
            p.grad = None
        with span("backward", "compute"):
            torch.autograd.backward(losses)
        if any(tr.grads.fired):  # reached outside its Linear (the check saw it never)
            raise MpitrainError(f"{{reproducible}}: step {step}: a parameter got a gradient "
                                "outside its Linear module's pass, which computing the "
                                "groups at once does not add in group order (set "
                                "MPITRAIN_GROUPS_AT_ONCE=0)")
        plan.zero_unreached(self.at_once.params)
        return True

    def _check_at_once(self, step, run, ids, x, y, batch) -> bool:
        """Whether a run shaped as ``run`` keeps every row's bits at once (checked on
        random rows of its shape and on the step's, with the step's targets, once per
        shape)."""
        tr = self.trainer
        tr.grads.begin(reporting=False)
        sizes = [hi - lo for _, lo, hi in run]
        start = run[0][1]
        gen = torch.Generator().manual_seed(len(sizes) * 1000003 + sum(sizes))
        rand = torch.randn((sum(sizes), *x.shape[1:]), generator=gen,
                           dtype=self.at_once.params[0].dtype).to(tr.device)

        def loss(out, lo, hi):
            return self._share(out, y[start + lo:start + hi], batch)

        def seed(g):
            seed_torch(seed_for(tr.seed, step, int(ids[run[g][1]])), tr.device)

        real = torch.from_numpy(x[start:run[-1][2]]).to(tr.device)
        with span("check at once", "compute", groups=len(sizes)):
            return self.at_once.check(sizes, [rand, real], loss, seed)

    def _backward(self, loss: torch.Tensor, into: np.ndarray, add: bool) -> None:
        """Backward of one group's loss into ``into``: added to what is there, or (not
        ``add``) autograd's own tensors copied in (unreached parameters zero)."""
        grads = self.trainer.grads
        grads.bind(into)
        grads.begin(reporting=False)
        if not add:
            for p in grads.params:
                p.grad = None
        with span("backward", "compute"):
            loss.backward()
        for i, p in enumerate(grads.params):
            if not grads.fired[i]:  # this group's gradient is +0.0: the node is left + 0.0
                if add:
                    grads.views[i].add_(0.0)  # (-0.0 + 0.0 is +0.0, as the sum elsewhere)
                else:
                    grads.views[i].zero_()
                p.grad = grads.views[i]

    def _receive_buffers(self) -> None:
        """The buffers as the groups before this rank's left them (from rank - 1)."""
        if self.trainer.rank > 0:
            self._transfer(lambda flat: self.comm.Recv(flat, source=self.trainer.rank - 1))

    def _pass_buffers(self) -> None:
        """Hand the buffers on to rank + 1; the last rank gives them to every rank."""
        rank, size = self.trainer.rank, self.trainer.size
        if rank < size - 1:
            self._transfer(lambda flat: self.comm.Send(flat, dest=rank + 1), write=False)
        broadcast_tensors(self.buffers, size - 1, self.comm)

    def _transfer(self, move, write: bool = True) -> None:
        """``move`` each type's buffers as one flat array (received: written back)."""
        by_dtype: Dict[torch.dtype, List[torch.Tensor]] = {}
        for b in self.buffers:
            by_dtype.setdefault(b.dtype, []).append(b)
        for group in by_dtype.values():
            flat = torch.cat([b.detach().reshape(-1).cpu() for b in group])
            move(flat.numpy())
            if write:
                offset = 0
                with torch.no_grad():
                    for b in group:
                        b.copy_(flat[offset:offset + b.numel()].view_as(b))
                        offset += b.numel()

    def evaluate(self) -> Optional[Dict[str, object]]:
        """Evaluation over fixed chunks of ``EVAL_CHUNK`` rows, added in chunk order."""
        tr = self.trainer
        plan = eval_chunks(tr)
        if plan is None:
            return None
        n, chunks, first, last, rows = plan
        with deterministic():
            for c in range(first, last):
                x, y = tr.val.read_range(c * EVAL_CHUNK, min(n, (c + 1) * EVAL_CHUNK))
                rows[c - first] = chunk_row(tr.forward(x), y, tr.loss, tr.task)
        return tr._evaluated(gathered_sums(self.comm, rows, chunks), n)

