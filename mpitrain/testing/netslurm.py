"""$ python -m mpitrain.testing.netslurm up --nodes 2 --rate 1gbit [--name mpt]   (as root)

A Slurm cluster across emulated nodes (``mpitrain.testing.netcluster``), one slurmd a node::

    python -m mpitrain.testing.netslurm up --nodes 2 --rate 1gbit
    python -m mpitrain.testing.netslurm run -- sbatch --wait -N 2 --ntasks-per-node=1 \\
        slurm/train.sbatch --data /tmp/ds --steps 20
    python -m mpitrain.testing.netslurm run -- sinfo -N     # any Slurm command
    python -m mpitrain.testing.netslurm status     # nodes, links, bytes, Slurm's view
    python -m mpitrain.testing.netslurm down       # removes everything, jobs and daemons too

``up`` builds the netcluster, then starts munged and slurmctld in its hub namespace (the
"login node": the bridge gets the address ``SUBNET.254``, the hostname is ``PREFIX-hub``)
and a slurmd in each node, declared as ``NodeName=PREFIX-nI NodeAddr=SUBNET.(I+1)``.  Each
slurmd runs in its node's network namespace under the node's hostname (a UTS namespace) and
in a mount namespace of its own, where ``/etc/hosts`` is the node's (the names of all nodes)
and ``/dev/shm`` a private tmpfs, as on separate machines; everything else, the munge
socket, slurm.conf, the checkout, job outputs and checkpoints, is the one shared file
system.  A job's processes are the slurmd's children, so they see their node's hostname
and network: MPICH counts one node per slurmd, whether ``srun --mpi=pmi2`` or Hydra's
``mpiexec`` (which finds the allocation and starts its proxies with srun) launches it.

``run`` executes a command in the hub with ``env()``: this cluster's ``SLURM_CONF``, this
Python's directory first on ``PATH``, no variables of an enclosing job, and the netcluster's
``link_env()`` (``MPIR_CVAR_CH4_NETMOD=ofi FI_PROVIDER=tcp FI_TCP_IFACE=PREFIX-eth``), which
sbatch passes on to the job (its default ``--export=ALL``): MPICH then sends between nodes
over the shaped links.  The slurmd is entered with ``nsenter --net`` rather than ``ip netns
exec``, which mounts a sysfs of the namespace over ``/sys`` and so hides the cgroup file
system that slurmd (22.05) needs.

Slurm's files live in ``/run/mpitrain-netcluster/PREFIX/slurm/``; every daemon runs in the
cluster's namespaces and names that directory, so the netcluster's ``down`` ends them with
the jobs and removes the files.  Standard library only.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence

from mpitrain.testing.host import (NETNS_RUN, NetclusterError, as_host, communicate,
                                   search_path, sh, start_daemon, tool, until, which)
from mpitrain.testing.netcluster import NETNS_ETC, Cluster, command_line, missing
from mpitrain.threads import child_env

__all__ = ["SlurmCluster", "missing_slurm", "munge_key", "munge_works", "main"]

SLURM_TOOLS = ("slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo", "scancel",
               "munged", "munge", "unmunge", "nsenter")
START_TIMEOUT = 30.0  # seconds for each daemon to answer
JOB_VARS = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "HYDRA_", "PMI_")  # an enclosing job's
# What a Slurm for tests on one machine uses (here and in tests/slurm_cluster.py).
PLUGINS = """\
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
# CPUs, not cores, as the unit: 2 tasks fit on a node of 1 core x 2 threads too.
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
# Look at pending jobs every second (defaults: 60 s and 30 s), so that a job
# whose requeue hold has passed starts at once.
SchedulerParameters=sched_interval=1,bf_interval=1
"""
# In a slurmd's mount namespace: the node's hostname, /etc/hosts and a private /dev/shm.
NODE_SH = ('echo "$0" > /proc/sys/kernel/hostname && mount --bind "$1" /etc/hosts && '
           'mount -t tmpfs -o mode=1777 shm /dev/shm && shift && exec "$@"')


def missing_slurm() -> Optional[str]:
    """Why no Slurm can run on emulated nodes here (no netcluster, a tool missing), or None."""
    why = missing()
    if why:
        return why
    absent = [name for name in SLURM_TOOLS if not which(name)]
    if absent:
        return (f"{', '.join(absent)} not found (Debian: apt-get install slurm-wlm munge "
                "util-linux)")
    return None


class SlurmCluster:
    """Slurm on the nodes of ``cluster`` (a ``netcluster.Cluster``, built by ``up``).

    ``up()`` builds the cluster and starts the daemons (removing everything if that fails);
    ``with SlurmCluster(Cluster(...)) as s:`` builds and always removes, also after an error.
    ``cpus``: CPUs declared per node (default: this machine's, as every node shares them);
    ``requeue_hold``: seconds a requeued job waits (``AuthInfo=cred_expire``; Slurm's
    default 120).
    """

    def __init__(self, cluster: Cluster, cpus: Optional[int] = None, requeue_hold: int = 10):
        self.cluster = cluster
        self.cpus = cpus or os.cpu_count() or 1
        self.requeue_hold = requeue_hold
        self.controller = f"{cluster.subnet}.254"
        self.base = cluster.state_dir / "slurm"
        self.conf = self.base / "slurm.conf"
        self.logs = self.base / "log"
        self.munge_socket = self.base / "munge" / "munge.socket"
        self.start_seconds = 0.0

    @classmethod
    def attach(cls, prefix: str = "mpt") -> "SlurmCluster":
        """The Slurm that ``up`` started on the cluster ``prefix`` (for run, status, down)."""
        slurm = cls(Cluster.attach(prefix))
        if not slurm.conf.exists():
            raise NetclusterError(f"cluster {prefix!r} has no Slurm (no {slurm.conf})")
        return slurm

    # -- up and down ----------------------------------------------------------------------
    def up(self) -> "SlurmCluster":
        """Build the cluster, start munged, slurmctld and a slurmd per node, wait until every
        node is idle; on any failure remove everything again."""
        why = missing_slurm()
        if why:
            raise NetclusterError(why)
        self.cluster.up()
        try:
            self._start()
        except BaseException:
            self.down()
            raise
        return self

    def _start(self) -> None:
        t0 = time.monotonic()
        c, b = self.cluster, self.base
        sh("ip", "-n", c.hub, "link", "set", "lo", "up")  # slurmctld calls itself
        sh("ip", "-n", c.hub, "addr", "add", f"{self.controller}/24", "dev", c.bridge)
        for d in ("state", "log", "run", "munge", *(f"spool/{n.name}" for n in c.nodes)):
            (b / d).mkdir(parents=True, exist_ok=True)
        os.chmod(b / "munge", 0o700)
        key = b / "munge" / "munge.key"
        munge_key(key)
        self._write_conf()
        hub = [tool("ip"), "netns", "exec", c.hub]
        self._daemon("munged", [*hub, tool("munged"), "--force", f"--socket={self.munge_socket}",
                                f"--key-file={key}", f"--pid-file={b}/run/munged.pid",
                                f"--log-file={self.logs}/munged.log", f"--seed-file={key}.seed"])
        self._until("munge -n | unmunge did not say Success",
                    lambda: munge_works(self.munge_socket), "munged.log")
        self._daemon("slurmctld", [*hub, *as_host(c.hub), tool("slurmctld"), "-c", "-f",
                                   str(self.conf)])
        self._until("slurmctld did not answer scontrol ping", lambda: "is UP" in self.run(
            ["scontrol", "ping"], timeout=10).stdout, "slurmctld.log")
        for n in c.nodes:
            self._daemon(f"slurmd-{n.name}", [
                tool("nsenter"), f"--net={NETNS_RUN / n.name}", tool("unshare"), "--uts",
                "--mount", "/bin/sh", "-c", NODE_SH, n.name, str(NETNS_ETC / n.name / "hosts"),
                tool("slurmd"), "-N", n.name, "-f", str(self.conf)])
        self._until("the nodes did not all become idle", lambda: self.node_states() == {
            n.name: "idle" for n in c.nodes}, f"slurmd-{c.nodes[-1].name}.log")
        self.start_seconds = time.monotonic() - t0

    def _write_conf(self) -> None:
        c, b = self.cluster, self.base
        nodes = "".join(f"NodeName={n.name} NodeAddr={n.address} CPUs={self.cpus} "
                        "RealMemory=1000\n" for n in c.nodes)
        self.conf.write_text(f"""\
# Slurm on the emulated nodes of netcluster {c.prefix} (python -m mpitrain.testing.netslurm).
ClusterName={c.prefix}
SlurmctldHost={c.hub}({self.controller})
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire={self.requeue_hold}
StateSaveLocation={b}/state
SlurmdSpoolDir={b}/spool/%n
SlurmctldLogFile={self.logs}/slurmctld.log
SlurmdLogFile={self.logs}/slurmd-%n.log
SlurmctldPidFile={b}/run/slurmctld.pid
SlurmdPidFile={b}/run/slurmd-%n.pid
{PLUGINS}# The nodes are what this file says (they share this machine's CPUs and memory).
SlurmdParameters=config_overrides
{nodes}PartitionName=debug Nodes={','.join(n.name for n in c.nodes)} Default=YES \
MaxTime=INFINITE State=UP OverSubscribe=YES
""")

    def _daemon(self, name: str, cmd: Sequence[str]) -> None:
        start_daemon(cmd, self.logs / f"{name}.start.log", self.env(), START_TIMEOUT)

    def _until(self, what: str, ok: Callable[[], bool], log: str) -> None:
        until(what, ok, START_TIMEOUT, self.logs / log)

    def down(self) -> None:
        """Remove everything: jobs, daemons, namespaces, files (the netcluster's ``down``:
        every daemon runs in its namespaces).  Safe to repeat."""
        self.cluster.down()

    def leftovers(self) -> List[str]:
        """What of this cluster and its Slurm exists ([] once down)."""
        return self.cluster.leftovers()

    def __enter__(self) -> "SlurmCluster":
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()

    # -- commands -------------------------------------------------------------------------
    def env(self, base: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
        """The environment of Slurm commands and (sbatch passes it on) of their jobs:
        ``base`` (default: this process's, without the thread counts importing mpitrain
        set: each rank chooses its own) without an enclosing job's or launcher's variables,
        with this cluster's SLURM_CONF, this Python's directory first on PATH and the
        netcluster's ``link_env()``."""
        env = {k: v for k, v in (child_env() if base is None else base).items()
               if not k.startswith(JOB_VARS)}
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent),
                                       search_path(env.get("PATH", ""))])
        env["SLURM_CONF"] = str(self.conf)
        env.update(self.cluster.link_env())
        return env

    def run(self, cmd: Sequence[str], env: Optional[Dict[str, str]] = None,
            timeout: Optional[float] = 30, capture: bool = True,
            cwd: Optional[str] = None) -> subprocess.CompletedProcess:
        """Run ``cmd`` (sbatch, squeue, scontrol...) in the hub with ``env`` (default
        ``env()``), in ``cwd``; at ``timeout`` it is killed (not the cluster) and
        ``subprocess.TimeoutExpired`` raised."""
        full = [tool("ip"), "netns", "exec", self.cluster.hub, *map(str, cmd)]
        return communicate(full, cmd, self.env() if env is None else env, timeout, capture,
                           cwd=cwd)

    def node_states(self) -> Dict[str, str]:
        """Each node's state as slurmctld sees it (``sinfo -N``): {"mpt-n0": "idle", ...}."""
        out = self.run(["sinfo", "-h", "-N", "-o", "%N %T"], timeout=10).stdout
        return dict(line.split()[:2] for line in out.splitlines() if len(line.split()) >= 2)

    def status(self) -> str:
        """The netcluster's table, then Slurm's view of its nodes and the files."""
        sinfo = self.run(["sinfo", "-N", "-o", "%N %T %C %E"], timeout=10)
        return "\n".join([self.cluster.status(), (sinfo.stdout or sinfo.stderr).rstrip(),
                          f"slurmctld {self.cluster.hub} ({self.controller}), conf {self.conf}, "
                          f"logs {self.logs}"])


def munge_key(key: Path) -> None:
    """Make a new munge key in the file ``key`` (mode 600)."""
    if which("mungekey"):
        sh("mungekey", "--create", f"--keyfile={key}")
    else:  # munge < 0.5.14: any 1024 random bytes make a key
        key.write_bytes(os.urandom(1024))
    os.chmod(key, 0o600)


def munge_works(socket: Path) -> bool:
    """Whether the munged of ``socket`` answers: ``munge -n | unmunge`` says Success."""
    cred = subprocess.run([tool("munge"), "-n", f"--socket={socket}"], capture_output=True,
                          text=True, timeout=10).stdout
    back = subprocess.run([tool("unmunge"), f"--socket={socket}"], input=cred,
                          capture_output=True, text=True, timeout=10)
    return back.returncode == 0 and "Success" in back.stdout


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line: ``up``, ``run -- CMD``, ``status``, ``down`` (see the module doc)."""
    def build(a: argparse.Namespace) -> SlurmCluster:
        return SlurmCluster(Cluster(a.nodes, a.rate, a.name, a.subnet, a.burst, a.latency),
                            cpus=a.cpus)

    return command_line("python -m mpitrain.testing.netslurm", __doc__, argv, build,
                        SlurmCluster.attach, "run a (Slurm) command in the hub, the login node",
                        lambda up: up.add_argument("--cpus", type=int, default=None,
                                                   help="CPUs per node (default: all)"))


if __name__ == "__main__":
    sys.exit(main())
