"""What the command line's subcommands do besides training: prepare, data index, inspect,
info, and how a result is printed."""
from __future__ import annotations

import argparse
import os
import sys

from ..paths import output_file, replace
from ..runtime import MpitrainError, on_root

__all__ = ["prepare", "index", "print_metrics", "inspect", "info", "run_prepare", "run_index",
           "run_predict", "run_evaluate", "run_plot", "run_inspect", "run_bench"]


def run_prepare(args: argparse.Namespace, comm) -> None:
    """``prepare`` on rank 0 (collective: its error is every rank's)."""
    on_root(comm, lambda: prepare(args))


def run_index(args: argparse.Namespace, comm) -> None:
    """``data index`` on rank 0 (collective)."""
    on_root(comm, lambda: index(args))


def run_predict(args: argparse.Namespace, comm) -> None:
    """``predict``: every rank a slice, rank 0 writes the file (collective)."""
    from ..run.predict import predict

    got = predict(args.checkpoint, args.data, args.out, comm, x_key=args.x, split=args.split,
                  overwrite=args.overwrite)
    if comm.Get_rank() == 0:
        print(f"wrote {got['out']}: {got['rows']} rows of {got['data']} "
              f"({', '.join(got['datasets'])})")


def run_evaluate(args: argparse.Namespace, comm) -> None:
    """``evaluate``: the metrics, summed over the ranks (collective)."""
    from ..run.predict import evaluate

    result = evaluate(args.checkpoint, args.data, comm, args.split)
    if comm.Get_rank() == 0:
        print_metrics(result)


def run_plot(args: argparse.Namespace, comm) -> None:
    """``plot`` on rank 0: ``--out`` is refused if it exists (unless ``--overwrite``);
    the default, plot.png in the run's directory, is replaced."""
    from ..run.plot import default_out, plot_runs

    def draw() -> None:
        out = args.out or default_out(args.runs)
        output_file(out, "plot", overwrite=args.overwrite or not args.out)
        print(f"wrote {plot_runs(args.runs, out)}")

    on_root(comm, draw)


def run_inspect(args: argparse.Namespace, comm) -> int:
    """``inspect`` on rank 0: one print, one ``--export`` writer."""
    return on_root(comm, lambda: inspect(args))


def run_bench(args: argparse.Namespace, comm) -> None:
    """``bench ...``: its ``--json`` checked before anything is measured."""
    from ..bench import allreduce, layers, model, pipeline, recovery, stragglers, torch_peers
    from ..bench import train as train_bench

    if getattr(args, "json", None):
        on_root(comm, lambda: output_file(args.json, "benchmark records",
                                          overwrite=args.overwrite))
    {"allreduce": allreduce, "pipeline": pipeline, "train": train_bench,
     "layers": layers, "recovery": recovery,
     "stragglers": stragglers, "model": model, "torch": torch_peers}[args.bench].run(args, comm)


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
        what = (f"PyTorch {state.model['torch']}" if state.model.get("torch")
                else state.model.get("spec"))
        print(f"  model {what} for samples of shape "
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
        verdict = "ok" if ok else {"consistency": "INCONSISTENT",
                                   "finite": "NaN OR INFINITY"}.get(name, "CHECKSUM MISMATCH")
        print(f"  {name:<{width}}  {str(shape):<14} {dtype:<8} {verdict}")
    bad = [r[0] for r in rows if not r[3]]
    print(f"  checks: {'all ' + str(len(rows)) + ' hold' if not bad else 'FAILED: ' + ', '.join(bad)}")
    if args.export:
        output_file(args.export, "export", overwrite=args.overwrite)
        if bad:
            raise MpitrainError(f"{args.checkpoint}: not exporting: checksums fail for {bad}")
        with replace(args.export, "wb") as f:  # whole or not at all
            np.savez(f, **state.params)
        print(f"wrote {args.export}: {len(state.params)} parameters")
    return 1 if bad else 0


def info(args: argparse.Namespace, comm) -> None:
    """``info``: what this job runs on (collective; rank 0 prints)."""
    import h5py
    import mpi4py
    import numpy
    from mpi4py import MPI

    from .. import __version__
    from ..malloc import malloc_report
    from ..model.kernels import describe as kernels_report
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
            ("kernels", kernels_report()),
            *[(k, v) for k, v in report() if k in ("Open MPI waits", "uncaught errors")],
            ("h5py", f"{h5py.__version__} (HDF5 {h5py.version.hdf5_version})"),
            ("h5py with MPI", "yes (mpio driver available)" if h5py.get_config().mpi
             else "no (serial h5py: shards are read per rank, checkpoints written by one rank)"),
        ]
        width = max(len(k) for k, _ in lines)
        for key, value in lines:
            print(f"{key:<{width}}  {value}")
