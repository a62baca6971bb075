"""The compiled float32 kernels give the bits of their numpy fallback, which computes the
documented definitions (Cephes' exp, the halving sum), accurately.

The compiled module is built at install where a C compiler is found; without it the
comparisons skip (``MPITRAIN_KERNELS_TESTS=require``, as in CI, makes that a failure).
"""
import os

import numpy as np
import pytest

from mpitrain.model import kernels
from mpitrain.model.blocks import LayerNorm
from mpitrain.model.layers import Linear, Sigmoid, SiLU
from mpitrain.model.sequential import Sequential

F = np.float32


@pytest.fixture
def both(monkeypatch):
    """call(f, *args) -> (compiled result, numpy result)."""
    if kernels._c is None:
        reason = "the compiled kernels were not built (no C compiler at install)"
        if os.environ.get("MPITRAIN_KERNELS_TESTS", "").strip().lower() == "require":
            pytest.fail(f"MPITRAIN_KERNELS_TESTS=require, but {reason}", pytrace=False)
        pytest.skip(reason)

    def call(f, *args):
        monkeypatch.setenv("MPITRAIN_KERNELS", "1")
        assert kernels.compiled()
        fast = f(*args)
        monkeypatch.setenv("MPITRAIN_KERNELS", "0")
        assert not kernels.compiled()
        slow = f(*args)
        monkeypatch.setenv("MPITRAIN_KERNELS", "1")
        return fast, slow
    return call


def same_bits(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def wide_values(n=50_000, seed=0):
    """Normal values at several scales, a sweep over both tails and the special values;
    an odd length, so the 8-wide loop's tail runs too."""
    rng = np.random.default_rng(seed)
    special = [0.0, -0.0, np.inf, -np.inf, 88.37, 88.72, 88.73, 88.75, 89, -86.5, -86.49,
               -87, -88.72, -88.73, 86.5, 1e-30, -1e-30, 1e-45, 3.4e38, -3.4e38]
    parts = [rng.standard_normal(n) * s for s in (1, 8, 40)]
    return np.concatenate(parts + [np.linspace(-130, 130, 26_001), special]).astype(F)


def test_sigmoid_and_its_gradient_have_the_bits_of_numpys_passes(both):
    x = wide_values()
    for view in (x, x[3:], x[:-5], x[:7]):
        fast, slow = both(kernels.sigmoid, view)
        assert same_bits(fast, slow)
    s = kernels.sigmoid(x)
    dy = np.random.default_rng(1).standard_normal(x.size).astype(F)
    assert same_bits(*both(kernels.sigmoid_grad, dy, s))


def test_a_nan_stays_nan_both_ways(both):
    x = np.array([np.nan, 1, np.nan] * 5, F)
    for out in both(kernels.sigmoid, x):
        assert np.isnan(out[::3]).all() and (out[1::3] == kernels.sigmoid(F([1]))[0]).all()


@pytest.mark.parametrize("n, m", [(256, 1024), (1, 1), (7, 1), (5, 3), (9, 16), (9, 17),
                                  (4, 33), (33, 1000), (64, 777), (3, 0)])
def test_layernorm_and_its_input_gradient_have_the_bits_of_numpys_passes(both, n, m):
    rng = np.random.default_rng(n * 1000 + m)
    x = (rng.standard_normal((n, m)) * 3 + 1).astype(F)
    gamma, beta = rng.standard_normal(m).astype(F), rng.standard_normal(m).astype(F)
    with np.errstate(invalid="ignore"):  # m = 0: the mean of nothing
        fast, slow = both(kernels.layernorm, x, gamma, beta, 1e-5)
        assert all(same_bits(a, b) for a, b in zip(fast, slow))
        g = rng.standard_normal((n, m)).astype(F)
        _, xhat, inv = fast
        assert same_bits(*both(kernels.layernorm_dx, g, xhat, inv, gamma))


def test_a_model_trains_to_the_same_bits_with_the_kernels_or_without(both):
    """Forward, backward and updates of a model with each fused layer, both ways."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((32, 24)).astype(F)

    def train():
        model = Sequential([Linear(24, 40), LayerNorm((40,)), Sigmoid(), Linear(40, 40),
                            SiLU(), LayerNorm((40,)), Linear(40, 3)], seed=3)
        for _ in range(3):
            y, saved = model.forward(x)
            model.backward(y - 1, saved)
            model.params -= F(0.1) * model.grads
        return model.params.copy(), model.forward(x)[0]

    fast, slow = both(train)
    assert same_bits(fast[0], slow[0]) and same_bits(fast[1], slow[1])


def test_the_bits_are_pinned():
    """The definitions' bits, fixed across versions and machines (IEEE float32 operations
    only): a change of an operation, a constant or an order in both paths shows here."""
    import hashlib
    digest = lambda *arrays: hashlib.sha256(b"".join(a.tobytes() for a in arrays)).hexdigest()
    assert digest(kernels.sigmoid(wide_values()))[:16] == "061cd9265c429811"
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((33, 777)) * 3 + 1).astype(F)
    gamma, beta = rng.standard_normal(777).astype(F), rng.standard_normal(777).astype(F)
    y, xhat, inv = kernels.layernorm(x, gamma, beta, 1e-5)
    dx = kernels.layernorm_dx(rng.standard_normal((33, 777)).astype(F), xhat, inv, gamma)
    assert digest(y, inv, dx)[:16] == "0b078b89e014cd60"


@pytest.mark.parametrize("eps", [1e-5, np.float64(1e-5), np.float32(1e-5)])
def test_eps_of_any_type_gives_the_same_bits(both, eps):
    """eps is rounded to float32 first: a float64 scalar does not turn numpy's sums into
    float64 (NEP 50), which the loop in C would not follow."""
    x = np.full((2, 8), 3.0, F)  # constant rows: var 0, inv = 1 / sqrt(eps)
    x[1] = np.arange(8)
    gamma, beta = np.ones(8, F), np.zeros(8, F)
    fast, slow = both(kernels.layernorm, x, gamma, beta, eps)
    assert all(same_bits(a, b) for a, b in zip(fast, slow))
    assert same_bits(fast[2], kernels.layernorm(x, gamma, beta, 1e-5)[2])


def test_a_strided_batch_has_the_bits_of_its_contiguous_copy(both):
    rng = np.random.default_rng(12)
    wide = rng.standard_normal((8, 64)).astype(F)
    gamma, beta = rng.standard_normal(32).astype(F), rng.standard_normal(32).astype(F)
    fast, _ = both(kernels.layernorm, np.ascontiguousarray(wide[:, ::2]), gamma, beta, 1e-5)
    strided = kernels.layernorm(wide[:, ::2], gamma, beta, 1e-5)  # numpy: not contiguous
    assert all(same_bits(a, b) for a, b in zip(fast, strided))


def reference_halving_sum(row):
    """The definition, one float32 addition at a time."""
    a, m = [F(v) for v in row], len(row)
    if m == 0:
        return F(0)
    while m > 1:
        h = m // 2
        for j in range(h):
            a[j] = F(a[j] + a[m - h + j])
        m -= h
    return a[0]


@pytest.mark.parametrize("m", [0, 1, 2, 3, 5, 8, 15, 16, 17, 31, 33, 100, 257])
def test_halving_sums_follow_the_definition(m):
    rng = np.random.default_rng(m)
    a = (rng.standard_normal((3, m)) * 10 ** rng.uniform(-3, 3, (3, m))).astype(F)
    want = np.array([reference_halving_sum(row) for row in a], F)
    assert same_bits(kernels.halving_sums(a), want)


def test_the_exponential_is_within_2_ulps_and_sigmoid_within_3():
    t = np.linspace(-86, 88.7, 400_001).astype(F)
    e = t.copy()
    kernels._exp_inplace(e)
    exact = np.exp(t.astype(np.float64))
    assert (np.abs(e - exact) / exact).max() < 2 * 2.0 ** -24
    x = np.linspace(-80, 40, 400_001).astype(F)
    exact = 1 / (1 + np.exp(-x.astype(np.float64)))
    assert (np.abs(kernels.sigmoid(x) - exact) / exact).max() < 3 * 2.0 ** -24


def test_layernorm_is_the_normalisation_to_float32s_precision():
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((16, 300)) * 5 + 3).astype(F)
    gamma, beta = rng.standard_normal(300).astype(F), rng.standard_normal(300).astype(F)
    y, xhat, inv = kernels.layernorm(x, gamma, beta, 1e-5)
    x64 = x.astype(np.float64)
    want = (x64 - x64.mean(1, keepdims=True)) / np.sqrt(x64.var(1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(xhat, want, rtol=0, atol=2e-6)
    np.testing.assert_allclose(y, want * gamma + beta, rtol=0, atol=1e-5)


def test_float64_layernorm_keeps_the_blas_row_sums():
    """float64 has no compiled twin: its sums stay the BLAS's, its bits those of before."""
    rng = np.random.default_rng(5)
    x, g = rng.standard_normal((6, 40)), rng.standard_normal((6, 40))
    gamma, beta = rng.standard_normal(40), rng.standard_normal(40)
    ones = np.ones(40)
    xhat = x - (x @ ones / 40)[:, None]
    inv = (1.0 / np.sqrt(np.matmul(xhat[:, None], xhat[:, :, None]).reshape(6) / 40
                         + 1e-5))[:, None]
    xhat *= inv
    y, got_xhat, got_inv = kernels.layernorm(x, gamma, beta, 1e-5)
    assert same_bits(y, xhat * gamma + beta) and same_bits(got_inv, inv)
    d = g * gamma
    scale = inv / 40
    want = d * inv - (xhat * (np.matmul(d[:, None], xhat[:, :, None]).reshape(6, 1) * scale)
                      + (d @ ones)[:, None] * scale)
    assert same_bits(kernels.layernorm_dx(g, got_xhat, got_inv, gamma), want)


def test_other_types_and_layouts_take_numpy():
    x = np.linspace(-5, 5, 33)
    assert same_bits(kernels.sigmoid(x), 1 / (np.exp(-x) + 1))  # float64: numpy's exp
    a = wide_values(100)[:64].reshape(8, 8)
    assert same_bits(kernels.sigmoid(a[:, ::2]), kernels.sigmoid(np.ascontiguousarray(a[:, ::2])))


def test_info_says_which_computes(monkeypatch):
    monkeypatch.setenv("MPITRAIN_KERNELS", "0")
    assert kernels.describe().startswith("numpy")
    monkeypatch.setattr(kernels, "_c", None)
    assert "not built" in kernels.describe() and not kernels.compiled()
