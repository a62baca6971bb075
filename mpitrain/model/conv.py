"""Convolution on (n, channels, height, width) batches, BLAS-backed (pooling: ``pool``).

``Conv2d`` lowers a convolution to matrix products (im2col): the k x k
patches of the (padded) input become the columns of a matrix ``cols``
(channels * k * k, n * out_h * out_w), and the output is ``weight @ cols``
(weight (out_channels, channels * k * k)), one product per sample where a
sample's output is wide enough, written straight into (n, out_channels, ...).
``cols`` is filled by k * k copies, one per kernel offset, of the whole input
shifted by that offset (channels first, so each copy moves rows of out_w
numbers, not scattered single ones).  Backward is two more products: the
weight gradient ``dy @ cols.T`` and the patch gradients ``weight.T @ dy``,
added back (col2im) by k * k shifted adds.

Where each of x's s * s phases (x[..., a::s, b::s], stride s) fits the
output's grid (ceil(h / s) <= out_h, and so for widths: the usual "same"
convolutions, stride 1 with padding (k - 1) / 2, and stride 2 with padding 1
and a 3 x 3 kernel), each offset's copy is one flat shift instead: the
phases are laid out channels first on the output's grid, so offset (i, j)
reads phase ((i - p) mod s, (j - p) mod s) shifted by ((i - p) // s,
(j - p) // s) rows and columns, one run of n * out_h * out_w numbers per
channel.  A flat shift carries the taps that lie in the padding across a
row's or a plane's edge; those are zeroed.  The same numbers as the padded
copies in far fewer, longer loops; col2im adds back the same way, offset by
offset in the same order.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import numpy as np

from .layers import EVAL, Layer, Shape
from .pool import AvgPool2d, MaxPool2d, _check, _out, windows

__all__ = ["Conv2d", "MaxPool2d", "AvgPool2d", "windows"]


def _plan(shape: Shape, k: int, s: int, p: int) -> Optional[Tuple[int, int, int, List[int]]]:
    """How a batch of ``shape`` (n, c, h, w) lies in its flat phase buffer: (out_h, out_w,
    margin, where each kernel offset's run starts, row-major), or None where a phase has
    more rows or columns than the output (offsets would not be shifts of the phases)."""
    n, c, h, w = shape
    oh, ow = _out(h, k, s, p), _out(w, k, s, p)
    if -(-h // s) > oh or -(-w // s) > ow:
        return None
    block = c * n * oh * ow  # one phase: (c, n, oh, ow)
    taps = [((i - p) % s * s + (j - p) % s, (i - p) // s * ow + (j - p) // s)
            for i in range(k) for j in range(k)]  # (phase a s + b, shift)
    margin = max(abs(shift) for _, shift in taps)
    return oh, ow, margin, [margin + phase * block + shift for phase, shift in taps]


def _to_phases(x: np.ndarray, s: int, oh: int, ow: int, margin: int) -> np.ndarray:
    """x (n, c, h, w) as ``margin`` zeros, its s * s phases (c, n, oh, ow), phase (a, b)
    holding x[..., a::s, b::s] and zeros past it, and ``margin`` zeros: one flat array."""
    n, c, h, w = x.shape
    size = s * s * c * n * oh * ow
    flat = (np.empty if (h, w) == (s * oh, s * ow) else np.zeros)(size + 2 * margin, x.dtype)
    flat[:margin] = 0
    flat[margin + size:] = 0
    phases = flat[margin:margin + size].reshape(s, s, c, n, oh, ow)
    xt = x.transpose(1, 0, 2, 3)  # channels first
    for a in range(s):
        for b in range(s):
            part = xt[:, :, a::s, b::s]
            phases[a, b, :, :, :part.shape[2], :part.shape[3]] = part
    return flat


def _from_phases(flat: np.ndarray, shape: Shape, s: int, oh: int, ow: int,
                 margin: int) -> np.ndarray:
    """The batch (n, c, h, w) whose phases ``flat`` holds, as ``_to_phases`` lays them."""
    n, c, h, w = shape
    phases = flat[margin:margin + s * s * c * n * oh * ow].reshape(s, s, c, n, oh, ow)
    x = np.empty(shape, flat.dtype)
    for a in range(s):
        for b in range(s):
            into = x[:, :, a::s, b::s]
            into[...] = phases[a, b, :, :, :into.shape[2], :into.shape[3]].transpose(1, 0, 2, 3)
    return x


def _clear_outside(a: np.ndarray, h: int, w: int, s: int, p: int) -> None:
    """Zero the taps that lie in the padding, in ``a`` (c, k, k, n, oh, ow): tap (i, j)
    of output (r, col) reads input (s r + i - p, s col + j - p) of an h x w image."""
    k = a.shape[1]
    for i in range(k):  # rows above or below the image: r < lo or r >= hi
        lo, hi = -(-(p - i) // s), -(-(h + p - i) // s)
        if lo > 0:
            a[:, i, :, :, :lo, :] = 0
        if hi < a.shape[4]:
            a[:, i, :, :, max(0, hi):, :] = 0
    for j in range(k):  # columns left or right of it
        lo, hi = -(-(p - j) // s), -(-(w + p - j) // s)
        if lo > 0:
            a[:, :, j, :, :, :lo] = 0
        if hi < a.shape[5]:
            a[:, :, j, :, :, max(0, hi):] = 0


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

    # Output positions per sample from which forward takes a product per sample: narrower
    # products make BLAS slower than the whole batch's one product and its reordering.
    PER_SAMPLE = 256

    def _cols(self, x: np.ndarray) -> np.ndarray:
        """The patches of x (n, cin, h, w) as columns: (cin * k * k, n * out_h * out_w)."""
        n, c, h, w = x.shape
        k, s, p = self.k, self.stride, self.padding
        plan = _plan(x.shape, k, s, p)
        if plan is not None:  # one run per channel and offset, from the phases
            oh, ow, margin, starts = plan
            flat, size = _to_phases(x, s, oh, ow, margin), c * n * oh * ow
            cols = np.empty((c, k * k, n * oh * ow), x.dtype)  # rows (ci, i, j)
            for t, start in enumerate(starts):
                cols[:, t] = flat[start:start + size].reshape(c, n * oh * ow)
            _clear_outside(cols.reshape(c, k, k, n, oh, ow), h, w, s, p)
            return cols.reshape(c * k * k, n * oh * ow)
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
        weight = self.weight.reshape(self.cout, -1)
        out = np.empty((n, self.cout, oh, ow), x.dtype)
        y = out.reshape(n, self.cout, oh * ow)
        if oh * ow >= self.PER_SAMPLE:
            # a product per sample, (cout, cin k k) @ (cin k k, oh ow) with cols' rows
            # strided, straight into its place: no reordering pass, and each product has
            # one sample's shape whatever the batch
            np.matmul(weight, cols.reshape(-1, n, oh * ow).transpose(1, 0, 2), out=y)
            y += self.bias[:, None]
        else:  # one product (cout, n oh ow), reordered as the bias is added
            np.add((weight @ cols).reshape(self.cout, n, oh * ow).transpose(1, 0, 2),
                   self.bias[:, None], out=y)
        return out, (cols, x.shape)

    def backward(self, dy, saved, need_dx=True, accumulate=False):
        cols, shape = saved
        n, _, oh, ow = dy.shape
        g = np.ascontiguousarray(dy.transpose(1, 0, 2, 3)).reshape(self.cout, n * oh * ow)
        if accumulate:  # (cout, n oh ow) @ (n oh ow, cin k k)
            self.gweight += (g @ cols.T).reshape(self.gweight.shape)
            self.gbias += g.sum(axis=1)
        else:
            np.matmul(g, cols.T, out=self.gweight.reshape(self.cout, -1))
            np.sum(g, axis=1, out=self.gbias)
        if not need_dx:
            return None
        k, s, p = self.k, self.stride, self.padding
        dcols = (self.weight.reshape(self.cout, -1).T @ g).reshape(self.cin, k, k, n, oh, ow)
        _, c, h, w = shape
        plan = _plan(shape, k, s, p)
        if plan is not None:  # each offset's run added back where _cols read it
            _clear_outside(dcols, h, w, s, p)
            _, _, margin, starts = plan
            size = c * n * oh * ow
            flat = np.zeros(s * s * size + 2 * margin, dy.dtype)
            for t, start in enumerate(starts):
                into = flat[start:start + size].reshape(c, n * oh * ow)
                into += dcols[:, t // k, t % k].reshape(c, n * oh * ow)
            return _from_phases(flat, shape, s, oh, ow, margin)
        dx = np.zeros((c, n, h + 2 * p, w + 2 * p), dy.dtype)  # channels first, as cols
        for i in range(k):  # col2im: each kernel offset adds its patches' gradients back
            for j in range(k):
                dx[:, :, i:i + s * oh:s, j:j + s * ow:s] += dcols[:, i, j]
        return np.ascontiguousarray(dx[:, :, p:p + h, p:p + w].transpose(1, 0, 2, 3))
