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


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not 1


def shard_path(root: str, name: str) -> str:
    """The path of shard ``name`` of the dataset ``root``, or ValueError saying why it is
    not a relative path inside ``root`` (after resolving symbolic links)."""
    if not name or os.path.isabs(name) or "\0" in name:
        raise ValueError("is not a relative path inside the dataset directory")
    if any(part == ".." for part in name.replace("\\", "/").split("/")):
        raise ValueError("leaves the dataset directory ('..')")
    top = os.path.realpath(root)
    real = os.path.realpath(os.path.join(root, name))
    if os.path.commonpath([top, real]) != top or real == top:
        raise ValueError(f"resolves to {real}, outside the dataset directory {top}")
    return os.path.join(root, name)


def read_manifest(root: str) -> Manifest:
    """Parse and check ``root/manifest.json``; errors name the file and the key.

    Shard files are named by relative paths inside ``root`` (symbolic links
    resolved): anything else is refused, so reads stay in the directory.
    """
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
    if not isinstance(meta, dict):
        raise MpitrainError(f"{path}: should hold a JSON object, got a "
                            f"{type(meta).__name__.replace('dict', 'object')}")

    def need(key, kind, what):
        if key not in meta:
            raise MpitrainError(f"{path}: missing key {key!r}")
        value = meta[key]
        ok = _integer(value) if kind is int else isinstance(value, kind)
        if not ok:
            raise MpitrainError(f"{path}: key {key!r} should be {what}, got {value!r}")
        return value

    if meta.get("format") != FORMAT:
        raise MpitrainError(f"{path}: key 'format' should be {FORMAT!r}, got "
                            f"{meta.get('format')!r}")
    if need("version", int, "an integer") > VERSION:
        raise MpitrainError(f"{path}: format version {meta['version']} is newer than "
                            f"this mpitrain reads ({VERSION})")
    features = need("features", list, "a list of positive integers")
    if not features or not all(_integer(f) and f > 0 for f in features):
        raise MpitrainError(f"{path}: key 'features' should be a list of positive "
                            f"integers, got {features!r}")
    dtype = need("dtype", str, "a float type such as 'float32'")
    try:
        kind = np.dtype(dtype).kind
    except (TypeError, ValueError):
        kind = None
    if kind != "f":
        raise MpitrainError(f"{path}: key 'dtype' should be a float type such as 'float32', "
                            f"got {dtype!r}")
    classes = need("classes", int, "an integer >= 2")
    if classes < 2:
        raise MpitrainError(f"{path}: key 'classes' should be an integer >= 2, got {classes}")
    splits: Dict[str, List[Tuple[str, int]]] = {}
    for split, shards in need("splits", dict, 'an object {"train": [...], ...}').items():
        if not isinstance(shards, list):
            raise MpitrainError(f"{path}: splits.{split} should be a list of shards, got "
                                f"{shards!r}")
        for k, shard in enumerate(shards):
            where = f"{path}: splits.{split}[{k}]"
            if (not isinstance(shard, dict) or set(shard) != {"file", "rows"}
                    or not isinstance(shard["file"], str) or not _integer(shard["rows"])
                    or shard["rows"] < 0):
                raise MpitrainError(f'{where} should be {{"file": NAME, "rows": N >= 0}}, '
                                    f"got {shard!r}")
            try:
                shard_path(root, shard["file"])
            except ValueError as exc:
                raise MpitrainError(f"{where}.file {shard['file']!r} {exc}: shard files are "
                                    "named by paths inside the dataset directory") from None
        splits[split] = [(s["file"], s["rows"]) for s in shards]
    if not splits.get("train"):
        raise MpitrainError(f"{path}: no 'train' split")
    return Manifest(root, features, dtype, classes, splits)
