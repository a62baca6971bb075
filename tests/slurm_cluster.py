"""A real one-node Slurm on localhost, for the tests of ``slurm/*.sbatch``.

The session fixture ``slurm`` (import it into a test module) gives a running
cluster:

- Slurm and munge must be installed already (Debian: ``apt-get install
  slurm-wlm munge``; ``.ci/run`` does so): the test suite changes nothing on
  the system;
- a private ``munged`` (its own key and socket), ``slurmctld`` and ``slurmd``
  are started on free ports, with a one-node ``slurm.conf`` whose state,
  spool, log and pid files all live in a temporary directory;
- at the end of the session the jobs are cancelled and the daemons stopped
  by the PIDs in their pid files.

Where that is impossible (not Linux, not root, Slurm or munge not installed,
a daemon fails) every test that uses the fixture is skipped, with the reason.
``MPITRAIN_SLURM_TESTS=skip`` skips them anyway; ``MPITRAIN_SLURM_TESTS=require``
turns those skips into failures (for a CI machine that must run them).

Every wait is bounded: daemons get ``START_TIMEOUT`` seconds, a job the
``timeout`` given to ``submit``/``wait``; a job still running at its deadline
is cancelled with ``scancel`` and the test fails with its output so far.
"""
from __future__ import annotations

import os
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, Optional, Sequence

import pytest

from conftest import ROOT, clean_env
from mpitrain.testing.host import search_path, start_daemon, tail, until, which
from mpitrain.testing.netslurm import PLUGINS, munge_key, munge_works

START_TIMEOUT = 30  # each daemon, until it answers
# What a test's own time limit must leave for this fixture's set-up, when
# that test is the first to use it.
SETUP_BUDGET = 3 * START_TIMEOUT

# How long Slurm holds a requeued job before it may start again
# (AuthInfo=cred_expire, default 120 s). Short here so that a requeue test
# takes seconds, not minutes; long enough to start a job step on a busy host.
REQUEUE_HOLD = 10

FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
                "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
POLL = 0.2  # seconds between two looks at a job's state (always under a deadline)


def _mode() -> str:
    return os.environ.get("MPITRAIN_SLURM_TESTS", "auto").strip().lower() or "auto"


def unavailable(reason: str):
    """Skip (or, with MPITRAIN_SLURM_TESTS=require, fail) for want of a Slurm."""
    if _mode() == "require":
        pytest.fail(f"MPITRAIN_SLURM_TESTS=require, but: {reason}", pytrace=False)
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_slurm() -> None:
    """Skip (or fail, when required) unless Slurm's daemons, tools and munge are installed."""
    missing = [name for name in ("slurmctld", "slurmd", "sbatch", "scontrol", "munged", "munge")
               if not which(name)]
    if missing:
        unavailable(f"Slurm is not installed ({', '.join(missing)} not found); install it "
                    "first, e.g. apt-get install slurm-wlm munge (the tests install nothing)")


@dataclass
class Job:
    """A finished (or abandoned) batch job."""

    id: str
    state: str  # COMPLETED, FAILED, CANCELLED, TIMEOUT, ...
    exit_code: int  # of the batch script
    signal: int  # that ended the batch script, or 0
    restarts: int  # how many times it was requeued
    output: str  # the text of its output file (stdout and stderr)
    seconds: float  # from sbatch to the final state
    info: Dict[str, str] = field(default_factory=dict)  # scontrol show job, parsed

    def __str__(self) -> str:
        return (f"job {self.id}: {self.state}, exit {self.exit_code}:{self.signal}, "
                f"{self.restarts} restarts, {self.seconds:.1f} s")


class SlurmCluster:
    """munged + slurmctld + slurmd on this host, configured in ``base``."""

    def __init__(self, base: Path):
        self.base = base
        self.host = socket.gethostname().split(".")[0]
        self.conf = base / "slurm.conf"
        self.logs = base / "log"
        self.run_dir = base / "run"
        self.munge_socket = base / "munge" / "munge.socket"
        self.started: list = []  # (name, pid file) of the daemons started, in order
        self.start_seconds = 0.0

    # -- commands -------------------------------------------------------------------------
    def env(self, **extra) -> dict:
        """The environment for Slurm commands and jobs: this cluster, this Python first on
        PATH, the checkout on PYTHONPATH, nothing inherited from an enclosing job."""
        env = {k: v for k, v in clean_env().items() if not k.startswith(("SLURM_", "SBATCH_",
                                                                          "SRUN_", "SALLOC_"))}
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), search_path()])
        env.update(extra)
        return env

    def run(self, *cmd: str, timeout: float = 30, check: bool = True,
            env: Optional[dict] = None, cwd: Optional[Path] = None) -> subprocess.CompletedProcess:
        """A Slurm command (run in ``cwd``, default the checkout), bounded in time."""
        try:
            done = self.execute(list(cmd), timeout, env or self.env(), cwd or ROOT)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{shlex.join(cmd)} did not answer within {timeout} s") from None
        if check and done.returncode != 0:
            raise RuntimeError(f"{shlex.join(cmd)} failed (exit {done.returncode}): "
                               f"{done.stderr.strip() or done.stdout.strip()}")
        return done

    def execute(self, cmd: Sequence[str], timeout: float, env: dict,
                cwd: Path) -> subprocess.CompletedProcess:
        """Where the Slurm commands run: on this host (output captured)."""
        return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout,
                              env=env, cwd=str(cwd))

    # -- start and stop -------------------------------------------------------------------
    def _until(self, what: str, ok, timeout: float = START_TIMEOUT, log: Optional[Path] = None):
        """Poll ``ok()`` until it is true, for at most ``timeout`` seconds."""
        until(what, ok, timeout, log, POLL)

    def _node_line(self) -> str:
        """The node as ``slurmd -C`` sees it (CPUs, sockets, cores, memory)."""
        seen = subprocess.run([which("slurmd"), "-C"], capture_output=True, text=True,
                              timeout=30).stdout
        words = next((line.split() for line in seen.splitlines()
                      if line.startswith("NodeName=")), [])
        attrs = [w for w in words if not w.startswith(("NodeName=", "UpTime="))]
        if not attrs:  # slurmd -C said nothing useful: the CPUs at least
            attrs = [f"CPUs={os.cpu_count() or 1}"]
        cpus = int(next((w.split("=")[1] for w in attrs if w.startswith("CPUs=")), "1"))
        if cpus < 2:
            unavailable(f"this node has {cpus} CPU; the Slurm tests run 2-task jobs")
        return (f"NodeName={self.host} NodeAddr=127.0.0.1 NodeHostname={self.host} "
                + " ".join(attrs))

    def write_conf(self) -> None:
        for d in ("state", "spool", "log", "run", "munge"):
            (self.base / d).mkdir(parents=True, exist_ok=True)
        os.chmod(self.base, 0o700)
        os.chmod(self.base / "munge", 0o700)
        b = self.base
        self.conf.write_text(f"""\
# A one-node Slurm for mpitrain's tests (tests/slurm_cluster.py).
ClusterName=mpitrain-test
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire={REQUEUE_HOLD}
StateSaveLocation={b}/state
SlurmdSpoolDir={b}/spool
SlurmctldLogFile={b}/log/slurmctld.log
SlurmdLogFile={b}/log/slurmd.log
SlurmctldPidFile={b}/run/slurmctld.pid
SlurmdPidFile={b}/run/slurmd.pid
{PLUGINS}# Job ids that no earlier test cluster on this host used: MPICH names its
# shared-memory segment after the Slurm job and step id, and a segment left
# in /dev/shm by a killed job would break MPI_Init in a new job of that id.
FirstJobId={random.randrange(1_000_000, 60_000_000)}
{self._node_line()}
PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")

    def _daemon(self, name: str, cmd: Sequence[str], pid_file: Path) -> None:
        """Start a daemon that forks into the background and writes ``pid_file``."""
        self.started.append((name, pid_file))
        start_daemon(cmd, self.logs / f"{name}.start.log", self.env(), START_TIMEOUT)

    def start(self) -> None:
        t0 = time.monotonic()
        self.write_conf()
        key = self.base / "munge" / "munge.key"
        munge_key(key)
        munged = self.run_dir / "munged.pid"
        self._daemon("munged", [which("munged"), "--force", f"--socket={self.munge_socket}",
                                f"--key-file={key}", f"--pid-file={munged}",
                                f"--log-file={self.logs / 'munged.log'}",
                                f"--seed-file={self.base / 'munge' / 'seed'}"], munged)
        self._until("munge -n | unmunge did not say Success",
                    lambda: munge_works(self.munge_socket), log=self.logs / "munged.log")
        self._daemon("slurmctld", [which("slurmctld"), "-c", "-f", str(self.conf)],
                     self.run_dir / "slurmctld.pid")
        self._until("slurmctld did not answer scontrol ping",
                    lambda: "is UP" in self.run("scontrol", "ping", timeout=10).stdout,
                    log=self.logs / "slurmctld.log")
        self._daemon("slurmd", [which("slurmd"), "-N", self.host, "-f", str(self.conf)],
                     self.run_dir / "slurmd.pid")
        self._until(f"node {self.host} did not become idle",
                    lambda: self.run("sinfo", "-h", "-n", self.host, "-o", "%T",
                                     timeout=10).stdout.strip() == "idle",
                    log=self.logs / "slurmd.log")
        self.start_seconds = time.monotonic() - t0

    def stop(self) -> None:
        """Cancel every job, then stop the daemons in reverse order, by their pid files."""
        if any(name == "slurmctld" for name, _ in self.started):
            try:
                self.run("scancel", "--user=root", "--full", check=False, timeout=15)
                self._until("jobs were still running", lambda: not self.run(
                    "squeue", "-h", "-o", "%i", timeout=10).stdout.strip(), timeout=45)
            except RuntimeError as exc:
                print(f"slurm_cluster: {exc}", file=sys.stderr)
        for name, pid_file in reversed(self.started):
            try:
                pid = int(pid_file.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue  # it never wrote one: it did not start
            if not _is(pid, name):
                continue  # already gone, and the pid may belong to someone else by now
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 15
            while _is(pid, name) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _is(pid, name):
                os.kill(pid, signal.SIGKILL)
        self.started.clear()

    # -- jobs -----------------------------------------------------------------------------
    def sbatch(self, script: str, args: Iterable = (), ntasks: Optional[int] = 2,
               sbatch_args: Sequence[str] = (), env: Optional[dict] = None,
               output: Optional[Path] = None, time_limit: str = "10",
               cwd: Optional[Path] = None) -> str:
        """Submit ``script`` (a path in the checkout) from ``cwd`` (default: the
        checkout); the job id.

        The job runs this Python's venv (first on PATH) and this checkout
        (PYTHONPATH), unless ``env`` says otherwise. Its output goes to ``output``
        (default: a file in this cluster's log directory). ``ntasks=None`` gives no
        ``--ntasks`` (``sbatch_args`` say it, e.g. ``-N 2 --ntasks-per-node=1``)."""
        output = output or self.logs / "job-%j.out"
        tasks = [f"--ntasks={ntasks}"] if ntasks is not None else []
        cmd = ["sbatch", "--parsable", *tasks, f"--time={time_limit}",
               f"--output={output}", "--export=ALL", *sbatch_args, str(ROOT / script),
               *map(str, args)]
        done = self.run(*cmd, env=env or self.env(), timeout=30, cwd=cwd)
        return done.stdout.strip().split(";")[0]

    def show(self, job_id: str) -> Dict[str, str]:
        """``scontrol show job -o``, as a dict (empty if Slurm no longer knows the job)."""
        done = self.run("scontrol", "show", "job", "-o", job_id, check=False, timeout=15)
        return dict(re.findall(r"(\S+?)=(\S*)", done.stdout)) if done.returncode == 0 else {}

    def wait(self, job_id: str, timeout: float, since: Optional[float] = None) -> Job:
        """Wait for the job's final state, for at most ``timeout`` seconds.

        A job that has not finished by then is cancelled, and the test fails
        with its state and output so far."""
        t0 = since if since is not None else time.monotonic()
        deadline = time.monotonic() + timeout
        while True:
            info = self.show(job_id)
            state = info.get("JobState", "")
            if state in FINAL_STATES:
                return self._job(job_id, info, time.monotonic() - t0)
            if time.monotonic() > deadline:
                break
            time.sleep(POLL)
        self.run("scancel", job_id, check=False, timeout=15)
        try:
            self._until(f"job {job_id} did not end after scancel", lambda: self.show(
                job_id).get("JobState", "CANCELLED") in FINAL_STATES, timeout=45)
        except RuntimeError as exc:
            print(f"slurm_cluster: {exc}", file=sys.stderr)
        job = self._job(job_id, info, time.monotonic() - t0)
        pytest.fail(f"job {job_id} was still {state or 'unknown'} (reason "
                    f"{info.get('Reason')}) after {timeout:.0f} s: cancelled it.\n"
                    f"output so far:\n{job.output[-4000:]}\n"
                    f"slurmctld.log:\n{tail(self.logs / 'slurmctld.log')}", pytrace=False)

    def submit(self, script: str, args: Iterable = (), ntasks: Optional[int] = 2,
               timeout: float = 120, **kw) -> Job:
        """sbatch, then wait (bounded; a job still running at ``timeout`` is cancelled)."""
        t0 = time.monotonic()
        return self.wait(self.sbatch(script, args, ntasks=ntasks, **kw), timeout, since=t0)

    def _job(self, job_id: str, info: Dict[str, str], seconds: float) -> Job:
        code, _, sig = info.get("ExitCode", "-1:0").partition(":")
        out = info.get("StdOut", "")
        try:
            text = Path(out).read_text(errors="replace") if out else ""
        except OSError:
            text = ""
        return Job(job_id, info.get("JobState", "?"), int(code), int(sig or 0),
                   int(info.get("Restarts", "0") or 0), text, seconds, info)

    def job_processes(self, job_id: str) -> Dict[int, int]:
        """{rank: pid} of the job's ``mpitrain train`` ranks, from /proc (the node is here).

        The rank is PMI_RANK (set by srun --mpi=pmi2 and by mpiexec), else SLURM_PROCID."""
        ranks = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                env = dict(kv.split("=", 1) for kv in (entry / "environ").read_bytes()
                           .decode(errors="replace").split("\0") if "=" in kv)
                argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            except OSError:
                continue
            rank = env.get("PMI_RANK", env.get("SLURM_PROCID", ""))
            python = Path(argv[0]).name.startswith("python") and argv[1:4] == [
                "-m", "mpitrain", "train"]  # a rank, not srun or mpiexec starting ranks
            if env.get("SLURM_JOB_ID") == job_id and python and rank.isdigit():
                ranks[int(rank)] = int(entry.name)
        return ranks


def ok(job: Job) -> None:
    """Assert that ``job`` completed with exit status 0 (else show its output's end)."""
    assert job.state == "COMPLETED" and job.exit_code == 0, f"{job}\n{job.output[-3000:]}"


def took(record_property, flow: str, seconds: float) -> None:
    """Report how long a Slurm flow took (printed; and a property in --junitxml)."""
    record_property(f"seconds {flow}", round(seconds, 1))
    print(f"slurm flow: {flow}: {seconds:.1f} s")


def launched_by(output: str) -> str:
    """Which launcher started the ranks, from the thread line of the run's header."""
    if "(SLURM_STEP_TASKS_PER_NODE)" in output:
        return "srun"
    if "(MPI_LOCALNRANKS)" in output:
        return "mpiexec"
    return "unknown"


def _is(pid: int, name: str) -> bool:
    """Whether ``pid`` is alive and runs the program ``name`` (not a recycled pid)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            stat = fh.read()
    except OSError:
        return False
    comm = stat[stat.find("(") + 1:stat.rfind(")")]
    zombie = stat[stat.rfind(")") + 2:].startswith("Z")
    return not zombie and comm == name[:15]


def signal_state(pid: int) -> Dict[str, str]:
    """The state letter and pending signal masks of a process, from /proc/PID/status."""
    fields = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    except OSError:
        pass
    return fields


def pending(pid: int, signum: int) -> bool:
    """Whether ``signum`` is pending (not yet handled) for process ``pid``."""
    st = signal_state(pid)
    bit = 1 << (signum - 1)
    return any(int(st.get(k, "0"), 16) & bit for k in ("SigPnd", "ShdPnd"))


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A running one-node Slurm on this host (see the module's docstring)."""
    if _mode() in ("skip", "0", "no", "off"):
        pytest.skip("MPITRAIN_SLURM_TESTS=skip")
    if not sys.platform.startswith("linux"):
        unavailable("a local Slurm for tests needs Linux")
    if os.geteuid() != 0:
        unavailable("starting a local Slurm needs root; run the Slurm tests as root, "
                    "e.g. in a container")
    require_slurm()
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        cluster.stop()
        unavailable(f"could not start a local Slurm: {exc}")
    except BaseException:  # a skip from inside, an interrupt: stop what did start
        cluster.stop()
        raise
    print(f"\nslurm_cluster: start {cluster.start_seconds:.1f} s, conf {cluster.conf}")
    try:
        yield cluster
    finally:
        cluster.stop()
