"""The training loop: build, resume, then for each step (lr, step, log, evaluate,
checkpoint, stop?), then the summary.

Everything it drives is built elsewhere (``build``: the strategy; ``healing``:
what happens when a rank dies); it does not know which trainer runs.  Its
state between steps is typed: the last step's outcome (``Pending``) while its
log, evaluation and checkpoint are not all done, and what was last logged
(``Progress``), which a healing hands from the rank that got furthest.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, TextIO, Tuple

import numpy as np
from mpi4py import MPI

from ..config import Config
from ..config.rules import check_length
from ..fault.drills import Faults
from ..fault.elastic import is_failure, launch_rank
from ..fault.preemption import Preemption
from ..fault.resume import Checkpoints
from ..fault.watchdog import Watchdog
from ..runtime import on_root
from ..timeline import RECORDER, span
from . import healing
from .build import build, lr_schedule
from .banner import banner
from .metrics import Meter, Reporter, peak_rss, summarize, summary_line
from .monitor import Monitor
from .recovery import Carry
from .rundir import open_run_dir

__all__ = ["Loop", "Pending", "Progress"]


@dataclass
class Pending:
    """The last step applied, while its record, evaluation and checkpoint are not done."""

    done: int  # steps applied
    epoch: int
    loss: float
    metrics: Dict[str, Any]
    lr: float
    stopping: bool  # the ranks agreed to stop (pre-emption) at this step
    evaluated: bool = False  # its record (and evaluation) is done


@dataclass
class Progress:
    """What the loop carries from step to step, and a healing hands over."""

    record: Dict[str, Any] = field(default_factory=dict)  # the last logged record
    clipped_before: int = 0  # the trainer's clipped steps at that record
    pending: Optional[Pending] = None

    def to_json(self, monitor: Optional[Monitor]) -> Dict[str, Any]:
        """Everything, JSON-ready, with the monitor's state."""
        return {"monitor": monitor.state() if monitor else {}, "record": self.record,
                "clipped_before": self.clipped_before,
                "pending": asdict(self.pending) if self.pending else None}

    def take(self, state: Dict[str, Any], monitor: Monitor) -> None:
        """Continue from another rank's ``to_json``."""
        monitor.restore(state["monitor"])
        self.record, self.clipped_before = state["record"], state["clipped_before"]
        self.pending = Pending(**state["pending"]) if state["pending"] else None


def _is_eval_step(cfg: Config, done: int, steps_per_epoch: int, total: int) -> bool:
    if done == total:
        return True
    if cfg.eval_every is None:
        return done % steps_per_epoch == 0
    return cfg.eval_every > 0 and done % cfg.eval_every == 0


class Loop:
    """One pass of the loop on one communicator: the whole run, unless a rank dies.

    ``make(cfg, comm, check_start)``: the trainer and its connected data (``fit``'s
    and ``mpitrain.torch.fit``'s, with what they were given; default: ``build``).
    """

    def __init__(self, cfg: Config, comm: MPI.Comm, ckpts: Checkpoints, faults: Faults,
                 out: TextIO, carry: Optional[Carry] = None,
                 make: Optional[Callable[..., Tuple[Any, Any]]] = None):
        self.cfg, self.comm, self.ckpts, self.faults, self.out = cfg, comm, ckpts, faults, out
        self.carry = carry
        self.make = make or (lambda cfg, comm, check_start: build(cfg, comm,
                                                                  check_start=check_start))
        self.trainer = self.dog = self.report = self.monitor = None
        self.completed = carry.completed if carry else -1  # steps this rank's trainer applied
        self.progress = Progress()
        self.phase = "starting"
        self.run_dir = carry.run_dir if carry else None
        self.end, self.preempted, self.signal, self.early = 0, False, None, None

    def run(self, notes: List[str]) -> Dict[str, Any]:
        """Train; return the summary (on every rank).  A rank's death under ``on_failure``
        shrink or respawn leaves as ``RankFailed`` (``healing``)."""
        try:
            return self._run(notes)
        except MPI.Exception as exc:
            if self.cfg.on_failure != "abort" and is_failure(exc):
                raise healing.leave(self, exc) from None
            self._stop()
            raise
        except BaseException:
            self._stop()
            raise

    def _stop(self) -> None:
        """After an error (local): stop the watchdog and every helper thread, so a process
        that goes on (a script that caught the error) is not aborted by them later."""
        if self.dog is not None:
            self.dog.abandon()
        if self.trainer is not None and hasattr(self.trainer, "batches"):
            self.trainer.stop()
        if self.report is not None:
            self.report.close()
        RECORDER.enabled = RECORDER.on = False

    def _run(self, notes: List[str]) -> Dict[str, Any]:
        self._build()
        if self.carry is None:
            # The checkpoint to resume from is chosen and checked before anything is
            # written (the run's record, the logs): a refusal leaves the directory as it was.
            said: List[Tuple[str, bool]] = []
            self.ckpts.say = lambda text: said.append((text, False))
            self.ckpts.warn = lambda text: said.append((text, True))
            start = self.ckpts.resume(self.trainer)
            self.monitor.restore(self.ckpts.loop)
            self.completed = start  # the trainer holds the state of ``start`` steps now
            self._open_outputs()
            for line in banner(self.cfg, self.trainer, self.connected, self.comm.size,
                               self.total, self.run_dir, self.lr_at) + notes:
                self.report.say(line)
            for text, always in said:
                self.report.say(text, always=always)
        else:
            self._open_outputs()
            start = healing.recover(self, notes)
        self.meter = Meter(start, self.total)
        self.end, t0 = self.total, time.perf_counter()
        if self.progress.pending is not None:  # healed between a step and its checkpoint
            self.after_step(start)
        if not self._nothing_to_do(start):
            self._train(start)
        return self._finish(start, time.perf_counter() - t0)

    def _build(self) -> None:
        """The watchdog (from the start: a rank stuck in start-up ends the job), the
        trainer and what follows from it."""
        cfg = self.cfg
        self.dog = Watchdog(self.comm, cfg.watchdog) if cfg.watchdog > 0 else None
        if self.carry and cfg.check_data == "full":  # checked at the start; once is enough
            cfg = cfg.replace(check_data="meta")
        # After a healing the ranks hold different states until the hand-over.
        self.trainer, self.connected = self.make(cfg, self.comm, self.carry is None)
        # A healing pipeline may have to undo a step some stages applied (run.recovery).
        self.trainer.keep_before_update = cfg.pipelined() and cfg.on_failure != "abort"
        # Local SGD heals, and stops when pre-empted, from the last sync, where every
        # replica held the same state.
        self.trainer.keep_sync = cfg.local() and cfg.on_failure != "abort"
        self.trainer.watch_stop = cfg.local() and cfg.ckpt_dir is not None  # pre-emption
        self.faults.arm(self.trainer, launch_rank(), cfg.seed)
        spe = self.trainer.sampler.steps_per_epoch
        self.total = cfg.total_steps(spe)
        self.trainer.ends_at(self.total)  # local SGD syncs at the last step too
        check_length(cfg, self.total, spe)
        self.lr_at = lr_schedule(cfg, spe, self.total)
        has_val = self.connected.val is not None and len(self.connected.val) > 0
        self.monitor = Monitor.for_task(cfg.monitor, self.trainer.task.goals, cfg.early_stop,
                                        has_val)
        self.keep_best = bool(cfg.ckpt_dir and cfg.keep_best and has_val)

    def _open_outputs(self) -> None:
        """The run directory, the timeline, the reporter (collective)."""
        cfg, comm, trainer = self.cfg, self.comm, self.trainer
        if self.run_dir is None:
            # what the trainer chose where the configuration left it None (the exchange)
            self.run_dir = open_run_dir({**cfg.to_dict(), **trainer.resolved,
                                         "dataset": self.connected.name}, comm)
        if cfg.timeline:
            RECORDER.start(comm, cfg.timeline_window())
        self.report = Reporter(comm.rank == 0, cfg.log, self.total, self.out,
                               run_dir=self.run_dir, quiet=cfg.quiet,
                               headline=trainer.task.headline)
        on_root(comm, self.report.open_logs)
        self.ckpts.say = self.report.say
        self.ckpts.warn = lambda text: self.report.say(text, always=True)
        trainer.on_event = self.report.event

    def _nothing_to_do(self, start: int) -> bool:
        if start >= self.total:
            self.report.say(f"nothing to do: the checkpoint is at step {start} of "
                            f"{self.total}", always=True)
            return True
        if self.monitor.exhausted():
            self.end = start
            self.report.say(f"nothing to do: the run stopped early at step {start}: "
                            f"{self.monitor.reason()}", always=True)
            return True
        return False

    def _train(self, start: int) -> None:
        """Steps ``start``.. until the last, an early stop, or a pre-emption."""
        cfg, trainer, dog = self.cfg, self.trainer, self.dog
        if dog:
            trainer.on_phase = dog.set_phase
        trainer.prefetch(start, self.total)
        # Without a checkpoint directory there is nothing to stop at: signals keep
        # their default effect (SIGTERM ends the rank at once; the launcher ends the job).
        with Preemption(cfg.sigterm_grace, enabled=bool(cfg.ckpt_dir)) as signals:
            for step in range(start, self.total):
                done = step + 1
                if dog:
                    dog.beat(done)
                self.phase = "step"
                lr = self.lr_at(step)  # a pure function of the step: a resume takes the same
                trainer.set_lr(lr)
                t0 = time.perf_counter()
                RECORDER.at_step(done)
                with span(f"step {done}", "step"):
                    loss, metrics, batch = trainer.step(step, stop=signals)
                # Applied: from here this rank's state is that of ``done`` steps (local SGD
                # stopping between syncs goes back to its last sync point instead).
                back = trainer.stopped_at is not None
                if back:
                    done = trainer.stopped_at
                self.completed = done
                self.meter.add(step, batch, time.perf_counter() - t0)
                if trainer.stop_agreed:
                    signals.agree()  # no SIGTERM deadline, none until the exit
                epoch = trainer.sampler.locate(step)[0]
                self.progress.pending = Pending(done, epoch, loss, metrics, lr,
                                                trainer.stop_agreed, evaluated=back)
                self.report.live_step({"step": done, "epoch": epoch, "loss": loss, **metrics,
                                       "lr": lr, "eta_s": self.meter.eta(done),
                                       "samples_per_s": batch / self.meter.last})
                if self.after_step(done):
                    self.end = done
                    break
                if trainer.stop_agreed and done < self.total:  # at the last: just done
                    self.preempted, self.signal, self.end = True, signals.signal, done
                    break

    def after_step(self, done: int) -> bool:
        """Log, evaluate and checkpoint the step just done (``progress.pending``); True if
        the run stops early here."""
        cfg, trainer, p = self.cfg, self.trainer, self.progress.pending
        if not trainer.syncs_at(done):  # local SGD between syncs: the replicas differ
            self.progress.pending = None
            return False
        # What fell due since the last sync point is done at this one (every step of a
        # synchronous trainer is one).
        window = range(done - trainer.since_sync(done) + 1, done + 1)
        evaluate = any(_is_eval_step(cfg, d, trainer.sampler.steps_per_epoch, self.total)
                       for d in window)
        logs = any(d % cfg.log_every == 0 for d in window)
        improved = False
        if not p.evaluated and (logs or evaluate or p.stopping):
            self.phase = "evaluation"
            record = self._record(done, p)
            if evaluate:
                with span("evaluation", "evaluation", step=done):
                    record.update({f"val_{k}": v for k, v in
                                   (trainer.evaluate() or {}).items()})
                if self.monitor.name in record:
                    improved = self.monitor.update(done, record)
            self.report.step(record)
            self.progress.record = record
            self.progress.clipped_before = trainer.clipped
        p.evaluated = True
        if self.monitor.exhausted():
            self.early = self.monitor.reason()
        periodic = any(self.ckpts.due(d, self.total, p.stopping or self.early is not None)
                       for d in window)
        if periodic or (improved and self.keep_best):
            self.phase = "checkpoint"
            if self.dog:
                self.dog.set_phase("checkpoint")
            with span("checkpoint", "fault", step=done):
                self.ckpts.save(trainer, done, {"lr": p.lr, **self.monitor.state()},
                                periodic=periodic, best=improved and self.keep_best)
        self.progress.pending = None
        return self.early is not None

    def _record(self, done: int, p: Pending) -> Dict[str, Any]:
        """The step's record, as metrics.jsonl holds it."""
        record = {"step": done, "epoch": p.epoch, "loss": p.loss, **p.metrics,
                  "samples_per_s": self.meter.window(), "lr": p.lr,
                  "eta_s": self.meter.eta(done), "time": round(time.time(), 3)}
        if self.cfg.clip_grad_norm is not None:  # steps clipped since the last record
            record["clipped_steps"] = self.trainer.clipped - self.progress.clipped_before
        return record

    def _finish(self, start: int, wall: float) -> Dict[str, Any]:
        """The summary (collective), the one teardown, in one order."""
        cfg, comm, trainer = self.cfg, self.comm, self.trainer
        self.phase = "summary"
        # The slowest rank's phase times: the step is as slow as its slowest rank.
        phases = np.array([trainer.times[k] for k in ("data", "compute", "exchange")])
        comm.Allreduce(MPI.IN_PLACE, phases, op=MPI.MAX)
        # The most a rank kept for backward at once (one micro-batch's; a pipeline
        # stage's micro-batches in flight), and its peak memory.
        peaks = np.array([trainer.peak_activation_bytes, peak_rss()], np.int64)
        comm.Allreduce(MPI.IN_PLACE, peaks, op=MPI.MAX)
        extras = trainer.extras(max(0, self.completed - start))
        trainer.close()
        if self.dog:
            self.dog.set_phase("finished")
            self.dog.close()
        monitor = self.monitor
        summary = summarize(self.meter, dict(zip(("data", "compute", "exchange"), phases)),
                            self.ckpts, self.progress.record, wall=wall, ranks=comm.size,
                            end=self.end, preempted=self.preempted, early_stop=self.early,
                            best=monitor.state() if monitor.best is not None else None,
                            clipped=trainer.clipped if cfg.clip_grad_norm is not None
                            else None)
        summary["peak_activation_bytes"], summary["peak_rss_bytes"] = map(int, peaks)
        summary["failures"] = self.carry.failures if self.carry else 0
        summary["signal"] = self.signal
        summary.update(extras)
        self._last_words(summary, start)
        self.report.close()
        trainer.close_data()
        return summary

    def _last_words(self, summary: Dict[str, Any], start: int) -> None:
        """The summary line, the timeline, and what a pre-emption means."""
        cfg, comm = self.cfg, self.comm
        if self.end > start:
            self.report.say(summary_line(summary, self.trainer.task.headline), always=True)
        if cfg.timeline:
            RECORDER.at_step(0)
            events = RECORDER.write(comm, cfg.timeline, {"ranks": comm.size,
                                                         "steps": cfg.timeline_steps or "all"})
            self.report.say(f"timeline: {events} events of {comm.size} ranks in "
                            f"{cfg.timeline} (open it in Perfetto or chrome://tracing)",
                            always=True)
        if self.preempted:
            self.report.say(f"stopped at step {self.end} on "
                            f"{self.signal or 'a signal to another rank'}; exit status 75: "
                            "relaunch (resume auto, the default) to continue", always=True)
