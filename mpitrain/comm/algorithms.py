"""The all-reduce algorithms an exchange can use, and what each can do.

MPI's own ``Allreduce``, mpitrain's ring (``ring.py``) and the shared-memory
all-reduce (``shm.py``) each sum a slice of a flat buffer in place and declare
their capabilities (``wires``: 16-bit formats they can send; ``progress``: how
an overlapped exchange can move; ``sharded``: whether a node's ranks can share
one copy of the model).  ``check_options`` refuses what one cannot do, for the
configuration and for ``comm.exchange.Exchange`` alike.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
from mpi4py import MPI

from ..runtime import ConfigError
from .codecs import missing
from .ring import RingAllreduce
from .shm import ShmAllreduce

__all__ = ["MPIAllreduce", "ALGORITHMS", "PROGRESS", "check_options", "make_allreduce"]

PROGRESS = ("thread", "test", "none")  # the first is the default


class MPIAllreduce:
    """MPI's own ``Allreduce``, in place and buffer-based (no pickling)."""

    name = "mpi"
    wires: Tuple[str, ...] = ()  # MPI's Allreduce would also add in 16 bits
    progress = PROGRESS
    sharded = False

    def __init__(self, comm: MPI.Comm):
        self.comm = comm

    def __call__(self, buffer: np.ndarray) -> None:
        """Replace ``buffer`` by its elementwise sum over all ranks."""
        self.comm.Allreduce(MPI.IN_PLACE, buffer, op=MPI.SUM)

    reduce = __call__  # nobody reads the buffer afterwards: nothing to fence

    def persistent(self, buffer: np.ndarray) -> MPI.Prequest:
        """A persistent in-place sum of ``buffer`` (MPI-4 ``Allreduce_init``; collective)."""
        return self.comm.Allreduce_init(MPI.IN_PLACE, buffer, op=MPI.SUM)

    def fence(self) -> None:
        """Nothing to wait for: the sum is complete when the call returns."""

    def close(self) -> None:
        """Nothing to free."""


ALGORITHMS = {"mpi": MPIAllreduce, "ring": RingAllreduce, "shm": ShmAllreduce}


def check_options(algorithm: str, progress: Optional[str] = None,
                  wire: Optional[str] = None) -> None:
    """Refuse what ``algorithm`` cannot do, naming the parameters (ConfigError);
    ``progress`` None: the default, thread."""
    progress = progress or PROGRESS[0]
    if algorithm not in ALGORITHMS:
        raise ConfigError(f"{{allreduce}}: expected one of {', '.join(ALGORITHMS)}, got "
                          f"{algorithm!r}", ["allreduce"])
    cls = ALGORITHMS[algorithm]
    if progress not in PROGRESS:
        raise ConfigError(f"{{progress}}: expected one of {', '.join(PROGRESS)}, got "
                          f"{progress!r}", ["progress"])
    if progress not in cls.progress:
        raise ConfigError(f"{{progress}} {progress} drives MPI requests; {{allreduce}} "
                          f"{algorithm} progresses on its own thread ({{progress}} thread)",
                          ["progress", "allreduce"])
    if wire is not None:
        if wire not in cls.wires:
            why = ("MPI's Allreduce would also add in 16 bits" if algorithm == "mpi"
                   else "the shm all-reduce sends nothing")
            raise ConfigError(f"{{grad_dtype}} {wire} needs {{allreduce}} ring (got "
                              f"{algorithm}): {why}", ["grad_dtype", "allreduce"])
        needs = missing(wire)
        if needs:
            raise ConfigError(f"{{grad_dtype}} {wire} needs {needs}", ["grad_dtype"])


def make_allreduce(name: str, comm: MPI.Comm, count: int = 0, dtype=np.float32,
                   wire: Optional[str] = None):
    """The blocking all-reduce called ``name`` on ``comm``: call it on an array (shm:
    on a slice of its own ``.buffer`` of ``count`` items of ``dtype``)."""
    check_options(name, wire=wire)
    if name == "shm":
        return ShmAllreduce(comm, count, dtype)
    if name == "ring":
        return RingAllreduce(comm, wire=wire)
    return MPIAllreduce(comm)
