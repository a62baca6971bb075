"""The training configuration: one frozen dataclass of commented defaults, validated when made.

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

import argparse
import dataclasses
import math
import sys
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Dict, List, Optional, Tuple

from .comm.codecs import WIRES
from .comm.exchange import ALGORITHMS, PROGRESS, check_options
from .data.checks import MODES
from .fault.drills import Faults
from .model.layers import ACTIVATIONS
from .model.losses import LOSSES
from .model.optim import OPTIMIZERS
from .model.sequential import DTYPES
from .parallel.pipeline.schedules import MAX_MICROBATCHES, SCHEDULES
from .runtime import ConfigError, MpitrainError, literal

__all__ = ["Config", "CHOICES", "add_arguments", "from_sources", "flag"]

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.9/3.10
    import tomli as tomllib

# Each list is the owning module's own.
CHOICES: Dict[str, Tuple[str, ...]] = {
    "activation": tuple(ACTIVATIONS),
    "loss": ("auto", *LOSSES),
    "dtype": DTYPES,
    "optimizer": OPTIMIZERS,
    "allreduce": tuple(ALGORITHMS),
    "check_data": MODES,
    "schedule": SCHEDULES,
    "progress": PROGRESS,
    "grad_dtype": ("full", *WIRES),
    "shuffle": ("auto", "global", "chunks"),
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
    hidden: List[int] = _opt((256, 256), "hidden layer widths, e.g. 256,256")
    activation: str = _opt("relu", "hidden activation")
    loss: str = _opt("auto", "the loss: auto (the task's: ce for classification, mse for "
                             "regression, bce for multilabel), or ce, bce, mse, mae, huber")
    dtype: str = _opt("float32", "parameter and compute precision")
    # Optimisation
    batch_size: int = _opt(128, "global batch size, split among the ranks")
    steps: Optional[int] = _opt(None, "number of steps (default: --epochs)")
    epochs: Optional[int] = _opt(None, "number of epochs (default 2 when --steps is not given)")
    optimizer: str = _opt("momentum", "update rule")
    lr: float = _opt(0.05, "learning rate")
    momentum: float = _opt(0.9, "momentum of 'momentum'")
    weight_decay: float = _opt(0.0, "L2 penalty (decoupled for adamw)")
    seed: int = _opt(0, "seed of initialisation, sample order and synthetic data")
    # Parallelism
    allreduce: str = _opt("mpi", "gradient all-reduce: MPI's own Allreduce, mpitrain's ring, "
                                 "or shm (ranks on a node add from each other's memory)")
    bucket_mb: float = _opt(2.0, "exchange the gradients in buckets of about this many MiB "
                                 "(0: one bucket)")
    overlap: bool = _opt(True, "start each bucket's exchange as soon as backward produced it")
    progress: str = _opt("thread", "how the overlapped exchange progresses: a helper thread, "
                                   "MPI_Test between layers (mpi only), or none")
    grad_dtype: str = _opt("full", "exchange gradients in 16 bits, adding in full precision "
                                   "(needs --allreduce ring)")
    pp: int = _opt(1, "pipeline stages; the ranks form pp stages x (ranks / pp) replicas")
    microbatches: Optional[int] = _opt(None, "micro-batches per replica and step (default: "
                                             "1 without a pipeline, 2 x pp with one)")
    schedule: str = _opt("1f1b", "pipeline schedule")
    stage_layers: Optional[List[int]] = _opt(None, "Linear layers per stage, e.g. 2,1 "
                                                   "(default: balanced by parameter count)")
    # Checkpoints and failures
    ckpt_dir: Optional[str] = _opt(None, "write checkpoints here (and resume from here)")
    ckpt_every: int = _opt(100, "checkpoint every N steps (0: only at the end)")
    keep_last: int = _opt(3, "keep the N newest checkpoints")
    resume: str = _opt("auto", "auto: from the newest valid checkpoint in --ckpt-dir if any; "
                               "none: start afresh; or a checkpoint file")
    watchdog: float = _opt(600.0, "abort the job when a step makes no progress for this many "
                                  "seconds (0: off)")
    sigterm_grace: float = _opt(10.0, "after a SIGTERM, abort the job if the ranks have not "
                                      "stopped (checkpointed) within this many seconds (0: "
                                      "never)")
    fault: Optional[str] = _opt(None, "inject failures for drills, comma-separated: "
                                      "kill|stop|term:rank=R:step=S, ckpt-kill:step=S")
    # Output
    run_dir: Optional[str] = _opt(None, "this run's directory: metrics.jsonl is appended there "
                                        "(default: --ckpt-dir if given, else runs/DATE-TIME)")
    quiet: bool = _opt(False, "no progress lines (errors and the summary still print)")
    log: Optional[str] = _opt(None, "append one JSON object per logged step to this file")
    log_every: int = _opt(10, "print and log every N steps")
    eval_every: Optional[int] = _opt(None, "evaluate on the validation split every N steps "
                                           "(default: each epoch's end; 0: only at the end)")

    def __post_init__(self) -> None:
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
        """Micro-batches per replica and step."""
        if self.microbatches is not None:
            return self.microbatches
        return 1 if self.pp == 1 else 2 * self.pp

    def pipelined(self) -> bool:
        """Whether the pipeline trainer runs (stages, or micro-batches on one stage)."""
        return self.pp > 1 or self.micro() > 1

    def replace(self, **changes: Any) -> "Config":
        """A copy with ``changes``, validated."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> Dict[str, Any]:
        """Every key and its value (JSON-ready)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


_DEFAULTS = {f.name: f.default for f in fields(Config)}


def _changed(cfg: Config, name: str) -> bool:
    default = _DEFAULTS[name]
    return getattr(cfg, name) != (list(default) if isinstance(default, tuple) else default)


def _types() -> Dict[str, str]:
    """Field name -> its base type ('int', 'float', 'str', 'bool', 'List[int]')."""
    out = {}
    for f in fields(Config):
        base = f.type[len("Optional["):-1] if f.type.startswith("Optional[") else f.type
        out[f.name] = base
    return out


_OK = {
    "bool": lambda v: isinstance(v, bool),
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "List[int]": lambda v: isinstance(v, (list, tuple)) and all(
        isinstance(i, int) and not isinstance(i, bool) for i in v),
}


# name -> (comparison, bound, a note for the message): the numbers' valid ranges.
BOUNDS = {
    "batch_size": (">", 0, ""), "lr": (">", 0, ""), "log_every": (">", 0, ""),
    "steps": (">=", 1, ""), "epochs": (">=", 1, ""), "eval_every": (">=", 0, ""),
    "weight_decay": (">=", 0, ""), "bucket_mb": (">=", 0, ""), "seed": (">=", 0, ""),
    "pp": (">=", 1, ""), "ckpt_every": (">=", 0, ""), "cache_mb": (">=", 0, ""),
    "shuffle_window": (">=", 1, ""),
    "keep_last": (">=", 1, " (the newest checkpoint is always kept)"),
    "sigterm_grace": (">=", 0, " (0: never abort)"),
    "watchdog": (">=", 0, " (0 turns it off)"),
}


def validate(cfg: Config) -> None:
    """Raise ConfigError naming the first invalid value (or combination)."""

    def bad(name: str, expect: str) -> ConfigError:
        return ConfigError(f"{{{name}}}: expected {expect}, got {literal(repr(getattr(cfg, name)))}",
                           [name])

    types = _types()
    for name, base in types.items():
        value = getattr(cfg, name)
        if value is None and _DEFAULTS[name] is None:
            continue
        if not _OK[base](value):
            raise bad(name, f"a value of type {base}")
        if base == "float" and not math.isfinite(value):
            raise bad(name, "a finite number")
    for name, choices in CHOICES.items():
        if getattr(cfg, name) not in choices:
            raise bad(name, "one of " + ", ".join(choices))
    for name in ("data", "ckpt_dir", "run_dir", "log", "resume", "fault"):
        if getattr(cfg, name) == "":
            raise bad(name, "a path or value (leave it out for the default)")
    for name, (op, bound, note) in BOUNDS.items():
        value = getattr(cfg, name)
        if value is not None and not (value > bound if op == ">" else value >= bound):
            raise bad(name, f"a value {op} {bound}{note}")
    if cfg.steps is not None and cfg.epochs is not None:
        raise ConfigError(f"{{steps}} and {{epochs}}: give one of the two, not both (got "
                          f"{cfg.steps} steps and {cfg.epochs} epochs)", ["steps", "epochs"])
    if not cfg.hidden or any(h < 1 for h in cfg.hidden):
        raise bad("hidden", "one or more positive widths")
    if not 0 <= cfg.momentum < 1:
        raise bad("momentum", "a value in [0, 1)")
    check_options(cfg.allreduce, cfg.progress, cfg.wire())
    if cfg.microbatches is not None and not 1 <= cfg.microbatches <= MAX_MICROBATCHES:
        raise bad("microbatches", f"a value in 1..{MAX_MICROBATCHES}")
    if cfg.stage_layers is not None and (not cfg.stage_layers or min(cfg.stage_layers) < 1):
        raise bad("stage_layers", "one or more counts >= 1")
    try:
        Faults(cfg.fault)
    except MpitrainError as exc:
        raise ConfigError("{fault}: " + literal(str(exc)), ["fault"]) from None
    _refuse_what_does_not_apply(cfg)


def _refuse_what_does_not_apply(cfg: Config, given=()) -> None:
    """A non-default option the chosen layout would ignore is an error, with the reason;
    so is one in ``given`` (the keys the command line or the TOML file set), default or
    not."""
    rules = [
        ("shuffle_window", cfg.shuffle == "global",
         "is the window of {shuffle} chunks; this run's {shuffle} is global", ["shuffle"]),
        ("schedule", not cfg.pipelined(),
         "orders a pipeline's micro-batches; this run has none ({pp} 1, one micro-batch)",
         ["pp"]),
        ("stage_layers", cfg.pp == 1, "splits the model into pipeline stages; {pp} is 1",
         ["pp"]),
        ("momentum", cfg.optimizer != "momentum",
         "is the momentum of {optimizer} momentum; this run's {optimizer} is " + cfg.optimizer,
         ["optimizer"]),
        ("keep_last", cfg.ckpt_dir is None, "prunes checkpoints; no {ckpt_dir} is given",
         ["ckpt_dir"]),
        ("ckpt_every", cfg.ckpt_dir is None, "spaces checkpoints; no {ckpt_dir} is given",
         ["ckpt_dir"]),
        ("sigterm_grace", cfg.ckpt_dir is None,
         "bounds the stop at a checkpoint after SIGTERM; without {ckpt_dir} a SIGTERM ends the "
         "run at once", ["ckpt_dir"]),
        ("resume", cfg.ckpt_dir is None and cfg.resume == "none",
         "none refuses to overwrite checkpoints in {ckpt_dir}, and none is given",
         ["ckpt_dir"]),
        ("fault", cfg.ckpt_dir is None and "ckpt-kill" in (cfg.fault or ""),
         "kills the writer of a checkpoint; no {ckpt_dir} is given", ["ckpt_dir"]),
    ]
    for option in ("bucket_mb", "overlap", "progress"):
        rules.append((option, cfg.pipelined(),
                      "applies to data parallelism alone: a pipeline exchanges each stage's "
                      "gradients after its last backward pass", []))
    rules.append(("progress", not cfg.overlap,
                  "moves an overlapped exchange; {overlap} is off", ["overlap"]))
    for name, ignored, why, others in rules:
        if ignored and (_changed(cfg, name) or name in given):
            value = literal(repr(getattr(cfg, name)))
            raise ConfigError(f"{{{name}}} {value} does not apply: it {why}", [name, *others])


# -- the command line ----------------------------------------------------------------------

def flag(name: str) -> str:
    """'batch_size' -> '--batch-size'."""
    return "--" + name.replace("_", "-")


def _parse_list(text: str) -> List[int]:
    try:
        return [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per Config field (default None: 'not given') and ``--config``."""
    parser.add_argument("--config", metavar="FILE.toml",
                        help="read these keys from a TOML file; flags override it")
    for f in fields(Config):
        kw: Dict[str, Any] = {"default": None, "dest": f.name}
        help = f.metadata["help"]
        if f.name in CHOICES:
            kw["choices"] = CHOICES[f.name]
        if f.type == "bool":
            kw["action"] = argparse.BooleanOptionalAction
        elif "List[int]" in f.type:
            kw["type"], kw["metavar"] = _parse_list, "N,N"
        elif "int" in f.type:
            kw["type"], kw["metavar"] = int, "N"
        elif "float" in f.type:
            kw["type"], kw["metavar"] = float, "X"
        default = f.default
        if isinstance(default, tuple):
            default = ",".join(map(str, default))
        if default is not None and f.type != "bool":
            help += f" (default: {default})"
        parser.add_argument(flag(f.name), help=help, **kw)


def from_sources(args: argparse.Namespace) -> Tuple[Config, Callable[[str], str]]:
    """Defaults, then ``args.config`` (TOML), then flags given: the validated Config and
    ``name_of(parameter)``, which says where a parameter's value came from (errors name
    it so: ``--lr``, or ``run.toml: key 'lr'``)."""
    values: Dict[str, Any] = {}
    where: Dict[str, str] = {}
    path = getattr(args, "config", None)
    types = _types()
    if path:
        try:
            with open(path, "rb") as fh:
                table = tomllib.load(fh)
        except FileNotFoundError:
            raise MpitrainError(f"{path}: no such config file") from None
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise MpitrainError(f"{path}: not valid TOML: {exc}") from None
        for key, value in table.items():
            name = key.replace("-", "_")
            if name not in types:
                raise MpitrainError(f"{path}: unknown key {key!r} (known: "
                                    f"{', '.join(sorted(types))})")
            if not _OK[types[name]](value):
                raise MpitrainError(f"{path}: key {key!r} should be {types[name]}, got {value!r}")
            values[name] = float(value) if types[name] == "float" else value
            where[name] = f"{path}: key {key!r}"
    for name in types:
        value = getattr(args, name, None)
        if value is not None:
            values[name] = value
            where.pop(name, None)

    def name_of(param: str) -> str:
        return where.get(param, flag(param))

    try:
        cfg = Config(**values)
        _refuse_what_does_not_apply(cfg, given=set(values))  # given, even as the default
        return cfg, name_of
    except ConfigError as exc:
        raise MpitrainError(exc.render(name_of)) from None
