"""Slurm across emulated nodes (mpitrain.testing.netslurm): jobs of 2 nodes x 1 task see two
nodes, slurm/train.sbatch trains across them with its gradients over the shaped links (srun
and Hydra's mpiexec alike), train-requeue.sbatch survives a rank dying, or pre-empted, on the
second node and ends with the bits of the uninterrupted run, and nothing is left after a
teardown.  Root only (tests/netslurm_fixture.py); CI requires them."""
import os
import re
import subprocess
import sys
import time

import pytest

from conftest import clean_env, final, same_bits
from netcluster_fixture import TIMEOUT, grown, prefix, traces
from netslurm_fixture import netslurm, require_netslurm  # noqa: F401 (fixture)
from slurm_cluster import SETUP_BUDGET, launched_by, ok, took
from mpitrain.testing.netcluster import STATE_ROOT, Cluster
from mpitrain.testing.netslurm import SlurmCluster

STEPS = 60
# 4,099 parameters: a step's gradient (16 KB) must cross each link each way, 1 MB in a run,
# far above the Slurm daemons' own traffic on the links (tens of kB per job).
ARGS = ["--hidden", "256", "--batch-size", "64", "--steps", str(STEPS), "--ckpt-every", "10",
        "--log-every", "5", "--optimizer", "adam", "--lr", "0.01"]
TWO_NODES = ["-N", "2", "--ntasks-per-node=1"]  # and no --ntasks: the scripts' own count


def on_two_nodes(netslurm, script, args=(), env=None, timeout=120):
    """``sbatch -N 2 --ntasks-per-node=1 script args``, waited for (bounded); the Job and the
    bytes each link carried meanwhile."""
    before = netslurm.api.cluster.link_bytes()
    job = netslurm.submit(script, args, ntasks=None, sbatch_args=TWO_NODES, env=env,
                          timeout=timeout)
    return job, grown(before, netslurm.api.cluster.link_bytes())


def assert_gradients_crossed(moved, state):
    """Each step's all-reduce must move the whole float32 gradient each way between the two
    nodes: every link carried at least STEPS times it, in and out."""
    need = STEPS * 4 * sum(p.size for p in state.params.values())
    for name, (sent, received) in moved.items():
        assert sent >= need and received >= need, (
            f"{name}'s link carried {sent} bytes out and {received} in, fewer than the {need} "
            f"the gradients must move each way: the traffic bypassed the link ({moved})")


def names(netslurm):
    return [n.name for n in netslurm.api.cluster.nodes]


@pytest.fixture(scope="module")
def reference(netslurm, small_data, tmp_path_factory):
    """train.sbatch on 2 nodes x 1 task, uninterrupted: (the job, its final checkpoint, the
    bytes through the links)."""
    ckpt = tmp_path_factory.mktemp("netslurm-reference")
    job, moved = on_two_nodes(netslurm, "slurm/train.sbatch",
                              ["--data", small_data, "--ckpt-dir", ckpt, *ARGS])
    ok(job)
    return job, final(ckpt), moved


INFO = {"srun": "srun --mpi=pmi2 python -m mpitrain info",
        "mpiexec": 'mpiexec -n "$SLURM_NTASKS" python -m mpitrain info'}  # Hydra, via srun


@pytest.mark.timeout(SETUP_BUDGET + 60)
@pytest.mark.parametrize("launcher", sorted(INFO))
def test_a_two_node_job_is_two_nodes_to_mpich(netslurm, tmp_path, launcher, record_property):
    script = tmp_path / "info.sbatch"
    script.write_text(f"#!/bin/bash\nset -e\nhostname\n{INFO[launcher]}\n")
    job, _ = on_two_nodes(netslurm, str(script), timeout=60)
    took(record_property, f"mpitrain info on 2 nodes by {launcher}", job.seconds)
    ok(job)
    n0, n1 = names(netslurm)
    assert job.output.startswith(f"{n0}\n"), job.output  # the batch script runs on node 0
    assert f"2 on 2 node(s): {n0}, {n1}" in job.output, job.output


@pytest.mark.timeout(SETUP_BUDGET + 150)
def test_train_sbatch_on_two_nodes_sends_its_gradients_over_the_links(netslurm, reference,
                                                                       record_property):
    job, state, moved = reference
    took(record_property, "train.sbatch -N 2 --ntasks-per-node=1, 60 steps", job.seconds)
    assert ": 2 ranks, " in job.output and "done: steps 1-60" in job.output, job.output
    assert launched_by(job.output) == "srun", job.output[:600]
    assert job.info["NumNodes"] == "2" and job.info["NumTasks"] == "2", job.info
    assert job.info["NodeList"] == f"{netslurm.api.cluster.prefix}-n[0-1]", job.info
    assert state.step == STEPS
    assert_gradients_crossed(moved, state)
    print(f"netslurm: bytes through each link (sent, received): {moved}")


@pytest.mark.timeout(SETUP_BUDGET + 150)
def test_train_sbatch_by_hydra_across_the_nodes_gives_the_same_bits(netslurm, small_data,
                                                                    tmp_path, reference,
                                                                    record_property):
    """MPITRAIN_LAUNCHER=mpiexec: Hydra finds the allocation and starts its proxies with
    srun; the same run over the same links."""
    job, moved = on_two_nodes(netslurm, "slurm/train.sbatch",
                              ["--data", small_data, "--ckpt-dir", tmp_path, *ARGS],
                              env=netslurm.env(MPITRAIN_LAUNCHER="mpiexec"))
    took(record_property, "train.sbatch -N 2 via mpiexec", job.seconds)
    ok(job)
    assert launched_by(job.output) == "mpiexec", job.output[:600]
    assert_gradients_crossed(moved, final(tmp_path))
    assert same_bits(final(tmp_path), reference[1])


def requeue_drill(netslurm, data, ckpt, fault, record_property, flow):
    """train-requeue.sbatch on 2 nodes with the fault drill ``fault`` (rank 1, the second
    node's, at step 25, first launch only); the completed job's output, the job."""
    job, _ = on_two_nodes(netslurm, "slurm/train-requeue.sbatch",
                          ["--ckpt-dir", ckpt, "--data", data, *ARGS, "--fault",
                           f"{fault}:rank=1:step=25:attempt=1"], timeout=150)
    took(record_property, f"train-requeue.sbatch -N 2, {flow}", job.seconds)
    ok(job)
    assert f"fault drill: rank 1 sends itself SIG{fault.upper()} at step 25" in job.output
    return job.output, job


@pytest.mark.timeout(SETUP_BUDGET + 180)
def test_requeue_sbatch_relaunches_after_a_rank_died_on_the_second_node(
        netslurm, small_data, tmp_path, reference, record_property):
    out, job = requeue_drill(netslurm, small_data, tmp_path, "kill", record_property,
                             "rank 1 killed on node 1, relaunched")
    assert f"srun: error: {names(netslurm)[1]}: task 1: Killed" in out, out  # node 1's rank
    assert "requeue 0 attempt 1: exit 0" not in out
    assert "requeue 0 attempt 2: exit 0" in out, out
    assert out.count("resuming from") == 1 and "at step 20 (epoch 2)" in out
    assert job.restarts == 0  # relaunched within the allocation, not requeued
    assert same_bits(final(tmp_path), reference[1])


@pytest.mark.timeout(SETUP_BUDGET + 180)
def test_requeue_sbatch_preempted_on_the_second_node_requeues_and_resumes(
        netslurm, small_data, tmp_path, reference, record_property):
    """Rank 1 (node 1) gets SIGTERM at step 25: the ranks agree, checkpoint and exit 75; the
    script requeues the job, which runs again on both nodes and resumes."""
    out, job = requeue_drill(netslurm, small_data, tmp_path, "term", record_property,
                             "pre-empted on node 1, requeued")
    # Both tasks leave with 75, whichever exits first: srun's SIGTERM to the other
    # (--kill-on-bad-exit=1) must not end it by the signal.
    assert f"srun: error: {names(netslurm)[1]}: task 1: Exited with exit code 75" in out, out
    assert ": Terminated" not in out and ": Killed" not in out, out
    assert "requeue 0 attempt 1: exit 75" in out
    assert "train-requeue: pre-empted; requeueing to resume from the checkpoint" in out
    assert job.restarts == 1 and job.info["NumNodes"] == "2", job
    assert out.count("resuming from") == 1 and "at step 25 (epoch 2)" in out
    assert "requeue 1 attempt 1: exit 0" in out
    assert same_bits(final(tmp_path), reference[1])


def tasks(marker):
    """{pid: network namespace} of this Python's processes whose arguments hold ``marker``
    (the tasks, not the srun that started them)."""
    pattern = f"^{re.escape(sys.executable)} .*{marker}"
    found = {}
    for pid in subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True,
                              timeout=TIMEOUT).stdout.split():
        try:
            found[int(pid)] = os.readlink(f"/proc/{pid}/ns/net")
        except OSError:
            pass  # gone meanwhile
    return found


@pytest.mark.timeout(SETUP_BUDGET + 60)
def test_nothing_is_left_after_a_failure_with_a_job_running(tmp_path):
    """Daemons, job steps, namespaces, links and state files all go, also with a 2-node job
    still running when the code inside ``with`` raises."""
    require_netslurm()
    slurm = SlurmCluster(Cluster(nodes=2, prefix=prefix("sd")))
    marker = f"hung job of {slurm.cluster.prefix}"
    script = tmp_path / "hang.sbatch"
    script.write_text(f"#!/bin/bash\nsrun {sys.executable} -c 'import time; time.sleep(600)'"
                      f" '{marker}'\n")
    with pytest.raises(RuntimeError, match="inside the cluster"):
        with slurm:
            done = slurm.run(["sbatch", *TWO_NODES, "-o", tmp_path / "out", script],
                             env=slurm.env(clean_env()))
            assert done.returncode == 0, done.stderr
            deadline = time.monotonic() + 60
            while len(set(tasks(marker).values())) < 2:  # a task in each node
                assert time.monotonic() < deadline, (tmp_path / "out").read_text()
                time.sleep(0.1)  # polling under a deadline
            assert traces(slurm.cluster.prefix) and slurm.leftovers()
            raise RuntimeError("failed inside the cluster")
    assert slurm.leftovers() == []
    assert traces(slurm.cluster.prefix) == []  # ip netns, ip link, pgrep: daemons too
    assert tasks(marker) == {}
    assert not (STATE_ROOT / slurm.cluster.prefix).exists()


@pytest.mark.timeout(SETUP_BUDGET + 60)
def test_the_command_line_up_run_status_down(tmp_path):
    require_netslurm()
    name = prefix("sc")
    cli = [sys.executable, "-m", "mpitrain.testing.netslurm"]

    def command(*args):
        done = subprocess.run([*cli, *args[:1], "--name", name, *args[1:]], capture_output=True,
                              text=True, timeout=TIMEOUT, env=clean_env(), cwd=tmp_path)
        assert done.returncode == 0, f"{args}: exit {done.returncode}\n{done.stdout}{done.stderr}"
        return done.stdout

    try:
        up = command("up", "--nodes", "2", "--rate", "100mbit")
        assert f"{name}-n0 idle" in up and f"{name}-n1 idle" in up, up
        out = command("run", "--", "srun", *TWO_NODES, "hostname")
        assert sorted(out.split()) == [f"{name}-n0", f"{name}-n1"], out
        status = command("status")
        assert f"{name}-n1 idle" in status and "10.77.0.2" in status, status
        command("down")
        assert Cluster(prefix=name).leftovers() == [] and traces(name) == []
    finally:
        Cluster(prefix=name).down()

