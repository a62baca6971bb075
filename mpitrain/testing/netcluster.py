"""$ python -m mpitrain.testing.netcluster up --nodes 2 --rate 1gbit [--name mpt]   (as root)

N emulated nodes on one machine, joined by links of a known rate::

    python -m mpitrain.testing.netcluster up --nodes 2 --rate 1gbit
    python -m mpitrain.testing.netcluster run -- mpiexec -ppn 2 -n 4 python -m mpitrain info
    python -m mpitrain.testing.netcluster status     # nodes, addresses, bytes per link
    python -m mpitrain.testing.netcluster down       # removes everything

Node I is the network namespace ``PREFIX-nI``, address ``SUBNET.(I+1)``, hostname
``PREFIX-nI`` (set in a UTS namespace of each job's processes; the names resolve on every
node through ``/etc/netns/PREFIX-nI/hosts``).  Its interface ``PREFIX-eth`` is one end of a
veth pair whose other end ``PREFIX-pI`` is a port of the bridge ``PREFIX-br`` in the
namespace ``PREFIX-hub``.  A tbf qdisc shapes the egress of both ends to the rate, so each
direction of a link has that rate and its qdisc counts the bytes.

MPICH is started by Hydra's ssh launcher with ``-launcher-exec`` set to a generated script
that runs the proxy of each host inside that node's namespace under its hostname;
``mpiexec`` itself runs in node 0.  Each node's processes see a tmpfs of their own at
``STATE/tmp``, the jobs' ``TMPDIR``: a file one node writes there, another cannot read, as
on machines without a shared ``/tmp``.  With ``MPIR_CVAR_CH4_NETMOD=ofi FI_PROVIDER=tcp`` and
``FI_TCP_IFACE=PREFIX-eth`` MPICH moves data through its shared memory within a node and
over TCP on the links between nodes (its default UCX netmod would use shared memory between
the namespaces too, bypassing the links; without ``FI_TCP_IFACE`` libfabric sometimes picks
``lo``).  ``run`` sets those variables and ``HYDRA_LAUNCHER``/``HYDRA_LAUNCHER_EXEC``/
``HYDRA_HOST_FILE``, so a plain ``mpiexec`` line spans the nodes (one rank per node in turn;
``-ppn K`` for K per node).

The state lives in ``/run/mpitrain-netcluster/PREFIX/`` (``state.json``, the launcher
script, the hosts file; ``mpitrain.testing.netslurm`` adds its Slurm there).  Namespaces
outlive their processes: ``down`` kills every process in them (and any naming a file of the
state directory) first, then deletes them (which deletes their links), and is safe to repeat.

Standard library only, so it runs without numpy, MPI or the rest of mpitrain.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence

from mpitrain.testing.host import (NetclusterError, as_host, cmdline, communicate,
                                   default_mpiexec, kill_all, missing, namespaces, netns_inode,
                                   processes, qdisc_sent, root_links, sh, tool)
from mpitrain.threads import child_env

__all__ = ["Cluster", "Node", "Link", "NetclusterError", "missing", "main"]

STATE_ROOT = Path("/run/mpitrain-netcluster")
NETNS_ETC = Path("/etc/netns")  # ip netns exec bind-mounts these files over /etc
PREFIX = re.compile(r"[a-z][a-z0-9]{0,7}\Z")  # PREFIX-pNNN must fit IFNAMSIZ (15)
RATE = re.compile(r"\d+(\.\d+)?[kmgt]?(bit|bps)\Z", re.IGNORECASE)
MAX_NODES = 64


class Node(NamedTuple):
    """One emulated node: its name (namespace and hostname) and address."""

    name: str
    address: str


class Link(NamedTuple):
    """Bytes one node's link carried, from the counters of its two tbf qdiscs."""

    sent: int  # node -> bridge (egress of the node's end)
    received: int  # bridge -> node (egress of the bridge's port)


class Cluster:
    """``nodes`` network namespaces on one bridge, each link shaped to ``rate`` (module doc).

    ``Cluster(...)`` describes; ``up()`` builds (removing what it made if it fails);
    ``with Cluster(...) as c:`` builds and always removes, also after an error inside.
    """

    def __init__(self, nodes: int = 2, rate: str = "1gbit", prefix: str = "mpt",
                 subnet: str = "10.77.0", burst: str = "64kb", latency: str = "50ms"):
        if not PREFIX.match(prefix):
            raise NetclusterError(f"prefix {prefix!r}: 1 to 8 of a-z0-9, starting with a letter")
        if not 1 <= nodes <= MAX_NODES:
            raise NetclusterError(f"nodes must be in [1, {MAX_NODES}], got {nodes}")
        if not RATE.match(rate):
            raise NetclusterError(f"rate {rate!r}: a number and a tc unit, e.g. 1gbit, 100mbit")
        if not re.fullmatch(r"(\d{1,3}\.){2}\d{1,3}", subnet):
            raise NetclusterError(f"subnet {subnet!r}: three octets, e.g. 10.77.0")
        self.prefix, self.rate, self.subnet = prefix, rate, subnet
        self.burst, self.latency = burst, latency
        self.nodes = [Node(f"{prefix}-n{i}", f"{subnet}.{i + 1}") for i in range(nodes)]
        self.hub, self.bridge, self.iface = f"{prefix}-hub", f"{prefix}-br", f"{prefix}-eth"
        self.state_dir = STATE_ROOT / prefix
        self.launcher = self.state_dir / "launch"
        self.hostfile = self.state_dir / "hosts"
        self.tmp = self.state_dir / "tmp"  # each node's own TMPDIR (a tmpfs mounted there)
        # The namespaces this object made or found, until a down() that left nothing: their
        # processes are found even after the names are gone.  (Never read from the state
        # file: a freed namespace's inode number is soon another namespace's.)
        self._inodes: set = set()

    def port(self, i: int) -> str:
        """The bridge's end of node ``i``'s link (in the hub namespace)."""
        return f"{self.prefix}-p{i}"

    @classmethod
    def attach(cls, prefix: str = "mpt") -> "Cluster":
        """The cluster that ``up`` recorded under ``prefix`` (for run, status, down)."""
        state = STATE_ROOT / prefix / "state.json"
        try:
            saved = json.loads(state.read_text())
        except FileNotFoundError:
            raise NetclusterError(f"no cluster {prefix!r} is up (no {state})") from None
        return cls(saved["nodes"], saved["rate"], prefix, saved["subnet"], saved["burst"],
                   saved["latency"])

    # -- up and down ----------------------------------------------------------------------
    def up(self) -> "Cluster":
        """Build the namespaces, bridge, links and qdiscs; on any failure remove them again."""
        why = missing()
        if why:
            raise NetclusterError(why)
        there = self.leftovers()
        if there:
            raise NetclusterError(f"cluster {self.prefix!r} exists already ({there[0]}...); "
                                  "remove it with: python -m mpitrain.testing.netcluster down "
                                  f"--name {self.prefix}")
        try:
            self._build()
        except BaseException:
            self.down()
            raise
        return self

    def _build(self) -> None:
        self.state_dir.mkdir(parents=True)
        self._save()  # first: a half-built cluster is found by down too
        hub = self.hub
        sh("ip", "netns", "add", hub)
        self._inodes.add(netns_inode(hub))
        sh("ip", "-n", hub, "link", "add", self.bridge, "type", "bridge")
        sh("ip", "-n", hub, "link", "set", self.bridge, "up")
        hosts = "127.0.0.1 localhost\n::1 localhost\n" + "".join(
            f"{n.address} {n.name}\n" for n in self.nodes)
        for i, node in enumerate(self.nodes):
            sh("ip", "netns", "add", node.name)
            self._inodes.add(netns_inode(node.name))
            (NETNS_ETC / node.name).mkdir(parents=True, exist_ok=True)
            (NETNS_ETC / node.name / "hosts").write_text(hosts)
            sh("ip", "-n", hub, "link", "add", self.port(i), "type", "veth",
               "peer", "name", self.iface, "netns", node.name)
            sh("ip", "-n", hub, "link", "set", self.port(i), "master", self.bridge, "up")
            sh("ip", "-n", node.name, "addr", "add", f"{node.address}/24", "dev", self.iface)
            sh("ip", "-n", node.name, "link", "set", self.iface, "up")
            sh("ip", "-n", node.name, "link", "set", "lo", "up")
            for ns, dev in ((node.name, self.iface), (hub, self.port(i))):  # both directions
                sh("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", self.rate,
                   "burst", self.burst, "latency", self.latency)
        self.hostfile.write_text("".join(f"{n.address}\n" for n in self.nodes))
        self.tmp.mkdir()
        self._write_launcher(tool("ip"), tool("unshare"))
        self._save()

    def _save(self) -> None:
        state = {"prefix": self.prefix, "nodes": len(self.nodes), "rate": self.rate,
                 "subnet": self.subnet, "burst": self.burst, "latency": self.latency,
                 "addresses": [n.address for n in self.nodes], "iface": self.iface,
                 "launcher": str(self.launcher), "hostfile": str(self.hostfile)}
        (self.state_dir / "state.json").write_text(json.dumps(state, indent=1) + "\n")

    def _write_launcher(self, ip: str, unshare: str) -> None:
        cases = "".join(f"    {n.address}|{n.name}) node={n.name};;\n" for n in self.nodes)
        self.launcher.write_text(f"""#!/bin/sh
# Hydra's -launcher-exec for netcluster {self.prefix} (python -m mpitrain.testing.netcluster):
# called as ssh is, `launch [-x] HOST COMMAND...`; runs COMMAND in HOST's namespace under
# HOST's hostname.
node=
while [ $# -gt 0 ]; do
  case "$1" in
{cases}    -*) shift; continue;;
    *) echo "netcluster {self.prefix}: unknown host $1" >&2; exit 255;;
  esac
  shift; break
done
[ -n "$node" ] || {{ echo "netcluster {self.prefix}: no host given" >&2; exit 255; }}
exec {ip} netns exec "$node" {unshare} --uts --mount --propagation private /bin/sh -c \\
  "echo $node > /proc/sys/kernel/hostname && mount -t tmpfs -o size=1g $node {self.tmp} \\
   && exec $*"
""")
        self.launcher.chmod(0o755)

    def down(self) -> None:
        """Remove everything: processes in the nodes, namespaces (with their links), files.

        Safe to repeat and on a half-built cluster; raises if something could not be removed.
        """
        names = self._namespaces()
        self._inodes |= {netns_inode(ns) for ns in names} - {None}
        self.kill_jobs()
        for ns in names:  # its links go with it (none is ever made in the host's namespace)
            sh("ip", "netns", "del", ns, check=False)
        for path in self._files():
            shutil.rmtree(path, ignore_errors=True)
        for parent in (STATE_ROOT, NETNS_ETC):  # made by up, if no other cluster uses them
            try:
                parent.rmdir()
            except OSError:
                pass
        left = self.leftovers()
        if left:
            raise NetclusterError(f"cluster {self.prefix!r}: could not remove {'; '.join(left)}")
        self._inodes.clear()  # nothing lives in them: from now on they may be others'

    def __enter__(self) -> "Cluster":
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()

    # -- what exists ----------------------------------------------------------------------
    def _namespaces(self) -> List[str]:
        return namespaces(rf"{self.prefix}-(hub|n\d+)")

    def _files(self) -> List[Path]:
        etc = [p for p in NETNS_ETC.glob(f"{self.prefix}-n*")
               if re.fullmatch(rf"{self.prefix}-n\d+", p.name)] if NETNS_ETC.is_dir() else []
        return [p for p in [self.state_dir, *etc] if p.exists()]

    def _pids(self) -> List[int]:
        """Processes in this cluster's namespaces, or naming a file of its state directory
        (mpiexec and its proxies name the launcher; a Slurm daemon its slurm.conf)."""
        inodes = self._inodes | {netns_inode(ns) for ns in self._namespaces()}
        return processes(inodes - {None}, f"{self.state_dir}/")

    def leftovers(self) -> List[str]:
        """What of this cluster exists: namespaces, links, processes, files ([] once down)."""
        return ([f"namespace {ns}" for ns in self._namespaces()]
                + [f"link {link}" for link in root_links(f"{self.prefix}-")]
                + [f"process {pid} ({cmdline(pid)[:80]})" for pid in self._pids()]
                + [f"file {path}" for path in self._files()])

    def kill_jobs(self) -> None:
        """End every process in the nodes (SIGTERM, then SIGKILL after a grace period)."""
        kill_all(self._pids)

    # -- jobs -----------------------------------------------------------------------------
    def link_env(self) -> Dict[str, str]:
        """What MPICH needs to send between nodes over the links: ofi's tcp on ``iface``."""
        return {"MPIR_CVAR_CH4_NETMOD": "ofi", "FI_PROVIDER": "tcp", "FI_TCP_IFACE": self.iface}

    def job_env(self) -> Dict[str, str]:
        """What a job needs: MPICH over TCP on the links, Hydra's launcher and host file,
        and ``TMPDIR``, which is each node's own (as on separate machines)."""
        return {**self.link_env(), "HYDRA_LAUNCHER": "ssh", "TMPDIR": str(self.tmp),
                "HYDRA_LAUNCHER_EXEC": str(self.launcher), "HYDRA_HOST_FILE": str(self.hostfile)}

    def run(self, cmd: Sequence[str], env: Optional[Dict[str, str]] = None,
            timeout: Optional[float] = None, capture: bool = True) -> subprocess.CompletedProcess:
        """Run ``cmd`` in node 0 (its namespace and hostname) with ``env`` (default: this
        process's, without the thread counts importing mpitrain set) and ``job_env()``; at
        ``timeout`` every job in the nodes is killed and ``subprocess.TimeoutExpired``
        raised."""
        node = self.nodes[0].name
        full = [tool("ip"), "netns", "exec", node, *as_host(node), *map(str, cmd)]
        return communicate(full, cmd, {**(child_env() if env is None else env),
                                       **self.job_env()}, timeout, capture, abort=self.kill_jobs)

    def mpiexec(self, ranks_per_node: int, args: Sequence[str],
                env: Optional[Dict[str, str]] = None, timeout: float = 60,
                nodes: Optional[int] = None,
                launcher: Optional[str] = None) -> subprocess.CompletedProcess:
        """``mpiexec`` of ``args`` on the first ``nodes`` nodes (default all), ranks
        ``k*ranks_per_node ...`` on node k, from node 0; ``launcher``: the mpiexec to use."""
        used = self.nodes[:nodes or len(self.nodes)]
        hosts = ",".join(f"{n.address}:{ranks_per_node}" for n in used)
        cmd = [launcher or default_mpiexec(), "-launcher", "ssh",
               "-launcher-exec", str(self.launcher), "-hosts", hosts,
               "-n", str(ranks_per_node * len(used)), "-genvall", *args]
        return self.run(cmd, env=env, timeout=timeout)

    def link_bytes(self) -> Dict[str, Link]:
        """Bytes each node's link carried so far, by node name, from the tbf qdiscs."""
        return {node.name: Link(qdisc_sent(node.name, self.iface),
                                qdisc_sent(self.hub, self.port(i)))
                for i, node in enumerate(self.nodes)}

    def status(self) -> str:
        """The nodes, their addresses and the bytes through each link, as a table."""
        lines = [f"cluster {self.prefix}: {len(self.nodes)} nodes, links {self.rate} each way "
                 f"(tbf burst {self.burst} latency {self.latency}), interface {self.iface}",
                 f"{'node':<12} {'address':<15} {'sent bytes':>14} {'received bytes':>14}"]
        for name, link in self.link_bytes().items():
            address = next(n.address for n in self.nodes if n.name == name)
            lines.append(f"{name:<12} {address:<15} {link.sent:>14} {link.received:>14}")
        lines.append(f"launcher {self.launcher}, hosts {self.hostfile}")
        return "\n".join(lines)


def command_line(prog: str, doc: str, argv: Optional[Sequence[str]],
                 build: Callable[[argparse.Namespace], Any], attach: Callable[[str], Any],
                 run_help: str, more: Optional[Callable[[argparse.ArgumentParser], None]] = None
                 ) -> int:
    """``up``, ``run -- CMD``, ``status``, ``down`` of ``prog`` (usage: ``doc``'s second and
    third paragraphs): ``build(args)`` describes what ``up`` builds, ``attach(name)`` finds
    what it built (each with ``up``, ``run``, ``status``); ``more(up)`` adds options to up."""
    usage = "\n\n".join(doc.split("\n\n")[1:3]).replace("::", ":")
    parser = argparse.ArgumentParser(prog=prog, description=usage,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="build the cluster")
    up.add_argument("--nodes", type=int, default=2, help="emulated nodes (default 2)")
    up.add_argument("--rate", default="1gbit", help="each link's rate, each way (tc units)")
    up.add_argument("--subnet", default="10.77.0", help="node I gets SUBNET.(I+1)")
    up.add_argument("--burst", default="64kb", help="tbf burst (default 64kb)")
    up.add_argument("--latency", default="50ms", help="tbf latency (default 50ms)")
    if more is not None:
        more(up)
    run = sub.add_parser("run", help=run_help)
    run.add_argument("cmd", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    sub.add_parser("status", help="nodes, addresses, bytes per link")
    sub.add_parser("down", help="remove everything")
    for p in sub.choices.values():
        p.add_argument("--name", default="mpt", help="the cluster's prefix (default mpt)")
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            print(build(args).up().status())
        elif args.command == "run":
            cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
            if not cmd:
                parser.error("run: give the command after --")
            return attach(args.name).run(cmd, timeout=None, capture=False).returncode
        elif args.command == "status":
            print(attach(args.name).status())
        else:  # down: also a half-built or unrecorded cluster, found by its names
            try:
                cluster = Cluster.attach(args.name)
            except NetclusterError:
                cluster = Cluster(prefix=args.name)
            cluster.down()  # everything of a netslurm too: its daemons run in the nodes
            print(f"cluster {args.name}: removed")
    except NetclusterError as exc:
        print(f"{prog.split('.')[-1]}: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line: ``up``, ``run -- CMD``, ``status``, ``down`` (see the module doc)."""
    return command_line("python -m mpitrain.testing.netcluster", __doc__, argv,
                        lambda a: Cluster(a.nodes, a.rate, a.name, a.subnet, a.burst, a.latency),
                        Cluster.attach, "run a command in node 0 with the job environment")


if __name__ == "__main__":
    sys.exit(main())
