"""Write datasets in the sharded HDF5 format: from an .npz or HDF5 file, or synthetic.

An HDF5 input is streamed: read a block at a time (its own chunks, or 4,096
rows), split into training and validation blocks, scanned once for the task
and its statistics, then copied into shards, so peak memory does not grow
with the dataset.  An .npz is loaded whole, then written the same way.  A
dataset directory is written under a temporary name and renamed into place
when complete, so a reader never sees half a dataset and an existing
directory is never overwritten.
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
import zipfile
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..balance import rank_slice
from ..runtime import ConfigError, MpitrainError, literal
from .manifest import X_KEY, Y_KEY, Entry, Manifest, write_manifest
from .sources import Source, open_sources, scan_targets, split_blocks

__all__ = ["write_dataset", "from_npz", "from_hdf5", "synthetic", "split_val"]

BLOCK = 4096  # rows generated or copied at a time, to bound memory


def _refuse_existing(out: str) -> None:
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ConfigError(f"{literal(out)}: already exists and is not empty; choose another "
                          "{out} (nothing was written)", ["out"])


def write_dataset(out: str, features: Tuple[int, ...], task: Dict[str, object], dtype,
                  splits: dict, shards: int,
                  targets: Optional[Dict[str, object]] = None) -> Manifest:
    """Write ``splits`` {name: (rows, rows_fn)} as shards; ``rows_fn(lo, hi)`` gives (x, y).

    Each split is cut into ``shards`` files of nearly equal rows (fewer if
    it has fewer rows); ``targets`` is one sample's target shape and dtype
    (default: an int64 label).  Returns the manifest written.
    """
    _refuse_existing(out)
    if shards < 1:
        raise ConfigError(f"{{shards}}: expected a value >= 1, got {shards}", ["shards"])
    import h5py

    targets = targets or {"shape": [], "dtype": "int64"}
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(out) + "-", dir=parent)
    try:
        listing: Dict[str, List[Entry]] = {}
        for split, (rows, rows_fn) in splits.items():
            count = max(1, min(shards, rows))
            listing[split] = []
            for k in range(count):
                lo, hi = rank_slice(rows, k, count)
                name = f"{split}-{k:05d}-of-{count:05d}.h5"
                with h5py.File(os.path.join(tmp, name), "w", locking=False) as f:
                    x = f.create_dataset(X_KEY, (hi - lo, *features), dtype=dtype)
                    y = f.create_dataset(Y_KEY, (hi - lo, *targets["shape"]),
                                         dtype=targets["dtype"])
                    for a in range(lo, hi, BLOCK):
                        b = min(hi, a + BLOCK)
                        xb, yb = rows_fn(a, b)
                        x[a - lo:b - lo] = xb.reshape(b - a, *features)
                        y[a - lo:b - lo] = yb.reshape(b - a, *targets["shape"])
                listing[split].append(Entry(name, hi - lo))
        m = Manifest(out, features, np.dtype(dtype).name, task, listing, targets)
        write_manifest(m, tmp)
        _refuse_existing(out)
        if os.path.isdir(out):
            os.rmdir(out)  # empty: checked just above
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp made it 0700: give it the user's umask
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return m


def _reader(sources: Sequence[Source], ranges: Sequence[Sequence[Tuple[int, int]]],
            x_key: str) -> Callable[[int, int], Tuple[np.ndarray, np.ndarray]]:
    """``rows_fn(lo, hi)``: rows [lo, hi) of a split made of ``ranges`` of ``sources``,
    read piece by piece (each a plain slice of a file's datasets); refuses NaN or inf
    in the features, naming the file and row."""
    pieces = [(k, lo, hi) for k, rs in enumerate(ranges) for lo, hi in rs]
    starts = np.cumsum([0] + [hi - lo for _, lo, hi in pieces])

    def rows_fn(a: int, b: int) -> Tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        j = int(np.searchsorted(starts, a, side="right") - 1)
        while a < b:
            k, lo, hi = pieces[j]
            r0 = lo + a - starts[j]
            r1 = min(hi, r0 + b - a)
            s = sources[k]
            x = np.asarray(s.x[r0:r1])
            if x.dtype.kind == "f":
                bad = np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(axis=1))
                if bad.size:
                    raise MpitrainError(f"{s.path}: NaN or inf in {x_key!r} at row "
                                        f"{r0 + bad[0]}")
            xs.append(x)
            ys.append(np.asarray(s.y[r0:r1]))
            a += r1 - r0
            j += 1
        return np.concatenate(xs), np.concatenate(ys)

    return rows_fn


def _from_sources(sources: Sequence[Source], out: str, shards: int, val_fraction: float,
                  seed: int, task: str, classes: Optional[int], x_key: str) -> Manifest:
    """Split, scan and write ``sources`` (see the module's docstring)."""
    ranges = split_blocks(sources, val_fraction, seed)
    record = scan_targets(sources, ranges["train"], task, classes, every=ranges["val"])
    first = sources[0]
    splits = {}
    for split in ("train", "val"):
        rows = sum(hi - lo for rs in ranges[split] for lo, hi in rs)
        if rows:
            splits[split] = (rows, _reader(sources, ranges[split], x_key))
    if "train" not in splits:
        raise MpitrainError(f"{first.path}: no training rows left")
    target_dtype = first.y.dtype.name if record["name"] != "classification" else "int64"
    return write_dataset(out, tuple(first.x.shape[1:]), record, first.x.dtype, splits, shards,
                         {"shape": list(first.y.shape[1:]), "dtype": target_dtype})


def from_hdf5(path: str, out: str, shards: int, val_fraction: float = 0.0, seed: int = 0,
              classes: Optional[int] = None, x_key: str = "x", y_key: str = "y",
              task: str = "auto") -> Manifest:
    """Copy datasets ``x_key`` and ``y_key`` of an HDF5 file into shards, streaming."""
    _refuse_existing(out)
    sources = open_sources([path], x_key, y_key)
    try:
        return _from_sources(sources, out, shards, val_fraction, seed, task, classes, x_key)
    finally:
        for s in sources:
            s.close()


def split_val(n: int, val_fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """(train ids, val ids), a random split of range(n) from ``seed``, each sorted."""
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"{{val_fraction}}: expected a value in [0, 1), got {val_fraction}",
                          ["val_fraction"])
    n_val = int(round(n * val_fraction))
    perm = np.random.default_rng([seed, 1]).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def _open_npz(path: str):
    """``np.load`` of an .npz, with what the file is instead when it is not one."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as exc:
        raise MpitrainError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if head.startswith(b"\x89HDF\r\n\x1a\n"):
        raise MpitrainError(f"{path}: an HDF5 file, not an .npz (arrays saved with np.savez)")
    if head.startswith(b"\x93NUMPY"):
        raise MpitrainError(f"{path}: a single array (.npy), not an .npz of named arrays; "
                            "save x and y together with np.savez")
    if not head.startswith(b"PK"):
        raise MpitrainError(f"{path}: not an .npz file (an .npz is a zip of arrays saved with "
                            f"np.savez; this one starts with {head[:4]!r})")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise MpitrainError(f"{path}: damaged .npz: {exc}") from None


def from_npz(path: str, out: str, shards: int, val_fraction: float = 0.0, seed: int = 0,
             classes: Optional[int] = None, x_key: str = "x", y_key: str = "y",
             task: str = "auto") -> Manifest:
    """Convert arrays ``x`` (samples, *features) and ``y`` (samples, ...) of an .npz into
    shards."""
    _refuse_existing(out)
    npz = _open_npz(path)
    with npz:
        for key in (x_key, y_key):
            if key not in npz:
                raise MpitrainError(f"{path}: missing array {key!r} (has {sorted(npz.files)})")
        try:
            x, y = npz[x_key], npz[y_key]
        except ValueError as exc:  # object arrays, refused without pickle
            raise MpitrainError(f"{path}: an array holds Python objects ({exc}); save numeric "
                                "arrays (np.savez(path, x=..., y=...) of numbers)") from None
        except (OSError, EOFError, zipfile.BadZipFile) as exc:
            raise MpitrainError(f"{path}: damaged .npz: {exc}") from None
    if x.ndim < 2 or x.dtype.kind not in "fiub":
        raise MpitrainError(f"{path}: array {x_key!r} should be numeric (samples, features), "
                            f"got {x.dtype} {x.shape}")
    if y.ndim < 1 or y.dtype.kind not in "fiub":
        raise MpitrainError(f"{path}: array {y_key!r} should be numeric targets (samples, ...)"
                            f", got {y.dtype} {y.shape}")
    if len(x) != len(y):
        raise MpitrainError(f"{path}: {x_key!r} has {len(x)} samples, {y_key!r} has {len(y)}")
    if len(x) == 0:
        raise MpitrainError(f"{path}: no samples")
    if x.dtype.kind != "f":
        x = x.astype(np.float32)
    return _from_sources([Source(path, None, x, y)], out, shards, val_fraction, seed, task,
                         classes, x_key)


def synthetic_rows(samples: int, features: int, classes: int,
                   seed: int) -> Callable[[int, int], Tuple[np.ndarray, np.ndarray]]:
    """A function (lo, hi) -> (x, y) giving rows of a deterministic, learnable set.

    Each class is a Gaussian cloud around its own random centre, passed
    through tanh so the classes are not linearly separable everywhere; row
    blocks come from generators keyed by (seed, block), so any row range
    is the same whichever way the set is sharded.
    """
    # Centres ~ N(0, 9/features): two centres lie about 4.2 noise deviations
    # apart whatever the feature count, so a good model reaches ~90%.
    centres = np.random.default_rng([seed, 0]).normal(0, 3 / math.sqrt(features),
                                                      (classes, features))

    def block(j: int) -> Tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([seed, 1, j])
        n = min(BLOCK, samples - j * BLOCK)
        y = rng.integers(0, classes, n)
        x = np.tanh(centres[y] + rng.normal(0, 1.0, (n, features)))
        return x.astype(np.float32), y

    def rows(lo: int, hi: int) -> Tuple[np.ndarray, np.ndarray]:
        parts = [block(j) for j in range(lo // BLOCK, -(-hi // BLOCK))]
        x = np.concatenate([p[0] for p in parts])
        y = np.concatenate([p[1] for p in parts])
        start = (lo // BLOCK) * BLOCK
        return x[lo - start:hi - start], y[lo - start:hi - start]

    return rows


def synthetic(out: str, samples: int, features: int, classes: int, seed: int = 0,
              shards: int = 4, val_fraction: float = 0.1) -> Manifest:
    """Write the synthetic classification set: ``samples`` rows, the last ``val_fraction`` for validation."""
    if samples < 2 or features < 1 or classes < 2:
        raise ConfigError(f"synthetic data needs {{samples}} >= 2, {{features}} >= 1 and "
                          f"{{classes}} >= 2, got {samples}, {features}, {classes}",
                          ["samples", "features", "classes"])
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"{{val_fraction}}: expected a value in [0, 1), got {val_fraction}",
                          ["val_fraction"])
    rows = synthetic_rows(samples, features, classes, seed)
    n_val = int(round(samples * val_fraction))
    n_train = samples - n_val
    splits = {"train": (n_train, rows)}
    if n_val:
        splits["val"] = (n_val, lambda a, b: rows(n_train + a, n_train + b))
    return write_dataset(out, (features,), {"name": "classification", "classes": classes},
                         np.float32, splits, shards)

