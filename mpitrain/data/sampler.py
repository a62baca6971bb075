"""The sample order: global sample ids of each step, the same on every rank."""
from __future__ import annotations

from typing import Dict, Tuple

import numpy as np

from ..balance import rank_slice

__all__ = ["Sampler"]


class Sampler:
    """The global sample ids of each step, a pure function of (seed, epoch, step).

    Each epoch a permutation of all ``n`` training ids is drawn from a
    generator seeded with (seed, epoch), the same on every rank, and cut into
    consecutive global batches.  Step ``k`` of the run is step ``k %
    steps_per_epoch`` of epoch ``k // steps_per_epoch``.  With ``drop_last``
    the ``n % batch_size`` ids left at the end of an epoch are skipped (they
    are others each epoch); without it the last batch of each epoch is
    smaller, so every sample is used exactly once per epoch.  A rank takes the
    ``rank_slice`` of each global batch, so the split is valid for any rank
    count and a run can resume on another one.
    """

    def __init__(self, n: int, batch_size: int, seed: int, drop_last: bool = False):
        if batch_size < 1 or n < 1:
            raise ValueError(f"need n >= 1 and batch_size >= 1, got {n} and {batch_size}")
        if drop_last and batch_size > n:
            raise ValueError(f"batch size {batch_size} > {n} samples with drop_last")
        self.n, self.batch_size, self.seed, self.drop_last = n, batch_size, seed, drop_last
        self.steps_per_epoch = n // batch_size if drop_last else -(-n // batch_size)
        self._epoch, self._order = -1, None

    def order(self, epoch: int) -> np.ndarray:
        """The permutation of all sample ids used in ``epoch``."""
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._epoch, self._order = epoch, rng.permutation(self.n)
        return self._order

    def meta(self) -> Dict[str, object]:
        """What fixes the sample order (a checkpoint records it; resume compares it)."""
        return {"seed": self.seed, "batch_size": self.batch_size, "samples": self.n,
                "drop_last": self.drop_last}

    def locate(self, step: int) -> Tuple[int, int]:
        """(epoch, step within the epoch) of global step ``step``."""
        return divmod(step, self.steps_per_epoch)

    def batch(self, step: int) -> np.ndarray:
        """Global sample ids of global step ``step``, in batch order."""
        epoch, k = self.locate(step)
        return self.order(epoch)[k * self.batch_size:(k + 1) * self.batch_size]

    def local(self, step: int, rank: int, size: int) -> Tuple[np.ndarray, int]:
        """(ids this rank reads at ``step``, the global batch size of the step)."""
        ids = self.batch(step)
        lo, hi = rank_slice(len(ids), rank, size)
        return ids[lo:hi], len(ids)
