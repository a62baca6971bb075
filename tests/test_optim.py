"""Optimizers on flat buffers against their textbook formulas (serial)."""
import numpy as np
import pytest

from mpitrain.optim import make_optimizer


def run(name, steps=3, **kw):
    rng = np.random.default_rng(0)
    p = rng.normal(size=6)
    g = np.empty(6)
    opt = make_optimizer(name, p, g, **kw)
    grads = [rng.normal(size=6) for _ in range(steps)]
    p0 = p.copy()
    for gi in grads:
        g[...] = gi
        opt.step()
    return p0, p, grads, opt


def test_sgd_with_weight_decay():
    p0, p, grads, _ = run("sgd", lr=0.1, weight_decay=0.01)
    ref = p0.copy()
    for g in grads:
        ref -= 0.1 * (g + 0.01 * ref)
    np.testing.assert_allclose(p, ref, rtol=1e-14)


def test_momentum():
    p0, p, grads, opt = run("momentum", lr=0.1, momentum=0.9)
    ref, v = p0.copy(), np.zeros(6)
    for g in grads:
        v = 0.9 * v + g
        ref -= 0.1 * v
    np.testing.assert_allclose(p, ref, rtol=1e-14)
    np.testing.assert_allclose(opt.state()["velocity"], v, rtol=1e-14)


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_adam_and_adamw(name):
    p0, p, grads, opt = run(name, lr=0.01, weight_decay=0.1)
    ref, m, v = p0.copy(), np.zeros(6), np.zeros(6)
    for t, g in enumerate(grads, 1):
        if name == "adamw":
            ref *= 1 - 0.01 * 0.1
        else:
            g = g + 0.1 * ref
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        ref -= 0.01 * (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.999 ** t)) + 1e-8)
    np.testing.assert_allclose(p, ref, rtol=1e-12)
    state = opt.state()
    assert set(state) == {"m", "v"}
    assert all(a.shape == p.shape for a in state.values())


def test_bad_optimizer_arguments():
    p = np.zeros(3)
    with pytest.raises(ValueError, match="optimizer must be one of sgd, momentum, adam, adamw"):
        make_optimizer("rmsprop", p, p.copy(), lr=0.1)
    with pytest.raises(ValueError, match="learning rate must be > 0, got 0"):
        make_optimizer("sgd", p, p.copy(), lr=0)
    with pytest.raises(ValueError, match="differ"):
        make_optimizer("sgd", p, np.zeros(4), lr=0.1)
