"""The training loop: banner, resume, then for each step (step, log, evaluate, checkpoint,
stop?), then the summary.  Everything it needs is built elsewhere (``build``); it does
not know which trainer or synchronisation strategy runs.
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
from .build import build
from .metrics import Meter, Reporter, banner, summarize, summary_line
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
    headline = trainer.task.headline
    report = Reporter(comm.rank == 0, cfg.log, total, out,
                      run_dir=open_run_dir(cfg.to_dict(), comm), quiet=cfg.quiet,
                      headline=headline)
    on_root(comm, report.open_logs)
    for line in banner(cfg, trainer, m, comm.size, total, report.run_dir) + notes:
        report.say(line)
    ckpts.say = report.say
    start = ckpts.resume(trainer)
    meter = Meter(start, total)
    record: Dict[str, Any] = {}
    preempted, signal_name, end = False, None, total
    t_start = time.perf_counter()
    if start >= total:
        report.say(f"nothing to do: the checkpoint is at step {start} of {total}", always=True)
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
                t0 = time.perf_counter()
                loss, metrics, batch = trainer.step(step, stop=preemption.requested)
                meter.add(step, batch, time.perf_counter() - t0)
                stopping = trainer.stop_agreed
                if stopping:
                    preemption.finished = True  # the ranks agreed: no SIGTERM deadline now
                epoch = trainer.sampler.locate(step)[0]
                report.live_step({"step": done, "epoch": epoch, "loss": loss, **metrics,
                                  "eta_s": meter.eta(done), "samples_per_s": batch / meter.last})
                evaluate = _is_eval_step(cfg, done, spe, total)
                if done % cfg.log_every == 0 or evaluate or stopping:
                    record = {"step": done, "epoch": epoch, "loss": loss, **metrics,
                              "samples_per_s": meter.window(), "lr": cfg.lr,
                              "eta_s": meter.eta(done)}
                    if evaluate:
                        record.update({f"val_{k}": v for k, v in
                                       (trainer.evaluate() or {}).items()})
                    report.step(record)
                if ckpts.due(done, total, stopping):
                    if dog:
                        dog.set_phase("checkpoint")
                    ckpts.save(trainer, done)
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
                        end=end, preempted=preempted)
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
