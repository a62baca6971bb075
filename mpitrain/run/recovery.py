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

from ..fault.elastic import Healed
from ..parallel.base import TrainerBase

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
    healed: Optional[Healed] = None  # the last healing
    noticed: float = 0.0  # perf_counter() when this rank saw the failure
    phase: str = ""  # what it was doing


def agree(trainer: TrainerBase, comm: MPI.Intracomm,
          carry: Carry) -> Tuple[int, Dict[str, Any], int, List[int]]:
    """Hand every rank the state of the rank that applied the most steps (collective);
    return (steps completed, the loop's state, the source rank, ranks that were behind).
    Steps completed is -1 if no rank held a state yet (a death during start-up)."""
    completed, minus_source = comm.allreduce((carry.completed, -comm.Get_rank()), op=MPI.MAX)
    source = -minus_source
    behind = [r for r, c in enumerate(comm.allgather(carry.completed)) if 0 <= c < completed]
    if completed < 0:  # a death before any rank held a state (start-up): start again
        comm.Agree(1)
        return completed, {}, source, behind
    mine = comm.Get_rank() == source
    trainer.take_over(source, carry.trainer if mine else None)
    loop = comm.bcast(carry.loop if mine else None, root=source)
    comm.Agree(1)  # a failure during the hand-over raises here, on every rank
    return completed, loop, source, behind


def describe(carry: Carry, ranks: int, mode: str, at_step: int, source: int,
             behind: List[int], seconds: float) -> Tuple[str, Dict[str, Any]]:
    """The log line and the metrics.jsonl record of one healing (``carry.lost``: the
    launch ranks of the processes that died)."""
    dead = ", ".join(map(str, carry.lost))
    how = (f"respawned {'it' if len(carry.lost) == 1 else 'them'}" if mode == "respawn"
           else f"shrank to {ranks} ranks")
    line = (f"rank{'s' * (len(carry.lost) > 1)} {dead} died at step {at_step + 1}: {how} "
            f"in {seconds:.2f} s and went on from step {at_step + 1} with rank {source}'s "
            "state" + (f" (ranks {behind} were a step behind)" if behind else ""))
    record = {"event": "recovery", "mode": mode, "dead": list(carry.lost), "at_step": at_step,
              "ranks": ranks, "seconds": round(seconds, 4), "source": source,
              "behind": behind, "healings": carry.healings, "time": time.time()}
    return line, record
