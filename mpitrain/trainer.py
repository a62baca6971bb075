"""The data-parallel training loop, and building it from a Config.

One step on every rank of ``comm``::

    ids   = the rank's slice of global batch k            (data.Sampler)
    x, y  = rows ids of the shards                        (data.Shards)
    grads = d/dθ [ sum of the rank's per-sample losses / B ]   (B: global batch)
    exchange(grads)  ->  sum over ranks = d/dθ [ mean loss of the global batch ]
    optimizer.step()

Dividing by the global batch B before the sum, rather than averaging the
ranks' means, makes the result exact when the ranks' parts are unequal.  The
batch's loss sum and correct count ride in two extra slots at the end of the
exchange buffer, so one Allreduce per step gives gradients and metrics, and
every rank sees the same loss (and stops together if it is not finite).
"""
from __future__ import annotations

import hashlib
import math
import os
import time
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np
from mpi4py import MPI

from . import __version__
from .config import Config
from .data import (Manifest, Prefetcher, Sampler, Shards, check_dataset, rank_slice,
                   read_manifest)
from .exchange import Exchange, plan_buckets
from .metrics import Reporter
from .nn import Sequential, make_loss, mlp
from .optim import make_optimizer
from . import checkpoint
from .checkpoint import State
from .topology import make_grid
from .runtime import (EXIT_PREEMPTED, Faults, MpitrainError, Preemption, Watchdog, agreed,
                      library_version, on_root, thread_report)

__all__ = ["Trainer", "build", "train", "builtin_dataset", "BUILTIN"]

# The built-in synthetic set `train` uses when no --data is given.
BUILTIN = dict(samples=20000, features=784, classes=10, seed=0, shards=4, val_fraction=0.1)


def cache_dir() -> str:
    """$MPITRAIN_CACHE, else $XDG_CACHE_HOME/mpitrain, else ~/.cache/mpitrain."""
    if os.environ.get("MPITRAIN_CACHE"):
        return os.environ["MPITRAIN_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "mpitrain")


def builtin_dataset(comm: MPI.Comm) -> str:
    """Path of the built-in synthetic set, written by rank 0 if missing (collective)."""
    from .prepare import synthetic

    b = BUILTIN
    path = os.path.join(cache_dir(), f"synthetic-v1-n{b['samples']}-f{b['features']}-"
                                     f"c{b['classes']}-s{b['seed']}")
    manifest = os.path.join(path, "manifest.json")

    def make() -> None:
        if os.path.exists(manifest):
            return
        try:
            synthetic(path, b["samples"], b["features"], b["classes"], b["seed"],
                      b["shards"], b["val_fraction"])
        except MpitrainError:
            if not os.path.exists(manifest):  # else another job wrote it meanwhile: fine
                raise
        except OSError as exc:
            raise MpitrainError(f"{path}: cannot write the built-in dataset: {exc} "
                                "(set MPITRAIN_CACHE)") from None

    on_root(comm, make)
    return path


class TrainerBase:
    """What every trainer shares: checkpoint state across stages, replicas, phases.

    Subclasses set ``grid`` (a topology.Grid), ``model`` (this rank's stage,
    a Sequential), ``optimizer``, ``sampler``, ``train``, ``val``, ``loss``,
    ``stage_names`` (the parameter names of each stage, in full-model order)
    and ``shapes`` (every parameter's shape, in full-model order).
    """

    TAG_STATE = 31000  # point-to-point tag of the checkpoint gather, on grid.world

    def prefetch(self, start: int, stop: int) -> None:
        """Read the batches of steps ``start``..``stop - 1`` ahead, if this trainer can."""

    def close(self) -> None:
        """Release threads and communicators (collective)."""

    def close_data(self) -> None:
        """Close the training and validation shard files."""
        self.train.close()
        if self.val:
            self.val.close()

    def _keep_arrays(self, grads: Optional[np.ndarray] = None) -> None:
        """Copy the model's and optimizer's arrays out of memory about to be freed (a
        shared-memory window), so the trainer's results stay readable after ``close``;
        ``grads``: the gradients' new home, if the caller has one."""
        m, opt = self.model, self.optimizer
        m.bind_params(m.params.copy())
        m.bind_grads(m.grads.copy() if grads is None else grads)
        opt.params, opt.grads = m.params, m.grads
        for name, array in opt.state().items():  # state() names its attributes
            setattr(opt, name, array.copy())

    _writes_state = True  # restore() writes this rank's arrays (not shared with a writer)

    def _init_common(self) -> None:
        self.times = {"data": 0.0, "compute": 0.0, "exchange": 0.0}
        self.stop_agreed = False  # set by step(): some rank was asked to stop
        self.on_phase: Callable[[str], None] = lambda phase: None  # for the watchdog

    def check_replicas(self) -> None:
        """Check that the replicas of each stage start from the same parameters (collective)."""
        digest = hashlib.sha256(self.model.params.tobytes()).hexdigest()
        digests = self.grid.dp_comm.allgather(digest)
        bad = [r for r, d in enumerate(digests) if d != digests[0]]
        bad = sorted(self.grid.world.allreduce(
            [self.grid.world_rank(self.grid.pp_rank, r) for r in bad]
            if self.grid.dp_rank == 0 else [], op=MPI.SUM))
        if bad:
            raise MpitrainError(f"initial parameters differ between ranks: ranks {bad} "
                                f"differ from rank 0 of their stage", everywhere=True)

    def _conclude(self, step: int, batch: int, sums: np.ndarray, t: Tuple[float, ...],
                  idle: float = 0.0) -> Tuple[float, float, int]:
        """After the exchange: agree on stopping, check the loss, update the parameters.

        ``sums`` holds the global (loss sum, correct count, stop requests);
        ``t`` the times the step started, read its data, computed, exchanged;
        ``idle`` the part of the computing time spent waiting for other stages.
        """
        self.stop_agreed = bool(sums[2] > 0)
        loss = float(sums[0]) / batch
        if not np.isfinite(loss):
            epoch, _ = self.sampler.locate(step)
            raise MpitrainError(f"loss is {loss} at step {step + 1} (epoch {epoch}); "
                                f"try a lower --lr (now {self.optimizer.lr})", everywhere=True)
        self._update()
        t0, t1, t2, t3 = t
        self.times["data"] += t1 - t0
        self.times["compute"] += (t2 - t1 - idle) + (time.perf_counter() - t3)
        self.times["exchange"] += t3 - t2
        return loss, float(sums[1]) / batch, batch

    def _update(self) -> None:
        """Apply the optimizer to the summed gradients."""
        self.optimizer.step()

    def named(self, flat: np.ndarray, names=None) -> Dict[str, np.ndarray]:
        """A flat buffer laid out like this stage's (or ``names``') parameters, by name."""
        out, offset = {}, 0
        for n in (self.stage_names[self.grid.pp_rank] if names is None else names):
            size = math.prod(self.shapes[n])
            out[n] = flat[offset:offset + size].reshape(self.shapes[n])
            offset += size
        return out

    def _flats(self):
        """This stage's parameters, then its optimizer state arrays by sorted key."""
        state = self.optimizer.state()
        return [self.model.params] + [state[k] for k in sorted(state)], sorted(state)

    def capture(self, step: int, config: Dict[str, Any]) -> Optional[State]:
        """The state after ``step`` steps, gathered on world rank 0 (collective);
        None on the other ranks.  Stage leaders (dp_rank 0) send their arrays."""
        g, (flats, keys) = self.grid, self._flats()
        if g.rank != 0:
            if g.dp_rank == 0:
                for flat in flats:
                    g.world.Send(flat, dest=0, tag=self.TAG_STATE)
            return None
        params: Dict[str, np.ndarray] = {}
        opt_state: Dict[str, Dict[str, np.ndarray]] = {k: {} for k in keys}
        for s, names in enumerate(self.stage_names):
            if s == 0:  # copies: the state outlives this step (and a freed window)
                got = [flat.copy() for flat in flats]
            else:
                size = sum(math.prod(self.shapes[n]) for n in names)
                got = [np.empty(size, self.model.dtype) for _ in flats]
                for buf in got:
                    g.world.Recv(buf, source=g.world_rank(s, 0), tag=self.TAG_STATE)
            params.update(self.named(got[0], names))
            for key, buf in zip(keys, got[1:]):
                opt_state[key].update(self.named(buf, names))
        epoch, epoch_step = self.sampler.locate(step)
        opt, s = self.optimizer, self.sampler
        hyper = {k: getattr(opt, k) for k in ("lr", "weight_decay", "momentum", "beta1",
                                               "beta2", "eps", "decoupled") if hasattr(opt, k)}
        return State(
            step=step, epoch=epoch, epoch_step=epoch_step, params=params,
            optimizer_state=opt_state,
            optimizer={"name": config.get("optimizer", type(opt).__name__.lower()),
                       "steps": opt.steps, **hyper},
            config=config, layout={"world_size": g.world.Get_size(), "pp": g.pp, "dp": g.dp},
            sampler=s.meta(),
            rng={"sample_order": f"numpy.random.default_rng([{s.seed}, epoch]).permutation"
                                 f"({s.n}), cut into batches of {s.batch_size}",
                 "init": "numpy.random.default_rng([seed, layer index]) per layer",
                 "stateful_generators": {}})

    def mismatch(self, state: State, config: Dict[str, Any]) -> Optional[str]:
        """Why ``state`` cannot continue this run, or None."""
        shapes = {n: a.shape for n, a in state.params.items()}
        if shapes != self.shapes:
            for name in sorted(set(shapes) | set(self.shapes)):
                if shapes.get(name) != self.shapes.get(name):
                    return (f"parameter {name!r} is {shapes.get(name)} in the checkpoint and "
                            f"{self.shapes.get(name)} in this model (check --hidden)")
        dtype = next(iter(state.params.values())).dtype
        if dtype != self.model.dtype:
            return f"parameters are {dtype} in the checkpoint, {self.model.dtype} here (--dtype)"
        name = config.get("optimizer")
        if state.optimizer.get("name") != name or set(state.optimizer_state) != set(
                self.optimizer.state()):
            return (f"written with --optimizer {state.optimizer.get('name')}, "
                    f"this run has {name}")
        for key, value in self.sampler.meta().items():
            if state.sampler.get(key) != value:
                flag = {"samples": "training samples in --data"}.get(key, "--" + key.replace(
                    "_", "-"))
                return (f"written with {flag} {state.sampler.get(key)}, this run has {value}: "
                        "the sample order would differ")
        return None

    def restore(self, state: Optional[State]) -> None:
        """Load ``state`` (given on world rank 0, None elsewhere) on every rank (collective).

        Rank 0 broadcasts the whole model's arrays in model order; each rank
        keeps its stage's part, so any (pp, dp) layout can resume any other.
        """
        g, (flats, keys) = self.grid, self._flats()
        everything = list(self.shapes)
        total = sum(math.prod(shape) for shape in self.shapes.values())
        steps = int(state.optimizer["steps"]) if g.rank == 0 else None
        self.optimizer.steps = g.world.bcast(steps, root=0)
        sources = ([state.params] + [state.optimizer_state[k] for k in keys]
                   if g.rank == 0 else [None] * len(flats))
        whole = np.empty(total, self.model.dtype)
        for flat, source in zip(flats, sources):
            if g.rank == 0:
                for name, view in self.named(whole, everything).items():
                    view[...] = source[name]
            g.world.Bcast(whole, root=0)
            mine = self.named(whole, everything)
            if self._writes_state:  # not where another rank of the node writes it
                for name, view in self.named(flat).items():
                    view[...] = mine[name]


class Trainer(TrainerBase):
    """Data-parallel training of ``model`` over the ranks of ``comm``."""

    def __init__(self, model: Sequential, loss, optimizer_name: str, opt_args: Dict[str, Any],
                 train: Shards, sampler: Sampler, comm: MPI.Comm, allreduce: str = "mpi",
                 val: Optional[Shards] = None, *, bucket_mb: float = 2.0, overlap: bool = True,
                 progress: str = "thread", grad_dtype: Optional[str] = None):
        self.model, self.loss, self.comm = model, loss, comm
        self.grid = make_grid(comm, 1)
        self.train, self.val, self.sampler = train, val, sampler
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.shapes = dict(model.shapes)
        self.stage_names = [list(model.shapes)]
        n = model.size
        # The exchange buffer: gradients, then the loss sum, the correct count
        # and the number of ranks asked to stop (pre-emption), all in one Allreduce.
        # Buckets from the end of the buffer (the last layer's gradients and the
        # metrics come first), each summed as soon as backward has made it final.
        # With a 16-bit wire the three metric slots stay out of the buckets and are
        # summed exactly (a float16 loss sum would overflow at 65504).
        covered = n if grad_dtype else n + 3
        buckets = plan_buckets(covered, bucket_mb * 2 ** 20, model.dtype.itemsize)
        # With --allreduce shm the update is sharded: the ranks of a node share one
        # copy of the parameters and optimizer state, and each updates the share of
        # the gradients it summed, so nobody copies the other shares of the sum.
        self.exchange = Exchange(comm, n + 3, model.dtype, buckets, allreduce, overlap,
                                 progress, grad_dtype,
                                 exact=slice(n, n + 3) if grad_dtype else None,
                                 sharded=allreduce == "shm", needed=slice(n, n + 3))
        self.xbuf = self.exchange.buffer  # (n + 3,), shared memory for --allreduce shm
        model.bind_grads(self.xbuf[:n])
        if self.exchange.sharded:
            model.bind_params(self.exchange.shared(n), copy=self.exchange.leader)
            self.exchange.fence()
        self.optimizer = make_optimizer(optimizer_name, model.params, model.grads,
                                        zeros=self.exchange.shared, **opt_args)
        self._prefetch: Optional[Prefetcher] = None
        self._init_common()

    @property
    def _writes_state(self) -> bool:
        """Whether ``restore`` writes here: not where another rank of the node does."""
        return self.exchange.leader

    def restore(self, state: Optional[State]) -> None:
        super().restore(state)
        self.exchange.fence()  # sharded: the leader's writes seen before anyone reads

    def _update(self) -> None:
        """Apply the optimizer; sharded, to this rank's shares, then wait for the node's."""
        self.optimizer.step(self.exchange.shares())
        self.exchange.fence()  # sharded: all shares updated before any rank's next forward

    def prefetch(self, start: int, stop: int) -> None:
        """Read the batches of steps ``start``..``stop - 1`` ahead, in the background."""
        self.close_prefetch()
        self._prefetch = Prefetcher(self.train, self.sampler, self.rank, self.size, start, stop)

    def close(self) -> None:
        """Stop the helper threads and free the exchange's communicator (collective)."""
        self.close_prefetch()
        if self.exchange.algorithm == "shm":
            self.xbuf = self.xbuf.copy()
            self._keep_arrays(grads=self.xbuf[:self.model.size])
        self.exchange.close()

    def close_prefetch(self) -> None:
        if self._prefetch is not None:
            self._prefetch.close()
            self._prefetch = None

    def step(self, step: int, stop: bool = False) -> Tuple[float, float, int]:
        """Run global step ``step`` (0-based); return (mean loss, accuracy, global batch).

        ``stop`` says this rank was asked to stop; afterwards ``stop_agreed``
        tells every rank alike whether any rank was.
        """
        t0 = time.perf_counter()
        if self._prefetch is not None:
            x, y, batch = self._prefetch.get(step)  # read while the last step computed
        else:
            ids, batch = self.sampler.local(step, self.rank, self.size)
            x, y = self.train.read(ids)  # (b, features), (b,)
        t1 = time.perf_counter()
        self.on_phase("computing")
        n = self.model.size
        with np.errstate(over="ignore", invalid="ignore"):  # a diverged loss is caught below
            out, saved = self.model.forward(x)  # (b, classes)
            loss_sum, dout = self.loss(out, y, 1.0 / batch)
            self.xbuf[n] = loss_sum
            self.xbuf[n + 1] = np.count_nonzero(out.argmax(axis=1) == y)
            self.xbuf[n + 2] = 1.0 if stop else 0.0
            # Reporting what is final even without overlap keeps both paths' bits equal.
            self.model.backward(dout, saved, final_from=self.exchange.ready)
        t2 = time.perf_counter()
        self.on_phase("exchange")
        self.exchange.wait()  # only what backward did not hide
        return self._conclude(step, batch, self.xbuf[n:], (t0, t1, t2, time.perf_counter()))

    def evaluate(self, chunk: int = 4096) -> Optional[Tuple[float, float]]:
        """(mean loss, accuracy) on the validation split, each rank a slice (collective)."""
        if self.val is None or len(self.val) == 0:
            return None
        self.on_phase("evaluation")
        lo, hi = rank_slice(len(self.val), self.rank, self.size)
        sums = np.zeros(2)  # loss sum, correct count; float64 so counts stay exact
        for a in range(lo, hi, chunk):
            x, y = self.val.read_range(a, min(hi, a + chunk))
            out = self.model(x)
            loss_sum, _ = self.loss(out, y, 1.0)
            sums += (loss_sum, np.count_nonzero(out.argmax(axis=1) == y))
        self.comm.Allreduce(MPI.IN_PLACE, sums, op=MPI.SUM)
        return sums[0] / len(self.val), sums[1] / len(self.val)



def build(cfg: Config, comm: MPI.Comm) -> Tuple[TrainerBase, Manifest]:
    """Check the data and make the grid, model, optimizer and trainer (collective)."""
    grid = make_grid(comm, cfg.pp)
    dp = grid.dp
    who = "ranks" if cfg.pp == 1 else "data-parallel replicas"
    root = cfg.data or builtin_dataset(comm)
    m = agreed(comm, lambda: read_manifest(root))  # a node may see another file system
    n_train = m.rows("train")
    if n_train < dp:
        raise MpitrainError(f"{m.path}: {n_train} training samples for {dp} {who}; "
                            "need at least one each", everywhere=True)
    if cfg.batch_size < dp:
        raise MpitrainError(f"--batch-size {cfg.batch_size} is smaller than the {dp} {who}; "
                            "each needs at least one sample", everywhere=True)
    if cfg.batch_size > n_train:
        raise MpitrainError(f"--batch-size {cfg.batch_size} is larger than the {n_train} "
                            f"training samples of {root}", everywhere=True)
    check_dataset(m, comm, full=cfg.check_data == "full")
    train = Shards(m, "train", cfg.dtype)
    val = Shards(m, "val", cfg.dtype) if m.rows("val") else None
    features = int(np.prod(m.features))
    layers = mlp(features, cfg.hidden, m.classes, cfg.activation)
    sampler = Sampler(n_train, cfg.batch_size, cfg.seed, cfg.drop_last)
    opt_args = dict(lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum)
    trainer: TrainerBase
    if cfg.pp == 1 and cfg.micro() == 1:
        model = Sequential(layers, dtype=cfg.dtype, seed=cfg.seed)
        trainer = Trainer(model, make_loss(cfg.loss), cfg.optimizer, opt_args, train, sampler,
                          comm, cfg.allreduce, val, bucket_mb=cfg.bucket_mb,
                          overlap=cfg.overlap, progress=cfg.progress,
                          grad_dtype=cfg.wire())
    else:
        from .pipeline import PipelineTrainer

        trainer = PipelineTrainer(layers, grid, make_loss(cfg.loss), cfg.optimizer, opt_args,
                                  train, sampler, microbatches=cfg.micro(),
                                  schedule=cfg.schedule, allreduce=cfg.allreduce, val=val,
                                  grad_dtype=cfg.wire(),
                                  dtype=cfg.dtype, seed=cfg.seed,
                                  stage_layers=cfg.stage_layers)
    trainer.check_replicas()
    return trainer, m


def _is_eval_step(cfg: Config, step: int, spe: int, total: int) -> bool:
    done = step + 1
    if done == total:
        return True
    if cfg.eval_every is None:
        return done % spe == 0
    return cfg.eval_every > 0 and done % cfg.eval_every == 0


def resume(cfg: Config, comm: MPI.Comm, trainer: Trainer, report: Reporter) -> int:
    """Restore the checkpoint ``cfg.resume`` asks for, if any; return the steps already done."""
    config = cfg.to_dict()
    loaded: Dict[str, State] = {}  # rank 0's; broadcast by trainer.restore

    def choose():
        removed = checkpoint.clean_leftovers(cfg.ckpt_dir) if cfg.ckpt_dir else []
        for path in removed:
            report.say(f"removed {path}: the leftover of an interrupted checkpoint write")
        if cfg.resume == "none":
            found = checkpoint.listing(cfg.ckpt_dir) if cfg.ckpt_dir else []
            if found:
                raise MpitrainError(
                    f"--ckpt-dir {cfg.ckpt_dir} holds checkpoints up to step {found[-1][0]}; "
                    "--resume none would overwrite them: use another --ckpt-dir, remove "
                    "them, or --resume auto")
            return None
        if cfg.resume == "auto":
            if not cfg.ckpt_dir:
                return None
            got = checkpoint.newest_valid(cfg.ckpt_dir, lambda w: report.say(f"warning: {w}"))
            if got is None:
                return None
            how = "--resume auto (the newest valid checkpoint; --resume none starts afresh)"
        else:
            got = checkpoint.load(cfg.resume), cfg.resume
            how = "--resume"
        state, path = got
        why = trainer.mismatch(state, config)
        if why:
            raise MpitrainError(f"{path}: cannot resume: {why}")
        was, g = state.layout, trainer.grid
        report.say(f"resuming from {path} at step {state.step} (epoch {state.epoch}), "
                   f"written by {was.get('world_size')} ranks (pp {was.get('pp')} x dp "
                   f"{was.get('dp')}), now {g.world.Get_size()} (pp {g.pp} x dp {g.dp}); {how}")
        loaded["state"] = state
        return state.step

    step = on_root(comm, choose)
    if step is None:
        return 0
    trainer.restore(loaded.get("state"))
    return step


def save_checkpoint(cfg: Config, comm: MPI.Comm, trainer: Trainer, step: int,
                    faults: Faults, report: Reporter) -> Tuple[float, int]:
    """Write the checkpoint of ``step`` from rank 0 and prune old ones (collective).
    Returns (seconds, bytes)."""
    t0 = time.perf_counter()
    state = trainer.capture(step, cfg.to_dict())  # gathered on rank 0

    def write():
        path, nbytes = checkpoint.save(cfg.ckpt_dir, state,
                                       die_midway=faults.in_checkpoint(step))
        removed = checkpoint.prune(cfg.ckpt_dir, cfg.keep_last, step)
        seconds = time.perf_counter() - t0
        report.say(f"checkpoint {path}: step {step}, {nbytes / 1e6:.1f} MB in "
                   f"{seconds * 1e3:.0f} ms"
                   + (f"; removed {len(removed)} older" if removed else ""))
        return seconds, nbytes

    return on_root(comm, write)


def train(cfg: Config, comm: MPI.Comm, out=None) -> Dict[str, Any]:
    """Train as ``cfg`` says on the ranks of ``comm``; return the summary (on every rank)."""
    import sys

    faults = Faults(cfg.fault)
    # Watched from the start: a rank stuck reading the data or in start-up ends the job too.
    dog = Watchdog(comm, cfg.watchdog) if cfg.watchdog > 0 else None
    trainer, m = build(cfg, comm)
    spe = trainer.sampler.steps_per_epoch
    total = cfg.total_steps(spe)
    rank, size = comm.Get_rank(), comm.Get_size()
    run_dir = cfg.run_dir or cfg.ckpt_dir or comm.bcast(
        os.path.join("runs", time.strftime("%Y%m%d-%H%M%S")) if rank == 0 else None, root=0)
    report = Reporter(rank == 0, cfg.log, total, out or sys.stdout, run_dir=run_dir,
                      quiet=cfg.quiet)
    report.say(f"mpitrain {__version__}: {size} ranks, {library_version()}, "
               f"threads per rank {thread_report()}")
    report.say(f"run directory {run_dir} (metrics.jsonl)")
    report.say(f"data {m.root}: {len(trainer.train)} train / "
               f"{len(trainer.val) if trainer.val else 0} val samples, features {m.features}, "
               f"{m.classes} classes")
    g = trainer.grid
    if hasattr(trainer, "describe"):
        report.say(f"pipeline: {g.pp} stages x {g.dp} data-parallel replicas, "
                   f"{cfg.micro()} micro-batches, schedule {cfg.schedule}; "
                   f"{trainer.describe()}")
    report.say(f"model {trainer.model}" + (" (stage 0)" if g.pp > 1 else ""))
    report.say(f"{total} steps ({spe} per epoch), global batch {cfg.batch_size} "
               f"(about {cfg.batch_size // g.dp} per replica), {cfg.optimizer} lr {cfg.lr}, "
               f"allreduce {cfg.allreduce}")
    start = resume(cfg, comm, trainer, report)
    summary: Dict[str, Any] = {"steps": total, "ranks": size, "start_step": start,
                               "preempted": False}
    if g.pp > 1 or cfg.micro() > 1:
        report.say("pipeline: each stage's gradients are exchanged after its last backward "
                   "pass; --bucket-mb, --overlap and --progress apply to data parallelism alone")
    if start >= total:
        report.say(f"nothing to do: the checkpoint is at step {start} of {total}", always=True)
        report.close()
        trainer.close()
        trainer.close_data()
        if dog:
            dog.close()
        return summary
    if dog:
        trainer.on_phase = lambda phase: setattr(dog, "phase", phase)
    trainer.prefetch(start, total)
    record: Dict[str, Any] = {}
    window_samples, window_time, train_time, timed_samples = 0, 0.0, 0.0, 0
    ckpt_time, ckpt_bytes, ckpt_count = 0.0, 0, 0
    t_start = time.perf_counter()
    # Without a checkpoint directory there is nothing to stop at: signals keep their
    # default effect (SIGTERM ends the rank at once; the launcher ends the job).
    with Preemption(cfg.sigterm_grace, enabled=bool(cfg.ckpt_dir)) as preemption:
        for step in range(start, total):
            if dog:
                dog.beat(step + 1)
            faults.at_step(rank, step + 1)
            t0 = time.perf_counter()
            loss, acc, batch = trainer.step(step, stop=preemption.requested)
            dt = time.perf_counter() - t0
            if trainer.stop_agreed:
                preemption.finished = True  # the ranks agreed: no SIGTERM deadline now
            window_samples += batch
            window_time += dt
            if step > start or total - start == 1:  # the first step pays for warm-up
                train_time += dt
                timed_samples += batch
            done = step + 1
            remaining = (total - done) * train_time / max(1, done - start - 1)
            evaluate = _is_eval_step(cfg, step, spe, total)
            report.live_step({"step": done, "epoch": trainer.sampler.locate(step)[0],
                              "loss": loss, "accuracy": acc, "eta_s": remaining,
                              "samples_per_s": batch / dt})
            if done % cfg.log_every == 0 or evaluate or trainer.stop_agreed:
                record = {"step": done, "epoch": trainer.sampler.locate(step)[0],
                          "loss": loss, "accuracy": acc,
                          "samples_per_s": window_samples / window_time, "lr": cfg.lr,
                          "eta_s": remaining}
                if evaluate:
                    result = trainer.evaluate()
                    if result:
                        record["val_loss"], record["val_accuracy"] = result
                report.step(record)
                window_samples, window_time = 0, 0.0
            periodic = cfg.ckpt_every and done % cfg.ckpt_every == 0
            if cfg.ckpt_dir and (periodic or done == total or trainer.stop_agreed):
                if dog:
                    dog.phase = "checkpoint"
                seconds, nbytes = save_checkpoint(cfg, comm, trainer, done, faults, report)
                ckpt_time, ckpt_bytes, ckpt_count = ckpt_time + seconds, nbytes, ckpt_count + 1
            if trainer.stop_agreed and done < total:  # at the last step it is just done
                summary["preempted"] = True
                total = done
                break
    trainer.close()
    if dog:
        dog.phase = "finished"
        dog.close()
    wall = time.perf_counter() - t_start
    # The slowest rank's phase times: the step is as slow as its slowest rank.
    phases = np.array([trainer.times[k] for k in ("data", "compute", "exchange")])
    comm.Allreduce(MPI.IN_PLACE, phases, op=MPI.MAX)
    busy = phases.sum() or 1.0
    summary.update({
        "steps_run": total - start, "wall_s": wall,
        "samples_per_s": timed_samples / train_time if train_time else 0.0,
        "final_loss": record.get("loss"), "val_loss": record.get("val_loss"),
        "val_accuracy": record.get("val_accuracy"),
        "share_data": phases[0] / busy, "share_compute": phases[1] / busy,
        "share_exchange": phases[2] / busy,
        "checkpoints": ckpt_count, "checkpoint_s": ckpt_time, "checkpoint_bytes": ckpt_bytes,
        "share_checkpoint": ckpt_time / wall if wall else 0.0})
    val = (f", val_acc {summary['val_accuracy']:.3f}"
           if summary["val_accuracy"] is not None else "")
    ckpt = (f"; {ckpt_count} checkpoints, {summary['share_checkpoint']:.1%} of the time"
            if ckpt_count else "")
    report.say(f"done: steps {start + 1}-{total} in {wall:.1f} s, "
               f"{summary['samples_per_s']:,.0f} samples/s (after the first), final loss "
               f"{summary['final_loss']:.4f}{val}; step time: compute "
               f"{summary['share_compute']:.0%}, exchange {summary['share_exchange']:.0%}, "
               f"data {summary['share_data']:.0%}{ckpt}", always=True)
    if summary["preempted"]:
        report.say(f"stopped at step {total} on {preemption.signal or 'a signal to another rank'}"
                   f"; exit status {EXIT_PREEMPTED}: relaunch with --resume auto to continue",
                   always=True)
    report.close()
    trainer.close_data()
    return summary
