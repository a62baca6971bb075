"""Layers, losses and flat buffers (serial)."""
import numpy as np
import pytest

from mpitrain.model.layers import Linear, ReLU, Tanh, mlp, saved_bytes
from mpitrain.model.losses import MSELoss, SoftmaxCrossEntropy
from mpitrain.model.sequential import Sequential


def total_loss(model, loss, x, y):
    return loss(model(x), y, 1.0 / len(y))[0] / len(y)


@pytest.mark.parametrize("activation", ["relu", "tanh"])
@pytest.mark.parametrize("loss", [SoftmaxCrossEntropy(), MSELoss()], ids=["ce", "mse"])
def test_gradient_matches_finite_differences(activation, loss):
    rng = np.random.default_rng(3)
    model = Sequential(mlp(5, [7, 6], 4, activation), dtype="float64", seed=2)
    x = rng.normal(size=(9, 5))
    y = rng.integers(0, 4, 9)
    out, saved = model.forward(x)
    _, dout = loss(out, y, 1.0 / len(y))
    model.backward(dout, saved)
    analytic = model.grads.copy()
    numeric = np.empty_like(analytic)
    eps = 1e-6
    for i in range(model.size):
        keep = model.params[i]
        model.params[i] = keep + eps
        up = total_loss(model, loss, x, y)
        model.params[i] = keep - eps
        down = total_loss(model, loss, x, y)
        model.params[i] = keep
        numeric[i] = (up - down) / (2 * eps)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-5, atol=1e-8)


def test_input_gradient_matches_finite_differences():
    rng = np.random.default_rng(4)
    model = Sequential([Linear(3, 4), Tanh(), Linear(4, 2)], dtype="float64")
    x = rng.normal(size=(5, 3))
    y = rng.integers(0, 2, 5)
    loss = SoftmaxCrossEntropy()
    out, saved = model.forward(x)
    _, dout = loss(out, y, 1.0 / 5)
    dx = model.backward(dout, saved, need_dx=True)
    eps = 1e-6
    for idx in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += eps
        xm[idx] -= eps
        num = (total_loss(model, loss, xp, y) - total_loss(model, loss, xm, y)) / (2 * eps)
        assert dx[idx] == pytest.approx(num, rel=1e-5, abs=1e-9)


def test_parameters_and_gradients_are_views_of_one_buffer():
    model = Sequential(mlp(4, [3], 2), seed=0)
    assert list(model.named_params()) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert model.size == 4 * 3 + 3 + 3 * 2 + 2
    for name, p in model.named_params().items():
        assert np.shares_memory(p, model.params), name
        assert p.base is not None
    for g in model.named_grads().values():
        assert np.shares_memory(g, model.grads)
    # A write through the flat buffer is seen by the layer, and back.
    model.params[:] = 0
    assert not model.layers[0].weight.any()
    model.layers[2].bias[...] = 7
    assert model.named_params()["2.bias"].tolist() == [7, 7]
    # Backward writes the gradient into the flat buffer.
    _, saved = model.forward(np.ones((2, 4), np.float32))
    model.backward(np.full((2, 2), 0.5, np.float32), saved)
    np.testing.assert_array_equal(model.named_grads()["2.bias"], [1, 1])


def test_bind_grads_moves_the_gradients_into_a_given_buffer():
    model = Sequential(mlp(4, [3], 2), seed=0)
    buf = np.zeros(model.size + 2, np.float32)
    model.bind_grads(buf[:model.size])
    _, saved = model.forward(np.ones((1, 4), np.float32))
    model.backward(np.ones((1, 2), np.float32), saved)
    assert np.shares_memory(model.layers[0].gweight, buf)
    assert buf[:model.size].any() and not buf[model.size:].any()
    with pytest.raises(ValueError, match=f"expected a float32 buffer of {model.size} elements"):
        model.bind_grads(np.zeros(model.size + 1, np.float32))


def test_initialisation_depends_on_seed_and_layer_index_only():
    a = Sequential(mlp(6, [5, 4], 3), seed=11)
    b = Sequential(mlp(6, [5, 4], 3), seed=11)
    c = Sequential(mlp(6, [5, 4], 3), seed=12)
    np.testing.assert_array_equal(a.params, b.params)
    assert not np.array_equal(a.params, c.params)
    # A stage holding layers 2..4 of the model starts with the same values.
    layers = mlp(6, [5, 4], 3)
    stage = Sequential(layers[2:], seed=11, index=[2, 3, 4])
    for name, p in stage.named_params().items():
        np.testing.assert_array_equal(p, a.named_params()[name])
    # float64 holds the same draws, float32 their rounding.
    d = Sequential(mlp(6, [5, 4], 3), seed=11, dtype="float64")
    np.testing.assert_array_equal(d.params.astype(np.float32), a.params)


def test_relu_and_tanh_backward():
    r = ReLU()
    y, saved = r.forward(np.array([[-1.0, 0.0, 2.0]]))
    np.testing.assert_array_equal(y, [[0, 0, 2]])
    np.testing.assert_array_equal(r.backward(np.array([[5.0, 5.0, 5.0]]), saved), [[0, 0, 5]])
    t = Tanh()
    y, saved = t.forward(np.array([[0.5]]))
    assert t.backward(np.array([[1.0]]), saved)[0, 0] == pytest.approx(1 - np.tanh(0.5) ** 2)
    assert y[0, 0] == pytest.approx(np.tanh(0.5))


def test_cross_entropy_value_and_empty_batch():
    loss = SoftmaxCrossEntropy()
    logits = np.array([[2.0, 0.0], [0.0, 0.0]], np.float32)
    value, grad = loss(logits, np.array([0, 1]), 0.5)
    assert value == pytest.approx(np.log(1 + np.exp(-2.0)) + np.log(2.0), rel=1e-6)
    assert grad.dtype == np.float32 and grad.shape == (2, 2)
    value, grad = loss(np.zeros((0, 3), np.float32), np.zeros(0, np.int64), 1.0)
    assert value == 0.0 and grad.shape == (0, 3)


def test_invalid_model_arguments():
    with pytest.raises(ValueError, match="dtype must be one of float32, float64, got float16"):
        Sequential(mlp(2, [2], 2), dtype="float16")
    with pytest.raises(ValueError, match="activation must be one of"):
        mlp(2, [2], 2, "swish")


def test_accumulated_micro_batch_gradients_equal_the_whole_batch_gradient():
    rng = np.random.default_rng(6)
    model = Sequential(mlp(5, [6], 3, "tanh"), dtype="float64", seed=1)
    x, y = rng.normal(size=(10, 5)), rng.integers(0, 3, 10)
    loss = SoftmaxCrossEntropy()
    out, saved = model.forward(x)
    model.backward(loss(out, y, 0.1)[1], saved)
    whole = model.grads.copy()
    # Two micro-batches in flight at once, backward in reverse order, accumulated.
    first, second = model.forward(x[:4]), model.forward(x[4:])
    model.backward(loss(second[0], y[4:], 0.1)[1], second[1])
    model.backward(loss(first[0], y[:4], 0.1)[1], first[1], accumulate=True)
    np.testing.assert_allclose(model.grads, whole, rtol=1e-12, atol=1e-12 * np.abs(whole).max())
    assert saved_bytes(first[1]) == (4 * 5 + 4 * 6) * 8  # input, tanh output (= next input)


def test_blockwise_weight_gradient_reports_what_is_final_from_the_end():
    rng = np.random.default_rng(8)
    model = Sequential(mlp(300, [650], 5), dtype="float64", seed=2)  # 650 = 6 x 100 + 50
    x, y = rng.normal(size=(7, 300)), rng.integers(0, 5, 7)
    loss = SoftmaxCrossEntropy()
    out, saved = model.forward(x)
    model.backward(loss(out, y, 1 / 7)[1], saved)
    whole = model.grads.copy()
    reported = []
    model.grads[:] = np.nan

    def final_from(offset):  # like the exchange: transform what just became final
        done = reported[-1] if reported else len(model.grads)
        assert not np.isnan(model.grads[offset:done]).any()
        model.grads[offset:done] *= 2  # (a sum with an identical peer)
        reported.append(offset)

    old = Linear.BLOCK_BYTES
    Linear.BLOCK_BYTES = 300 * 8 * 100  # 100 rows a block
    try:
        model.backward(loss(out, y, 1 / 7)[1], saved, final_from=final_from)
    finally:
        Linear.BLOCK_BYTES = old
    # Every gradient was transformed exactly once, and never overwritten afterwards.
    # Blocks and one matmul may round differently (the BLAS kernel picks the order);
    # a gradient doubled twice or not at all is off by a factor of 2, far beyond this.
    np.testing.assert_allclose(model.grads, 2 * whole, rtol=1e-12,
                               atol=1e-12 * np.abs(whole).max())
    assert reported == sorted(reported, reverse=True) and reported[-1] == 0
    assert len(reported) == (1 + 1) + (1 + 7)  # layer 2: bias, 1 block; layer 0: bias, 7
