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
import time
from typing import List, Union

from mpi4py import MPI

__all__ = ["wait_yielding", "blocking_yields"]


def blocking_yields() -> bool:
    """Whether this MPI's blocking calls give the core away while they wait: Open MPI's
    with ``mpi_yield_when_idle`` (``threads.yield_when_idle`` sets it), so a helper
    thread may wait in them; MPICH's spin.  (Open MPI's persistent collectives, the
    other way to wait, cost several times the CPU of its blocking Allreduce.)"""
    from ..threads import yield_when_idle

    return MPI.get_vendor()[0] == "Open MPI" and yield_when_idle()


def wait_yielding(requests: Union[MPI.Request, List[MPI.Request]], nap: float = 0.0) -> None:
    """Wait for ``requests`` (one or a list), yielding the core between tests; with
    ``nap`` > 0, sleeping that many seconds instead (a rank that may wait long, a
    parameter server, gives its core away for good while it waits)."""
    done = requests.Test if isinstance(requests, MPI.Request) else (
        lambda: MPI.Request.Testall(requests))
    while not done():
        if nap > 0:
            time.sleep(nap)
        else:
            os.sched_yield()
