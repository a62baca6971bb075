"""Failure drills: planned kills, stops and signals (``--fault``), for tests and practice."""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, Optional, Tuple

from ..runtime import MpitrainError

__all__ = ["Faults"]

def _log_drill(action: str, rank: int, step: int) -> None:
    """Append the drill and its wall time to ``$MPITRAIN_DRILL_LOG`` (bench recovery)."""
    import json
    import time

    path = os.environ.get("MPITRAIN_DRILL_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"action": action, "rank": rank, "step": step,
                                "time": time.time()}) + "\n")


class Faults:
    """Planned failures, from the ``fault`` option: comma-separated ``ACTION:KEY=VALUE...``.

    - ``kill:rank=R:step=S``  rank R sends itself SIGKILL as step S starts (1-based)
    - ``stop:rank=R:step=S``  rank R sends itself SIGSTOP as step S starts
    - ``term:rank=R:step=S``  rank R sends itself SIGTERM (pre-emption) as step S starts
    - ``ckpt-kill:step=S``    the rank writing the checkpoint of step S gets
      SIGKILL half-way through the file
    - ``heal-kill:rank=R:healing=N``  rank R sends itself SIGKILL during the N-th
      healing of the job, as the state is handed over (``--on-failure
      shrink|respawn``): a death during a recovery
    - ``join-hang:healing=N``  the replacement started by the N-th healing
      (``respawn``) hangs as it joins: the survivors wait on a process that is
      not dead, and the healing's bound (the watchdog's limit) must end the job
    - ``slow:rank=R:factor=F``  rank R takes F times its compute time every step
      (a persistent straggler: an older node, a busy neighbour)
    - ``jitter:prob=P:factor=F``  each rank's step is, with probability P, F times
      its compute time (transient stragglers: OS noise, I/O stalls); whether rank r
      is slowed at step k is drawn from ``default_rng([seed, step, r])``, so a
      run repeats

    Both stragglers sleep the difference before the step computes ((F - 1) times
    the rank's compute time of its previous step), so the effect is measurable on
    any machine and the other ranks wait for this rank's gradients.

    R is the rank at launch: after a shrink renumbers the survivors, a drill
    still names the process the user meant (a replacement has the rank of the
    process it replaced).

    A healed job starts again at the step the ranks agreed on: the drills up to
    the next step have had their turn, and ``disarm_through`` drops them, so a
    replacement (or a survivor renumbered by a shrink) does not meet them again.

    Any of them may add ``attempt=N``: only on the N-th launch of the job
    (``$MPITRAIN_ATTEMPT``, set by examples/relaunch.sh, or Slurm's
    ``$SLURM_RESTART_COUNT + 1``; 1 if neither is set), so a relaunched job
    does not meet the same fault again.
    """

    ACTIONS = {"kill": ("rank", "step"), "stop": ("rank", "step"), "term": ("rank", "step"),
               "ckpt-kill": ("step",), "heal-kill": ("rank", "healing"),
               "join-hang": ("healing",),
               "slow": ("rank", "factor"), "jitter": ("prob", "factor")}
    FLOATS = ("prob", "factor")  # the other keys are integers
    SIGNALS = {"kill": "SIGKILL", "stop": "SIGSTOP", "term": "SIGTERM"}

    def __init__(self, spec: Optional[str]):
        self.plans: List[Tuple[str, Dict[str, int]]] = []
        for part in filter(None, (spec or "").split(",")):
            action, *pairs = part.strip().split(":")
            if action not in self.ACTIONS:
                raise MpitrainError(f"unknown action {action!r} in {part!r} "
                                    f"(known: {', '.join(self.ACTIONS)})")
            try:
                keys = {k: float(v) if k in self.FLOATS else int(v)
                        for k, v in (p.split("=", 1) for p in pairs)}
            except ValueError:
                raise MpitrainError(f"expected KEY=NUMBER pairs (rank, step, healing and "
                                    f"attempt integers) in {part!r}") from None
            if set(keys) - {"attempt"} != set(self.ACTIONS[action]):
                raise MpitrainError(f"{action} takes "
                                    f"{', '.join(self.ACTIONS[action])} (and optionally "
                                    f"attempt), got {part!r}")
            if keys.get("factor", 1.0) < 1 or not 0 <= keys.get("prob", 0.0) <= 1:
                raise MpitrainError(f"{action} needs factor >= 1 and prob in [0, 1], got "
                                    f"{part!r}")
            if keys.pop("attempt", self.attempt) == self.attempt:
                self.plans.append((action, keys))

    def ranks(self) -> List[int]:
        """The ranks the planned faults name."""
        return sorted({keys["rank"] for _, keys in self.plans if "rank" in keys})

    @property
    def attempt(self) -> int:
        """Which launch of the job this is (1 for the first)."""
        if os.environ.get("MPITRAIN_ATTEMPT", "").isdigit():
            return int(os.environ["MPITRAIN_ATTEMPT"])
        if os.environ.get("SLURM_RESTART_COUNT", "").isdigit():
            return int(os.environ["SLURM_RESTART_COUNT"]) + 1
        return 1

    def at_step(self, rank: int, step: int) -> None:
        """Send the signal planned for ``rank`` at (1-based) ``step``, if any."""
        import signal

        for action, keys in self.plans:
            if action in self.SIGNALS and keys == {"rank": rank, "step": step}:
                print(f"mpitrain: fault drill: rank {rank} sends itself "
                      f"{self.SIGNALS[action]} at step {step}", file=sys.stderr, flush=True)
                sys.stdout.flush()
                _log_drill(action, rank, step)
                os.kill(os.getpid(), getattr(signal, self.SIGNALS[action]))

    def delay(self, rank: int, step: int, compute: float, seed: int = 0) -> float:
        """Seconds ``rank`` sleeps before computing (1-based) ``step``, whose previous
        step computed for ``compute`` seconds: the stragglers planned for it, or 0."""
        extra = 0.0
        for action, keys in self.plans:
            if action == "slow" and keys["rank"] == rank:
                extra += (keys["factor"] - 1) * compute
            elif action == "jitter" and keys["prob"] > 0:
                import numpy as np

                if np.random.default_rng([seed, step, rank]).random() < keys["prob"]:
                    extra += (keys["factor"] - 1) * compute
        return extra

    def stragglers(self) -> bool:
        """Whether a slow or jitter drill is planned."""
        return any(a in ("slow", "jitter") for a, _ in self.plans)

    def disarm_through(self, step: int) -> None:
        """Drop the drills planned for steps up to ``step`` (1-based): after a healing."""
        self.plans = [(a, k) for a, k in self.plans if k.get("step", step + 1) > step]

    def around_healing(self, fn: Callable, rank: int, healing: int) -> Callable:
        """``fn`` (the hand-over of the ``healing``-th healing), wrapped to SIGKILL
        ``rank`` first if a drill plans it; ``fn`` itself otherwise."""
        import signal

        if not any(a == "heal-kill" and k == {"rank": rank, "healing": healing}
                   for a, k in self.plans):
            return fn

        def killed_first(*args, **kwargs):
            print(f"mpitrain: fault drill: rank {rank} sends itself SIGKILL during healing "
                  f"{healing}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
            return fn(*args, **kwargs)

        return killed_first

    def at_join(self, told: Dict) -> None:
        """A replacement joining the job, told its place (``told["healings"]``: which
        healing started it): hang there for ever if a ``join-hang`` drill plans it."""
        import threading

        if any(a == "join-hang" and k == {"healing": told["healings"]} for a, k in self.plans):
            print(f"mpitrain: fault drill: the replacement of healing {told['healings']} "
                  "hangs as it joins", file=sys.stderr, flush=True)
            threading.Event().wait()

    def arm(self, trainer, rank: int, seed: int) -> None:
        """Arm this run's drills on ``trainer`` from outside (its instance only): its
        ``step`` first sends the signals planned for launch rank ``rank``, and its
        model's passes first sleep what the straggler drills plan."""
        if any(a in self.SIGNALS for a, _ in self.plans):
            trainer.step = _SignalFirst(trainer, self, rank)
        if self.stragglers():
            for name in ("forward", "backward"):
                setattr(trainer.model, name, _Slowed(trainer.model, name, self, rank, seed))

    @contextmanager
    def in_checkpoints(self) -> Iterator[None]:
        """For the block: the checkpoint of a step a ``ckpt-kill`` drill names SIGKILLs
        its writer half-way through its datasets (``fault.checkpoint.save`` wrapped)."""
        steps = {k["step"] for a, k in self.plans if a == "ckpt-kill"}
        if not steps:
            yield
            return
        from . import checkpoint

        save, write = checkpoint.save, checkpoint.write_datasets

        def dying(f, datasets):
            import signal

            write(f, datasets[:len(datasets) // 2])
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)

        def drilled_save(directory, state, **kwargs):
            if state.step not in steps:
                return save(directory, state, **kwargs)
            checkpoint.write_datasets = dying
            try:
                return save(directory, state, **kwargs)
            finally:
                checkpoint.write_datasets = write

        checkpoint.save = drilled_save
        try:
            yield
        finally:
            checkpoint.save = save


class _SignalFirst:
    """A trainer's ``step`` that first sends the signal a drill plans for that step."""

    def __init__(self, trainer, faults: Faults, rank: int):
        self.trainer, self.faults, self.rank = trainer, faults, rank

    def __call__(self, step: int, *args, **kwargs):
        self.faults.at_step(self.rank, step + 1)
        return type(self.trainer).step(self.trainer, step, *args, **kwargs)


class _Slowed:
    """A model's forward or backward pass that first sleeps what the straggler drills
    plan: (factor - 1) times that pass's own time in the previous step, so a slow rank's
    gradients come as late as a slow processor would make them.  A callable object, not
    a closure: a copy of the model (``copy.deepcopy``) gets one of its own."""

    def __init__(self, model, name: str, faults: Faults, rank: int, seed: int):
        self.model, self.name, self.faults = model, name, faults
        self.rank, self.seed = rank, seed
        self.last, self.step = 0.0, 0  # the pass's seconds last time; the training step

    def __call__(self, *args, **kwargs):
        import time

        if self.name == "forward":
            ctx = args[1] if len(args) > 1 else kwargs.get("ctx")
            if ctx is None or not ctx.training:  # evaluation runs at full speed
                return type(self.model).forward(self.model, *args, **kwargs)
            self.step = ctx.step
        extra = self.faults.delay(self.rank, self.step + 1, self.last, self.seed)
        if extra > 0:
            time.sleep(extra)
        t0 = time.perf_counter()
        out = getattr(type(self.model), self.name)(self.model, *args, **kwargs)
        self.last = time.perf_counter() - t0
        return out
