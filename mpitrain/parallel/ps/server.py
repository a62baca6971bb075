"""A server rank's message loop: receive pushes, apply each clock, answer pulls."""
from __future__ import annotations

import math
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from mpi4py import MPI

from . import TAG_INFO, TAG_METRICS, TAG_PARAMS, TAG_PULL, TAG_PUSH
from ...timeline import span
from .shard import ServerShard

__all__ = ["Server", "IDLE_SLEEP"]

# s: a waiting server or worker sleeps between polls: a spinning wait would take a core
# from the ranks that compute (on a machine with fewer cores than ranks).
IDLE_SLEEP = 5e-5


class Server:
    """Server ``rank`` of ``servers`` on ``comm``: the slice [``lo``, ``hi``) of the flat
    parameters in ``shard``, pushed in ``chunks`` ([lo, hi) of the flat buffer, in the
    order workers send them), with ``staleness`` S.

    ``peers`` is the servers' own communicator: each clock they agree on the
    squared norm of the summed gradient (clipping) and on stop requests.
    """

    def __init__(self, comm: MPI.Comm, peers: MPI.Comm, shard: ServerShard, lo: int,
                 chunks: Sequence[Tuple[int, int]], staleness: int, servers: int,
                 clip: Optional[float] = None):
        self.comm, self.peers, self.shard = comm, peers, shard
        self.lo, self.staleness, self.clip = lo, staleness, clip
        self.workers = list(range(servers, comm.Get_size()))
        self.chunks = [(a - lo, b - lo) for a, b in chunks]  # within the slice
        self.width = shard.width
        # The receives posted: requests, and what each is: (worker, clock) of a push, or
        # (worker, -1) of a pull.
        self._requests: List[MPI.Request] = []
        self._what: List[Tuple[int, int]] = []
        self._missing: Dict[Tuple[int, int], int] = {}  # (worker, clock) -> pieces to come
        self._asks = {w: np.zeros(2, np.int64) for w in self.workers}  # [step, need]
        self._waiting: List[Tuple[int, int, int]] = []  # (worker, step, need) not yet answered
        self._answered: Dict[int, int] = {}  # step -> workers answered
        self._sends: List[MPI.Request] = []  # answers in flight (from the parameters)
        self._info = np.zeros(3 + self.width)  # [version, first stop, clock, sums]
        self._info[1] = self._info[2] = -1
        self._info_copies: List[np.ndarray] = []
        self.clock = -1  # the next clock to apply (set by start)
        self.first_stop = -1
        self.sent = [0, 0]  # messages, bytes this rank sent
        self.last_norm: Optional[float] = None
        self.clipped = False

    # -- receives, posted ahead ------------------------------------------------------------
    def start(self, clock: int) -> None:
        """Begin at ``clock`` (the parameters hold version ``clock``): post the pushes
        of the next S + 1 clocks and the pull receives."""
        self.clock = clock
        self.shard.version = clock
        self._info[0] = clock
        for c in range(clock, clock + self.staleness + 1):
            self._post(c)
        for w in self.workers:
            self._post_pull(w)

    def _post(self, clock: int) -> None:
        for w in self.workers:
            grad, metrics = self.shard.slot(w, clock)
            for a, b in self.chunks:
                self._requests.append(self.comm.Irecv(grad[a:b], source=w, tag=TAG_PUSH))
                self._what.append((w, clock))
            self._requests.append(self.comm.Irecv(metrics, source=w, tag=TAG_METRICS))
            self._what.append((w, clock))
            self._missing[(w, clock)] = len(self.chunks) + 1

    def _post_pull(self, w: int) -> None:
        self._requests.append(self.comm.Irecv(self._asks[w], source=w, tag=TAG_PULL))
        self._what.append((w, -1))

    def _poll(self) -> bool:
        """Handle whatever arrived; False if nothing did."""
        done = MPI.Request.Testsome(self._requests)
        if not done:
            return False
        arrived = [self._what[k] for k in done]
        for k in sorted(done, reverse=True):
            del self._requests[k], self._what[k]
        for w, clock in arrived:
            if clock >= 0:
                self._missing[(w, clock)] -= 1
            else:
                step, need = (int(v) for v in self._asks[w])
                self._waiting.append((w, step, need))
                self._post_pull(w)
        return True

    # -- answers ---------------------------------------------------------------------------
    def _answer(self) -> None:
        """Answer every waiting pull whose version is there."""
        still = []
        for w, step, need in self._waiting:
            if need > self.shard.version:
                still.append((w, step, need))
                continue
            info = self._info.copy()  # sent as it is now, while _info moves on
            self._info_copies.append(info)
            self._sends.append(self.comm.Isend(self.shard.params, dest=w, tag=TAG_PARAMS))
            self._sends.append(self.comm.Isend(info, dest=w, tag=TAG_INFO))
            self.sent[0] += 2
            self.sent[1] += self.shard.params.nbytes + info.nbytes
            self._answered[step] = self._answered.get(step, 0) + 1
        self._waiting = still

    # -- one clock -------------------------------------------------------------------------
    def _complete(self, clock: int) -> bool:
        return all(self._missing.get((w, clock), 1) == 0 for w in self.workers)

    def _apply(self, clock: int, lr: float, stop: bool) -> np.ndarray:
        """Sum clock ``clock``'s pushes in worker order and apply one update; return the
        summed metrics (with the servers' stop requests added)."""
        sums = self.shard.reduce(clock, self.workers)
        for w in self.workers:
            del self._missing[(w, clock)]
        # The servers agree on the gradient's squared norm and on stop requests.
        mine = np.array([self.shard.norm_sq() if self.clip else 0.0, 1.0 if stop else 0.0])
        parts = np.empty((self.peers.Get_size(), 2))
        self.peers.Allgather(mine, parts)
        sums[1] += parts[:, 1].sum()
        self.clipped, self.last_norm = False, None
        if self.clip is not None:
            norm = math.sqrt(math.fsum(parts[:, 0]))
            self.last_norm = norm
            if norm > self.clip:
                self.shard.scale(self.clip / norm)
                self.clipped = True
        MPI.Request.Waitall(self._sends)  # the answers read the parameters about to change
        self._sends.clear()
        self._info_copies.clear()
        with span("optimizer", "update", clock=clock):
            self.shard.step(lr)
        if sums[1] > 0 and self.first_stop < 0:
            self.first_stop = clock
        self._info[:] = [self.shard.version, self.first_stop, clock, *sums]
        self._post(clock + self.staleness + 1)  # its slots are free again
        return sums

    def step(self, clock: int, lr: float, stop: bool = False) -> np.ndarray:
        """Apply clock ``clock`` (every worker's push of step ``clock``) and answer every
        worker's pull of that step; return the clock's summed metrics (float64)."""
        assert clock == self.clock, (clock, self.clock)
        sums = None
        while sums is None or self._answered.get(clock, 0) < len(self.workers):
            if sums is None and self._complete(clock):
                sums = self._apply(clock, lr, stop)
                self.clock += 1
            self._answer()
            if sums is None or self._answered.get(clock, 0) < len(self.workers):
                if not self._poll():
                    time.sleep(IDLE_SLEEP)
        del self._answered[clock]
        return sums

    def close(self) -> None:
        """Wait for the answers in flight and cancel the receives posted ahead (local)."""
        MPI.Request.Waitall(self._sends)
        self._sends.clear()
        for request in self._requests:
            request.Cancel()
            request.Wait()
        self._requests.clear()
        self._what.clear()
