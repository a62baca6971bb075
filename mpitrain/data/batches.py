"""The one batch reader: a rank's part of each step's global batch, read ahead when asked.

Every trainer reads its batches here::

    batches = Batches(train, sampler, part=rank, parts=size)   # or a replica's, a worker's
    batches.prefetch(start, stop)            # optional: read on a thread while steps compute
    ids, x, y, batch = batches.get(step)     # global ids, rows, targets, the global batch size

``part`` of ``parts`` takes its ``rank_slice`` of each global batch, or with
``shares`` (speed-balanced batches) its share, or with ``groups``
(``--reproducible``) its fixed groups.  A pipeline's middle stages read
neither rows nor targets (``features``, ``targets``).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np

from .prefetch import Prefetcher
from .sampler import Sampler

__all__ = ["Batches"]


class Batches:
    """Part ``part`` of ``parts`` of each global batch of ``split`` in ``sampler``'s order."""

    def __init__(self, split, sampler: Sampler, part: int, parts: int, *,
                 groups: Optional[int] = None, features: bool = True, targets: bool = True):
        self.split, self.sampler = split, sampler
        self.part, self.parts, self.groups = part, parts, groups
        self.features, self.targets = features, targets
        self.shares: Optional[List[int]] = None  # uneven parts of a full batch (speed)
        self.ahead = True  # may read on a thread (not a dataset that draws random numbers)
        self._ahead: Optional[Prefetcher] = None
        self._stop = 0

    def ids(self, step: int) -> Tuple[np.ndarray, int]:
        """(this part's global sample ids at ``step``, the step's global batch size)."""
        return self.sampler.local(step, self.part, self.parts, self.shares, self.groups)

    def get(self, step: int) -> Tuple[np.ndarray, Optional[np.ndarray], Optional[np.ndarray],
                                      int]:
        """(ids, x, y, global batch) of ``step``; x or y None where not read."""
        if self._ahead is not None:
            return self._ahead.get(step)
        ids, batch = self.ids(step)
        if self.features:
            x, y = self.split.read(ids)  # (b, *features), (b, *targets)
            return ids, x, y if self.targets else None, batch
        return ids, None, self.split.read_labels(ids) if self.targets else None, batch

    def prefetch(self, start: int, stop: int) -> None:
        """Read the batches of steps ``start``..``stop - 1`` ahead on a thread (rows and
        targets both)."""
        self.close()
        self._stop = stop
        if start < stop and self.features and self.ahead:
            self._ahead = Prefetcher(self.split, self.sampler, self.part, self.parts, start,
                                     stop, shares=self.shares, groups=self.groups)

    def restart(self, start: int) -> None:
        """Read ahead again from ``start`` (the split of each batch changed)."""
        if self._ahead is not None and start < self._stop:
            self.prefetch(start, self._stop)

    def close(self) -> None:
        """Stop reading ahead."""
        if self._ahead is not None:
            self._ahead.close()
            self._ahead = None
