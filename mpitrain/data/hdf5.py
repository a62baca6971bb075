"""Opening a shard's datasets safely: reads confined to the file, and the fast mapped view.

A shard must hold its data itself.  HDF5 can make a dataset read another
file without a word: an external link (``ExternalLink``), a virtual dataset
(whose sources may be other files, and whose missing sources read as fill
values: silent zeros), or external raw storage.  ``dataset`` refuses all
three before anything is followed, so no read leaves the dataset directory.

``mapped`` gives a read-only memory map of a contiguous dataset at the
offset HDF5 reports, the fast path (reading a row touches just its pages and
skips h5py's per-call cost, ~10 us per selection); every other layout is
read through h5py.  The map reads exactly the bytes h5py would: only a
contiguous, allocated dataset of this very file is mapped, with its own
dtype (byte order included).
"""
from __future__ import annotations

import posixpath
from typing import Optional

import numpy as np

from ..runtime import MpitrainError

__all__ = ["open_h5", "dataset", "mapped", "unwritten", "MATERIALISE"]

MATERIALISE = ("copy its data into the shard (h5py: f.create_dataset(name, data=src[()]); "
               "or h5repack), or write the dataset with 'python -m mpitrain prepare'")


def open_h5(path: str):
    """Open an HDF5 file read-only, without file locking (Lustre, NFS, shared reads)."""
    import h5py

    return h5py.File(path, "r", locking=False)


def _resolve(f, key: str, path: str, depth: int = 0) -> str:
    """The absolute path of ``key`` in ``f`` with every soft link resolved, refusing an
    external link at any component (before HDF5 would open the other file)."""
    import h5py

    if depth > 8:
        raise MpitrainError(f"{path}: dataset {key!r}: too many soft links")
    here = "/"
    for part in [p for p in key.split("/") if p]:
        name = posixpath.join(here, part)
        link = f.get(name, getlink=True)
        if link is None:
            raise KeyError(name)
        if isinstance(link, h5py.ExternalLink):
            raise MpitrainError(
                f"{path}: dataset {key!r} is an external link to {link.filename}:{link.path}; "
                f"a shard's data must lie in the shard: {MATERIALISE}")
        if isinstance(link, h5py.SoftLink):
            target = posixpath.normpath(posixpath.join(here, link.path))
            name = _resolve(f, target, path, depth + 1)
        here = name
    return here


def dataset(f, key: str, path: str, what: str = "dataset"):
    """The dataset ``key`` of the open shard ``f`` (file ``path``), whose data lies in
    ``f`` itself; MpitrainError naming the file and the dataset otherwise."""
    import h5py

    try:
        obj = f[_resolve(f, key, path)]
    except KeyError:
        raise MpitrainError(f"{path}: missing {what} {key!r}") from None
    if not isinstance(obj, h5py.Dataset):
        raise MpitrainError(f"{path}: {key!r} is an HDF5 {type(obj).__name__.lower()}, "
                            f"expected a dataset")
    if obj.is_virtual:
        sources = sorted({s.file_name for s in obj.virtual_sources()})
        raise MpitrainError(f"{path}: dataset {key!r} is a virtual dataset (its data comes "
                            f"from {', '.join(sources)}); {MATERIALISE}")
    if obj.external:
        files = sorted({e[0] if isinstance(e[0], str) else e[0].decode() for e in obj.external})
        raise MpitrainError(f"{path}: dataset {key!r} keeps its data in external files "
                            f"({', '.join(files)}); {MATERIALISE}")
    return obj


def unwritten(ds, path: str) -> Optional[str]:
    """Why dataset ``ds`` of file ``path`` holds rows that were never written (they would
    read as fill values, and reading them all could take for ever), or None.  Counting
    the chunks written costs the size of the chunk index, not of the data."""
    import math

    if ds.size == 0 or ds.is_virtual or ds.external:
        return None
    if ds.chunks is None:
        layout = ds.id.get_create_plist().get_layout()
        if layout == h5d_contiguous() and ds.id.get_offset() is None:
            return (f"{path}: dataset {ds.name!r} declares {ds.shape[0]:,} rows and none was "
                    "ever written")
        return None
    grid = math.prod(-(-n // c) for n, c in zip(ds.shape, ds.chunks))
    written = ds.id.get_num_chunks()
    if written < grid:
        held = written * ds.chunks[0] if ds.ndim == 1 or grid == -(-ds.shape[0] //
                                                                   ds.chunks[0]) else None
        rows = f" (about {held:,} rows)" if held is not None else ""
        return (f"{path}: dataset {ds.name!r} declares {ds.shape[0]:,} rows in {grid:,} chunks, "
                f"and only {written:,} chunks were written{rows}: the others would read as "
                "fill values; write every row, or shrink the dataset to the rows written "
                "(h5py: ds.resize(n, axis=0))")
    return None


def h5d_contiguous() -> int:
    """HDF5's layout code of a contiguous dataset."""
    import h5py

    return h5py.h5d.CONTIGUOUS


def mapped(ds, path: str) -> Optional[np.ndarray]:
    """A read-only memory map of dataset ``ds`` of file ``path``, or None if its layout
    is not a contiguous, allocated block of that file (then read it through h5py)."""
    import h5py

    if ds.size == 0 or ds.chunks is not None or ds.is_virtual or ds.external:
        return None
    if ds.id.get_create_plist().get_layout() != h5py.h5d.CONTIGUOUS:
        return None  # compact: stored in the object header
    offset = ds.id.get_offset()
    if offset is None:  # never written: h5py reads the fill value
        return None
    import os

    size = os.path.getsize(path)
    if offset + ds.nbytes > size:
        raise MpitrainError(f"{path}: dataset {ds.name!r} ends at byte {offset + ds.nbytes}, "
                            f"past the end of the file ({size} bytes): truncated?")
    return np.memmap(path, dtype=ds.dtype, mode="r", offset=offset, shape=ds.shape)
