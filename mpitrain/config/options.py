"""The training options: one frozen dataclass of commented defaults, validated when made.

``Config(lr=-1)`` raises ``ConfigError`` naming the parameter; so does an
option that does not apply to the chosen layout (``schedule`` without a
pipeline, ``momentum`` with Adam, ``keep_last`` without ``ckpt_dir``): it
is refused with the reason, never ignored.  Each choice list lives with the
module that owns it (the optimizers with ``model.optim``, the all-reduce
algorithms with ``comm.exchange``...).

On the command line values come from the defaults, then a TOML file
(``--config``), then flags; each later source overrides the earlier.
Unknown keys are errors, and every error names where the bad value came
from (the flag, or the file and key): ``from_sources`` returns the
configuration and the function that names a parameter so.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional, Tuple

from ..comm.codecs import WIRES
from ..comm.algorithms import ALGORITHMS, PROGRESS
from ..data.checks import MODES
from ..fault.elastic import MODES as ON_FAILURE
from ..model.layers import ACTIVATIONS
from ..model.losses import LOSSES
from ..model.optim import OPTIMIZERS
from ..model.schedule import SCHEDULES as LR_SCHEDULES
from ..model.sequential import DTYPES
from ..parallel.pipeline.schedules import SCHEDULES
from ..parallel.recipe import SHUFFLES
from ..parallel.speed import BALANCE

STRATEGIES = ("allreduce", "ps")  # run.build picks the trainer of each

__all__ = ["Config", "CHOICES"]

# Each list is the owning module's own.
CHOICES: Dict[str, Tuple[str, ...]] = {
    "activation": tuple(ACTIVATIONS),
    "loss": ("auto", *LOSSES),
    "dtype": DTYPES,
    "optimizer": OPTIMIZERS,
    "allreduce": ("auto", *ALGORITHMS),
    "check_data": MODES,
    "schedule": SCHEDULES,
    "progress": PROGRESS,
    "grad_dtype": ("full", *WIRES),
    "shuffle": SHUFFLES,
    "lr_schedule": LR_SCHEDULES,
    "on_failure": ON_FAILURE,
    "strategy": STRATEGIES,
    "balance": BALANCE,
}


def _opt(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True)
class Config:
    """Everything ``mpitrain train`` needs; see ``--help`` for each key."""

    # Data
    data: Optional[str] = _opt(None, "dataset directory (default: the built-in synthetic set, "
                                     "created in the cache directory on first use)")
    check_data: str = _opt("full", "check shard values before training (full) or only "
                                   "their structure (meta)")
    drop_last: bool = _opt(False, "skip the incomplete last batch of each epoch instead of "
                                  "training on a smaller one")
    cache_mb: float = _opt(1024.0, "decoded chunks of compressed data kept in memory, per "
                                   "rank and split, in MiB")
    shuffle: str = _opt("auto", "sample order: global (a permutation of all samples each "
                                "epoch), chunks (chunk-aware, for compressed data: shuffle "
                                "the chunks, then the samples within a window of chunks), or "
                                "auto (chunks when the training data is chunked)")
    shuffle_window: int = _opt(32, "chunks per shuffle window with --shuffle chunks")
    # Model
    model: Optional[str] = _opt(None, "the layers, comma-separated, e.g. \"conv2d(16,3,"
                                      "padding=1),relu,maxpool2d(2),flatten,linear(64),relu,"
                                      "linear(10)\" (default: an MLP of --hidden)")
    torch: Optional[str] = _opt(None, "a PyTorch model instead of mpitrain's layers: "
                                      "MODULE:FUNCTION, a function of no arguments returning "
                                      "(model, optimizer, loss_fn) or (model, optimizer, "
                                      "loss_fn, scheduler), the module found from the working "
                                      "directory (needs torch)")
    hidden: List[int] = _opt((256, 256), "hidden layer widths of the default MLP, e.g. 256,256")
    activation: str = _opt("relu", "hidden activation of the --hidden MLP")
    dropout: float = _opt(0.0, "dropout probability after each hidden activation of the "
                               "--hidden MLP")
    loss: str = _opt("auto", "the loss: auto (the task's: ce for classification, mse for "
                             "regression, bce for multilabel), or ce, bce, mse, mae, huber")
    dtype: str = _opt("float32", "parameter and compute precision")
    # Optimisation
    batch_size: int = _opt(128, "global batch size, split among the ranks")
    steps: Optional[int] = _opt(None, "number of steps (default: --epochs)")
    epochs: Optional[int] = _opt(None, "number of epochs (default 2 when --steps is not given)")
    optimizer: str = _opt("momentum", "update rule")
    lr: float = _opt(0.05, "learning rate (the peak, with a schedule)")
    lr_schedule: str = _opt("constant", "learning-rate schedule: constant, step (x --lr-gamma "
                                        "every --lr-step-every steps) or cosine (down to "
                                        "--lr-min at the last step)")
    warmup_steps: int = _opt(0, "raise the lr linearly from 0 over the first N steps")
    lr_min: float = _opt(0.0, "the cosine schedule's final lr")
    lr_step_every: Optional[int] = _opt(None, "the step schedule's interval, in steps "
                                              "(default: one epoch)")
    lr_gamma: float = _opt(0.1, "the step schedule's factor")
    clip_grad_norm: Optional[float] = _opt(None, "scale the summed gradient down to this "
                                                 "global L2 norm when it is larger")
    accumulate: int = _opt(1, "compute each batch in N sequential micro-batches, exchanged "
                              "once: the same result with about 1/N of the activation memory")
    momentum: float = _opt(0.9, "momentum of 'momentum'")
    weight_decay: float = _opt(0.0, "L2 penalty (decoupled for adamw)")
    seed: int = _opt(0, "seed of initialisation, sample order and synthetic data")
    # Parallelism
    strategy: str = _opt("allreduce", "how the gradients are combined: allreduce (every rank "
                                      "sums them) or ps (a parameter server: the first "
                                      "--servers ranks hold the parameters, the others compute)")
    servers: int = _opt(1, "with --strategy ps: how many ranks serve (each a slice of the "
                           "parameters and its optimizer state)")
    staleness: int = _opt(0, "with --strategy ps: how many steps a worker may run ahead of the "
                             "slowest (0: synchronous; S >= 1: stale-synchronous parallel)")
    balance: str = _opt("none", "split each global batch evenly (none) or in proportion to the "
                                "ranks' measured speed (speed), for persistent stragglers")
    balance_every: int = _opt(20, "with --balance speed: agree on the ranks' speeds every N "
                                  "steps")
    reproducible: bool = _opt(False, "bit-identical results at any number of ranks: each "
                                     "global batch in --groups fixed groups, added in one fixed "
                                     "order")
    groups: int = _opt(4, "with --reproducible: the fixed groups of each global batch (4 "
                          "serves 1 to 4 ranks, 12 up to 12 evenly; the fewer, the faster)")
    allreduce: str = _opt("auto", "gradient all-reduce: auto (shm where it serves, else mpi; "
                                  "ring for a 16-bit wire: the run's first lines say which "
                                  "and why), MPI's own Allreduce, mpitrain's ring, or shm "
                                  "(ranks on a node add from each other's memory)")
    bucket_mb: Optional[float] = _opt(None, "exchange the gradients in buckets of about this "
                                            "many MiB (0: one bucket; default: 2 with "
                                            "overlap, else one bucket; given, it asks for "
                                            "overlap)")
    overlap: Optional[bool] = _opt(None, "start each bucket's exchange as soon as backward "
                                         "produced it (default: where the ranks span more "
                                         "than one node; on one node the sum is the cores' "
                                         "own work, which overlap cannot hide)")
    progress: Optional[str] = _opt(None, "how the overlapped exchange progresses: a helper "
                                         "thread (thread, the default), MPI_Test between "
                                         "layers (test, mpi only), or none; given, it asks "
                                         "for overlap")
    grad_dtype: str = _opt("full", "exchange gradients in 16 bits, adding in full precision "
                                   "(needs --allreduce ring)")
    sync_every: int = _opt(1, "local SGD: each replica takes N steps on its own slice of "
                              "each batch (its own mean gradient, its own optimizer), then "
                              "the replicas' parameters and optimizer state are averaged by "
                              "one all-reduce (1: a synchronous step, summing the gradients)")
    outer_lr: Optional[float] = _opt(None, "with --sync-every N > 1: DiLoCo's outer step of "
                                           "this size (Nesterov momentum) on the averaged "
                                           "change since the last sync (default: the "
                                           "average itself)")
    outer_momentum: float = _opt(0.9, "with --outer-lr: the outer step's Nesterov momentum")
    pp: int = _opt(1, "pipeline stages; the ranks form pp stages x (ranks / pp) replicas")
    microbatches: Optional[int] = _opt(None, "pipeline micro-batches per replica and step "
                                             "(default: 2 x pp)")
    schedule: str = _opt("1f1b", "pipeline schedule")
    stage_layers: Optional[List[int]] = _opt(None, "layers with parameters per stage, e.g. "
                                                   "2,1 (default: balanced by estimated "
                                                   "compute)")
    # Checkpoints and failures
    ckpt_dir: Optional[str] = _opt(None, "write checkpoints here (and resume from here)")
    ckpt_every: int = _opt(100, "checkpoint every N steps (0: only at the end)")
    keep_last: int = _opt(3, "keep the N newest checkpoints")
    keep_best: bool = _opt(True, "with --ckpt-dir and a validation split, keep the state of "
                                 "the best evaluation (by --monitor) in best.h5, never pruned")
    early_stop: Optional[int] = _opt(None, "stop when --monitor has not improved for N "
                                           "evaluations in a row")
    monitor: str = _opt("val_loss", "the validation metric --early-stop and best.h5 follow: "
                                    "val_loss, or the task's (val_accuracy; val_rmse, val_mae, "
                                    "val_r2; val_f1)")
    resume: str = _opt("auto", "auto: from the newest valid checkpoint in --ckpt-dir if any; "
                               "none: start afresh; or a checkpoint file")
    watchdog: float = _opt(600.0, "abort the job when a step makes no progress for this many "
                                  "seconds (0: off)")
    sigterm_grace: float = _opt(10.0, "after a SIGTERM, abort the job if the ranks have not "
                                      "stopped (checkpointed) within this many seconds (0: "
                                      "never)")
    on_failure: str = _opt("abort", "when a rank dies: abort the job (relaunch to resume), "
                                    "shrink to the survivors, or respawn a replacement "
                                    "(Open MPI with mpiexec --with-ft ulfm)")
    max_failures: int = _opt(3, "with --on-failure shrink|respawn, abort at the N+1-th dead "
                                "rank")
    fault: Optional[str] = _opt(None, "inject failures for drills, comma-separated: "
                                      "kill|stop|term:rank=R:step=S, ckpt-kill:step=S, "
                                      "heal-kill:rank=R:healing=N, join-hang:healing=N, "
                                      "slow:rank=R:factor=F, "
                                      "jitter:prob=P:factor=F")
    # Output
    run_dir: Optional[str] = _opt(None, "this run's directory: metrics.jsonl is appended there "
                                        "(default: --ckpt-dir if given, else runs/DATE-TIME)")
    quiet: bool = _opt(False, "no progress lines (errors and the summary still print)")
    log: Optional[str] = _opt(None, "append one JSON object per logged step to this file")
    timeline: Optional[str] = _opt(None, "write a timeline of the steps to this JSON file "
                                         "(Chrome trace events: open it in Perfetto or "
                                         "chrome://tracing)")
    timeline_steps: Optional[str] = _opt(None, "with --timeline: record only steps A to B "
                                               "(1-based, inclusive), e.g. 100:110")
    overwrite: bool = _opt(False, "let --timeline replace a file that exists (refused "
                                  "otherwise: nothing of the user's is overwritten)")
    log_every: int = _opt(10, "print and log every N steps")
    eval_every: Optional[int] = _opt(None, "evaluate on the validation split every N steps "
                                           "(default: each epoch's end; 0: only at the end)")

    def __post_init__(self) -> None:
        from .rules import validate

        for f in fields(self):  # a tuple default or a TOML list: one type, a list
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                object.__setattr__(self, f.name, list(value))
        validate(self)

    def total_steps(self, steps_per_epoch: int) -> int:
        """The run's length in steps."""
        if self.steps is not None:
            return self.steps
        return (2 if self.epochs is None else self.epochs) * steps_per_epoch

    def wire(self) -> Optional[str]:
        """The 16-bit wire format of the gradient exchange, or None."""
        return None if self.grad_dtype == "full" else self.grad_dtype

    def micro(self) -> int:
        """Pipeline micro-batches per replica and step (1 without a pipeline)."""
        if self.microbatches is not None:
            return self.microbatches
        return 1 if self.pp == 1 else 2 * self.pp

    def ps(self) -> bool:
        """Whether the parameter-server trainer runs."""
        return self.strategy == "ps"

    def timeline_window(self) -> Optional[Tuple[int, int]]:
        """The steps --timeline records, (first, last), or None for all."""
        if self.timeline_steps is None:
            return None
        a, b = self.timeline_steps.split(":")
        return int(a), int(b)

    def local(self) -> bool:
        """Whether the replicas take local steps between syncs (local SGD)."""
        return self.sync_every > 1

    def pipelined(self) -> bool:
        """Whether the pipeline trainer runs."""
        return self.pp > 1

    def replace(self, **changes: Any) -> "Config":
        """A copy with ``changes``, validated."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> Dict[str, Any]:
        """Every key and its value (JSON-ready)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


