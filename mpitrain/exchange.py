"""Gradient exchange: sum a flat buffer across the ranks of a communicator, in place.

The trainer calls ``exchange(buffer)`` once per step on its whole flat
gradient buffer; every strategy leaves the same sum on every rank.
"""
from __future__ import annotations

import numpy as np
from mpi4py import MPI

__all__ = ["MPIAllreduce", "make_exchange"]


class MPIAllreduce:
    """MPI's own ``Allreduce``, in place and buffer-based (no pickling)."""

    name = "mpi"

    def __init__(self, comm: MPI.Comm):
        self.comm = comm

    def __call__(self, buffer: np.ndarray) -> None:
        """Replace ``buffer`` by its elementwise sum over all ranks."""
        self.comm.Allreduce(MPI.IN_PLACE, buffer, op=MPI.SUM)


def make_exchange(name: str, comm: MPI.Comm):
    """The exchange strategy called ``name`` on ``comm``."""
    if name == "mpi":
        return MPIAllreduce(comm)
    raise ValueError(f"allreduce must be 'mpi', got {name!r}")
