"""Layer normalisation, dropout that does not depend on the rank count, residual blocks.

Dropout's mask is a function of (seed, step, global sample id, layer, unit):
a counter-based hash (SplitMix64's finaliser) of those five numbers gives
each unit of each sample its own uniform number, with no generator state.
A sample is dropped out the same way whichever rank, replica, pipeline stage
or micro-batch computes it, so a run gives the same bits at any number of
ranks and any layout (to the rounding of the gradient sum) and a resume
reproduces it.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import numpy as np

from . import kernels
from .layers import EVAL, Layer, Shape

__all__ = ["LayerNorm", "Dropout", "Residual", "uniform"]

_M = np.uint64(0xFFFFFFFFFFFFFFFF)
_K = [np.uint64(k) for k in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB,
                             0xD6E8FEB86659FD93, 0xA0761D6478BD642F)]


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a bijection of 64-bit words that scatters every bit."""
    z = (z ^ (z >> np.uint64(30))) * _K[1]
    z = (z ^ (z >> np.uint64(27))) * _K[2]
    return z ^ (z >> np.uint64(31))


def uniform(seed: int, step: int, ids: np.ndarray, layer: int, units: int) -> np.ndarray:
    """(n, units) numbers in [0, 1), each a function of (seed, step, id, layer, unit)."""
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps, as it should here
        key = _mix(np.uint64(seed) * _K[0] + np.uint64(step) * _K[3]
                   + np.uint64(layer) * _K[4])
        rows = _mix(np.asarray(ids, np.uint64) * _K[0] + key)  # (n,)
        z = _mix(rows[:, None] + np.arange(units, dtype=np.uint64)[None, :] * _K[3])
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


class Dropout(Layer):
    """Zeroes each unit with probability ``p`` while training, scaling the others by
    1 / (1 - p); the identity in evaluation."""

    def __init__(self, p: float):
        if not 0 <= p < 1:
            raise ValueError(f"dropout takes a probability in [0, 1), got {p}")
        self.p = float(p)

    def __repr__(self) -> str:
        return f"Dropout({self.p})"

    def text(self) -> str:
        return f"dropout({self.p!r})"

    def flops(self, shape):
        return 4.0 * math.prod(shape)

    def forward(self, x, ctx=EVAL):
        if not ctx.training or self.p == 0:
            return x, None
        if ctx.ids is None or len(ctx.ids) != len(x):
            raise ValueError("dropout needs the global ids of the batch's samples")
        u = uniform(ctx.seed, ctx.step, ctx.ids, self.index, math.prod(x.shape[1:]))
        mask = (u >= self.p).reshape(x.shape).astype(x.dtype) * x.dtype.type(1 / (1 - self.p))
        return x * mask, mask

    def backward(self, dy, saved, need_dx=True, accumulate=False):
        if not need_dx:
            return None
        return dy if saved is None else dy * saved


class LayerNorm(Layer):
    """Normalises each sample over all its units to mean 0 and variance 1, then scales
    by ``gamma`` and shifts by ``beta`` (one of each per unit)."""

    def __init__(self, shape: Shape, eps: float = 1e-5):
        self.shape, self.eps = tuple(shape), float(eps)

    def __repr__(self) -> str:
        return f"LayerNorm({self.shape})"

    def text(self) -> str:
        return "layernorm" + (f"(eps={self.eps!r})" if self.eps != 1e-5 else "")

    def shapes(self):
        return {"gamma": self.shape, "beta": self.shape}

    def bind(self, params, grads):
        self.gamma, self.beta = params["gamma"], params["beta"]
        self.ggamma, self.gbeta = grads["gamma"], grads["beta"]

    def init(self, params, rng):
        params["gamma"][...] = 1.0
        params["beta"][...] = 0.0

    def out_shape(self, shape):
        if tuple(shape) != self.shape:
            raise ValueError(f"normalises samples of shape {self.shape}, got {shape}")
        return shape

    def flops(self, shape):
        return 12.0 * math.prod(shape)

    def forward(self, x, ctx=EVAL):
        # one loop a row in float32 (model.kernels: compiled, or numpy with the same bits)
        y, xhat, inv = kernels.layernorm(x.reshape(len(x), -1), self.gamma.reshape(-1),
                                         self.beta.reshape(-1), self.eps)
        return y.reshape(x.shape), (xhat, inv)

    def backward(self, dy, saved, need_dx=True, accumulate=False):
        xhat, inv = saved
        g = dy.reshape(len(dy), -1)
        gg, gb = np.einsum("ij,ij->j", g, xhat), g.sum(axis=0)
        if accumulate:
            self.ggamma += gg.reshape(self.shape)
            self.gbeta += gb.reshape(self.shape)
        else:
            self.ggamma[...] = gg.reshape(self.shape)
            self.gbeta[...] = gb.reshape(self.shape)
        if not need_dx:
            return None
        return kernels.layernorm_dx(g, xhat, inv, self.gamma.reshape(-1)).reshape(dy.shape)


class Residual(Layer):
    """``x + block(x)``: a block of layers whose output has its input's shape."""

    def __init__(self, layers: Sequence[Layer]):
        self.layers: List[Layer] = list(layers)

    def __repr__(self) -> str:
        return f"Residual({', '.join(map(repr, self.layers))})"

    def text(self) -> Optional[str]:
        inner = [layer.text() for layer in self.layers]
        return None if None in inner else f"residual({','.join(inner)})"

    def _named(self, d: Dict[str, object], k: int) -> Dict[str, object]:
        prefix = f"{k}."
        return {key[len(prefix):]: v for key, v in d.items() if key.startswith(prefix)}

    def shapes(self):
        return {f"{k}.{key}": s for k, layer in enumerate(self.layers)
                for key, s in layer.shapes().items()}

    def bind(self, params, grads):
        for k, layer in enumerate(self.layers):
            layer.bind(self._named(params, k), self._named(grads, k))

    def init(self, params, rng):
        for k, layer in enumerate(self.layers):
            layer.init(self._named(params, k), np.random.default_rng([rng.integers(2 ** 62),
                                                                      k]))

    def set_index(self, index: int) -> None:
        """Number the block and its layers (their dropout draws differ)."""
        self.index = index
        for k, layer in enumerate(self.layers):
            layer.index = index * 1000 + k + 1

    def out_shape(self, shape):
        out = shape
        for k, layer in enumerate(self.layers):
            try:
                out = layer.out_shape(out)
            except ValueError as exc:
                raise ValueError(f"its layer {k} ({layer!r}) {exc}") from None
        if out != shape:
            raise ValueError(f"its block turns {shape} into {out}; a residual needs the "
                             "same shape out as in")
        return shape

    def flops(self, shape):
        total, s = 0.0, shape
        for layer in self.layers:
            total += layer.flops(s)
            s = layer.out_shape(s)
        return total + math.prod(shape)

    def activation_elems(self, shape):
        total, s = math.prod(shape), shape
        for layer in self.layers:
            total += layer.activation_elems(s)
            s = layer.out_shape(s)
        return total

    def forward(self, x, ctx=EVAL):
        saved, y = [], x
        for layer in self.layers:
            y, keep = layer.forward(y, ctx)
            saved.append(keep)
        return x + y, saved

    def backward(self, dy, saved, need_dx=True, accumulate=False):
        g = dy
        for k in range(len(self.layers) - 1, -1, -1):
            g = self.layers[k].backward(g, saved[k], need_dx=True, accumulate=accumulate)
        return dy + g if need_dx else None
