"""Early stopping and the best checkpoint: following one validation metric.

After each evaluation the monitored metric (``val_loss``, ``val_accuracy``,
``val_rmse``...) either improves on the best so far, which makes it the best
(best.h5 is written), or it does not, which counts one evaluation without
improvement; ``patience`` of those in a row stop the run.  The state (best
value and step, evaluations without improvement) rides in every checkpoint,
so a resumed run stops where the uninterrupted one would have.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional

from ..runtime import ConfigError

__all__ = ["Monitor"]


class Monitor:
    """Follows validation metric ``name`` (``goal`` 'min' or 'max'); ``patience``: the
    evaluations without improvement that stop the run (None: never stop)."""

    def __init__(self, name: str, goal: str, patience: Optional[int] = None):
        self.name, self.goal, self.patience = name, goal, patience
        self.best: Optional[float] = None
        self.best_step: Optional[int] = None
        self.bad_evals = 0

    @classmethod
    def for_task(cls, name: str, goals: Dict[str, str], patience: Optional[int],
                 has_val: bool) -> "Monitor":
        """The monitor of metric ``name`` for a task of ``goals``; ConfigError (naming
        the parameters) for a metric the task has not, or early stopping without a
        validation split."""
        metric = name[len("val_"):]
        if metric not in goals:
            known = ", ".join(f"val_{k}" for k in goals)
            raise ConfigError(f"{{monitor}} {name}: this task's validation metrics are "
                              f"{known}", ["monitor"], everywhere=True)
        if patience is not None and not has_val:
            raise ConfigError(f"{{early_stop}} {patience} follows {name}, and the data has no "
                              "validation split: prepare it with a validation share, or "
                              "leave {early_stop} out", ["early_stop", "data"],
                              everywhere=True)
        return cls(name, goals[metric], patience)

    def better(self, value: float) -> bool:
        """Whether ``value`` improves on the best so far (NaN never does)."""
        if not math.isfinite(value):
            return False
        if self.best is None:
            return True
        return value < self.best if self.goal == "min" else value > self.best

    def update(self, step: int, record: Dict[str, Any]) -> bool:
        """Take the evaluation of ``step`` (a record holding the metric); return whether
        it is the best so far."""
        value = float(record[self.name])
        if self.better(value):
            self.best, self.best_step, self.bad_evals = value, step, 0
            return True
        self.bad_evals += 1
        return False

    def exhausted(self) -> bool:
        """Whether ``patience`` evaluations in a row brought no improvement."""
        return self.patience is not None and self.bad_evals >= self.patience

    def reason(self) -> str:
        """Why the run stopped early, in one line."""
        best = "none" if self.best is None else f"{self.best:.6g} at step {self.best_step}"
        return (f"early stop: {self.name} has not improved for {self.bad_evals} evaluations "
                f"(patience {self.patience}; best {best})")

    def state(self) -> Dict[str, Any]:
        """What a checkpoint keeps of it (JSON)."""
        return {"monitor": self.name, "best": self.best, "best_step": self.best_step,
                "bad_evals": self.bad_evals}

    def restore(self, state: Dict[str, Any]) -> None:
        """Continue from a checkpoint's state (ignored if it followed another metric)."""
        if state.get("monitor") != self.name:
            return
        self.best = state.get("best")
        self.best_step = state.get("best_step")
        self.bad_evals = int(state.get("bad_evals") or 0)
