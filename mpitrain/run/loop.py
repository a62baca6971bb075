"""The training loop: banner, resume, then for each step (lr, step, log, evaluate,
checkpoint, stop?), then the summary.  Everything it needs is built elsewhere
(``build``); it does not know which trainer or synchronisation strategy runs.
"""
from __future__ import annotations

import sys
import time
from typing import Any, Dict, Optional, TextIO

import numpy as np
from mpi4py import MPI

from ..comm.topology import grid_coords, grid_rank
from ..config import Config
from ..fault.drills import Faults
from ..fault.elastic import (RankFailed, heal, is_failure, join, launch_rank, launch_ranks,
                             unsupported)
from ..fault.preemption import Preemption
from ..fault.resume import Checkpoints
from ..fault.watchdog import Watchdog
from ..runtime import EXIT_ERROR, EXIT_PREEMPTED, ConfigError, literal, on_root, set_job_comm
from ..timeline import RECORDER, span
from .build import build, lr_schedule
from .metrics import Meter, Reporter, banner, peak_rss, summarize, summary_line
from .monitor import Monitor
from .recovery import Carry, agree, describe
from .rundir import open_run_dir

__all__ = ["train"]


def _is_eval_step(cfg: Config, done: int, steps_per_epoch: int, total: int) -> bool:
    if done == total:
        return True
    if cfg.eval_every is None:
        return done % steps_per_epoch == 0
    return cfg.eval_every > 0 and done % cfg.eval_every == 0


def train(cfg: Config, comm: MPI.Comm, out: Optional[TextIO] = None) -> Dict[str, Any]:
    """Train as ``cfg`` says on the ranks of ``comm``; return the summary (on every rank).

    With ``on_failure`` shrink or respawn, a rank's death sends the survivors
    out of the loop (``RankFailed``), ``fault.elastic.heal`` gives them a
    working communicator, and the loop starts again on it from the state of
    the rank that got furthest (``run.recovery``); a replacement process joins
    here.
    """
    carry = None
    parent = MPI.Comm.Get_parent() if cfg.on_failure == "respawn" else MPI.COMM_NULL
    if parent != MPI.COMM_NULL:  # a replacement for a dead rank: take its place
        healed = join(parent)
        comm = healed.comm
        set_job_comm(comm)
        told, launch = healed.info, healed.launch
        carry = Carry(run_dir=told["run_dir"], failures=told["failures"] + len(told["dead"]),
                      healings=told["healings"], lost=told["lost"] + told["dead"])
    faults = Faults(cfg.fault)
    if faults.ranks() and faults.ranks()[-1] >= comm.size:
        raise ConfigError(f"{{fault}} {literal(cfg.fault)}: names rank {faults.ranks()[-1]}, "
                          f"and the job has {comm.size} ranks", everywhere=True)
    reason = unsupported(cfg.on_failure)
    if reason:
        raise ConfigError(f"{{on_failure}} {cfg.on_failure}: {reason}", ["on_failure"],
                          everywhere=True)
    if carry is None and cfg.on_failure != "abort":
        launch = launch_ranks(comm)  # each rank's launch rank: who died, in the messages
    ckpts = Checkpoints(comm, cfg.ckpt_dir, every=cfg.ckpt_every, keep_last=cfg.keep_last,
                        resume=cfg.resume, config=cfg.to_dict(), faults=faults)
    try:
        # Its lock first: a second job on the directory touches nothing.
        notes = ckpts.rebind(comm) if carry else ckpts.open()
        while True:
            try:
                return _train(cfg, comm, out or sys.stdout, faults, ckpts, notes, carry)
            except RankFailed as failed:
                carry = failed.carry
                carry.healings += 1
                healed = heal(comm, cfg.on_failure, launch, also=failed.comms,
                              info={"run_dir": carry.run_dir, "healings": carry.healings,
                                    "failures": carry.failures, "lost": carry.lost},
                              check=lambda dead: _orphaned(cfg, comm.size, carry.lost + dead))
                comm, launch = healed.comm, healed.launch
                set_job_comm(comm)
                if healed.refused:
                    raise ConfigError(healed.refused, ["on_failure"], everywhere=True,
                                      code=EXIT_ERROR)
                carry.failures += len(healed.dead)
                carry.lost = carry.lost + healed.dead
                if carry.failures > cfg.max_failures:
                    raise ConfigError(f"{carry.failures} ranks died, more than "
                                      f"{{max_failures}} {cfg.max_failures}: ending the job",
                                      ["max_failures"], everywhere=True, code=EXIT_ERROR)
                notes = ckpts.rebind(comm)
    finally:
        ckpts.close()


def _orphaned(cfg: Config, size: int, dead) -> Optional[str]:
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


def _train(cfg: Config, comm: MPI.Comm, out: TextIO, faults: Faults, ckpts: Checkpoints,
           notes, carry: Optional[Carry]) -> Dict[str, Any]:
    run = _Run(cfg, comm, faults, ckpts, carry)
    try:
        return run.go(out, notes)
    except MPI.Exception as exc:
        if cfg.on_failure == "abort" or not is_failure(exc):
            raise
        raise run.leave(exc) from None


class _Run:
    """One pass of the loop on one communicator (the whole run, unless a rank dies).

    Every attribute a healing needs is declared here: ``completed`` (steps
    this rank's trainer applied), ``pending`` (the last step's record while
    its evaluation and checkpoint are not done) and the loop's state.
    """

    def __init__(self, cfg: Config, comm: MPI.Comm, faults: Faults, ckpts: Checkpoints,
                 carry: Optional[Carry]):
        self.cfg, self.comm, self.faults, self.ckpts, self.carry = cfg, comm, faults, ckpts, carry
        self.trainer = None
        self.dog: Optional[Watchdog] = None
        self.report: Optional[Reporter] = None
        self.monitor: Optional[Monitor] = None
        self.completed = carry.completed if carry else -1
        self.pending: Optional[Dict[str, Any]] = None
        self.evaluated = False  # the pending step's evaluation is done (and monitored)
        self.clipped_before = 0
        self.record: Dict[str, Any] = {}
        self.phase = "starting"
        self.run_dir = carry.run_dir if carry else None

    def leave(self, exc: BaseException) -> RankFailed:
        """A rank died: stop what runs locally and say what this rank carries out."""
        comms = []  # the trainer's and the watchdog's: revoked and freed by the healing
        if self.trainer is not None:
            comms += self.trainer.abandon()
        if self.dog is not None:
            comms += self.dog.abandon()
        if self.report is not None:
            self.report.close()
        if self.carry is not None and self.carry.trainer is not None:
            carry = self.carry  # the hand-over was not agreed: the old state still counts
        else:
            carry = Carry(trainer=self.trainer, completed=self.completed,
                          loop=self.loop_state(), run_dir=self.run_dir,
                          failures=self.carry.failures if self.carry else 0,
                          healings=self.carry.healings if self.carry else 0)
        if not carry.noticed:  # a death during a healing counts from the first notice
            carry.noticed = time.perf_counter()
        carry.phase = self.phase
        failed = RankFailed(exc, self.phase)
        failed.carry, failed.comms = carry, comms
        return failed

    def loop_state(self) -> Dict[str, Any]:
        """The loop's state that a healed rank takes from the one that got furthest."""
        return {"monitor": self.monitor.state() if self.monitor else {},
                "clipped_before": self.clipped_before, "record": self.record,
                "pending": self.pending, "evaluated": self.evaluated}

    def go(self, out: TextIO, notes) -> Dict[str, Any]:
        cfg, comm, ckpts, carry = self.cfg, self.comm, self.ckpts, self.carry
        # Watched from the start: a rank stuck reading the data or in start-up ends the job.
        dog = self.dog = Watchdog(comm, cfg.watchdog) if cfg.watchdog > 0 else None
        if carry and cfg.check_data == "full":  # checked at the start; once is enough
            cfg = cfg.replace(check_data="meta")
        trainer, m = build(cfg, comm)
        # A healing pipeline may have to undo a step some stages applied (run.recovery).
        trainer.keep_before_update = cfg.pipelined() and cfg.on_failure != "abort"
        if self.faults.stragglers():
            trainer.slowdown = lambda step, seconds: self.faults.delay(launch_rank(), step,
                                                                       seconds, cfg.seed)
        self.trainer = trainer
        spe = trainer.sampler.steps_per_epoch
        total = cfg.total_steps(spe)
        lr_at = lr_schedule(cfg, spe, total)
        has_val = trainer.val is not None and len(trainer.val) > 0
        monitor = self.monitor = Monitor.for_task(cfg.monitor, trainer.task.goals,
                                                  cfg.early_stop, has_val)
        keep_best = bool(cfg.ckpt_dir and cfg.keep_best and has_val)
        headline = trainer.task.headline
        if self.run_dir is None:
            # what the trainer chose where the configuration left it None (the exchange)
            self.run_dir = open_run_dir({**cfg.to_dict(), **trainer.resolved}, comm)
        if cfg.timeline:
            RECORDER.start(comm, cfg.timeline_window())
        report = self.report = Reporter(comm.rank == 0, cfg.log, total, out,
                                        run_dir=self.run_dir, quiet=cfg.quiet,
                                        headline=headline)
        on_root(comm, report.open_logs)
        ckpts.say = report.say
        trainer.on_event = report.event
        if carry is None:
            for line in banner(cfg, trainer, m, comm.size, total, report.run_dir, lr_at) + notes:
                report.say(line)
            start = ckpts.resume(trainer)
            monitor.restore(ckpts.loop)
            self.completed = start  # the trainer holds the state of ``start`` steps now
        else:
            self.phase = "recovery"
            self.faults.in_healing(launch_rank(), carry.healings)
            RECORDER.at_step(carry.completed + 1)
            with span("recovery", "fault", on_failure=cfg.on_failure):
                start, loop, source, behind = agree(trainer, comm, carry)
            carry.trainer = None  # agreed: the state before the failure is not needed now
            if start < 0:  # a rank died during start-up: start up again
                start = ckpts.resume(trainer)
                monitor.restore(ckpts.loop)
            else:
                monitor.restore(loop["monitor"])
                self.clipped_before, self.record = loop["clipped_before"], loop["record"]
                self.pending, self.evaluated = loop["pending"], loop["evaluated"]
            self.faults.disarm_through(start + 1)  # their turn has come (and gone)
            self.completed = start
            # From the first survivor's notice of the death to the state handed over.
            took = comm.allreduce(time.perf_counter() - carry.noticed if carry.noticed
                                  else 0.0, op=MPI.MAX)
            line, event = describe(carry, comm.size, cfg.on_failure, start, source, behind,
                                   took)
            report.event(line, event)
            carry.lost, carry.noticed = [], 0.0
            for line in notes:
                report.say(line)
        meter = Meter(start, total)
        preempted, signal_name, end, early = False, None, total, None
        t_start = time.perf_counter()

        def after_step(done: int) -> bool:
            """Log, evaluate and checkpoint the step just done (``self.pending``);
            True if the run stops early here."""
            nonlocal early
            p = self.pending
            evaluate = _is_eval_step(cfg, done, spe, total)
            improved = False
            if not self.evaluated and (done % cfg.log_every == 0 or evaluate or p["stopping"]):
                self.phase = "evaluation"
                record = {"step": done, "epoch": p["epoch"], "loss": p["loss"], **p["metrics"],
                          "samples_per_s": meter.window(), "lr": p["lr"],
                          "eta_s": meter.eta(done), "time": round(time.time(), 3)}
                if cfg.clip_grad_norm is not None:  # steps clipped since the last record
                    record["clipped_steps"] = trainer.clipped - self.clipped_before
                if evaluate:
                    with span("evaluation", "evaluation", step=done):
                        record.update({f"val_{k}": v for k, v in
                                       (trainer.evaluate() or {}).items()})
                    if monitor.name in record:
                        improved = monitor.update(done, record)
                report.step(record)
                self.record = record
                if cfg.clip_grad_norm is not None:
                    self.clipped_before = trainer.clipped
            self.evaluated = True
            if monitor.exhausted():
                early = monitor.reason()
            periodic = ckpts.due(done, total, p["stopping"] or early is not None)
            if periodic or (improved and keep_best):
                self.phase = "checkpoint"
                if dog:
                    dog.set_phase("checkpoint")
                with span("checkpoint", "fault", step=done):
                    ckpts.save(trainer, done, {"lr": p["lr"], **monitor.state()},
                               periodic=periodic, best=improved and keep_best)
            self.pending = None
            return early is not None

        if self.pending is not None:  # the healing came between a step and its checkpoint
            after_step(start)
        if start >= total:
            report.say(f"nothing to do: the checkpoint is at step {start} of {total}",
                       always=True)
        elif monitor.exhausted():
            end = start
            report.say(f"nothing to do: the run stopped early at step {start}: "
                       f"{monitor.reason()}", always=True)
        else:
            if dog:
                trainer.on_phase = dog.set_phase
            trainer.prefetch(start, total)
            # Without a checkpoint directory there is nothing to stop at: signals keep
            # their default effect (SIGTERM ends the rank at once; the launcher ends the job).
            with Preemption(cfg.sigterm_grace, enabled=bool(cfg.ckpt_dir)) as preemption:
                for step in range(start, total):
                    done = step + 1
                    if dog:
                        dog.beat(done)
                    self.faults.at_step(launch_rank(), done)
                    self.phase = "step"
                    lr = lr_at(step)  # a pure function of the step: a resume takes the same
                    trainer.set_lr(lr)
                    t0 = time.perf_counter()
                    RECORDER.at_step(done)
                    with span(f"step {done}", "step"):
                        loss, metrics, batch = trainer.step(step, stop=preemption.requested)
                    # Applied: from here this rank's state is that of ``done`` steps.
                    self.completed, self.evaluated = done, False
                    meter.add(step, batch, time.perf_counter() - t0)
                    stopping = trainer.stop_agreed
                    if stopping:
                        preemption.agree()  # no SIGTERM deadline, none until the exit
                    epoch = trainer.sampler.locate(step)[0]
                    self.pending = {"epoch": epoch, "loss": loss, "metrics": metrics,
                                    "lr": lr, "stopping": stopping}
                    report.live_step({"step": done, "epoch": epoch, "loss": loss, **metrics,
                                      "lr": lr, "eta_s": meter.eta(done),
                                      "samples_per_s": batch / meter.last})
                    if after_step(done):
                        end = done
                        break
                    if stopping and done < total:  # at the last step it is just done
                        preempted, signal_name, end = True, preemption.signal, done
                        break
        self.phase = "summary"
        # The slowest rank's phase times: the step is as slow as its slowest rank.
        phases = np.array([trainer.times[k] for k in ("data", "compute", "exchange")])
        comm.Allreduce(MPI.IN_PLACE, phases, op=MPI.MAX)
        # The most a rank kept for backward at once (one micro-batch's; a pipeline
        # stage's micro-batches in flight), and its peak memory.
        peaks = np.array([trainer.peak_activation_bytes, peak_rss()], np.int64)
        comm.Allreduce(MPI.IN_PLACE, peaks, op=MPI.MAX)
        extras = trainer.extras(max(0, self.completed - start))
        # The one teardown, in one order.
        trainer.close()
        if dog:
            dog.set_phase("finished")
            dog.close()
        summary = summarize(meter, dict(zip(("data", "compute", "exchange"), phases)), ckpts,
                            self.record, wall=time.perf_counter() - t_start, ranks=comm.size,
                            end=end, preempted=preempted, early_stop=early,
                            best=monitor.state() if monitor.best is not None else None,
                            clipped=trainer.clipped if cfg.clip_grad_norm is not None
                            else None)
        summary["peak_activation_bytes"], summary["peak_rss_bytes"] = map(int, peaks)
        summary["failures"] = carry.failures if carry else 0
        summary.update(extras)
        if end > start:
            report.say(summary_line(summary, headline), always=True)
        if cfg.timeline:
            RECORDER.at_step(0)
            events = RECORDER.write(comm, cfg.timeline, {"ranks": comm.size,
                                                         "steps": cfg.timeline_steps or "all"})
            report.say(f"timeline: {events} events of {comm.size} ranks in {cfg.timeline} "
                       "(open it in Perfetto or chrome://tracing)", always=True)
        if preempted:
            report.say(f"stopped at step {end} on {signal_name or 'a signal to another rank'}; "
                       f"exit status {EXIT_PREEMPTED}: relaunch (resume auto, the default) to "
                       "continue", always=True)
        report.close()
        trainer.close_data()
        return summary
