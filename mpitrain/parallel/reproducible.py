"""Bit-identical training at any number of ranks (``--reproducible``).

Each global batch is cut into ``G`` fixed groups (``rank_slice`` of the
batch); rank r of p computes groups ``rank_slice(G, r, p)``, each on its own
with the same shapes whatever rank holds it, so each group's gradient has
the same bits at any rank count.  The groups' gradients are then added in
one fixed order (``comm.ordered``: a tree over the groups, each rank adding
its subtrees), and the groups' loss and metric sums gathered and added in
group order.  The
optimizer then sees the same summed gradient, bit for bit, at 1, 2, 3 or 4
ranks; so does evaluation, over fixed chunks of the validation split.  Both run
at one BLAS thread (``threads.one_blas_thread``): a product's bits depend on the
thread count, and one rank alone would otherwise use every core of its node.
"""
from __future__ import annotations

import copy
import math
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from functools import partial
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from mpi4py import MPI

from ..balance import bounds, rank_slice
from ..comm.ordered import OrderedSum
from ..model.layers import Context
from ..model.sequential import Sequential
from ..threads import one_blas_thread
from ..timeline import span
from .batched import AtOnce, compute_at_once
from .evaluation import chunk_row

__all__ = ["GroupedSteps", "EVAL_CHUNK", "gathered_sums", "norm_sq_by_tensor", "eval_chunks"]

EVAL_CHUNK = 1024  # validation rows per fixed chunk


def gathered_sums(comm: MPI.Comm, rows: np.ndarray, total: int) -> np.ndarray:
    """Every rank's ``rows`` (its ``rank_slice`` of ``total`` groups' or chunks' float64
    vectors, in order), gathered everywhere and added column by column in order with
    fsum."""
    width = rows.shape[1]
    cuts = [c * width for c in bounds(total, comm.Get_size())]  # where each rank's rows go
    counts = [b - a for a, b in zip(cuts, cuts[1:])]
    every = np.empty((total, width))
    comm.Allgatherv(np.ascontiguousarray(rows), [every, (counts, cuts[:-1])])
    return np.array([math.fsum(every[:, j]) for j in range(width)])


def norm_sq_by_tensor(grads: np.ndarray, segments) -> np.ndarray:
    """Each tensor's squared L2 norm in float64, added block by block from the tensor's
    start through one scratch buffer: the same bits whichever stage's buffer holds it
    (numpy's pairwise sum, no BLAS threads)."""
    block = 1 << 16
    scratch = np.empty(min(block, max([b - a for a, b in segments] + [1])))
    out = np.zeros(len(segments))
    for k, (a, b) in enumerate(segments):
        for lo in range(a, b, block):
            t = scratch[:min(b, lo + block) - lo]
            np.multiply(grads[lo:lo + len(t)], grads[lo:lo + len(t)], out=t, dtype=np.float64)
            out[k] += float(t.sum())
    return out


def eval_chunks(tr) -> Optional[Tuple[int, int, int, int, np.ndarray]]:
    """A reproducible evaluation's plan on this rank of ``tr`` (a trainer): (rows, fixed
    chunks, this rank's first and last chunk, their zeroed float64 rows); None without a
    validation split."""
    if tr.val is None or len(tr.val) == 0:
        return None
    tr.on_phase("evaluation")
    n = len(tr.val)
    chunks = -(-n // EVAL_CHUNK)
    first, last = rank_slice(chunks, tr.rank, tr.size)
    return n, chunks, first, last, np.zeros((last - first, 1 + tr.task.width))


def on_shm(exchange, whole: bool) -> Tuple[Dict[str, object], List[Tuple[int, int]]]:
    """How ``OrderedSum.finish`` sums into ``exchange``'s buffer, and the shares of it
    whose sums a sharded update needs here: with ``shm`` on one node, from the ranks'
    segments, gathered if the update is not sharded or the clipping norm needs the
    ``whole`` sum (``comm.ordered``)."""
    shm = exchange.blocking
    if shm.name != "shm":
        return {}, []
    me = shm.local_rank
    shares = [(e[me], e[me + 1]) for e in (shm.bounds(lo, hi) for lo, hi in exchange.buckets)
              ] if exchange.sharded else []
    if shm.cross.Get_size() > 1:  # MPI's path across nodes: the whole sum everywhere
        return {}, shares
    return dict(shm=shm, buckets=exchange.buckets, gather=whole or not exchange.sharded), shares


class GroupedSteps:
    """The grouped step and evaluation of a data-parallel ``trainer``, with ``groups``
    groups per batch."""

    def __init__(self, trainer, groups: int):
        self.trainer, self.groups = trainer, groups
        self.comm = trainer.comm
        self.sum = OrderedSum(self.comm, trainer.model.size, trainer.model.dtype)
        self.on_shm, self.shares = on_shm(trainer.exchange, trainer.clip_grad_norm is not None)
        self._copies: List[Sequential] = []  # the model, for each thread but the first
        self._pool: Optional[ThreadPoolExecutor] = None
        self._workers = 0  # the pool's threads
        # Runs of groups at once where rows keep their bits (--accumulate: a group's
        # activations at a time, as asked)
        self.at_once = AtOnce(enabled=trainer.accumulate == 1)

    def step(self, step: int, stop: bool) -> Tuple[float, Dict[str, object], int]:
        """One step of ``trainer`` (see ``Trainer.step``), bit-identical at any rank count."""
        with one_blas_thread() as cores:  # the products' bits depend on the BLAS's threads
            return self._step(step, stop, cores)

    def evaluate(self) -> Optional[Dict[str, object]]:
        """Evaluation over fixed chunks of ``EVAL_CHUNK`` rows, summed in chunk order."""
        with one_blas_thread() as cores:
            return self._evaluate(cores)

    def _models(self, threads: int) -> List[Sequential]:
        """The model for each of ``threads`` threads: the trainer's, then copies of it
        (their own gradient views) that read the trainer's parameters."""
        model = self.trainer.model
        while len(self._copies) < threads - 1:
            twin = copy.deepcopy(model)  # then views only (below): its arrays are let go
            twin.bind_grads(model.grads)
            self._copies.append(twin)
        if threads - 1 > self._workers:  # (the first use may have needed fewer)
            if self._pool is not None:
                self._pool.shutdown()
            self._pool, self._workers = ThreadPoolExecutor(
                threads - 1, thread_name_prefix="groups"), threads - 1
        for c in self._copies[:threads - 1]:
            c.bind_params(model.params)  # a view: whatever the optimizer or a resume wrote
        return [model, *self._copies[:threads - 1]]

    def _at_once(self, work: Sequence[Callable[[Sequential], None]]) -> None:
        """Run ``work[k](model k)``, the first here and the others on the pool's threads
        at the same time; every one has ended when this returns (or raises)."""
        models = self._models(len(work))
        futures: List[Future] = []
        try:
            futures += [self._pool.submit(w, m) for w, m in zip(work[1:], models[1:])]
            work[0](models[0])
        finally:
            wait(futures)
        for f in futures:
            f.result()

    def _step(self, step: int, stop: bool, cores: int) -> Tuple[float, Dict[str, object], int]:
        tr, comm = self.trainer, self.comm
        t0 = time.perf_counter()
        with span("data", "data"):
            ids, x, y, batch = tr.batches.get(step)
        t1 = time.perf_counter()
        tr.on_phase("computing")
        first, last = rank_slice(self.groups, tr.rank, tr.size)
        cuts = bounds(batch, self.groups)
        rows = np.zeros((last - first, 2 + tr.task.width))  # each group's metric sums
        home = tr.model.grads  # the exchange's buffer, which the optimizer reads
        self.sum.start(cuts)
        # The rank's cores compute its non-empty groups at once, a contiguous run each
        # (one BLAS thread apiece: the same bits as one after the other), each run's
        # groups where OrderedSum places them for that run.
        mine = [g for g in range(first, last) if cuts[g + 1] > cuts[g]]
        threads = max(1, min(cores, len(mine)))
        runs = [mine[a:b] for a, b in (rank_slice(len(mine), k, threads)
                                       for k in range(threads))]
        placed = {g: self.sum.place(home, run=k) for k, run in enumerate(runs)
                  for g in run}

        def compute(run: List[int], model: Sequential) -> None:
            if self._run_at_once(step, run, model, cuts, first, ids, x, y, batch, rows, placed):
                return
            for g in run:
                lo, hi = cuts[g] - cuts[first], cuts[g + 1] - cuts[first]
                into, add = placed[g]
                model.bind_grads(into)
                tr._compute(step, ids[lo:hi], x[lo:hi], y[lo:hi], batch, rows[g - first],
                            None, pieces=1, add=add, model=model)

        try:
            self._at_once([partial(compute, run) for run in runs])
        finally:
            tr.model.bind_grads(home)
        if stop and last > first:
            rows[0, 1] = 1.0
        t2 = time.perf_counter()
        tr.on_phase("exchange")
        with span("ordered sum", "exchange", groups=last - first):
            self.sum.finish(tr.model.grads, **self.on_shm)
            tr.exchange.owned[:] = self.shares  # a sharded update's: what shm sums here
            sums = gathered_sums(comm, rows, self.groups)
        return tr._conclude(step, batch, sums, (t0, t1, t2, time.perf_counter()))

    def _run_at_once(self, step: int, run: List[int], model: Sequential, cuts: Sequence[int],
                     first: int, ids: np.ndarray, x: np.ndarray, y: np.ndarray, batch: int,
                     rows: np.ndarray, placed: Dict[int, Tuple[np.ndarray, bool]]) -> bool:
        """Compute the groups ``run`` at once (``parallel.batched``) if every row keeps its
        bits that way; False (nothing done) if they must go one by one."""
        tr = self.trainer
        lo, hi = cuts[run[0]] - cuts[first], cuts[run[-1] + 1] - cuts[first]  # the run's rows
        at = [cuts[g] - cuts[run[0]] for g in run] + [hi - lo]  # its groups' cuts (non-empty)
        group = dict(zip(at, run))

        def context(a: int, b: int) -> Context:
            return Context(training=True, step=step, ids=ids[lo + a:lo + b], seed=tr.seed)

        def loss_grad(a: int, b: int, out: np.ndarray) -> np.ndarray:  # as Computing._compute
            metrics = rows[group[a] - first]
            metrics[:] = 0
            return tr._loss_grad(out, y[lo + a:lo + b], batch, metrics)

        plan = self.at_once.plan(model, x[lo:hi], context, at)
        if plan is None:
            return False
        with np.errstate(over="ignore", invalid="ignore"):  # a diverged loss is caught later
            took = compute_at_once(model, x[lo:hi], context, at, [placed[g] for g in run],
                                   loss_grad, plan)
        tr.peak_activation_bytes = max(tr.peak_activation_bytes, took[2])
        return True

    def _evaluate(self, cores: int) -> Optional[Dict[str, object]]:
        tr = self.trainer
        plan = eval_chunks(tr)
        if plan is None:
            return None
        n, chunks, first, last, rows = plan
        threads = max(1, min(cores, last - first))

        def chunk(c: int, x: np.ndarray, y: np.ndarray, model: Sequential) -> None:
            rows[c - first] = chunk_row(model(x), y, tr.loss, tr.task)

        for a in range(first, last, threads):  # read here (the reader is not thread-safe),
            read = [(c, *tr.val.read_range(c * EVAL_CHUNK, min(n, (c + 1) * EVAL_CHUNK)))
                    for c in range(a, min(last, a + threads))]  # computed at once
            self._at_once([partial(chunk, *part) for part in read])
        return tr._evaluated(gathered_sums(self.comm, rows, chunks), n)
