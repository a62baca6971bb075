"""``allreduce="auto"``: the fastest exchange that serves a job, and the reason for it.

Within a node the shared-memory sum (``shm``) does least: each rank adds its share
of every bucket straight from the others' memory and updates that share once for
the node, and across nodes the ranks holding the same share sum it with MPI's
``Allreduce`` (every rank of a node carries a part of the traffic, where one leader
per node would carry it all).  It
cannot serve everywhere, and ``auto`` then takes MPI's own ``Allreduce``: a job
that heals itself (ULFM does not make shared-memory windows fault tolerant), a
reproducible run across nodes or in a pipeline (its fixed-order sum replaces the
exchange's, and adds from a node's shared memory only where one node holds every
rank of a data-parallel job whose groups leave each rank one term of it), an
exchange driven by MPI requests (``progress`` test), nodes holding different numbers
of ranks;
a node of one rank has nothing to share.
A 16-bit wire travels on mpitrain's ring only.
"""
from __future__ import annotations

from typing import Optional, Tuple

from mpi4py import MPI

from .ordered import most_terms
from .shm import ShmAllreduce

__all__ = ["choose"]


def choose(comm: MPI.Comm, *, wire: Optional[str] = None, progress: Optional[str] = None,
           heals: bool = False, ordered: int = 0,
           ordered_on_shm: bool = False) -> Tuple[str, str]:
    """(the algorithm ``auto`` means on ``comm``, why), the same on every rank
    (collective: the ranks per node are counted on ``comm``).  ``ordered``: the groups
    of a reproducible run (0: not reproducible), whose fixed-order sum runs on MPI, or
    (``ordered_on_shm``: a data-parallel trainer's, not a pipeline stage's) on a node's
    shared memory where one node holds every rank and each rank one term of the sum
    (``comm.ordered``)."""
    if wire is not None:
        return "ring", f"a {wire} wire travels on mpitrain's ring only"
    if heals:
        return "mpi", "a job that heals: ULFM does not make shared-memory windows fault tolerant"
    if ordered and not ordered_on_shm:
        return "mpi", "reproducible: the fixed-order sum runs on MPI"
    if progress is not None and progress not in ShmAllreduce.progress:
        return "mpi", f"progress {progress} drives MPI requests"
    if comm.Get_size() == 1:
        return "mpi", "one rank: nothing to sum"
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    local, leader = node.Get_size(), node.Get_rank() == 0
    node.Free()
    most = comm.allreduce(local, op=MPI.MAX)
    fewest = comm.allreduce(local, op=MPI.MIN)
    nodes = comm.allreduce(int(leader), op=MPI.SUM)
    if most == 1:
        return "mpi", "one rank per node: nothing to share within a node"
    if fewest != most:
        return "mpi", (f"the nodes hold {fewest} to {most} ranks: shm needs the same number "
                       "on every node")
    if ordered and nodes > 1:
        return "mpi", "reproducible across nodes: the fixed-order sum runs on MPI"
    terms = most_terms(int(ordered), comm.Get_size()) if ordered else 1
    if terms > 1:
        return "mpi", (f"reproducible: {int(ordered)} groups on {comm.Get_size()} ranks leave a "
                       f"rank {terms} subtrees of the fixed-order sum (it adds from shared "
                       "memory where each rank holds one)")
    if nodes == 1:
        return "shm", f"the {local} ranks share a node's memory" + (
            " (the fixed-order sum adds from it)" if ordered else "")
    return "shm", (f"the {local} ranks of each node share its memory; each sums its "
                   f"share across the {nodes} nodes with MPI's Allreduce")
