"""The training configuration: one dataclass of commented defaults.

Values come from the defaults, then a TOML file (``--config``), then flags;
each later source overrides the earlier.  Unknown keys are errors, and every
error names where the bad value came from (the flag, or the file and key).
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional

from .runtime import MpitrainError

__all__ = ["Config", "add_arguments", "from_sources", "CHOICES"]

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.9/3.10
    import tomli as tomllib

CHOICES = {
    "activation": ("relu", "tanh"),
    "loss": ("ce", "mse"),
    "dtype": ("float32", "float64"),
    "optimizer": ("sgd", "momentum", "adam", "adamw"),
    "allreduce": ("mpi", "ring", "shm"),
    "check_data": ("full", "meta"),
    "schedule": ("gpipe", "1f1b"),
    "progress": ("thread", "test", "none"),
    "grad_dtype": ("full", "float16", "bfloat16"),
}


MAX_MICROBATCHES = 8000  # pipeline tags 2k, 2k+1 stay below MPI's guaranteed 32767


def _opt(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class Config:
    """Everything ``mpitrain train`` needs; see ``--help`` for each key."""

    # Data
    data: Optional[str] = _opt(None, "dataset directory (default: the built-in synthetic set, "
                                     "created in the cache directory on first use)")
    check_data: str = _opt("full", "check shard values before training (full) or only "
                                   "their structure (meta)")
    drop_last: bool = _opt(False, "skip the incomplete last batch of each epoch instead of "
                                  "training on a smaller one")
    # Model
    hidden: List[int] = _opt((256, 256), "hidden layer widths, e.g. 256,256")
    activation: str = _opt("relu", "hidden activation")
    loss: str = _opt("ce", "softmax cross-entropy (ce) or mean squared error on one-hot labels (mse)")
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

    def to_dict(self) -> Dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _flag(name: str) -> str:
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
        parser.add_argument(_flag(f.name), help=help, **kw)


def _coerce(name: str, ftype: str, value: Any, where: str) -> Any:
    """Check a TOML value's type against the field's."""
    ok = {
        "bool": lambda v: isinstance(v, bool),
        "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "str": lambda v: isinstance(v, str),
        "List[int]": lambda v: isinstance(v, list) and all(
            isinstance(i, int) and not isinstance(i, bool) for i in v),
    }
    base = ftype[len("Optional["):-1] if ftype.startswith("Optional[") else ftype
    if not ok[base](value):
        raise MpitrainError(f"{where}: key {name!r} should be {base}, got {value!r}")
    return float(value) if base == "float" else value


def from_sources(args: argparse.Namespace) -> Config:
    """Defaults, then ``args.config`` (TOML), then flags given; validated."""
    cfg = Config()
    where = {f.name: "default" for f in fields(Config)}
    path = getattr(args, "config", None)
    if path:
        try:
            with open(path, "rb") as fh:
                table = tomllib.load(fh)
        except FileNotFoundError:
            raise MpitrainError(f"{path}: no such config file") from None
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise MpitrainError(f"{path}: not valid TOML: {exc}") from None
        known = {f.name: f for f in fields(Config)}
        for key, value in table.items():
            name = key.replace("-", "_")
            if name not in known:
                raise MpitrainError(f"{path}: unknown key {key!r} (known: "
                                    f"{', '.join(sorted(known))})")
            setattr(cfg, name, _coerce(key, known[name].type, value, path))
            where[name] = f"{path}: key {key!r}"
    for f in fields(Config):
        value = getattr(args, f.name, None)
        if value is not None:
            setattr(cfg, f.name, value)
            where[f.name] = _flag(f.name)
    cfg.hidden = list(cfg.hidden)
    validate(cfg, where)
    return cfg


def validate(cfg: Config, where: Optional[Dict[str, str]] = None) -> None:
    """Raise MpitrainError naming the first invalid value and its source."""
    where = where or {f.name: _flag(f.name) for f in fields(Config)}

    def bad(name: str, expect: str) -> MpitrainError:
        src = where[name] if where[name] != "default" else _flag(name)
        return MpitrainError(f"{src}: expected {expect}, got {getattr(cfg, name)!r}")

    for name, choices in CHOICES.items():
        if getattr(cfg, name) not in choices:
            raise bad(name, "one of " + ", ".join(choices))
    positive = ["batch_size", "lr", "log_every"]
    for name in positive:
        if not getattr(cfg, name) > 0:
            raise bad(name, "a value > 0")
    for name in ("steps", "epochs"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise bad(name, "a value >= 1")
    if cfg.steps is not None and cfg.epochs is not None:
        raise MpitrainError(f"{where['steps']} and {where['epochs']}: give one of the two, "
                            f"not both (got {cfg.steps} steps and {cfg.epochs} epochs)")
    if cfg.eval_every is not None and cfg.eval_every < 0:
        raise bad("eval_every", "a value >= 0")
    if not cfg.hidden or any(h < 1 for h in cfg.hidden):
        raise bad("hidden", "one or more positive widths")
    if not 0 <= cfg.momentum < 1:
        raise bad("momentum", "a value in [0, 1)")
    if cfg.weight_decay < 0:
        raise bad("weight_decay", "a value >= 0")
    if cfg.bucket_mb < 0:
        raise bad("bucket_mb", "a value >= 0")
    if cfg.grad_dtype != "full" and cfg.allreduce != "ring":
        raise MpitrainError(f"{where['grad_dtype']} {cfg.grad_dtype} needs --allreduce ring "
                            f"(got {cfg.allreduce}): MPI's Allreduce would also add in 16 bits")
    if cfg.progress == "test" and cfg.allreduce != "mpi":
        raise MpitrainError(f"{where['progress']} test drives MPI requests; --allreduce "
                            f"{cfg.allreduce} progresses on its own thread (--progress thread)")
    if cfg.pp < 1:
        raise bad("pp", "a value >= 1")
    if cfg.microbatches is not None and not 1 <= cfg.microbatches <= MAX_MICROBATCHES:
        raise bad("microbatches", f"a value in 1..{MAX_MICROBATCHES}")
    if cfg.stage_layers is not None and (not cfg.stage_layers or min(cfg.stage_layers) < 1):
        raise bad("stage_layers", "one or more counts >= 1")
    if cfg.ckpt_every < 0:
        raise bad("ckpt_every", "a value >= 0")
    if cfg.keep_last < 1:
        raise bad("keep_last", "a value >= 1 (the newest checkpoint is always kept)")
    if cfg.sigterm_grace < 0:
        raise bad("sigterm_grace", "a value >= 0 (0: never abort)")
    if cfg.watchdog < 0:
        raise bad("watchdog", "a value >= 0 (0 turns it off)")
    # A --resume file is looked for by rank 0 alone, which reads it: it may sit on
    # a disk the other ranks do not see.
    from .runtime import Faults

    try:
        Faults(cfg.fault)
    except MpitrainError as exc:
        raise MpitrainError(f"{where['fault']}: {str(exc).split(': ', 1)[1]}") from None
    if cfg.data is not None and not os.path.isdir(cfg.data):
        raise MpitrainError(f"{where['data']}: {cfg.data}: no such dataset directory")

