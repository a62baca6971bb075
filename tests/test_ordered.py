"""comm.ordered.OrderedSum on real MPI jobs: the chain through the ranks gives the bits of
one rank's left-to-right sum, for any split of the groups, empty groups included."""
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
count = 300_001  # more than one chunk of the chain, not a multiple of it

def group(g):  # a group's gradient: values over many binades, keyed to the group alone
    rng = np.random.default_rng([7, g])
    v = (rng.standard_normal(count) * 2.0 ** rng.integers(-30, 0, count)).astype(np.float32)
    v[::1000] = -0.0  # a sum of -0.0s is -0.0: no group may start from +0.0
    return v

bad = 0
s = OrderedSum(comm, count)  # one for every step, as a trainer keeps it
cases = ([5, 3, 7, 2, 4, 6, 1, 8, 2, 3, 5, 4], [0, 0, 0, 4, 0, 2, 3, 0, 0, 1, 0, 0],
         [0] * 11 + [9])
# alone: from which of its non-empty groups on a rank computes each in a buffer of its own
# (as threads computing at once do; 0: all, even the leader's first)
for sizes, alone in [(c, a) for c in cases for a in (99, 1, 0)]:
    cuts = np.concatenate([[0], np.cumsum(sizes)]).tolist()
    G = len(sizes)
    expect = None  # one rank's sum, left to right over the non-empty groups
    for g in range(G):
        if sizes[g]:
            expect = group(g) if expect is None else expect + group(g)
    first, last = rank_slice(G, rank, size)
    s.start(cuts)
    home = np.full(count, np.nan, np.float32)  # what a leader's backward writes into
    for k, g in enumerate(g for g in range(first, last) if sizes[g]):
        into, add = s.place(home, alone=k >= alone)  # as backward: write, or add to it
        into[...] = into + group(g) if add else group(g)
    s.finish(home)
    bad += not np.array_equal(home.view(np.uint32), expect.view(np.uint32))
total = comm.allreduce(bad)
if rank == 0:
    print("mismatches", total)
sys.exit(1 if total else 0)
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_the_chain_gives_one_ranks_bits(n):
    r = run_mpi(n, ["-m", "mpi4py", "-c", CODE], timeout=100)  # an error aborts the job
    assert r.returncode == 0 and "mismatches 0" in r.stdout, r.stdout + r.stderr[-2000:]
