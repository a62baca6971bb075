"""The shared-memory all-reduce against MPI's Allreduce, at any world size.

Marked ``anysize``: it runs in the serial session (1 rank) and again under
mpiexec -n 2, 3 and 4 (tests/test_mpi_suite.py).  "Nodes" other than the real
one are made by splitting the world, so the hierarchical path (shared memory
within a node, Allreduce across nodes) runs on one machine too.
"""
import numpy as np
import pytest
from mpi4py import MPI

from conftest import agree
from mpitrain.runtime import MpitrainError
from mpitrain.comm.shm import ShmAllreduce

pytestmark = [pytest.mark.anysize, pytest.mark.timeout(120)]

COMM = MPI.COMM_WORLD
SIZES = [0, 1, 2, 3, 5, 7, 13, 97, 1000, 4097, 100003]


def inputs(comm, n, dtype, salt=7):
    rng = np.random.default_rng([comm.Get_rank(), n, salt])
    return rng.normal(size=n).astype(dtype)


def check_sum(comm, got, local, what):
    expect = local.copy()
    comm.Allreduce(MPI.IN_PLACE, expect, op=MPI.SUM)
    if comm.Get_size() <= 2:  # a + b is b + a: the same bits as MPI
        agree(comm, np.array_equal(got, expect), f"{what}: bitwise equal to Allreduce")
    else:
        tol = 1e-5 if got.dtype == np.float32 else 1e-13
        agree(comm, np.allclose(got, expect, rtol=tol, atol=tol * comm.Get_size()),
              f"{what}: equal to Allreduce within rounding")
    agree(comm, len(set(comm.allgather(got.tobytes()))) == 1, f"{what}: same bits everywhere")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_shm_equals_allreduce_on_whole_buffers_and_slices(dtype):
    for n in SIZES:
        shm = ShmAllreduce(COMM, n, dtype)
        try:
            local = inputs(COMM, n, dtype)
            shm.buffer[...] = local
            shm(shm.buffer)
            check_sum(COMM, shm.buffer, local, f"n={n}")
            # Slices in any order, with odd bounds, each summed in place.
            shm.buffer[...] = local
            cuts = sorted({0, n, n // 3, n // 3 + 1, (2 * n) // 3})
            for lo, hi in reversed(list(zip(cuts, cuts[1:]))):
                shm.reduce(shm.buffer[lo:hi])
            shm.fence()
            check_sum(COMM, shm.buffer, local, f"n={n} in slices")
        finally:
            shm.close()


def test_same_bits_every_call_with_the_buffer_rewritten_at_once():
    """Peers read this rank's buffer until the final fence: writing it again right
    after a call must not change what any rank got."""
    n = 1 << 20
    shm = ShmAllreduce(COMM, n, np.float32)
    try:
        given = [inputs(COMM, n, np.float32, salt=k) for k in range(3)]
        first, same = [], True
        for k in range(40):
            np.copyto(shm.buffer, given[k % 3])  # at once: a late peer would read this
            shm(shm.buffer)
            if k < 3:
                first.append(shm.buffer.copy())
            else:
                same &= bool(np.array_equal(shm.buffer, first[k % 3]))
        agree(COMM, same, "repeated calls agree")
        check_sum(COMM, first[0], given[0], "first call")
    finally:
        shm.close()


def test_hierarchical_nodes_sum_like_allreduce():
    size, rank = COMM.Get_size(), COMM.Get_rank()
    if size % 2:
        pytest.skip("needs an even number of ranks for two equal 'nodes'")
    node = COMM.Split(rank % 2, rank)  # two "nodes": even ranks and odd ranks
    try:
        shm = ShmAllreduce(COMM, 4099, np.float64, node=node)
        try:
            agree(COMM, shm.local_size == size // 2 and shm.cross.Get_size() == 2,
                  "two nodes")
            local = inputs(COMM, 4099, np.float64)
            shm.buffer[...] = local
            shm(shm.buffer)
            expect = local.copy()
            COMM.Allreduce(MPI.IN_PLACE, expect, op=MPI.SUM)
            agree(COMM, np.allclose(shm.buffer, expect, rtol=1e-13, atol=1e-12),
                  "node sums, then across nodes")
            agree(COMM, len(set(COMM.allgather(shm.buffer.tobytes()))) == 1, "same bits")
        finally:
            shm.close()
    finally:
        node.Free()


def test_unequal_nodes_are_refused_on_every_rank():
    size, rank = COMM.Get_size(), COMM.Get_rank()
    if size < 3:
        pytest.skip("needs 3 ranks for unequal nodes")
    node = COMM.Split(0 if rank < 2 else 1, rank)  # 2 ranks, then size - 2
    try:
        if size - 2 == 2:
            pytest.skip("4 ranks split 2 + 2 are equal")
        sizes = [2, 2] + [size - 2] * (size - 2)
        with pytest.raises(MpitrainError, match=rf"ranks per node are \[{', '.join(map(str, sizes))}\]"):
            ShmAllreduce(COMM, 10, np.float32, node=node)
    finally:
        node.Free()


@pytest.mark.parametrize("make,message", [
    (lambda shm: np.zeros(10, np.float32), "contiguous slices of its own .buffer"),
    (lambda shm: shm.buffer[::2], "contiguous slices of its own .buffer"),
    (lambda shm: shm.buffer.astype(np.float64), "contiguous slices of its own .buffer"),
    (lambda shm: shm.buffer.view(np.uint8)[1:5], "contiguous slices of its own .buffer"),
])
def test_other_arrays_are_refused_before_any_barrier(make, message):
    class Counting(ShmAllreduce):  # counts the fences (each one a barrier of the node)
        fences = 0

        def fence(self):
            self.fences += 1
            super().fence()

    shm = Counting(COMM, 16, np.float32)
    try:
        before = shm.fences
        with pytest.raises(ValueError, match=message):
            shm(make(shm))
        agree(COMM, shm.fences == before, f"refused before any fence ({shm.fences - before})")
    finally:
        shm.close()
