"""``data index``: a manifest over the user's own HDF5 files, read in place, nothing copied.

The files must lie inside the dataset directory (default: their common
directory), so reads stay confined to it; the manifest names them by their
paths relative to it, with their own dataset paths and the row ranges of
each split (``--val-fraction``: a random share of blocks; or ``--val FILE``:
whole files).  The data checks then work on it as on prepared shards.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

from ..runtime import ConfigError, MpitrainError, literal
from .manifest import Entry, Manifest, write_manifest
from .sources import open_sources, scan_targets, split_blocks

__all__ = ["index_files", "make_index"]


def index_files(files: Sequence[str], x_key: str, y_key: str, out: Optional[str] = None, *,
                val_fraction: float = 0.0, val_files: Sequence[str] = (), seed: int = 0,
                task: str = "auto", classes: Optional[int] = None) -> Manifest:
    """Write ``out/manifest.json`` over ``files`` (and ``val_files``) in place; return it."""
    m = make_index(files, x_key, y_key, out, val_fraction=val_fraction, val_files=val_files,
                   seed=seed, task=task, classes=classes, refuse_existing=True)
    os.makedirs(m.root, exist_ok=True)
    write_manifest(m, m.root)
    return m


def make_index(files: Sequence[str], x_key: str, y_key: str, out: Optional[str] = None, *,
               val_fraction: float = 0.0, val_files: Sequence[str] = (), seed: int = 0,
               task: str = "auto", classes: Optional[int] = None,
               refuse_existing: bool = False) -> Manifest:
    """The manifest ``index_files`` writes, made in memory (nothing written)."""
    files, val_files = list(files), list(val_files)
    if not files:
        raise ConfigError("{files}: give at least one HDF5 file to index", ["files"])
    if val_files and val_fraction:
        raise ConfigError("{val} and {val_fraction}: give one of the two", ["val", "val_fraction"])
    everything = [os.path.abspath(p) for p in files + val_files]
    out = os.path.abspath(out) if out else os.path.commonpath(
        [os.path.dirname(p) for p in everything])
    top = os.path.realpath(out)
    for path in everything:
        real = os.path.realpath(path)
        if os.path.commonpath([top, real]) != top:
            raise ConfigError(f"{literal(path)} lies outside {{out}} {literal(out)}: a dataset "
                              "reads only files inside its directory (move the file, or "
                              "choose a directory that holds it)", ["out"])
    manifest_path = os.path.join(out, "manifest.json")
    if refuse_existing and os.path.exists(manifest_path):
        raise ConfigError(f"{literal(manifest_path)} already exists; choose another {{out}} "
                          "(nothing was written)", ["out"])
    sources = open_sources(everything, x_key, y_key)
    try:
        train_sources = sources[:len(files)]
        if val_files:
            ranges = {"train": [[(0, s.rows)] for s in train_sources],
                      "val": [[(0, s.rows)] for s in sources[len(files):]]}
            by_split = {"train": train_sources, "val": sources[len(files):]}
        else:
            ranges = split_blocks(train_sources, val_fraction, seed)
            by_split = {"train": train_sources, "val": train_sources}
        record = scan_targets(by_split["train"], ranges["train"], task, classes,
                              every=ranges["val"] if val_files else None)
        if not val_files and val_fraction:  # the validation rows are checked too
            scan_targets(by_split["val"], ranges["val"], record["name"],
                         record.get("classes"))
        splits = {}
        for split in ("train", "val"):
            entries = [Entry(os.path.relpath(s.path, out), sum(hi - lo for lo, hi in r), x_key,
                             y_key, r) for s, r in zip(by_split[split], ranges[split]) if r]
            if entries:
                splits[split] = entries
        if "train" not in splits:
            raise MpitrainError(f"{files[0]}: no training rows left")
        first = sources[0]
        m = Manifest(out, first.x.shape[1:], first.x.dtype.name, record, splits,
                     {"shape": list(first.y.shape[1:]), "dtype": first.y.dtype.name})
    finally:
        for s in sources:
            s.close()
    return m
