"""One job per checkpoint directory: a lock taken at start, naming its holder.

The lock is ``DIR/.mpitrain.lock``: an exclusive ``flock`` on that file, held
by the rank that writes the checkpoints for the whole run, and inside it a
JSON record of the holder (host, pid, job id, since when).  What it
guarantees:

- On one host it is exact: a second job is refused, naming the holder, and
  a lock whose holder died (SIGKILL, a crash) is released by the kernel with
  the process, so the next job takes it over (it says so).
- On a shared file system the ``flock`` is what the file system makes of it:
  NFSv4 and Lustre mounted with ``flock`` (or GPFS) lock across nodes; Lustre
  with ``localflock`` locks only within a node, and one mounted without
  either refuses ``flock`` altogether.  So the record is checked as well: a
  record left by a job on another host is taken over only by the same job
  (the same ``SLURM_JOB_ID``: a relaunch in its allocation, or a requeue);
  any other job is refused, with the lock file to remove if that job is gone.
- The file is removed when the run ends; after a crash it stays, and the
  record says whose it was.
"""
from __future__ import annotations

import datetime
import json
import os
import socket
from typing import Dict, Optional

from ..runtime import MpitrainError

__all__ = ["DirectoryLock", "LockHeld"]

NAME = ".mpitrain.lock"


class LockHeld(MpitrainError):
    """The directory is another job's."""


def _job_id() -> str:
    """This job's id from the resource manager, or '' (none)."""
    for var in ("SLURM_JOB_ID", "PBS_JOBID", "LSB_JOBID", "FLUX_JOB_ID"):
        if os.environ.get(var):
            return os.environ[var]
    return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def describe(record: Dict[str, object]) -> str:
    """'host vm, pid 123, job 45, since 2026-12-01T08:00:00+00:00'."""
    parts = [f"host {record.get('host')}", f"pid {record.get('pid')}"]
    if record.get("job"):
        parts.append(f"job {record['job']}")
    parts.append(f"since {record.get('since')}")
    return ", ".join(parts)


class DirectoryLock:
    """The lock of checkpoint directory ``directory`` (see the module's docstring)."""

    def __init__(self, directory: str):
        self.directory = directory
        self.path = os.path.join(directory, NAME)
        self._fd: Optional[int] = None
        self.flock = True  # whether the file system honours flock (False: the record alone)

    def acquire(self) -> Optional[str]:
        """Take the lock, or raise LockHeld naming the holder; return a note when a dead
        holder's lock was taken over."""
        import fcntl

        for _ in range(10):  # the file may be removed between open and flock: retry
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read(fd)
                os.close(fd)
                raise LockHeld(self._held(holder)) from None
            except OSError:  # ENOLCK, ENOSYS, EINVAL: no flock here; the record decides
                self.flock = False
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the holder removed the file as we opened it: try the new one
                os.close(fd)
                continue
            note = self._take_over(fd, _read(fd))
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, (json.dumps(self._mine()) + "\n").encode(), 0)
                os.fsync(fd)
            except BaseException:
                os.close(fd)  # and with it the flock
                raise
            self._fd = fd
            return note
        raise MpitrainError(f"{self.path}: could not take the lock (it kept changing)")

    def _mine(self) -> Dict[str, object]:
        return {"host": socket.gethostname(), "pid": os.getpid(), "job": _job_id(),
                "since": datetime.datetime.now(datetime.timezone.utc).isoformat(
                    timespec="seconds")}

    def _held(self, holder: Dict[str, object]) -> str:
        who = describe(holder) if holder else "a process that has not written its record yet"
        return (f"{self.directory}: the checkpoint directory is in use by another job "
                f"({who}); give this run another checkpoint directory, or wait for that job "
                "to end")

    def _take_over(self, fd: int, record: Dict[str, object]) -> Optional[str]:
        """Decide about the record left in the file (we hold the flock, if any)."""
        if not record:
            return None
        here = record.get("host") == socket.gethostname()
        pid = record.get("pid")
        if here and isinstance(pid, int):
            if pid != os.getpid() and _alive(pid) and not self.flock:
                os.close(fd)
                raise LockHeld(self._held(record))
            return f"took over the lock of a job that is gone ({describe(record)})"
        if record.get("job") and record.get("job") == _job_id():
            return f"took over the lock of an earlier run of this job ({describe(record)})"
        os.close(fd)
        raise LockHeld(
            f"{self.directory}: the checkpoint directory is locked by a job on another host "
            f"({describe(record)}), which cannot be checked from here; if that job is gone, "
            f"remove {self.path}")

    def release(self) -> None:
        """Remove the lock file and let go of the lock (local, not collective)."""
        if self._fd is None:
            return
        try:
            os.remove(self.path)
        except OSError:
            pass
        os.close(self._fd)  # the flock goes with the descriptor
        self._fd = None


def _read(fd: int) -> Dict[str, object]:
    """The holder's record in the open lock file (empty if none or unreadable)."""
    try:
        data = os.pread(fd, 4096, 0)
        record = json.loads(data.decode() or "{}")
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    return record if isinstance(record, dict) else {}
