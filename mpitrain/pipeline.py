"""Pipeline model parallelism: stages of layers on different ranks, micro-batches between them.

The model's layers are cut into ``grid.pp`` contiguous stages; each rank
holds only its stage's parameters, gradients and optimizer state.  Each
data-parallel replica (``grid.dp_rank``) takes its slice of the global batch
and cuts it into ``M`` micro-batches, which travel forward (activations) and
backward (gradients) between neighbouring stages by buffer-based
point-to-point messages on ``grid.pp_comm``.  After the last backward pass
each stage sums its gradients over its replicas (``grid.dp_comm``).

Point-to-point verbs are named from the stage's side, as in Megatron-LM:
``recv_forward``, ``send_forward``, ``recv_backward``, ``send_backward``.
A message's tag is ``2 k`` (activation) or ``2 k + 1`` (gradient) for
micro-batch ``k``, and MPI keeps messages between two ranks in order, so
micro-batches cannot be confused.
"""
from __future__ import annotations

import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from mpi4py import MPI

from .config import CHOICES, MAX_MICROBATCHES
from .data import Sampler, Shards, rank_slice
from .exchange import make_exchange
from .nn import Layer, Linear, Sequential, saved_bytes
from .optim import make_optimizer
from .runtime import MpitrainError
from .topology import Grid
from .trainer import TrainerBase

__all__ = ["units", "partition", "stage_ranges", "PipelineTrainer", "SCHEDULES", "bubble"]

SCHEDULES = CHOICES["schedule"]


def units(layers: Sequence[Layer]) -> List[Tuple[int, int]]:
    """The layers grouped as [start, end): each Linear with the activations after it."""
    starts = [i for i, layer in enumerate(layers) if isinstance(layer, Linear)]
    if not starts or starts[0] != 0:
        raise ValueError("a pipelined model must start with a Linear layer")
    return list(zip(starts, starts[1:] + [len(layers)]))


def partition(weights: Sequence[int], stages: int) -> List[int]:
    """How many consecutive items each of ``stages`` parts takes, each at least one,
    minimising the heaviest part's total weight (ties: earlier parts lighter)."""
    n = len(weights)
    if not 1 <= stages <= n:
        raise ValueError(f"cannot cut {n} layers into {stages} stages")
    prefix = np.concatenate([[0], np.cumsum(weights)])
    # best[s][i]: the lightest heaviest part for the first i items in s parts.
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0
    for s in range(1, stages + 1):
        for i in range(s, n + 1):
            for j in range(s - 1, i):
                cost = max(best[s - 1][j], prefix[i] - prefix[j])
                if cost < best[s][i]:
                    best[s][i], cut[s][i] = cost, j
    counts, i = [], n
    for s in range(stages, 0, -1):
        counts.append(i - cut[s][i])
        i = cut[s][i]
    return counts[::-1]


def stage_ranges(layers: Sequence[Layer], stages: int,
                 counts: Optional[Sequence[int]] = None) -> List[Tuple[int, int]]:
    """The [start, end) layer range of each stage, balanced by parameter count
    unless ``counts`` (Linear layers per stage, ``--stage-layers``) is given."""
    groups = units(layers)
    if stages > len(groups):
        raise MpitrainError(f"--pp {stages}: more pipeline stages than the model's "
                            f"{len(groups)} Linear layers", everywhere=True)
    if counts is None:
        weights = [sum(np.prod(s) for layer in layers[a:b] for s in layer.shapes().values())
                   for a, b in groups]
        counts = partition(weights, stages)
    elif len(counts) != stages or sum(counts) != len(groups) or min(counts) < 1:
        raise MpitrainError(f"--stage-layers {','.join(map(str, counts))}: expected {stages} "
                            f"counts >= 1 adding up to the model's {len(groups)} Linear "
                            f"layers", everywhere=True)
    ranges, k = [], 0
    for count in counts:
        ranges.append((groups[k][0], groups[k + count - 1][1]))
        k += count
    return ranges


def bubble(stages: int, microbatches: int) -> float:
    """The idle share of a GPipe/1F1B step in theory: (p - 1) / (m + p - 1)."""
    return (stages - 1) / (microbatches + stages - 1)


class PipelineTrainer(TrainerBase):
    """Pipeline (and data) parallel training on a ``Grid``.

    ``layers`` is the whole model; this rank builds only its stage, with the
    same names and initial values it has in the whole model.
    """

    def __init__(self, layers: Sequence[Layer], grid: Grid, loss, optimizer_name: str,
                 opt_args: Dict[str, Any], train: Shards, sampler: Sampler, *,
                 microbatches: int, schedule: str = "1f1b", allreduce: str = "mpi",
                 val: Optional[Shards] = None, dtype="float32", seed: int = 0,
                 stage_layers: Optional[Sequence[int]] = None, grad_dtype: Optional[str] = None):
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if not 1 <= microbatches <= MAX_MICROBATCHES:
            raise MpitrainError(f"--microbatches must be in 1..{MAX_MICROBATCHES}, got "
                                f"{microbatches}", everywhere=True)
        self.grid, self.loss, self.sampler = grid, loss, sampler
        self.train, self.val = train, val
        self.microbatches, self.schedule = microbatches, schedule
        self.ranges = stage_ranges(layers, grid.pp, stage_layers)
        a, b = self.ranges[grid.pp_rank]
        self.model = Sequential(layers[a:b], dtype=dtype, seed=seed, index=range(a, b))
        self.shapes, self.stage_names = {}, []
        for lo, hi in self.ranges:  # every stage's names and shapes, without building it
            names = []
            for i in range(lo, hi):
                for key, shape in layers[i].shapes().items():
                    self.shapes[f"{i}.{key}"] = tuple(shape)
                    names.append(f"{i}.{key}")
            self.stage_names.append(names)
        linears = [layer for layer in layers[a:b] if isinstance(layer, Linear)]
        self.in_width, self.out_width = linears[0].in_features, linears[-1].out_features
        self.exchange = make_exchange(allreduce, grid.dp_comm, grad_dtype, self.model.size,
                                      self.model.dtype)
        if allreduce == "shm":  # it sums in place in its shared buffer
            self.model.bind_grads(self.exchange.buffer)
        self.optimizer = make_optimizer(optimizer_name, self.model.params, self.model.grads,
                                        **opt_args)
        self.metrics = np.zeros(3)  # loss sum, correct count, stop requests; over the world
        # Receive buffers: a pool of activation slots (one per micro-batch that can be
        # alive at once on this stage) and one gradient buffer; views of them are used.
        per_replica = -(-sampler.batch_size // grid.dp)  # ceil: the largest replica part
        rows = -(-per_replica // microbatches)  # ... and its largest micro-batch
        alive = microbatches if schedule == "gpipe" else min(microbatches,
                                                             grid.pp - grid.pp_rank)
        self.slots = alive
        dt = self.model.dtype
        self.act_pool = np.empty((alive, rows, self.in_width), dt) if grid.pp_rank else None
        self.grad_buf = np.empty((rows, self.out_width), dt) if not grid.is_last_stage else None
        self._sends: List[Tuple[MPI.Request, np.ndarray]] = []  # (request, its buffer)
        self.peak_activation_bytes = 0  # of saved activations, over all steps so far
        self.peak_alive = 0  # micro-batches whose activations were held at once
        self._init_common()
        self.times["wait"] = 0.0  # blocked in recv_forward / recv_backward: the bubble

    def close(self) -> None:
        """Free the exchange's window (shm) and the grid's communicators (collective)."""
        if hasattr(self.exchange, "close"):  # shm: the gradients live in its window
            self._keep_arrays()
            self.exchange.close()
        self.grid.free()

    def describe(self) -> str:
        """One line per stage: its layers and parameter count."""
        lines = []
        for s, (a, b) in enumerate(self.ranges):
            count = sum(int(np.prod(self.shapes[n])) for n in self.stage_names[s])
            span = f"layer {a}" if b - a == 1 else f"layers {a}-{b - 1}"
            lines.append(f"stage {s}: {span}, {count:,} parameters")
        return "; ".join(lines)

    # -- point-to-point verbs, named from this stage's side -------------------------------
    def recv_forward(self, k: int, rows: int) -> np.ndarray:
        """The activation of micro-batch ``k`` from the previous stage, (rows, in_width)."""
        buf = self.act_pool[k % self.slots, :rows]
        t0 = time.perf_counter()
        self.grid.pp_comm.Recv(buf, source=self.grid.prev_rank, tag=2 * k)
        self.times["wait"] += time.perf_counter() - t0
        return buf

    def _isend(self, buf: np.ndarray, dest: int, tag: int) -> None:
        """Isend ``buf``, kept alive until sent; buffers already sent are let go, so a
        stage holds only what is in flight, not every micro-batch's output."""
        self._sends = [(r, b) for r, b in self._sends if not r.Test()]
        buf = np.ascontiguousarray(buf)
        self._sends.append((self.grid.pp_comm.Isend(buf, dest=dest, tag=tag), buf))

    def send_forward(self, k: int, y: np.ndarray) -> None:
        """Send micro-batch ``k``'s output (rows, out_width) to the next stage."""
        self._isend(y, self.grid.next_rank, 2 * k)

    def recv_backward(self, k: int, rows: int) -> np.ndarray:
        """dL/d(output) of micro-batch ``k`` from the next stage, (rows, out_width)."""
        buf = self.grad_buf[:rows]
        t0 = time.perf_counter()
        self.grid.pp_comm.Recv(buf, source=self.grid.next_rank, tag=2 * k + 1)
        self.times["wait"] += time.perf_counter() - t0
        return buf

    def send_backward(self, k: int, dx: np.ndarray) -> None:
        """Send dL/d(input) of micro-batch ``k`` (rows, in_width) to the previous stage."""
        self._isend(dx, self.grid.prev_rank, 2 * k + 1)

    # -- one micro-batch -------------------------------------------------------------------
    def _forward(self, k: int) -> None:
        lo, hi = self._parts[k]
        if self.grid.is_first_stage:
            x = self._x[lo:hi]
        else:
            x = self.recv_forward(k, hi - lo)
        self.on_phase("computing")
        with np.errstate(over="ignore", invalid="ignore"):
            out, saved = self.model.forward(x)
            if self.grid.is_last_stage:
                y = self._y[lo:hi]
                loss_sum, dout = self.loss(out, y, 1.0 / self._batch)
                self.metrics[0] += loss_sum
                self.metrics[1] += np.count_nonzero(out.argmax(axis=1) == y)
                saved = (saved, dout)
            else:
                self.send_forward(k, out)
        self._alive[k] = saved
        self._held += saved_bytes(saved)
        self.peak_activation_bytes = max(self.peak_activation_bytes, self._held)
        self.peak_alive = max(self.peak_alive, len(self._alive))

    def _backward(self, k: int) -> None:
        lo, hi = self._parts[k]
        saved = self._alive.pop(k)
        self._held -= saved_bytes(saved)
        if self.grid.is_last_stage:
            saved, dy = saved
        else:
            dy = self.recv_backward(k, hi - lo)
        self.on_phase("computing")
        first = self.grid.is_first_stage
        with np.errstate(over="ignore", invalid="ignore"):
            # Micro-batch 0 overwrites the gradients, later ones add to them, in the
            # same order under both schedules, so both give the same bits.
            dx = self.model.backward(dy, saved, need_dx=not first, accumulate=k > 0)
        if not first:
            self.send_backward(k, dx)

    # -- the schedules ----------------------------------------------------------------------
    def gpipe(self) -> None:
        """All forward passes, then all backward passes (M activations alive)."""
        for k in range(self.microbatches):
            self._forward(k)
        for k in range(self.microbatches):
            self._backward(k)

    def one_f_one_b(self) -> None:
        """1F1B: at most (stages - stage index) micro-batches alive on this stage."""
        m = self.microbatches
        warmup = min(self.grid.pp - self.grid.pp_rank - 1, m)
        # Run warm-up forward passes.
        for k in range(warmup):
            self._forward(k)
        # Run 1F1B in steady state: one forward, then the oldest backward.
        for i in range(m - warmup):
            self._forward(warmup + i)
            self._backward(i)
        # Run cool-down backward passes.
        for i in range(m - warmup, m):
            self._backward(i)

    def step(self, step: int, stop: bool = False) -> Tuple[float, float, int]:
        """Run global step ``step`` (0-based); return (mean loss, accuracy, global batch)."""
        g = self.grid
        t0 = time.perf_counter()
        ids, self._batch = self.sampler.local(step, g.dp_rank, g.dp)
        self._parts = [rank_slice(len(ids), k, self.microbatches)
                       for k in range(self.microbatches)]
        self.on_phase("reading data")
        if g.is_first_stage:  # (b, features), (b,)
            self._x, self._y = self.train.read(ids)
        elif g.is_last_stage:
            self._y = self.train.read_labels(ids)  # (b,)
        t1 = time.perf_counter()
        self.metrics[:] = 0
        self._alive: Dict[int, Any] = {}
        self._held = 0  # bytes saved by the micro-batches in _alive
        wait0 = self.times["wait"]
        (self.gpipe if self.schedule == "gpipe" else self.one_f_one_b)()
        MPI.Request.Waitall([r for r, _ in self._sends])
        self._sends.clear()
        t2 = time.perf_counter()
        self.on_phase("exchange")
        if g.dp > 1:
            self.exchange(self.model.grads)
        self.metrics[2] = 1.0 if stop else 0.0
        g.world.Allreduce(MPI.IN_PLACE, self.metrics, op=MPI.SUM)
        return self._conclude(step, self._batch, self.metrics,
                              (t0, t1, t2, time.perf_counter()), self.times["wait"] - wait0)

    def evaluate(self, chunk: int = 4096) -> Optional[Tuple[float, float]]:
        """(mean loss, accuracy) on the validation split through the pipeline (collective)."""
        if self.val is None or len(self.val) == 0:
            return None
        g = self.grid
        self.on_phase("evaluation")
        lo, hi = rank_slice(len(self.val), g.dp_rank, g.dp)
        sums = np.zeros(2)
        buf = np.empty((min(chunk, max(hi - lo, 1)), self.in_width), self.model.dtype)
        sending: List[Tuple[MPI.Request, np.ndarray]] = []
        for k, a in enumerate(range(lo, hi, chunk)):
            b = min(hi, a + chunk)
            ids = np.arange(a, b)
            if g.is_first_stage:
                x, y = self.val.read(ids)
            else:
                x = buf[:b - a]
                g.pp_comm.Recv(x, source=g.prev_rank, tag=2 * k)
            out = self.model(x)
            if g.is_last_stage:
                if not g.is_first_stage:
                    y = self.val.read_labels(ids)
                sums += (self.loss(out, y, 1.0)[0], np.count_nonzero(out.argmax(axis=1) == y))
            else:
                MPI.Request.Waitall([r for r, _ in sending])  # one chunk in flight at a time
                out = np.ascontiguousarray(out)
                sending = [(g.pp_comm.Isend(out, dest=g.next_rank, tag=2 * k), out)]
        MPI.Request.Waitall([r for r, _ in sending])
        g.world.Allreduce(MPI.IN_PLACE, sums, op=MPI.SUM)  # only last stages hold sums
        return sums[0] / len(self.val), sums[1] / len(self.val)
