"""Healing a run when a rank dies (``on_failure`` shrink or respawn), behind one call.

The loop (``run.loop``) knows nothing of this but that an MPI failure leaves it
as ``RankFailed`` (``leave``).  ``Job.run`` then heals the communicator
(``fault.elastic.heal``: revoke, shrink, respawn) and starts the loop again on
it, which ``recover``s the state of the rank that got furthest
(``run.recovery``); a replacement process joins the job in ``Job``'s
constructor::

    job = Job(cfg, comm, faults)              # a replacement takes its place here
    summary = job.run(ckpts, attempt)         # attempt(comm, carry, notes) -> summary

With ``on_failure`` abort (the default) nothing here runs: a death ends the
job, and a relaunch resumes from the newest checkpoint.
"""
from __future__ import annotations

import atexit
import time
from typing import Any, Callable, Dict, List, Optional

import numpy as np
from mpi4py import MPI

from ..comm.topology import grid_coords, grid_rank
from ..config import Config
from ..fault.drills import Faults
from ..fault.elastic import (RankFailed, bounded, heal, join, launch_rank, launch_ranks,
                             unsupported)
from ..fault.resume import Checkpoints
from ..runtime import EXIT_ERROR, ConfigError, bound_finalize, literal, set_job_comm
from ..timeline import RECORDER, span
from . import recovery
from .recovery import Carry, describe

__all__ = ["Job", "leave", "recover"]


class Job:
    """The job's communicator across healings, and what the survivors carry."""

    def __init__(self, cfg: Config, comm: MPI.Comm, faults: Faults):
        self.cfg, self.comm, self.faults = cfg, comm, faults
        self.carry: Optional[Carry] = None
        self.launch: Optional[List[int]] = None
        parent = MPI.Comm.Get_parent() if cfg.on_failure == "respawn" else MPI.COMM_NULL
        if parent != MPI.COMM_NULL:  # a replacement for a dead rank: take its place
            with bounded(cfg.watchdog, "joining the job as a replacement rank",
                         MPI.COMM_WORLD.Get_rank()):
                healed = join(parent, faults.at_join)
            self.comm = healed.comm
            set_job_comm(self.comm)
            told, self.launch = healed.info, healed.launch
            self.carry = Carry(run_dir=told["run_dir"], healings=told["healings"],
                               failures=told["failures"] + len(told["dead"]),
                               lost=told["lost"] + told["dead"])
        ranks = faults.ranks()
        if ranks and ranks[-1] >= self.comm.size:
            raise ConfigError(f"{{fault}} {literal(cfg.fault)}: names rank {ranks[-1]}, and "
                              f"the job has {self.comm.size} ranks", everywhere=True)
        reason = unsupported(cfg.on_failure)
        if reason:
            raise ConfigError(f"{{on_failure}} {cfg.on_failure}: {reason}", ["on_failure"],
                              everywhere=True)
        if self.carry is None and cfg.on_failure != "abort":
            self.launch = launch_ranks(self.comm)  # who died, in the messages

    def run(self, ckpts: Checkpoints,
            attempt: Callable[[MPI.Comm, Optional[Carry], List[str]], Dict[str, Any]]
            ) -> Dict[str, Any]:
        """``attempt(comm, carry, notes)`` until it returns, healing the job each time a
        rank's death sends the survivors out of it."""
        # The lock first: a second job on the directory touches nothing.
        notes = ckpts.rebind(self.comm) if self.carry else ckpts.open()
        while True:
            try:
                summary = attempt(self.comm, self.carry, notes)
                if self.carry is not None:  # healed, or a replacement: in a script of
                    # one's own too (fit), Open MPI's finalize is bounded at exit
                    atexit.register(bound_finalize, 30)
                return summary
            except RankFailed as failed:
                self._heal(failed)
                notes = ckpts.rebind(self.comm)

    def _heal(self, failed: RankFailed) -> None:
        """Revoke, shrink, respawn (collective over the survivors); refuse to go on past
        ``max_failures`` or without a replica of each pipeline stage."""
        cfg, size = self.cfg, self.comm.size
        carry = self.carry = failed.carry
        carry.healings += 1
        with bounded(cfg.watchdog, f"healing {carry.healings} ({cfg.on_failure})",
                     launch_rank()):
            healed = heal(self.comm, cfg.on_failure, self.launch, also=failed.comms,
                          info={"run_dir": carry.run_dir, "healings": carry.healings,
                                "failures": carry.failures, "lost": carry.lost},
                          check=lambda dead: orphaned(cfg, size, carry.lost + dead))
        self.comm, self.launch = healed.comm, healed.launch
        set_job_comm(self.comm)
        if healed.refused:
            raise ConfigError(healed.refused, ["on_failure"], everywhere=True, code=EXIT_ERROR)
        carry.failures += len(healed.dead)
        carry.lost = carry.lost + healed.dead
        if carry.failures > cfg.max_failures:
            raise ConfigError(f"{carry.failures} ranks died, more than {{max_failures}} "
                              f"{cfg.max_failures}: ending the job", ["max_failures"],
                              everywhere=True, code=EXIT_ERROR)


def orphaned(cfg: Config, size: int, dead) -> Optional[str]:
    """Why a pipeline cannot heal without the ranks ``dead`` (launch ranks): a stage
    lost every replica, so nobody holds its state; None if each stage kept one."""
    if not cfg.pipelined():
        return None
    dp = size // cfg.pp
    stages = {grid_coords(r, cfg.pp, dp)[0] for r in dead}
    gone = sorted(s for s in stages if all(grid_rank(s, d, cfg.pp, dp) in dead
                                             for d in range(dp)))
    if not gone:
        return None
    return (f"pipeline stage(s) {gone} lost every replica: healing needs another replica "
            "of each stage to take the state from (more ranks per stage, or {on_failure} "
            "abort and a relaunch from the checkpoint)")


def leave(loop, exc: BaseException) -> RankFailed:
    """A rank died: stop what runs locally on ``loop`` and say what this rank carries
    out of it (its trainer's state, the steps it applied, the loop's progress)."""
    comms = []  # the trainer's and the watchdog's: revoked and freed by the healing
    if loop.trainer is not None:
        comms += loop.trainer.abandon()
    if loop.dog is not None:
        comms += loop.dog.abandon()
    if loop.report is not None:
        loop.report.close()
    old = loop.carry
    if old is not None and old.trainer is not None:
        carry = old  # the hand-over was not agreed: the old state still counts
    else:
        completed, state = loop.completed, loop.progress.to_json(loop.monitor)
        if loop.trainer is not None:  # local SGD: back to the last sync, where all agreed
            completed = loop.trainer.rewind(completed)
        back = completed < loop.completed
        if back and state["pending"] and state["pending"]["done"] != completed:
            state["pending"] = None  # a step after the sync: it runs again
        carry = Carry(trainer=loop.trainer, completed=completed, loop=state,
                      run_dir=loop.run_dir, failures=old.failures if old else 0,
                      healings=old.healings if old else 0,
                      reached=loop.completed + 1 if back else 0)
    if not carry.noticed:  # a death during a healing counts from the first notice
        carry.noticed = time.perf_counter()
    carry.phase = loop.phase
    failed = RankFailed(exc, loop.phase)
    failed.carry, failed.comms = carry, comms
    return failed


def recover(loop, notes: List[str]) -> int:
    """After a healing (collective over the healed ranks): every rank takes the state of
    the rank that got furthest; returns the step to go on from."""
    cfg, comm, carry, trainer = loop.cfg, loop.comm, loop.carry, loop.trainer
    loop.phase = "recovery"
    RECORDER.at_step(carry.completed + 1)
    agree = loop.faults.around_healing(recovery.agree, launch_rank(), carry.healings)
    with span("recovery", "fault", on_failure=cfg.on_failure):
        start, state, source, behind = agree(trainer, comm, carry)
    carry.trainer = None  # agreed: the state before the failure is not needed now
    if start < 0:  # a rank died during start-up: start up again
        start = loop.ckpts.resume(trainer)
        loop.monitor.restore(loop.ckpts.loop)
    else:
        loop.progress.take(state, loop.monitor)
    # One sum for two maxima: the furthest step a rank started (the drills up to it have
    # had their turn, though a local SGD job goes back and runs those steps again), and
    # the time from the first survivor's notice of the death to the state handed over.
    seen = np.array([carry.reached,
                     time.perf_counter() - carry.noticed if carry.noticed else 0.0])
    comm.Allreduce(MPI.IN_PLACE, seen, op=MPI.MAX)
    reached, took = int(seen[0]), float(seen[1])
    loop.faults.disarm_through(max(start + 1, reached))
    loop.completed = start
    line, event = describe(carry, comm.size, cfg.on_failure, start, source, behind, took,
                           died=reached)
    loop.report.event(line, event)
    carry.lost, carry.noticed = [], 0.0
    for line in notes:
        loop.report.say(line)
    return start
