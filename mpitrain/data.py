"""Sharded HDF5 datasets: the manifest, the checks, the row reader, the sampler.

A dataset is a directory::

    manifest.json           {"format": "mpitrain.shards", "version": 1,
                             "features": [784], "dtype": "float32", "classes": 10,
                             "splits": {"train": [{"file": "train-00000.h5", "rows": 4500}, ...],
                                        "val":   [{"file": "val-00000.h5", "rows": 500}]}}
    train-00000.h5 ...      datasets  x (rows, *features) and  y (rows,) integer labels

Global sample ids number the rows of a split across its shards in manifest
order.  The sampler works on global ids only, so the order of samples does
not depend on the number of ranks; a rank reads just the rows of its part of
each batch, by h5py slicing, from files opened read-only without locking.
"""
from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .runtime import MpitrainError

__all__ = ["FORMAT", "VERSION", "Manifest", "Shards", "Sampler", "Prefetcher", "rank_slice",
           "check_dataset", "read_manifest"]

FORMAT, VERSION = "mpitrain.shards", 1
X_KEY, Y_KEY = "x", "y"


def rank_slice(count: int, rank: int, size: int) -> Tuple[int, int]:
    """The part [lo, hi) of ``count`` items that ``rank`` of ``size`` takes.

    Parts are contiguous and differ in length by at most one; when
    ``count < size`` some parts are empty (those ranks still join every
    collective, with zero rows).
    """
    return count * rank // size, count * (rank + 1) // size


class Manifest:
    """The parsed ``manifest.json`` of a dataset directory."""

    def __init__(self, root: str, features: Sequence[int], dtype: str, classes: int,
                 splits: Dict[str, List[Tuple[str, int]]]):
        self.root = root
        self.features = tuple(int(f) for f in features)
        self.dtype = np.dtype(dtype)
        self.classes = int(classes)
        self.splits = splits  # split -> [(file name, rows)]

    @property
    def path(self) -> str:
        return os.path.join(self.root, "manifest.json")

    def rows(self, split: str) -> int:
        """Number of samples in ``split`` (0 if the split is absent)."""
        return sum(rows for _, rows in self.splits.get(split, []))

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "features": list(self.features),
                "dtype": self.dtype.name, "classes": self.classes,
                "splits": {s: [{"file": f, "rows": r} for f, r in shards]
                           for s, shards in self.splits.items()}}


def read_manifest(root: str) -> Manifest:
    """Parse and check ``root/manifest.json``; errors name the file and the key."""
    path = os.path.join(root, "manifest.json")
    if not os.path.isdir(root):
        raise MpitrainError(f"{root}: no such dataset directory "
                            "(make one with 'python -m mpitrain prepare')")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise MpitrainError(f"{path}: missing (a dataset directory needs a manifest; "
                            "make one with 'python -m mpitrain prepare')") from None
    except (OSError, ValueError) as exc:
        raise MpitrainError(f"{path}: unreadable: {exc}") from None

    def need(key, kind):
        if key not in meta:
            raise MpitrainError(f"{path}: missing key {key!r}")
        if not isinstance(meta[key], kind):
            raise MpitrainError(f"{path}: key {key!r} should be a {kind.__name__}, "
                                f"got {meta[key]!r}")
        return meta[key]

    if meta.get("format") != FORMAT:
        raise MpitrainError(f"{path}: key 'format' should be {FORMAT!r}, got {meta.get('format')!r}")
    if need("version", int) > VERSION:
        raise MpitrainError(f"{path}: format version {meta['version']} is newer than "
                            f"this mpitrain reads ({VERSION})")
    features = need("features", list)
    if not features or not all(isinstance(f, int) and f > 0 for f in features):
        raise MpitrainError(f"{path}: key 'features' should be a list of positive "
                            f"integers, got {features!r}")
    dtype = need("dtype", str)
    try:
        if np.dtype(dtype).kind != "f":
            raise TypeError
    except TypeError:
        raise MpitrainError(f"{path}: key 'dtype' should be a float type, got {dtype!r}") from None
    classes = need("classes", int)
    if classes < 2:
        raise MpitrainError(f"{path}: key 'classes' should be >= 2, got {classes}")
    splits: Dict[str, List[Tuple[str, int]]] = {}
    for split, shards in need("splits", dict).items():
        if not isinstance(shards, list):
            raise MpitrainError(f"{path}: splits.{split} should be a list of shards")
        for k, shard in enumerate(shards):
            if (not isinstance(shard, dict) or not isinstance(shard.get("file"), str)
                    or not isinstance(shard.get("rows"), int) or shard["rows"] < 0):
                raise MpitrainError(f"{path}: splits.{split}[{k}] should be "
                                    f'{{"file": NAME, "rows": N >= 0}}, got {shard!r}')
        splits[split] = [(s["file"], s["rows"]) for s in shards]
    if not splits.get("train"):
        raise MpitrainError(f"{path}: no 'train' split")
    return Manifest(root, features, dtype, classes, splits)


def open_h5(path: str):
    """Open an HDF5 file read-only, without file locking (Lustre, NFS, shared reads)."""
    import h5py

    return h5py.File(path, "r", locking=False)


def _check_shard(m: Manifest, split: str, k: int, rows_range: Optional[Tuple[int, int]],
                 chunk_rows: int = 8192) -> Optional[str]:
    """Check one shard's structure and, over ``rows_range``, its values; return a problem or None."""
    name, rows = m.splits[split][k]
    path = os.path.join(m.root, name)
    if not os.path.exists(path):
        return f"{path}: missing shard (listed in {m.path} as splits.{split}[{k}])"
    try:
        with open_h5(path) as f:
            for key in (X_KEY, Y_KEY):
                if key not in f:
                    return f"{path}: missing dataset {key!r}"
            x, y = f[X_KEY], f[Y_KEY]
            if x.shape[1:] != m.features:
                return (f"{path}: dataset 'x' has feature shape {x.shape[1:]}, "
                        f"expected {m.features} (from {m.path})")
            if x.dtype != m.dtype:
                return f"{path}: dataset 'x' is {x.dtype}, expected {m.dtype} (from {m.path})"
            if y.ndim != 1 or y.dtype.kind not in "iu":
                return f"{path}: dataset 'y' should be 1-D integer labels, got {y.dtype} {y.shape}"
            if x.shape[0] != rows or y.shape[0] != rows:
                return (f"{path}: expected {rows} rows (from {m.path}), "
                        f"'x' has {x.shape[0]} and 'y' has {y.shape[0]}")
            lo, hi = rows_range or (0, 0)
            for a in range(lo, hi, chunk_rows):
                b = min(hi, a + chunk_rows)
                labels = y[a:b]
                bad = np.flatnonzero((labels < 0) | (labels >= m.classes))
                if bad.size:
                    return (f"{path}: label {labels[bad[0]]} at row {a + bad[0]} is out of "
                            f"range, expected 0..{m.classes - 1}")
                block = x[a:b].reshape(b - a, -1)
                finite = np.isfinite(block).all(axis=1)
                if not finite.all():
                    row = a + int(np.argmin(finite))
                    return f"{path}: NaN or inf in 'x' at row {row}"
    except OSError as exc:
        return f"{path}: unreadable shard: {exc}"
    return None


def check_dataset(m: Manifest, comm, full: bool = True) -> None:
    """Check every shard of the dataset, the work split among the ranks of ``comm``.

    Structure (keys, shapes, dtypes, row counts) of shard k is checked by rank
    ``k % size``; with ``full`` the values (labels in range, finite features)
    are scanned too, each rank an equal share of the rows.  Collective: every
    rank raises the same error if any rank found a problem.
    """
    rank, size = comm.Get_rank(), comm.Get_size()
    todo: Dict[Tuple[str, int], Optional[Tuple[int, int]]] = {}
    k_all = 0
    for split in sorted(m.splits):
        for k, _ in enumerate(m.splits[split]):
            if k_all % size == rank:
                todo[(split, k)] = None
            k_all += 1
    if full:  # rows of all splits, concatenated, split evenly among ranks
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
        problem = _check_shard(m, split, k, rows_range)
        if problem:
            problems.append((split, k, problem))
    # A shard can be checked by two ranks (structure and values): report it once.
    problems = sorted({p[2]: p for part in comm.allgather(problems) for p in part}.values())
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise MpitrainError(problems[0][2] + more, everywhere=True)


class Shards:
    """Reads rows of one split by global sample id; shards are opened on first use."""

    def __init__(self, m: Manifest, split: str, dtype=None):
        if split not in m.splits:
            raise MpitrainError(f"{m.path}: no {split!r} split")
        self.manifest, self.split = m, split
        self.files = [os.path.join(m.root, f) for f, _ in m.splits[split]]
        rows = [r for _, r in m.splits[split]]
        self.offsets = np.concatenate([[0], np.cumsum(rows, dtype=np.int64)])
        self.rows = int(self.offsets[-1])
        self.dtype = np.dtype(dtype or m.dtype)
        self.features = m.features
        self._open: Dict[int, tuple] = {}
        self._files: list = []

    def __len__(self) -> int:
        return self.rows

    def _shard(self, k: int):
        """(x, y) of shard k: read-only memory maps where the layout allows, else h5py datasets.

        A contiguous, uncompressed dataset (what ``prepare`` writes) is mapped
        at the file offset HDF5 reports, so reading a row touches just its
        pages and skips h5py's per-call cost (~10 us per selection); chunked
        or filtered datasets are read through h5py.
        """
        if k not in self._open:
            f = open_h5(self.files[k])
            arrays = []
            for key in (X_KEY, Y_KEY):
                ds = f[key]
                offset = ds.id.get_offset() if ds.chunks is None else None
                if offset is not None and ds.size:
                    arrays.append(np.memmap(self.files[k], dtype=ds.dtype, mode="r",
                                            offset=offset, shape=ds.shape))
                else:
                    arrays.append(ds)
            self._files.append(f)
            self._open[k] = tuple(arrays)
        return self._open[k]

    def read(self, ids: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Rows ``ids`` (global sample ids, any order) as x (n, features), y (n,)."""
        ids = np.asarray(ids, dtype=np.int64)
        n_feat = math.prod(self.features)
        x = np.empty((len(ids), n_feat), self.dtype)
        y = np.empty(len(ids), np.int64)
        if len(ids) == 0:
            return x, y
        order = np.argsort(ids, kind="stable")  # h5py wants increasing indices
        sorted_ids = ids[order]
        shard_of = np.searchsorted(self.offsets, sorted_ids, side="right") - 1
        bounds = np.flatnonzero(np.diff(shard_of)) + 1
        for part in np.split(np.arange(len(ids)), bounds):
            k = int(shard_of[part[0]])
            local = sorted_ids[part] - self.offsets[k]
            xs, ys = self._shard(k)
            lo, hi = int(local[0]), int(local[-1]) + 1
            sel = slice(lo, hi) if hi - lo == len(local) else local  # a run: one slice
            x[order[part]] = xs[sel].reshape(len(part), n_feat)
            y[order[part]] = ys[sel]
        return x, y

    def read_labels(self, ids: np.ndarray) -> np.ndarray:
        """Labels of rows ``ids`` alone (the last pipeline stage needs no features)."""
        ids = np.asarray(ids, dtype=np.int64)
        y = np.empty(len(ids), np.int64)
        shard_of = np.searchsorted(self.offsets, ids, side="right") - 1
        for k in np.unique(shard_of):
            where = np.flatnonzero(shard_of == k)
            local = ids[where] - self.offsets[k]
            order = np.argsort(local, kind="stable")
            ys = self._shard(int(k))[1]
            y[where[order]] = ys[local[order]] if len(local) > 1 else ys[int(local[0])]
        return y

    def read_range(self, lo: int, hi: int) -> Tuple[np.ndarray, np.ndarray]:
        """Contiguous global rows [lo, hi) as x (n, features), y (n,)."""
        return self.read(np.arange(lo, hi))

    def close(self) -> None:
        """Close every open shard file."""
        self._open.clear()  # drops the memory maps
        for f in self._files:
            f.close()
        self._files.clear()


class Sampler:
    """The global sample ids of each step, a pure function of (seed, epoch, step).

    Each epoch a permutation of all ``n`` training ids is drawn from a
    generator seeded with (seed, epoch), the same on every rank, and cut into
    consecutive global batches.  Step ``k`` of the run is step ``k %
    steps_per_epoch`` of epoch ``k // steps_per_epoch``.  With ``drop_last``
    the ``n % batch_size`` ids left at the end of an epoch are skipped (they
    are others each epoch); without it the last batch of each epoch is
    smaller, so every sample is used exactly once per epoch.  A rank takes the
    ``rank_slice`` of each global batch, so the split is valid for any rank
    count and a run can resume on another one.
    """

    def __init__(self, n: int, batch_size: int, seed: int, drop_last: bool = False):
        if batch_size < 1 or n < 1:
            raise ValueError(f"need n >= 1 and batch_size >= 1, got {n} and {batch_size}")
        if drop_last and batch_size > n:
            raise ValueError(f"batch size {batch_size} > {n} samples with drop_last")
        self.n, self.batch_size, self.seed, self.drop_last = n, batch_size, seed, drop_last
        self.steps_per_epoch = n // batch_size if drop_last else -(-n // batch_size)
        self._epoch, self._order = -1, None

    def order(self, epoch: int) -> np.ndarray:
        """The permutation of all sample ids used in ``epoch``."""
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._epoch, self._order = epoch, rng.permutation(self.n)
        return self._order

    def meta(self) -> Dict[str, object]:
        """What fixes the sample order (a checkpoint records it; resume compares it)."""
        return {"seed": self.seed, "batch_size": self.batch_size, "samples": self.n,
                "drop_last": self.drop_last}

    def locate(self, step: int) -> Tuple[int, int]:
        """(epoch, step within the epoch) of global step ``step``."""
        return divmod(step, self.steps_per_epoch)

    def batch(self, step: int) -> np.ndarray:
        """Global sample ids of global step ``step``, in batch order."""
        epoch, k = self.locate(step)
        return self.order(epoch)[k * self.batch_size:(k + 1) * self.batch_size]

    def local(self, step: int, rank: int, size: int) -> Tuple[np.ndarray, int]:
        """(ids this rank reads at ``step``, the global batch size of the step)."""
        ids = self.batch(step)
        lo, hi = rank_slice(len(ids), rank, size)
        return ids[lo:hi], len(ids)


class Prefetcher:
    """Reads the batches of steps ``start``..``stop - 1`` on a background thread.

    The rows of the next steps are read while the current steps compute
    (numpy and h5py release the GIL while they copy), so reading stays off the
    critical path.  The reader works in bursts: it sleeps until half of the
    ``depth`` batches read ahead are used, then refills them.  One wake-up per
    step cost 2-3% of a step when a rank has a single core (the thread takes it
    from the computation); a burst pays that once per ``depth // 2`` steps.
    ``depth`` defaults to 8 batches, fewer if that would exceed ``max_bytes``.
    ``get`` must be called for each step in order; an error in the reader is
    raised there.
    """

    def __init__(self, shards: Shards, sampler: Sampler, rank: int, size: int,
                 start: int, stop: int, depth: Optional[int] = None,
                 max_bytes: int = 64 << 20):
        import collections
        import threading

        if depth is None:  # the largest local batch's rows, at most 8 of them in max_bytes
            rows = -(-sampler.batch_size // max(1, size))
            row_bytes = math.prod(shards.features) * np.dtype(shards.dtype).itemsize
            depth = int(min(8, max(2, max_bytes // max(1, rows * row_bytes))))
        self.depth = max(2, depth)
        self._ready: "collections.deque" = collections.deque()  # (step, x, y, batch, error)
        self._cv = threading.Condition()
        self._stopped = False
        self._next, self._end = start, stop  # the step get() must be asked for next
        self._args = (shards, sampler, rank, size, start, stop)
        self._thread = threading.Thread(target=self._read, name="mpitrain-prefetch",
                                        daemon=True)
        self._thread.start()

    def _read(self) -> None:
        shards, sampler, rank, size, step, stop = self._args
        while step < stop:
            with self._cv:  # sleep until half the read-ahead is used
                while len(self._ready) > self.depth // 2 and not self._stopped:
                    self._cv.wait()
                if self._stopped:
                    return
                room = self.depth - len(self._ready)
            burst = []
            for k in range(step, min(stop, step + room)):
                try:
                    ids, batch = sampler.local(k, rank, size)
                    burst.append((k, *shards.read(ids), batch, None))
                except BaseException as exc:  # noqa: BLE001 - raised in the main thread
                    burst.append((k, None, None, 0, exc))
                    break
            with self._cv:
                self._ready.extend(burst)
                self._cv.notify_all()
            if burst[-1][-1] is not None:
                return
            step += len(burst)

    def get(self, step: int) -> Tuple[np.ndarray, np.ndarray, int]:
        """(x, y, global batch size) of ``step``."""
        if step != self._next or step >= self._end:
            raise RuntimeError(f"prefetcher asked for step {step}; it reads steps in order, "
                               f"next {self._next}, up to {self._end - 1}")
        self._next += 1
        with self._cv:
            while not self._ready:
                self._cv.wait()
            got, x, y, batch, error = self._ready.popleft()
            if len(self._ready) <= self.depth // 2:
                self._cv.notify_all()  # wake the reader for the next burst
        if error is not None:
            raise error
        if got != step:
            raise RuntimeError(f"prefetcher out of order: asked for step {step}, had {got}")
        return x, y, batch

    def close(self) -> None:
        """Stop reading ahead."""
        with self._cv:
            self._stopped = True
            self._cv.notify_all()
        self._thread.join()
