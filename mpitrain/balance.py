"""Balanced contiguous parts: how ``count`` items are cut among ``size`` takers.

The data sampler cuts each global batch among the ranks with it, the ring
cuts its buffer into chunks with it, the pipeline cuts a replica's batch into
micro-batches with it: one rule, so all three agree.
"""
from __future__ import annotations

from typing import List, Tuple

__all__ = ["rank_slice", "bounds"]


def rank_slice(count: int, rank: int, size: int) -> Tuple[int, int]:
    """The part [lo, hi) of ``count`` items that ``rank`` of ``size`` takes.

    Parts are contiguous and differ in length by at most one; when
    ``count < size`` some parts are empty (those ranks still join every
    collective, with zero items).  Example: 10 items among 4 ranks give
    [0, 2), [2, 5), [5, 7), [7, 10).
    """
    return count * rank // size, count * (rank + 1) // size


def bounds(count: int, size: int) -> List[int]:
    """The ``size + 1`` cut points of ``count`` items into ``size`` parts: part r is
    [bounds[r], bounds[r + 1]) = ``rank_slice(count, r, size)``."""
    return [count * r // size for r in range(size + 1)]
