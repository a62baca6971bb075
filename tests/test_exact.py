"""comm.exact.ExactSum on one process: the sum is exact (so its order cannot matter), and
the edge cases of its fixed-point units hold."""
import math

import numpy as np
import pytest
from mpi4py import MPI

from mpitrain.comm.exact import ExactSum


def exact_sum(groups, segments, total=None):
    s = ExactSum(MPI.COMM_SELF, groups[0].size, total or len(groups), segments)
    for g in groups:
        into = s.scratch()
        into[...] = g
        s.add(into)
    out = np.empty(groups[0].size, np.float32)
    s.finish(out)
    return out, s


def reference(groups, segments, total=None):
    """Each value rounded to its tensor's unit, the multiples added exactly (fsum), the
    total rounded once to float32."""
    out = np.empty(groups[0].size, np.float32)
    for a, b in [(a, b) for a, b in segments if b > a]:
        most = max(float(np.abs(g[a:b]).max()) for g in groups)
        unit = 2.0 ** (math.ceil(math.log2((total or len(groups)) * most)) - 52) if most else 1.0
        rounded = [np.rint(g[a:b].astype(np.float64) / unit) * unit for g in groups]
        out[a:b] = [math.fsum(col) for col in zip(*rounded)]
    return out


def test_the_sum_is_exact_and_its_order_does_not_matter():
    rng = np.random.default_rng(0)
    # Values over 40 binades, both signs, zeros: what a float sum adds differently by order.
    groups = [(rng.standard_normal(70_000) * 2.0 ** rng.integers(-40, 0, 70_000))
              .astype(np.float32) for _ in range(7)]
    for g in groups:
        g[::97] = 0
    segments = [(0, 1000), (1000, 1000), (1000, 70_000)]  # an empty tensor too
    got, _ = exact_sum(groups, segments)
    assert np.array_equal(got, reference(groups, segments))
    for order in ([6, 5, 4, 3, 2, 1, 0], [3, 0, 6, 1, 5, 2, 4]):
        assert np.array_equal(exact_sum([groups[k] for k in order], segments)[0], got)
    # ... where float32 additions in those orders differ:
    plain = [np.sum(np.stack([groups[k] for k in order]), axis=0, dtype=np.float32)
             for order in ([0, 1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1, 0])]
    assert not np.array_equal(*plain)


def test_fewer_groups_than_the_bound_and_a_power_of_two_largest_value():
    """An empty group adds nothing (a short last batch); a largest value that is exactly
    a power of two with one group is the unit's edge (|r| = 2**52 units)."""
    g = np.array([1.0, -0.5, 2.0 ** -30, 3.0], np.float32)
    g[3] = 4.0
    got, _ = exact_sum([g], [(0, 4)], total=1)
    assert np.array_equal(got, g)
    got, _ = exact_sum([g, -g], [(0, 4)], total=12)
    assert np.array_equal(got, np.zeros(4, np.float32))


def test_a_step_reuses_the_buffers_and_forgets_the_last_one():
    rng = np.random.default_rng(1)
    a = [rng.standard_normal(300).astype(np.float32) for _ in range(3)]
    _, s = exact_sum(a, [(0, 300)])
    pool = list(s._pool)
    for g in a:
        into = s.scratch()
        into[...] = 2 * g
        s.add(into)
    out = np.empty(300, np.float32)
    s.finish(out)
    assert all(x is y for x, y in zip(s._pool, pool)) and len(s._pool) == len(pool)
    assert np.array_equal(out, reference([2 * g for g in a], [(0, 300)]))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_diverged_gradient_gives_nan_for_the_loss_check(bad):
    g = np.ones(10, np.float32)
    g[3] = bad
    got, _ = exact_sum([g, g], [(0, 10)])
    assert np.isnan(got).all()
