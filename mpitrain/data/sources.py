"""The user's own HDF5 files as a data source: their datasets checked, split, scanned.

``prepare --input FILE.h5`` (copying into shards) and ``data index`` (a
manifest over the files in place) share this: open each file's ``x`` and
``y`` datasets (any path, any chunking, any filter), check that they agree,
cut the rows into blocks (a chunk of ``x``, or less for small files) and
pick a random ``val_fraction`` of the blocks for validation, then scan the
targets of the training blocks once, streaming: the task (integer targets:
classification; 0/1 targets with ``task="multilabel"``; else regression),
the classes, the statistics regression targets are standardised with, and
every bad target (NaN, out of range, not 0/1) refused with its row.  Memory
stays bounded by a block, whatever the files' size.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..runtime import ConfigError, MpitrainError, literal
from .hdf5 import dataset, open_h5, unwritten
from .progress import Ticker
from .manifest import TASKS

__all__ = ["Source", "open_sources", "split_blocks", "scan_targets", "sane_classes",
           "BLOCK_ROWS"]

BLOCK_ROWS = 4096  # rows read at a time when the file's own chunks do not say


@dataclass
class Source:
    """One input file: its ``x`` and ``y`` datasets, open."""

    path: str
    f: object
    x: object
    y: object

    @property
    def rows(self) -> int:
        return int(self.x.shape[0])

    def block_rows(self, minimum_blocks: int = 200) -> int:
        """Rows per block: ``x``'s chunk, or fewer so that a small file still gives about
        ``minimum_blocks`` blocks to choose the validation split from."""
        chunks = getattr(self.x, "chunks", None)  # None: contiguous, or an in-memory array
        chunk = chunks[0] if chunks else BLOCK_ROWS
        return max(1, min(chunk, -(-self.rows // minimum_blocks)))

    def close(self) -> None:
        """Close the file (if it is one)."""
        if self.f is not None:
            self.f.close()


def open_sources(paths: Sequence[str], x_key: str, y_key: str) -> List[Source]:
    """Open each file's ``x_key`` and ``y_key`` datasets and check that they agree
    (features shape and dtype, target shape, rows of x and y); MpitrainError otherwise."""
    sources: List[Source] = []
    try:
        for path in paths:
            if not os.path.isfile(path):
                raise MpitrainError(f"{path}: no such file")
            try:
                f = open_h5(path)
            except OSError as exc:
                raise MpitrainError(f"{path}: not a readable HDF5 file: "
                                    f"{str(exc).splitlines()[0]}") from None
            try:
                x, y = dataset(f, x_key, path, "dataset (--x)"), dataset(f, y_key, path,
                                                                       "dataset (--y)")
            except BaseException:
                f.close()
                raise
            sources.append(Source(path, f, x, y))
            for ds in (x, y):
                problem = unwritten(ds, path)
                if problem:
                    raise MpitrainError(problem)
            if x.ndim < 1 or x.dtype.kind not in "fiu":
                raise MpitrainError(f"{path}: dataset {x_key!r} should hold numbers (samples, "
                                    f"...), got {x.dtype} {x.shape}")
            if y.ndim < 1 or y.dtype.kind not in "fiub":
                raise MpitrainError(f"{path}: dataset {y_key!r} should hold numbers (samples, "
                                    f"...), got {y.dtype} {y.shape}")
            if x.shape[0] != y.shape[0]:
                raise MpitrainError(f"{path}: {x_key!r} has {x.shape[0]} rows, {y_key!r} has "
                                    f"{y.shape[0]}")
            first = sources[0]
            for what, mine, theirs in [("feature shape", x.shape[1:], first.x.shape[1:]),
                                       ("dtype", x.dtype, first.x.dtype),
                                       ("target shape", y.shape[1:], first.y.shape[1:])]:
                if mine != theirs:
                    raise MpitrainError(f"{path}: {what} {mine} differs from {first.path}'s "
                                        f"{theirs}")
        if not sum(s.rows for s in sources):
            raise MpitrainError(f"{paths[0] if paths else 'no files'}: no samples")
    except BaseException:
        for s in sources:
            s.close()
        raise
    return sources


def _merge(ranges: List[Tuple[int, int]]) -> List[Tuple[int, int]]:
    out: List[Tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and out[-1][1] == lo:
            out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return out


def split_blocks(sources: Sequence[Source], val_fraction: float,
                 seed: int) -> Dict[str, List[List[Tuple[int, int]]]]:
    """The row ranges of each source in "train" and "val": ``val_fraction`` of all
    blocks, drawn from a generator keyed to (seed, 1), the rest for training."""
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"{{val_fraction}}: expected a value in [0, 1), got {val_fraction}",
                          ["val_fraction"])
    blocks = []  # (source, lo, hi)
    for k, s in enumerate(sources):
        b = s.block_rows()
        blocks += [(k, lo, min(s.rows, lo + b)) for lo in range(0, s.rows, b)]
    n_val = int(round(len(blocks) * val_fraction))
    chosen = set(np.random.default_rng([seed, 1]).permutation(len(blocks))[:n_val].tolist())
    out: Dict[str, List[List[Tuple[int, int]]]] = {
        split: [[] for _ in sources] for split in ("train", "val")}
    for i, (k, lo, hi) in enumerate(blocks):
        out["val" if i in chosen else "train"][k].append((lo, hi))
    return {split: [_merge(r) for r in per] for split, per in out.items()}


DISTINCT = 1 << 16  # labels counted apart at most: beyond, the count is not the concern


def sane_classes(classes: int, distinct: int, where: str) -> None:
    """Refuse a class count read from the largest label that most classes would never be
    seen in (a stray label of 1000 among 0/1 labels makes 1,001 classes; one of 2^40 a
    model no memory holds); ``classes`` given says such a count is meant."""
    if classes > 16 and classes > 2 * distinct:
        raise ConfigError(f"{literal(where)}: labels up to {classes - 1:,} make {classes:,} "
                          f"classes, and only {distinct:,} distinct labels occur: a stray "
                          "label? (give {classes} if that many are meant)", ["classes"])


def scan_targets(sources: Sequence[Source], train: Sequence[Sequence[Tuple[int, int]]],
                 task: str = "auto", classes: Optional[int] = None,
                 every: Optional[Sequence[Sequence[Tuple[int, int]]]] = None) -> Dict[str, object]:
    """The task record of the data (see ``data.manifest``), from one streaming pass over
    the targets: ``train`` gives the rows the statistics come from, ``every`` (default:
    ``train``) the rows checked."""
    first = sources[0]
    shape = list(first.y.shape[1:])
    kind = first.y.dtype.kind
    if task == "auto":
        task = "classification" if kind in "iu" and not shape else "regression"
    if task not in TASKS:
        raise ConfigError(f"{{task}}: expected auto or one of {', '.join(TASKS)}, got "
                          f"{literal(repr(task))}", ["task"])
    if task == "classification" and (shape or kind not in "iu"):
        raise MpitrainError(f"{first.path}: classification needs 1-D integer labels, "
                            f"'y' is {first.y.dtype} {tuple(first.y.shape)}")
    k = int(np.prod(shape)) if shape else 1
    total, total2, n, top = np.zeros(k), np.zeros(k), 0, -1
    distinct: set = set()  # the labels that occur (up to DISTINCT of them)
    rows = sum(hi - lo for rs in train for lo, hi in rs) + sum(
        hi - lo for rs in (every or []) for lo, hi in rs)
    ticker = Ticker(f"scanning the targets of {first.path}",
                    rows * max(1, first.y.dtype.itemsize * k))
    shift = None  # sums of (y - shift): no cancellation when the mean is far from 0
    for part, ranges in (("train", train), ("val", every)):
        if part == "val" and every is None:
            continue
        for s, rs in zip(sources, ranges if part == "train" else every):
            b = s.block_rows()
            for lo, hi in rs:
                for a in range(lo, hi, b):
                    t = s.y[a:min(hi, a + b)]
                    ticker.add(t.nbytes)
                    flat = t.reshape(len(t), -1).astype(np.float64)
                    if task == "classification":
                        if t.size and t.min() < 0:
                            row = a + int(np.argmin(t))
                            raise MpitrainError(f"{s.path}: negative label {t.min()} at row "
                                                f"{row}")
                        top = max(top, int(t.max()) if t.size else -1)
                        if len(distinct) <= DISTINCT:
                            distinct.update(np.unique(t).tolist())
                        continue
                    bad = ~np.isfinite(flat).all(axis=1)
                    if task == "multilabel":
                        bad |= ~np.isin(flat, (0.0, 1.0)).all(axis=1)
                    if bad.any():
                        row = a + int(np.argmax(bad))
                        what = ("a value other than 0 or 1" if task == "multilabel"
                                else "NaN or inf")
                        raise MpitrainError(f"{s.path}: {what} in the targets at row {row}")
                    if part == "train" and task == "regression" and len(flat):
                        shift = flat[0].copy() if shift is None else shift
                        d = flat - shift
                        total += d.sum(axis=0)
                        total2 += (d * d).sum(axis=0)
                        n += len(flat)
    if task == "classification":
        seen = top + 1
        if classes is None:
            sane_classes(seen, len(distinct), first.path)
        classes = max(seen, 2) if classes is None else classes
        if seen > classes:
            raise ConfigError(f"label {seen - 1} is out of range for {{classes}} {classes}",
                              ["classes"])
        return {"name": task, "classes": int(classes)}
    if task == "multilabel":
        return {"name": task, "shape": shape}
    centred = total / max(n, 1)
    std = np.sqrt(np.maximum(total2 / max(n, 1) - centred * centred, 0.0))
    mean = centred + (shift if shift is not None else 0.0)
    std = np.where(std > 0, std, 1.0)  # a constant target: left as it is
    return {"name": task, "shape": shape, "mean": mean.tolist(), "std": std.tolist()}
