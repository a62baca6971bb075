"""The sample order: global sample ids of each step, the same on every rank."""
from __future__ import annotations

import hashlib
from typing import Dict, Optional, Sequence, Tuple

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

    Chunk-aware order (``blocks``: the sizes of consecutive runs of ids that are
    stored together, e.g. a compressed chunk each): the blocks are permuted
    from (seed, epoch), grouped into windows of ``window`` blocks, and the ids
    of each window permuted from (seed, epoch, window), so a stretch of
    batches draws from ``window`` chunks, not from the whole data; each batch
    is then sorted by id.  A batch's samples are the same either way sorted
    or not (the gradient is their sum), and sorted, rank r's contiguous part
    of each batch falls in about 1/p of the window's chunks: each rank
    decompresses its share, not all of them.  The order depends on (seed,
    epoch, the blocks), never on the rank count.  The price is randomness:
    neighbouring batches come from the same ``window`` chunks, and a chunk's
    samples are spread over its window's batches rather than the epoch's.
    """

    def __init__(self, n: int, batch_size: int, seed: int, drop_last: bool = False,
                 blocks: Optional[Sequence[int]] = None, window: int = 32):
        if batch_size < 1 or n < 1:
            raise ValueError(f"need n >= 1 and batch_size >= 1, got {n} and {batch_size}")
        if drop_last and batch_size > n:
            raise ValueError(f"batch size {batch_size} > {n} samples with drop_last")
        if blocks is not None and sum(blocks) != n:
            raise ValueError(f"blocks hold {sum(blocks)} ids, expected {n}")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.n, self.batch_size, self.seed, self.drop_last = n, batch_size, seed, drop_last
        self.blocks = None if blocks is None else np.asarray(blocks, np.int64)
        self.window = window
        self.steps_per_epoch = n // batch_size if drop_last else -(-n // batch_size)
        self._epoch, self._order = -1, None

    def order(self, epoch: int) -> np.ndarray:
        """The order of all sample ids used in ``epoch``."""
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            if self.blocks is None:
                order = rng.permutation(self.n)
            else:
                starts = np.concatenate([[0], np.cumsum(self.blocks)[:-1]])
                picked = rng.permutation(len(self.blocks))
                parts = []
                for w, a in enumerate(range(0, len(picked), self.window)):
                    ids = np.concatenate([np.arange(starts[b], starts[b] + self.blocks[b])
                                          for b in picked[a:a + self.window]])
                    parts.append(np.random.default_rng([self.seed, epoch, w + 1]).permutation(ids))
                order = np.concatenate(parts)
            self._epoch, self._order = epoch, order
        return self._order

    def meta(self) -> Dict[str, object]:
        """What fixes the sample order (a checkpoint records it; resume compares it)."""
        meta: Dict[str, object] = {"seed": self.seed, "batch_size": self.batch_size,
                                   "samples": self.n, "drop_last": self.drop_last}
        if self.blocks is not None:
            digest = hashlib.sha256(self.blocks.tobytes()).hexdigest()[:16]
            meta.update(shuffle="chunks", shuffle_window=self.window,
                        blocks=f"{len(self.blocks)} blocks, sha256 {digest}")
        return meta

    def locate(self, step: int) -> Tuple[int, int]:
        """(epoch, step within the epoch) of global step ``step``."""
        return divmod(step, self.steps_per_epoch)

    def size(self, step: int) -> int:
        """The global batch size of ``step``, without drawing the order."""
        _, k = self.locate(step)
        return self.batch_size if self.drop_last else min(self.batch_size,
                                                           self.n - k * self.batch_size)

    def batch(self, step: int) -> np.ndarray:
        """Global sample ids of global step ``step``, in batch order (sorted, chunk-aware)."""
        epoch, k = self.locate(step)
        ids = self.order(epoch)[k * self.batch_size:(k + 1) * self.batch_size]
        return ids if self.blocks is None else np.sort(ids)

    def local(self, step: int, rank: int, size: int,
              shares: Optional[Sequence[int]] = None,
              groups: Optional[int] = None) -> Tuple[np.ndarray, int]:
        """(ids this rank reads at ``step``, the global batch size of the step).

        ``shares``: the ranks' parts of a full batch, when they are uneven (speed-
        balanced, ``parallel.speed``); a smaller batch is cut at the same proportions.
        ``groups``: each batch is cut into that many fixed groups (``rank_slice``) and
        the rank takes its ``rank_slice`` of the groups (``--reproducible``).
        """
        ids = self.batch(step)
        if groups is not None:
            first, last = rank_slice(groups, rank, size)
            lo, hi = len(ids) * first // groups, len(ids) * last // groups
        elif shares is None:
            lo, hi = rank_slice(len(ids), rank, size)
        else:
            total, before = sum(shares), sum(shares[:rank])
            lo, hi = len(ids) * before // total, len(ids) * (before + shares[rank]) // total
        return ids[lo:hi], len(ids)
