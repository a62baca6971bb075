"""Data-parallel training under mpiexec (pytest-mpi): run by tests/test_mpi_suite.py.

    $ mpiexec -n 4 python -m pytest --with-mpi -m mpi tests/

Every check is agreed by all ranks (``agree``) before it is asserted, so a
failure fails the test on every rank together and no rank is left waiting
in a collective of the next test.
"""
import os
import shutil

import numpy as np
import pytest
from mpi4py import MPI

from conftest import agree
import damage
from mpitrain.config import Config
from mpitrain.data.checks import check_dataset
from mpitrain.data.manifest import read_manifest
from mpitrain.runtime import MpitrainError
from mpitrain.run.build import build

pytestmark = [pytest.mark.mpi(min_size=2), pytest.mark.timeout(120)]


@pytest.fixture
def shared_tmp(tmp_path):
    """A directory created by rank 0 and seen by all ranks (same node here)."""
    comm = MPI.COMM_WORLD
    path = comm.bcast(str(tmp_path) if comm.rank == 0 else None, root=0)
    yield path
    comm.Barrier()


def run(cfg, comm, steps):
    trainer, _ = build(cfg, comm)
    losses = [trainer.step(k)[0] for k in range(steps)]
    return trainer, losses


@pytest.mark.parametrize("dtype,optimizer,batch,rtol", [
    ("float64", "momentum", 50, 1e-10),  # 11 steps per epoch, ranks get unequal parts
    ("float64", "adam", 269, 1e-10),     # the last batch of each epoch has 2 samples
    ("float32", "momentum", 50, 2e-4),
    ("float32", "adamw", 32, 2e-3),
])
def test_world_training_equals_single_process_training(small_data, dtype, optimizer,
                                                       batch, rtol):
    """N ranks with global batch B reach the parameters 1 process reaches with batch B."""
    comm = MPI.COMM_WORLD
    cfg = Config(data=small_data, hidden=[16, 8], batch_size=batch, dtype=dtype,
                 optimizer=optimizer, lr=0.01 if "adam" in optimizer else 0.1, seed=5,
                 weight_decay=1e-3)
    steps = 40
    world, world_losses = run(cfg, comm, steps)
    single, single_losses = run(cfg, MPI.COMM_SELF, steps)
    assert world.model.params.dtype == np.dtype(dtype)
    moved = not np.allclose(single.model.params, build(cfg, MPI.COMM_SELF)[0].model.params)
    agree(comm, moved, "training changed the parameters")
    close = np.allclose(world.model.params, single.model.params, rtol=rtol, atol=rtol * 1e-2)
    agree(comm, close, f"parameters after {steps} steps match 1 process")
    agree(comm, np.allclose(world_losses, single_losses, rtol=rtol), "losses match 1 process")
    # Every rank holds the same parameters and saw the same loss, bit for bit.
    agree(comm, len(set(comm.allgather(world.model.params.tobytes()))) == 1, "replicas equal")
    agree(comm, len(set(comm.allgather(tuple(world_losses)))) == 1, "losses equal")


def test_same_seed_same_bits(small_data):
    comm = MPI.COMM_WORLD
    cfg = Config(data=small_data, hidden=[16], batch_size=40, seed=3)
    a, _ = run(cfg, comm, 15)
    b, _ = run(cfg, comm, 15)
    agree(comm, np.array_equal(a.model.params, b.model.params), "repeat is bitwise equal")


def test_each_epoch_partitions_the_samples_among_ranks(small_data):
    comm = MPI.COMM_WORLD
    cfg = Config(data=small_data, hidden=[4], batch_size=2 * comm.size + 1, seed=8)
    trainer, _ = build(cfg, comm)
    sampler = trainer.sampler
    n, spe = len(trainer.train), sampler.steps_per_epoch
    for epoch in range(2):
        mine = [sampler.local(epoch * spe + k, comm.rank, comm.size)[0] for k in range(spe)]
        mine = np.concatenate(mine)
        everyone = comm.allgather(mine)
        union = np.sort(np.concatenate(everyone))
        agree(comm, np.array_equal(union, np.arange(n)), f"epoch {epoch} covers each sample once")
        sizes = comm.allgather(len(mine))  # each step's parts differ by at most one
        agree(comm, max(sizes) - min(sizes) <= spe, f"balanced: {sizes}")


def test_validation_is_computed_across_ranks(small_data):
    comm = MPI.COMM_WORLD
    cfg = Config(data=small_data, hidden=[8], dtype="float64", batch_size=30)
    world, _ = run(cfg, comm, 5)
    single, _ = run(cfg, MPI.COMM_SELF, 5)
    a, b = world.evaluate(), single.evaluate()
    agree(comm, a.keys() == {"loss", "accuracy"} and np.allclose(
        [a["loss"], a["accuracy"]], [b["loss"], b["accuracy"]], rtol=1e-10),
        "validation loss and accuracy match 1 process")


@pytest.mark.parametrize("damage_fn", [damage.missing_shard, damage.nan_feature,
                                       damage.label_range], ids=lambda f: f.__name__)
def test_every_rank_raises_the_same_data_error(small_data, shared_tmp, damage_fn):
    comm = MPI.COMM_WORLD
    root = os.path.join(shared_tmp, "data")
    expected = None
    if comm.rank == 0:
        shutil.copytree(small_data, root)
        expected = damage_fn(root)
    expected = comm.bcast(expected, root=0)
    try:
        check_dataset(read_manifest(root), comm)
        message, everywhere = "no error", False
    except MpitrainError as exc:
        message, everywhere = str(exc), exc.everywhere
    agree(comm, expected in message and everywhere, f"{expected!r} raised everywhere")
    agree(comm, len(set(comm.allgather(message))) == 1, "the same message on every rank")


def test_replicas_are_checked_at_start(small_data):
    comm = MPI.COMM_WORLD
    # mpi: with shm a node's ranks share one copy of the parameters after the check
    trainer, _ = build(Config(data=small_data, hidden=[4], allreduce="mpi"), comm)
    if comm.rank == comm.size - 1:
        trainer.model.params[0] += 1  # a rank that diverged from the others
    with pytest.raises(MpitrainError, match=rf"ranks \[{comm.size - 1}\] differ from rank 0"):
        trainer.check_replicas()


@pytest.mark.parametrize("algorithm,kind", [("ring", "RingAllreduce"),
                                            ("shm", "ShmAllreduce")])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_ring_shm_and_mpi_allreduce_train_alike(small_data, dtype, algorithm, kind):
    """--allreduce ring/shm reach MPI's parameters: bitwise at 2 ranks, to rounding beyond."""
    comm = MPI.COMM_WORLD
    cfg = Config(data=small_data, hidden=[32, 16], batch_size=45, dtype=dtype, seed=2)
    with_mpi, losses_mpi = run(cfg, comm, 30)
    with_ring, losses_ring = run(Config(**{**cfg.to_dict(), "allreduce": algorithm}), comm, 30)
    assert type(with_ring.exchange.blocking).__name__ == kind
    # shm shares the parameters within the node and shards the update among its ranks.
    assert with_ring.exchange.sharded == (algorithm == "shm" and comm.size > 1)
    if comm.size == 2:
        agree(comm, np.array_equal(with_mpi.model.params, with_ring.model.params), "bitwise")
    rtol = 1e-10 if dtype == "float64" else 1e-4
    agree(comm, np.allclose(with_mpi.model.params, with_ring.model.params, rtol=rtol,
                            atol=rtol * 1e-2), "parameters match")
    agree(comm, np.allclose(losses_mpi, losses_ring, rtol=rtol), "losses match")


def trained(small_data, steps=12, prefetch=False, **kw):
    from mpitrain.parallel.data_parallel import Trainer

    trainer, _ = build(Config(data=small_data, hidden=[32, 16], batch_size=45, seed=6,
                              **kw), MPI.COMM_WORLD)
    if prefetch:
        trainer.prefetch(0, steps)
    for k in range(steps):
        trainer.step(k)
    assert isinstance(trainer, Trainer)
    trainer.close()
    return trainer.model.params


@pytest.mark.parametrize("allreduce,progress", [("mpi", "thread"), ("mpi", "test"),
                                                ("mpi", "none"), ("ring", "thread"),
                                                ("ring", "none"), ("shm", "thread"),
                                                ("shm", "none")])
def test_overlapped_buckets_give_the_bits_of_the_same_buckets_after_backward(
        small_data, allreduce, progress, monkeypatch):
    from mpitrain.model.layers import Linear

    # Blocks of 5 rows for the 12-wide first layer (32 rows: 6 blocks and 2 rows), so the
    # weight gradients are reported block by block while their buckets are in flight.
    monkeypatch.setattr(Linear, "BLOCK_BYTES", 12 * 4 * 5)
    comm = MPI.COMM_WORLD
    # 64-byte buckets: some start half-way through a weight; the ring without a helper
    # thread sums each one at once, so a gradient written after it was reported would show.
    common = dict(allreduce=allreduce, bucket_mb=64 / 2 ** 20)
    from mpitrain.comm.exchange import Exchange

    with monkeypatch.context() as m:  # every bucket started after backward, by the same calls
        m.setattr(Exchange, "ready", lambda self, offset: None)
        later = trained(small_data, overlap=True, progress=progress, **common)
    overlapped = trained(small_data, overlap=True, progress=progress, **common)
    agree(comm, np.array_equal(later, overlapped), "overlap changes no bit")
    blocking = trained(small_data, overlap=False, **common)  # blocking calls: Allreduce
    if comm.size == 2 or progress == "thread" or allreduce != "mpi":
        agree(comm, np.array_equal(blocking, overlapped), "the same bits as no overlap")
    whole = trained(small_data, allreduce=allreduce, bucket_mb=0)
    if comm.size == 2:
        agree(comm, np.array_equal(whole, overlapped), "bitwise at 2 ranks")
    agree(comm, np.allclose(whole, overlapped, rtol=1e-4, atol=1e-6), "buckets = one buffer")


def plan(small_data, hidden=(1024,), **kw):
    """(overlap, number of buckets, first bucket's bytes) of the exchange ``kw`` build, and
    what the trainer says it chose (``resolved``, for the run's record)."""
    trainer, _ = build(Config(data=small_data, hidden=list(hidden), batch_size=16, **kw),
                       MPI.COMM_WORLD)
    ex = trainer.exchange
    lo, hi = ex.buckets[0]
    got = (ex.overlap, len(ex.buckets), (hi - lo) * ex.buffer.dtype.itemsize, trainer.resolved)
    trainer.close()
    return got


@pytest.mark.parametrize("allreduce", ["mpi", "ring", "shm"])
def test_by_default_one_node_sums_one_bucket_after_backward_and_nodes_overlap(
        small_data, allreduce, monkeypatch):
    """On one node the sum is the cores' own work: one bucket after backward; across
    nodes (where the MPI says so) 2 MiB buckets overlapped with backward; asked: as asked."""
    import mpitrain.comm.overlap as overlap

    comm = MPI.COMM_WORLD
    agree(comm, not overlap.spans_nodes(comm), "the ranks of this test are on one node")
    # Two layers of 1024: more than 4 MiB of float32 gradients, 3 buckets of 2 MiB or more.
    default = plan(small_data, hidden=(1024, 1024), allreduce=allreduce)
    agree(comm, default[:2] == (False, 1), f"one bucket, after backward: {default}")
    agree(comm, default[3] == dict(overlap=False, bucket_mb=0.0, progress="thread"),
          f"recorded as chosen: {default[3]}")
    asked = plan(small_data, hidden=(1024, 1024), allreduce=allreduce, overlap=True)
    agree(comm, asked[0] is True and asked[1] > 2 and asked[2] == 2 << 20, f"asked: {asked}")
    moved = plan(small_data, allreduce=allreduce, progress="none")
    agree(comm, moved[0] is True, "--progress none asks for overlap")
    cut = plan(small_data, allreduce=allreduce, bucket_mb=0.01)
    agree(comm, cut[0] is True and cut[1] > 1, f"buckets ask for overlap: {cut}")
    after = plan(small_data, allreduce=allreduce, overlap=False, bucket_mb=0.01)
    agree(comm, after[0] is False and after[1] > 1, f"buckets after backward: {after}")
    monkeypatch.setattr(overlap, "spans_nodes", lambda comm: True)
    nodes = plan(small_data, hidden=(1024, 1024), allreduce=allreduce)
    agree(comm, nodes[0] is True and nodes[2] == 2 << 20, f"across nodes: {nodes}")
    agree(comm, nodes[3] == dict(overlap=True, bucket_mb=2.0, progress="thread"),
          f"recorded as chosen: {nodes[3]}")


def test_prefetching_reads_the_same_batches(small_data):
    comm = MPI.COMM_WORLD
    agree(comm, np.array_equal(trained(small_data, prefetch=True), trained(small_data)),
          "prefetched training is bitwise the same")


@pytest.mark.parametrize("wire", ["float16", "bfloat16"])
def test_16_bit_gradient_exchange_trains_close_to_full_precision(small_data, wire):
    comm = MPI.COMM_WORLD
    full = trained(small_data, allreduce="ring", steps=30)
    half = trained(small_data, allreduce="ring", grad_dtype=wire, steps=30)
    agree(comm, len(set(comm.allgather(half.tobytes()))) == 1, "replicas stay identical")
    agree(comm, not np.array_equal(full, half), "the wire format is used")
    # Relative error of 16-bit gradients: 2^-11 (float16) or 2^-8 (bfloat16) per value.
    agree(comm, np.allclose(full, half, rtol=0.05, atol=0.02), "close to full precision")
    # The loss and the correct count are not rounded to 16 bits: the first step (same
    # parameters) reports what full precision reports, even with a float16 overflow.
    firsts = []
    for grad_dtype in ("full", wire):
        trainer, _ = build(Config(data=small_data, hidden=[32, 16], batch_size=540, seed=6,
                                  allreduce="ring", grad_dtype=grad_dtype, loss="mse"),
                           comm)
        trainer.xbuf[-3:] = 0
        loss, metrics, _ = trainer.step(0)
        firsts.append((loss, metrics["accuracy"]))
        trainer.close()
    agree(comm, np.allclose(firsts[0], firsts[1], rtol=1e-6), "metrics at full precision")


@pytest.mark.parametrize("allreduce", ["mpi", "shm"])
def test_restored_state_continues_bitwise_and_survives_close(small_data, allreduce):
    """capture after 5 steps, restore into a new trainer, 5 more: the bits of 10 in a row
    (with shm the parameters and Adam's moments are shared by a node's ranks)."""
    comm = MPI.COMM_WORLD
    cfg = Config(data=small_data, hidden=[32, 16], batch_size=45, seed=3, optimizer="adam",
                 weight_decay=0.01, allreduce=allreduce)
    straight, _ = run(cfg, comm, 10)
    first, _ = run(cfg, comm, 5)
    state = first.capture(5, cfg.to_dict())
    first.close()
    second, _ = build(cfg, comm)
    second.restore(state)
    for k in range(5, 10):
        second.step(k)
    ends = []
    for trainer in (straight, second):
        trainer.close()  # the arrays stay readable after the windows are freed
        ends.append([trainer.model.params, *trainer.optimizer.state().values()])
    agree(comm, all(np.array_equal(a, b) for a, b in zip(*ends)), "resumed = uninterrupted")
    agree(comm, len(set(comm.allgather(ends[1][0].tobytes()))) == 1, "replicas agree")


def test_shm_across_nodes_trains_like_mpi(small_data, monkeypatch):
    """Two 'nodes' (even and odd ranks): a shared model per node, shares summed across
    nodes by Allreduce, each node's ranks updating their shares of its copy."""
    import mpitrain.comm.algorithms
    import mpitrain.comm.shm

    comm = MPI.COMM_WORLD
    if comm.size % 2:
        pytest.skip("needs an even number of ranks for two equal 'nodes'")

    class TwoNodes(mpitrain.comm.shm.ShmAllreduce):
        def __init__(self, comm, count, dtype=np.float32, node=None):
            node = comm.Split(comm.Get_rank() % 2, comm.Get_rank())
            super().__init__(comm, count, dtype, node=node)
            node.Free()

    monkeypatch.setattr(mpitrain.comm.algorithms, "ShmAllreduce", TwoNodes)
    cfg = Config(data=small_data, hidden=[32, 16], batch_size=45, seed=2, optimizer="momentum")
    with_mpi, losses_mpi = run(cfg, comm, 20)
    with_shm, losses_shm = run(Config(**{**cfg.to_dict(), "allreduce": "shm"}), comm, 20)
    shm = with_shm.exchange.blocking
    assert isinstance(shm, TwoNodes) and with_shm.exchange.sharded
    assert shm.cross.Get_size() == 2 and shm.local_size == comm.size // 2
    with_shm.close()
    if comm.size == 2:  # nodes of one rank: only the Allreduce across them adds
        agree(comm, np.array_equal(with_mpi.model.params, with_shm.model.params), "bitwise")
    agree(comm, np.allclose(with_mpi.model.params, with_shm.model.params, rtol=1e-4,
                            atol=1e-6), "parameters match")
    agree(comm, np.allclose(losses_mpi, losses_shm, rtol=1e-4), "losses match")
    agree(comm, len(set(comm.allgather(with_shm.model.params.tobytes()))) == 1,
          "both nodes' copies agree")


def test_a_node_that_lacks_the_memory_stops_every_rank_with_its_reason(small_data,
                                                                      monkeypatch):
    """Nodes differ: the one whose memory is short decides, and every rank hears it."""
    import mpitrain.run.build as build_module

    comm = MPI.COMM_WORLD
    if comm.rank == comm.size - 1:
        monkeypatch.setattr(build_module, "node_memory", lambda: 1000)
    try:
        build(Config(data=small_data, hidden=[8]), comm)
        message, everywhere = "built", False
    except MpitrainError as exc:
        message, everywhere = str(exc), exc.everywhere
    agree(comm, everywhere and "the model does not fit in memory" in message
          and "which has 1.0 kB" in message, f"agreed refusal, got {message!r}")
