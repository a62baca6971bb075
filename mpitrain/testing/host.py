"""The host's side of the emulated nodes: its tools, namespaces, links, processes and qdiscs.

Thin, bounded wrappers around ``ip``, ``tc`` and ``/proc`` for ``netcluster``; standard
library only.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Set

TOOLS = ("ip", "tc", "unshare")
SBIN = ("/usr/sbin", "/sbin", "/usr/bin", "/bin")
NETNS_RUN = Path("/run/netns")  # where ip netns keeps its namespaces
KILL_GRACE = 1.0  # seconds between SIGTERM and SIGKILL


class NetclusterError(RuntimeError):
    """A cluster that cannot be built, found or removed, with the reason."""


def search_path(path: Optional[str] = None) -> str:
    """``path`` (default: this process's PATH) with the sbin directories it lacks appended."""
    parts = (os.environ.get("PATH", "") if path is None else path).split(os.pathsep)
    return os.pathsep.join(parts + [p for p in SBIN if p not in parts])


def which(name: str) -> Optional[str]:
    """The absolute path of the program ``name`` on PATH or in an sbin directory, or None."""
    return shutil.which(name, path=search_path())


def tool(name: str) -> str:
    """The absolute path of ``name`` (``ip``, ``tc``, ``unshare``), sbin directories included."""
    found = which(name)
    if not found:
        raise NetclusterError(f"{name} not found (Debian: apt-get install iproute2 util-linux)")
    return found


def missing() -> Optional[str]:
    """Why no cluster can be built here (not Linux, not root, a tool missing), or None."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root"
    absent = [name for name in TOOLS if not which(name)]
    if absent:
        return f"{', '.join(absent)} not found (Debian: apt-get install iproute2 util-linux)"
    return None


def default_mpiexec() -> str:
    """The mpiexec beside this Python (a venv with PyPI's MPICH), else the one on PATH."""
    here = Path(sys.executable).parent / "mpiexec"
    found = str(here) if here.exists() else shutil.which("mpiexec")
    if not found:
        raise NetclusterError("no mpiexec found (pip install mpich)")
    return found


def as_host(name: str) -> List[str]:
    """The start of a command line that runs the rest under hostname ``name``, in a UTS
    namespace of its own (``unshare --uts``)."""
    return [tool("unshare"), "--uts", "/bin/sh", "-c",
            'echo "$0" > /proc/sys/kernel/hostname && exec "$@"', name]


def sh(*cmd, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    """Run ``cmd`` (its first word a tool's name), output captured; raise if it fails."""
    cmd = [tool(str(cmd[0])), *map(str, cmd[1:])]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise NetclusterError(f"{shlex.join(cmd)} failed (exit {done.returncode}): "
                              f"{done.stderr.strip() or done.stdout.strip()}")
    return done


def communicate(full: Sequence[str], cmd: Sequence[str], env: Dict[str, str],
                timeout: Optional[float], capture: bool = True, cwd: Optional[str] = None,
                abort: Optional[Callable[[], None]] = None) -> subprocess.CompletedProcess:
    """Run ``full`` (reported as ``cmd``) in a session of its own; at ``timeout`` or an
    interrupt call ``abort()``, kill the session's processes, then raise (a timeout as
    ``subprocess.TimeoutExpired`` of ``cmd``, with the output so far)."""
    pipe = subprocess.PIPE if capture else None
    proc = subprocess.Popen(list(full), env=env, stdout=pipe, stderr=pipe, text=True, cwd=cwd,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException as exc:  # a timeout, ^C: nothing may stay behind
        if abort is not None:
            abort()
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        out, err = proc.communicate()
        if isinstance(exc, subprocess.TimeoutExpired):
            raise subprocess.TimeoutExpired(list(cmd), timeout, out, err) from None
        raise
    return subprocess.CompletedProcess(list(cmd), proc.returncode, out, err)


def start_daemon(cmd: Sequence[str], log: Path, env: Dict[str, str],
                 timeout: float = 30) -> None:
    """Run ``cmd``, a daemon that forks into the background, its output to the file ``log``
    (not a pipe, which the daemon might keep open); raise if it fails, with the log's end."""
    with open(log, "w") as out:
        code = subprocess.run(list(cmd), stdin=subprocess.DEVNULL, stdout=out,
                              stderr=subprocess.STDOUT, timeout=timeout, env=env).returncode
    if code != 0:
        raise NetclusterError(f"{shlex.join(cmd)} failed (exit {code}): {tail(log)}")


def until(what: str, ok: Callable[[], bool], timeout: float, log: Optional[Path] = None,
          poll: float = 0.2) -> None:
    """Poll ``ok()`` (errors count as not yet) until it is true; raise ``what`` after
    ``timeout`` seconds, with the end of ``log``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if ok():
                return
        except (RuntimeError, OSError, subprocess.SubprocessError):
            pass
        if time.monotonic() > deadline:
            raise NetclusterError(f"{what} within {timeout:.0f} s"
                                  + (f"; {log.name}:\n{tail(log)}" if log else ""))
        time.sleep(poll)


def tail(path: Path, lines: int = 15) -> str:
    """The last ``lines`` lines of the text file ``path`` ('(no log)' if it cannot be read)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def namespaces(pattern: str) -> List[str]:
    """The network namespaces (``ip netns list``) whose whole name matches ``pattern``."""
    mine = re.compile(pattern)
    listed = (line.split() for line in sh("ip", "netns", "list", check=False).stdout.split("\n"))
    return sorted(w[0] for w in listed if w and mine.fullmatch(w[0]))


def netns_inode(name: str) -> Optional[int]:
    """The inode of namespace ``name`` (what ``/proc/PID/ns/net`` of its processes shows)."""
    try:
        return os.stat(NETNS_RUN / name).st_ino
    except OSError:
        return None


def root_links(start: str) -> List[str]:
    """Links of the host's own namespace whose names start with ``start``."""
    out = sh("ip", "-o", "link", "show", check=False).stdout
    names = (line.split(":")[1].strip().split("@")[0] for line in out.splitlines()
             if line.count(":") >= 2)
    return [n for n in names if n.startswith(start)]


def _inode_of(pid: str) -> Optional[int]:
    try:
        m = re.fullmatch(r"net:\[(\d+)\]", os.readlink(f"/proc/{pid}/ns/net"))
    except OSError:
        return None
    return int(m.group(1)) if m else None


def cmdline(pid: int) -> str:
    """The command line of process ``pid``, or '' once it is gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def processes(inodes: Set[int], mark: str) -> List[int]:
    """Processes in the network namespaces ``inodes`` or whose command line holds ``mark``
    (never this process, nor the host's own namespace)."""
    inodes = set(inodes) - {_inode_of("self"), _inode_of("1")}
    me = os.getpid()
    return [int(pid) for pid in os.listdir("/proc") if pid.isdigit() and int(pid) != me
            and (_inode_of(pid) in inodes or mark in cmdline(int(pid)))]


def kill_all(find: Callable[[], List[int]]) -> None:
    """Signal what ``find()`` returns until it returns nothing: SIGTERM, then SIGKILL after
    KILL_GRACE seconds; gives up 2 s later (the caller checks what is left)."""
    deadline = time.monotonic() + KILL_GRACE
    sig = signal.SIGTERM
    while True:
        pids = find()
        if not pids or time.monotonic() > deadline + 2:
            return
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            sig = signal.SIGKILL
        time.sleep(0.05)


def qdisc_sent(ns: str, dev: str) -> int:
    """Bytes the tbf qdisc of ``dev`` in namespace ``ns`` has sent (``tc -s qdisc``)."""
    out = sh("tc", "-n", ns, "-s", "qdisc", "show", "dev", dev).stdout
    m = re.search(r"qdisc tbf .*?Sent (\d+) bytes", out, re.DOTALL)
    if not m:
        raise NetclusterError(f"no tbf qdisc counters on {dev} in {ns}: {out.strip()!r}")
    return int(m.group(1))
