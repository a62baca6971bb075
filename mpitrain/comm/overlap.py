"""Whether to overlap the gradient exchange with backward, and in what buckets.

Overlap hides an exchange behind backward only if something other than the
computing cores moves the bytes: a network card while the cores compute.
Between the ranks of one node the sum *is* work for those cores (MPI copies
through shared memory and adds; so do the ring and shm), and mpitrain gives
every core to the ranks' BLAS threads, so no core is spare: started inside
backward, a bucket's sum takes its core from backward, and cutting the buffer
into buckets adds calls (``bench train``'s ``*-overlap`` variants measure
both ways; the benchmarks page has the figures).

So by default (``overlap=None``) an exchange overlaps, in 2 MiB buckets, only
where its ranks span more than one node, and sums one buffer after backward
on one node.  Asking for buckets (``bucket_mb`` > 0) or for a way to move an
overlapped exchange (``progress``, even thread) asks for overlap; ``overlap``
False sums the buckets after backward, by the same calls, so overlap changes
no bit.  The default's buckets follow the placement, so the bits of a sum
whose order depends on the bucket length (the ring's, MPI's beyond 2 ranks)
do too.
"""
from __future__ import annotations

from typing import Optional, Tuple

from mpi4py import MPI

from .algorithms import PROGRESS

__all__ = ["BUCKET_MB", "spans_nodes", "plan_overlap"]

BUCKET_MB = 2.0  # the buckets of an overlapped exchange, MiB


def spans_nodes(comm: MPI.Comm) -> bool:
    """Whether the ranks of ``comm`` are on more than one node (collective)."""
    node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    whole = node.Get_size() == comm.Get_size()
    node.Free()
    return not whole


def plan_overlap(comm: MPI.Comm, overlap: Optional[bool] = None,
                 bucket_mb: Optional[float] = None,
                 progress: Optional[str] = None) -> Tuple[bool, float, str]:
    """(overlap, bucket_mb, progress) for an exchange over ``comm``: each as given, or by
    default overlapped in ``BUCKET_MB`` buckets where the ranks span nodes, else one
    bucket (0) after backward; given buckets or a given ``progress`` ask for overlap
    (collective when the placement decides)."""
    if overlap is None:
        asked = progress is not None or (bucket_mb is not None and bucket_mb > 0)
        overlap = asked or (comm.Get_size() > 1 and spans_nodes(comm))
    if bucket_mb is None:
        bucket_mb = BUCKET_MB if overlap else 0.0
    return overlap, bucket_mb, progress or PROGRESS[0]
