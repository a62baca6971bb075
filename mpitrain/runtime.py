"""Process start-up: threads per rank, the job-wide error type, abort-on-error.

This module must not import numpy at module level: ``limit_threads`` has to
run before the BLAS library is loaded, or its thread count is already fixed.
"""
from __future__ import annotations

import os
import sys
import traceback
from typing import Callable, Dict, Optional, Tuple

__all__ = ["MpitrainError", "limit_threads", "thread_report", "run_or_abort"]

# Every variable a BLAS or OpenMP runtime numpy may be linked with reads.
THREAD_VARS = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "BLIS_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)

# What limit_threads decided, for `mpitrain info` and the run summary.
_THREADS: Dict[str, object] = {}


class MpitrainError(Exception):
    """A user-facing error: bad input, a bad option, a diverged run.

    ``everywhere=True`` means every rank raised the same error at the same
    point (it was agreed by a collective), so rank 0 alone prints it and the
    ranks exit together; otherwise the raising rank prints it and aborts the
    job.
    """

    def __init__(self, message: str, *, everywhere: bool = False):
        super().__init__(message)
        self.everywhere = everywhere


def _local_ranks() -> Tuple[int, str]:
    """Ranks on this node, from the launcher's environment (1 if unknown)."""
    for var in ("MPI_LOCALNRANKS",  # MPICH Hydra
                "OMPI_COMM_WORLD_LOCAL_SIZE",  # Open MPI
                "MV2_COMM_WORLD_LOCAL_SIZE",  # MVAPICH
                "PALS_LOCAL_SIZE"):  # Cray PALS
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) > 0:
            return int(value), var
    # srun: SLURM_STEP_TASKS_PER_NODE is e.g. "4" or "4(x2),3".
    tasks = os.environ.get("SLURM_STEP_TASKS_PER_NODE", "")
    first = tasks.split("(")[0].split(",")[0]
    if first.isdigit() and int(first) > 0:
        return int(first), "SLURM_STEP_TASKS_PER_NODE"
    return 1, "no launcher"


def limit_threads() -> Dict[str, object]:
    """Set BLAS/OpenMP threads to the cores available per rank, unless set.

    If the launcher bound this rank to a subset of the cores, that subset is
    the rank's share; otherwise the node's cores are divided by the number of
    ranks on the node.  A thread variable the user set is left alone.
    """
    if _THREADS:
        return _THREADS
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        cores = os.cpu_count() or 1
    local, source = _local_ranks()
    bound = cores < (os.cpu_count() or cores)
    threads = cores if bound else max(1, cores // local)
    user = {v: os.environ[v] for v in THREAD_VARS if v in os.environ}
    for var in THREAD_VARS:
        os.environ.setdefault(var, str(threads))
    late = "numpy" in sys.modules
    if user:
        how = "set by the user (" + ", ".join(f"{k}={v}" for k, v in user.items()) + ")"
    elif bound:
        how = f"{cores} cores bound to this rank"
    else:
        how = f"{cores} cores / {local} ranks on this node ({source})"
    if late:
        how += "; numpy was imported before mpitrain, so BLAS may ignore it"
    omp = os.environ["OMP_NUM_THREADS"]
    _THREADS.update(threads=int(omp) if omp.isdigit() else omp, how=how)
    return _THREADS


def thread_report() -> str:
    """One line: the threads per rank and how the number was chosen."""
    info = limit_threads()
    actual = ""
    try:  # threadpoolctl is optional; it reads the loaded BLAS itself.
        from threadpoolctl import threadpool_info

        pools = threadpool_info()
        if pools:
            actual = " [" + ", ".join(
                f"{p['internal_api']}: {p['num_threads']}" for p in pools) + "]"
    except ImportError:
        pass
    return f"{info['threads']} ({info['how']}){actual}"


def _wait_all(comm, seconds: float) -> bool:
    """A barrier that gives up after ``seconds``; True if every rank arrived."""
    import time

    request = comm.Ibarrier()
    deadline = time.monotonic() + seconds
    while not request.Test():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)  # polling an error path: no hurry, spare the core
    return True


def run_or_abort(fn: Callable[[], Optional[int]], comm=None) -> int:
    """Run ``fn``; on any exception print it once and end the whole job.

    An error raised on one rank aborts every rank with ``MPI_Abort`` (as
    ``python -m mpi4py`` does), because the other ranks would otherwise wait
    forever in their next collective and burn the allocation.  An error
    raised identically on every rank (``MpitrainError(everywhere=True)``) is
    printed by rank 0 and all ranks exit with status 2 together.
    """
    try:
        return int(fn() or 0)
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 - any error must end the job
        from mpi4py import MPI

        comm = comm if comm is not None else MPI.COMM_WORLD
        rank, size = comm.Get_rank(), comm.Get_size()
        where = f" (rank {rank} of {size})" if size > 1 else ""
        if isinstance(exc, MpitrainError):
            if exc.everywhere:
                if rank == 0:
                    print(f"mpitrain: error: {exc}", file=sys.stderr, flush=True)
                # Every rank should be here (the error was agreed); should one
                # not arrive, abort rather than wait for it forever.
                if _wait_all(comm, seconds=60):
                    raise SystemExit(2) from None
                code = 2
            else:
                print(f"mpitrain: error{where}: {exc}", file=sys.stderr, flush=True)
                code = 2
        elif isinstance(exc, KeyboardInterrupt):
            print(f"mpitrain: interrupted{where}", file=sys.stderr, flush=True)
            code = 130
        else:
            traceback.print_exc()
            print(f"mpitrain: error{where}: {type(exc).__name__}: {exc}",
                  file=sys.stderr, flush=True)
            code = 1
        sys.stdout.flush()
        if size > 1:
            comm.Abort(code)
        return code
