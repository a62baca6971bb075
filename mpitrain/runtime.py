"""Process start-up: threads per rank, the job-wide error type, abort-on-error.

This module must not import numpy at module level: ``limit_threads`` has to
run before the BLAS library is loaded, or its thread count is already fixed.
"""
from __future__ import annotations

import os
import sys
import traceback
from typing import Any, Callable, Dict, List, Optional, Tuple

__all__ = ["MpitrainError", "agreed", "limit_threads", "thread_report", "run_or_abort",
           "Preemption",
           "EXIT_PREEMPTED", "Faults", "Watchdog"]

# Every variable a BLAS or OpenMP runtime numpy may be linked with reads.
THREAD_VARS = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "BLIS_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)

# What limit_threads decided, for `mpitrain info` and the run summary.
_THREADS: Dict[str, object] = {}


class MpitrainError(Exception):
    """A user-facing error: bad input, a bad option, a diverged run.

    ``everywhere=True`` means every rank raised the same error at the same
    point (it was agreed by a collective), so rank 0 alone prints it and the
    ranks exit together; otherwise the raising rank prints it and aborts the
    job.
    """

    def __init__(self, message: str, *, everywhere: bool = False):
        super().__init__(message)
        self.everywhere = everywhere


def agreed(comm, fn: Callable[[], object]) -> object:
    """Run ``fn`` on every rank and agree on its outcome (collective): if it raised an
    MpitrainError on any rank (its file checks may see different file systems), every
    rank raises the lowest rank's error; else return this rank's result."""
    try:
        result, error = fn(), None
    except MpitrainError as exc:
        result, error = None, str(exc)
    errors = [e for e in comm.allgather(error) if e is not None]
    if errors:
        raise MpitrainError(errors[0], everywhere=True)
    return result


def on_root(comm, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 and broadcast its result; an error there is raised on
    every rank (collective)."""
    result = error = None
    if comm.Get_rank() == 0:
        try:
            result = fn()
        except (MpitrainError, OSError) as exc:
            error = str(exc)
    error, result = comm.bcast((error, result), root=0)
    if error:
        raise MpitrainError(error, everywhere=True)
    return result


def library_version() -> str:
    """The MPI library's name and version, on one line."""
    from mpi4py import MPI

    return " ".join(MPI.Get_library_version().strip().splitlines()[0].split())


def _local_ranks() -> Tuple[int, str]:
    """Ranks on this node, from the launcher's environment (1 if unknown)."""
    for var in ("MPI_LOCALNRANKS",  # MPICH Hydra
                "OMPI_COMM_WORLD_LOCAL_SIZE",  # Open MPI
                "MV2_COMM_WORLD_LOCAL_SIZE",  # MVAPICH
                "PALS_LOCAL_SIZE"):  # Cray PALS
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) > 0:
            return int(value), var
    # srun: SLURM_STEP_TASKS_PER_NODE is e.g. "4" or "4(x2),3".
    tasks = os.environ.get("SLURM_STEP_TASKS_PER_NODE", "")
    first = tasks.split("(")[0].split(",")[0]
    if first.isdigit() and int(first) > 0:
        return int(first), "SLURM_STEP_TASKS_PER_NODE"
    return 1, "no launcher"


# OpenBLAS's thread setter and getter, by the names its builds export (numpy's
# wheels bundle scipy-openblas, whose symbols carry a prefix and a suffix).
_OPENBLAS = [(f"{prefix}openblas_set_num_threads{suffix}",
              f"{prefix}openblas_get_num_threads{suffix}")
             for prefix in ("", "scipy_") for suffix in ("", "64_")]


def _loaded_openblas():
    """(set, get) of the OpenBLAS this process has loaded, or None (Linux only)."""
    import ctypes

    try:
        with open("/proc/self/maps", encoding="utf-8") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.lower()}
    except OSError:
        return None
    for path in sorted(p for p in paths if p.startswith("/")):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for setter, getter in _OPENBLAS:
            if hasattr(lib, setter) and hasattr(lib, getter):
                return getattr(lib, setter), getattr(lib, getter)
    return None


def blas_threads() -> Optional[int]:
    """Threads of the OpenBLAS numpy loaded, read from the library (None if unknown)."""
    found = _loaded_openblas()
    return int(found[1]()) if found else None


def limit_threads() -> Dict[str, object]:
    """Set BLAS/OpenMP threads to the cores available per rank, unless set.

    If the launcher bound this rank to a subset of the cores, that subset is
    the rank's share; otherwise the node's cores are divided by the number of
    ranks on the node.  A thread variable the user set is left alone.
    """
    if _THREADS:
        return _THREADS
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        cores = os.cpu_count() or 1
    local, source = _local_ranks()
    bound = cores < (os.cpu_count() or cores)
    threads = cores if bound else max(1, cores // local)
    user = {v: os.environ[v] for v in THREAD_VARS if v in os.environ}
    for var in THREAD_VARS:
        os.environ.setdefault(var, str(threads))
    _THREADS["ours"] = [v for v in THREAD_VARS if v not in user]
    late = "numpy" in sys.modules
    if user:
        how = "set by the user (" + ", ".join(f"{k}={v}" for k, v in user.items()) + ")"
    elif bound:
        how = f"{cores} cores bound to this rank"
    else:
        how = f"{cores} cores / {local} ranks on this node ({source})"
    if late and "OPENBLAS_NUM_THREADS" not in user and "OMP_NUM_THREADS" not in user:
        # numpy's OpenBLAS read the environment when it loaded: tell it directly.
        found = _loaded_openblas()
        if found:
            found[0](threads)
            how += f"; numpy was imported first, so its OpenBLAS was set to {threads} directly"
        else:
            how += "; numpy was imported before mpitrain, so BLAS may ignore it"
    omp = os.environ["OMP_NUM_THREADS"]
    _THREADS.update(threads=int(omp) if omp.isdigit() else omp, how=how)
    return _THREADS


def child_env() -> Dict[str, str]:
    """This process's environment for launching another MPI job: without the thread
    counts mpitrain chose for this process (the child's ranks choose their own) and
    without this process's MPI launcher state."""
    ours = set(_THREADS.get("ours", ()))
    return {k: v for k, v in os.environ.items()
            if k not in ours and not k.startswith(("PMI_", "MPI_LOCAL", "HYDRA_", "OMPI_",
                                                   "PMIX_"))}


def thread_report() -> str:
    """One line: the threads per rank and how the number was chosen."""
    info = limit_threads()
    actual = ""
    try:  # threadpoolctl is optional; it reads the loaded BLAS itself.
        from threadpoolctl import threadpool_info

        pools = threadpool_info()
        if pools:
            actual = " [" + ", ".join(
                f"{p['internal_api']}: {p['num_threads']}" for p in pools) + "]"
    except ImportError:
        pass
    return f"{info['threads']} ({info['how']}){actual}"


def drain_output(seconds: float = 2.0) -> None:
    """Flush stdout/stderr and wait (bounded) until the launcher has read them.

    MPI_Abort makes the launcher kill every rank at once; a message still in
    the pipe to the launcher would be lost with them.  On Linux FIONREAD on
    the pipe tells how much of it is still unread.
    """
    import time

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    try:
        import fcntl
        import struct
        import termios
    except ImportError:  # not POSIX
        return
    deadline = time.monotonic() + seconds
    for fd in (1, 2):
        while time.monotonic() < deadline:
            try:
                unread = struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0]
            except OSError:  # a file or terminal: nothing to wait for
                break
            if unread <= 0:
                break
            time.sleep(0.005)


def quiet_barrier(comm, seconds: float = float("inf")) -> bool:
    """A barrier that sleeps while it waits (idle ranks leave the cores to busy ones)
    and gives up after ``seconds``; True if every rank arrived."""
    import time

    request = comm.Ibarrier()
    deadline = time.monotonic() + seconds
    while not request.Test():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)  # polling an error path: no hurry, spare the core
    return True


def run_or_abort(fn: Callable[[], Optional[int]], comm=None) -> int:
    """Run ``fn``; on any exception print it once and end the whole job.

    An error raised on one rank aborts every rank with ``MPI_Abort`` (as
    ``python -m mpi4py`` does), because the other ranks would otherwise wait
    forever in their next collective and burn the allocation.  An error
    raised identically on every rank (``MpitrainError(everywhere=True)``) is
    printed by rank 0 and all ranks exit with status 2 together.
    """
    try:
        return int(fn() or 0)
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 - any error must end the job
        from mpi4py import MPI

        comm = comm if comm is not None else MPI.COMM_WORLD
        rank, size = comm.Get_rank(), comm.Get_size()
        where = f" (rank {rank} of {size})" if size > 1 else ""
        if isinstance(exc, MpitrainError):
            if exc.everywhere:
                if rank == 0:
                    print(f"mpitrain: error: {exc}", file=sys.stderr, flush=True)
                # Every rank should be here (the error was agreed); should one
                # not arrive, abort rather than wait for it forever.
                if quiet_barrier(comm, seconds=60):
                    raise SystemExit(2) from None
                code = 2
            else:
                print(f"mpitrain: error{where}: {exc}", file=sys.stderr, flush=True)
                code = 2
        elif isinstance(exc, KeyboardInterrupt):
            print(f"mpitrain: interrupted{where}", file=sys.stderr, flush=True)
            code = 130
        else:
            traceback.print_exc()
            print(f"mpitrain: error{where}: {type(exc).__name__}: {exc}",
                  file=sys.stderr, flush=True)
            code = 1
        if size > 1:
            drain_output()
            comm.Abort(code)
        return code


# ---------------------------------------------------------------------------
# Pre-emption: SIGTERM or SIGUSR1 asks the run to checkpoint and stop.

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again": a checkpoint was written, relaunch to resume


class Preemption:
    """Records SIGTERM/SIGUSR1; the trainer agrees on it across ranks at the next step.

    A rank blocked in a collective (because another rank died) never returns
    to Python to run a signal handler, so a SIGTERM would go unanswered until
    the launcher's SIGKILL (Slurm's KillWait: 30 s).  A thread therefore
    watches the signals through ``signal.set_wakeup_fd``: if the run has not
    stopped ``sigterm_grace`` seconds after a SIGTERM, the rank exits at once
    (status 143).  SIGUSR1 (an early warning) never ends a rank.
    """

    SIGNALS = ("SIGTERM", "SIGUSR1")
    EXIT_TERMINATED = 143

    def __init__(self, sigterm_grace: float = 10.0, enabled: bool = True):
        self.signal: Optional[str] = None
        self.grace, self.enabled = sigterm_grace, enabled
        self.finished = False  # set by the trainer once it stopped (or completed)
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
        # Not MPI_Abort: under srun's PMI-2 it waits for srun to kill the task, which
        # is the KillWait this is meant to save.  The launcher is ending the job
        # anyway (it sent the SIGTERM): each stuck rank exits by itself.
        os._exit(self.EXIT_TERMINATED)

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
        for num, old in self._old.items():
            signal.signal(num, old)

    @property
    def requested(self) -> bool:
        return self.signal is not None


# ---------------------------------------------------------------------------
# Fault injection, for tests and drills.

class Faults:
    """Planned failures, from ``--fault``: comma-separated ``ACTION:KEY=VALUE...``.

    - ``kill:rank=R:step=S``  rank R sends itself SIGKILL as step S starts (1-based)
    - ``stop:rank=R:step=S``  rank R sends itself SIGSTOP as step S starts
    - ``term:rank=R:step=S``  rank R sends itself SIGTERM (pre-emption) as step S starts
    - ``ckpt-kill:step=S``    the rank writing the checkpoint of step S gets
      SIGKILL half-way through the file

    Any of them may add ``attempt=N``: only on the N-th launch of the job
    (``$MPITRAIN_ATTEMPT``, set by examples/relaunch.sh, or Slurm's
    ``$SLURM_RESTART_COUNT + 1``; 1 if neither is set), so a relaunched job
    does not meet the same fault again.
    """

    ACTIONS = {"kill": ("rank", "step"), "stop": ("rank", "step"), "term": ("rank", "step"),
               "ckpt-kill": ("step",)}
    SIGNALS = {"kill": "SIGKILL", "stop": "SIGSTOP", "term": "SIGTERM"}

    def __init__(self, spec: Optional[str]):
        self.plans: List[Tuple[str, Dict[str, int]]] = []
        for part in filter(None, (spec or "").split(",")):
            action, *pairs = part.strip().split(":")
            if action not in self.ACTIONS:
                raise MpitrainError(f"--fault: unknown action {action!r} in {part!r} "
                                    f"(known: {', '.join(self.ACTIONS)})")
            try:
                keys = {k: int(v) for k, v in (p.split("=", 1) for p in pairs)}
            except ValueError:
                raise MpitrainError(f"--fault: expected KEY=INTEGER pairs in {part!r}") from None
            if set(keys) - {"attempt"} != set(self.ACTIONS[action]):
                raise MpitrainError(f"--fault: {action} takes "
                                    f"{', '.join(self.ACTIONS[action])} (and optionally "
                                    f"attempt), got {part!r}")
            if keys.pop("attempt", self.attempt) == self.attempt:
                self.plans.append((action, keys))

    @property
    def attempt(self) -> int:
        """Which launch of the job this is (1 for the first)."""
        if os.environ.get("MPITRAIN_ATTEMPT", "").isdigit():
            return int(os.environ["MPITRAIN_ATTEMPT"])
        if os.environ.get("SLURM_RESTART_COUNT", "").isdigit():
            return int(os.environ["SLURM_RESTART_COUNT"]) + 1
        return 1

    def at_step(self, rank: int, step: int) -> None:
        """Send the signal planned for ``rank`` at (1-based) ``step``, if any."""
        import signal

        for action, keys in self.plans:
            if action in self.SIGNALS and keys == {"rank": rank, "step": step}:
                print(f"mpitrain: fault drill: rank {rank} sends itself "
                      f"{self.SIGNALS[action]} at step {step}", file=sys.stderr, flush=True)
                sys.stdout.flush()
                os.kill(os.getpid(), getattr(signal, self.SIGNALS[action]))

    def in_checkpoint(self, step: int) -> Optional[Callable[[], None]]:
        """The fault to run half-way through writing the checkpoint of ``step``, if any."""
        import signal

        if any(a == "ckpt-kill" and k["step"] == step for a, k in self.plans):
            return lambda: os.kill(os.getpid(), signal.SIGKILL)
        return None


# ---------------------------------------------------------------------------
# The watchdog: a stalled step ends the job instead of the allocation.

class Watchdog:
    """Aborts the job when a rank sees no progress for ``limit`` seconds.

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

    def beat(self, step: int) -> None:
        """Progress: (1-based) ``step`` starts now."""
        import time

        self.step, self.phase, self.last = step, "reading data", time.monotonic()

    def close(self) -> None:
        """Stop watching (collective: frees the private communicator)."""
        self._stop.set()
        self._thread.join()
        self.comm.Free()

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
        else:  # a collector normally ends the job first; this is the fallback
            time.sleep(self.grace * 5)
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
        self.comm.Abort(3)  # a duplicate of the job's communicator: ends every rank
