"""A run of groups at once (parallel.batched): each group's gradient has the bits it has
when the group is computed alone, a layer whose rows depend on each other is found and
given the groups one by one, and a model with other layers with parameters is left alone."""
import numpy as np
import pytest

from mpitrain.model.blocks import Dropout, LayerNorm
from mpitrain.model.layers import Context, Layer, Linear, ReLU, Tanh
from mpitrain.model.sequential import Sequential
from mpitrain.parallel.batched import AtOnce, compute_at_once, eligible, rows_alike

CUTS = [0, 7, 19, 20, 32]  # a run of 4 groups of 7, 12, 1 and 12 rows


class MinusMean(Layer):
    """Subtracts the batch's mean of each unit: every row depends on the others."""

    def forward(self, x, ctx=None):
        return x - x.mean(axis=0), None

    def backward(self, dy, saved, need_dx=True, accumulate=False):
        return dy - dy.mean(axis=0)


def model(*middle):
    return Sequential([Linear(12, 24), *middle, Linear(24, 24), Tanh(), Linear(24, 5)],
                      seed=3)


def context(a, b):
    return Context(training=True, step=4, ids=np.arange(100 + a, 100 + b), seed=9)


def loss_grad(a, b, out):
    return (out - 0.5) / 32  # (rows, outputs): any function of a group's own rows


def group_by_group(net, x, places):
    """The reference: each group alone, as the trainers compute it."""
    for (lo, hi), (into, add) in zip(zip(CUTS, CUTS[1:]), places):
        net.bind_grads(into)
        out, saved = net.forward(x[lo:hi], context(lo, hi))
        net.backward(loss_grad(lo, hi, out), saved, accumulate=add)


def places_of(net):
    """The leader's places: the first group writes, the next two add; the last apart."""
    home, apart = np.zeros(net.size, net.dtype), np.zeros(net.size, net.dtype)
    return [(home, False), (home, True), (home, True), (apart, False)]


@pytest.mark.parametrize("middle", [(ReLU(),), (Dropout(0.3),), (MinusMean(),)])
def test_each_group_gets_the_bits_it_has_alone(middle):
    net = model(*middle)
    x = np.random.default_rng(1).standard_normal((32, 12)).astype(np.float32)
    expect = places_of(net)
    group_by_group(net, x, expect)
    plan = rows_alike(net, x, context, CUTS)
    assert plan[1] == (not isinstance(middle[0], MinusMean))  # the mixing layer is found
    got = places_of(net)
    compute_at_once(net, x, context, CUTS, got, loss_grad, plan)
    for (a, _), (b, _) in zip(expect, got):
        assert a.tobytes() == b.tobytes()


def test_whole_layers_give_each_group_its_own_gradients():
    """Every layer at once, on small integers (exact in any order, so on any BLAS the
    same values as group by group): each group's rows, inputs and places are its own."""
    net = Sequential([Linear(12, 24), ReLU(), Linear(24, 24), ReLU(), Linear(24, 5)], seed=3)
    rng = np.random.default_rng(2)
    net.params[...] = rng.integers(-3, 4, net.size)
    x = rng.integers(-3, 4, (32, 12)).astype(np.float32)
    expect, got = places_of(net), places_of(net)
    group_by_group(net, x, expect)
    compute_at_once(net, x, context, CUTS, got, loss_grad, [True] * len(net.layers))
    for (a, _), (b, _) in zip(expect, got):
        assert a.tobytes() == b.tobytes() and a.any()


def test_the_check_is_not_fooled_by_rows_that_come_out_alike():
    """A 1-row group minus its own mean is 0 alone: real rows of that layer's output could
    agree by accident; random rows do not."""
    net = model(MinusMean())
    x = np.zeros((32, 12), np.float32)  # a blank batch
    assert not rows_alike(net, x, context, CUTS)[1]


def test_the_check_matters():
    """Forced at once, the layer that mixes rows gives other gradients."""
    net = model(MinusMean())
    x = np.random.default_rng(1).standard_normal((32, 12)).astype(np.float32)
    expect, got = places_of(net), places_of(net)
    group_by_group(net, x, expect)
    compute_at_once(net, x, context, CUTS, got, loss_grad, [True] * len(net.layers))
    assert expect[0][0].tobytes() != got[0][0].tobytes()


def test_only_models_whose_layers_with_parameters_are_linear():
    assert eligible(model(ReLU()))
    assert not eligible(Sequential([Linear(12, 24), LayerNorm((24,)), Linear(24, 5)]))
    net = Sequential([Linear(12, 24), LayerNorm((24,)), Linear(24, 5)])
    x = np.zeros((32, 12), np.float32)
    assert AtOnce().plan(net, x, context, CUTS) is None


def test_a_shape_of_run_is_checked_once_and_the_switch_turns_it_off(monkeypatch):
    net = model(ReLU())
    x = np.random.default_rng(1).standard_normal((32, 12)).astype(np.float32)
    at_once = AtOnce()
    plan = at_once.plan(net, x, context, CUTS)  # (the products' rows: as the BLAS's
    assert plan is not None and plan[1]  # kernel; ReLU's always)
    assert list(at_once.plans) == [(7, 12, 1, 12)]
    assert at_once.plan(net, x[:7], context, [0, 7]) is None  # one group
    monkeypatch.setenv("MPITRAIN_GROUPS_AT_ONCE", "0")
    assert AtOnce().plan(net, x, context, CUTS) is None


@pytest.mark.parametrize("rows, dtype", [(1, "float32"), (7, "float32"), (32, "float32"),
                                         (300, "float32"), (600, "float32"), (1500, "float32"),
                                         (32, "float64")])  # 600: the K blocks split here
def test_one_pass_product_keeps_numpys_bits(rows, dtype):
    """c += a.T @ b through the BLAS's beta = 1 where a shape's check found the same bits
    as numpy's two steps, numpy's otherwise (600 rows twice: checked, then remembered)."""
    from mpitrain.model.gemm import add_product

    rng = np.random.default_rng(rows)
    a, b = (rng.standard_normal((rows, n)).astype(dtype) for n in (96, 1024))
    c = rng.standard_normal((96, 1024)).astype(dtype)
    for _ in range(2):
        expect = c + a.T @ b
        add_product(c, a, b)
        assert c.tobytes() == expect.tobytes()
    from mpitrain.model import gemm
    from mpitrain.threads import numpy_is_openblas
    if numpy_is_openblas():  # numpy's wheels: the one-pass call is found and used
        assert gemm._gemm(np.dtype(dtype)) is not None
        assert rows != 32 or all(v for k, v in gemm._CHECKED.items() if k[0] == rows)
    strided = np.zeros((96, 2048), dtype)[:, ::2]  # not contiguous: numpy's steps
    expect = strided + a.T @ b
    add_product(strided, a, b)
    assert strided.tobytes() == expect.tobytes()


def test_a_zero_gradient_first_does_not_pass_the_one_pass_check():
    """c = 0 adds alike in any order: the check runs on random data, so 1500 rows (several
    K blocks) still take numpy's steps and keep its bits when c is not 0."""
    from mpitrain.model.gemm import add_product

    rng = np.random.default_rng(7)
    a, b = (rng.standard_normal((1500, n)).astype(np.float32) for n in (96, 1024))
    c = np.zeros((96, 1024), np.float32)
    add_product(c, a, b)
    c[...] = rng.standard_normal(c.shape)
    expect = c + a.T @ b
    add_product(c, a, b)
    assert c.tobytes() == expect.tobytes()
