"""16-bit wire formats for the ring: encode float32 to 16 bits, decode back (or add).

``float16`` is IEEE half precision, converted by numpy (in software: slow);
``bfloat16`` (the upper half of a float32, rounded to nearest even) is
converted by ml_dtypes in compiled code (optional: ``pip install ml_dtypes``,
the ``bfloat16`` extra): one compiled pass each way, where numpy would need
several integer passes for the same bits.
"""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np

__all__ = ["WIRES", "codec", "missing", "wire_of"]

WIRES = ("float16", "bfloat16")  # the 16-bit wire formats, besides the buffer's own


class Codec:
    """float32 <-> a 16-bit wire image (``uint16``), in place into given arrays."""

    def __init__(self, dtype):
        self.dtype = np.dtype(dtype)  # the 16-bit type the uint16 image holds

    def encode(self, x: np.ndarray, out: Optional[np.ndarray] = None) -> np.ndarray:
        """float -> 16-bit wire image (uint16), rounded to nearest even."""
        out = np.empty(len(x), np.uint16) if out is None else out
        np.copyto(out.view(self.dtype), x, casting="unsafe")
        return out

    def decode(self, w: np.ndarray, out: Optional[np.ndarray] = None,
               add: bool = False) -> np.ndarray:
        """16-bit wire image -> float32 (into ``out``, or added to it)."""
        half = w.view(self.dtype)
        if out is None:
            return half.astype(np.float32)
        if add:
            np.add(out, half, out=out, casting="unsafe")
        else:
            np.copyto(out, half, casting="unsafe")
        return out


def wire_of(grad_dtype: Optional[str]) -> Optional[str]:
    """The wire format of the ``grad_dtype`` option: None for the model's own precision
    (None or ``"full"``), else the 16-bit format named."""
    return None if grad_dtype in (None, "full") else grad_dtype


def missing(wire: str) -> Optional[str]:
    """What this wire format needs that is not installed, or None."""
    if wire == "bfloat16":
        try:
            import ml_dtypes  # noqa: F401
        except ImportError:
            return "ml_dtypes (pip install ml_dtypes, or the 'bfloat16' extra)"
    return None


_CODECS: Dict[str, Codec] = {}


def codec(wire: str) -> Codec:
    """The codec of wire format ``wire`` (one of ``WIRES``)."""
    if wire not in WIRES:
        raise ValueError(f"wire must be one of {', '.join(WIRES)}, got {wire!r}")
    if wire not in _CODECS:
        if missing(wire):
            raise ImportError(f"the {wire} wire format needs {missing(wire)}")
        if wire == "bfloat16":
            import ml_dtypes

            _CODECS[wire] = Codec(ml_dtypes.bfloat16)
        else:
            _CODECS[wire] = Codec(np.float16)
    return _CODECS[wire]
