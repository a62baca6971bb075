"""Pipeline schedules as pure generators of ("F" | "B", micro-batch) for one stage.

Both run the backward passes in micro-batch order, so they give the same
bits; they differ in how many micro-batches' activations a stage holds at
once (GPipe all M, 1F1B at most ``stages - stage``).  Testable without MPI::

    >>> list(one_f_one_b(stages=2, stage=0, microbatches=3))
    [('F', 0), ('F', 1), ('B', 0), ('F', 2), ('B', 1), ('B', 2)]
"""
from __future__ import annotations

from typing import Iterator, Tuple

__all__ = ["SCHEDULES", "MAX_MICROBATCHES", "gpipe", "one_f_one_b", "schedule", "peak_alive"]

SCHEDULES = ("gpipe", "1f1b")
MAX_MICROBATCHES = 8000  # message tags 2k, 2k + 1 stay below MPI's guaranteed 32767

Op = Tuple[str, int]


def gpipe(stages: int, stage: int, microbatches: int) -> Iterator[Op]:
    """All forward passes, then all backward passes (M activations alive)."""
    for k in range(microbatches):
        yield "F", k
    for k in range(microbatches):
        yield "B", k


def one_f_one_b(stages: int, stage: int, microbatches: int) -> Iterator[Op]:
    """1F1B: at most (stages - stage) micro-batches alive on this stage."""
    m = microbatches
    warmup = min(stages - stage - 1, m)
    # Run warm-up forward passes.
    for k in range(warmup):
        yield "F", k
    # Run 1F1B in steady state: one forward, then the oldest backward.
    for i in range(m - warmup):
        yield "F", warmup + i
        yield "B", i
    # Run cool-down backward passes.
    for i in range(m - warmup, m):
        yield "B", i


def schedule(name: str, stages: int, stage: int, microbatches: int) -> Iterator[Op]:
    """The schedule called ``name`` (one of ``SCHEDULES``)."""
    if name not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {name!r}")
    return (gpipe if name == "gpipe" else one_f_one_b)(stages, stage, microbatches)


def peak_alive(name: str, stages: int, stage: int, microbatches: int) -> int:
    """The most micro-batches whose activations the stage holds at once."""
    alive = peak = 0
    for op, _ in schedule(name, stages, stage, microbatches):
        alive += 1 if op == "F" else -1
        peak = max(peak, alive)
    return peak
