"""Emulated nodes for the tests (``mpitrain.testing.netcluster``): the ``netcluster`` fixture.

Import the fixture into a test module; it gives a running 2-node cluster, links at 1 Gbit/s,
for the module and always removes it afterwards.  It needs Linux, root, ``ip``, ``tc`` and
``unshare`` (Debian: iproute2, util-linux; ``.ci/run`` installs them) and MPICH's mpiexec
(Hydra's ssh launcher); where one is missing every test that uses it is skipped with the
reason.  ``MPITRAIN_NETCLUSTER_TESTS=skip`` skips them anyway;
``MPITRAIN_NETCLUSTER_TESTS=require`` turns those skips into failures (CI).

Each cluster's prefix carries this process's id, so that two test sessions on one machine do
not meet, and a session's clusters that outlived it (its process ended by pytest-timeout) are
removed by the next.
"""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from conftest import mpi_flavour, mpiexec
from mpitrain.testing.host import namespaces
from mpitrain.testing.netcluster import STATE_ROOT, Cluster, NetclusterError, missing

TIMEOUT = 30  # seconds for one job or one command of the cluster


def _mode() -> str:
    return os.environ.get("MPITRAIN_NETCLUSTER_TESTS", "auto").strip().lower() or "auto"


def unavailable(reason: str):
    """Skip (or, with MPITRAIN_NETCLUSTER_TESTS=require, fail) for want of emulated nodes."""
    if _mode() == "require":
        pytest.fail(f"MPITRAIN_NETCLUSTER_TESTS=require, but: {reason}", pytrace=False)
    pytest.skip(reason)


def require_netcluster() -> None:
    """Skip (or fail, when required) unless emulated nodes can be built and MPICH runs on them."""
    if _mode() == "skip":
        pytest.skip("MPITRAIN_NETCLUSTER_TESTS=skip")
    why = missing()
    if why:
        unavailable(f"emulated nodes: {why}")
    mpiexec()  # skips (or fails) without one
    if mpi_flavour() != "mpich":
        unavailable("emulated nodes are launched by MPICH's Hydra; this mpiexec is "
                    f"{mpi_flavour()}")
    sweep()


TAGS = ("nc", "lk", "hg", "cl", "sl", "sd", "sc")  # the prefixes' tags these tests use
# (test_netcluster.py, and test_netslurm.py: sl, sd, sc)


def prefix(tag: str) -> str:
    """A cluster prefix of this session: ``tag`` (one of TAGS) and the process id in hex
    (at most 6 digits: pid_max is at most 2**22)."""
    assert tag in TAGS, tag
    return f"{tag}{os.getpid():x}"


def sweep() -> None:
    """Remove the clusters of test sessions that died without tearing down (pytest-timeout
    ends a stuck session with os._exit, before any teardown)."""
    mine = rf"({'|'.join(TAGS)})[0-9a-f]{{1,6}}"
    found = {ns.split("-")[0] for ns in namespaces(rf"{mine}-(hub|n\d+)")}
    if STATE_ROOT.is_dir():
        found |= {p.name for p in STATE_ROOT.iterdir() if re.fullmatch(mine, p.name)}
    for name in sorted(found):
        if not Path(f"/proc/{int(name[2:], 16)}").exists():
            Cluster(prefix=name).down()


def traces(name: str) -> list:
    """What the system itself still shows of cluster ``name``: ``ip netns list``, ``ip link``
    and ``pgrep -f`` (namespaces, links, processes named after it)."""
    def out(*cmd):
        return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT).stdout

    found = [f"netns {line}" for line in out("ip", "netns", "list").splitlines()
             if line.startswith(f"{name}-")]
    found += [f"link {line}" for line in out("ip", "-o", "link", "show").splitlines()
              if f": {name}-" in line]
    found += [f"process {line}" for line in
              out("pgrep", "-af", f"{name}-n[0-9]|mpitrain-netcluster/{name}/").splitlines()]
    return found


def grown(before: dict, after: dict) -> dict:
    """Bytes each link carried between two ``link_bytes()``, by node: (sent, received)."""
    return {name: (after[name].sent - before[name].sent,
                   after[name].received - before[name].received) for name in after}


@pytest.fixture(scope="module")
def netcluster():
    """A 2-node cluster, links of 1 Gbit/s each way, removed after the module."""
    require_netcluster()
    cluster = Cluster(nodes=2, rate="1gbit", prefix=prefix("nc"))
    try:
        cluster.up()
    except NetclusterError as exc:
        unavailable(f"cannot build emulated nodes: {exc}")
    try:
        yield cluster
    finally:
        cluster.down()
