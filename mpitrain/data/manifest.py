"""The dataset manifest: a directory's ``manifest.json``, parsed and checked.

A dataset is a directory holding ``manifest.json`` and HDF5 files, either
shards written by ``prepare`` or the user's own files indexed in place
(``data index``)::

    {"format": "mpitrain.shards", "version": 2,
     "features": [1, 8, 8], "dtype": "float32",      # one sample's shape; stored dtype
     "task": {"name": "classification", "classes": 10},
     "targets": {"shape": [], "dtype": "int64"},      # one sample's target
     "splits": {"train": [{"file": "train-00000.h5", "rows": 4500, "x": "x", "y": "y",
                           "ranges": [[0, 4500]]}, ...],
                "val":   [...]}}

``task`` is ``{"name": "classification", "classes": C}``, ``{"name":
"regression", "shape": [...], "mean": [...], "std": [...]}`` (the training
split's statistics, per output) or ``{"name": "multilabel", "shape": [L]}``.
A shard entry names its file (a relative path inside the directory), its
datasets ``x`` and ``y`` (any path within the file) and the row ranges
``[lo, hi)`` of those datasets that belong to the split (``rows`` is their
total).  Version 1 (``"classes"`` at the top, datasets ``x``/``y``, whole
files) is still read.  Global sample ids number a split's rows across its
entries in manifest order.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..paths import kind_of
from ..runtime import MpitrainError

__all__ = ["FORMAT", "VERSION", "X_KEY", "Y_KEY", "Entry", "Manifest", "read_manifest",
           "parse_manifest", "outputs_of", "overlap",
           "write_manifest", "shard_path"]

FORMAT, VERSION = "mpitrain.shards", 2
X_KEY, Y_KEY = "x", "y"
TASKS = ("classification", "regression", "multilabel")  # see model.tasks


@dataclass
class Entry:
    """One file's part of a split: rows ``ranges`` of its datasets ``x`` and ``y``."""

    file: str
    rows: int
    x: str = X_KEY
    y: str = Y_KEY
    ranges: List[Tuple[int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.ranges:
            self.ranges = [(0, self.rows)]

    def to_json(self) -> dict:
        """The entry as ``manifest.json`` holds it."""
        return {"file": self.file, "rows": self.rows, "x": self.x, "y": self.y,
                "ranges": [list(r) for r in self.ranges]}


def outputs_of(task: Dict[str, object]) -> int:
    """The model's output width a task record needs: classes, outputs or labels."""
    if task["name"] == "classification":
        return int(task["classes"])
    shape = task.get("shape") or []
    return int(np.prod(shape)) if shape else 1


class Manifest:
    """The parsed ``manifest.json`` of a dataset directory."""

    def __init__(self, root: str, features: Sequence[int], dtype: str,
                 task: Dict[str, object], splits: Dict[str, List[Entry]],
                 targets: Optional[Dict[str, object]] = None):
        self.root = root
        self.features = tuple(int(f) for f in features)
        self.dtype = np.dtype(dtype)
        self.task = task  # {"name": ..., ...}: model.tasks.make_task makes the Task
        self.targets = targets or {"shape": [], "dtype": "int64"}
        self.splits = splits  # split -> its entries

    @property
    def path(self) -> str:
        return os.path.join(self.root, "manifest.json")

    @property
    def classes(self) -> Optional[int]:
        """The number of classes of a classification task, else None."""
        return self.task.get("classes") if self.task["name"] == "classification" else None

    @property
    def outputs(self) -> int:
        """The model's output width the task needs: classes, outputs or labels."""
        return outputs_of(self.task)

    def rows(self, split: str) -> int:
        """Number of samples in ``split`` (0 if the split is absent)."""
        return sum(e.rows for e in self.splits.get(split, []))

    def to_json(self) -> dict:
        """The manifest as ``manifest.json`` holds it."""
        return {"format": FORMAT, "version": VERSION, "features": list(self.features),
                "dtype": self.dtype.name, "task": self.task,
                "targets": self.targets,
                "splits": {s: [e.to_json() for e in entries]
                           for s, entries in self.splits.items()}}


def write_manifest(m: Manifest, directory: str) -> None:
    """Write ``m`` as ``directory/manifest.json``, whole or not at all."""
    from ..paths import replace

    with replace(os.path.join(directory, "manifest.json")) as f:
        json.dump(m.to_json(), f, indent=1)
        f.write("\n")


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


def _entry(root: str, path: str, where: str, shard, version: int) -> Entry:
    keys = {"file", "rows"} if version == 1 else {"file", "rows", "x", "y", "ranges"}
    form = ('{"file": NAME, "rows": N >= 0}' if version == 1 else
            '{"file": NAME, "rows": N, "x": KEY, "y": KEY, "ranges": [[LO, HI], ...]}')
    if (not isinstance(shard, dict) or set(shard) - keys or not {"file", "rows"} <= set(shard)
            or not isinstance(shard["file"], str) or not _integer(shard["rows"])
            or shard["rows"] < 0
            or any(not isinstance(shard.get(k, "x"), str) or not shard.get(k, "x")
                   for k in ("x", "y"))):
        raise MpitrainError(f"{where} should be {form}, got {shard!r}")
    try:
        shard_path(root, shard["file"])
    except ValueError as exc:
        raise MpitrainError(f"{where}.file {shard['file']!r} {exc}: shard files are named by "
                            "paths inside the dataset directory") from None
    ranges = shard.get("ranges", [[0, shard["rows"]]])
    if (not isinstance(ranges, list) or not all(
            isinstance(r, list) and len(r) == 2 and all(_integer(v) for v in r)
            and 0 <= r[0] <= r[1] for r in ranges)):
        raise MpitrainError(f"{where}.ranges should be a list of [lo, hi] row ranges with "
                            f"0 <= lo <= hi, got {ranges!r}")
    if sum(hi - lo for lo, hi in ranges) != shard["rows"]:
        raise MpitrainError(f"{where}: its ranges hold {sum(hi - lo for lo, hi in ranges)} "
                            f"rows, its 'rows' says {shard['rows']}")
    return Entry(shard["file"], shard["rows"], shard.get("x", X_KEY), shard.get("y", Y_KEY),
                 [tuple(r) for r in ranges])


def _task(path: str, meta: dict, version: int) -> Dict[str, object]:
    """The task of a manifest, checked."""
    if version == 1:
        classes = meta.get("classes")
        if not _integer(classes) or classes < 2:
            raise MpitrainError(f"{path}: key 'classes' should be an integer >= 2, got "
                                f"{classes!r}")
        return {"name": "classification", "classes": classes}
    record = meta.get("task")
    if not isinstance(record, dict) or record.get("name") not in TASKS:
        raise MpitrainError(f"{path}: key 'task' should be an object with a name among "
                            f"{', '.join(TASKS)}, got {record!r}")
    name = record["name"]
    if name == "classification":
        classes = record.get("classes")
        if not _integer(classes) or classes < 2:
            raise MpitrainError(f"{path}: task.classes should be an integer >= 2, got "
                                f"{classes!r}")
    else:
        shape = record.get("shape")
        if not isinstance(shape, list) or not all(_integer(s) and s > 0 for s in shape):
            raise MpitrainError(f"{path}: task.shape should be a list of positive integers, "
                                f"got {shape!r}")
        k = int(np.prod(shape)) if shape else 1
        for key in ("mean", "std") if name == "regression" else ():
            value = record.get(key)
            ok = (value is None or isinstance(value, list) and len(value) == k and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)
                for v in value))
            if not ok or (key == "std" and value is not None and min(value) <= 0):
                raise MpitrainError(f"{path}: task.{key} should be a list of {k} finite "
                                    f"numbers{' > 0' if key == 'std' else ''}, got {value!r}")
    return dict(record)


def read_manifest(root: str) -> Manifest:
    """Parse and check ``root/manifest.json``; errors name the file and the key.

    Shard files are named by relative paths inside ``root`` (symbolic links
    resolved): anything else is refused, so reads stay in the directory.
    """
    path = os.path.join(root, "manifest.json")
    if not os.path.isdir(root):
        raise MpitrainError(f"{root}: no such dataset directory "
                            "(make one with 'python -m mpitrain prepare' or 'data index')")
    kind = kind_of(path)
    if kind not in (None, "file"):  # a FIFO would be read for ever
        raise MpitrainError(f"{path}: {'a directory' if kind == 'directory' else kind}, not a "
                            "manifest file")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise MpitrainError(f"{path}: missing (a dataset directory needs a manifest; make "
                            "one with 'python -m mpitrain prepare' or 'data index')") from None
    except (OSError, ValueError) as exc:
        raise MpitrainError(f"{path}: unreadable: {exc}") from None
    return parse_manifest(meta, root, path)


def parse_manifest(meta, root: str, path: str) -> Manifest:
    """Check a manifest's JSON object ``meta`` (from ``path``, describing the dataset
    directory ``root``); errors name ``path`` and the key."""
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
    version = need("version", int, "an integer")
    if version > VERSION:
        raise MpitrainError(f"{path}: format version {version} is newer than this mpitrain "
                            f"reads ({VERSION})")
    features = need("features", list, "a list of positive integers")
    if not features or not all(_integer(f) and f > 0 for f in features):
        raise MpitrainError(f"{path}: key 'features' should be a list of positive "
                            f"integers, got {features!r}")
    dtype = need("dtype", str, "a numeric type such as 'float32'")
    try:
        kind = np.dtype(dtype).kind
    except (TypeError, ValueError):
        kind = None
    if kind not in (("f",) if version == 1 else ("f", "i", "u")):
        raise MpitrainError(f"{path}: key 'dtype' should be a "
                            f"{'float' if version == 1 else 'numeric'} type such as "
                            f"'float32', got {dtype!r}")
    task = _task(path, meta, version)
    targets = meta.get("targets", {"shape": [], "dtype": "int64"})
    if version > 1 and (not isinstance(targets, dict) or set(targets) != {"shape", "dtype"}
                        or not isinstance(targets["shape"], list)
                        or not isinstance(targets["dtype"], str)):
        raise MpitrainError(f'{path}: key \'targets\' should be {{"shape": [...], "dtype": '
                            f'NAME}}, got {targets!r}')
    splits: Dict[str, List[Entry]] = {}
    for split, shards in need("splits", dict, 'an object {"train": [...], ...}').items():
        if not isinstance(shards, list):
            raise MpitrainError(f"{path}: splits.{split} should be a list of shards, got "
                                f"{shards!r}")
        splits[split] = [_entry(root, path, f"{path}: splits.{split}[{k}]", shard, version)
                         for k, shard in enumerate(shards)]
    if not splits.get("train"):
        raise MpitrainError(f"{path}: no 'train' split")
    problem = overlap(splits)
    if problem:
        raise MpitrainError(f"{path}: {problem}: a row would be read twice (a validation row "
                            "trained on, or a sample counted twice)")
    return Manifest(root, features, dtype, task, splits, targets)


def overlap(splits: Dict[str, List[Entry]]) -> Optional[str]:
    """Where two entries (or two ranges of one) claim the same rows of the same dataset of
    the same file, within a split or across splits, or None."""
    claims: Dict[tuple, List[tuple]] = {}  # (file, x dataset) -> [(lo, hi, where)]
    for split in sorted(splits):
        for k, e in enumerate(splits[split]):
            key = (os.path.normpath(e.file), "/" + e.x.strip("/"))
            for lo, hi in e.ranges:
                if hi > lo:
                    claims.setdefault(key, []).append((lo, hi, f"splits.{split}[{k}]"))
    for (file, x), spans in claims.items():
        spans.sort()
        for (a0, a1, first), (b0, b1, second) in zip(spans, spans[1:]):
            if b0 < a1:
                both = first if first == second else f"{first} and {second}"
                return (f"{both} both hold rows {b0}..{min(a1, b1) - 1} of {file} "
                        f"(dataset {x})")
    return None
