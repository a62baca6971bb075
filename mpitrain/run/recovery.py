"""What the training loop carries across a healing, and how the ranks agree on it.

When a rank dies (``--on-failure shrink|respawn``, ``fault.elastic``) each
survivor leaves the loop with a ``Carry``: its trainer (the parameters and
optimizer state it holds), how many steps it applied, and the loop's own
state (the monitor, clipping counts, whether the last step's evaluation and
checkpoint were done).  The healed ranks then build a new trainer on the
healed communicator and ``agree``:

    completed, source = max over ranks of (steps applied, -rank)
    every rank  <- source's parameters, optimizer state and loop state
    Comm.Agree(1)                      the hand-over is final everywhere

A step's update is applied only after its all-reduce completed, and a
completed all-reduce holds every rank's gradients, so the survivor with the
most steps has a correct state; survivors one step behind (whose all-reduce
failed) and replacements (``completed`` -1) take it.  Nothing is read from
disk and no step is lost.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from mpi4py import MPI

from ..parallel.base import TrainerBase
from ..runtime import EXIT_ERROR, ConfigError

__all__ = ["Carry", "agree", "describe"]


@dataclass
class Carry:
    """A rank's state when it left the loop for a healing (a replacement's: empty)."""

    trainer: Optional[TrainerBase] = None
    completed: int = -1  # steps applied by this rank's trainer; -1: none (a replacement)
    loop: Dict[str, Any] = field(default_factory=dict)  # the loop's state, JSON-ready
    run_dir: Optional[str] = None
    failures: int = 0  # ranks lost so far in this job
    healings: int = 0  # healings so far in this job
    lost: List[int] = field(default_factory=list)  # launch ranks dead since the hand-over
    noticed: float = 0.0  # perf_counter() when this rank saw the failure
    phase: str = ""  # what it was doing
    reached: int = 0  # the (1-based) step this rank was running (0: none, a replacement)


def agree(trainer: TrainerBase, comm: MPI.Intracomm,
          carry: Carry) -> Tuple[int, Dict[str, Any], int, List[int]]:
    """Bring every rank to one state (collective); return (steps completed, the loop's
    state, the rank it came from, the ranks that moved).  Steps completed is -1 if no
    rank held a state yet (a death during start-up).

    Data parallelism goes forward to the rank that applied the most steps.  A
    pipeline goes back: its update of step k follows a world-wide sum, yet a stage
    whose ranks all missed it cannot be brought forward, so ranks that applied
    step k undo it (``TrainerBase.roll_back``) and step k runs again.  Within each
    stage the lowest replica holding that state hands it to the others.
    """
    g = trainer.grid
    done = comm.allgather(carry.completed)  # every rank's steps applied (-1: none)
    held = [c for c in done if c >= 0]
    if not held:  # a death before any rank held a state (start-up): start again
        comm.Agree(1)
        return -1, {}, 0, []
    back = trainer.keep_before_update
    target = min(held) if back else max(held)
    moved = [r for r, c in enumerate(done) if c >= 0 and c != target]
    if back and carry.completed > target:
        carry.trainer.roll_back()
        carry.completed = target
    have = g.dp_comm.allgather(carry.completed == target)
    orphans = comm.allreduce([g.pp_rank] if g.dp_rank == 0 and not any(have) else [],
                             op=MPI.SUM)
    if orphans:
        raise ConfigError(f"pipeline stage(s) {sorted(orphans)} lost every replica: healing "
                          "needs another replica of each stage to take the state from (more "
                          "ranks per stage, or {on_failure} abort and a relaunch from the "
                          "checkpoint)", ["on_failure"], everywhere=True, code=EXIT_ERROR)
    source = have.index(True)  # this stage's replica to take the state from
    trainer.take_over(source, carry.trainer if g.dp_rank == source else None)
    loop_source = done.index(target)  # the lowest rank whose loop is at that step
    loop = comm.bcast(carry.loop if comm.Get_rank() == loop_source else None,
                      root=loop_source)
    comm.Agree(1)  # a failure during the hand-over raises here, on every rank
    return target, loop, loop_source, moved


def describe(carry: Carry, ranks: int, mode: str, at_step: int, source: int,
             behind: List[int], seconds: float, died: Optional[int] = None
             ) -> Tuple[str, Dict[str, Any]]:
    """The log line and the metrics.jsonl record of one healing (``carry.lost``: the
    launch ranks of the processes that died; ``died``: the furthest step a rank started,
    if later than the one the job goes on from: local SGD goes back to its last sync,
    and its survivors see a death a step or more after it, at a sum)."""
    dead = ", ".join(map(str, carry.lost))
    how = (f"respawned {'it' if len(carry.lost) == 1 else 'them'}" if mode == "respawn"
           else f"shrank to {ranks} ranks")
    died = max(died or 0, at_step + 1)
    went_back = died > at_step + 1
    back = (f" (its last sync point: steps {at_step + 1}-{died} run again)" if went_back
            else f" (ranks {behind} were a step apart)" if behind else "")
    when = f"by step {died}" if went_back else f"at step {died}"  # seen at a later sum
    line = (f"rank{'s' * (len(carry.lost) > 1)} {dead} died {when}: {how} "
            f"in {seconds:.2f} s and went on from step {at_step + 1} with rank {source}'s "
            "state" + back)
    record = {"event": "recovery", "mode": mode, "dead": list(carry.lost), "at_step": at_step,
              "died_in": died,
              "ranks": ranks, "seconds": round(seconds, 4), "source": source,
              "behind": behind, "healings": carry.healings, "time": time.time()}
    return line, record
