"""The dataset manifest: a directory's ``manifest.json``, parsed and checked.

A dataset is a directory::

    manifest.json           {"format": "mpitrain.shards", "version": 1,
                             "features": [784], "dtype": "float32", "classes": 10,
                             "splits": {"train": [{"file": "train-00000.h5", "rows": 4500}, ...],
                                        "val":   [{"file": "val-00000.h5", "rows": 500}]}}
    train-00000.h5 ...      datasets  x (rows, *features) and  y (rows,) integer labels

Global sample ids number the rows of a split across its shards in manifest
order.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Sequence, Tuple

import numpy as np

from ..runtime import MpitrainError

__all__ = ["FORMAT", "VERSION", "X_KEY", "Y_KEY", "Manifest", "read_manifest"]

FORMAT, VERSION = "mpitrain.shards", 1
X_KEY, Y_KEY = "x", "y"

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
        """The manifest as ``manifest.json`` holds it."""
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
