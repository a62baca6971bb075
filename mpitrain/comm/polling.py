"""Waiting for MPI requests without taking a core from the ranks that compute.

MPICH's blocking calls spin.  A helper thread that waits in a blocking
``Allreduce`` for a peer that is still computing spins on a core the
computing threads (its own rank's, or a neighbour's on a full node) need;
on this kind of machine, two ranks on two cores, that showed as 15-20% of a
step.  Testing the request and yielding the core between tests
(``sched_yield``) gives the core to any thread that can run, and costs
nothing when none can: the test comes straight back.
"""
from __future__ import annotations

import os

from mpi4py import MPI

__all__ = ["wait_yielding"]


def wait_yielding(request: MPI.Request) -> None:
    """Wait for ``request``, yielding the core between tests."""
    while not request.Test():
        os.sched_yield()
