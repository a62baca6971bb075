"""The parameter server's parts without a job: the speed split, the straggler drills, the
server's arithmetic and the Python API (and the API's job, under mpiexec)."""
import numpy as np
import pytest

from conftest import run_mpi
from mpitrain import ParameterServer
from mpitrain.data.sampler import Sampler
from mpitrain.fault.drills import Faults
from mpitrain.parallel.ps.shard import ServerShard
from mpitrain.parallel.speed import cut, split
from mpitrain.runtime import MpitrainError


def test_split_is_proportional_exact_and_gives_everyone_a_sample():
    assert split(128, [1.0, 0.5]) == [85, 43]
    assert split(128, [1.0, 1.0, 1.0]) == [43, 43, 42]  # ties to the lower rank
    assert split(10, [0.0, 1.0, 1e-9]) == [0, 9, 1]  # a server takes none; a snail one
    for speeds in ([3, 1, 2], [1e-3, 5, 5, 5], [1, 1, 1, 1, 1]):
        assert sum(split(97, speeds)) == 97
    with pytest.raises(ValueError, match="2 samples for 3 ranks"):
        split(2, [1, 1, 1])


def test_cut_keeps_the_proportions_for_a_smaller_last_batch():
    assert cut(128, [85, 43]) == [0, 85, 128]
    assert cut(100, [85, 43]) == [0, 66, 100]
    s = Sampler(10, 4, seed=0)  # batches of 4, 4, 2
    for step in range(3):
        ids = s.batch(step)
        parts = [s.local(step, r, 2, shares=[3, 1])[0] for r in range(2)]
        assert np.array_equal(np.concatenate(parts), ids)  # an exact partition
    assert len(s.local(0, 0, 2, shares=[3, 1])[0]) == 3


def test_straggler_drills_delay_as_planned_and_repeat():
    f = Faults("slow:rank=1:factor=3,jitter:prob=0.25:factor=2")
    assert f.stragglers()
    draws = [f.delay(0, step, 1.0, seed=7) for step in range(1, 401)]
    assert set(draws) == {0.0, 1.0}  # rank 0: only the jitter, (2 - 1) x 1 s
    assert 0.18 < np.mean(draws) < 0.32  # about prob
    assert draws == [f.delay(0, step, 1.0, seed=7) for step in range(1, 401)]  # repeats
    assert draws != [f.delay(0, step, 1.0, seed=8) for step in range(1, 401)]
    assert f.delay(1, 5, 0.5, seed=7) in (1.0, 1.5)  # slow (2 x 0.5), and maybe jitter
    for bad, message in (("slow:rank=1:factor=0.5", "factor >= 1"),
                         ("jitter:prob=2:factor=2", "prob in"),
                         ("slow:rank=1", "slow takes rank, factor"),
                         ("jitter:prob=x:factor=2", "KEY=NUMBER")):
        with pytest.raises(MpitrainError, match=message):
            Faults(bad)


def test_a_server_shard_sums_in_worker_order_whatever_the_arrival():
    rng = np.random.default_rng(0)
    pushes = [rng.standard_normal(1000).astype(np.float32) for _ in range(3)]
    results = []
    for arrival in ([0, 1, 2], [2, 0, 1]):
        shard = ServerShard(np.ones(1000, np.float32), "adam", width=2, depth=2, lr=0.1)
        for w in arrival:
            grad, metrics = shard.slot(w, 4)
            grad[...] = pushes[w]
            metrics[:] = (w, 1)
        sums = shard.reduce(4, [0, 1, 2])
        assert list(sums) == [3.0, 3.0]
        shard.step()
        results.append(shard.params.copy())
    assert np.array_equal(results[0], results[1])
    assert shard.version == 1 and shard.optimizer.steps == 1


def test_parameter_server_api_is_sgd_on_the_summed_pushes():
    init = {"w": np.arange(6, dtype=np.float32).reshape(3, 2), "b": np.zeros(3, np.float32)}
    ps = ParameterServer(init)
    g0 = {"w": np.ones((3, 2), np.float32), "b": np.full(3, 2, np.float32)}
    g1 = {"w": np.full((3, 2), 3, np.float32), "b": np.ones(3, np.float32)}
    ps.push_gradients(1, g1)
    ps.push_gradients(0, g0)
    ps.update_parameters(0.5)
    got = ps.pull_parameters()
    assert np.array_equal(got["w"], init["w"] - 0.5 * 4)
    assert np.array_equal(got["b"], -0.5 * np.full(3, 3, np.float32))
    assert ps.version == 1
    got["w"][...] = 99  # a copy: the server's parameters are its own
    assert ps.pull_parameters()["w"][0, 0] == -2
    with pytest.raises(ValueError, match="pushed twice"):
        ps.push_gradients(0, g0)
        ps.push_gradients(0, g0)
    with pytest.raises(ValueError, match=r"b: expected shape \(3,\)"):
        ParameterServer(init).push_gradients(0, {"w": g0["w"], "b": np.ones(4)})
    mean = ParameterServer(np.zeros(2), average=True)
    mean.push_gradients(0, np.array([2.0, 4.0]))
    mean.push_gradients(1, np.array([4.0, 8.0]))
    mean.update_parameters(1.0)
    assert list(mean.pull_parameters()) == [-3.0, -6.0]


SCRIPT = """
import numpy as np, mpitrain
from mpi4py import MPI
rng = np.random.default_rng(0)
X = rng.standard_normal((300, 5)).astype(np.float32)
y = (X[:, 0] + X[:, 1] > 0).astype(np.int64)
result = mpitrain.DistributedTrainer(num_workers=2).train(
    X, y, {"hidden": [16], "optimizer": "adam", "lr": 0.01, "batch_size": 30}, num_epochs=8)
p = result["params"]
digests = MPI.COMM_WORLD.allgather(b"".join(p[k].tobytes() for k in sorted(p)))
assert len(set(digests)) == 1, "ranks differ"
if MPI.COMM_WORLD.rank == 0:
    print("ACC", result["summary"]["val_accuracy"], sorted(p))
try:
    mpitrain.DistributedTrainer(num_workers=5)
except mpitrain.ConfigError as exc:
    if MPI.COMM_WORLD.rank == 0:
        print("ERR", exc.render(lambda n: n))
"""


def test_distributed_trainer_trains_arrays_on_the_ranks():
    result = run_mpi(3, ["-c", SCRIPT], timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    acc = float(result.stdout.split("ACC ")[1].split()[0])
    assert acc > 0.85, result.stdout
    assert "['0.bias', '0.weight', '2.bias', '2.weight']" in result.stdout, result.stdout
    assert "ERR num_workers 5 + servers 1 needs 6 ranks, and this job has 3" in result.stdout
