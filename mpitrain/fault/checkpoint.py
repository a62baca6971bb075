"""Crash-safe HDF5 checkpoints: one self-describing file per checkpoint.

Schema (format ``mpitrain.checkpoint``, version 3)::

    ckpt-000000200.h5 (or best.h5: the best evaluation's state)
      attrs   format="mpitrain.checkpoint", format_version=3, mpitrain_version,
              step (steps done), epoch, epoch_step (steps done in that epoch),
              created (UTC, ISO 8601), config (JSON: the run's Config)
              layout      JSON: {"world_size", "pp", "dp"} the job was written with
              sampler     JSON: {"seed", "batch_size", "samples", "drop_last"}
              rng         JSON: every generator's state (see below)
              optimizer   JSON: {"name", "steps", ...hyper-parameters}; PyTorch's: "torch":
                          {"class", "groups", "scalars", "scheduler": {"class", "state"}}
              task        JSON: the task (classification and its classes, or regression
                          and its standardisation, or multilabel)
              model       JSON: {"spec": the model as text, "input_shape": a sample's}
                          or {"torch": "module.Class", "input_shape"} (PyTorch's)
              loop        JSON: the training loop's state: the learning rate of the last
                          step, the monitored metric's best value and step, evaluations
                          without improvement, whether it stopped early (version 3)
              meta_crc32  CRC-32 of every attribute above: the JSON object
                          {name: value} of them all, keys sorted (version 1: of the
                          five JSON attributes alone, joined by newlines)
      params/<name>             one dataset per parameter (PyTorch's: per state_dict entry)
      optimizer/<key>/<name>    optimizer state per parameter, e.g. optimizer/m/0.weight
      every dataset: attrs crc32 (CRC-32 of its bytes, C order)

Random state: the sample order of epoch e is a permutation drawn from a
fresh ``numpy.random.default_rng([seed, e])`` and initial weights from
``default_rng([seed, layer])``; neither generator carries state across steps,
so ``rng`` records those keys and (seed, epoch, epoch_step) restore the order
exactly.  Nothing is pickled: loading reads arrays and JSON text only.

A checkpoint whose step disagrees with its own optimizer (its update count)
or sampler (its epoch and step within the epoch) is refused as damaged.

A checkpoint is written under a temporary name (``.ckpt-*.tmp-HOST-PID``),
flushed, fsynced, renamed into place and its directory fsynced, so a crash at
any moment leaves either the complete new file or none; leftovers of an
interrupted write are removed at the next start, once their writer is gone
(``store.py``: the files of a checkpoint directory).
A write that fails (no space, read-only, I/O error) removes its temporary
file and raises ``CheckpointWriteError``; earlier checkpoints are untouched.
"""
from __future__ import annotations

import datetime
import errno
import gc
import json
import os
import socket
import sys
import zlib
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..runtime import EXIT_IO, MpitrainError

__all__ = ["FORMAT", "VERSION", "State", "CheckpointError", "CheckpointWriteError", "save",
           "write_datasets", "not_finite",
           "load", "inspect", "crc32", "os_reason", "file_name", "host", "BEST"]

FORMAT, VERSION = "mpitrain.checkpoint", 3
SCALAR_ATTRS = ("format", "format_version", "mpitrain_version", "step", "epoch", "epoch_step",
                "created")
JSON_ATTRS = ("config", "layout", "sampler", "rng", "optimizer", "task", "model", "loop")
# The JSON attributes of each version: 1 had no task (it was always classification), 2 no
# model nor loop (the model was the MLP of config's hidden).
JSON_OF = {1: JSON_ATTRS[:5], 2: JSON_ATTRS[:6], 3: JSON_ATTRS}


class CheckpointError(MpitrainError):
    """A checkpoint file that cannot be used, and why."""


class CheckpointWriteError(MpitrainError):
    """A checkpoint that could not be written (the OS error says why)."""

    def __init__(self, message: str, *, everywhere: bool = False):
        super().__init__(message, everywhere=everywhere, code=EXIT_IO)


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
    task: Dict[str, object] = field(default_factory=dict)  # model.tasks.Task.describe()
    model: Dict[str, object] = field(default_factory=dict)  # {"spec", "input_shape"}
    loop: Dict[str, object] = field(default_factory=dict)  # the training loop's state


def crc32(arr: np.ndarray) -> int:
    """CRC-32 of an array's bytes in C order."""
    return zlib.crc32(memoryview(np.ascontiguousarray(arr)).cast("B")) & 0xFFFFFFFF


def _meta_crc(texts: List[str]) -> int:
    """Version 1: the JSON attributes alone."""
    return zlib.crc32("\n".join(texts).encode()) & 0xFFFFFFFF


def _all_crc(attrs: Dict[str, object], version: int = VERSION) -> int:
    """Version 2 on: every attribute (``SCALAR_ATTRS`` and the version's JSON ones), as
    one JSON text."""
    text = json.dumps({k: attrs[k] for k in SCALAR_ATTRS + JSON_OF[version]}, sort_keys=True)
    return zlib.crc32(text.encode()) & 0xFFFFFFFF


def host() -> str:
    """This host's name, as temporary file names carry it."""
    return socket.gethostname().replace("/", "_") or "localhost"



def _complete(state: "State") -> Optional[str]:
    """Why ``state``'s optimizer arrays do not match its parameters, or None."""
    if state.optimizer.get("torch"):  # each array names a parameter, its scalars 0-d
        stray = [f"optimizer/{key} holds {name!r}" for key, named in
                 state.optimizer_state.items() for name in named if name not in state.params]
        return f"{stray[0]}, which is no parameter" if stray else None
    for key, named in state.optimizer_state.items():
        for name, p in state.params.items():
            a = named.get(name)
            if a is None:
                return f"optimizer/{key}/{name} is missing"
            if a.shape != p.shape or a.dtype != p.dtype:
                return (f"optimizer/{key}/{name} is {a.dtype} {a.shape}, its parameter "
                        f"{p.dtype} {p.shape}")
        extra = sorted(set(named) - set(state.params))
        if extra:
            return f"optimizer/{key} holds {extra[0]!r}, which is no parameter"
    return None


def not_finite(arrays: Dict[str, np.ndarray]) -> Optional[str]:
    """Where the first NaN or infinity of ``arrays`` (by name) is, or None."""
    for name, a in arrays.items():
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            where = np.unravel_index(int(np.argmin(np.isfinite(a))), a.shape)
            return f"{name} holds {a[where]} at {list(map(int, where))}"
    return None


def _consistent(state: "State") -> Optional[str]:
    """Why ``state``'s step disagrees with its optimizer or sampler, or None."""
    steps = state.optimizer.get("steps")
    if steps != state.step:
        return f"its step {state.step} disagrees with its optimizer's {steps} updates"
    s = state.sampler
    try:
        n, batch, drop = int(s["samples"]), int(s["batch_size"]), bool(s["drop_last"])
        per_epoch = n // batch if drop else -(-n // batch)
        expect = divmod(state.step, per_epoch)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return f"its sampler record {s!r} is incomplete"
    if (state.epoch, state.epoch_step) != expect:
        return (f"its step {state.step} is epoch {expect[0]}, step {expect[1]} of "
                f"{per_epoch} per epoch, but it says epoch {state.epoch}, step "
                f"{state.epoch_step}")
    return None


BEST = "best.h5"  # the best evaluation's state: never pruned, never resumed from by 'auto'


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


def write_datasets(f, datasets: List[Tuple[str, np.ndarray]]) -> None:
    """Write each (path, array) of ``datasets`` into the open file ``f``, with its CRC."""
    for path, arr in datasets:
        ds = f.create_dataset(path, data=arr)
        ds.attrs["crc32"] = crc32(arr)


def save(directory: str, state: State, *, name: Optional[str] = None) -> Tuple[str, int]:
    """Write ``state`` as ``directory/ckpt-<step>.h5`` (or ``name``), crash-safely; return
    (path, bytes)."""
    import h5py

    from .. import __version__

    name = name or file_name(state.step)
    final = os.path.join(directory, name)
    tmp = os.path.join(directory, f".{name}.tmp-{host()}-{os.getpid()}")
    attrs: Dict[str, object] = {
        "format": FORMAT, "format_version": VERSION, "mpitrain_version": __version__,
        "step": int(state.step), "epoch": int(state.epoch), "epoch_step": int(state.epoch_step),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        **{key: json.dumps(getattr(state, key), sort_keys=True) for key in JSON_ATTRS}}
    datasets = [(f"params/{n}", a) for n, a in state.params.items()]
    datasets += [(f"optimizer/{k}/{n}", a) for k, named in state.optimizer_state.items()
                 for n, a in named.items()]
    # A failed write (no space, read-only, I/O error) makes HDF5 fail again as each of its
    # objects is freed, each failure printed as "Exception ignored": this error is said
    # once, below, so those are kept quiet while the objects go.
    hook, failure = sys.unraisablehook, None
    sys.unraisablehook = lambda unraisable: None
    try:
        try:
            os.makedirs(directory, exist_ok=True)
            # Reserve the file's space first: a full disk (or a quota, a size limit) then
            # fails here, in one clean system call, not inside HDF5; HDF5 trims the file
            # to its real size when it closes it.
            with h5py.File(tmp, "w", locking=False, libver="v110"):
                pass
            _reserve(tmp, reservation(datasets, attrs))
            with h5py.File(tmp, "r+", locking=False, libver="v110") as f:
                for key, value in attrs.items():
                    f.attrs[key] = value
                f.attrs["meta_crc32"] = _all_crc(attrs)
                write_datasets(f, datasets)
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
            _fsync_dir(directory)
        except (OSError, RuntimeError) as exc:  # h5py's errors: OSError, or RuntimeError
            failure = os_reason(exc)
        except BaseException:
            _remove_quietly(tmp)
            raise
        finally:
            gc.collect()  # free HDF5's objects now, while their complaints are kept quiet
    finally:
        sys.unraisablehook = hook
    if failure is not None:
        _remove_quietly(tmp)
        raise CheckpointWriteError(f"{directory}: cannot write the checkpoint of step "
                                   f"{state.step}: {failure}; the earlier checkpoints "
                                   "are intact")
    return final, os.path.getsize(final)


# What HDF5 adds to the arrays' bytes (libver v110), measured: about 8 KiB for the file
# and its groups, 300-450 bytes a dataset with its checksum attribute, the attributes'
# text.  The reservation takes the upper end, so a full disk fails before a byte is
# written, and stays within a few KiB of the file for a small model.
FILE_BYTES, DATASET_BYTES = 12 << 10, 400


def reservation(datasets: List[Tuple[str, np.ndarray]], attrs: Dict[str, object]) -> int:
    """The bytes reserved for a checkpoint of ``datasets`` and ``attrs`` before writing."""
    return (sum(a.nbytes for _, a in datasets) + DATASET_BYTES * len(datasets)
            + 2 * sum(len(str(v)) for v in attrs.values()) + FILE_BYTES)


def _reserve(path: str, nbytes: int) -> None:
    """Reserve ``nbytes`` for file ``path`` where the system can (posix_fallocate): a full
    disk then fails here.  Where it cannot (no such call, or a file system without it),
    nothing is reserved and HDF5's own writes meet any shortage."""
    reserve = getattr(os, "posix_fallocate", None)
    if reserve is None:  # macOS
        return
    fd = os.open(path, os.O_RDWR)
    try:
        reserve(fd, 0, nbytes)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
    finally:
        os.close(fd)


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def os_reason(exc: Exception) -> str:
    """One line: the OS error behind ``exc`` (HDF5 hides it in a longer message)."""
    if getattr(exc, "errno", None):
        return f"{os.strerror(exc.errno)} (errno {exc.errno}, {errno.errorcode.get(exc.errno, '?')})"
    text = str(exc)
    for code, name in errno.errorcode.items():  # "errno = 28, error message = ..."
        if f"errno = {code}," in text:
            return f"{os.strerror(code)} (errno {code}, {name})"
    return text.splitlines()[0] if text else type(exc).__name__


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
            if "format" not in f.attrs:
                raise CheckpointError(f"{path}: no 'format' attribute: not an mpitrain "
                                      "checkpoint, or its header is damaged")
            if f.attrs["format"] != FORMAT:
                raise CheckpointError(f"{path}: not an mpitrain checkpoint (its format is "
                                      f"{f.attrs['format']!r}, expected {FORMAT!r})")
            version = int(f.attrs.get("format_version", VERSION))
            if version > VERSION:
                raise CheckpointError(f"{path}: format version {version} is newer than "
                                      f"this mpitrain reads ({VERSION})")
            json_attrs = JSON_OF.get(version, JSON_ATTRS)
            missing = [k for k in SCALAR_ATTRS + json_attrs + ("meta_crc32",)
                       if k not in f.attrs]
            if missing:
                raise CheckpointError(f"{path}: damaged: attribute(s) {', '.join(missing)} "
                                      "missing")
            attrs = {k: str(f.attrs[k]) for k in ("format", "mpitrain_version", "created")}
            attrs.update({k: int(f.attrs[k]) for k in ("format_version", "step", "epoch",
                                                        "epoch_step")})
            attrs.update({k: str(f.attrs[k]) for k in json_attrs})
            texts = [attrs[key] for key in json_attrs]
            crc = _all_crc(attrs, version) if version >= 2 else _meta_crc(texts)
            meta_ok = crc == int(f.attrs["meta_crc32"])
            rows.append(("metadata", (), "json", meta_ok))
            if strict and not meta_ok:
                raise CheckpointError(f"{path}: checksum of the metadata does not match "
                                      "(file damaged)")
            try:
                meta = {key: json.loads(text) for key, text in zip(json_attrs, texts)}
            except ValueError as exc:
                raise CheckpointError(f"{path}: damaged metadata: {exc}") from None

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
            arrays = {**{f"params/{n}": a for n, a in params.items()},
                      **{f"optimizer/{k}/{n}": a for k, named in opt_state.items()
                         for n, a in named.items()}}
            bad = not_finite(arrays)
            rows.append(("finite", (), "check", bad is None))
            if strict and bad:
                raise CheckpointError(f"{path}: {bad}: a state no run can continue from")
            state = State(step=attrs["step"], epoch=attrs["epoch"],
                          epoch_step=attrs["epoch_step"], params=params,
                          optimizer_state=opt_state, optimizer=meta["optimizer"],
                          config=meta["config"], layout=meta["layout"],
                          sampler=meta["sampler"], rng=meta["rng"],
                          mpitrain_version=attrs["mpitrain_version"],
                          task=meta.get("task") or {}, model=meta.get("model") or {},
                          loop=meta.get("loop") or {})
            why = _consistent(state) or _complete(state)
            rows.append(("consistency", (), "check", why is None))
            if why and strict:
                raise CheckpointError(f"{path}: damaged: {why}")
            return state, rows
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - truncated or damaged HDF5: any error
        detail = str(exc).splitlines()[0] if str(exc) else "no detail"
        raise CheckpointError(f"{path}: unreadable ({type(exc).__name__}: {detail}; "
                              "truncated or damaged?)") from None
