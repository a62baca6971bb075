"""Progress of a long scan, on one line every few seconds: what, how far, of how much.

A scan of a large input (the data checks before step 1, ``data index``,
``prepare``) says how far it is, so a long silence is never a hang in
disguise.  Nothing is printed for a scan shorter than ``every`` seconds.
"""
from __future__ import annotations

import sys
import time
from typing import Optional, TextIO

__all__ = ["Ticker", "size_text"]


def size_text(nbytes: float) -> str:
    """12345678 -> '12.3 MB'."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:,.1f} {unit}"
    return f"{nbytes:,.0f} bytes"


class Ticker:
    """Counts ``total`` bytes of work done (``add``) and prints ``what``'s progress every
    ``every`` seconds (on ``out``, if ``enabled``)."""

    def __init__(self, what: str, total: float, enabled: bool = True, every: float = 10.0,
                 out: Optional[TextIO] = None):
        self.what, self.total, self.enabled, self.every = what, max(total, 1), enabled, every
        self.out = out or sys.stderr
        self.done = 0.0
        self.start = self.last = time.monotonic()

    def add(self, nbytes: float) -> None:
        """``nbytes`` more are done; print if it is time."""
        self.done += nbytes
        now = time.monotonic()
        if self.enabled and now - self.last >= self.every:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            left = (self.total - self.done) / rate if rate > 0 else 0
            print(f"mpitrain: {self.what}: {min(1.0, self.done / self.total):.0%} of "
                  f"{size_text(self.total)}, about {left:,.0f} s left", file=self.out,
                  flush=True)
