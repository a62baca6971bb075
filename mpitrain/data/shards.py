"""Reading rows of a split by global sample id, from its HDF5 shards."""
from __future__ import annotations

import math
import os
from typing import Dict, Tuple

import numpy as np

from ..runtime import MpitrainError
from .hdf5 import dataset, mapped, open_h5
from .manifest import X_KEY, Y_KEY, Manifest, shard_path

__all__ = ["Shards"]


class Shards:
    """Reads rows of one split by global sample id; shards are opened on first use."""

    def __init__(self, m: Manifest, split: str, dtype=None):
        if split not in m.splits:
            raise MpitrainError(f"{m.path}: no {split!r} split")
        self.manifest, self.split = m, split
        self.files = [shard_path(m.root, f) for f, _ in m.splits[split]]
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
        """(x, y) of shard k: read-only memory maps where the layout allows (what
        ``prepare`` writes; see ``hdf5.mapped``), else h5py datasets."""
        if k not in self._open:
            path = self.files[k]
            f = open_h5(path)
            arrays = []
            for key in (X_KEY, Y_KEY):
                ds = dataset(f, key, path)
                view = mapped(ds, path)
                arrays.append(ds if view is None else view)
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
