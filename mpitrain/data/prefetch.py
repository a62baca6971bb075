"""Reading the next steps' rows on a background thread, in bursts."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import numpy as np

from .sampler import Sampler
from .shards import Shards

__all__ = ["Prefetcher"]


class Prefetcher:
    """Reads the batches of steps ``start``..``stop - 1`` on a background thread.

    The rows of the next steps are read while the current steps compute
    (numpy and h5py release the GIL while they copy), so reading stays off the
    critical path.  The reader works in bursts: it sleeps until half of the
    ``depth`` batches read ahead are used, then refills them.  One wake-up per
    step cost 2-3% of a step when a rank has a single core (the thread takes it
    from the computation); a burst pays that once per ``depth // 2`` steps.
    ``depth`` defaults to 8 batches (32 from chunked, compressed data, whose
    chunks are decompressed in lumps as a shuffle window begins: a deeper
    read-ahead spreads that work over more steps), fewer if that would exceed
    ``max_bytes``.
    ``get`` must be called for each step in order; an error in the reader is
    raised there.
    """

    def __init__(self, shards: Shards, sampler: Sampler, rank: int, size: int,
                 start: int, stop: int, depth: Optional[int] = None,
                 max_bytes: int = 64 << 20, shares: Optional[Sequence[int]] = None,
                 groups: Optional[int] = None):
        import collections
        import threading

        if depth is None:  # the largest local batch's rows, at most 8 (32) in max_bytes
            rows = -(-sampler.batch_size // max(1, size))
            row_bytes = math.prod(shards.features) * np.dtype(shards.dtype).itemsize
            most = 32 if shards.chunked() else 8
            depth = int(min(most, max(2, max_bytes // max(1, rows * row_bytes))))
        self.depth = max(2, depth)
        self._ready: "collections.deque" = collections.deque()  # (step, ids, x, y, batch, error)
        self._cv = threading.Condition()
        self._stopped = False
        self._next, self._end = start, stop  # the step get() must be asked for next
        self._args = (shards, sampler, rank, size, start, stop)
        self._shares = None if shares is None else list(shares)  # uneven parts (speed)
        self._groups = groups  # fixed groups (reproducible)
        self._thread = threading.Thread(target=self._read, name="mpitrain-prefetch",
                                        daemon=True)
        self._thread.start()

    def _read(self) -> None:
        shards, sampler, rank, size, step, stop = self._args
        while step < stop:
            with self._cv:  # sleep until half the read-ahead is used
                while len(self._ready) > self.depth // 2 and not self._stopped:
                    self._cv.wait()
                if self._stopped:
                    return
                room = self.depth - len(self._ready)
            for k in range(step, min(stop, step + room)):
                try:
                    ids, batch = sampler.local(k, rank, size, self._shares, self._groups)
                    item = (k, ids, *shards.read(ids), batch, None)
                except BaseException as exc:  # noqa: BLE001 - raised in the main thread
                    item = (k, None, None, None, 0, exc)
                # Each batch is handed over as it is read: one slow to read (its chunks
                # being decompressed) does not hold back those before it.
                with self._cv:
                    self._ready.append(item)
                    self._cv.notify_all()
                if item[-1] is not None:
                    return
            step += room

    def get(self, step: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """(ids, x, y, global batch size) of ``step``: the rank's global sample ids, their
        rows and targets."""
        if step != self._next or step >= self._end:
            raise RuntimeError(f"prefetcher asked for step {step}; it reads steps in order, "
                               f"next {self._next}, up to {self._end - 1}")
        self._next += 1
        with self._cv:
            while not self._ready:
                self._cv.wait()
            got, ids, x, y, batch, error = self._ready.popleft()
            if len(self._ready) <= self.depth // 2:
                self._cv.notify_all()  # wake the reader for the next burst
        if error is not None:
            raise error
        if got != step:
            raise RuntimeError(f"prefetcher out of order: asked for step {step}, had {got}")
        return ids, x, y, batch

    def close(self) -> None:
        """Stop reading ahead."""
        with self._cv:
            self._stopped = True
            self._cv.notify_all()
        self._thread.join()
