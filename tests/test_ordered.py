"""comm.ordered.OrderedSum on real MPI jobs: the same bits as one rank's sum along the tree
over the groups, for any split of the groups among the ranks, empty groups included."""
import pytest

from conftest import run_mpi

CODE = r"""
import sys
import numpy as np
from mpi4py import MPI
from mpitrain.balance import bounds, rank_slice
from mpitrain.comm.ordered import OrderedSum

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
count = 300_001  # not a multiple of the ranks

def group(g):  # a group's gradient: values over many binades, keyed to the group alone
    rng = np.random.default_rng([7, g])
    v = (rng.standard_normal(count) * 2.0 ** rng.integers(-30, 0, count)).astype(np.float32)
    v[::1000] = -0.0  # a sum of -0.0s is -0.0: no group may start from +0.0
    return v

def tree(values):  # the order, written out: left half + right half (the larger)
    if len(values) == 1:
        return values[0]
    m = len(values) // 2
    return tree(values[:m]) + tree(values[m:])

on_shm = sys.argv[-1] == "shm"
if on_shm:  # each rank's sum is its segment of a node's window, as the torch trainer's
    from mpitrain.comm.shm import ShmAllreduce
    shm = ShmAllreduce(comm, count + 5)  # (beyond count: the trainer's metrics)
    buckets = [(0, 100_000), (100_000, count + 5)]
bad = 0
s = OrderedSum(comm, count)  # one for every step, as a trainer keeps it
cases = ([5, 3, 7, 2, 4, 6, 1, 8, 2, 3, 5, 4], [0, 0, 0, 4, 0, 2, 3, 0, 0, 1, 0, 0],
         [0] * 11 + [9], [3, 1, 4, 1], [2, 7, 1])
# runs: into how many runs a rank cuts its non-empty groups (threads computing at once)
for sizes, runs, gather in [(c, r, g) for c in cases for r in ((1,) if on_shm else (1, 2, 3))
                            for g in ((True, False) if on_shm else (True,))]:
    cuts = np.concatenate([[0], np.cumsum(sizes)]).tolist()
    G = len(sizes)
    expect = tree([group(g) for g in range(G) if sizes[g]])
    left_to_right = sum((group(g) for g in range(G) if sizes[g]), np.float32(-0.0))
    first, last = rank_slice(G, rank, size)
    s.start(cuts)
    home = shm.buffer[:count] if on_shm else np.empty(count, np.float32)  # the sum's place
    home[...] = np.nan
    mine = [g for g in range(first, last) if sizes[g]]
    for k in range(runs):
        a, b = rank_slice(len(mine), k, runs)
        for g in mine[a:b]:
            into, add = s.place(home, run=k)  # as backward: write, or add to it
            into[...] = into + group(g) if add else group(g)
    if on_shm:  # with more than a term on a rank (some cases), MPI's path
        s.finish(home, shm=shm, buckets=buckets, gather=gather)
        shares = [(0, count)] if gather else [(e[rank], e[rank + 1]) for e in
                                              (shm.bounds(lo, hi) for lo, hi in buckets)]
        shares = [(a, min(b, count)) for a, b in shares]
        bad += sum(not np.array_equal(home[a:b].view(np.uint32), expect[a:b].view(np.uint32))
                   for a, b in shares)
        shm.fence()  # the next case writes its segment only once the others read it
    else:
        s.finish(home)
        bad += not np.array_equal(home.view(np.uint32), expect.view(np.uint32))
    if sum(map(bool, sizes)) > 2:  # the tree's order has bits of its own
        assert not np.array_equal(expect, left_to_right)
total = comm.allreduce(bad)
if rank == 0:
    print("mismatches", total)
sys.exit(1 if total else 0)
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_the_sum_has_one_ranks_bits_along_the_tree(n):
    r = run_mpi(n, ["-m", "mpi4py", "-c", CODE, "mpi"], timeout=100)  # an error aborts it
    assert r.returncode == 0 and "mismatches 0" in r.stdout, r.stdout + r.stderr[-2000:]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("n", [2, 3, 4])
def test_the_sum_on_shared_memory_has_the_same_bits(n):
    """Each rank adds its shares from the others' segments (gathered, or only its own for
    a sharded update); MPI's path where a rank holds two terms (a short batch)."""
    r = run_mpi(n, ["-m", "mpi4py", "-c", CODE, "shm"], timeout=100)
    assert r.returncode == 0 and "mismatches 0" in r.stdout, r.stdout + r.stderr[-2000:]


def test_the_terms_of_a_rank_are_the_whole_subtrees_over_its_groups():
    from mpitrain.comm.ordered import most_terms, tree_terms
    assert tree_terms(0, 4, 4) == [(0, 4)]
    assert [tree_terms(2 * r, 2 * r + 2, 4) for r in range(2)] == [[(0, 2)], [(2, 4)]]
    assert tree_terms(1, 4, 4) == [(1, 2), (2, 4)]
    assert tree_terms(3, 9, 12) == [(3, 6), (6, 9)]
    assert tree_terms(2, 2, 4) == []
    # one term a rank (the sum on shared memory) on 1, 2, 4 ranks; 12 groups on 3: three
    assert all(most_terms(g, p) == 1 for g in range(1, 13) for p in (1, 2, 4) if p <= g)
    assert [most_terms(g, 3) for g in (3, 4, 5, 12)] == [1, 1, 2, 3]
