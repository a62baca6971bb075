"""Reading rows of a split by global sample id, from prepared shards or files indexed in place.

Each manifest entry is a file, its datasets ``x`` and ``y``, and the row
ranges that belong to the split.  A dataset is read the fastest way its
layout allows:

- contiguous (what ``prepare`` writes): a read-only memory map at the offset
  HDF5 reports (``hdf5.mapped``): a row touches just its pages;
- chunked, filtered or not (the user's gzip file): whole chunks, each read
  and decompressed once by h5py (which releases the GIL, so the prefetch
  thread does it while the step computes) and kept in a bounded
  least-recently-used cache of decoded chunks (``cache_bytes``); rows are
  gathered from there;
- anything else (compact, never written): read whole, once.
"""
from __future__ import annotations

import collections
import math
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..runtime import MpitrainError
from .hdf5 import dataset, mapped, open_h5
from .manifest import Entry, Manifest, shard_path

__all__ = ["Shards", "ChunkCache", "target_dtype"]


def target_dtype(m: Manifest) -> np.dtype:
    """What targets are read as: int64 labels (classification), else float64."""
    return np.dtype(np.int64 if m.task["name"] == "classification" else np.float64)


class ChunkCache:
    """Decoded chunks by (dataset id, chunk index), least recently used dropped first
    once they pass ``budget`` bytes."""

    def __init__(self, budget: int):
        self.budget, self.held = int(budget), 0
        self._chunks: "collections.OrderedDict[tuple, np.ndarray]" = collections.OrderedDict()
        self.reads = 0  # chunks read (decompressed) so far

    def get(self, key: tuple, load) -> np.ndarray:
        """The chunk ``key``, from the cache or ``load()``."""
        chunk = self._chunks.get(key)
        if chunk is not None:
            self._chunks.move_to_end(key)
            return chunk
        chunk = load()
        self.reads += 1
        self._chunks[key] = chunk
        self.held += chunk.nbytes
        while self.held > self.budget and len(self._chunks) > 1:
            _, old = self._chunks.popitem(last=False)
            self.held -= old.nbytes
        return chunk

    def clear(self) -> None:
        """Drop every chunk."""
        self._chunks.clear()
        self.held = 0


class _Column:
    """One dataset of one entry: rows by (sorted) row number, the fastest way.

    A chunked dataset that fits in what is left of the cache's budget is decoded
    into one array of its full size, chunk by chunk as rows are asked for
    (``full``; ``have`` says which chunks are in), so a row once decoded is read as
    fast as from a memory map; a larger one goes through the chunk cache.
    """

    def __init__(self, ds, path: str, cache: ChunkCache):
        self.ds, self.cache = ds, cache
        self.view = mapped(ds, path)
        self.chunk_rows = ds.chunks[0] if self.view is None and ds.chunks else 0
        self.whole: Optional[np.ndarray] = None
        self.key = (path, ds.name)
        self.full: Optional[np.ndarray] = None
        if self.chunk_rows and ds.nbytes <= cache.budget - cache.held:
            cache.held += ds.nbytes  # reserved for good
            self.full = np.empty(ds.shape, ds.dtype)
            self.have = np.zeros(-(-ds.shape[0] // self.chunk_rows), bool)

    def _fill(self, rows: np.ndarray) -> None:
        """Decode into ``full`` the chunks ``rows`` fall in that are not there yet."""
        c = self.chunk_rows
        for k in np.unique(rows // c)[~self.have[np.unique(rows // c)]]:
            k = int(k)
            self.full[k * c:(k + 1) * c] = self.ds[k * c:(k + 1) * c]
            self.have[k] = True
            self.cache.reads += 1

    def rows(self, rows: np.ndarray) -> np.ndarray:
        """``ds[rows]`` for increasing row numbers ``rows``."""
        if self.view is not None:
            lo, hi = int(rows[0]), int(rows[-1]) + 1
            return self.view[lo:hi] if hi - lo == len(rows) else self.view[rows]
        if self.full is not None:
            self._fill(rows)
            return self.full[rows]
        if self.chunk_rows:
            c = self.chunk_rows
            which = rows // c
            out = np.empty((len(rows), *self.ds.shape[1:]), self.ds.dtype)
            starts = np.flatnonzero(np.diff(which, prepend=-1))
            for a, b in zip(starts, list(starts[1:]) + [len(rows)]):
                k = int(which[a])
                chunk = self.cache.get((*self.key, k), lambda k=k: self.ds[k * c:(k + 1) * c])
                out[a:b] = chunk[rows[a:b] - k * c]
            return out
        if self.whole is None:
            self.whole = self.ds[()]
        return self.whole[rows]


class Shards:
    """Reads rows of one split by global sample id; files are opened on first use.

    ``dtype``: what features are read as (default: as stored); ``cache_bytes``:
    the decoded chunks of compressed datasets kept in memory.
    """

    def __init__(self, m: Manifest, split: str, dtype=None, cache_bytes: int = 1 << 30):
        if split not in m.splits:
            raise MpitrainError(f"{m.path}: no {split!r} split")
        self.manifest, self.split = m, split
        self.entries: List[Entry] = m.splits[split]
        self.files = [shard_path(m.root, e.file) for e in self.entries]
        self.offsets = np.concatenate([[0], np.cumsum([e.rows for e in self.entries],
                                                      dtype=np.int64)])
        self.rows = int(self.offsets[-1])
        self.dtype = np.dtype(dtype or m.dtype)
        self.features = m.features
        self.target_dtype = target_dtype(m)
        self.target_shape = tuple(m.targets.get("shape", []))
        self.cache = ChunkCache(cache_bytes)
        # Per entry: where its ranges start in its local numbering, and their first rows.
        self._starts = [np.cumsum([0] + [hi - lo for lo, hi in e.ranges[:-1]], dtype=np.int64)
                        for e in self.entries]
        self._firsts = [np.array([lo for lo, _ in e.ranges], np.int64) for e in self.entries]
        self._open: Dict[int, Tuple[_Column, _Column]] = {}
        self._files: list = []

    def __len__(self) -> int:
        return self.rows

    def _columns(self, k: int) -> Tuple[_Column, _Column]:
        """The x and y columns of entry ``k``."""
        if k not in self._open:
            path, e = self.files[k], self.entries[k]
            f = open_h5(path)
            self._files.append(f)
            self._open[k] = (_Column(dataset(f, e.x, path), path, self.cache),
                             _Column(dataset(f, e.y, path), path, self.cache))
        return self._open[k]

    def chunk_bytes(self) -> int:
        """The largest decoded chunk of ``x`` (with its targets), in bytes; 0 if none."""
        most = 0
        for k in range(len(self.entries)):
            x, y = self._columns(k)
            if x.chunk_rows:
                row = x.ds.dtype.itemsize * math.prod(x.ds.shape[1:])
                row += y.ds.dtype.itemsize * math.prod(y.ds.shape[1:])
                most = max(most, x.chunk_rows * row)
        return most

    def chunked(self) -> bool:
        """Whether any entry's ``x`` is stored in chunks (read chunk by chunk)."""
        return any(self._columns(k)[0].chunk_rows for k in range(len(self.entries)))

    def blocks(self) -> List[int]:
        """The split's rows cut where chunks of ``x`` begin and end, in global id order:
        the units a chunk-aware sampler shuffles (a contiguous dataset is one block per
        range)."""
        sizes = []
        for k, e in enumerate(self.entries):
            c = self._columns(k)[0].chunk_rows
            for lo, hi in e.ranges:
                if not c:
                    sizes.append(hi - lo)
                    continue
                cuts = sorted({lo, hi, *range((lo // c + 1) * c, hi, c)})
                sizes += [b - a for a, b in zip(cuts, cuts[1:])]
        return [s for s in sizes if s > 0]

    def _rows_of(self, k: int, local: np.ndarray) -> np.ndarray:
        """Row numbers in entry ``k``'s datasets of its local sample numbers ``local``."""
        j = np.searchsorted(self._starts[k], local, side="right") - 1
        return self._firsts[k][j] + (local - self._starts[k][j])

    def _read(self, ids: np.ndarray, features: bool):
        ids = np.asarray(ids, dtype=np.int64)
        x = np.empty((len(ids), *self.features), self.dtype) if features else None
        y = np.empty((len(ids), *self.target_shape), self.target_dtype)
        if len(ids) == 0:
            return x, y
        order = np.argsort(ids, kind="stable")  # h5py wants increasing indices
        sorted_ids = ids[order]
        entry_of = np.searchsorted(self.offsets, sorted_ids, side="right") - 1
        bounds = np.flatnonzero(np.diff(entry_of)) + 1
        for part in np.split(np.arange(len(ids)), bounds):
            k = int(entry_of[part[0]])
            rows = self._rows_of(k, sorted_ids[part] - self.offsets[k])
            xs, ys = self._columns(k)
            if features:
                x[order[part]] = xs.rows(rows).reshape(len(part), *self.features)
            y[order[part]] = ys.rows(rows).reshape(len(part), *self.target_shape)
        return x, y

    def read(self, ids: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Rows ``ids`` (global sample ids, any order) as x (n, *features), each sample in
        its shape, and the targets y (n, *target shape)."""
        return self._read(ids, True)

    def read_labels(self, ids: np.ndarray) -> np.ndarray:
        """Targets of rows ``ids`` alone (the last pipeline stage needs no features)."""
        return self._read(ids, False)[1]

    def read_range(self, lo: int, hi: int) -> Tuple[np.ndarray, np.ndarray]:
        """Contiguous global rows [lo, hi) as x (n, *features), y (n, ...)."""
        return self.read(np.arange(lo, hi))

    def close(self) -> None:
        """Close every open file and drop the cache."""
        self._open.clear()  # drops the memory maps and the decoded copies
        self.cache.clear()
        for f in self._files:
            f.close()
        self._files.clear()
