"""What every part of mpitrain stands on: the job-wide error type, agreement, abort-on-error.

An error is either *agreed* (every rank raised the same ``MpitrainError`` at
the same point, ``everywhere=True``: rank 0 prints it once and all ranks exit
2 together) or *local* (one rank failed: it prints the message and calls
``MPI_Abort``, so the other ranks do not wait forever in their next
collective and burn the allocation).  ``agreed`` and ``on_root`` turn a
check that one rank (or each rank) makes into an agreed error.

This module imports neither numpy nor mpi4py at module level.
"""
from __future__ import annotations

import sys
import traceback
from typing import Any, Callable, Iterable, Optional

__all__ = ["MpitrainError", "ConfigError", "Preempted", "literal", "agreed", "on_root", "quiet_barrier",
           "require_thread_multiple",
           "run_or_abort", "end_job", "leaving", "library_version", "drain_output",
           "EXIT_OK", "EXIT_ERROR", "EXIT_BAD_INPUT", "EXIT_WATCHDOG", "EXIT_IO", "EXIT_PREEMPTED",
           "EXIT_TERMINATED"]

EXIT_OK = 0
EXIT_ERROR = 1  # an unexpected error: its traceback is printed
EXIT_BAD_INPUT = 2  # bad input or options, refused before the first step
EXIT_WATCHDOG = 3  # no progress within the watchdog's limit
EXIT_IO = 74  # EX_IOERR: a checkpoint could not be written (no space, read-only, I/O error)
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: a checkpoint was written; relaunch to continue
EXIT_TERMINATED = 143  # 128 + SIGTERM: stopped by a signal the ranks could not answer


class MpitrainError(Exception):
    """A user-facing error: bad input, a bad option, a diverged run.

    ``everywhere=True`` means every rank raised the same error at the same
    point (it was agreed by a collective), so rank 0 alone prints it and the
    ranks exit together; otherwise the raising rank prints it and aborts the
    job.
    """

    def __init__(self, message: str, *, everywhere: bool = False, code: int = 2):
        super().__init__(message)
        self.everywhere = everywhere
        self.code = code  # the exit status it ends the job with


class Preempted(MpitrainError, SystemExit):
    """The run stopped at a checkpoint because the job was asked to (SIGTERM, SIGUSR1):
    relaunch to continue from it.

    Raised on every rank alike.  It is also a ``SystemExit`` with status 75
    (``EX_TEMPFAIL``), so a script that lets it end the program exits 75,
    which ``slurm/train-requeue.sbatch`` and schedulers read as "requeue me".
    ``step``: the steps done, which the checkpoint holds.
    """

    def __init__(self, step: int, signal: Optional[str] = None):
        super().__init__(f"stopped at step {step} on {signal or 'a signal to another rank'}; "
                         f"exit status {EXIT_PREEMPTED}: relaunch to continue",
                         everywhere=True, code=EXIT_PREEMPTED)
        self.step, self.signal = step, signal


class ConfigError(MpitrainError):
    """A bad value of one or more configuration parameters.

    ``template`` names each parameter as ``{name}``; the library renders it as
    the parameter's name (``batch_size``), the command line as where the value
    came from (``--batch-size``, or a key of the TOML file): see ``render``.
    """

    def __init__(self, template: str, params: Optional[Iterable[str]] = None, *,
                 everywhere: bool = False, code: int = 2):
        import string

        if params is None:  # every {field} of the template
            params = [f for _, f, _, _ in string.Formatter().parse(template) if f]
        self.template, self.params = template, tuple(dict.fromkeys(params))
        super().__init__(self.render(lambda name: name), everywhere=everywhere, code=code)

    def render(self, name_of: Callable[[str], str]) -> str:
        """The message with each parameter named by ``name_of(parameter)``."""
        return self.template.format(**{p: name_of(p) for p in self.params})


def literal(text: str) -> str:
    """``text`` (a path, a value) made safe inside a ConfigError template."""
    return str(text).replace("{", "{{").replace("}", "}}")


def _portable(exc: MpitrainError) -> tuple:
    """An error as plain data another rank can raise again (see ``_raise``)."""
    if isinstance(exc, ConfigError):
        return ("config", exc.template, exc.params, exc.code)
    return ("plain", str(exc), (), exc.code)


def _raise(error: tuple) -> None:
    kind, text, params, code = error
    if kind == "config":
        raise ConfigError(text, params, everywhere=True)
    raise MpitrainError(text, everywhere=True, code=code)


def agreed(comm, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on every rank and agree on its outcome (collective): if it raised an
    MpitrainError on any rank (its file checks may see different file systems), every
    rank raises the lowest rank's error; else return this rank's result."""
    try:
        result, error = fn(), None
    except MpitrainError as exc:
        result, error = None, _portable(exc)
    errors = [e for e in comm.allgather(error) if e is not None]
    if errors:
        _raise(errors[0])
    return result


def on_root(comm, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 and broadcast its result; an error there (an MpitrainError,
    or an OSError) is raised on every rank (collective)."""
    result = error = None
    if comm.Get_rank() == 0:
        try:
            result = fn()
        except MpitrainError as exc:
            error = _portable(exc)
        except OSError as exc:
            error = ("plain", str(exc), (), EXIT_BAD_INPUT)
    error, result = comm.bcast((error, result), root=0)
    if error:
        _raise(error)
    return result


THREAD_LEVELS = ("single", "funneled", "serialized", "multiple")  # MPI.THREAD_SINGLE = 0 ...


def require_thread_multiple(comm, user: str) -> None:
    """Refuse to go on below ``MPI_THREAD_MULTIPLE``: ``user`` (a ConfigError template,
    e.g. "the watchdog ({watchdog} 0 turns it off)") calls MPI from its own thread
    while the main thread does (collective)."""
    from mpi4py import MPI

    def check() -> None:
        level = MPI.Query_thread()
        if level < MPI.THREAD_MULTIPLE:
            raise ConfigError(
                f"MPI runs at thread level {THREAD_LEVELS[level]!r}, but {user} calls MPI "
                "from its own thread while the main thread does, which needs 'multiple': "
                "unset MPI4PY_RC_THREAD_LEVEL (mpi4py asks for 'multiple' by default) or set "
                "it to 'multiple'")

    agreed(comm, check)


def library_version() -> str:
    """The MPI library's name and version, on one line."""
    from mpi4py import MPI

    text = " ".join(MPI.Get_library_version().strip().splitlines()[0].split())
    if text.startswith("Open MPI"):  # "Open MPI v5.0.11, package: ..., repo rev: ..."
        return text.split(",")[0]
    return text


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


def leaving() -> None:
    """From here this rank leaves with a status every rank agreed on: ignore SIGTERM.

    ``srun --kill-on-bad-exit=1`` signals the tasks still alive as soon as the
    first one exits non-zero.  A rank dying of that SIGTERM (143) a few
    milliseconds before its own exit would turn an agreed 75 (pre-empted:
    requeue) or 2 (bad input: do not relaunch) into a failure that the
    requeue script relaunches.  Only the main thread can change a handler.
    """
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


QUIET_NAPS = (0.001, 0.05)  # quiet_barrier's first and longest sleep between tests, s


def quiet_barrier(comm, seconds: float = float("inf")) -> bool:
    """A barrier that sleeps while it waits (idle ranks leave the cores to busy ones)
    and gives up after ``seconds``; True if every rank arrived."""
    import time

    # Naps double from 1 ms to 50 ms: a rank idle for long wakes 20 times a second, not
    # 1,000, since each wake-up takes a core from a rank that computes (oversubscribed
    # nodes feel it: bench train -n 4 on 2 cores).
    nap, longest = QUIET_NAPS
    request = comm.Ibarrier()
    deadline = time.monotonic() + seconds
    while not request.Test():
        if time.monotonic() > deadline:
            return False
        time.sleep(nap)
        nap = min(2 * nap, longest)
    return True


_JOB: list = []  # the job's communicator after a healing (fault.elastic), newest last


def set_job_comm(comm) -> None:
    """The communicator an error ends from now on (a healed job's, not COMM_WORLD)."""
    _JOB[:] = [comm]


def job_comm(default):
    """The communicator of the whole job: the healed one if any, else ``default``."""
    return _JOB[-1] if _JOB else default


def bound_finalize(seconds: int, code: int = 0) -> None:
    """End this process with SIGALRM if it is still alive ``seconds`` from now: for
    healed jobs, where Open MPI 5.0's ``MPI_Finalize`` can wait for ever on a process
    that died during a hand-over after a replacement joined (the default action of
    SIGALRM works where no Python code runs any more).  A non-zero ``code``: the job ends
    with that error; every rank leaves with it, without ``MPI_Finalize``.  Once is
    enough: a second call (the command line's, then the healed job's at exit) does
    nothing, and the first call's alarm stands."""
    import signal

    comm = job_comm(None)
    if comm is None:  # not a healed job, or bounded already
        return
    _JOB.clear()
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.alarm(seconds)
    try:  # no communicator reaching a replacement is left for finalize
        comm.Barrier()
        comm.Free()
    except Exception:  # noqa: BLE001 - a rank died at the very end: finalize decides
        pass
    if code:  # an agreed error: every rank is past the barrier; leave without finalize
        import os

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _abort(comm, code: int) -> int:
    """End every rank of the job with ``code`` (after the messages are out)."""
    if comm.Get_size() > 1:
        drain_output()
        comm.Abort(code)
    return code


def run_or_abort(fn: Callable[[], Optional[int]], comm=None,
                 render: Optional[Callable[[ConfigError], str]] = None) -> int:
    """Run ``fn``; on any exception print it once and end the whole job.

    An error raised on one rank aborts every rank with ``MPI_Abort`` (as
    ``python -m mpi4py`` does), because the other ranks would otherwise wait
    forever in their next collective and burn the allocation; so does a
    ``SystemExit`` with a non-zero status on one rank.  An error raised
    identically on every rank (``MpitrainError(everywhere=True)``) is printed
    by rank 0 and all ranks exit with status 2 together.  ``render`` words a
    ``ConfigError`` (the command line names flags, not parameters).
    """
    try:
        return int(fn() or 0)
    except SystemExit as exc:
        if exc.code in (None, 0) or getattr(exc, "everywhere", False):
            raise
        from mpi4py import MPI

        comm = job_comm(comm if comm is not None else MPI.COMM_WORLD)
        code = exc.code if isinstance(exc.code, int) else EXIT_ERROR
        if not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr, flush=True)
        if comm.Get_size() > 1:
            print(f"mpitrain: rank {comm.Get_rank()} of {comm.Get_size()} exited with status "
                  f"{code}; ending the job", file=sys.stderr, flush=True)
        _abort(comm, code)
        raise
    except BaseException as exc:  # noqa: BLE001 - any error must end the job
        from mpi4py import MPI

        code = end_job(exc, job_comm(comm if comm is not None else MPI.COMM_WORLD), render)
        if code is None:  # agreed by every rank: leave together
            raise SystemExit(exc.code) from None
        return code


def end_job(exc: BaseException, comm, render: Optional[Callable[[ConfigError], str]] = None,
            trace=None) -> Optional[int]:
    """Say ``exc`` once and end the job: None if every rank raised it (agreed) and got
    here, so they leave together with its code; else abort the job (``MPI_Abort``) and
    return the status (with one rank there is nothing to abort).  ``trace``: the
    traceback to print for an unexpected error (default: the one being handled)."""
    rank, size = comm.Get_rank(), comm.Get_size()
    where = f" (rank {rank} of {size})" if size > 1 else ""
    if isinstance(exc, MpitrainError):
        text = render(exc) if render and isinstance(exc, ConfigError) else str(exc)
        if exc.everywhere:
            leaving()  # every rank exits with exc.code: a SIGTERM must not change it
            if rank == 0 and text:
                print(f"mpitrain: error: {text}", file=sys.stderr, flush=True)
            # Every rank should be here (the error was agreed); should one
            # not arrive, abort rather than wait for it forever.
            if quiet_barrier(comm, seconds=60):
                return None
            if rank != 0:  # rank 0 may be elsewhere: say it here, before the abort
                print(f"mpitrain: error{where}: {text}", file=sys.stderr, flush=True)
        else:
            print(f"mpitrain: error{where}: {text}", file=sys.stderr, flush=True)
        code = exc.code
    elif isinstance(exc, KeyboardInterrupt):
        print(f"mpitrain: interrupted{where}", file=sys.stderr, flush=True)
        code = 130
    else:
        if trace is None:
            traceback.print_exc()
        else:
            traceback.print_exception(type(exc), exc, trace)
        print(f"mpitrain: error{where}: {type(exc).__name__}: {exc}",
              file=sys.stderr, flush=True)
        code = EXIT_ERROR
    return _abort(comm, code)
