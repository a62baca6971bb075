"""Crash-safe HDF5 checkpoints: one self-describing file per checkpoint.

Schema (format ``mpitrain.checkpoint``, version 1)::

    ckpt-000000200.h5
      attrs   format="mpitrain.checkpoint", format_version=1, mpitrain_version,
              step (steps done), epoch, epoch_step (steps done in that epoch),
              created (UTC, ISO 8601),
              config      JSON: the run's Config
              layout      JSON: {"world_size", "pp", "dp"} the job was written with
              sampler     JSON: {"seed", "batch_size", "samples", "drop_last"}
              rng         JSON: every generator's state (see below)
              optimizer   JSON: {"name", "steps", ...hyper-parameters}
              meta_crc32  CRC-32 of the JSON attributes above, joined by newlines
      params/<name>             one dataset per parameter, e.g. params/0.weight
      optimizer/<key>/<name>    optimizer state per parameter, e.g. optimizer/m/0.weight
      every dataset: attrs crc32 (CRC-32 of its bytes, C order)

Random state: the sample order of epoch e is a permutation drawn from a
fresh ``numpy.random.default_rng([seed, e])`` and initial weights from
``default_rng([seed, layer])``; neither generator carries state across steps,
so ``rng`` records those keys and (seed, epoch, epoch_step) restore the order
exactly.  Nothing is pickled: loading reads arrays and JSON text only.

A checkpoint is written under a temporary name (``.ckpt-*.tmp-*``), flushed,
fsynced, renamed into place and its directory fsynced, so a crash at any
moment leaves either the complete new file or none; leftovers of an
interrupted write are removed at the next start.
"""
from __future__ import annotations

import datetime
import json
import os
import re
import zlib
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from ..runtime import MpitrainError

__all__ = ["FORMAT", "VERSION", "State", "CheckpointError", "save", "load", "inspect", "listing",
           "newest_valid", "clean_leftovers", "prune", "crc32"]

FORMAT, VERSION = "mpitrain.checkpoint", 1
NAME = re.compile(r"^ckpt-(\d{9})\.h5$")
LEFTOVER = re.compile(r"^\.ckpt-\d{9}\.h5\.tmp-")
JSON_ATTRS = ("config", "layout", "sampler", "rng", "optimizer")


class CheckpointError(MpitrainError):
    """A checkpoint file that cannot be used, and why."""


@dataclass
class State:
    """What a checkpoint holds (arrays by parameter name)."""

    step: int
    epoch: int
    epoch_step: int
    params: Dict[str, np.ndarray]
    optimizer_state: Dict[str, Dict[str, np.ndarray]]  # key -> name -> array
    optimizer: Dict[str, object]  # {"name", "steps", ...}
    config: Dict[str, object]
    layout: Dict[str, int]
    sampler: Dict[str, object]
    rng: Dict[str, object] = field(default_factory=dict)
    mpitrain_version: str = ""


def crc32(arr: np.ndarray) -> int:
    """CRC-32 of an array's bytes in C order."""
    return zlib.crc32(memoryview(np.ascontiguousarray(arr)).cast("B")) & 0xFFFFFFFF


def _meta_crc(texts: List[str]) -> int:
    return zlib.crc32("\n".join(texts).encode()) & 0xFFFFFFFF


def file_name(step: int) -> str:
    """The checkpoint file of ``step``: ckpt-000000200.h5."""
    return f"ckpt-{step:09d}.h5"


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some systems cannot open directories; the rename still happened
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(directory: str, state: State, *,
         die_midway: Optional[Callable[[], None]] = None) -> Tuple[str, int]:
    """Write ``state`` as ``directory/ckpt-<step>.h5``, crash-safely; return (path, bytes).

    ``die_midway`` (fault injection) is called after half the datasets are
    written, before anything is renamed.
    """
    import h5py

    from .. import __version__

    os.makedirs(directory, exist_ok=True)
    final = os.path.join(directory, file_name(state.step))
    tmp = os.path.join(directory, f".{file_name(state.step)}.tmp-{os.getpid()}")
    texts = [json.dumps(getattr(state, key), sort_keys=True) for key in JSON_ATTRS]
    datasets = [(f"params/{n}", a) for n, a in state.params.items()]
    datasets += [(f"optimizer/{k}/{n}", a) for k, named in state.optimizer_state.items()
                 for n, a in named.items()]
    try:
        with h5py.File(tmp, "w", locking=False, libver="v110") as f:
            f.attrs["format"] = FORMAT
            f.attrs["format_version"] = VERSION
            f.attrs["mpitrain_version"] = __version__
            f.attrs["step"] = state.step
            f.attrs["epoch"] = state.epoch
            f.attrs["epoch_step"] = state.epoch_step
            f.attrs["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat()
            for key, text in zip(JSON_ATTRS, texts):
                f.attrs[key] = text
            f.attrs["meta_crc32"] = _meta_crc(texts)
            for k, (path, arr) in enumerate(datasets):
                if die_midway and k == len(datasets) // 2:
                    f.flush()
                    die_midway()
                ds = f.create_dataset(path, data=arr)
                ds.attrs["crc32"] = crc32(arr)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
        _fsync_dir(directory)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return final, os.path.getsize(final)


def load(path: str) -> State:
    """Read and verify a checkpoint; raise CheckpointError saying what is wrong."""
    return _read(path, strict=True)[0]


def inspect(path: str) -> Tuple[State, List[Tuple[str, Tuple[int, ...], str, bool]]]:
    """Read a checkpoint without stopping at a bad checksum: (state, [(dataset, shape,
    dtype, checksum holds)]).  Unreadable files still raise CheckpointError."""
    return _read(path, strict=False)


def _read(path: str, strict: bool):
    import h5py

    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    rows: List[Tuple[str, Tuple[int, ...], str, bool]] = []
    try:
        with h5py.File(path, "r", locking=False) as f:
            if f.attrs.get("format") != FORMAT:
                raise CheckpointError(f"{path}: not an mpitrain checkpoint "
                                      f"(format {f.attrs.get('format')!r})")
            version = int(f.attrs["format_version"])
            if version > VERSION:
                raise CheckpointError(f"{path}: format version {version} is newer than "
                                      f"this mpitrain reads ({VERSION})")
            texts = [str(f.attrs[key]) for key in JSON_ATTRS]
            meta_ok = _meta_crc(texts) == int(f.attrs["meta_crc32"])
            rows.append(("metadata", (), "json", meta_ok))
            if strict and not meta_ok:
                raise CheckpointError(f"{path}: checksum of the metadata does not match "
                                      "(file damaged)")
            meta = {key: json.loads(text) for key, text in zip(JSON_ATTRS, texts)}

            def read(ds) -> np.ndarray:
                arr = ds[()]
                ok = crc32(arr) == int(ds.attrs["crc32"])
                rows.append((ds.name.lstrip("/"), arr.shape, arr.dtype.name, ok))
                if strict and not ok:
                    raise CheckpointError(f"{path}: checksum of {ds.name.lstrip('/')} does "
                                          "not match (file damaged)")
                return arr

            params = {n: read(ds) for n, ds in f["params"].items()}
            opt_state = {k: {n: read(ds) for n, ds in group.items()}
                         for k, group in f.get("optimizer", {}).items()}
            state = State(step=int(f.attrs["step"]), epoch=int(f.attrs["epoch"]),
                          epoch_step=int(f.attrs["epoch_step"]), params=params,
                          optimizer_state=opt_state, optimizer=meta["optimizer"],
                          config=meta["config"], layout=meta["layout"],
                          sampler=meta["sampler"], rng=meta["rng"],
                          mpitrain_version=str(f.attrs["mpitrain_version"]))
            return state, rows
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - truncated or damaged HDF5: any error
        detail = str(exc).splitlines()[0] if str(exc) else "no detail"
        raise CheckpointError(f"{path}: unreadable ({type(exc).__name__}: {detail}; "
                              "truncated or damaged?)") from None


def listing(directory: str) -> List[Tuple[int, str]]:
    """(step, path) of every committed checkpoint file in ``directory``, oldest first."""
    if not os.path.isdir(directory):
        return []
    found = [(int(m.group(1)), os.path.join(directory, name))
             for name in os.listdir(directory) if (m := NAME.match(name))]
    return sorted(found)


def newest_valid(directory: str, warn: Callable[[str], None]
                 ) -> Optional[Tuple[State, str]]:
    """The newest checkpoint that loads and verifies; each one skipped is warned about."""
    for _, path in reversed(listing(directory)):
        try:
            return load(path), path
        except CheckpointError as exc:
            warn(f"skipping checkpoint {exc}")
    return None


def clean_leftovers(directory: str) -> List[str]:
    """Remove temporary files of interrupted writes; return their paths."""
    if not os.path.isdir(directory):
        return []
    removed = []
    for name in sorted(os.listdir(directory)):
        if LEFTOVER.match(name):
            path = os.path.join(directory, name)
            os.remove(path)
            removed.append(path)
    return removed


def prune(directory: str, keep_last: int, written_step: int) -> List[str]:
    """Delete the oldest checkpoints older than ``written_step`` so that ``keep_last`` remain.

    The one just written (``written_step``, the newest valid one) and any with
    a later step are never deleted.
    """
    older = [(s, p) for s, p in listing(directory) if s < written_step]
    doomed = older[:max(0, len(older) - (keep_last - 1))]
    for _, path in doomed:
        os.remove(path)
    return [p for _, p in doomed]
