"""Optimizers on flat buffers against their textbook formulas (serial)."""
import numpy as np
import pytest

from mpitrain.model.optim import make_optimizer


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


@pytest.mark.parametrize("name", ["sgd", "momentum", "adam", "adamw"])
def test_an_update_by_parts_and_chunks_has_the_bits_of_the_whole(name, monkeypatch):
    """A sharded update (each rank its parts) must equal the whole update, bit for bit."""
    from mpitrain.model.optim import Optimizer

    rng = np.random.default_rng(5)
    p0 = rng.normal(size=1001).astype(np.float32)
    grads = [rng.normal(size=1001).astype(np.float32) for _ in range(3)]
    results = []
    for parts, chunk in [(None, 1 << 18), (None, 7), ([slice(600, 1001), slice(0, 250),
                                                       slice(250, 600)], 64)]:
        monkeypatch.setattr(Optimizer, "CHUNK", chunk)
        opt = make_optimizer(name, p0.copy(), np.empty_like(p0), lr=0.01, weight_decay=0.1)
        # Moved onto other buffers (as a sharded update moves it into shared memory).
        p, g = p0.copy(), np.empty_like(p0)
        state = {k: np.zeros_like(a) for k, a in opt.state().items()}
        opt.bind(p, g, state)
        for gi in grads:
            g[...] = gi
            opt.step(parts)
        assert all(opt.state()[k] is state[k] for k in state)  # updated where bound
        assert opt.steps == 3
        results.append([p, *opt.state().values()])
    for other in results[1:]:
        assert all(np.array_equal(a, b) for a, b in zip(results[0], other))
    assert not np.array_equal(results[0][0], p0)


def test_bind_refuses_buffers_of_another_shape_or_state_it_does_not_have():
    p = np.zeros(4, np.float32)
    opt = make_optimizer("momentum", p, np.zeros_like(p), lr=0.1)
    with pytest.raises(ValueError, match=r"grads: expected float32\(4,\), got float32\(5,\)"):
        opt.bind(p, np.zeros(5, np.float32))
    with pytest.raises(ValueError, match=r"unknown state \['m'\] \(this optimizer has \['velocity'\]\)"):
        opt.bind(p, np.zeros_like(p), {"m": np.zeros_like(p)})
