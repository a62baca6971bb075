"""Pre-emption: SIGTERM or SIGUSR1 asks the run to checkpoint and stop.

The handler only records the signal; the training loop folds it into the
next step's all-reduce, so every rank agrees to stop at the same step, writes
a checkpoint there and exits with ``EXIT_PREEMPTED`` (75).
"""
from __future__ import annotations

import os
import sys
from typing import Dict, Optional, Tuple

from ..runtime import EXIT_TERMINATED, drain_output, leaving

__all__ = ["Preemption"]

class Preemption:
    """Records SIGTERM/SIGUSR1; the trainer agrees on it across ranks at the next step::

        with Preemption(sigterm_grace=10) as signals:
            for step in range(start, steps):
                trainer.step(step, stop=signals)      # stop: whether a signal came
                if trainer.stop_agreed:               # every rank alike
                    ckpts.save(trainer, step + 1)
                    raise mpitrain.Preempted(step + 1, signals.signal)

    A rank blocked in a collective (because another rank died) never returns
    to Python to run a signal handler, so a SIGTERM would go unanswered until
    the launcher's SIGKILL (Slurm's KillWait: 30 s).  A thread therefore
    watches the signals through ``signal.set_wakeup_fd``: if the run has not
    stopped ``sigterm_grace`` seconds after a SIGTERM, the rank exits at once
    (``EXIT_TERMINATED``, 143).  SIGUSR1 (an early warning) never ends a rank.
    Once the ranks have agreed to stop (``agree``), SIGTERM stays ignored after the
    block: the rank leaves with the agreed status (``runtime.leaving``), and one that
    hung after that point would end by the launcher's SIGKILL.
    """

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self, sigterm_grace: float = 10.0, enabled: bool = True):
        self.signal: Optional[str] = None
        self.grace, self.enabled = sigterm_grace, enabled
        self.finished = False  # set by the trainer once it stopped (or completed)
        self.agreed = False  # set by agree(): every rank stops at this step
        self._old: Dict[int, object] = {}
        self._pipe: Optional[Tuple[int, int]] = None
        self._timer = None

    def __enter__(self) -> "Preemption":
        import signal
        import threading

        if not self.enabled:  # nothing to checkpoint to: signals keep their defaults
            return self
        for name in self.SIGNALS:
            num = getattr(signal, name)
            self._old[num] = signal.signal(num, self._handle)
        if self.grace > 0:
            read, write = os.pipe()
            os.set_blocking(write, False)
            self._pipe = (read, write)
            self._old_fd = signal.set_wakeup_fd(write)
            self._watcher = threading.Thread(target=self._watch, args=(read,),
                                             name="mpitrain-signals", daemon=True)
            self._watcher.start()
        return self

    def _handle(self, signum, frame) -> None:
        import signal

        self.signal = signal.Signals(signum).name

    def _watch(self, fd: int) -> None:
        import signal
        import threading

        while True:
            try:
                data = os.read(fd, 64)
            except OSError:
                return
            if not data:  # closed by __exit__
                return
            if signal.SIGTERM in data and self._timer is None and not self.finished:
                self._timer = threading.Timer(self.grace, self._too_late)
                self._timer.daemon = True
                self._timer.start()

    def _too_late(self) -> None:
        if self.finished:
            return
        print(f"mpitrain: SIGTERM: the ranks did not stop within {self.grace:g} s (a rank is "
              "dead, or stuck in a collective); ending this rank", file=sys.stderr, flush=True)
        drain_output()
        # Not MPI_Abort under srun: with PMI-2 it waits for srun to kill the task, which
        # is the KillWait this is meant to save; srun ends the job anyway (it sent the
        # SIGTERM), each stuck rank by itself.  Elsewhere MPI_Abort: a rank that cannot
        # answer a signal at all (stopped, or dead to it) is killed by the launcher's
        # abort; mpiexec only passed the SIGTERM on, and a stopped rank keeps it pending.
        if "SLURM_STEP_ID" not in os.environ:
            from mpi4py import MPI

            MPI.COMM_WORLD.Abort(EXIT_TERMINATED)
        os._exit(EXIT_TERMINATED)

    def agree(self) -> None:
        """Every rank agreed to stop at this step: no SIGTERM deadline, no SIGTERM after."""
        self.finished = self.agreed = True

    def __exit__(self, *exc) -> None:
        import signal

        self.finished = True
        if self._timer is not None:
            self._timer.cancel()
        if self._pipe is not None:
            signal.set_wakeup_fd(self._old_fd)
            read, write = self._pipe
            os.close(write)  # the watcher reads EOF and ends
            self._watcher.join()
            os.close(read)
            self._pipe = None
        for num, old in self._old.items():  # once agreed, SIGTERM stays with _handle
            if not (self.agreed and num == signal.SIGTERM):  # until leaving() ignores it
                signal.signal(num, old)
        if self.agreed:
            leaving()

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def __bool__(self) -> bool:
        """Whether a signal asked this rank to stop: a ``Preemption`` is a step's ``stop``,
        read as late as the step's exchange starts."""
        return self.signal is not None


# ---------------------------------------------------------------------------
