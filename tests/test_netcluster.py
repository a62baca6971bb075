"""Emulated nodes (mpitrain.testing.netcluster): MPICH sees two nodes, the bytes between them
cross the shaped links (and only those between them), nothing is left behind, the command
line works.  Root only (tests/netcluster_fixture.py); CI requires them."""
import json
import subprocess
import sys
import textwrap

import pytest

from conftest import clean_env, mpiexec
from netcluster_fixture import (TIMEOUT, grown, netcluster, prefix,  # noqa: F401 (fixture)
                                require_netcluster, traces)
from mpitrain.testing.netcluster import Cluster

SIZE = 8 << 20  # bytes of the all-reduce: about 70 ms each way at 1 Gbit/s
RATE = 1e9  # the fixture's links, bit/s

JOB = textwrap.dedent("""\
    import json, socket, sys, time
    import numpy as np
    from mpi4py import MPI
    from mpitrain.comm.overlap import plan_overlap

    comm = MPI.COMM_WORLD
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    plan = plan_overlap(comm)[:2]  # the default exchange: (overlap, bucket_mb)
    comm.Allreduce(MPI.IN_PLACE, np.ones(1))  # connections up before the clock starts
    n = int(sys.argv[1]) // 8
    buf = np.arange(n, dtype=np.float64) + comm.rank
    comm.Barrier()
    t = time.perf_counter()
    comm.Allreduce(MPI.IN_PLACE, buf)
    t = comm.allreduce(time.perf_counter() - t, op=MPI.MAX)
    want = np.arange(n, dtype=np.float64) * comm.size + comm.size * (comm.size - 1) / 2
    ranks = comm.gather({"node_size": node.size, "host": socket.gethostname(),
                         "ok": bool(np.array_equal(buf, want))})
    if comm.rank == 0:
        print("RESULT " + json.dumps({"size": comm.size, "seconds": t, "ranks": ranks,
                                      "plan": plan}))
""")


@pytest.fixture(scope="module")
def job_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("netcluster") / "job.py"
    path.write_text(JOB)
    return str(path)


def allreduce(cluster, job_file, ranks_per_node, nodes=None) -> dict:
    """Run JOB (an all-reduce of SIZE bytes) on the cluster; its rank 0's RESULT."""
    done = cluster.mpiexec(ranks_per_node, [sys.executable, job_file, str(SIZE)],
                           env=clean_env(), timeout=TIMEOUT, nodes=nodes, launcher=mpiexec())
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line, done.stdout + done.stderr
    return json.loads(line[len("RESULT "):])


@pytest.mark.timeout(120)
def test_two_nodes_of_two_ranks_are_two_nodes_to_mpich(netcluster, job_file):
    result = allreduce(netcluster, job_file, 2)
    hosts = [r["host"] for r in result["ranks"]]
    names = [n.name for n in netcluster.nodes]
    assert result["size"] == 4
    assert [r["node_size"] for r in result["ranks"]] == [2, 2, 2, 2], result
    assert hosts == [names[0], names[0], names[1], names[1]], result
    assert all(r["ok"] for r in result["ranks"]), f"wrong sums: {result}"
    assert result["plan"] == [True, 2.0], "across nodes the exchange overlaps backward"


@pytest.mark.timeout(120)
def test_the_bytes_between_nodes_cross_the_shaped_links(netcluster, job_file):
    """An all-reduce of S bytes over two nodes must move at least S bytes each way between
    them; the qdiscs count them (a bypass, e.g. shared memory between the namespaces,
    leaves them near zero), and the link's rate bounds the time from below."""
    before = netcluster.link_bytes()
    result = allreduce(netcluster, job_file, 2)
    moved = grown(before, netcluster.link_bytes())
    for name, (sent, received) in moved.items():
        assert sent >= SIZE and received >= SIZE, (
            f"{name}'s link carried {sent} bytes out and {received} in, fewer than the "
            f"{SIZE} that must cross each way: the traffic bypassed the link ({moved})")
    floor = SIZE * 8 / RATE
    assert result["seconds"] >= 0.9 * floor, (
        f"{SIZE} bytes each way took {result['seconds']:.3f} s, faster than the link's "
        f"{floor:.3f} s: not shaped")


@pytest.mark.timeout(120)
def test_ranks_of_one_node_leave_the_links_idle(netcluster, job_file):
    """Within a node MPICH uses shared memory: the links see (almost) nothing, which is
    also what the check above would see if inter-node traffic bypassed them."""
    before = netcluster.link_bytes()
    result = allreduce(netcluster, job_file, 2, nodes=1)
    moved = grown(before, netcluster.link_bytes())
    assert result["size"] == 2 and all(r["ok"] for r in result["ranks"]), result
    assert all(s < SIZE / 100 and r < SIZE / 100 for s, r in moved.values()), moved
    assert result["plan"] == [False, 0.0], "on one node: one bucket after backward"


@pytest.mark.timeout(120)
def test_nothing_is_left_after_a_run_that_raised():
    require_netcluster()
    cluster = Cluster(nodes=2, prefix=prefix("lk"))
    with pytest.raises(RuntimeError, match="inside the cluster"):
        with cluster:
            assert traces(cluster.prefix) and cluster.leftovers()  # what the checks look for
            done = cluster.mpiexec(1, [sys.executable, "-c", "import sys; sys.exit(3)"],
                                   env=clean_env(), timeout=TIMEOUT, launcher=mpiexec())
            assert done.returncode != 0
            raise RuntimeError("failed inside the cluster")
    assert cluster.leftovers() == []
    assert traces(cluster.prefix) == []


@pytest.mark.timeout(120)
def test_a_hung_job_is_killed_at_its_timeout_and_nothing_is_left():
    require_netcluster()
    cluster = Cluster(nodes=2, prefix=prefix("hg"))
    marker = f"hung job of {cluster.prefix}"
    with pytest.raises(subprocess.TimeoutExpired):
        with cluster:
            cluster.mpiexec(2, [sys.executable, "-c", f"import time; time.sleep(60)  # {marker}"],
                            env=clean_env(), timeout=5, launcher=mpiexec())
    assert cluster.leftovers() == []
    assert traces(cluster.prefix) == []
    ranks = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout
    assert ranks == "", f"ranks still running: {ranks}"


@pytest.mark.timeout(120)
def test_the_command_line_up_status_run_down():
    require_netcluster()
    name = prefix("cl")
    cli = [sys.executable, "-m", "mpitrain.testing.netcluster"]

    def command(*args):
        done = subprocess.run([*cli, *args, "--name", name] if args[0] != "run" else
                              [*cli, "run", "--name", name, *args[1:]],
                              capture_output=True, text=True, timeout=TIMEOUT, env=clean_env())
        assert done.returncode == 0, f"{args}: exit {done.returncode}\n{done.stdout}{done.stderr}"
        return done.stdout

    try:
        up = command("up", "--nodes", "2", "--rate", "100mbit")
        assert f"{name}-n1" in up and "10.77.0.2" in up, up
        gather = ("from mpi4py import MPI; import socket; c = MPI.COMM_WORLD; "
                  "h = c.gather(socket.gethostname()); c.rank or print('HOSTS', *h)")
        out = command("run", "--", mpiexec(), "-n", "2", sys.executable, "-c", gather)
        assert f"HOSTS {name}-n0 {name}-n1" in out, out
        status = command("status")
        rows = [line.split() for line in status.splitlines() if line.startswith(f"{name}-n")]
        assert [r[1] for r in rows] == ["10.77.0.1", "10.77.0.2"], status
        assert all(int(r[2]) > 0 and int(r[3]) > 0 for r in rows), status
        command("down")
        assert Cluster(prefix=name).leftovers() == [] and traces(name) == []
    finally:
        Cluster(prefix=name).down()


@pytest.mark.timeout(300)
def test_training_across_nodes_is_bit_identical_across_algorithms(netcluster, small_data,
                                                                   tmp_path):
    """Across two emulated nodes: at 1 rank per node mpi, ring and the hierarchical shm
    all-reduce add the same two numbers (the same bits); at 2 ranks per node, where their
    sum orders differ, --reproducible makes mpi and ring agree bit for bit, and the link
    carried the gradients."""
    from conftest import final, same_bits

    def train(ppn, *extra):
        ckpt = tmp_path / "-".join([str(ppn), *extra]).replace("--", "")
        done = netcluster.mpiexec(ppn, [sys.executable, "-m", "mpitrain", "train", "--data",
                                        small_data, "--hidden", "32", "--steps", "12",
                                        "--batch-size", "48", "--quiet", "--ckpt-dir",
                                        str(ckpt), "--run-dir", str(ckpt), *extra],
                                  env=clean_env(), timeout=TIMEOUT, launcher=mpiexec())
        assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
        return final(ckpt)

    before = netcluster.link_bytes()
    mpi = train(1)
    assert all(sent > 0 for sent, _ in grown(before, netcluster.link_bytes()).values())
    assert same_bits(train(1, "--allreduce", "ring"), mpi)
    assert same_bits(train(1, "--allreduce", "shm"), mpi)
    assert same_bits(train(2, "--reproducible", "--allreduce", "ring"),
                     train(2, "--reproducible"))


ARRAYS_JOB = textwrap.dedent("""\
    import json, os, socket, sys, tempfile
    import numpy as np
    from mpi4py import MPI
    import mpitrain

    comm = MPI.COMM_WORLD
    # Each node's TMPDIR is its own: a file rank 0 makes there, the other node cannot see.
    made = comm.bcast(tempfile.mkstemp(prefix="probe-")[1] if comm.rank == 0 else None)
    seen = comm.gather(os.path.exists(made))
    hosts = comm.gather(socket.gethostname())
    rng = np.random.default_rng(0)
    X = rng.standard_normal((400, 6)).astype(np.float32)
    y = (X[:, 0] + X[:, 1] > 0).astype(np.int64)
    strategy = sys.argv[1]
    workers = comm.size - (1 if strategy == "ps" else 0)
    result = mpitrain.DistributedTrainer(num_workers=workers, strategy=strategy).train(
        X, y, {"hidden": [16], "optimizer": "adam", "lr": 0.01, "batch_size": 40},
        num_epochs=6)
    p = result["params"]
    same = len(set(comm.allgather(b"".join(p[k].tobytes() for k in sorted(p))))) == 1
    left = comm.gather(sorted(os.listdir(tempfile.gettempdir())))
    if comm.rank == 0:
        print("RESULT " + json.dumps({"seen": seen, "hosts": hosts, "same": same,
                                      "acc": result["summary"]["val_accuracy"],
                                      "left": left}))
""")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("strategy", ["ps", "allreduce"])
def test_distributed_trainer_trains_arrays_across_nodes_without_a_shared_tmpdir(
        netcluster, tmp_path, strategy):
    """The original API (DistributedTrainer) on two emulated nodes whose TMPDIRs are their
    own: it writes nothing to disk, and every rank ends with the same parameters."""
    job = tmp_path / "job.py"
    job.write_text(ARRAYS_JOB)
    done = netcluster.mpiexec(2, [sys.executable, str(job), strategy], env=clean_env(),
                              timeout=TIMEOUT, launcher=mpiexec())
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    names = [n.name for n in netcluster.nodes]
    assert result["hosts"] == [names[0], names[0], names[1], names[1]], result
    assert result["seen"] == [True, True, False, False], "the nodes' TMPDIRs are private"
    assert result["same"] and result["acc"] > 0.85, result
    assert all(not name.startswith("mpitrain") for names in result["left"]
               for name in names), result["left"]
