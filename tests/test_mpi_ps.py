"""The parameter server under mpiexec (pytest-mpi): run by tests/test_mpi_suite.py.

    $ mpiexec -n 4 python -m pytest --with-mpi -m mpi tests/test_mpi_ps.py

Every check is agreed by all ranks (``agree``) before it is asserted.
"""
import numpy as np
import pytest
from mpi4py import MPI

from conftest import agree
from mpitrain.config import Config
from mpitrain.run.build import build

pytestmark = [pytest.mark.mpi(min_size=2), pytest.mark.timeout(120)]


def _trainer(small_data, **options):
    cfg = Config(data=small_data, hidden=[8], batch_size=30, seed=3, strategy="ps",
                 check_data="meta", watchdog=0, **options)
    trainer, _ = build(cfg, MPI.COMM_WORLD)
    read = trainer.train.read
    seen = []

    def recording(ids):  # every sample a worker computes on
        seen.append(np.array(ids))
        return read(ids)

    trainer.train.read = recording
    return trainer, seen


@pytest.mark.parametrize("staleness", [0, 1, 3])
def test_stale_workers_stay_within_the_bound_and_use_every_sample_once_per_epoch(
        small_data, staleness):
    comm = MPI.COMM_WORLD
    trainer, seen = _trainer(small_data, staleness=staleness)
    spe, n = trainer.sampler.steps_per_epoch, len(trainer.train)
    last = comm.size - 1  # a worker: it sleeps, so the others run ahead of it

    trainer.slowdown = (lambda step, s: 0.002) if comm.rank == last else (lambda step, s: 0.0)
    for k in range(2 * spe):
        trainer.step(k)
    for epoch in range(2):
        mine = np.concatenate(seen[epoch * spe:(epoch + 1) * spe] or [np.zeros(0, int)])
        union = np.sort(np.concatenate(comm.allgather(mine)))
        agree(comm, np.array_equal(union, np.arange(n)), f"epoch {epoch}: each sample once")
    gaps = comm.allgather(trainer.gaps)
    worst = max((max(g) for g in gaps if g), default=0)
    agree(comm, worst <= staleness, f"staleness {worst} > bound {staleness}")
    if staleness == 0:
        agree(comm, all(set(g) <= {0} for g in gaps), "synchronous: never stale")
    trainer.close()
    trainer.close_data()


@pytest.mark.parametrize("staleness", [0, 2])
def test_a_stop_request_stops_every_rank_at_the_same_step(small_data, staleness):
    """A stop asked by the last rank at step 3 is agreed at step 3 + S on every rank."""
    comm = MPI.COMM_WORLD
    trainer, _ = _trainer(small_data, staleness=staleness)
    # its own defaults, as the run's record shows them: pushes overlapped, 2 MiB chunks
    agree(comm, trainer.resolved == dict(overlap=True, bucket_mb=2.0), f"{trainer.resolved}")
    stopped_at = None
    for k in range(12):
        trainer.step(k, stop=comm.rank == comm.size - 1 and k == 3)
        if trainer.stop_agreed:
            stopped_at = k
            break
    agree(comm, stopped_at == 3 + staleness, f"stopped at {stopped_at}")
    trainer.close()
    trainer.close_data()


def test_evaluation_and_close_give_every_rank_the_servers_parameters(small_data):
    comm = MPI.COMM_WORLD
    trainer, _ = _trainer(small_data, staleness=1)
    for k in range(7):
        trainer.step(k)
    result = trainer.evaluate()
    digest = comm.allgather(trainer.model.params.tobytes())
    agree(comm, len(set(digest)) == 1, "every rank evaluates the same parameters")
    agree(comm, result is not None and 0 <= result["accuracy"] <= 1, f"{result}")
    trainer.close()
    digest = comm.allgather(trainer.model.params.tobytes())
    agree(comm, len(set(digest)) == 1, "every rank holds the final parameters")
    trainer.close_data()
