"""Arrays in memory as a dataset: ``ArrayDataset(x, y)``, no files written.

Either every rank holds the arrays (each reads only the rows of its part of
each batch) or one rank does (``root=0``: the others pass ``None`` and fetch
the rows of their part of each batch from it, by one-sided MPI reads of just
those rows)::

    data = mpitrain.ArrayDataset(x, y, val_fraction=0.1)                 # on every rank
    data = mpitrain.ArrayDataset(x if rank == 0 else None,
                                 y if rank == 0 else None, root=0)        # on rank 0 only

The rows and their order are those of a dataset directory prepared from the
same arrays (``prepare --input arrays.npz``): the same validation rows for
the same ``val_fraction`` and ``seed``, the same task and standardisation, so
the same sample order and the same bits.  The task is declared
(``task="classification" | "regression" | "multilabel"``) or read from ``y``:
integer labels are classes (``classes`` from the largest label, unless
given), floating-point targets regression; never from a layer's shape.
"""
from __future__ import annotations

import math
import threading
import zlib
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

from ..balance import rank_slice
from ..runtime import ConfigError, MpitrainError, agreed, literal, require_thread_multiple
from .datasets import Data, Dataset, Split
from .sources import Source, scan_targets, split_blocks

__all__ = ["ArrayDataset", "ArraySplit"]


class _Local:
    """Rows of an array this rank holds."""

    def __init__(self, array: np.ndarray):
        self.array = array

    def rows(self, r: np.ndarray) -> np.ndarray:
        return self.array[r]


class _Remote:
    """Rows of an array rank ``root`` holds, read through an RMA window: one ``Get`` of
    an indexed datatype per call, passive target (no call on ``root``)."""

    def __init__(self, win, root: int, shape: Tuple[int, ...], dtype: np.dtype):
        from mpi4py import MPI

        self.win, self.root, self.shape, self.dtype = win, root, shape, np.dtype(dtype)
        self.row_bytes = self.dtype.itemsize * math.prod(shape)
        self.row = MPI.BYTE.Create_contiguous(self.row_bytes).Commit()
        # A process may hold one lock on a window at a time: the read-ahead thread and the
        # main thread (evaluation: the validation rows share the arrays) take turns.
        self.turn = threading.Lock()

    def rows(self, r: np.ndarray) -> np.ndarray:
        from mpi4py import MPI

        out = np.empty((len(r), *self.shape), self.dtype)
        if len(r) == 0 or self.row_bytes == 0:
            return out
        picked = self.row.Create_indexed_block(1, [int(i) for i in r]).Commit()
        try:
            with self.turn:
                self.win.Lock(self.root, MPI.LOCK_SHARED)
                self.win.Get([out, len(r) * self.row_bytes, MPI.BYTE], self.root,
                             target=(0, 1, picked))
                self.win.Unlock(self.root)
        finally:
            picked.Free()
        return out

    def free(self) -> None:
        self.row.Free()


class ArraySplit(Split):
    """One split's rows of arrays: ``rows[i]`` is the array row of sample id ``i`` (None:
    row i); features read as ``dtype``, targets as int64 labels or float64."""

    def __init__(self, x, y, n: int, rows: Optional[np.ndarray], features: Tuple[int, ...],
                 dtype, target_shape: Tuple[int, ...], target_dtype):
        self.x, self.y, self.n, self.row_of = x, y, n, rows
        self.features, self.dtype = tuple(features), np.dtype(dtype)
        self.target_shape, self.target_dtype = tuple(target_shape), np.dtype(target_dtype)

    def __len__(self) -> int:
        return self.n

    def _rows(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, np.int64)
        return ids if self.row_of is None else self.row_of[ids]

    def read(self, ids):
        r = self._rows(ids)
        x = self.x.rows(r).astype(self.dtype, copy=False).reshape(len(r), *self.features)
        return x, self.read_rows_labels(r)

    def read_labels(self, ids):
        return self.read_rows_labels(self._rows(ids))

    def read_rows_labels(self, r: np.ndarray) -> np.ndarray:
        """The targets of array rows ``r``."""
        return self.y.rows(r).astype(self.target_dtype, copy=False).reshape(
            len(r), *self.target_shape)


def _ranges_rows(ranges: Sequence[Tuple[int, int]]) -> np.ndarray:
    return np.concatenate([np.arange(lo, hi, dtype=np.int64) for lo, hi in ranges]) \
        if ranges else np.zeros(0, np.int64)


def _fingerprint(x: np.ndarray, y: np.ndarray) -> Tuple[Any, ...]:
    """What the ranks compare to see they were given the same arrays: shapes, types, and
    a checksum of 64 rows spread over them."""
    n = len(x)
    picked = np.unique(np.linspace(0, n - 1, min(n, 64)).astype(np.int64)) if n else []
    crc = 0
    for r in picked:
        crc = zlib.crc32(np.ascontiguousarray(x[r]).tobytes(), crc)
        crc = zlib.crc32(np.ascontiguousarray(y[r]).tobytes(), crc)
    return (x.shape, x.dtype.str, y.shape, y.dtype.str, crc)


class ArrayDataset(Dataset):
    """Samples ``x`` (n, *features) and targets ``y`` (n,) or (n, ...) in memory.

    ``val=(x_val, y_val)``: the validation split; or ``val_fraction``: that share
    of the rows, in blocks drawn from ``seed`` (as ``prepare`` draws them).
    ``task``: None (read from ``y``), ``"classification"``, ``"regression"`` or
    ``"multilabel"`` (0/1 targets); ``classes``: the class count (default: the
    largest label + 1).  ``root``: the rank that holds the arrays (the others
    pass None); None: every rank holds the same arrays.  Nothing is copied but
    the rows each step reads.
    """

    def __init__(self, x: Optional[np.ndarray], y: Optional[np.ndarray], *,
                 val: Optional[Tuple[np.ndarray, np.ndarray]] = None, val_fraction: float = 0.0,
                 task: Optional[str] = None, classes: Optional[int] = None, seed: int = 0,
                 root: Optional[int] = None):
        if val is not None and val_fraction:
            raise ConfigError("{val} and {val_fraction}: give one of the two",
                              ["val", "val_fraction"])
        if not 0 <= val_fraction < 1:
            raise ConfigError(f"{{val_fraction}}: expected a value in [0, 1), got "
                              f"{val_fraction}", ["val_fraction"])
        if root is not None and (not isinstance(root, int) or root < 0):
            raise ConfigError(f"{{root}}: expected a rank (an integer >= 0) or None, got "
                              f"{literal(repr(root))}", ["root"])
        self.x, self.y, self.val = x, y, val
        self.val_fraction, self.task, self.classes = val_fraction, task, classes
        self.seed, self.root = seed, root

    def __repr__(self) -> str:
        where = "every rank" if self.root is None else f"rank {self.root}"
        return f"ArrayDataset(on {where})"

    def describe(self) -> str:
        shape = getattr(self.x, "shape", None)
        held = "every rank" if self.root is None else f"rank {self.root}"
        return f"arrays {shape[0]:,} x {tuple(shape[1:])} on {held}" if shape is not None \
            else f"arrays on {held}"

    # -- what the holder checks and decides ------------------------------------------------
    def _checked(self) -> Tuple[np.ndarray, np.ndarray, Optional[Tuple[np.ndarray, np.ndarray]]]:
        """The arrays as numpy arrays, checked (a rank that holds them)."""
        x, y = _array(self.x, "x"), _array(self.y, "y")
        _pair(x, y, "x", "y")
        val = None
        if self.val is not None:
            if not isinstance(self.val, (tuple, list)) or len(self.val) != 2:
                raise ConfigError("{val}: expected a pair (x_val, y_val)", ["val"])
            val = (_array(self.val[0], "val[0]"), _array(self.val[1], "val[1]"))
            _pair(*val, "val[0]", "val[1]")
            for what, mine, theirs in (("a sample's shape", val[0].shape[1:], x.shape[1:]),
                                       ("a target's shape", val[1].shape[1:], y.shape[1:])):
                if mine != theirs:
                    raise ConfigError(f"{{val}}: {what} is {mine}, the training arrays' "
                                      f"{theirs}", ["val"])
        return x, y, val

    def _plan(self, x, y, val):
        """(task record, train rows, val rows or None) as the dataset directory would have
        them: the same blocks for validation, the same scan of the targets."""
        task = self.task or "auto"
        if task == "multilabel" and y.ndim < 2:
            y = y.reshape(len(y), 1)
        sources = [Source("y", None, x, y)]
        if val is not None:
            sources.append(Source("val[1]", None, val[0], val[1]))
            train = [[(0, len(x))], []]
            every = [[(0, len(x))], [(0, len(val[0]))]]
            val_rows = None
        else:
            ranges = split_blocks(sources, self.val_fraction, self.seed)
            train, every = ranges["train"], ranges["val"]
            val_rows = _ranges_rows(ranges["val"][0]) if self.val_fraction else None
        record = scan_targets(sources, train, task, self.classes, every=every)
        return record, _ranges_rows(train[0]), val_rows

    # -- connecting ------------------------------------------------------------------------
    def connect(self, comm, *, dtype=None, cache_mb: float = 1024.0,
                check: str = "full") -> Data:
        """Check and open the arrays on every rank (collective); see ``Dataset``."""
        if self.root is None:
            return self._connect_everywhere(comm, dtype, check)
        return self._connect_from_root(comm, dtype, check)

    def _connect_everywhere(self, comm, dtype, check: str) -> Data:
        x, y, val = agreed(comm, self._checked)
        prints = comm.allgather(_fingerprint(x, y) + ((_fingerprint(*val),) if val else ()))
        if any(p != prints[0] for p in prints):
            bad = [r for r, p in enumerate(prints) if p != prints[0]]
            raise MpitrainError(f"ArrayDataset: rank(s) {bad} hold other arrays than rank 0 "
                                "(shapes, types or values differ): give every rank the same "
                                "arrays, or give them on one rank with root=0",
                                everywhere=True)
        record, train_rows, val_rows = agreed(comm, lambda: self._plan(x, y, val))
        if check == "full":
            agreed(comm, lambda: _finite(x, comm))
            if val is not None:
                agreed(comm, lambda: _finite(val[0], comm, "val[0]"))
        columns = [(_Local(x), _Local(y))] + ([(_Local(val[0]), _Local(val[1]))] if val else [])
        return self._data(record, x.shape, x.dtype, y.shape[1:], train_rows, val_rows,
                          len(val[0]) if val else 0, columns, dtype, [])

    def _connect_from_root(self, comm, dtype, check: str) -> Data:
        from mpi4py import MPI

        root = self.root
        if root >= comm.Get_size():
            raise ConfigError(f"{{root}} {root}: the job has {comm.Get_size()} ranks",
                              ["root"], everywhere=True)
        require_thread_multiple(comm, "ArrayDataset(root=...) (its rows are read from the "
                                      "root while the ranks compute)")
        mine = comm.Get_rank() == root
        held: List[np.ndarray] = []

        def plan():  # on the root: check, split and scan; the others get the outcome
            x, y, val = self._checked()
            if check == "full":
                _finite(x, None)
                if val is not None:
                    _finite(val[0], None, "val[0]")
            record, train_rows, val_rows = self._plan(x, y, val)
            held.extend(np.ascontiguousarray(a) for a in (x, y, *(val or ())))
            return (record, [(a.shape, a.dtype.str) for a in held], _as_ranges(train_rows),
                    None if val_rows is None else _as_ranges(val_rows))

        record, shapes, train_ranges, val_ranges = _bcast_from(comm, root, plan)
        wins = [MPI.Win.Create(held[k] if mine else None, disp_unit=1, comm=comm)
                for k in range(len(shapes))]
        cols = [_Local(held[k]) if mine else _Remote(wins[k], root, shapes[k][0][1:],
                                                      np.dtype(shapes[k][1]))
                for k in range(len(shapes))]

        def close() -> None:
            for c in cols:
                if isinstance(c, _Remote):
                    c.free()
            for w in wins:
                w.Free()

        (xs, xd), (ys, _) = shapes[0], shapes[1]
        return self._data(record, xs, np.dtype(xd), ys[1:], _ranges_rows(train_ranges),
                          None if val_ranges is None else _ranges_rows(val_ranges),
                          shapes[2][0][0] if len(shapes) == 4 else 0,
                          [cols[k:k + 2] for k in range(0, len(cols), 2)], dtype, [close])

    def _data(self, record, shape, stored, target_shape, train_rows, val_rows,
              n_val_arrays: int, columns, dtype, closing) -> Data:
        features = tuple(int(f) for f in shape[1:])
        target_shape = tuple(int(t) for t in target_shape)
        if record["name"] == "multilabel" and not target_shape:
            target_shape = (1,)
        tdt = np.int64 if record["name"] == "classification" else np.float64
        dtype = np.dtype(dtype or (stored if np.dtype(stored).kind == "f" else np.float32))
        (xs, ys) = columns[0]
        whole = len(train_rows) == shape[0]  # every row, in order: no lookup
        train = ArraySplit(xs, ys, len(train_rows), None if whole else train_rows, features,
                           dtype, target_shape, tdt)
        val = None
        if len(columns) == 2:
            val = ArraySplit(*columns[1], n_val_arrays, None, features, dtype, target_shape,
                             tdt)
        elif val_rows is not None and len(val_rows):
            val = ArraySplit(xs, ys, len(val_rows), val_rows, features, dtype, target_shape,
                             tdt)
        return Data(self.describe(), features, record, train, val, closing=closing)


def _bcast_from(comm, root: int, fn):
    """``fn()`` on ``root``, its (small) result on every rank; its error everywhere."""
    from ..runtime import _portable, _raise

    result = error = None
    if comm.Get_rank() == root:
        try:
            result = fn()
        except MpitrainError as exc:
            error = _portable(exc)
    error, result = comm.bcast((error, result), root=root)
    if error:
        _raise(error)
    return result


def _as_ranges(rows: np.ndarray) -> List[Tuple[int, int]]:
    """Increasing row numbers as [lo, hi) runs (small to send)."""
    if not len(rows):
        return []
    cuts = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = np.concatenate([[0], cuts])
    ends = np.concatenate([cuts, [len(rows)]])
    return [(int(rows[a]), int(rows[b - 1]) + 1) for a, b in zip(starts, ends)]


def _array(value, name: str) -> np.ndarray:
    if value is None:
        raise ConfigError(f"{{{name.split('[')[0]}}}: no array given (with root=None every "
                          "rank gives the arrays; with root=R, rank R does)",
                          [name.split("[")[0]])
    try:
        a = np.asarray(value)
    except Exception as exc:  # noqa: BLE001 - whatever the user passed
        raise ConfigError(f"{{{name.split('[')[0]}}}: not an array: {literal(str(exc))}",
                          [name.split("[")[0]]) from None
    if a.dtype.kind not in "fiub" or a.ndim < 1:
        raise ConfigError(f"{{{name.split('[')[0]}}}: {name} should hold numbers (samples, "
                          f"...), got {a.dtype} {a.shape}", [name.split("[")[0]])
    return a


def _pair(x: np.ndarray, y: np.ndarray, xn: str, yn: str) -> None:
    param = "val" if xn.startswith("val") else "x"
    if x.ndim < 2 or x.dtype.kind not in "fiu":
        raise ConfigError(f"{{{param}}}: {xn} should be numeric samples (n, *features), "
                          f"got {x.dtype} {x.shape}", [param])
    if len(x) != len(y):
        raise ConfigError(f"{{{param}}}: {xn} has {len(x)} samples, {yn} has {len(y)}",
                          [param])
    if len(x) == 0:
        raise ConfigError(f"{{{param}}}: no samples in {xn}", [param])


def _finite(x: np.ndarray, comm, name: str = "x") -> None:
    """Refuse NaN or inf in the features, naming the first row (each rank scans its share
    of the rows, or one rank all of them without ``comm``)."""
    if x.dtype.kind != "f":
        return
    lo, hi = rank_slice(len(x), comm.Get_rank(), comm.Get_size()) if comm else (0, len(x))
    block = 8192
    for a in range(lo, hi, block):
        ok = np.isfinite(x[a:min(hi, a + block)].reshape(min(hi, a + block) - a, -1)).all(axis=1)
        if not ok.all():
            raise ConfigError(f"{{x}}: NaN or inf in {name} at row {a + int(np.argmin(ok))}",
                              ["x"])
