"""Convolution and pooling on (n, channels, height, width) batches, BLAS-backed.

``Conv2d`` lowers a convolution to one matrix product (im2col): the k x k
patches of the (padded) input become the columns of a matrix ``cols``
(channels * k * k, n * out_h * out_w), and the output is ``weight @ cols``
(weight (out_channels, channels * k * k)).  ``cols`` is filled by k * k
copies, one per kernel offset, of the whole input shifted by that offset
(channels first, so each copy moves rows of out_w numbers, not scattered
single ones).  Backward is two more products: the weight gradient
``dy @ cols.T`` and the patch gradients ``weight.T @ dy``, added back
(col2im) by k * k shifted adds.  Pooling uses windowed views.
"""
from __future__ import annotations

import math
import numpy as np
from numpy.lib.stride_tricks import as_strided

from .layers import EVAL, Layer, Shape

__all__ = ["Conv2d", "MaxPool2d", "AvgPool2d", "windows"]


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


class Conv2d(Layer):
    """2-D convolution: ``out_channels`` filters of ``kernel`` x ``kernel`` over
    ``in_channels``, with ``stride`` and zero ``padding``; He-uniform weights."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int = 1,
                 padding: int = 0):
        if min(in_channels, out_channels, kernel, stride) < 1 or padding < 0:
            raise ValueError(f"conv2d needs positive channels, kernel and stride and "
                             f"padding >= 0, got {in_channels}, {out_channels}, {kernel}, "
                             f"{stride}, {padding}")
        self.cin, self.cout, self.k = in_channels, out_channels, kernel
        self.stride, self.padding = stride, padding

    def __repr__(self) -> str:
        return (f"Conv2d({self.cin}, {self.cout}, {self.k}, stride={self.stride}, "
                f"padding={self.padding})")

    def text(self) -> str:
        extra = (f",stride={self.stride}" if self.stride != 1 else "") + (
            f",padding={self.padding}" if self.padding else "")
        return f"conv2d({self.cout},{self.k}{extra})"

    def shapes(self):
        return {"weight": (self.cout, self.cin, self.k, self.k), "bias": (self.cout,)}

    def bind(self, params, grads):
        self.weight, self.bias = params["weight"], params["bias"]
        self.gweight, self.gbias = grads["weight"], grads["bias"]

    def init(self, params, rng):
        bound = math.sqrt(6.0 / (self.cin * self.k * self.k))
        params["weight"][...] = rng.uniform(-bound, bound, params["weight"].shape)
        params["bias"][...] = 0.0

    def out_shape(self, shape):
        c, oh, ow = _check(shape, self.k, self.stride, self.padding, "kernel")
        if c != self.cin:
            raise ValueError(f"takes {self.cin} channels, got {c} (shape {shape})")
        return self.cout, oh, ow

    def flops(self, shape):
        _, oh, ow = self.out_shape(shape)
        return 6.0 * oh * ow * self.cout * self.cin * self.k * self.k

    def activation_elems(self, shape):
        _, oh, ow = self.out_shape(shape)
        return (self.cin * self.k * self.k + self.cout) * oh * ow  # the patches, the output

    def _cols(self, x: np.ndarray) -> np.ndarray:
        """The patches of x (n, cin, h, w) as columns: (cin * k * k, n * out_h * out_w)."""
        n, c, h, w = x.shape
        k, s, p = self.k, self.stride, self.padding
        oh, ow = _out(h, k, s, p), _out(w, k, s, p)
        xt = x.transpose(1, 0, 2, 3)  # (c, n, h, w): a view
        if p:
            padded = np.zeros((c, n, h + 2 * p, w + 2 * p), x.dtype)
            padded[:, :, p:p + h, p:p + w] = xt
            xt = padded
        cols = np.empty((c, k, k, n, oh, ow), x.dtype)
        for i in range(k):  # one copy per kernel offset (i, j) of the shifted input
            for j in range(k):
                cols[:, i, j] = xt[:, :, i:i + s * oh:s, j:j + s * ow:s]
        return cols.reshape(c * k * k, n * oh * ow)

    def forward(self, x, ctx=EVAL):
        n, _, h, w = x.shape
        oh, ow = _out(h, self.k, self.stride, self.padding), _out(w, self.k, self.stride,
                                                                  self.padding)
        cols = self._cols(x)
        y = self.weight.reshape(self.cout, -1) @ cols  # (cout, cin k k) @ (cin k k, n oh ow)
        y += self.bias[:, None]
        out = np.ascontiguousarray(y.reshape(self.cout, n, oh, ow).transpose(1, 0, 2, 3))
        return out, (cols, x.shape)

    def backward(self, dy, saved, need_dx=True, accumulate=False):
        cols, shape = saved
        n, _, oh, ow = dy.shape
        g = np.ascontiguousarray(dy.transpose(1, 0, 2, 3)).reshape(self.cout, n * oh * ow)
        gw = (g @ cols.T).reshape(self.gweight.shape)  # (cout, n oh ow) @ (n oh ow, cin k k)
        gb = g.sum(axis=1)
        if accumulate:
            self.gweight += gw
            self.gbias += gb
        else:
            self.gweight[...] = gw
            self.gbias[...] = gb
        if not need_dx:
            return None
        k, s, p = self.k, self.stride, self.padding
        dcols = (self.weight.reshape(self.cout, -1).T @ g).reshape(self.cin, k, k, n, oh, ow)
        _, c, h, w = shape
        dx = np.zeros((c, n, h + 2 * p, w + 2 * p), dy.dtype)  # channels first, as cols
        for i in range(k):  # col2im: each kernel offset adds its patches' gradients back
            for j in range(k):
                dx[:, :, i:i + s * oh:s, j:j + s * ow:s] += dcols[:, i, j]
        return np.ascontiguousarray(dx[:, :, p:p + h, p:p + w].transpose(1, 0, 2, 3))


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


class MaxPool2d(_Pool):
    """The maximum of each k x k window (stride default k); the gradient goes to the
    window's first maximum."""

    name = "maxpool2d"

    def forward(self, x, ctx=EVAL):
        win = windows(x, self.k, self.stride)
        n, c, oh, ow = win.shape[:4]
        flat = win.reshape(n, c, oh, ow, self.k * self.k)
        arg = flat.argmax(axis=-1)  # (n, c, oh, ow)
        y = np.take_along_axis(flat, arg[..., None], axis=-1)[..., 0]
        return y, (arg, x.shape)

    def backward(self, dy, saved, need_dx=True, accumulate=False):
        if not need_dx:
            return None
        arg, shape = saved
        n, c, oh, ow = dy.shape
        dx = np.zeros(shape, dy.dtype)
        ii, jj = np.divmod(arg, self.k)
        rows = np.arange(oh)[:, None] * self.stride + ii  # (n, c, oh, ow)
        cols = np.arange(ow)[None, :] * self.stride + jj
        nn, cc = np.ogrid[:n, :c]
        where = (nn[..., None, None], cc[..., None, None], rows, cols)
        if self.stride >= self.k:  # windows apart: each input gets at most one gradient
            dx[where] = dy
        else:
            np.add.at(dx, where, dy)
        return dx


class AvgPool2d(_Pool):
    """The mean of each k x k window (stride default k)."""

    name = "avgpool2d"

    def forward(self, x, ctx=EVAL):
        return windows(x, self.k, self.stride).mean(axis=(4, 5)), x.shape

    def backward(self, dy, saved, need_dx=True, accumulate=False):
        if not need_dx:
            return None
        shape = saved
        _, _, oh, ow = dy.shape
        dx = np.zeros(shape, dy.dtype)
        share = dy / dy.dtype.type(self.k * self.k)
        s = self.stride
        for i in range(self.k):
            for j in range(self.k):
                dx[:, :, i:i + s * oh:s, j:j + s * ow:s] += share
        return dx
