"""Pipeline model parallelism: one stage of layers per rank, micro-batches between stages.

The model's layers are cut into ``grid.pp`` contiguous stages (``partition.py``); each rank
holds only its stage's parameters, gradients and optimizer state.  Each data-parallel
replica (``grid.dp_rank``) takes its slice of the global batch and cuts it into ``M``
micro-batches, which travel forward (activations) and backward (gradients) between
neighbouring stages by buffer-based point-to-point messages on ``grid.pp_comm``, in the
order a schedule (``schedules.py``) gives.  After the last backward pass each stage sums its
gradients over its replicas (``grid.dp_comm``) through the same ``Exchange`` the
data-parallel trainer uses.  With ``accumulate`` K the replica's part is first cut into K
chunks, run one after the other, each its M micro-batches through the schedule: a stage
holds one chunk's activations at a time, and the gradients add up over all K x M
micro-batches. With ``groups`` (``--reproducible``) the micro-batches are the replica's
fixed groups (``parallel.reproducible``), added along one fixed tree over the replicas
(``comm.ordered``), so the stages end with the bits of any other layout.

Point-to-point verbs are named from the stage's side, as in Megatron-LM:
``recv_forward``, ``send_forward``, ``recv_backward``, ``send_backward``.
A message's tag is ``2 k`` (activation) or ``2 k + 1`` (gradient) for
micro-batch ``k``, and MPI keeps messages between two ranks in order, so
micro-batches cannot be confused.
"""
from __future__ import annotations

import copy
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from mpi4py import MPI

from ...balance import bounds, rank_slice
from ...comm.auto import choose
from ...comm.codecs import wire_of
from ...comm.exchange import Exchange
from ...comm.ordered import OrderedSum
from ...comm.topology import Grid, make_grid
from ...data.batches import Batches
from ...model.layers import Context, Layer, saved_bytes
from ...model.optim import Optimizer
from ...model.sequential import Sequential, layers_text
from ...runtime import ConfigError, agreed
from ...threads import one_blas_thread
from ...timeline import span
from ..base import TrainerBase
from ..evaluation import EVAL_BLOCK, chunk_row
from ..recipe import split_options
from ..reproducible import EVAL_CHUNK, gathered_sums
from .partition import stage_ranges
from .schedules import MAX_MICROBATCHES, SCHEDULES, peak_alive, schedule

__all__ = ["PipelineTrainer"]


@dataclass
class _Step:
    """What one step's micro-batches share on this stage."""

    step: int
    batch: int  # the global batch
    ids: np.ndarray  # (b,) the replica's global sample ids (dropout draws by them)
    parts: List[Tuple[int, int]] = field(default_factory=list)  # micro-batch k of the chunk
    rows: Optional[np.ndarray] = None  # with groups: (k, 2 + width) metric sums per group
    chunk: int = 0  # which of the ``accumulate`` chunks runs
    x: Optional[np.ndarray] = None  # (b, *features): the first stage's rows
    y: Optional[np.ndarray] = None  # (b,): the last stage's labels
    alive: Dict[int, Any] = field(default_factory=dict)  # k -> what backward needs
    held: int = 0  # bytes saved by the micro-batches in ``alive``


class PipelineTrainer(TrainerBase):
    """Pipeline (and data) parallel training on a grid of ``pp`` stages x (ranks / pp)
    replicas of ``comm`` (or on the ``Grid`` given as ``comm``).

    ``model`` is the whole model, a ``Sequential`` (this rank takes its stage's
    layers and their values) or a list of layers (initialised from ``seed`` and
    each layer's index, in ``dtype``); this rank builds only its stage, with the
    same names and initial values it has in the whole model.  The optimizer is
    attached to the stage's parameters.  ``microbatches`` per replica and step
    (default 2 x pp), ``schedule`` ("1f1b", "gpipe"), ``stage_layers`` (layers
    with parameters per stage; default: balanced by estimated compute),
    ``allreduce`` and ``grad_dtype`` for each stage's sum over its replicas,
    ``groups`` for the reproducible step; the other options are every trainer's
    (``parallel.recipe``).
    """

    OPTIONS = ("pp", "microbatches", "schedule", "stage_layers", "allreduce", "grad_dtype",
               "groups", "dtype")

    def __init__(self, model: Any, loss: Any, optimizer: Optimizer, data: Any, comm: Any, *,
                 pp: Optional[int] = None, microbatches: Optional[int] = None,
                 schedule: str = "1f1b", stage_layers: Optional[Sequence[int]] = None,
                 allreduce: str = "auto", grad_dtype: Optional[str] = None,
                 groups: Optional[int] = None, dtype: str = "float32",
                 check_start: bool = True, **options):
        if groups and allreduce == "shm":  # (config.rules refuses it on every public path)
            raise ConfigError("{allreduce} shm with {groups}: a stage's fixed-order sum runs on "
                              "MPI (use mpi or ring)", ["allreduce", "groups"], everywhere=True)
        grid = comm if isinstance(comm, Grid) else make_grid(comm, pp or 2)
        self.check_start = check_start
        microbatches = 2 * grid.pp if microbatches is None else microbatches
        if schedule not in SCHEDULES:
            raise ConfigError(f"{{schedule}}: expected one of {', '.join(SCHEDULES)}, got "
                              f"{schedule!r}", ["schedule"])
        if not 1 <= microbatches <= MAX_MICROBATCHES:
            raise ConfigError(f"{{microbatches}}: expected a value in 1..{MAX_MICROBATCHES}, "
                              f"got {microbatches}", ["microbatches"], everywhere=True)
        whole = model if isinstance(model, Sequential) else None
        layers = list(whole.layers if whole is not None else model)
        dtype = whole.dtype if whole is not None else np.dtype(dtype)
        self.grid = grid
        recipe = split_options("PipelineTrainer", options)
        self._begin(loss, data, grid.world, recipe, dtype=dtype, replicas=grid.dp,
                    who="data-parallel replicas")
        along = self._check_model(grid.world, layers)  # a sample's shape before each layer
        pieces = recipe.accumulate * microbatches
        self._check_pieces(grid.world, grid.dp, pieces,
                           f"{{accumulate}} {recipe.accumulate} x {microbatches} "
                           "{microbatches}")
        self.microbatches, self.schedule = microbatches, schedule
        self.ranges = agreed(grid.world, lambda: stage_ranges(
            layers, grid.pp, stage_layers, shape=self.data.features))
        a, b = self.ranges[grid.pp_rank]
        seed = whole.seed if whole is not None else recipe.seed
        self.model = Sequential(copy.deepcopy(layers[a:b]), dtype=dtype, seed=seed,
                                index=range(a, b))
        if whole is not None:  # the stage takes the given model's values
            for name, view in self.model.named_params().items():
                view[...] = whole.named_params()[name]
        self.whole_text = layers_text(layers)
        self._stage_tables(layers)
        self.in_shape, self.out_shape = along[a], along[b]  # what arrives, what leaves
        self.optimizer = optimizer.attach(self.model.params, self.model.grads)
        # The stage's gradients are summed over its replicas after its last backward pass.
        # Agreed over the world: a stage whose exchange is refused (shm with unequal
        # ranks per node) must not leave the other stages in their next collective.
        wire = wire_of(grad_dtype)
        if allreduce == "auto":  # shm where it serves (comm.auto), alike in every stage
            allreduce = grid.world.bcast(choose(grid.dp_comm, wire=wire, ordered=groups or 0)[0])
        # With groups the fixed-order sum writes the whole sum: the update is not sharded.
        self.exchange = agreed(grid.world, lambda: Exchange(
            grid.dp_comm, self.model.size, self.model.dtype, algorithm=allreduce,
            overlap=False, wire=wire, shared=not groups))
        self.check_replicas()
        self.exchange.adopt(self.model, self.optimizer)
        self.metrics = np.zeros(2 + self.task.width)  # loss sum, stop, task sums; over world
        self._buffers(groups)
        self.batches = Batches(self.train, self.sampler, grid.dp_rank, grid.dp, groups=groups,
                               features=grid.is_first_stage, targets=grid.is_last_stage)
        self._finish(grid.world, groups)
        self.peak_alive = 0  # micro-batches whose activations were held at once
        self.times["wait"] = 0.0  # blocked in recv_forward / recv_backward: the bubble

    def _stage_tables(self, layers: Sequence[Layer]) -> None:
        """Every stage's parameter names and shapes, without building the other stages."""
        self.shapes, self.stage_names = {}, []
        for lo, hi in self.ranges:
            names = []
            for i in range(lo, hi):
                for key, shape in layers[i].shapes().items():
                    self.shapes[f"{i}.{key}"] = tuple(shape)
                    names.append(f"{i}.{key}")
            self.stage_names.append(names)

    def _buffers(self, groups: Optional[int]) -> None:
        """Receive buffers: a pool of activation slots (one per micro-batch that can be
        alive at once on this stage) and one gradient buffer; views of them are used."""
        grid, dp = self.grid, self.grid.dp
        per_replica = -(-self.sampler.batch_size // dp)  # ceil: the largest replica part
        per_chunk = -(-per_replica // self.accumulate)  # ... its largest chunk
        rows = -(-per_chunk // self.microbatches)  # ... and that chunk's largest micro-batch
        most = self.microbatches  # micro-batches in a chunk, at most
        if groups:  # a micro-batch is a group; a chunk has up to ceil(ceil(G / dp) / K)
            rows = -(-self.sampler.batch_size // groups)
            most = -(-(-(-groups // dp)) // self.accumulate)
            self.sum = OrderedSum(grid.dp_comm, self.model.size, self.model.dtype)
        self.slots = peak_alive(self.schedule, grid.pp, grid.pp_rank, most)
        dt = self.model.dtype
        self.act_pool = (np.empty((self.slots, rows, *self.in_shape), dt) if grid.pp_rank
                         else None)
        self.grad_buf = (np.empty((rows, *self.out_shape), dt) if not grid.is_last_stage
                         else None)
        self._sends: List[Tuple[MPI.Request, np.ndarray]] = []  # (request, its buffer)
        self._step: Optional[_Step] = None  # the step in progress

    def model_text(self) -> Optional[str]:
        """The whole model's text (every stage records the same)."""
        return self.whole_text

    def abandon(self) -> List[MPI.Comm]:
        """After a rank died (local): forget the sends; the grid's communicators join
        the exchange's, for the healing to revoke and free."""
        self._sends.clear()
        return super().abandon() + [self.grid.pp_comm, self.grid.dp_comm]

    def close(self) -> None:
        """Gather the whole model's parameters on every rank (``whole_params``), free the
        exchange and the grid's communicators (collective)."""
        counts = [self._stage_size(s) for s in range(self.grid.pp)]
        self._whole = np.empty(sum(counts), self.model.dtype)
        self.grid.pp_comm.Allgatherv(self.model.params, [self._whole, counts])
        super().close()
        self.grid.free()

    def whole_params(self) -> np.ndarray:
        """The whole model's flat parameters, stage after stage (after ``close``)."""
        return self._whole

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
        """The activation of micro-batch ``k`` from the previous stage, (rows, *in_shape)."""
        buf = self.act_pool[k % self.slots, :rows]
        t0 = time.perf_counter()
        with span("recv forward", "pipeline", microbatch=k):
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
        """Send micro-batch ``k``'s output (rows, *out_shape) to the next stage."""
        with span("send forward", "pipeline", microbatch=k):
            self._isend(y, self.grid.next_rank, 2 * k)

    def recv_backward(self, k: int, rows: int) -> np.ndarray:
        """dL/d(output) of micro-batch ``k`` from the next stage, (rows, *out_shape)."""
        buf = self.grad_buf[:rows]
        t0 = time.perf_counter()
        with span("recv backward", "pipeline", microbatch=k):
            self.grid.pp_comm.Recv(buf, source=self.grid.next_rank, tag=2 * k + 1)
        self.times["wait"] += time.perf_counter() - t0
        return buf

    def send_backward(self, k: int, dx: np.ndarray) -> None:
        """Send dL/d(input) of micro-batch ``k`` (rows, *in_shape) to the previous stage."""
        with span("send backward", "pipeline", microbatch=k):
            self._isend(dx, self.grid.prev_rank, 2 * k + 1)

    # -- one micro-batch -------------------------------------------------------------------
    def _forward(self, st: _Step, k: int) -> None:
        lo, hi = st.parts[k]
        if hi == lo and st.rows is not None:  # an empty group (a short last batch): no
            return  # stage sends or computes (a plain empty micro-batch still overwrites)
        x = st.x[lo:hi] if self.grid.is_first_stage else self.recv_forward(k, hi - lo)
        self.on_phase("computing")
        ctx = Context(training=True, step=st.step, ids=st.ids[lo:hi], seed=self.seed)
        with np.errstate(over="ignore", invalid="ignore"):
            out, saved = self.model.forward(x, ctx)
            if self.grid.is_last_stage:
                into = self.metrics if st.rows is None else st.rows[k]
                saved = (saved, self._loss_grad(out, st.y[lo:hi], st.batch, into))
            else:
                self.send_forward(k, out)
        st.alive[k] = saved
        st.held += saved_bytes(saved)
        self.peak_activation_bytes = max(self.peak_activation_bytes, st.held)
        self.peak_alive = max(self.peak_alive, len(st.alive))

    def _backward(self, st: _Step, k: int) -> None:
        lo, hi = st.parts[k]
        if hi == lo and st.rows is not None:
            return
        saved = st.alive.pop(k)
        st.held -= saved_bytes(saved)
        if self.grid.is_last_stage:
            saved, dy = saved
        else:
            dy = self.recv_backward(k, hi - lo)
        self.on_phase("computing")
        first = self.grid.is_first_stage
        add = k > 0 or st.chunk > 0
        if st.rows is not None:  # a group: see OrderedSum.place
            into, add = self.sum.place(self.exchange.buffer[:self.model.size])
            self.model.bind_grads(into)
        with np.errstate(over="ignore", invalid="ignore"):
            # The step's first micro-batch overwrites the gradients, later ones add to
            # them, in the same order under both schedules, so both give the same bits.
            dx = self.model.backward(dy, saved, need_dx=not first, accumulate=add)
        if not first:
            self.send_backward(k, dx)

    def step(self, step: int, stop: Any = False) -> Tuple[float, Dict[str, object], int]:
        """Run global step ``step`` (0-based); return (mean loss, the task's metrics of
        the batch, global batch)."""
        # --reproducible: one BLAS thread on any layout (parallel.reproducible)
        with one_blas_thread() if self.groups else nullcontext():
            return self._run_step(step, stop)

    def evaluate(self, chunk: int = EVAL_BLOCK) -> Optional[Dict[str, object]]:
        """{"loss": mean loss, task metrics...} on the validation split through the
        pipeline (collective); None without one."""
        with one_blas_thread() if self.groups else nullcontext():
            return self._run_evaluate(chunk)

    def _run_step(self, step: int, stop: Any) -> Tuple[float, Dict[str, object], int]:
        g = self.grid
        t0 = time.perf_counter()
        self.on_phase("reading data")
        ids, x, y, batch = self.batches.get(step)  # the first stage's rows, the last's targets
        st = _Step(step, batch, ids, x=x, y=y)
        if self.groups:  # this replica's groups, as rows of ``ids``
            first, last = rank_slice(self.groups, g.dp_rank, g.dp)
            cuts = bounds(batch, self.groups)
            groups = [(cuts[k] - cuts[first], cuts[k + 1] - cuts[first])
                      for k in range(first, last)]
            rows = np.zeros((last - first, len(self.metrics)))
            self.sum.start(cuts)
        t1 = time.perf_counter()
        self.metrics[:] = 0
        wait0 = self.times["wait"]
        for c in range(self.accumulate):  # chunk c: rows [a, b) of the replica's part
            st.chunk = c
            if self.groups:  # the chunk's micro-batches are its groups
                a, b = rank_slice(len(groups), c, self.accumulate)
                st.parts, st.rows = groups[a:b], rows[a:b]
            else:
                a, b = rank_slice(len(ids), c, self.accumulate)
                st.parts = [(a + lo, a + hi) for lo, hi in
                            (rank_slice(b - a, k, self.microbatches)
                             for k in range(self.microbatches))]
            for op, k in schedule(self.schedule, g.pp, g.pp_rank, len(st.parts)):
                (self._forward if op == "F" else self._backward)(st, k)
        MPI.Request.Waitall([r for r, _ in self._sends])
        self._sends.clear()
        t2 = time.perf_counter()
        self.on_phase("exchange")
        if self.groups:
            self.model.bind_grads(self.exchange.buffer[:self.model.size])
            rows[0, 1] = 1.0 if stop else 0.0
            with span("ordered sum", "exchange", groups=len(groups)):
                self.sum.finish(self.model.grads)
                # Only the last stage has loss and task sums; the others add zeros (exact).
                self.metrics[:] = gathered_sums(g.dp_comm, rows, self.groups)
                g.pp_comm.Allreduce(MPI.IN_PLACE, self.metrics, op=MPI.SUM)
        else:
            self.exchange.wait()
            self.metrics[1] = 1.0 if stop else 0.0
            g.world.Allreduce(MPI.IN_PLACE, self.metrics, op=MPI.SUM)
        return self._conclude(step, batch, self.metrics, (t0, t1, t2, time.perf_counter()),
                              self.times["wait"] - wait0)

    def _run_evaluate(self, chunk: int) -> Optional[Dict[str, object]]:
        if self.val is None or len(self.val) == 0:
            return None
        g, n = self.grid, len(self.val)
        self.on_phase("evaluation")
        if self.groups:  # fixed chunks, summed in chunk order: any layout's bits
            chunk, count = EVAL_CHUNK, -(-n // EVAL_CHUNK)
            first, last = rank_slice(count, g.dp_rank, g.dp)
            parts = [(c * chunk, min(n, (c + 1) * chunk)) for c in range(first, last)]
        else:
            lo, hi = rank_slice(n, g.dp_rank, g.dp)
            parts = [(a, min(hi, a + chunk)) for a in range(lo, hi, chunk)]
        rows = np.zeros((len(parts), 1 + self.task.width))  # loss sum, task sums per chunk
        buf = np.empty((max([b - a for a, b in parts] + [1]), *self.in_shape),
                       self.model.dtype)
        sending: List[Tuple[MPI.Request, np.ndarray]] = []
        for k, (a, b) in enumerate(parts):
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
                rows[k] = chunk_row(out, y, self.loss, self.task)
            else:
                MPI.Request.Waitall([r for r, _ in sending])  # one chunk in flight at a time
                out = np.ascontiguousarray(out)
                sending = [(g.pp_comm.Isend(out, dest=g.next_rank, tag=2 * k), out)]
        MPI.Request.Waitall([r for r, _ in sending])
        if self.groups:  # only last stages hold sums: the others add zeros (exact)
            sums = gathered_sums(g.dp_comm, rows, count)
            g.pp_comm.Allreduce(MPI.IN_PLACE, sums, op=MPI.SUM)
        else:
            sums = np.zeros(1 + self.task.width)
            for row in rows:  # chunk by chunk, as they came
                sums += row
            g.world.Allreduce(MPI.IN_PLACE, sums, op=MPI.SUM)  # only last stages hold sums
        return self._evaluated(sums, n)
