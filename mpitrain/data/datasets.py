"""Datasets: one protocol for what a trainer reads, whatever holds the rows.

A dataset is a description until a job connects to it::

    data = DirectoryDataset("data/mnist")          # prepared shards, or files indexed in place
    data = HDF5File("train.h5", x="x", y="y", val_fraction=0.1)   # one file, indexed in memory
    data = ArrayDataset(x, y, val_fraction=0.1)    # arrays in memory (data.arrays)
    connected = data.connect(comm, dtype="float32")   # collective: read, checked, ready

``connect`` gives ``Data``: the samples' shape, the task (as a record:
``{"name": "classification", "classes": 10}``), and a ``Split`` for ``train``
(and ``val``, if there is one).  A split reads rows by global sample id; the
sampler only ever sees ids, so every kind of dataset gives the same sample
order for the same rows.  ``as_dataset`` turns what a user passes (a path, a
dataset) into a dataset.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from ..runtime import MpitrainError, agreed, on_root
from .checks import check_dataset
from .manifest import Manifest, outputs_of, parse_manifest, read_manifest
from .shards import Shards

__all__ = ["Split", "Data", "Dataset", "DirectoryDataset", "HDF5File", "as_dataset"]


class Split:
    """The protocol of one split's rows (``Shards`` and the array splits keep it).

    Attributes ``features`` (one sample's shape), ``dtype`` (what features are
    read as), ``target_shape`` and ``target_dtype``.
    """

    features: Tuple[int, ...] = ()

    def __len__(self) -> int:
        raise NotImplementedError

    def read(self, ids: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Rows ``ids`` (global sample ids, any order): x (n, *features), y (n, ...)."""
        raise NotImplementedError

    def read_labels(self, ids: np.ndarray) -> np.ndarray:
        """The targets of rows ``ids`` alone."""
        return self.read(ids)[1]

    def read_range(self, lo: int, hi: int) -> Tuple[np.ndarray, np.ndarray]:
        """Rows [lo, hi)."""
        return self.read(np.arange(lo, hi))

    def chunked(self) -> bool:
        """Whether rows are stored in compressed chunks (a chunk-aware order helps)."""
        return False

    def blocks(self) -> List[int]:
        """Sizes of the runs of ids stored together, in id order (chunk-aware order)."""
        return [len(self)]

    def chunk_bytes(self) -> int:
        """The largest stored chunk, decoded, in bytes (0: not chunked)."""
        return 0

    def close(self) -> None:
        """Let go of files and memory (local)."""


@dataclass
class Data:
    """A dataset connected to a job: what a trainer trains and evaluates on."""

    name: str  # how messages and the banner name it (a directory, "arrays ...")
    features: Tuple[int, ...]  # one sample's shape
    task: Dict[str, Any]  # the task record (model.tasks.make_task makes the Task)
    train: Split
    val: Optional[Split] = None
    manifest: Optional[Manifest] = None  # a dataset directory's
    closing: List[Callable[[], None]] = field(default_factory=list)  # collective teardown

    @property
    def outputs(self) -> int:
        """The model's output width the task needs: classes, outputs or labels."""
        return outputs_of(self.task)

    def rows(self, split: str) -> int:
        """Samples in ``split`` (0 without it)."""
        part = {"train": self.train, "val": self.val}.get(split)
        return len(part) if part is not None else 0

    def close(self) -> None:
        """Close both splits; then what connecting made collectively (RMA windows:
        collective)."""
        self.train.close()
        if self.val is not None:
            self.val.close()
        for fn in self.closing:
            fn()
        self.closing = []

    def abandon(self) -> None:
        """After a rank died (local): close the splits, leave the rest to the healing."""
        self.train.close()
        if self.val is not None:
            self.val.close()
        self.closing = []


class Dataset:
    """A description of data; ``connect`` (collective) opens it on a job's ranks."""

    def connect(self, comm, *, dtype=None, cache_mb: float = 1024.0,
                check: str = "full") -> Data:
        """Open and check the data on every rank of ``comm`` (collective): ``dtype`` is
        what features are read as (default: as stored); ``cache_mb`` the decoded chunks
        of compressed data kept per rank and split; ``check`` 'full' scans every value,
        'meta' only the structure.  An error is raised on every rank alike."""
        raise NotImplementedError

    def describe(self) -> str:
        """One line naming the data."""
        return type(self).__name__

    def for_options(self) -> Dict[str, Any]:
        """What a run's options and record say of it (``{"data": path}`` or ``{}``)."""
        return {}


def _open(m: Manifest, comm, dtype, cache_mb: float, check: str) -> Data:
    """Check the manifest's files and open its splits (collective)."""
    check_dataset(m, comm, full=check == "full")
    cache = int(cache_mb * 2 ** 20)
    train = Shards(m, "train", dtype, cache_bytes=cache)
    val = Shards(m, "val", dtype, cache_bytes=cache) if m.rows("val") else None
    return Data(m.root, m.features, dict(m.task), train, val, manifest=m)


class DirectoryDataset(Dataset):
    """A dataset directory: ``manifest.json`` over prepared shards (``python -m mpitrain
    prepare``) or the user's HDF5 files read in place (``data index``)."""

    def __init__(self, root: str):
        self.root = os.fspath(root)

    def __repr__(self) -> str:
        return f"DirectoryDataset({self.root!r})"

    def describe(self) -> str:
        return self.root

    def for_options(self) -> Dict[str, Any]:
        return {"data": self.root}

    def connect(self, comm, *, dtype=None, cache_mb: float = 1024.0,
                check: str = "full") -> Data:
        # Each rank reads the manifest: a node may see another file system.
        m = agreed(comm, lambda: read_manifest(self.root))
        return _open(m, comm, dtype, cache_mb, check)


class HDF5File(Dataset):
    """One HDF5 file's datasets ``x`` and ``y`` (any path, chunking, filter), read in
    place as ``data index`` would index it, without writing a manifest: a random
    ``val_fraction`` of its blocks (chosen from ``seed``) for validation; ``task``
    'auto' (integer labels: classification; else regression) or as given."""

    def __init__(self, path: str, *, x: str = "x", y: str = "y", val_fraction: float = 0.0,
                 seed: int = 0, task: str = "auto", classes: Optional[int] = None):
        self.path, self.x, self.y = os.fspath(path), x, y
        self.val_fraction, self.seed, self.task, self.classes = val_fraction, seed, task, classes

    def __repr__(self) -> str:
        return f"HDF5File({self.path!r}, x={self.x!r}, y={self.y!r})"

    def describe(self) -> str:
        return f"{self.path} ({self.x}, {self.y})"

    def connect(self, comm, *, dtype=None, cache_mb: float = 1024.0,
                check: str = "full") -> Data:
        from .index import make_index

        root = os.path.dirname(os.path.abspath(self.path))
        where = os.path.join(root, "(in memory)")
        # One rank scans the targets; the manifest (small) goes to every rank.
        meta = on_root(comm, lambda: make_index(
            [self.path], self.x, self.y, root, val_fraction=self.val_fraction,
            seed=self.seed, task=self.task, classes=self.classes).to_json())
        m = agreed(comm, lambda: parse_manifest(meta, root, where))
        return _open(m, comm, dtype, cache_mb, check)


def as_dataset(data: Any) -> Dataset:
    """A ``Dataset`` from what a user passes: a dataset, a dataset directory, its
    ``manifest.json``, or an HDF5 file (datasets ``x`` and ``y``)."""
    if isinstance(data, Dataset):
        return data
    if isinstance(data, (str, os.PathLike)):
        path = os.fspath(data)
        if os.path.basename(path) == "manifest.json":
            return DirectoryDataset(os.path.dirname(path) or ".")
        if os.path.isfile(path):
            return HDF5File(path)
        return DirectoryDataset(path)
    raise MpitrainError(f"data: expected a dataset directory, an HDF5 file, or a dataset "
                        f"(mpitrain.ArrayDataset, DirectoryDataset...), got "
                        f"{type(data).__name__}")
