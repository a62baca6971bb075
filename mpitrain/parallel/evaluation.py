"""Evaluation: the loss and the task's metrics over a split, summed exactly over ranks.

One loop for every trainer and for ``mpitrain evaluate``: each rank takes
its ``rank_slice`` of the rows, in chunks; each chunk gives a float64 row
``[loss sum, *task sums]`` (``chunk_row``); the rows are added in chunk order,
then over the ranks (``Allreduce``), and turned into metrics.  Reproducible
runs cut the split into fixed chunks instead and add them in chunk order
across ranks (``parallel.reproducible.gathered_sums``); a pipeline carries
each chunk through its stages; both use ``chunk_row``.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
from mpi4py import MPI

from ..balance import rank_slice
from ..model.tasks import Task

__all__ = ["chunk_row", "slices", "evaluate_split", "metrics_of", "EVAL_BLOCK"]

EVAL_BLOCK = 4096  # rows per chunk


def chunk_row(out: np.ndarray, y: np.ndarray, loss, task: Task) -> np.ndarray:
    """``[loss sum, *task sums]`` of one chunk's outputs ``out`` against targets ``y``."""
    row = np.empty(1 + task.width)
    row[0] = loss(out, task.targets(y, out.dtype), 1.0)[0]
    row[1:] = task.sums(out, y)
    return row


def slices(n: int, part: int, parts: int, block: int = EVAL_BLOCK) -> List[Tuple[int, int]]:
    """Part ``part`` of ``parts`` of ``n`` rows, in chunks of ``block``."""
    lo, hi = rank_slice(n, part, parts)
    return [(a, min(hi, a + block)) for a in range(lo, hi, block)]


def metrics_of(sums: np.ndarray, n: int, task: Task) -> Dict[str, object]:
    """{"loss": mean, task metrics...} from the global ``[loss sum, *task sums]``."""
    return {"loss": float(sums[0]) / n, **task.summarize(sums[1:], n)}


def evaluate_split(forward: Callable[[np.ndarray], np.ndarray], loss, task: Task, split,
                   comm: MPI.Comm, block: int = EVAL_BLOCK,
                   on_chunk: Optional[Callable[[], None]] = None) -> Dict[str, object]:
    """The metrics of ``forward`` (inputs -> outputs) on every row of ``split``, each rank
    of ``comm`` a slice (collective)."""
    sums = np.zeros(1 + task.width)
    for a, b in slices(len(split), comm.Get_rank(), comm.Get_size(), block):
        x, y = split.read_range(a, b)
        sums += chunk_row(forward(x), y, loss, task)  # chunk by chunk, in order
        if on_chunk is not None:
            on_chunk()
    comm.Allreduce(MPI.IN_PLACE, sums, op=MPI.SUM)
    return metrics_of(sums, len(split), task)
