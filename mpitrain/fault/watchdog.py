"""The watchdog: a stalled step ends the job instead of the allocation."""
from __future__ import annotations

import sys
from typing import Dict, List

from ..runtime import EXIT_WATCHDOG, drain_output, require_thread_multiple

__all__ = ["Watchdog"]


class Watchdog:
    """Aborts the job when a rank sees no progress for ``limit`` seconds::

        with Watchdog(comm, 120) as dog:          # collective
            for step in range(start, steps):
                dog.beat(step + 1)
                trainer.step(step)

    The training loop calls ``beat(step)`` as each step starts and sets
    ``phase`` as it goes.  A thread on every rank checks the time since the
    last beat.  When it passes the limit, the rank reports (rank, step, phase)
    to ranks 0 and 1 on a private communicator; rank 0 (or rank 1, if rank 0
    does not answer) waits a grace period for the others' reports, then
    prints one message naming the step and the ranks that did not report (a
    stopped or hung rank cannot) and calls MPI_Abort.  A checkpoint write
    may take ``checkpoint_factor`` times the limit.
    """

    PHASES = ("starting", "reading data", "computing", "exchange", "evaluation",
              "checkpoint", "finished")

    def __init__(self, comm, limit: float, checkpoint_factor: float = 10.0):
        import threading
        import time

        require_thread_multiple(comm, "the watchdog ({watchdog} 0 turns it off)")
        self.comm = comm.Dup()  # its own context: its messages never meet the trainer's
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.limit, self.factor = float(limit), checkpoint_factor
        self.step, self.phase = 0, "starting"
        self.last = time.monotonic()
        self.grace = min(30.0, max(2.0, self.limit / 4))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mpitrain-watchdog",
                                        daemon=True)
        self._thread.start()

    def __enter__(self) -> "Watchdog":
        return self

    def __exit__(self, kind, exc, trace) -> None:
        if exc is None:
            self.close()
        else:  # another rank may not be here: stop watching without a collective
            self.abandon()

    def beat(self, step: int) -> None:
        """Progress: (1-based) ``step`` starts now."""
        import time

        self.step, self.phase, self.last = step, "reading data", time.monotonic()

    def set_phase(self, phase: str) -> None:
        """What this rank is doing now (one of ``PHASES``), for the report."""
        self.phase = phase

    def close(self) -> None:
        """Stop watching (collective: frees the private communicator)."""
        self._stop.set()
        self._thread.join()
        self.comm.Free()

    def abandon(self) -> list:
        """Stop watching after a rank died (local); returns the private communicator,
        for the healing to revoke and free."""
        self._stop.set()
        self._thread.join()
        return [self.comm]

    def _limit_now(self) -> float:
        slow = self.phase in ("starting", "checkpoint")  # data checks, checkpoint writes
        return self.limit * (self.factor if slow else 1.0)

    def _run(self) -> None:
        import time

        poll = min(1.0, self.limit / 10)
        while not self._stop.wait(poll):
            if time.monotonic() - self.last > self._limit_now():
                self._fire(time.monotonic() - self.last)
                return

    def _fire(self, stalled: float) -> None:
        import time

        import numpy as np
        from mpi4py import MPI

        TAG = 77
        me = np.array([self.rank, self.step, self.PHASES.index(self.phase), int(stalled)],
                      np.int64)
        collectors = [r for r in (0, 1) if r < self.size]
        requests = [self.comm.Isend(me, dest=r, tag=TAG) for r in collectors if r != self.rank]
        if self.rank in collectors:
            reports = {self.rank: me}
            deadline = time.monotonic() + self.grace * (1 + 2 * self.rank)
            while len(reports) < self.size and time.monotonic() < deadline:
                if self.comm.Iprobe(source=MPI.ANY_SOURCE, tag=TAG):
                    got = np.empty(4, np.int64)
                    self.comm.Recv(got, source=MPI.ANY_SOURCE, tag=TAG)
                    reports[int(got[0])] = got
                else:
                    time.sleep(0.01)
            if self.rank == 1 and 0 in reports:
                # Rank 0 answered: it prints and aborts (a rank stopped and woken by the
                # launcher's SIGCONT gets here too).  Open MPI's abort takes seconds to
                # end the job; wait for it rather than print the message a second time.
                time.sleep(self.grace * 5 + 5)
        else:  # a collector normally ends the job first; this is the fallback (an MPI's
            # abort of a job with a stopped rank can take many seconds: wait well past it)
            time.sleep(self.grace * 5 + 30)
            reports = {self.rank: me}
        silent = [r for r in range(self.size) if r not in reports]
        steps = sorted({int(r[1]) for r in reports.values()})
        waiting: Dict[str, List[int]] = {}
        for r in sorted(reports):
            waiting.setdefault(self.PHASES[int(reports[r][2])], []).append(r)
        doing = "; ".join(f"ranks {ranks} in {phase}" for phase, ranks in waiting.items())
        who = (f"rank(s) {silent} did not answer (stopped, hung or dead); " if silent
               else "every rank answered; ")
        print(f"mpitrain: watchdog: no progress for {stalled:.0f} s (limit "
              f"{self._limit_now():.0f} s) at step {steps[0] if steps else self.step}: "
              f"{who}{doing}. Aborting the job.", file=sys.stderr, flush=True)
        del requests
        drain_output()
        self.comm.Abort(EXIT_WATCHDOG)  # a duplicate of the job's communicator: ends every rank
