"""Every layer's gradients against finite differences, the model text, dropout's keys (serial)."""
import numpy as np
import pytest

from mpitrain.model.blocks import Dropout, LayerNorm, Residual, uniform
from mpitrain.model.conv import AvgPool2d, Conv2d, MaxPool2d
from mpitrain.model.layers import (GELU, Context, Flatten, Linear, ReLU, Sigmoid, SiLU, Tanh,
                                   mlp)
from mpitrain.model.gradcheck import check_layer
from mpitrain.model.sequential import Sequential
from mpitrain.model.spec import SpecError, build, parse

CTX = Context(training=True, step=3, ids=np.arange(100, 104), seed=9)

CASES = {
    "linear": (lambda: Linear(6, 4), (6,)),
    "conv2d": (lambda: Conv2d(2, 3, 3), (2, 6, 5)),
    "conv2d-stride-padding": (lambda: Conv2d(2, 3, 3, stride=2, padding=1), (2, 7, 6)),
    "maxpool2d": (lambda: MaxPool2d(2), (2, 6, 4)),
    "maxpool2d-overlapping": (lambda: MaxPool2d(3, stride=2), (2, 7, 7)),
    "avgpool2d": (lambda: AvgPool2d(2), (3, 4, 6)),
    "avgpool2d-overlapping": (lambda: AvgPool2d(3, stride=1), (1, 5, 5)),
    "flatten": (lambda: Flatten(), (2, 3, 2)),
    "layernorm": (lambda: LayerNorm((5,)), (5,)),
    "layernorm-maps": (lambda: LayerNorm((2, 3, 3)), (2, 3, 3)),
    "dropout": (lambda: Dropout(0.4), (7,)),
    "gelu": (lambda: GELU(), (5,)),
    "silu": (lambda: SiLU(), (5,)),
    "sigmoid": (lambda: Sigmoid(), (5,)),
    "relu": (lambda: ReLU(), (5,)),
    "tanh": (lambda: Tanh(), (5,)),
    "residual": (lambda: Residual([LayerNorm((6,)), Linear(6, 6), GELU(), Linear(6, 6)]), (6,)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_gradients_match_finite_differences(name):
    """mpitrain.check_layer, the checker users run on their own layers, on every
    built-in layer: every coordinate of these small layers, accumulate, nothing kept."""
    make, shape = CASES[name]
    x = np.random.default_rng(7).normal(size=(4, *shape))
    if name.startswith("maxpool"):  # no ties within a window: the gradient is defined
        x = np.random.default_rng(7).permutation(x.size).reshape(x.shape) / x.size
    errors = check_layer(make(), shape, x=x, seed=1, coordinates=10_000)
    assert max(errors.values()) < 1e-6, errors


def test_accumulating_adds_the_gradient_of_a_second_batch():
    model = Sequential([Conv2d(1, 2, 3, padding=1), ReLU(), Flatten(), Linear(2 * 16, 3)],
                       dtype="float64")
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(3, 1, 4, 4)), rng.normal(size=(2, 1, 4, 4))
    da, db = rng.normal(size=(3, 3)), rng.normal(size=(2, 3))
    out, saved = model.forward(np.concatenate([a, b]))
    model.backward(np.concatenate([da, db]), saved)
    whole = model.grads.copy()
    model.backward(da, model.forward(a)[1])
    seen = []
    model.backward(db, model.forward(b)[1], accumulate=True, final_from=seen.append)
    np.testing.assert_allclose(model.grads, whole, rtol=1e-12, atol=1e-12)
    assert seen and min(seen) == 0  # every parameter reported final at the end


def test_dropout_masks_are_keyed_to_the_sample_not_the_batch():
    """A sample's mask depends on (seed, step, its global id, the layer), not on which rows
    it shares a batch with: split any way, the same units drop."""
    d = Dropout(0.5)
    d.index = 4
    x = np.ones((6, 10))
    whole, _ = d.forward(x, Context(True, 12, np.arange(20, 26), 1))
    parts = [d.forward(x[a:b], Context(True, 12, np.arange(20 + a, 20 + b), 1))[0]
             for a, b in ((0, 1), (1, 4), (4, 6))]
    np.testing.assert_array_equal(whole, np.concatenate(parts))
    assert 0.3 < (whole == 0).mean() < 0.7 and set(np.unique(whole)) == {0.0, 2.0}
    other_step, _ = d.forward(x, Context(True, 13, np.arange(20, 26), 1))
    assert not np.array_equal(whole, other_step)
    np.testing.assert_array_equal(d.forward(x, Context(False))[0], x)  # evaluation
    u = uniform(1, 2, np.arange(100000), 3, 4)
    assert 0.49 < u.mean() < 0.51 and u.min() >= 0 and u.max() < 1


def test_the_model_text_builds_with_shapes_checked():
    layers = build("conv2d(4,3,padding=1),relu,maxpool2d(2),flatten,linear(16),gelu,"
                   "dropout(0.1),residual(layernorm,linear(16),silu,linear(16)),linear(10)",
                   (1, 8, 8), 10)
    assert [type(a).__name__ for a in layers] == [
        "Conv2d", "ReLU", "MaxPool2d", "Flatten", "Linear", "GELU", "Dropout", "Residual",
        "Linear"]
    assert layers[4].in_features == 4 * 4 * 4
    model = Sequential(layers)
    assert model(np.zeros((2, 1, 8, 8), np.float32)).shape == (2, 10)
    assert "2.weight" not in model.shapes and "7.1.weight" in model.shapes


@pytest.mark.parametrize("text,message", [
    ("linear(10)", "layer 0 linear(10): takes (features,) samples, got shape (1, 8, 8): add "
                   "flatten before it"),
    ("flatten,linear(5)", "the model ends in samples of shape (5,), the task needs (10,)"),
    ("conv2d(4,9),flatten,linear(10)", "layer 0 conv2d(4,9): a 9x9 kernel does not fit a 8x8"),
    ("flatten,residual(linear(5)),linear(10)", "layer 1 residual(linear(5)): its block turns "
                                              "(64,) into (5,)"),
    ("flatten,lenear(10)", "unknown layer 'lenear'"),
    ("flatten,linear(10", "expected )"),
    ("flatten,dropout(1.5),linear(10)",
     "layer 1 dropout(1.5): takes a probability in [0, 1), got 1.5"),
    ("conv2d(4,3,stride=0),flatten,linear(10)",
     "layer 0 conv2d(4,3,stride=0): stride must be a whole number >= 1, got 0"),
    ("conv2d(4,3,padding=0.5),flatten,linear(10)",
     "padding must be a whole number >= 0, got 0.5"),
    ("conv2d(16),flatten,linear(10)",
     "expected conv2d(out_channels, kernel, stride=1, padding=0) (positive whole numbers), "
     "got 16"),
])
def test_a_model_text_that_does_not_fit_names_the_layer_and_both_shapes(text, message):
    with pytest.raises(SpecError) as info:
        build(text, (1, 8, 8), 10)
    assert message in str(info.value)


def test_the_mlp_shorthand_flattens_images_first():
    assert [type(a).__name__ for a in mlp((1, 8, 8), [16], 10)] == ["Flatten", "Linear",
                                                                    "ReLU", "Linear"]
    assert [type(a).__name__ for a in mlp(64, [16], 10)] == ["Linear", "ReLU", "Linear"]
    assert parse("relu")[0] == ("relu", [], {})
