"""A layer's gradients against central differences: ``check_layer``, for one's own layers.

The same check the tests run on every built-in layer: in float64, the layer
alone in a model of its own, a random batch ``x`` and a random upstream
gradient ``dy`` define ``f = sum(forward(x) * dy)``; each input and parameter
coordinate is moved by +-eps and ``(f(+) - f(-)) / 2 eps`` compared with what
``backward`` wrote.  It also checks what the training loop relies on besides
the numbers: ``out_shape`` agrees with ``forward``, ``accumulate=True`` adds to
the gradients in one addition (the bits of ``grads + g``, which ``--reproducible``
relies on) instead of overwriting them, and ``forward`` keeps nothing of a
batch in the layer (two batches in flight give each its own gradients).
"""
from __future__ import annotations

import math
from typing import Dict, Sequence

import numpy as np

from .layers import Context, Layer
from .sequential import Sequential

__all__ = ["check_layer", "GradientCheckError"]


class GradientCheckError(AssertionError):
    """A layer's backward pass disagrees with its forward pass (the message says where)."""


def _numeric(f, array: np.ndarray, coords, eps: float) -> np.ndarray:
    """Central differences of ``f()`` with respect to ``array[coords]`` (moved in place)."""
    out = np.empty(len(coords))
    for k, i in enumerate(coords):
        keep = array[i]
        array[i] = keep + eps
        up = f()
        array[i] = keep - eps
        down = f()
        array[i] = keep
        out[k] = (up - down) / (2 * eps)
    return out


def _compare(what: str, analytic: np.ndarray, numeric: np.ndarray, coords, rtol: float,
             atol: float) -> float:
    err = np.abs(analytic - numeric)
    bad = np.flatnonzero(err > atol + rtol * np.abs(numeric))
    if bad.size:
        k = int(bad[np.argmax(err[bad])])
        raise GradientCheckError(
            f"{what}: backward gives {analytic[k]:.8g} at {coords[k]}, central differences "
            f"{numeric[k]:.8g} ({bad.size} of {len(coords)} checked coordinates differ)")
    return float(err.max()) if err.size else 0.0


def _coords(shape, limit: int, rng) -> list:
    """Every index of ``shape``, or ``limit`` of them drawn at random."""
    total = math.prod(shape)
    flat = np.arange(total) if total <= limit else np.sort(rng.choice(total, limit, False))
    return [np.unravel_index(int(i), shape) if shape else () for i in flat]


def check_layer(layer: Layer, input_shape: Sequence[int], *, batch: int = 3, seed: int = 0,
                eps: float = 1e-6, rtol: float = 1e-5, atol: float = 1e-7,
                coordinates: int = 300, x: np.ndarray = None,
                exact_accumulate: bool = True) -> Dict[str, float]:
    """Check ``layer``'s ``backward`` against central differences of its ``forward``.

    ``layer`` is bound to fresh float64 buffers and initialised (give it a new
    instance); ``input_shape`` is one sample's shape.  Up to ``coordinates``
    input and parameter coordinates are checked (all of them in a small
    layer).  ``x``: the batch to check at (default: standard normal), for a
    layer with kinks (max pooling: inputs without ties).  ``exact_accumulate``:
    ``accumulate=True`` must give the bits of one addition, ``grads + g``, as
    ``--reproducible`` needs (False: to a rounding, enough for other runs).  Raises
    ``GradientCheckError`` naming the first disagreement; returns the largest
    absolute errors found, ``{"input": ..., "<parameter>": ...}``.
    """
    shape = tuple(int(s) for s in input_shape)
    model = Sequential([layer], dtype="float64", seed=seed)
    rng = np.random.default_rng([seed, 7])
    x = rng.normal(size=(batch, *shape)) if x is None else np.array(x, np.float64)
    ctx = Context(training=True, step=3, ids=np.arange(100, 100 + len(x)), seed=seed)
    out, saved = model.forward(x, ctx)
    expected = layer.out_shape(shape)
    if tuple(out.shape[1:]) != tuple(expected):
        raise GradientCheckError(f"forward gives samples of shape {tuple(out.shape[1:])}, "
                                 f"out_shape says {tuple(expected)}")
    dy = rng.normal(size=out.shape)
    dx = model.backward(dy, saved, need_dx=True)
    grads = model.grads.copy()

    def f() -> float:
        return float(np.sum(model.forward(x, ctx)[0] * dy))

    report = {}
    coords = _coords(x.shape, coordinates, rng)
    report["input"] = _compare("dL/dx", np.array([dx[i] for i in coords]),
                               _numeric(f, x, coords, eps), coords, rtol, atol)
    for name, view in model.named_params().items():
        key = name.split(".", 1)[1]
        coords = _coords(view.shape, coordinates, rng)
        analytic = np.array([grads[model.slices[name]].reshape(view.shape)[i]
                             for i in coords])
        report[key] = _compare(f"dL/d{key}", analytic, _numeric(f, view, coords, eps), coords,
                               rtol, atol)
    _check_accumulate_and_keep_nothing(model, x, ctx, dy, grads, rng, exact_accumulate)
    return report


def _check_accumulate_and_keep_nothing(model: Sequential, x, ctx, dy, grads, rng,
                                       exact: bool) -> None:
    """``accumulate`` adds; a second batch in flight does not change the first's gradients."""
    if not model.size:
        return
    other = rng.normal(size=x.shape)
    _, saved = model.forward(x, ctx)
    model.forward(other, ctx)  # another batch's forward between this one's and its backward
    model.backward(dy, saved, need_dx=False)
    if not np.allclose(model.grads, grads, rtol=1e-12, atol=1e-12):
        raise GradientCheckError("forward keeps something of the batch in the layer: a "
                                 "second forward before the first batch's backward changed "
                                 "its gradients (return what backward needs in `saved`)")
    # Onto other values than its own: the sum's bits must be those of one addition,
    # grads + this batch's (--reproducible adds a group into its sibling's buffer so).
    before = rng.normal(size=model.grads.shape)
    model.grads[...] = before
    model.backward(dy, saved, need_dx=False, accumulate=True)
    if not np.allclose(model.grads, before + grads, rtol=1e-12, atol=1e-12):
        raise GradientCheckError("backward with accumulate=True does not add to the "
                                 "gradients (it should: grads += this batch's)")
    if exact and model.grads.tobytes() != (before + grads).tobytes():
        raise GradientCheckError("backward with accumulate=True adds this batch's gradients "
                                 "in more than one addition: its bits differ from grads + "
                                 "this batch's (add them once, as --reproducible needs; "
                                 "exact_accumulate=False checks them to a rounding)")
