"""The faster layer passes give the numbers of the plain ones (serial).

Convolution's flat-shift im2col and col2im against the padded copies they
replace (the same bits), pooling by shifted views against windows and
np.add.at (the first maximum; NaN, ties and non-finite gradients), ReLU
against a scalar 0, sigmoid against float64, and gradients by central
differences on the shapes that take the new paths.
"""
import warnings

import numpy as np
import pytest

from mpitrain.model.conv import AvgPool2d, Conv2d, MaxPool2d, _plan, windows
from mpitrain.model.gradcheck import check_layer
from mpitrain.model.layers import ReLU, Sigmoid, SiLU, Tanh
from mpitrain.model.sequential import Sequential

# (in channels, out channels, kernel, stride, padding, batch shape)
CONVS = [
    (3, 4, 3, 1, 1, (5, 3, 9, 7)),  # "same", stride 1
    (2, 3, 5, 1, 2, (3, 2, 6, 5)),
    (2, 3, 3, 1, 2, (2, 2, 4, 5)),  # padded past "same": the phase has zero rows
    (2, 3, 7, 1, 3, (2, 2, 2, 3)),  # a kernel wider than the image
    (3, 4, 3, 2, 1, (2, 3, 8, 8)),  # stride 2, even
    (3, 4, 3, 2, 1, (2, 3, 9, 7)),  # stride 2, odd
    (2, 3, 4, 3, 2, (2, 2, 7, 8)),
    (2, 3, 1, 2, 0, (2, 2, 4, 5)),
    (2, 3, 3, 1, 0, (2, 2, 5, 5)),  # no phase fits: the padded copies themselves
    (4, 8, 3, 1, 1, (3, 4, 16, 17)),  # a product per sample (16 x 17 outputs each)
]


def padded_cols(x, k, s, p):
    """im2col by padding and one strided copy per kernel offset (the reference)."""
    n, c, h, w = x.shape
    oh, ow = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    xp = np.zeros((c, n, h + 2 * p, w + 2 * p), x.dtype)
    xp[:, :, p:p + h, p:p + w] = x.transpose(1, 0, 2, 3)
    cols = np.empty((c, k, k, n, oh, ow), x.dtype)
    for i in range(k):
        for j in range(k):
            cols[:, i, j] = xp[:, :, i:i + s * oh:s, j:j + s * ow:s]
    return cols.reshape(c * k * k, n * oh * ow)


def padded_col2im(dcols, shape, k, s, p, oh, ow):
    """col2im by adding each offset's gradients into a padded array (the reference)."""
    n, c, h, w = shape
    dcols = dcols.reshape(c, k, k, n, oh, ow)
    dx = np.zeros((c, n, h + 2 * p, w + 2 * p), dcols.dtype)
    for i in range(k):
        for j in range(k):
            dx[:, :, i:i + s * oh:s, j:j + s * ow:s] += dcols[:, i, j]
    return dx[:, :, p:p + h, p:p + w].transpose(1, 0, 2, 3)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", CONVS)
def test_conv_flat_shifts_give_the_padded_copies_numbers(case, dtype):
    cin, cout, k, s, p, shape = case
    layer = Conv2d(cin, cout, k, s, p)
    model = Sequential([layer], dtype=dtype, seed=2)
    rng = np.random.default_rng(3)
    x = rng.standard_normal(shape).astype(dtype)
    y, (cols, _) = layer.forward(x)
    ref = padded_cols(x, k, s, p)
    assert cols.tobytes() == ref.tobytes()  # the same patches, bit for bit
    weight = layer.weight.reshape(cout, -1)
    expect = (weight @ ref).reshape(cout, shape[0], *y.shape[2:]).transpose(1, 0, 2, 3)
    np.testing.assert_allclose(y, expect + layer.bias[:, None, None], rtol=1e-5, atol=1e-5)
    dy = rng.standard_normal(y.shape).astype(dtype)
    dx = layer.backward(dy, layer.forward(x)[1])
    g = np.ascontiguousarray(dy.transpose(1, 0, 2, 3)).reshape(cout, -1)
    assert model.grads[:weight.size].tobytes() == (g @ ref.T).tobytes()
    want = padded_col2im(weight.T @ g, shape, k, s, p, *y.shape[2:])
    np.testing.assert_array_equal(dx, want)  # the same sums in the same order
    assert dx.flags.c_contiguous and dx.dtype == np.dtype(dtype)


def test_the_flat_shifts_cover_the_usual_convolutions():
    assert _plan((64, 16, 16, 16), 3, 1, 1) is not None
    assert _plan((64, 32, 16, 16), 3, 2, 1) is not None
    assert _plan((64, 32, 15, 15), 3, 2, 1) is not None
    assert _plan((2, 2, 5, 5), 3, 1, 0) is None  # the output is smaller than a phase


@pytest.mark.parametrize("make, shape", [
    (lambda: Conv2d(2, 3, 3, padding=1), (2, 5, 4)),
    (lambda: Conv2d(2, 3, 3, stride=2, padding=1), (2, 6, 5)),
    (lambda: Conv2d(2, 2, 5, padding=2), (2, 3, 4)),
    (lambda: Conv2d(1, 2, 3, padding=1), (1, 16, 17)),  # a product per sample
])
def test_conv_gradients_on_the_new_paths(make, shape):
    errors = check_layer(make(), shape, seed=4, coordinates=400)
    assert max(errors.values()) < 1e-6, errors


def first_max_reference(x, dy, k, s):
    """Max pooling's input gradient by argmax and np.add.at, as it was computed before."""
    win = windows(x, k, s)
    n, c, oh, ow = win.shape[:4]
    arg = win.reshape(n, c, oh, ow, k * k).argmax(axis=-1)
    ii, jj = np.divmod(arg, k)
    rows = np.arange(oh)[:, None] * s + ii
    cols = np.arange(ow)[None, :] * s + jj
    nn, cc = np.ogrid[:n, :c]
    dx = np.zeros(x.shape, dy.dtype)
    np.add.at(dx, (nn[..., None, None], cc[..., None, None], rows, cols), dy)
    return dx


POOLS = [(2, 2, (3, 4, 8, 8)), (2, 2, (3, 4, 7, 9)), (3, 2, (2, 3, 7, 7)), (3, 3, (2, 2, 10, 8)),
         (2, 3, (2, 2, 8, 9)), (1, 1, (2, 2, 3, 3)), (3, 1, (2, 2, 5, 6))]


@pytest.mark.parametrize("kind", ["random", "ties", "nan", "inf gradient"])
@pytest.mark.parametrize("k, s, shape", POOLS)
def test_max_pooling_gives_the_first_maximum_its_gradient(k, s, shape, kind):
    rng = np.random.default_rng(5)
    x = rng.standard_normal(shape).astype(np.float32)
    if kind == "ties":  # relu's zeros: whole windows alike
        x = np.maximum(np.round(x), 0).astype(np.float32)
    if kind == "nan":
        x.flat[rng.integers(0, x.size, 4)] = np.nan
    layer = MaxPool2d(k, s)
    y, saved = layer.forward(x)
    np.testing.assert_array_equal(y, np.nanmax(windows(x, k, s), axis=(4, 5)) if kind != "nan"
                                  else windows(x, k, s).max(axis=(4, 5)))
    dy = rng.standard_normal(y.shape).astype(np.float32)
    if kind == "inf gradient":  # the entries that are not a maximum still get 0
        dy.flat[0], dy.flat[-1] = np.inf, np.nan
    want = first_max_reference(x, dy, k, s)
    np.testing.assert_array_equal(layer.backward(dy, saved), want)


@pytest.mark.parametrize("k, s, shape", POOLS)
def test_average_pooling_gives_the_means_bits(k, s, shape):
    x = np.random.default_rng(6).standard_normal(shape).astype(np.float32)
    layer = AvgPool2d(k, s)
    y, saved = layer.forward(x)
    if k == 2:  # a pair of pairs: the order np.mean takes
        assert y.tobytes() == windows(x, k, s).mean(axis=(4, 5)).tobytes()
    np.testing.assert_allclose(y, windows(x, k, s).mean(axis=(4, 5)), rtol=1e-6, atol=1e-6)
    dy = np.random.default_rng(7).standard_normal(y.shape).astype(np.float32)
    share = dy / np.float32(k * k)
    want = np.zeros(shape, np.float32)
    for i in range(k):
        for j in range(k):
            want[:, :, i:i + s * y.shape[2]:s, j:j + s * y.shape[3]:s] += share
    assert layer.backward(dy, saved).tobytes() == want.tobytes()


@pytest.mark.parametrize("shape", [(256, 1024), (3, 5), (64, 32, 16, 16), (7, 65)])
def test_relu_against_a_row_of_zeros_is_max_with_zero(shape):
    x = np.random.default_rng(8).standard_normal(shape).astype(np.float32)
    for view in (x, x[..., ::2]):  # contiguous or not
        np.testing.assert_array_equal(ReLU().forward(view)[0], np.maximum(view, 0))


def test_sigmoid_is_accurate_and_quiet_in_both_tails():
    x = np.concatenate([np.linspace(-120, 120, 2001), [-1e4, 1e4]]).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s, _ = Sigmoid().forward(x[None])
    with np.errstate(over="ignore"):
        exact = 1 / (1 + np.exp(-x.astype(np.float64)))
    # relative to float32's precision; below its smallest normal number, absolute
    np.testing.assert_allclose(s[0], exact, rtol=3e-7, atol=np.finfo(np.float32).tiny)
    assert s[0, -2] == 0 and s[0, -1] == 1
    assert s[0, 1000 - 300] > 0  # sigmoid(-36) = 2.3e-16: not lost to cancellation


@pytest.mark.parametrize("layer", [Sigmoid(), SiLU(), Tanh()])
def test_activation_backward_keeps_the_type_of_its_product(layer):
    x = np.random.default_rng(9).standard_normal((4, 6)).astype(np.float32)
    y, saved = layer.forward(x)
    assert y.dtype == np.float32
    assert layer.backward(np.ones((4, 6), np.float32), saved).dtype == np.float32
    assert layer.backward(np.ones((4, 6), np.float64), saved).dtype == np.float64


@pytest.mark.parametrize("k, s", [(2, 2), (3, 2)])
def test_a_rows_pooling_gradient_does_not_depend_on_another_rows_inf(k, s):
    """The select max pooling takes for a non-finite dy gives a finite row the bits the
    multiply gives it: a row's bits do not depend on the rows beside it."""
    rng = np.random.default_rng(10)
    layer = MaxPool2d(k, s)
    y, saved = layer.forward(rng.standard_normal((3, 2, 8, 8)).astype(np.float32))
    dy = rng.standard_normal(y.shape).astype(np.float32)
    alone = layer.backward(dy, saved)
    dy[2] = np.inf
    beside = layer.backward(dy, saved)
    assert alone[:2].tobytes() == beside[:2].tobytes()
    assert not np.isnan(beside).any()
