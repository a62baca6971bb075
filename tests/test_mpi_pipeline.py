"""Pipeline (x data) parallel training under mpiexec -n 2, 3, 4 (pytest-mpi).

Every layout that divides the world is compared with one process training
the same model on the same global batch.
"""
import numpy as np
import pytest
from mpi4py import MPI

import conftest
from mpitrain.config import Config
from mpitrain.run.build import build

pytestmark = [pytest.mark.mpi(min_size=2), pytest.mark.timeout(180)]

COMM = MPI.COMM_WORLD


def agree(ok, what):
    conftest.agree(COMM, ok, what)


def cfg(data, **kw):
    base = dict(data=data, hidden=[16, 12, 8], batch_size=50, dtype="float64", seed=4,
                optimizer="adam", lr=0.01, weight_decay=1e-3)
    return Config(**{**base, **kw})


def layouts():
    return [pp for pp in (1, 2, 3, 4) if COMM.Get_size() % pp == 0]


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
@pytest.mark.parametrize("pp", [1, 2, 3, 4])
def test_pipeline_equals_single_process(small_data, pp, schedule):
    if COMM.Get_size() % pp:
        pytest.skip(f"{COMM.Get_size()} ranks do not split into {pp} stages")
    if pp == 1 and schedule == "gpipe":
        pytest.skip("no pipeline: the 1f1b case runs data parallelism with accumulation")
    steps = 25
    # pp 1: no pipeline, data parallelism with 3 accumulated micro-batches instead.
    kw = dict(pp=pp, microbatches=3, schedule=schedule) if pp > 1 else dict(accumulate=3)
    trainer, _ = build(cfg(small_data, **kw), COMM)
    single, _ = build(cfg(small_data), MPI.COMM_SELF)
    g = trainer.grid
    assert (g.pp, g.dp) == (pp, COMM.Get_size() // pp)
    losses = [trainer.step(k)[0] for k in range(steps)]
    reference = [single.step(k)[0] for k in range(steps)]
    agree(np.allclose(losses, reference, rtol=1e-10), "losses match 1 process")
    ref = single.model.named_params()
    mine = trainer.model.named_params()
    agree(set(mine) <= set(ref) and len(mine) > 0, "stage holds a part of the model")
    agree(all(np.allclose(mine[n], ref[n], rtol=1e-9, atol=1e-12) for n in mine),
          f"pp={pp} x dp={g.dp} parameters match 1 process")
    # Each stage holds only its own parameters, gradients and optimizer state.
    size = trainer.model.size
    agree(all(len(a) == size for a in [trainer.model.grads, *trainer.optimizer.state().values()]),
          "stage-sized buffers")
    stage_sizes = g.pp_comm.allgather(size) if pp > 1 else [size]
    agree(sum(stage_sizes) == single.model.size, "the stages together are the model")
    # Evaluation through the pipeline equals evaluation in one process.
    a, b = trainer.evaluate(), single.evaluate()
    agree(a.keys() == b.keys() and np.allclose([a[k] for k in a], [b[k] for k in a],
                                              rtol=1e-10), "validation")


def test_gpipe_and_1f1b_give_the_same_bits_and_1f1b_holds_fewer_activations(small_data):
    pp = COMM.Get_size()
    m = 6
    runs = {}
    for schedule in ("gpipe", "1f1b"):
        t, _ = build(cfg(small_data, pp=pp, microbatches=m, schedule=schedule,
                         dtype="float32"), COMM)
        for k in range(12):
            t.step(k)
        runs[schedule] = t
    a, b = runs["gpipe"], runs["1f1b"]
    agree(np.array_equal(a.model.params, b.model.params), "identical parameters")
    s = a.grid.pp_rank
    agree(a.peak_alive == m, "GPipe holds all micro-batches")
    agree(b.peak_alive == min(m, pp - s), f"1F1B holds at most stages - stage index ({pp - s})")
    agree(b.peak_activation_bytes <= a.peak_activation_bytes, "1F1B needs no more memory")


def test_pipeline_with_the_ring_and_shm_allreduce(small_data):
    if COMM.Get_size() != 4:
        pytest.skip("needs pp=2 x dp=2")
    runs = {}
    for allreduce in ("mpi", "ring", "shm"):
        t, _ = build(cfg(small_data, pp=2, allreduce=allreduce), COMM)
        for k in range(10):
            t.step(k)
        runs[allreduce] = t.model.params.copy()
        t.close()
    agree(np.allclose(runs["mpi"], runs["ring"], rtol=1e-12), "ring = mpi within stages")
    agree(np.array_equal(runs["mpi"], runs["shm"]), "shm = mpi within stages (2 replicas)")


def test_capture_gathers_every_stage_on_rank_0(small_data):
    pp = COMM.Get_size() // 2 if COMM.Get_size() % 2 == 0 else COMM.Get_size()
    trainer, _ = build(cfg(small_data, pp=pp), COMM)
    single, _ = build(cfg(small_data), MPI.COMM_SELF)
    for k in range(5):
        trainer.step(k)
        single.step(k)
    state = trainer.capture(5, {"optimizer": "adam"})
    if COMM.rank == 0:
        ok = (list(state.params) == list(single.model.named_params())
              and all(np.allclose(state.params[n], p, rtol=1e-9)
                      for n, p in single.model.named_params().items())
              and set(state.optimizer_state) == {"m", "v"}
              and state.layout == {"world_size": COMM.Get_size(), "pp": pp,
                                   "dp": COMM.Get_size() // pp})
    else:
        ok = state is None
    agree(ok, "the gathered state is the whole model's")


def test_a_stage_holds_only_the_sends_in_flight(small_data, monkeypatch):
    """Send buffers already received are let go at once, not kept to the end of the step
    (which would hold every micro-batch's output and gradient, defeating 1F1B)."""
    from mpitrain.parallel.pipeline.stage import PipelineTrainer

    held = []
    isend = PipelineTrainer._isend

    def counting(self, buf, dest, tag):
        isend(self, buf, dest, tag)
        held.append(len(self._sends))

    monkeypatch.setattr(PipelineTrainer, "_isend", counting)
    m = 16
    t, _ = build(cfg(small_data, pp=COMM.Get_size(), microbatches=m), COMM)
    for k in range(3):
        t.step(k)
    t.close()
    # Each stage sends up to 2 M messages a step; small ones are gone as soon as sent.
    agree(max(held) <= 4, f"at most a few sends held at once, not {max(held)} of {2 * m}")


def test_a_stage_that_is_first_and_last_reads_its_labels_with_its_rows(small_data,
                                                                       monkeypatch):
    from mpitrain.data.shards import Shards

    calls = []
    read_labels = Shards.read_labels
    monkeypatch.setattr(Shards, "read_labels",
                        lambda self, ids: calls.append(len(ids)) or read_labels(self, ids))
    from mpitrain.comm.topology import make_grid
    from mpitrain.data.datasets import DirectoryDataset
    from mpitrain.data.manifest import read_manifest
    from mpitrain.model.layers import mlp
    from mpitrain.model.optim import SGD
    from mpitrain.parallel.pipeline.stage import PipelineTrainer

    m = read_manifest(small_data)
    # One stage (pp 1), two micro-batches: built directly, as the options call for a
    # pipeline of two or more stages.
    t = PipelineTrainer(mlp(m.features, [16], m.classes), "ce", SGD(lr=0.1),
                        DirectoryDataset(small_data), make_grid(COMM, 1), microbatches=2,
                        batch_size=50, seed=0, dtype="float64")
    for k in range(3):
        t.step(k)
    t.evaluate()
    t.close()
    agree(calls == [], f"labels read again {len(calls)} times")


class Counting(MPI.Intracomm):
    """A communicator that counts the bytes this rank receives (Recv, and Bcast at a
    non-root)."""

    received = 0

    def Recv(self, buf, source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG, status=None):
        self.received += buf.nbytes
        return super().Recv(buf, source, tag, status)

    def Bcast(self, buf, root=0):
        if self.Get_rank() != root:
            self.received += buf.nbytes
        return super().Bcast(buf, root)


def test_restore_sends_each_rank_only_its_stage(small_data):
    """A state restored into pp stages: each rank receives its stage's parameters and
    optimizer state, not the whole model, and continues as the uninterrupted run does."""
    import dataclasses

    pp = COMM.Get_size() // 2 if COMM.Get_size() % 2 == 0 else COMM.Get_size()
    straight, _ = build(cfg(small_data, pp=pp), COMM)
    first, _ = build(cfg(small_data, pp=pp), COMM)
    for k in range(6):
        straight.step(k)
        if k < 3:
            first.step(k)
    state = first.capture(3, {})
    second, _ = build(cfg(small_data, pp=pp), COMM)
    grid = second.grid
    counted = dataclasses.replace(grid, world=Counting(grid.world),
                                  dp_comm=Counting(grid.dp_comm), owned=False)
    second.grid = counted
    second.restore(state)
    second.grid = grid
    got = counted.world.received + counted.dp_comm.received
    arrays = 1 + len(second.optimizer.state())  # parameters, Adam's m and v
    mine = second.model.size * second.model.dtype.itemsize * arrays
    agree(got == (0 if COMM.rank == 0 else mine),
          f"received {got} bytes, the stage holds {mine}")
    for k in range(3, 6):
        second.step(k)
    agree(np.array_equal(second.model.params, straight.model.params), "resumed = straight")
    for t in (straight, first, second):
        t.close()
