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
from typing import Callable, List, Optional, Set

TOOLS = ("ip", "tc", "unshare")
SBIN = ("/usr/sbin", "/sbin", "/usr/bin", "/bin")
NETNS_RUN = Path("/run/netns")  # where ip netns keeps its namespaces
KILL_GRACE = 1.0  # seconds between SIGTERM and SIGKILL


class NetclusterError(RuntimeError):
    """A cluster that cannot be built, found or removed, with the reason."""


def _path() -> str:
    parts = os.environ.get("PATH", "").split(os.pathsep)
    return os.pathsep.join(parts + [p for p in SBIN if p not in parts])


def tool(name: str) -> str:
    """The absolute path of ``name`` (``ip``, ``tc``, ``unshare``), sbin directories included."""
    found = shutil.which(name, path=_path())
    if not found:
        raise NetclusterError(f"{name} not found (Debian: apt-get install iproute2 util-linux)")
    return found


def missing() -> Optional[str]:
    """Why no cluster can be built here (not Linux, not root, a tool missing), or None."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root"
    absent = [name for name in TOOLS if not shutil.which(name, path=_path())]
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


def sh(*cmd, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    """Run ``cmd`` (its first word a tool's name), output captured; raise if it fails."""
    cmd = [tool(str(cmd[0])), *map(str, cmd[1:])]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise NetclusterError(f"{shlex.join(cmd)} failed (exit {done.returncode}): "
                              f"{done.stderr.strip() or done.stdout.strip()}")
    return done


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
