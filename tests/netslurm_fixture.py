"""Slurm across emulated nodes for the tests (``mpitrain.testing.netslurm``): the ``netslurm``
fixture.

Import the fixture into a test module; it gives a running 2-node cluster (links at 1 Gbit/s,
a slurmd in each node, slurmctld in the hub) for the module and always removes it
afterwards.  Its object has the job helpers of tests/slurm_cluster.py (``sbatch``,
``submit``, ``wait``, ``show``...), whose Slurm commands run in the hub, and ``.api``, the
``netslurm.SlurmCluster`` (``.api.cluster``: the nodes and their links).

It needs what both other fixtures need: Linux, root, ``ip``/``tc``/``unshare``/``nsenter``,
Slurm and munge installed (Debian: iproute2, util-linux, slurm-wlm, munge; ``.ci/run``
installs them) and MPICH; where one is missing every test that uses it is skipped with the
reason.  ``MPITRAIN_SLURM_TESTS=skip`` or ``MPITRAIN_NETCLUSTER_TESTS=skip`` skips them
anyway; with both ``=require`` (CI) a skip is a failure.  Clusters of dead sessions are swept
as the netcluster fixture does (prefixes ``sl``, ``sd``, ``sc``).
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Sequence

import pytest

from conftest import clean_env, mpi_flavour, mpiexec
from netcluster_fixture import prefix, sweep
from slurm_cluster import SlurmCluster as Jobs
from mpitrain.testing.netcluster import Cluster, NetclusterError
from mpitrain.testing.netslurm import SlurmCluster, missing_slurm

MODES = ("MPITRAIN_SLURM_TESTS", "MPITRAIN_NETCLUSTER_TESTS")


def _mode(name: str) -> str:
    return os.environ.get(name, "auto").strip().lower() or "auto"


def unavailable(reason: str):
    """Skip, or fail when both the Slurm and the emulated-node tests are required."""
    if all(_mode(m) == "require" for m in MODES):
        pytest.fail(f"{'=require and '.join(MODES)}=require, but: {reason}", pytrace=False)
    pytest.skip(reason)


def require_netslurm() -> None:
    """Skip (or fail, when required) unless Slurm can run on emulated nodes with MPICH."""
    skipped = [m for m in MODES if _mode(m) in ("skip", "0", "no", "off")]
    if skipped:
        pytest.skip(f"{skipped[0]}=skip")
    why = missing_slurm()
    if why:
        unavailable(f"Slurm on emulated nodes: {why}")
    mpiexec()  # skips (or fails) without one
    if mpi_flavour() != "mpich":
        unavailable(f"the emulated nodes' jobs need MPICH; this mpiexec is {mpi_flavour()}")
    sweep()


class NetJobs(Jobs):
    """tests/slurm_cluster.py's job helpers, their Slurm commands run on ``api``'s hub."""

    def __init__(self, api: SlurmCluster):
        super().__init__(api.base)
        self.api = api
        self.conf, self.logs = api.conf, api.logs

    def env(self, **extra) -> dict:
        """The jobs' environment: the tests' (clean_env) as the cluster passes it on."""
        return {**self.api.env(clean_env()), **extra}

    def execute(self, cmd: Sequence[str], timeout: float, env: dict,
                cwd: Path) -> subprocess.CompletedProcess:
        """In the hub namespace (the login node)."""
        return self.api.run(cmd, env=env, timeout=timeout, cwd=str(cwd))


@pytest.fixture(scope="module")
def netslurm():
    """Slurm on 2 emulated nodes, links of 1 Gbit/s, removed after the module."""
    require_netslurm()
    api = SlurmCluster(Cluster(nodes=2, rate="1gbit", prefix=prefix("sl")))
    try:
        api.up()
    except NetclusterError as exc:
        unavailable(f"cannot start Slurm on emulated nodes: {exc}")
    print(f"\nnetslurm: start {api.start_seconds:.1f} s, conf {api.conf}")
    try:
        yield NetJobs(api)
    finally:
        api.down()
