"""The options' rules: types, ranges, combinations, and options the run would ignore.

``validate`` raises ``ConfigError`` naming the first invalid value; an option
the chosen layout would ignore (``schedule`` without a pipeline, ``lr_min``
without the cosine schedule, ``hidden`` beside ``model``) is refused with the
reason, never ignored.
"""
from __future__ import annotations

import math
import re
from dataclasses import fields
from typing import Dict, List, Tuple

from ..comm.algorithms import check_options
from ..fault.drills import Faults
from ..parallel.pipeline.schedules import MAX_MICROBATCHES
from ..parallel.recipe import RECIPE_BOUNDS
from ..runtime import ConfigError, MpitrainError, literal
from .options import CHOICES, Config

__all__ = ["validate", "refuse_what_does_not_apply", "check_length", "types", "OK", "BOUNDS",
           "TORCH_GIVES", "option_rules"]

DEFAULTS = {f.name: f.default for f in fields(Config)}


def _changed(cfg: Config, name: str) -> bool:
    default = DEFAULTS[name]
    return getattr(cfg, name) != (list(default) if isinstance(default, tuple) else default)


def types() -> Dict[str, str]:
    """Field name -> its base type ('int', 'float', 'str', 'bool', 'List[int]')."""
    out = {}
    for f in fields(Config):
        base = f.type[len("Optional["):-1] if f.type.startswith("Optional[") else f.type
        out[f.name] = base
    return out


OK = {
    "bool": lambda v: isinstance(v, bool),
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "List[int]": lambda v: isinstance(v, (list, tuple)) and all(
        isinstance(i, int) and not isinstance(i, bool) for i in v),
}


# name -> (comparison, bound, a note for the message): the numbers' valid ranges.
BOUNDS = {
    # the trainers' own options: their rules are the trainers' (parallel.recipe)
    **{name: (op, bound, "") for name, (op, bound) in RECIPE_BOUNDS.items()},
    "lr": (">", 0, ""), "log_every": (">", 0, ""),
    "steps": (">=", 1, ""), "epochs": (">=", 1, ""), "eval_every": (">=", 0, ""),
    "weight_decay": (">=", 0, ""), "bucket_mb": (">=", 0, ""),
    "pp": (">=", 1, ""), "ckpt_every": (">=", 0, ""),
    "warmup_steps": (">=", 0, ""), "lr_min": (">=", 0, ""), "lr_step_every": (">=", 1, ""),
    "lr_gamma": (">", 0, ""), "early_stop": (">=", 1, ""),
    "keep_last": (">=", 1, " (the newest checkpoint is always kept)"),
    "sigterm_grace": (">=", 0, " (0: never abort)"),
    "watchdog": (">=", 0, " (0 turns it off)"),
    "max_failures": (">=", 1, ""),
    "servers": (">=", 1, ""), "groups": (">=", 1, ""), "staleness": (">=", 0, ""),
    "sync_every": (">=", 1, " (1: a synchronous step)"), "outer_lr": (">", 0, ""),
}
MONITOR = re.compile(r"^val_[a-z][a-z0-9_]*$")


def validate(cfg: Config) -> None:
    """Raise ConfigError naming the first invalid value (or combination)."""

    def bad(name: str, expect: str) -> ConfigError:
        return ConfigError(f"{{{name}}}: expected {expect}, got {literal(repr(getattr(cfg, name)))}",
                           [name])

    for name, base in types().items():
        value = getattr(cfg, name)
        if value is None and DEFAULTS[name] is None:
            continue
        if not OK[base](value):
            raise bad(name, f"a value of type {base}")
        if base == "float" and not math.isfinite(value):
            raise bad(name, "a finite number")
    for name, choices in CHOICES.items():
        if getattr(cfg, name) not in choices and not (getattr(cfg, name) is None
                                                      and DEFAULTS[name] is None):
            raise bad(name, "one of " + ", ".join(choices))
    if cfg.torch is not None and (cfg.torch.count(":") != 1 or not all(
            part.strip() for part in cfg.torch.split(":"))):
        raise bad("torch", "MODULE:FUNCTION, e.g. mymodels.mlp:make")
    for name in ("data", "ckpt_dir", "run_dir", "log", "resume", "fault", "model", "timeline"):
        if getattr(cfg, name) is not None and not getattr(cfg, name).strip():
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
    if not 0 <= cfg.dropout < 1:
        raise bad("dropout", "a probability in [0, 1)")
    if cfg.lr_min > cfg.lr:
        raise ConfigError(f"{{lr_min}} {cfg.lr_min:g} is above {{lr}} {cfg.lr:g}: the cosine "
                          "schedule falls from lr to lr_min", ["lr_min", "lr"])
    if not MONITOR.match(cfg.monitor):
        raise bad("monitor", "a validation metric: val_loss, val_accuracy, val_rmse...")
    check_options(cfg.allreduce if cfg.allreduce != "auto" else "ring" if cfg.wire() else "mpi",
                  cfg.progress, cfg.wire())
    if cfg.on_failure == "shrink" and cfg.pipelined():
        raise ConfigError(f"{{on_failure}} shrink with {{pp}} {cfg.pp}: not supported: the "
                          "survivors no longer form pp stages of equal size ({on_failure} "
                          "respawn keeps the layout)", ["on_failure", "pp"])
    if cfg.on_failure != "abort" and cfg.allreduce == "shm":
        raise ConfigError(f"{{on_failure}} {cfg.on_failure} with {{allreduce}} shm: not "
                          "supported: a node's ranks share one copy of the parameters in an "
                          "MPI window, and ULFM does not make windows fault tolerant (use "
                          "{allreduce} mpi or ring)", ["on_failure", "allreduce"])
    if not 0 <= cfg.outer_momentum < 1:
        raise bad("outer_momentum", "a value in [0, 1)")
    _check_strategy(cfg)
    _check_local(cfg)
    if cfg.timeline_steps is not None and not (
            re.fullmatch(r"\d+:\d+", cfg.timeline_steps)
            and 1 <= int(cfg.timeline_steps.split(":")[0]) <= int(cfg.timeline_steps.split(":")[1])):
        raise bad("timeline_steps", "FIRST:LAST, two step numbers with 1 <= FIRST <= LAST, e.g. "
                                    "100:110")
    if cfg.microbatches is not None and not 1 <= cfg.microbatches <= MAX_MICROBATCHES:
        raise bad("microbatches", f"a value in 1..{MAX_MICROBATCHES}")
    if cfg.stage_layers is not None and (not cfg.stage_layers or min(cfg.stage_layers) < 1):
        raise bad("stage_layers", "one or more counts >= 1")
    try:
        Faults(cfg.fault)
    except MpitrainError as exc:
        raise ConfigError("{fault}: " + literal(str(exc)), ["fault"]) from None
    refuse_what_does_not_apply(cfg)


def _check_strategy(cfg: Config) -> None:
    """What the parameter server, speed-balanced batches and --reproducible cannot be
    combined with."""
    if cfg.reproducible:
        for ok, what in ((cfg.allreduce != "shm" or cfg.pp == 1,
                          f"{{allreduce}} shm and {{pp}} {cfg.pp}: a stage's fixed-order sum "
                          "over its replicas runs on MPI (use {allreduce} mpi or ring: they "
                          "give the same bits)"),
                         (cfg.grad_dtype == "full", "{grad_dtype} " + cfg.grad_dtype + ": the "
                          "groups' sum travels in the model's dtype; a 16-bit wire would round "
                          "it by how the groups are split"),
                         (not cfg.ps(), "{strategy} ps: its servers add pushes in float"),
                         (cfg.balance == "none", "{balance} speed: the groups are fixed, not "
                          "cut by speed"),
                         (cfg.microbatches is None, f"{{microbatches}} {cfg.microbatches}: "
                          "a pipeline's micro-batches are the fixed groups (set {groups})")):
            if not ok:
                named = [n for n in ("allreduce", "pp", "grad_dtype", "strategy", "balance",
                                     "microbatches", "groups")
                         if "{" + n + "}" in what]
                raise ConfigError("{reproducible} with " + what, ["reproducible", *named])
    if cfg.ps() and cfg.pp > 1:
        raise ConfigError(f"{{strategy}} ps with {{pp}} {cfg.pp}: not supported: a server "
                          "holds a slice of the whole model, and pipeline stages exchange "
                          "their gradients by all-reduce among replicas (use {strategy} "
                          "allreduce)", ["strategy", "pp"])
    if cfg.ps() and cfg.on_failure != "abort":
        raise ConfigError(f"{{on_failure}} {cfg.on_failure} with {{strategy}} ps: not "
                          "supported: a server's slice of the parameters and its optimizer "
                          "state exist on no other rank, so a dead server cannot be replaced "
                          "without a checkpoint (use {on_failure} abort and relaunch: the run "
                          "resumes from --ckpt-dir)", ["on_failure", "strategy"])
    if cfg.balance == "speed" and cfg.staleness > 0:
        raise ConfigError(f"{{balance}} speed with {{staleness}} {cfg.staleness}: the speed "
                          "split is for synchronous steps; stale-synchronous workers already "
                          "run at their own pace (use one or the other)",
                          ["balance", "staleness"])
    if cfg.balance == "speed" and cfg.pipelined():
        raise ConfigError(f"{{balance}} speed with {{pp}} {cfg.pp}: not supported: a "
                          "pipeline's stages must see the same micro-batches",
                          ["balance", "pp"])


def _check_local(cfg: Config) -> None:
    """What local SGD ({sync_every} > 1) cannot be combined with, each with the reason."""
    if not cfg.local():
        return
    h = f"{{sync_every}} {cfg.sync_every}"
    refusals = [
        (cfg.ps(), f"{h} with {{strategy}} ps: not supported: local SGD averages the "
         "replicas' own copies of the model, and a parameter server's workers hold none (use "
         "{strategy} allreduce)", ["strategy"]),
        (cfg.pp > 1, f"{h} with {{pp}} {cfg.pp}: not supported: local SGD averages whole "
         "replicas, and a pipeline stage holds a part of the model", ["pp"]),
        (cfg.reproducible, f"{h} with {{reproducible}}: not supported: its fixed groups make "
         "one synchronous sum the same at any rank count, and a local step is each replica's "
         "own", ["reproducible"]),
        (cfg.torch is not None, f"{h} with {{torch}}: not supported: the PyTorch front end "
         "exchanges gradients every step (local SGD covers mpitrain's own models)", ["torch"]),
        (cfg.balance == "speed", f"{h} with {{balance}} speed: not supported: local SGD "
         "weighs the replicas by fixed slices of each batch", ["balance"]),
        (cfg.grad_dtype != "full", f"{h} with {{grad_dtype}} {cfg.grad_dtype}: not "
         "supported: no gradient is exchanged; the parameters are averaged in their own "
         "dtype", ["grad_dtype"]),
    ]
    for wrong, why, named in refusals:
        if wrong:
            raise ConfigError(why, ["sync_every", *named])


def _check_sync_points(cfg: Config, given) -> None:
    """With local SGD, periodic logs, evaluations and checkpoints given by the user fall on
    sync points; a default that does not is taken at the next sync (``run.loop``)."""
    if not cfg.local():
        return
    for name in ("log_every", "eval_every", "ckpt_every"):
        value = getattr(cfg, name)
        if value and value % cfg.sync_every and (_changed(cfg, name) or name in given):
            raise ConfigError(f"{{{name}}} {value} is not a multiple of {{sync_every}} "
                              f"{cfg.sync_every}: logs, evaluations and checkpoints fall on "
                              "sync points, where the replicas agree", [name, "sync_every"])


# What a PyTorch model ({torch}, mpitrain.torch.fit) brings itself: these options describe
# mpitrain's own model and optimizer.
TORCH_GIVES = {
    **{name: "describes mpitrain's own model, and this run's is a PyTorch model"
       for name in ("model", "hidden", "activation", "dropout")},
    **{name: "configures mpitrain's own optimizer, and this run's is a torch optimizer"
       for name in ("optimizer", "momentum", "weight_decay")},
    "loss": "picks mpitrain's loss, and this run's is the PyTorch model's loss_fn",
    "dtype": "is the precision of mpitrain's own model; a PyTorch model's parameters have "
             "their own",
}
TORCH_LR = ("is the peak of mpitrain's own optimizer; a torch optimizer's is the lr it was "
            "made with (each parameter group's own, which the lr schedule scales)")


def _refuse_for_torch(cfg: Config, given) -> None:
    """What a PyTorch model cannot do: a parameter server, a pipeline, ``lr``."""
    if cfg.torch is None:
        return
    if cfg.ps():
        raise ConfigError("{strategy} ps does not apply to a PyTorch model: its optimizer "
                          "updates the whole model on every rank (use {strategy} allreduce)",
                          ["strategy", "torch"])
    if cfg.pp > 1:
        raise ConfigError(f"{{pp}} {cfg.pp} does not apply to a PyTorch model: mpitrain cuts "
                          "only its own layers into pipeline stages", ["pp", "torch"])
    if "lr" in given:
        raise ConfigError(f"{{lr}} {cfg.lr:g} does not apply: it {TORCH_LR}", ["lr", "torch"])
    for name, why in TORCH_GIVES.items():
        if _changed(cfg, name) or name in given:
            value = literal(repr(getattr(cfg, name)))
            raise ConfigError(f"{{{name}}} {value} does not apply: it {why}", [name, "torch"])


def refuse_what_does_not_apply(cfg: Config, given=()) -> None:
    """A non-default option the chosen layout would ignore is an error, with the reason;
    so is one in ``given`` (the keys the command line or TOML file set), even a default."""
    _refuse_for_torch(cfg, given)
    _check_sync_points(cfg, given)
    for name, ignored, why, others in option_rules(cfg):
        if ignored and (_changed(cfg, name) or name in given):
            value = literal(repr(getattr(cfg, name)))
            raise ConfigError(f"{{{name}}} {value} does not apply: it {why}", [name, *others])


def option_rules(cfg: Config) -> List[Tuple[str, bool, str, List[str]]]:
    """(option, whether ``cfg`` would ignore it, why, the options that decide) for each
    option that applies to some layouts only (the reference lists the deciding ones)."""
    best = cfg.keep_best and cfg.ckpt_dir is not None
    rules = [
        ("shuffle_window", cfg.shuffle == "global",
         "is the window of {shuffle} chunks; this run's {shuffle} is global", ["shuffle"]),
        ("microbatches", cfg.pp == 1,
         "cuts a pipeline's batch, and {pp} is 1: {accumulate} N computes each batch in N "
         "micro-batches without a pipeline", ["pp", "accumulate"]),
        ("schedule", not cfg.pipelined(),
         "orders a pipeline's micro-batches; {pp} is 1", ["pp"]),
        ("stage_layers", cfg.pp == 1, "splits the model into pipeline stages; {pp} is 1",
         ["pp"]),
        ("momentum", cfg.optimizer != "momentum",
         "is the momentum of {optimizer} momentum; this run's {optimizer} is " + cfg.optimizer,
         ["optimizer"]),
        ("lr_min", cfg.lr_schedule != "cosine",
         "ends the cosine {lr_schedule}; this run's is " + cfg.lr_schedule, ["lr_schedule"]),
        ("lr_step_every", cfg.lr_schedule != "step",
         "spaces the step {lr_schedule}'s decays; this run's is " + cfg.lr_schedule,
         ["lr_schedule"]),
        ("lr_gamma", cfg.lr_schedule != "step",
         "is the step {lr_schedule}'s factor; this run's is " + cfg.lr_schedule,
         ["lr_schedule"]),
        ("monitor", cfg.early_stop is None and not best,
         "is what {early_stop} and best.h5 (with {ckpt_dir}) follow, and neither is asked "
         "for", ["early_stop", "ckpt_dir"]),
        ("keep_best", cfg.ckpt_dir is None, "keeps best.h5 in {ckpt_dir}; none is given",
         ["ckpt_dir"]),
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
        ("fault", cfg.on_failure == "abort" and "heal-kill" in (cfg.fault or ""),
         "kills a rank during a healing; {on_failure} is abort", ["on_failure"]),
        ("fault", cfg.on_failure != "respawn" and "join-hang" in (cfg.fault or ""),
         f"hangs a replacement rank as it joins; {{on_failure}} is {cfg.on_failure}",
         ["on_failure"]),
    ]
    rules.append(("max_failures", cfg.on_failure == "abort",
                  "bounds the deaths a healing job survives; {on_failure} is abort",
                  ["on_failure"]))
    for option in ("servers", "staleness"):
        rules.append((option, not cfg.ps(),
                      "applies to the parameter server; this run's {strategy} is "
                      + cfg.strategy, ["strategy"]))
    for option in ("allreduce", "progress", "grad_dtype"):
        rules.append((option, cfg.ps(),
                      "chooses how all-reduce sums the gradients; with {strategy} ps the "
                      "servers sum the workers' pushes", ["strategy"]))
    rules += _local_rules(cfg)
    rules.append(("groups", not cfg.reproducible,
                  "cuts the batches of {reproducible}, which is off", ["reproducible"]))
    rules.append(("timeline_steps", cfg.timeline is None,
                  "is the window of {timeline}, and none is asked for", ["timeline"]))
    rules.append(("overwrite", cfg.timeline is None,
                  "lets {timeline} replace a file, and none is asked for", ["timeline"]))
    rules.append(("balance_every", cfg.balance != "speed",
                  "spaces the speed measurements of {balance} speed; this run's {balance} is "
                  + cfg.balance, ["balance"]))
    for option in ("hidden", "activation", "dropout"):
        rules.append((option, cfg.model is not None,
                      "shapes the default MLP, and {model} is given: write it into the model",
                      ["model"]))
    for option in ("bucket_mb", "overlap", "progress"):
        rules.append((option, cfg.pipelined(),
                      "applies to data parallelism alone: a pipeline exchanges each stage's "
                      "gradients after its last backward pass", []))
    rules.append(("progress", cfg.overlap is False,
                  "moves an overlapped exchange; {overlap} is off", ["overlap"]))
    return rules



def _local_rules(cfg: Config) -> List[Tuple[str, bool, str, List[str]]]:
    """``option_rules``' entries of local SGD: its outer step, and the exchange it has not."""
    rules = [(option, not cfg.local(), "is local SGD's outer step, and {sync_every} is 1",
              ["sync_every"]) for option in ("outer_lr", "outer_momentum")]
    rules.append(("outer_momentum", cfg.local() and cfg.outer_lr is None,
                  "is the momentum of the outer step, and no {outer_lr} is given",
                  ["outer_lr"]))
    rules += [(option, cfg.local(),
               "shapes the gradients' exchange, and with {sync_every} > 1 none crosses "
               "ranks: the parameters are averaged at each sync, by {allreduce}",
               ["sync_every", "allreduce"])
              for option in ("bucket_mb", "overlap", "progress")]
    return rules


def check_length(cfg: Config, total: int, steps_per_epoch: int) -> None:
    """Refuse what cannot make sense over a run of ``total`` steps (known once the data
    is): a schedule longer than the run, a window after its end, a balance or early stop
    that can never act.  Every rank finds the same, so every rank raises it."""
    rules = [
        ("warmup_steps", cfg.warmup_steps and cfg.warmup_steps >= total,
         f"{cfg.warmup_steps} is as long as the run ({total} steps) or longer: the lr would "
         "never reach its peak {lr}"),
        ("lr_step_every", cfg.lr_schedule == "step"
         and (cfg.lr_step_every or steps_per_epoch) >= total,
         f"{cfg.lr_step_every or steps_per_epoch} (one epoch, if not given) is as long as the "
         f"run ({total} steps) or longer: the step {{lr_schedule}} would never lower the lr"),
        ("timeline_steps", cfg.timeline_steps and cfg.timeline_window()[0] > total,
         f"{cfg.timeline_steps} starts after the run's last step ({total}): the timeline "
         "would record nothing"),
        ("balance_every", cfg.balance == "speed" and cfg.balance_every >= total,
         f"{cfg.balance_every} is as long as the run ({total} steps) or longer: the batches "
         "would never be re-split"),
        ("early_stop", cfg.early_stop is not None and cfg.eval_every == 0,
         f"{cfg.early_stop} follows evaluations, and {{eval_every}} 0 evaluates once, at the "
         "end: the run could never stop early"),
    ]
    for name, wrong, why in rules:
        if wrong:
            raise ConfigError(f"{{{name}}} {why}", None, everywhere=True)
