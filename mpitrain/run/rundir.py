"""The run's directory: unique per run, holding its metrics and a record of each launch.

Unless the run names one (``run_dir``, else ``ckpt_dir``), rank 0 makes
``runs/DATE-TIME`` (with the job id under a resource manager), adding
``-2``, ``-3``... when another run took the name first: ``mkdir`` is atomic,
so two runs started in the same second, or the tasks of a Slurm array, never
share a directory.  Every launch appends one line to ``RUN_DIR/run.jsonl``:
when, the resolved configuration, the mpitrain version, the MPI library,
the ranks, the host and the command.
"""
from __future__ import annotations

import datetime
import json
import os
import socket
import sys
import time
from typing import Any, Dict

from ..runtime import ConfigError, library_version, literal, on_root

__all__ = ["open_run_dir"]


def _job() -> str:
    """'-j1234_5' under Slurm (job, array task), '' elsewhere."""
    job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    if not job:
        return ""
    task = os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"-j{job}" + (f"_{task}" if task and os.environ.get("SLURM_ARRAY_JOB_ID") else "")


def _unique(base: str) -> str:
    """``base``, or ``base-2``, ``base-3``...: the first that this call created."""
    os.makedirs(os.path.dirname(base) or ".", exist_ok=True)
    for k in range(1, 10000):
        path = base if k == 1 else f"{base}-{k}"
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue
    raise OSError(f"{base}: 10,000 run directories of that name already")


def open_run_dir(config: Dict[str, Any], comm) -> str:
    """Make (or open) the run's directory and record this launch there (collective);
    ``config`` is the run's resolved configuration (``Config.to_dict()``)."""

    def make() -> str:
        chosen = config.get("run_dir") or config.get("ckpt_dir")
        try:
            if chosen:
                os.makedirs(chosen, exist_ok=True)
                path = chosen
            else:
                path = _unique(os.path.join("runs", time.strftime("%Y%m%d-%H%M%S") + _job()))
            record = {"started": datetime.datetime.now(datetime.timezone.utc).isoformat(
                          timespec="seconds"),
                      "mpitrain_version": _version(), "mpi_library": library_version(),
                      "ranks": comm.Get_size(), "host": socket.gethostname(),
                      "job": os.environ.get("SLURM_JOB_ID", ""), "argv": sys.argv,
                      "config": config}
            with open(os.path.join(path, "run.jsonl"), "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as exc:
            where = "{run_dir}" if config.get("run_dir") else (
                "{ckpt_dir}" if config.get("ckpt_dir") else "the run directory under")
            target = chosen or "runs/"
            raise ConfigError(f"{where} {literal(target)}: cannot write there: "
                              f"{literal(str(exc))}") from None
        return path

    return on_root(comm, make)


def _version() -> str:
    from .. import __version__

    return __version__
