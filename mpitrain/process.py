"""What this process needs set before it trains, in one call: ``mpitrain.init()``.

Importing mpitrain changes nothing in the process.  ``init()`` makes four
settings, each left alone where the user made their own:

- **BLAS/OpenMP threads** per rank: the cores each rank has (``threads``);
  set before numpy loads, or afterwards on the loaded library directly
  (OpenBLAS; others through threadpoolctl).  A ``*_NUM_THREADS`` variable the
  user set wins.
- **Open MPI's idle waits yield the core** (``OMPI_MCA_mpi_yield_when_idle``):
  read by ``MPI_Init``, so it counts only if ``init()`` runs before
  ``from mpi4py import MPI``.  A value the user set wins; MPICH ignores it.
- **glibc's malloc keeps freed memory** for the next step (``malloc``);
  ``MPITRAIN_MALLOC=system`` keeps glibc's defaults.
- **An uncaught exception ends the whole job** (``sys.excepthook``), as
  ``python -m mpi4py`` does: the message printed once, the job aborted if one
  rank raised it (the others would wait for ever in their next collective), the
  error's exit status if every rank did (2: bad input).  Installed only if no
  one replaced the default hook.

The command line, ``fit`` and the trainers call it; calling it again changes
nothing.  ``report()`` says what each setting is (``mpitrain info`` prints it).
"""
from __future__ import annotations

import sys
from typing import Dict, List, Tuple

from .malloc import keep_freed_memory
from .threads import limit_threads, thread_report, yield_when_idle

__all__ = ["init", "report"]

_DONE: Dict[str, str] = {}


def init(*, excepthook: bool = True) -> Dict[str, str]:
    """Make the process's settings (see the module); idempotent.  ``excepthook=False``
    leaves uncaught exceptions to Python.  Returns ``report()``."""
    if not _DONE:
        limit_threads()
        yield_when_idle()
        keep_freed_memory()
        _DONE["hook"] = "not installed (init(excepthook=False))"
    if excepthook and _DONE["hook"].startswith("not installed"):
        if sys.excepthook is sys.__excepthook__:
            sys.excepthook = _end_job_hook
            _DONE["hook"] = "ends the job (message once; MPI_Abort if one rank raised)"
        elif sys.excepthook is not _end_job_hook:
            _DONE["hook"] = "the program's own (left alone)"
    return dict(report())


def report() -> List[Tuple[str, str]]:
    """(setting, what it is) for each of ``init``'s settings."""
    from .malloc import malloc_report
    from .threads import YIELD_VAR

    import os

    yields = yield_when_idle() if _DONE else None
    return [("threads per rank", thread_report()),
            ("Open MPI waits", "yield the core" if yields else
             f"spin ({YIELD_VAR}={os.environ.get(YIELD_VAR, 'unset')}; init() ran after MPI "
             "started, or the user chose)" if yields is False else "not set (init() not run)"),
            ("malloc", malloc_report() if _DONE else "the system's defaults (init() not run)"),
            ("uncaught errors", _DONE.get("hook", "Python's default (init() not run)"))]


def _end_job_hook(kind, exc, trace) -> None:
    """``sys.excepthook``: say the error once and end the job (``runtime.end_job``)."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is None or not mpi.Is_initialized() or mpi.Is_finalized():
        sys.__excepthook__(kind, exc, trace)  # no MPI job to end: Python's own report
        return
    from .runtime import MpitrainError, end_job, job_comm

    code = end_job(exc, job_comm(mpi.COMM_WORLD), trace=trace)
    raise SystemExit(exc.code if code is None and isinstance(exc, MpitrainError) else code)
