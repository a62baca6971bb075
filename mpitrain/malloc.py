"""Keeping freed memory in the process, so a training step does not page-fault its arrays.

Each step allocates and frees the same large arrays (a convolution's patch
matrix, activations, gradients).  By default glibc's malloc maps large
blocks fresh from the kernel and returns freed memory at the top of its heap,
so every step pays a page fault per 4 KiB it touches again, which can cost
as much as the arithmetic of a convolution.  ``keep_freed_memory`` tells glibc (``mallopt``) to serve blocks up to
256 MiB from its heap and to keep up to 1 GiB freed there; a training process
reuses it at the next step.  ``MPITRAIN_MALLOC=system`` leaves glibc's
defaults; elsewhere than glibc nothing changes.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from typing import Dict

__all__ = ["keep_freed_memory", "malloc_report"]

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h>
MMAP_BYTES, TRIM_BYTES = 256 << 20, 1 << 30

_STATE: Dict[str, str] = {}


def keep_freed_memory() -> str:
    """Set glibc's thresholds as the module says (once); return how malloc is set."""
    if _STATE:
        return _STATE["how"]
    how = "the system's defaults"
    if os.environ.get("MPITRAIN_MALLOC", "").lower() == "system":
        how += " (MPITRAIN_MALLOC=system)"
    elif sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt
        except (OSError, AttributeError):  # not glibc (musl has no mallopt)
            mallopt = None
        if mallopt is not None and mallopt(M_MMAP_THRESHOLD, MMAP_BYTES) == 1 \
                and mallopt(M_TRIM_THRESHOLD, TRIM_BYTES) == 1:
            how = ("glibc keeps freed memory for the next step (MPITRAIN_MALLOC=system "
                   "leaves its defaults)")
    _STATE["how"] = how
    return how


def malloc_report() -> str:
    """One line: how malloc is set."""
    return keep_freed_memory()
