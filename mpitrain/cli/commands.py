"""What the command line's subcommands do besides training: prepare, data index, inspect,
info, and how a result is printed."""
from __future__ import annotations

import argparse
import os
import sys

from ..runtime import MpitrainError

__all__ = ["prepare", "index", "print_metrics", "inspect", "info"]


def prepare(args: argparse.Namespace) -> None:
    """``prepare``: write a sharded dataset from an .npz or HDF5 file, or synthetic data."""
    from ..data import prepare

    if args.synthetic:
        m = prepare.synthetic(args.out, args.samples, args.features, args.classes or 10,
                              args.seed, args.shards,
                              0.1 if args.val_fraction is None else args.val_fraction)
    else:
        with open(args.input, "rb") if os.path.isfile(args.input) else open(os.devnull,
                                                                           "rb") as f:
            hdf5 = f.read(8) == b"\x89HDF\r\n\x1a\n"
        convert = prepare.from_hdf5 if hdf5 else prepare.from_npz
        m = convert(args.input, args.out, args.shards, args.val_fraction or 0.0, args.seed,
                    args.classes, args.x_key, args.y_key, args.task)
    splits = ", ".join(f"{s}: {m.rows(s)} rows in {len(f)} shards" for s, f in m.splits.items())
    print(f"wrote {args.out}: {splits}; features {m.features}, {m.dtype}, {_task_text(m)}")


def _task_text(m) -> str:
    if m.task["name"] == "classification":
        return f"{m.classes} classes"
    return f"{m.task['name']}, targets {tuple(m.targets['shape'])}"


def index(args: argparse.Namespace) -> None:
    """``data index``: a manifest over the user's own HDF5 files, read in place."""
    from ..data.index import index_files

    m = index_files(args.files, args.x, args.y, args.out, val_fraction=args.val_fraction,
                    val_files=args.val, seed=args.seed, task=args.task, classes=args.classes)
    splits = ", ".join(f"{s}: {m.rows(s)} rows in {len(e)} files" for s, e in m.splits.items())
    print(f"wrote {m.path}: {splits}; features {m.features}, {m.dtype}, {_task_text(m)}; "
          "the files are read in place")


def print_metrics(result: dict) -> None:
    """``evaluate``'s result, a line a metric."""
    for key, value in result.items():
        if isinstance(value, float):
            value = f"{value:.6g}"
        elif isinstance(value, list):
            value = "[" + ", ".join(f"{v:.4g}" for v in value) + "]"
        print(f"{key:<20} {value}")


def inspect(args: argparse.Namespace) -> int:
    """``inspect``: a checkpoint's contents and checksums (1 if one fails); ``--export``."""
    import numpy as np

    from ..fault.checkpoint import inspect

    state, rows = inspect(args.checkpoint)
    print(f"{args.checkpoint}: mpitrain checkpoint, written by mpitrain {state.mpitrain_version}")
    print(f"  step {state.step} (epoch {state.epoch}, step {state.epoch_step} of the epoch)")
    print(f"  layout {state.layout}")
    print(f"  sampler {state.sampler}")
    print(f"  optimizer {state.optimizer}")
    if state.model:
        print(f"  model {state.model.get('spec')} for samples of shape "
              f"{tuple(state.model.get('input_shape') or ())}")
    else:  # before format version 3: the MLP of the configuration
        print(f"  model MLP, hidden {state.config.get('hidden')} "
              f"{state.config.get('activation', 'relu')}")
    if state.task:
        print(f"  task {state.task}")
    if state.loop:
        print(f"  loop {state.loop}")
    width = max(len(r[0]) for r in rows)
    for name, shape, dtype, ok in rows:
        verdict = "ok" if ok else ("INCONSISTENT" if name == "consistency" else
                                   "CHECKSUM MISMATCH")
        print(f"  {name:<{width}}  {str(shape):<14} {dtype:<8} {verdict}")
    bad = [r[0] for r in rows if not r[3]]
    print(f"  checks: {'all ' + str(len(rows)) + ' hold' if not bad else 'FAILED: ' + ', '.join(bad)}")
    if args.export:
        if bad:
            raise MpitrainError(f"{args.checkpoint}: not exporting: checksums fail for {bad}")
        np.savez(args.export, **state.params)
        print(f"wrote {args.export}: {len(state.params)} parameters")
    return 1 if bad else 0


def info(comm) -> None:
    """``info``: what this job runs on (collective; rank 0 prints)."""
    import h5py
    import mpi4py
    import numpy
    from mpi4py import MPI

    from .. import __version__
    from ..malloc import malloc_report
    from ..process import report
    from ..runtime import library_version
    from ..threads import thread_report

    hosts = comm.gather(MPI.Get_processor_name(), root=0)
    threads = comm.gather(thread_report(), root=0)
    if comm.Get_rank() == 0:
        nodes = sorted(set(hosts))
        lines = [
            ("mpitrain", __version__),
            ("python", sys.version.split()[0]),
            ("MPI library", library_version()),
            ("MPI standard", "%d.%d" % MPI.Get_version()),
            ("mpi4py", mpi4py.__version__),
            ("thread level", {MPI.THREAD_SINGLE: "single", MPI.THREAD_FUNNELED: "funneled",
                              MPI.THREAD_SERIALIZED: "serialized",
                              MPI.THREAD_MULTIPLE: "multiple"}[MPI.Query_thread()]),
            ("ranks", f"{comm.Get_size()} on {len(nodes)} node(s): {', '.join(nodes)}"),
            ("threads per rank", threads[0] if len(set(threads)) == 1
             else "; ".join(f"rank {r}: {t}" for r, t in enumerate(threads))),
            ("numpy", numpy.__version__),
            ("malloc", malloc_report()),
            *[(k, v) for k, v in report() if k in ("Open MPI waits", "uncaught errors")],
            ("h5py", f"{h5py.__version__} (HDF5 {h5py.version.hdf5_version})"),
            ("h5py with MPI", "yes (mpio driver available)" if h5py.get_config().mpi
             else "no (serial h5py: shards are read per rank, checkpoints written by one rank)"),
        ]
        width = max(len(k) for k, _ in lines)
        for key, value in lines:
            print(f"{key:<{width}}  {value}")
