"""Max and average pooling on (n, channels, height, width) batches, by shifted views.

Forward reduces k x k windows in two steps: over each window's columns, then
over its rows, each one ``np.maximum`` (or ``np.add``) of whole strided views
per kernel offset, not a reduction over small trailing axes.  Max pooling's
backward gives each window's gradient to its first maximum in row-major order
(``argmax``'s choice), found by comparing each offset's view with the output;
average pooling's spreads each window's share over its k x k entries.
"""
from __future__ import annotations

import math

import numpy as np
from numpy.lib.stride_tricks import as_strided

from .layers import EVAL, Layer, Shape

__all__ = ["MaxPool2d", "AvgPool2d", "windows"]


def _out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def windows(x: np.ndarray, kernel: int, stride: int) -> np.ndarray:
    """A view (n, c, out_h, out_w, k, k) of the k x k windows of x (n, c, h, w)."""
    n, c, h, w = x.shape
    oh, ow = (h - kernel) // stride + 1, (w - kernel) // stride + 1
    sn, sc, sh, sw = x.strides
    return as_strided(x, (n, c, oh, ow, kernel, kernel),
                      (sn, sc, sh * stride, sw * stride, sh, sw), writeable=False)


def _check(shape: Shape, kernel: int, stride: int, padding: int, what: str) -> Shape:
    if len(shape) != 3:
        raise ValueError(f"takes (channels, height, width) samples, got shape {shape}")
    c, h, w = shape
    oh, ow = _out(h, kernel, stride, padding), _out(w, kernel, stride, padding)
    if oh < 1 or ow < 1:
        pad = f" padded by {padding}" if padding else ""
        raise ValueError(f"a {kernel}x{kernel} {what} does not fit a {h}x{w} input{pad} "
                         f"(shape {shape})")
    return c, oh, ow


class _Pool(Layer):
    name = "pool"

    def __init__(self, kernel: int, stride: int = 0):
        if kernel < 1 or stride < 0:
            raise ValueError(f"{self.name} needs a kernel >= 1 and a stride >= 0, got "
                             f"{kernel}, {stride}")
        self.k, self.stride = kernel, stride or kernel

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.k}, stride={self.stride})"

    def text(self) -> str:
        stride = f",stride={self.stride}" if self.stride != self.k else ""
        return f"{type(self).__name__.lower()}({self.k}{stride})"

    def out_shape(self, shape):
        return _check(shape, self.k, self.stride, 0, "window")

    def flops(self, shape):
        return 2.0 * math.prod(shape)


def _along(x: np.ndarray, axis: int, start: int, count: int, step: int) -> np.ndarray:
    """The view of ``count`` entries of x along ``axis``, ``step`` apart from ``start``."""
    index = [slice(None)] * x.ndim
    index[axis] = slice(start, start + step * (count - 1) + 1, step)
    return x[tuple(index)]


def _offset(x: np.ndarray, i: int, j: int, s: int, oh: int, ow: int) -> np.ndarray:
    """The view (n, c, oh, ow) of entry (i, j) of every window of x (n, c, h, w)."""
    return _along(_along(x, 2, i, oh, s), 3, j, ow, s)


def _reduce_windows(x: np.ndarray, op, k: int, s: int, oh: int, ow: int) -> np.ndarray:
    """``op`` (np.maximum or np.add) over each k x k window of x (n, c, h, w): over its
    columns, (n, c, h, ow), then over its rows, (n, c, oh, ow); each from the first on."""
    x = x[:, :, :s * (oh - 1) + k]  # the rows the windows cover
    for axis, count in ((3, ow), (2, oh)):
        src = x
        x = _along(src, axis, 0, count, s)
        x = op(x, _along(src, axis, 1, count, s)) if k > 1 else x.copy()
        for j in range(2, k):
            op(x, _along(src, axis, j, count, s), out=x)
    return x


class MaxPool2d(_Pool):
    """The maximum of each k x k window (stride default k); the gradient goes to the
    window's first maximum."""

    name = "maxpool2d"

    def forward(self, x, ctx=EVAL):
        _, oh, ow = self.out_shape(x.shape[1:])
        y = _reduce_windows(x, np.maximum, self.k, self.stride, oh, ow)
        return y, (x, y)  # x: usually what the layer before keeps too (relu's output)

    def _first_maxima(self, x: np.ndarray, y: np.ndarray) -> list:
        """Per kernel offset (i, j), row-major: (n, c, oh, ow), whether that entry is its
        window's first maximum (argmax's choice: in a window with a NaN, its first NaN)."""
        k, s = self.k, self.stride
        _, _, oh, ow = y.shape
        # a NaN in y makes its sum NaN (so may inf - inf: the NaN test then finds none)
        nan = bool(np.isnan(np.add.reduce(y, axis=None)))
        hits, free = [], None
        for o in range(k * k):
            if o == k * k - 1 and free is not None:  # the windows not claimed have it here
                hits.append(free)
                break
            xo = _offset(x, *divmod(o, k), s, oh, ow)
            hit = xo == y
            if nan:
                hit |= np.isnan(xo)
            if free is None:
                free = ~hit
            else:
                hit &= free
                free ^= hit  # hit lies within free
            hits.append(hit)
        return hits

    def backward(self, dy, saved, need_dx=True, accumulate=False):
        if not need_dx:
            return None
        x, y = saved
        k, s = self.k, self.stride
        _, _, oh, ow = dy.shape
        hits = self._first_maxima(x, y)
        # dy times the mask; with an inf or a NaN in dy (inf * 0 is NaN) a select instead,
        # of dy or the zero dy * 0 gives for a finite dy (the same bits for every row
        # whichever way), so the entries that are not a maximum get 0 all the same
        select = not np.isfinite(np.add.reduce(dy, axis=None))
        tiled = s == k and x.shape[2:] == (k * oh, k * ow)
        dx = (np.empty if tiled else np.zeros)(x.shape, dy.dtype)
        # Overlapping windows add up on an entry: from the last offset back, which adds a
        # window's share before the next window's (np.add.at's order, window by window).
        for o in (range(k * k) if s >= k else range(k * k - 1, -1, -1)):
            into = _offset(dx, *divmod(o, k), s, oh, ow)
            if s >= k and not select:  # windows apart: each entry in one window at most
                np.multiply(dy, hits[o], out=into)
                continue
            part = np.where(hits[o], dy, np.copysign(0, dy)) if select else dy * hits[o]
            if s >= k:
                into[...] = part
            else:
                into += part
        return dx


class AvgPool2d(_Pool):
    """The mean of each k x k window (stride default k)."""

    name = "avgpool2d"

    def forward(self, x, ctx=EVAL):
        _, oh, ow = self.out_shape(x.shape[1:])
        y = _reduce_windows(x, np.add, self.k, self.stride, oh, ow)
        y /= self.k * self.k  # as mean divides its sum
        return y, x.shape

    def backward(self, dy, saved, need_dx=True, accumulate=False):
        if not need_dx:
            return None
        shape = saved
        _, _, oh, ow = dy.shape
        k, s = self.k, self.stride
        share = dy / dy.dtype.type(k * k)
        if s == k:  # windows side by side: a window row's entries, copied to its k rows
            tiled = shape[2:] == (k * oh, k * ow)
            dx = (np.empty if tiled else np.zeros)(shape, dy.dtype)
            row = np.repeat(share, k, axis=3)  # (n, c, oh, ow k)
            for i in range(k):
                dx[:, :, i:k * oh:k, :k * ow] = row
            return dx
        dx = np.zeros(shape, dy.dtype)
        for i in range(k):
            for j in range(k):
                _offset(dx, i, j, s, oh, ow)[...] += share
        return dx
