"""Threads per rank: BLAS and OpenMP limited to the cores each rank has.

NumPy's BLAS starts one thread per core by default; two ranks on two cores,
each with two BLAS threads, oversubscribe the cores and spin against each other.  The thread
variables must be set before the BLAS library is loaded, so this module
imports no numpy, and ``import mpitrain`` calls ``limit_threads`` first.

When numpy was imported before mpitrain, its BLAS has already read the
environment; ``blas_control`` then sets the loaded library's thread count
directly: OpenBLAS through its own functions, another BLAS (and the OpenMP
runtimes) through threadpoolctl (optional: ``pip install threadpoolctl``, the
``threads`` extra).  ``one_blas_thread`` uses the same control.
"""
from __future__ import annotations

import ctypes
import os
import sys
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple

__all__ = ["THREAD_VARS", "limit_threads", "thread_report", "blas_threads", "child_env",
           "one_blas_thread", "blas_control", "single_threaded_env", "BlasLib",
           "openblas_handles", "openblas_symbols", "numpy_is_openblas"]

# Every variable a BLAS or OpenMP runtime numpy may be linked with reads.
THREAD_VARS = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "BLIS_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)

# What limit_threads decided, for `mpitrain info` and the run banner.
_THREADS: Dict[str, object] = {}


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


def _pools() -> Optional[List[dict]]:
    """threadpoolctl's view of the loaded BLAS/OpenMP libraries, or None without it."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    return threadpool_info()


def blas_threads() -> Optional[int]:
    """Threads of the loaded BLAS, read from the library (None if unknown)."""
    libs = blas_control()
    return max(lib.get() for lib in libs) if libs else None


class BlasLib(NamedTuple):
    """A loaded BLAS library's thread count, got and set directly."""

    get: Callable[[], int]
    set: Callable[[int], None]
    # Python threads may call it at once, each at the count set here: OpenBLAS built
    # with pthreads or none (with OpenMP the count is each calling thread's own).
    concurrent: bool


_CONTROL: List[List[BlasLib]] = []  # found once: blas_control


def _numpy_blas() -> str:
    """The name of the BLAS numpy was built with ("" if numpy does not say)."""
    try:
        import numpy

        return str(numpy.__config__.CONFIG["Build Dependencies"]["blas"]["name"]).lower()
    except (AttributeError, KeyError, TypeError):
        return ""


def openblas_handles() -> List[ctypes.CDLL]:
    """Every OpenBLAS this process has loaded (numpy's wheels carry one named
    scipy_openblas, with a 64_ suffix), found in /proc/self/maps."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {ln.split()[-1] for ln in maps if "openblas" in ln.lower() and "/" in ln}
    except OSError:
        return []
    found = []
    for path in sorted(paths):
        try:
            found.append(ctypes.CDLL(path))
        except OSError:
            continue
    return found


def numpy_is_openblas() -> bool:
    """Whether numpy's BLAS is an OpenBLAS (or numpy does not say)."""
    name = _numpy_blas()
    return not name or "openblas" in name


def openblas_symbols(lib: ctypes.CDLL, *names: str) -> Optional[List[Callable]]:
    """``lib``'s functions ``names`` under the one naming its build uses (numpy's wheels
    prefix scipy_ and suffix 64_), or None if it lacks one of them."""
    for pre, suf in (("scipy_", "64_"), ("scipy_", ""), ("", "64_"), ("", "")):
        found = [getattr(lib, f"{pre}{name}{suf}", None) for name in names]
        if all(f is not None for f in found):
            return found
    return None


def _openblas_libs() -> List[BlasLib]:
    """Every loaded OpenBLAS, with its thread controls."""
    found = []
    for lib in openblas_handles():
        controls = openblas_symbols(lib, "openblas_get_num_threads", "openblas_set_num_threads")
        if controls is None:
            continue
        (get, put), parallel = controls, openblas_symbols(lib, "openblas_get_parallel")
        get.restype, put.argtypes = ctypes.c_int, [ctypes.c_int]
        if parallel is not None:
            parallel[0].restype = ctypes.c_int
        found.append(BlasLib(get, put, parallel is not None and parallel[0]() in (0, 1)))
    return found


def _pool_libs() -> List[BlasLib]:
    """The BLAS libraries threadpoolctl finds (MKL, BLIS, Accelerate...); none without it."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return []
    return [BlasLib(lambda c=c: int(c.num_threads), c.set_num_threads,
                    c.internal_api == "openblas"
                    and getattr(c, "threading_layer", "openmp") != "openmp")
            for c in ThreadpoolController().select(user_api="blas").lib_controllers]


def blas_control() -> List[BlasLib]:
    """The loaded BLAS libraries whose thread count mpitrain can set (after numpy loads)."""
    if not _CONTROL:
        # another BLAS (MKL...) may be numpy's, an OpenBLAS loaded
        libs = _openblas_libs() if numpy_is_openblas() else []
        _CONTROL.append(libs or _pool_libs())
    return _CONTROL[0]


def single_threaded_env() -> bool:
    """Every BLAS/OpenMP thread variable is 1 (or unset, and so 1 only by default)."""
    return all(os.environ.get(var, "1") == "1" for var in THREAD_VARS
               if var != "NUMEXPR_NUM_THREADS")


@contextmanager
def one_blas_thread() -> Iterator[int]:
    """Run the block with one BLAS thread, then restore each library's count; yields
    how many Python threads may compute at once at one BLAS thread each.

    A matrix product's bits depend on the BLAS's thread count (measured with
    numpy's OpenBLAS: 1 and 2 threads differ in every row from 5 rows up), so
    ``--reproducible`` computes at one thread on any layout; one rank alone would
    otherwise use all the node's cores and get other bits than 2 ranks.  The
    count before becomes the Python threads' number, where the library allows.
    """
    libs = blas_control()
    before = [lib.get() for lib in libs]
    for lib, count in zip(libs, before):
        if count != 1:
            lib.set(1)
    try:
        yield max(before) if libs and all(lib.concurrent for lib in libs) else 1
    finally:
        for lib, count in zip(libs, before):
            if count != 1:
                lib.set(count)


def limit_threads() -> Dict[str, object]:
    """Set BLAS/OpenMP threads to the cores available per rank, unless the user set them.

    If the launcher bound this rank to a subset of the cores (fewer than its
    parent process may use), that subset is the rank's share; otherwise the
    cores this process may use are divided by the number of ranks on the node.
    A thread variable the user set is left alone.
    """
    if _THREADS:
        return _THREADS
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        cores = os.cpu_count() or 1
    local, source = _local_ranks()
    # Bound by the launcher: this rank may use fewer cores than the process that started
    # it (the launcher's proxy, Slurm's step daemon).  A container's or a job's cpuset
    # limits both alike, and its cores are then shared by the ranks on the node.
    try:
        parent = len(os.sched_getaffinity(os.getppid()))
    except (AttributeError, OSError):
        parent = os.cpu_count() or cores
    bound = cores < parent
    threads = cores if bound else max(1, cores // local)
    user = {v: os.environ[v] for v in THREAD_VARS if v in os.environ}
    for var in THREAD_VARS:
        os.environ.setdefault(var, str(threads))
    _THREADS["ours"] = [v for v in THREAD_VARS if v not in user]
    if user:
        how = "set by the user (" + ", ".join(f"{k}={v}" for k, v in user.items()) + ")"
    elif bound:
        how = f"{cores} cores bound to this rank"
    else:
        how = f"{cores} cores / {local} ranks on this node ({source})"
    if "numpy" in sys.modules and "OPENBLAS_NUM_THREADS" not in user \
            and "OMP_NUM_THREADS" not in user:
        # numpy's BLAS read the environment when it loaded: tell it directly (and the
        # OpenMP runtimes, through threadpoolctl).
        libs = blas_control()
        for lib in libs:
            lib.set(threads)
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            pass
        else:
            threadpool_limits(threads, user_api="openmp")
        if libs:
            how += f"; numpy was imported first, so its BLAS was set to {threads} directly"
        else:
            how += ("; numpy was imported before mpitrain, so its BLAS may ignore this "
                    "(import mpitrain first, or pip install threadpoolctl)")
    omp = os.environ["OMP_NUM_THREADS"]
    _THREADS.update(threads=int(omp) if omp.isdigit() else omp, how=how)
    return _THREADS


# Open MPI's blocking calls spin while they wait, as MPICH's do, unless told to yield
# the core: mpitrain's helper threads wait in them beside the threads that compute
# (measured on 2 cores: 0.85 of the ceiling against 0.76-0.78 spinning).  Read by
# MPI_Init, so set at import, before mpi4py initialises MPI; MPICH ignores it.
YIELD_VAR = "OMPI_MCA_mpi_yield_when_idle"


_YIELDS: Dict[str, bool] = {}


def yield_when_idle() -> bool:
    """Ask Open MPI's waits to yield the core, unless the user chose; True if they will
    (the user asked, or mpitrain did before MPI started: too late once mpi4py.MPI is
    imported, as it initialises MPI)."""
    if "yields" not in _YIELDS:
        if YIELD_VAR in os.environ:  # the user's (in the launch environment)
            _YIELDS["yields"] = os.environ[YIELD_VAR] not in ("0", "false")
        else:
            os.environ[YIELD_VAR] = "1"
            _YIELDS["yields"] = "mpi4py.MPI" not in sys.modules
    return _YIELDS["yields"]


def child_env() -> Dict[str, str]:
    """This process's environment for launching another MPI job: without the thread
    counts mpitrain chose for this process (the child's ranks choose their own) and
    without this process's MPI launcher state."""
    ours = set(_THREADS.get("ours", ()))
    keep = ("OMPI_ALLOW_RUN_AS_ROOT", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM")  # the user's choice
    return {k: v for k, v in os.environ.items()
            if k not in ours and (k in keep or not k.startswith(
                ("PMI_", "MPI_LOCAL", "HYDRA_", "OMPI_", "PMIX_")))}


def thread_report() -> str:
    """One line: the threads per rank, how the number was chosen, and what the loaded
    libraries actually run (each with threadpoolctl, else the BLAS)."""
    info = limit_threads()
    pools = _pools()
    if pools:
        actual = " [" + ", ".join(f"{p['internal_api']}: {p['num_threads']}"
                                  for p in pools) + "]"
    else:
        actual = f" [blas: {blas_threads()}]" if blas_threads() is not None else ""
    return f"{info['threads']} ({info['how']}){actual}"
