"""Fused float32 loops for the elementwise layers numpy takes many passes over, with a
numpy fallback that gives the same bits.

``sigmoid`` and ``LayerNorm`` are chains of elementwise operations that torch runs as one
loop each; numpy makes one pass over the batch per operation (and its float32 ``exp``
alone takes about torch's whole sigmoid).  Here each is one loop in C
(``mpitrain/model/_kernels.c``, built at install where a C compiler is found), making
element by element the float32 operations the numpy code below makes array by array, in
the same order: so a run has the same bits with the kernels or without them, on any rank
and any machine that has both.  Two definitions make that possible:

- **exp** is Cephes' ``expf`` (a reduction by ln 2 and a degree-5 polynomial), written out
  here, not numpy's or the C library's, whose bits differ by build;
- **a row's sum** is the *halving sum*: while the row has m > 1 elements, its first
  h = m // 2 take the last h added to them (``a[:h] += a[m - h:]``), the middle one of an
  odd m staying.  numpy runs it as a dozen array additions over the whole batch; its
  error grows with log m, as a pairwise sum's.

Where the kernels are missing, or ``MPITRAIN_KERNELS=0`` is set, the same functions run
in numpy (``compiled()`` says which).  Only C-contiguous float32 arrays take the kernels;
float64 keeps numpy's ``exp`` and the BLAS's row sums, faster in numpy and without a
compiled twin to match.
"""
from __future__ import annotations

import os
from typing import Tuple

import numpy as np

__all__ = ["compiled", "describe", "sigmoid", "sigmoid_grad", "halving_sums", "layernorm",
           "layernorm_dx"]

try:
    from . import _kernels as _c
except ImportError:  # built without a compiler: numpy does it all, with the same bits
    _c = None

_F = np.float32
# mt_exp's constants (see _kernels.c); 2^k is made as 2^(k-1) * 2
_LO, _HI, _LOG2E, _MAGIC = _F(-86.5), _F(88.75), _F(1.44269504088896341), _F(12582912.0)
_C1, _C2 = _F(0.693359375), _F(-2.12194440e-4)
_P = [_F(c) for c in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2,
                      1.6666665459e-1, 5.0000001201e-1)]


def compiled() -> bool:
    """Whether the compiled kernels run (built, and not turned off by
    ``MPITRAIN_KERNELS=0``)."""
    return _c is not None and os.environ.get("MPITRAIN_KERNELS", "1") != "0"


def describe() -> str:
    """One line for ``mpitrain info``: which of the two computes the fused layers."""
    if _c is None:
        return ("numpy (the compiled kernels were not built: no C compiler at install; "
                "sigmoid and layernorm take a few times longer, with the same bits)")
    if not compiled():
        return "numpy (MPITRAIN_KERNELS=0; the compiled ones give the same bits)"
    return "compiled (sigmoid, silu, layernorm in float32; numpy's passes give the same bits)"


def _fast(*arrays: np.ndarray) -> bool:
    return compiled() and all(a.dtype == _F and a.flags.c_contiguous for a in arrays)


def _exp_inplace(t: np.ndarray) -> None:
    """t = exp(t), float32, as ``mt_exp`` computes it element by element."""
    np.clip(t, _LO, _HI, out=t)
    k = t * _LOG2E
    k += _MAGIC
    k -= _MAGIC
    r = k * _C1
    np.subtract(t, r, out=r)
    t[...] = k
    t *= _C2
    r -= t  # t is free from here
    p = np.multiply(r, _P[0])  # Horner: ((P0 r + P1) r + P2) ... + P5
    p += _P[1]
    for c in _P[2:]:
        p *= r
        p += c
    np.multiply(r, r, out=t)  # z
    p *= t
    p += r
    p += _F(1)
    with np.errstate(invalid="ignore"):  # NaN: any integer, the result stays NaN
        e = k.astype(np.int32)
    e += 126
    e <<= 23
    np.multiply(p, e.view(_F), out=t)
    with np.errstate(over="ignore"):  # above ln(FLT_MAX): inf, as exp
        t *= _F(2)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """1 / (exp(-x) + 1) of float32 ``x``, in a new array (other types: with numpy's exp)."""
    if _fast(x):
        out = np.empty_like(x)
        _c.sigmoid(x, out, x.size)
        return out
    s = np.negative(x)
    if s.dtype == _F:
        _exp_inplace(s)
    else:
        with np.errstate(over="ignore"):  # exp(-x) = inf: 1 / inf = 0 is the answer
            np.exp(s, out=s)
    s += 1
    np.divide(1, s, out=s)
    return s


def sigmoid_grad(dy: np.ndarray, s: np.ndarray) -> np.ndarray:
    """dy s (1 - s) as (1 - s) * s * dy, in a new array of the type dy * s has."""
    if dy.shape == s.shape and _fast(dy, s):
        out = np.empty_like(s)
        _c.sigmoid_grad(dy, s, out, s.size)
        return out
    g = np.subtract(1, s, dtype=np.result_type(s, dy))
    g *= s
    g *= dy
    return g


def _halve(a: np.ndarray, m: int, axis: int) -> np.ndarray:
    """One level of halving sums along ``axis`` (1: columns, 0: rows) of ``a``'s first m,
    into a new array (no operand overlaps its output, so numpy makes no copy)."""
    h = m // 2
    if axis == 1:
        out = np.empty((a.shape[0], m - h), a.dtype)
        np.add(a[:, :h], a[:, m - h:m], out=out[:, :h])
        if m % 2:
            out[:, h] = a[:, h]
    else:
        out = np.empty((m - h, a.shape[1]), a.dtype)
        np.add(a[:h], a[m - h:m], out=out[:h])
        if m % 2:
            out[h] = a[h]
    return out


def halving_sums(a: np.ndarray) -> np.ndarray:
    """(n,) the halving sum of each row of the (n, m) array ``a``."""
    n, m = a.shape
    if m == 0:
        return np.zeros(n, a.dtype)
    while m > 16:
        a = _halve(a, m, 1)
        m = a.shape[1]
    # the last levels on the columns made rows: the same additions, each one contiguous
    a = np.ascontiguousarray(a[:, :m].T)
    while m > 1:
        a = _halve(a, m, 0)
        m = a.shape[0]
    return a[0].copy()


def _row_sums(a: np.ndarray) -> np.ndarray:
    """Each row's sum: float32's halving sum (the kernels' own); other types' by the BLAS
    (a product with a vector of ones)."""
    return halving_sums(a) if a.dtype == _F else a @ np.ones(a.shape[1], a.dtype)


def _row_dots(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Each row's dot product of ``a`` and ``b``: float32's halving sum of the products;
    other types' by the BLAS (one dot a row, no (n, m) temporary)."""
    if a.dtype == _F:
        return halving_sums(a * b)
    return np.matmul(a[:, None, :], b[:, :, None]).reshape(len(a))


def layernorm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray,
              eps: float) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each row of the (n, m) ``x`` to mean 0 and variance 1, then ``* gamma + beta``;
    returns (y, xhat, inv) with xhat the normalised rows and inv (n, 1) 1 / sqrt(var + eps).
    """
    n, m = x.shape
    eps = x.dtype.type(eps)  # rounded to x's type first, whatever type it came in
    if _fast(x, gamma, beta):
        y, xhat, inv = np.empty_like(x), np.empty_like(x), np.empty((n, 1), x.dtype)
        _c.layernorm(x, gamma, beta, float(eps), y, xhat, inv, n, m)
        return y, xhat, inv
    xhat = x - (_row_sums(x) / m)[:, None]
    var = _row_dots(xhat, xhat) / m
    inv = (1.0 / np.sqrt(var + eps)).astype(x.dtype)[:, None]
    xhat *= inv
    y = xhat * gamma.reshape(1, -1)
    y += beta.reshape(1, -1)
    return y, xhat, inv


def layernorm_dx(g: np.ndarray, xhat: np.ndarray, inv: np.ndarray,
                 gamma: np.ndarray) -> np.ndarray:
    """The input's gradient of ``layernorm`` given dL/dy ``g`` (n, m):
    ``inv (d - mean(d) - xhat mean(d xhat))`` with d = g * gamma, made as
    ``d inv - (xhat (dot inv / m) + sum inv / m)``."""
    n, m = g.shape
    if _fast(g, xhat, inv, gamma):
        dx = np.empty_like(g)
        _c.layernorm_dx(g, xhat, inv, gamma, dx, n, m)
        return dx
    d = g * gamma.reshape(1, -1)
    scale = inv / m
    total = _row_sums(d)
    rest = _row_dots(d, xhat)[:, None]
    rest *= scale
    rest = xhat * rest
    rest += total[:, None] * scale
    d *= inv
    d -= rest
    return d
