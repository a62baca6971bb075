"""A worker rank's side of the parameter server: push gradient chunks, pull parameters."""
from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np
from mpi4py import MPI

from . import TAG_INFO, TAG_METRICS, TAG_PARAMS, TAG_PULL, TAG_PUSH
from ...timeline import span
from ...comm.polling import wait_yielding
from .server import IDLE_SLEEP

__all__ = ["Worker"]


class Worker:
    """Pushes ``grads`` (the flat gradient buffer) to the servers in ``chunks`` and pulls
    ``params`` (the flat parameters) from them.

    ``chunks``: (server, lo, hi) in the order they are sent, from the end of the
    buffer, where backward starts; ``slices``: each server's [lo, hi).  ``width``:
    the metric slots pushed with each clock.
    """

    def __init__(self, comm: MPI.Comm, params: np.ndarray, grads: np.ndarray,
                 chunks: Sequence[Tuple[int, int, int]], slices: Sequence[Tuple[int, int]],
                 width: int):
        self.comm, self.params, self.grads = comm, params, grads
        self.chunks, self.slices = list(chunks), list(slices)
        self.metrics = np.zeros(width)  # float64 [loss sum, stop, task sums] of this clock
        self.infos = [np.zeros(3 + width) for _ in self.slices]  # each server's answer
        self._ask = np.zeros(2, np.int64)  # [step, version needed]
        self._next = 0  # chunks sent this step
        self._pushes: List[MPI.Request] = []
        self.sent = [0, 0]  # messages, bytes this rank sent
        self.versions = [0] * len(self.slices)  # each server's version last received

    def ready(self, offset: int) -> None:
        """Everything from ``offset`` on is final: push the chunks that lie there."""
        while self._next < len(self.chunks) and self.chunks[self._next][1] >= offset:
            s, lo, hi = self.chunks[self._next]
            self._pushes.append(self.comm.Isend(self.grads[lo:hi], dest=s, tag=TAG_PUSH))
            self.sent[0] += 1
            self.sent[1] += self.grads[lo:hi].nbytes
            self._next += 1

    def push(self) -> None:
        """Push what is left of this clock, then its metrics to every server."""
        self.ready(0)
        self._next = 0
        for s in range(len(self.slices)):
            self._pushes.append(self.comm.Isend(self.metrics, dest=s, tag=TAG_METRICS))
        self.sent[0] += len(self.slices)
        self.sent[1] += self.metrics.nbytes * len(self.slices)

    def pull(self, step: int, need: int) -> List[np.ndarray]:
        """After pushing step ``step``: receive every server's slice of version ``need``
        or newer into ``params`` and return each server's answer
        ``[version, first stop, clock, metric sums]``."""
        requests = []
        for s, (lo, hi) in enumerate(self.slices):  # posted before asking: no waiting room
            requests.append(self.comm.Irecv(self.params[lo:hi], source=s, tag=TAG_PARAMS))
            requests.append(self.comm.Irecv(self.infos[s], source=s, tag=TAG_INFO))
        self._ask[:] = (step, need)
        for s in range(len(self.slices)):
            requests.append(self.comm.Isend(self._ask, dest=s, tag=TAG_PULL))
        self.sent[0] += len(self.slices)
        self.sent[1] += self._ask.nbytes * len(self.slices)
        with span("pull", "exchange", step=step, need=need):
            # The pushes too: grads is written next.
            wait_yielding(requests + self._pushes, nap=IDLE_SLEEP)
        self._pushes.clear()
        self.versions = [int(info[0]) for info in self.infos]
        return self.infos

    def close(self) -> None:
        """Wait for pushes in flight (local)."""
        MPI.Request.Waitall(self._pushes)
        self._pushes.clear()
