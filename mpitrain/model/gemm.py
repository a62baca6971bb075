"""``c += a.T @ b`` in one BLAS call, where that has the bits of numpy's two steps.

A Linear's weight gradient adds up over micro-batches (``--accumulate``) and
over ``--reproducible``'s groups: numpy's ``gweight += dy.T @ x`` makes the
product into a temporary, then reads it and the gradient and writes the
gradient again.  The BLAS's GEMM with beta = 1 adds into the gradient as it
goes, one pass over the gradient instead of three (``python -m mpitrain bench
layers`` measures it).  Its bits are the two steps' where the kernel
adds each finished dot product to ``c`` once — OpenBLAS's does while the rows
fit one of its K blocks (a few hundred rows; beyond, they can differ).
So nothing is assumed: each shape (and thread count) is checked once against
numpy, on random data of that shape (two trials); a shape that differs,
numpy's BLAS being another library, or arrays not C-contiguous take numpy's
two steps.
"""
from __future__ import annotations

import ctypes
from typing import Callable, Dict, Optional, Tuple

import numpy as np

from ..threads import blas_threads, numpy_is_openblas, openblas_handles, openblas_symbols

__all__ = ["add_product"]

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112  # CBLAS's enums
_FOUND: Dict[str, Optional[Callable]] = {}  # dtype -> cblas_?gemm, or None
_CHECKED: Dict[Tuple, bool] = {}  # (rows, c's shape, dtype, threads, alignments) -> same
_LINE = 64  # bytes: where an array starts within a cache line is part of a check's key


def _gemm(dtype: np.dtype) -> Optional[Callable]:
    """numpy's OpenBLAS's cblas_sgemm or cblas_dgemm, its integers as wide as the library
    says it was built with (64 bits in numpy's wheels: USE64BITINT)."""
    if dtype.str not in _FOUND:
        letter = {"float32": "s", "float64": "d"}.get(dtype.name)
        real = ctypes.c_float if letter == "s" else ctypes.c_double
        _FOUND[dtype.str] = None
        libs = openblas_handles() if letter and numpy_is_openblas() else []
        # numpy's own first (its wheels' numpy.libs), should another OpenBLAS be loaded
        for lib in sorted(libs, key=lambda lib: "numpy" not in str(lib._name)):
            found = openblas_symbols(lib, f"cblas_{letter}gemm", "openblas_get_config")
            if found is None:
                continue
            fn, config = found
            config.restype = ctypes.c_char_p
            size = ctypes.c_int64 if b"USE64BITINT" in (config() or b"") else ctypes.c_int
            p = ctypes.c_void_p
            fn.argtypes = [ctypes.c_int] * 3 + [size] * 3 + [real, p, size, p, size,
                                                             real, p, size]
            fn.restype = None
            _FOUND[dtype.str] = fn
            return fn
    return _FOUND[dtype.str]


def _call(fn: Callable, c: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    (m, n), k = a.shape, b.shape[1]  # c (n, k) += a.T (n, m) @ b (m, k)
    fn(_ROW_MAJOR, _TRANS, _NO_TRANS, n, k, m, 1.0, a.ctypes.data, n, b.ctypes.data, k,
       1.0, c.ctypes.data, k)


def _placed(values: np.ndarray, dtype: np.dtype, at: int) -> np.ndarray:
    """``values`` in a new array of ``dtype`` that starts ``at`` bytes past a cache line."""
    room = np.empty(values.size + _LINE // dtype.itemsize, dtype)
    skip = (at - room.ctypes.data) % _LINE // dtype.itemsize
    out = room[skip:skip + values.size].reshape(values.shape)
    out[...] = values
    return out


def _exact(fn: Callable, key: Tuple) -> bool:
    """Whether the one-pass call gives numpy's bits for ``key``'s shapes: two trials on
    random data (the first step's real data can hide a difference: all-zero gradients
    add alike in any order)."""
    rows, (n, k), dtype, _, places = key
    rng = np.random.default_rng([rows, n, k])
    for _ in range(2):
        a, b, c, got = (_placed(rng.standard_normal(shape), np.dtype(dtype), at)
                        for shape, at in zip(((rows, n), (rows, k), (n, k), (n, k)),
                                             (*places, places[2])))
        got[...] = c
        _call(fn, got, a, b)
        c += a.T @ b
        if got.tobytes() != c.tobytes():
            return False
    return True


def add_product(c: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """``c += a.T @ b`` for c (n, k), a (m, n), b (m, k): one BLAS call where it gives
    numpy's bits (checked once per shape), else numpy's two steps."""
    fn = _gemm(c.dtype) if a.dtype == b.dtype == c.dtype and len(a) else None
    if fn is not None and all(t.flags.c_contiguous for t in (a, b, c)):
        key = (len(a), c.shape, c.dtype.str, blas_threads(),
               tuple(t.ctypes.data % _LINE for t in (a, b, c)))  # (kernels may align)
        if key not in _CHECKED:  # (threads may both check a new shape: the same answer)
            _CHECKED[key] = _exact(fn, key)
        if _CHECKED[key]:
            _call(fn, c, a, b)
            return
    c += a.T @ b
