"""Gradient exchange: sum a flat buffer across the ranks of a communicator, in place.

The trainer calls ``exchange(buffer)`` once per step on its whole flat
gradient buffer; every strategy leaves the same sum on every rank.
"""
from __future__ import annotations

import numpy as np
from mpi4py import MPI

__all__ = ["MPIAllreduce", "make_exchange"]

# The ring (mpitrain.ring.RingAllreduce) is the other strategy; both are
# callables that sum a flat buffer in place over the ranks of their comm.


class MPIAllreduce:
    """MPI's own ``Allreduce``, in place and buffer-based (no pickling)."""

    name = "mpi"

    def __init__(self, comm: MPI.Comm):
        self.comm = comm

    def __call__(self, buffer: np.ndarray) -> None:
        """Replace ``buffer`` by its elementwise sum over all ranks."""
        self.comm.Allreduce(MPI.IN_PLACE, buffer, op=MPI.SUM)


def make_exchange(name: str, comm: MPI.Comm):
    """The exchange strategy called ``name`` ('mpi' or 'ring') on ``comm``."""
    if name == "mpi":
        return MPIAllreduce(comm)
    if name == "ring":
        from .ring import RingAllreduce

        return RingAllreduce(comm)
    raise ValueError(f"allreduce must be 'mpi' or 'ring', got {name!r}")
