"""Learning-rate schedules: the rate of each step, a pure function of the step.

``constant``, ``step`` (multiplied by ``gamma`` every ``step_every`` steps) or
``cosine`` (from ``lr`` down to ``lr_min`` over the run), each after an
optional linear ``warmup`` from 0.  Because the rate depends on nothing but
the step, a resumed run takes exactly the rates the uninterrupted one would.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["SCHEDULES", "Schedule"]

SCHEDULES = ("constant", "step", "cosine")


@dataclass(frozen=True)
class Schedule:
    """The learning rate of each (0-based) step of a run of ``total`` steps."""

    lr: float
    kind: str = "constant"
    total: int = 1
    warmup: int = 0
    lr_min: float = 0.0
    step_every: int = 1000
    gamma: float = 0.1

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got "
                             f"{self.kind!r}")

    def __call__(self, step: int) -> float:
        """The rate step ``step`` (0-based) updates with."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        if self.kind == "step":
            return self.lr * self.gamma ** ((step - self.warmup) // self.step_every)
        if self.kind == "cosine":
            span = max(1, self.total - self.warmup)
            t = min(1.0, (step - self.warmup) / span)
            return self.lr_min + 0.5 * (self.lr - self.lr_min) * (1 + math.cos(math.pi * t))
        return self.lr

    def describe(self) -> str:
        """One line for the run's banner."""
        text = f"lr {self.lr:g}"
        if self.kind == "step":
            text += f", x{self.gamma:g} every {self.step_every} steps"
        elif self.kind == "cosine":
            text += f", cosine to {self.lr_min:g} over {self.total} steps"
        if self.warmup:
            text += f", after {self.warmup} warm-up steps"
        return text
