"""The data checks run before step 1: every shard's structure, and optionally its values."""
from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

import numpy as np

from ..balance import rank_slice
from ..runtime import MpitrainError
from .hdf5 import dataset, mapped, open_h5
from .manifest import X_KEY, Y_KEY, Manifest, shard_path

__all__ = ["MODES", "check_dataset"]

MODES = ("full", "meta")  # check_data: scan the values too, or only the structure


def _check_shard(m: Manifest, split: str, k: int, rows_range: Optional[Tuple[int, int]],
                 values: bool, chunk_rows: int = 8192) -> Optional[str]:
    """Check one shard's structure and, over ``rows_range``, its labels (and with
    ``values`` its features); return the problem, or None."""
    name, rows = m.splits[split][k]
    path = shard_path(m.root, name)
    if not os.path.exists(path):
        return f"{path}: missing shard (listed in {m.path} as splits.{split}[{k}])"
    if not os.path.isfile(path):
        return f"{path}: not a file (listed in {m.path} as splits.{split}[{k}])"
    try:
        with open_h5(path) as f:
            x = dataset(f, X_KEY, path)
            y = dataset(f, Y_KEY, path)
            if x.ndim < 1 or x.shape[1:] != m.features:
                return (f"{path}: dataset 'x' has feature shape {x.shape[1:]}, "
                        f"expected {m.features} (from {m.path})")
            if x.dtype.newbyteorder("=") != m.dtype:  # either byte order: numpy converts
                return f"{path}: dataset 'x' is {x.dtype}, expected {m.dtype} (from {m.path})"
            if y.ndim != 1 or y.dtype.kind not in "iu":
                return f"{path}: dataset 'y' should be 1-D integer labels, got {y.dtype} {y.shape}"
            if x.shape[0] != rows or y.shape[0] != rows:
                return (f"{path}: expected {rows} rows (from {m.path}), "
                        f"'x' has {x.shape[0]} and 'y' has {y.shape[0]}")
            mapped(x, path), mapped(y, path)  # a truncated file fails here, not at step 1
            lo, hi = rows_range or (0, 0)
            for a in range(lo, hi, chunk_rows):
                b = min(hi, a + chunk_rows)
                labels = y[a:b]
                bad = np.flatnonzero((labels < 0) | (labels >= m.classes))
                if bad.size:
                    return (f"{path}: label {labels[bad[0]]} at row {a + bad[0]} is out of "
                            f"range, expected 0..{m.classes - 1}")
                if values:
                    block = x[a:b].reshape(b - a, -1)
                    finite = np.isfinite(block).all(axis=1)
                    if not finite.all():
                        row = a + int(np.argmin(finite))
                        return f"{path}: NaN or inf in 'x' at row {row}"
    except MpitrainError as exc:
        return str(exc)
    except Exception as exc:  # noqa: BLE001 - a damaged HDF5 file can raise anything
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return f"{path}: unreadable shard: {detail}"
    return None


def check_dataset(m: Manifest, comm, full: bool = True) -> None:
    """Check every shard of the dataset, the work split among the ranks of ``comm``.

    Structure (keys, shapes, dtypes, row counts, data in the file itself) of
    shard k is checked by rank ``k % size``; the labels are range-checked,
    and with ``full`` the features scanned for NaN and inf, each rank an equal
    share of the rows.  Collective: every rank raises the same error if any
    rank found a problem.
    """
    rank, size = comm.Get_rank(), comm.Get_size()
    todo: Dict[Tuple[str, int], Optional[Tuple[int, int]]] = {}
    k_all = 0
    for split in sorted(m.splits):
        for k, _ in enumerate(m.splits[split]):
            if k_all % size == rank:
                todo[(split, k)] = None
            k_all += 1
    # The rows to scan: those of all splits, concatenated, split evenly among ranks.
    total = sum(m.rows(s) for s in m.splits)
    lo, hi = rank_slice(total, rank, size)
    start = 0
    for split in sorted(m.splits):
        for k, (_, rows) in enumerate(m.splits[split]):
            a, b = max(lo, start) - start, min(hi, start + rows) - start
            if a < b:
                todo[(split, k)] = (a, b)
            start += rows
    problems = []
    for (split, k), rows_range in sorted(todo.items()):
        problem = _check_shard(m, split, k, rows_range, values=full)
        if problem:
            problems.append((split, k, problem))
    # A shard can be checked by two ranks (structure and values): report it once.
    problems = sorted({p[2]: p for part in comm.allgather(problems) for p in part}.values())
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise MpitrainError(problems[0][2] + more, everywhere=True)
