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

from ..config import Config
from ..fault.drills import Faults
from ..fault.preemption import Preemption
from ..fault.resume import Checkpoints
from ..fault.watchdog import Watchdog
from ..runtime import EXIT_PREEMPTED, ConfigError, literal, on_root
from .build import build, lr_schedule
from .metrics import Meter, Reporter, banner, peak_rss, summarize, summary_line
from .monitor import Monitor
from .rundir import open_run_dir

__all__ = ["train"]


def _is_eval_step(cfg: Config, done: int, steps_per_epoch: int, total: int) -> bool:
    if done == total:
        return True
    if cfg.eval_every is None:
        return done % steps_per_epoch == 0
    return cfg.eval_every > 0 and done % cfg.eval_every == 0


def train(cfg: Config, comm: MPI.Comm, out: Optional[TextIO] = None) -> Dict[str, Any]:
    """Train as ``cfg`` says on the ranks of ``comm``; return the summary (on every rank)."""
    faults = Faults(cfg.fault)
    if faults.ranks() and faults.ranks()[-1] >= comm.size:
        raise ConfigError(f"{{fault}} {literal(cfg.fault)}: names rank {faults.ranks()[-1]}, "
                          f"and the job has {comm.size} ranks", everywhere=True)
    ckpts = Checkpoints(comm, cfg.ckpt_dir, every=cfg.ckpt_every, keep_last=cfg.keep_last,
                        resume=cfg.resume, config=cfg.to_dict(), faults=faults)
    notes = ckpts.open()  # its lock first: a second job on the directory touches nothing
    try:
        return _train(cfg, comm, out or sys.stdout, faults, ckpts, notes)
    finally:
        ckpts.close()


def _train(cfg: Config, comm: MPI.Comm, out: TextIO, faults: Faults, ckpts: Checkpoints,
           notes) -> Dict[str, Any]:
    # Watched from the start: a rank stuck reading the data or in start-up ends the job too.
    dog = Watchdog(comm, cfg.watchdog) if cfg.watchdog > 0 else None
    trainer, m = build(cfg, comm)
    spe = trainer.sampler.steps_per_epoch
    total = cfg.total_steps(spe)
    lr_at = lr_schedule(cfg, spe, total)
    has_val = trainer.val is not None and len(trainer.val) > 0
    monitor = Monitor.for_task(cfg.monitor, trainer.task.goals, cfg.early_stop, has_val)
    keep_best = bool(cfg.ckpt_dir and cfg.keep_best and has_val)
    headline = trainer.task.headline
    report = Reporter(comm.rank == 0, cfg.log, total, out,
                      run_dir=open_run_dir(cfg.to_dict(), comm), quiet=cfg.quiet,
                      headline=headline)
    on_root(comm, report.open_logs)
    for line in banner(cfg, trainer, m, comm.size, total, report.run_dir, lr_at) + notes:
        report.say(line)
    ckpts.say = report.say
    start = ckpts.resume(trainer)
    monitor.restore(ckpts.loop)
    meter = Meter(start, total)
    record: Dict[str, Any] = {}
    preempted, signal_name, end, early = False, None, total, None
    clipped_before = 0
    t_start = time.perf_counter()
    if start >= total:
        report.say(f"nothing to do: the checkpoint is at step {start} of {total}", always=True)
    elif monitor.exhausted():
        end = start
        report.say(f"nothing to do: the run stopped early at step {start}: "
                   f"{monitor.reason()}", always=True)
    else:
        if dog:
            trainer.on_phase = dog.set_phase
        trainer.prefetch(start, total)
        # Without a checkpoint directory there is nothing to stop at: signals keep their
        # default effect (SIGTERM ends the rank at once; the launcher ends the job).
        with Preemption(cfg.sigterm_grace, enabled=bool(cfg.ckpt_dir)) as preemption:
            for step in range(start, total):
                done = step + 1
                if dog:
                    dog.beat(done)
                faults.at_step(comm.rank, done)
                lr = lr_at(step)  # a pure function of the step: a resume takes the same
                trainer.set_lr(lr)
                t0 = time.perf_counter()
                loss, metrics, batch = trainer.step(step, stop=preemption.requested)
                meter.add(step, batch, time.perf_counter() - t0)
                stopping = trainer.stop_agreed
                if stopping:
                    preemption.finished = True  # the ranks agreed: no SIGTERM deadline now
                epoch = trainer.sampler.locate(step)[0]
                report.live_step({"step": done, "epoch": epoch, "loss": loss, **metrics,
                                  "lr": lr, "eta_s": meter.eta(done),
                                  "samples_per_s": batch / meter.last})
                evaluate = _is_eval_step(cfg, done, spe, total)
                improved = False
                if done % cfg.log_every == 0 or evaluate or stopping:
                    record = {"step": done, "epoch": epoch, "loss": loss, **metrics,
                              "samples_per_s": meter.window(), "lr": lr,
                              "eta_s": meter.eta(done)}
                    if cfg.clip_grad_norm is not None:  # steps clipped since the last record
                        record["clipped_steps"] = trainer.clipped - clipped_before
                        clipped_before = trainer.clipped
                    if evaluate:
                        record.update({f"val_{k}": v for k, v in
                                       (trainer.evaluate() or {}).items()})
                        if monitor.name in record:
                            improved = monitor.update(done, record)
                    report.step(record)
                if monitor.exhausted():
                    early = monitor.reason()
                periodic = ckpts.due(done, total, stopping or early is not None)
                if periodic or (improved and keep_best):
                    if dog:
                        dog.set_phase("checkpoint")
                    ckpts.save(trainer, done, {"lr": lr, **monitor.state()},
                               periodic=periodic, best=improved and keep_best)
                if early is not None:
                    end = done
                    break
                if stopping and done < total:  # at the last step it is just done
                    preempted, signal_name, end = True, preemption.signal, done
                    break
    # The one teardown, in one order.
    trainer.close()
    if dog:
        dog.set_phase("finished")
        dog.close()
    # The slowest rank's phase times: the step is as slow as its slowest rank.
    phases = np.array([trainer.times[k] for k in ("data", "compute", "exchange")])
    comm.Allreduce(MPI.IN_PLACE, phases, op=MPI.MAX)
    summary = summarize(meter, dict(zip(("data", "compute", "exchange"), phases)), ckpts,
                        record, wall=time.perf_counter() - t_start, ranks=comm.size,
                        end=end, preempted=preempted, early_stop=early,
                        best=monitor.state() if monitor.best is not None else None,
                        clipped=trainer.clipped if cfg.clip_grad_norm is not None else None)
    # The most a rank kept for backward at once (one micro-batch's; a pipeline stage's
    # micro-batches in flight).
    summary["peak_activation_bytes"] = comm.allreduce(trainer.peak_activation_bytes,
                                                      op=MPI.MAX)
    summary["peak_rss_bytes"] = comm.allreduce(peak_rss(), op=MPI.MAX)
    if end > start:
        report.say(summary_line(summary, headline), always=True)
    if preempted:
        report.say(f"stopped at step {end} on {signal_name or 'a signal to another rank'}; "
                   f"exit status {EXIT_PREEMPTED}: relaunch (resume auto, the default) to "
                   "continue",
                   always=True)
    report.close()
    trainer.close_data()
    return summary
