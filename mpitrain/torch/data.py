"""A map-style ``torch.utils.data.Dataset`` as an mpitrain dataset.

mpitrain's sampler gives each rank the global ids of its part of each batch
(the same order at any rank count, resumable mid-epoch); here an id is an
index of the dataset: its items ``(x, y)`` are read and stacked.  The task
comes from the targets (``dataset.targets`` when it has them, else each item's
``y``) or from ``task=`` and ``classes=``; ``val_fraction`` holds out blocks of
indices as ``prepare`` does::

    data = mpitrain.torch.TorchDataset(torchvision_mnist, val_fraction=0.1)
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence

import numpy as np
import torch

from ..data.datasets import Data, Dataset, Split
from ..data.sources import Source, scan_targets, split_blocks
from ..runtime import ConfigError, MpitrainError, agreed

__all__ = ["TorchDataset", "TorchSplit"]


def _numpy(value: Any) -> np.ndarray:
    return value.detach().cpu().numpy() if torch.is_tensor(value) else np.asarray(value)


class TorchSplit(Split):
    """Items ``rows[i]`` of ``dataset`` as sample ``i``, stacked into arrays."""

    def __init__(self, dataset, rows: np.ndarray, features, dtype, target_shape, target_dtype):
        self.dataset, self.rows = dataset, rows
        self.features, self.dtype = tuple(features), np.dtype(dtype)
        self.target_shape, self.target_dtype = tuple(target_shape), np.dtype(target_dtype)

    def __len__(self) -> int:
        return len(self.rows)

    def read(self, ids):
        items = [self.dataset[int(self.rows[i])] for i in np.asarray(ids, np.int64)]
        x = np.empty((len(items), *self.features), self.dtype)
        y = np.empty((len(items), *self.target_shape), self.target_dtype)
        for k, (xi, yi) in enumerate(items):
            x[k] = _numpy(xi).reshape(self.features)
            y[k] = _numpy(yi).reshape(self.target_shape)
        return x, y


class _Targets:
    """What ``data.sources`` scans: the targets, and the row count."""

    def __init__(self, targets: np.ndarray):
        self.shape, self.dtype, self._t = targets.shape, targets.dtype, targets

    def __getitem__(self, index):
        return self._t[index]


class TorchDataset(Dataset):
    """A map-style torch dataset (``__getitem__`` giving ``(x, y)``, ``__len__``) for
    ``mpitrain.torch.fit``; ``val``: another one for validation, or ``val_fraction``
    of this one's indices (in blocks drawn from ``seed``).  ``task`` and ``classes`` as
    ``ArrayDataset`` takes them.  Reads happen in the training thread (a dataset that
    draws random numbers draws them in step order)."""

    prefetch = False

    def __init__(self, dataset, *, val=None, val_fraction: float = 0.0,
                 task: Optional[str] = None, classes: Optional[int] = None, seed: int = 0):
        if val is not None and val_fraction:
            raise ConfigError("{val} and {val_fraction}: give one of the two",
                              ["val", "val_fraction"])
        self.dataset, self.val = dataset, val
        self.val_fraction, self.task, self.classes, self.seed = val_fraction, task, classes, seed

    def describe(self) -> str:
        return f"{type(self.dataset).__name__} ({len(self.dataset):,} items)"

    def _targets(self, dataset) -> np.ndarray:
        if hasattr(dataset, "targets"):
            return _numpy(dataset.targets)
        return np.stack([_numpy(dataset[i][1]) for i in range(len(dataset))])

    def _plan(self):
        n = len(self.dataset)
        if n == 0:
            raise MpitrainError(f"{self.describe()}: no items")
        first = self.dataset[0]
        if not isinstance(first, (tuple, list)) or len(first) != 2:
            raise MpitrainError(f"{self.describe()}: its items should be (x, y) pairs, got "
                                f"{type(first).__name__}")
        x0 = _numpy(first[0])
        targets = self._targets(self.dataset)
        sources = [Source("targets", None, _Shape(n), _Targets(targets))]
        if self.val is not None:
            sources.append(Source("val targets", None, _Shape(len(self.val)),
                                  _Targets(self._targets(self.val))))
            train, every = [[(0, n)], []], [[], [(0, len(self.val))]]
            val_rows = None
        else:
            ranges = split_blocks(sources, self.val_fraction, self.seed)
            train, every = ranges["train"], ranges["val"]
            val_rows = _rows(ranges["val"][0]) if self.val_fraction else None
        record = scan_targets(sources, train, self.task or "auto", self.classes, every=every)
        return x0, targets, record, _rows(train[0]), val_rows

    def connect(self, comm, *, dtype=None, cache_mb: float = 1024.0,
                check: str = "full") -> Data:
        x0, targets, record, train_rows, val_rows = agreed(comm, self._plan)
        features = tuple(x0.shape)
        dtype = np.dtype(dtype or (x0.dtype if x0.dtype.kind == "f" else np.float32))
        tdt = np.int64 if record["name"] == "classification" else np.float64
        tshape = tuple(targets.shape[1:])
        train = TorchSplit(self.dataset, train_rows, features, dtype, tshape, tdt)
        if self.val is not None:
            val = TorchSplit(self.val, np.arange(len(self.val)), features, dtype, tshape, tdt)
        elif val_rows is not None and len(val_rows):
            val = TorchSplit(self.dataset, val_rows, features, dtype, tshape, tdt)
        else:
            val = None
        return Data(self.describe(), features, record, train, val)


class _Shape:
    """A stand-in for a source's features: its row count (``data.sources`` needs it)."""

    chunks = None

    def __init__(self, n: int):
        self.shape = (n,)


def _rows(ranges: Sequence) -> np.ndarray:
    parts: List[np.ndarray] = [np.arange(lo, hi, dtype=np.int64) for lo, hi in ranges]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)
