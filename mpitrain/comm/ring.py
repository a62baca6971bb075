"""Ring all-reduce: a reduce-scatter loop, then an all-gather loop, between neighbours.

The buffer is cut into ``size`` chunks.  In the reduce-scatter each rank
passes a chunk to its right neighbour ``(rank + 1) % size`` and adds the
chunk coming from its left neighbour ``(rank - 1) % size``; after
``size - 1`` steps rank ``r`` holds the full sum of chunk ``(r + 1) % size``.
In the all-gather the finished chunks travel once more round the ring.  Each
rank sends ``2 (size - 1) / size`` of the buffer: the bandwidth-optimal
amount, whatever the number of ranks.

Every chunk is summed in one fixed order and then copied, so all ranks get
the same bits, and the same inputs give the same bits on every call.

``ring_allreduce`` is the textbook form (blocking ``Sendrecv``).
``RingAllreduce`` is the one training uses: each chunk is cut into segments
sent with ``Isend``/``Irecv``, and a segment is forwarded as soon as it is
reduced, so the addition of one segment overlaps the transfer of the next and
each segment is added while it is still in cache.  Its scratch buffer is kept
between calls, so a call allocates nothing of the buffer's size.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional

import numpy as np
from mpi4py import MPI

from ..balance import rank_slice
from .codecs import WIRES, codec

__all__ = ["ring_allreduce", "RingAllreduce", "check_buffer", "bytes_sent"]

DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def check_buffer(buf: np.ndarray) -> None:
    """Refuse what the ring cannot reduce in place: wrong type, dtype, or layout."""
    if not isinstance(buf, np.ndarray):
        raise TypeError(f"ring all-reduce needs a numpy array, got {type(buf).__name__}")
    if buf.dtype not in DTYPES:
        raise TypeError(f"ring all-reduce needs float32 or float64, got {buf.dtype}")
    if buf.ndim != 1 or not buf.flags.c_contiguous:
        raise ValueError(f"ring all-reduce needs a contiguous 1-D buffer, got shape "
                         f"{buf.shape} with strides {buf.strides}")
    if not buf.flags.writeable:
        raise ValueError("ring all-reduce works in place and needs a writeable buffer")


def bytes_sent(n: int, itemsize: int, rank: int, size: int) -> int:
    """Bytes rank ``rank`` sends in a ring all-reduce of ``n`` items: all chunks
    but ``(rank + 1) % size`` in the reduce-scatter, all but ``(rank + 2) % size``
    in the all-gather."""
    if size == 1:
        return 0
    length = [hi - lo for lo, hi in (rank_slice(n, i, size) for i in range(size))]
    return itemsize * (2 * n - length[(rank + 1) % size] - length[(rank + 2) % size])


def chunker(buf: np.ndarray, size: int) -> Callable[[int], np.ndarray]:
    """``chunk(i)``: part ``i % size`` of ``size`` near-equal, contiguous parts of ``buf``."""
    bounds = [rank_slice(len(buf), i, size) for i in range(size)]
    return lambda i: buf[slice(*bounds[i % size])]


def ring_allreduce(comm: MPI.Comm, buf: np.ndarray,
                   scratch: Optional[np.ndarray] = None) -> None:
    """Sum ``buf`` over the ranks of ``comm`` in place, by the textbook ring."""
    check_buffer(buf)
    rank, size = comm.Get_rank(), comm.Get_size()
    if size == 1:
        return
    right, left = (rank + 1) % size, (rank - 1) % size
    chunk = chunker(buf, size)
    if scratch is None:
        scratch = np.empty(-(-len(buf) // size), buf.dtype)
    # Reduce-scatter: at step s, send chunk rank - s, receive chunk rank - s - 1
    # and add our part; it then holds the sum over s + 2 ranks.
    for s in range(size - 1):
        send, recv = chunk(rank - s), chunk(rank - s - 1)
        incoming = scratch[:len(recv)]
        comm.Sendrecv(send, dest=right, sendtag=s, recvbuf=incoming, source=left, recvtag=s)
        recv += incoming
    # All-gather: rank holds the full sum of chunk rank + 1; pass full sums on.
    for s in range(size - 1):
        send, recv = chunk(rank + 1 - s), chunk(rank - s)
        comm.Sendrecv(send, dest=right, sendtag=size + s, recvbuf=recv, source=left,
                      recvtag=size + s)


class RingAllreduce:
    """The segmented (pipelined) ring on ``comm``, as a reusable exchange.

    ``segment_bytes`` bounds the size of one message; a chunk is cut into
    ``ceil(chunk bytes / segment_bytes)`` segments of nearly equal size.  The
    default, 4 MiB, is large because MPI already pipelines a large message:
    small segments pay a handshake each and gain little cache reuse
    (``bench allreduce --segment`` measures it).

    ``wire="float16"`` or ``"bfloat16"`` sends 16-bit values (half the
    bytes) while every addition is done in the buffer's own precision: a
    rank adds the decoded incoming partial sum to its float chunk and sends
    the re-encoded result on; the finished chunk is encoded once by its owner,
    and every rank, the owner included, keeps the decoded value, so all ranks
    still hold the same bits.
    """

    name = "ring"
    wires = WIRES  # 16-bit formats it can send, adding in full precision
    progress = ("thread", "none")  # it runs on a thread of its own, or blocking
    sharded = False

    def __init__(self, comm: MPI.Comm, segment_bytes: int = 4 << 20,
                 wire: Optional[str] = None):
        if segment_bytes < 1:
            raise ValueError(f"segment_bytes must be >= 1, got {segment_bytes}")
        if wire not in (None, *WIRES):
            raise ValueError(f"wire must be one of {', '.join(WIRES)} or None, got {wire!r}")
        self.comm, self.segment_bytes, self.wire = comm, segment_bytes, wire
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self._scratch: Dict[tuple, np.ndarray] = {}

    def scratch(self, n: int, dtype, key: str = "") -> np.ndarray:
        """A scratch array of at least ``n`` items, reused between calls."""
        have = self._scratch.get((np.dtype(dtype), key))
        if have is None or len(have) < n:
            have = self._scratch[(np.dtype(dtype), key)] = np.empty(n, dtype)
        return have[:n]

    def segments(self, arr: np.ndarray, itemsize: Optional[int] = None) -> List[np.ndarray]:
        """``arr`` cut into segments of at most about ``segment_bytes`` (counted at
        ``itemsize`` bytes per item, so a chunk has the same segments on the wire
        and in the buffer)."""
        nbytes = len(arr) * (itemsize or arr.itemsize)
        count = max(1, -(-nbytes // self.segment_bytes))
        return [arr[lo:hi] for lo, hi in (rank_slice(len(arr), k, count) for k in range(count))]

    def __call__(self, buf: np.ndarray) -> None:
        """Replace ``buf`` by its elementwise sum over all ranks."""
        check_buffer(buf)
        comm, rank, size = self.comm, self.rank, self.size
        if size == 1 or len(buf) == 0:
            return
        right, left = (rank + 1) % size, (rank - 1) % size
        longest = -(-len(buf) // size)
        wcodec = codec(self.wire) if self.wire else None
        if wcodec is None:  # the buffer is its own wire image
            wire, incoming = buf, self.scratch(longest, buf.dtype)
        else:
            wire = self.scratch(len(buf), np.uint16, "wire")  # 16-bit image, chunk by chunk
            incoming = self.scratch(longest, np.uint16, "in")
        chunk, wchunk = chunker(buf, size), chunker(wire, size)
        seg = self.segments
        item = buf.itemsize
        sending: Dict[int, List[MPI.Request]] = {i: [] for i in range(size)}  # by chunk

        def forward(i: int, parts: List[np.ndarray], tag: int) -> None:
            sending[i % size] += [comm.Isend(p, dest=right, tag=tag) for p in parts]

        def put(dst: np.ndarray, src: np.ndarray) -> None:  # float -> wire image
            if wcodec:
                wcodec.encode(src, dst)

        # Reduce-scatter.  Step s (tag s) receives chunk rank - s - 1 segment by
        # segment, adds each into our part, and forwards it at once as step
        # s + 1's send (after the last step, as the all-gather's first send).
        put(wchunk(rank), chunk(rank))
        forward(rank, seg(wchunk(rank), item), tag=0)
        for s in range(size - 1):
            i = rank - s - 1
            parts, wparts = seg(chunk(i), item), seg(wchunk(i), item)
            into = seg(incoming[:len(chunk(i))], item)
            recvs = [comm.Irecv(t, source=left, tag=s) for t in into]
            for part, wpart, got, req in zip(parts, wparts, into, recvs):
                req.Wait()
                if wcodec:
                    wcodec.decode(got, part, add=True)
                else:
                    part += got
                put(wpart, part)
                if wcodec and s == size - 2:  # finished: keep what the others will get
                    wcodec.decode(wpart, part)
                forward(i, [wpart], tag=s + 1)
        # All-gather.  Step t (tag size - 1 + t) receives the full sum of chunk
        # rank - t (into the buffer, or its wire image), and forwards each
        # segment on arrival, but at the last step.
        for t in range(size - 1):
            i = rank - t
            MPI.Request.Waitall(sending[i % size])  # our sends from it must be done
            parts, wparts = seg(chunk(i), item), seg(wchunk(i), item)
            recvs = [comm.Irecv(w, source=left, tag=size - 1 + t) for w in wparts]
            for part, wpart, req in zip(parts, wparts, recvs):
                req.Wait()
                if wcodec:
                    wcodec.decode(wpart, part)
                if t < size - 2:
                    forward(i, [wpart], tag=size + t)
        MPI.Request.Waitall([r for reqs in sending.values() for r in reqs])

    def reduce(self, buf: np.ndarray) -> None:
        """The same as a call: nobody reads ``buf`` afterwards."""
        self(buf)

    def fence(self) -> None:
        """Nothing to wait for: the sum is complete when the call returns."""

    def close(self) -> None:
        """Nothing to free (the scratch buffers go with the object)."""
