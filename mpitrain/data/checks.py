"""The data checks run before step 1: every entry's structure, its targets (labels in range,
finite regression targets, 0/1 multilabel targets), and optionally its features' values."""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..balance import rank_slice
from ..runtime import MpitrainError
from .hdf5 import dataset, mapped, open_h5, unwritten
from .manifest import Manifest, shard_path
from .progress import Ticker

__all__ = ["MODES", "check_dataset"]

MODES = ("full", "meta")  # check_data: scan the values too, or only the structure


def _pieces(ranges: List[Tuple[int, int]], a: int, b: int) -> List[Tuple[int, int, int]]:
    """Local samples [a, b) of an entry with row ``ranges``, as (local start, row lo, row hi)."""
    out, start = [], 0
    for lo, hi in ranges:
        x0, x1 = max(a, start), min(b, start + hi - lo)
        if x0 < x1:
            out.append((x0, lo + x0 - start, lo + x1 - start))
        start += hi - lo
    return out


def _targets_problem(m: Manifest, y, path: str, key: str) -> Optional[str]:
    """What is wrong with the structure of the targets dataset ``y``, or None."""
    task = m.task
    if task["name"] == "classification":
        if y.ndim != 1 or y.dtype.kind not in "iu":
            return (f"{path}: dataset {key!r} should be 1-D integer labels, got {y.dtype} "
                    f"{y.shape}")
        return None
    shape = tuple(task.get("shape") or [])
    if y.shape[1:] != shape:
        return (f"{path}: dataset {key!r} has target shape {y.shape[1:]}, expected {shape} "
                f"(from {m.path})")
    if y.dtype.kind not in ("fiub" if task["name"] == "multilabel" else "fiu"):
        return f"{path}: dataset {key!r} should hold numbers, got {y.dtype}"
    return None


def _targets_values(m: Manifest, t: np.ndarray, path: str, key: str, row0: int) -> Optional[str]:
    """What is wrong with the target values ``t`` (rows from ``row0``), or None."""
    task = m.task
    flat = t.reshape(len(t), -1)
    if task["name"] == "classification":
        bad = np.flatnonzero((t < 0) | (t >= m.classes))
        if bad.size:
            return (f"{path}: label {t[bad[0]]} at row {row0 + bad[0]} is out of range, "
                    f"expected 0..{m.classes - 1}")
    elif task["name"] == "multilabel":
        bad = np.flatnonzero(~np.isin(flat, (0, 1)).all(axis=1))
        if bad.size:
            return (f"{path}: dataset {key!r} row {row0 + bad[0]} holds "
                    f"{flat[bad[0]][~np.isin(flat[bad[0]], (0, 1))][0]!r}; multilabel "
                    "targets must be 0 or 1")
    else:
        bad = np.flatnonzero(~np.isfinite(flat).all(axis=1))
        if bad.size:
            return f"{path}: NaN or inf in target {key!r} at row {row0 + bad[0]}"
    return None


def _check_shard(m: Manifest, split: str, k: int, rows_range: Optional[Tuple[int, int]],
                 values: bool, chunk_rows: int = 8192,
                 ticker: Optional[Ticker] = None) -> Optional[str]:
    """Check one entry's structure and, over its local samples ``rows_range``, its targets
    (and with ``values`` its features); return the problem, or None."""
    e = m.splits[split][k]
    path = shard_path(m.root, e.file)
    if not os.path.exists(path):
        return f"{path}: missing shard (listed in {m.path} as splits.{split}[{k}])"
    if not os.path.isfile(path):
        return f"{path}: not a file (listed in {m.path} as splits.{split}[{k}])"
    try:
        with open_h5(path) as f:
            x = dataset(f, e.x, path)
            y = dataset(f, e.y, path)
            if x.ndim < 1 or x.shape[1:] != m.features:
                return (f"{path}: dataset {e.x!r} has feature shape {x.shape[1:]}, "
                        f"expected {m.features} (from {m.path})")
            if x.dtype.newbyteorder("=") != m.dtype:  # either byte order: numpy converts
                return (f"{path}: dataset {e.x!r} is {x.dtype}, expected {m.dtype} "
                        f"(from {m.path})")
            problem = _targets_problem(m, y, path, e.y)
            if problem:
                return problem
            reach = max((hi for _, hi in e.ranges), default=0)
            if e.ranges == [(0, e.rows)] and (x.shape[0] != e.rows or y.shape[0] != e.rows):
                return (f"{path}: expected {e.rows} rows (from {m.path}), "
                        f"{e.x!r} has {x.shape[0]} and {e.y!r} has {y.shape[0]}")
            if x.shape[0] < reach or y.shape[0] < reach:
                return (f"{path}: splits.{split}[{k}] reaches row {reach} (from {m.path}), "
                        f"but {e.x!r} has {x.shape[0]} rows and {e.y!r} {y.shape[0]}")
            mapped(x, path), mapped(y, path)  # a truncated file fails here, not at step 1
            problem = unwritten(x, path) or unwritten(y, path)
            if problem:
                return problem
            lo, hi = rows_range or (0, 0)
            for _, r0, r1 in _pieces(e.ranges, lo, hi):
                for a in range(r0, r1, chunk_rows):
                    b = min(r1, a + chunk_rows)
                    problem = _targets_values(m, y[a:b], path, e.y, a)
                    if problem:
                        return problem
                    if ticker is not None:
                        ticker.add((b - a) * _row_bytes(x) if values else (b - a) * 8)
                    if values and x.dtype.kind == "f":
                        block = x[a:b].reshape(b - a, -1)
                        finite = np.isfinite(block).all(axis=1)
                        if not finite.all():
                            row = a + int(np.argmin(finite))
                            return f"{path}: NaN or inf in {e.x!r} at row {row}"
    except MpitrainError as exc:
        return str(exc)
    except Exception as exc:  # noqa: BLE001 - a damaged HDF5 file can raise anything
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return f"{path}: unreadable shard: {detail}"
    return None


def _row_bytes(x) -> int:
    return int(np.prod(x.shape[1:])) * x.dtype.itemsize


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
        for k, rows in enumerate(e.rows for e in m.splits[split]):
            a, b = max(lo, start) - start, min(hi, start + rows) - start
            if a < b:
                todo[(split, k)] = (a, b)
            start += rows
    problems = []
    row = int(np.prod(m.features)) * m.dtype.itemsize if full else 8
    ticker = Ticker("checking the data" + ("'s values" if full else "'s targets"),
                    (hi - lo) * row, enabled=rank == 0)
    for (split, k), rows_range in sorted(todo.items()):
        problem = _check_shard(m, split, k, rows_range, values=full, ticker=ticker)
        if problem:
            problems.append((split, k, problem))
    # A shard can be checked by two ranks (structure and values): report it once.
    problems = sorted({p[2]: p for part in comm.allgather(problems) for p in part}.values())
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise MpitrainError(problems[0][2] + more, everywhere=True)
