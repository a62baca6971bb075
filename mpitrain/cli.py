"""Command line: ``python -m mpitrain {train,prepare,inspect,plot,bench,info} ...``.

Every subcommand runs inside ``runtime.run_or_abort``: an error on any rank
ends the whole MPI job with the message printed once and a non-zero exit.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from .runtime import (EXIT_PREEMPTED, ConfigError, MpitrainError, agreed, bound_finalize,
                      job_comm, on_root, run_or_abort)
from .threads import limit_threads

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    from .config import add_arguments
    from .data.manifest import TASKS

    p = argparse.ArgumentParser(
        prog="python -m mpitrain",
        description="Data-parallel training of numpy models over MPI, from HDF5 shards.",
        epilog="Launch with an MPI launcher, e.g.: mpirun -n 4 python -m mpitrain train")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    t = sub.add_parser("train", help="train a model (data-parallel over all ranks)",
                       description="Train a model (an MLP of --hidden, or --model) over all "
                                   "ranks. Keys may also come from a TOML file (--config); "
                                   "flags override it.")
    add_arguments(t)

    pr = sub.add_parser("prepare", help="write a sharded HDF5 dataset",
                        description="Copy an .npz or HDF5 file (datasets x and y), streaming, "
                                    "or generate a synthetic set, as HDF5 shards plus "
                                    "manifest.json.")
    src = pr.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", metavar="FILE", help="an .npz or HDF5 file: x (samples, "
                                                     "...) and y (samples, ...) targets")
    src.add_argument("--synthetic", action="store_true", help="a deterministic, learnable "
                                                              "classification set")
    pr.add_argument("--out", required=True, metavar="DIR", help="new dataset directory")
    pr.add_argument("--shards", type=int, default=4, metavar="N",
                    help="files per split (default: 4)")
    pr.add_argument("--val-fraction", type=float, default=None, metavar="F",
                    help="share of samples set aside for validation (default: 0 for --input, "
                         "0.1 for --synthetic)")
    pr.add_argument("--seed", type=int, default=0, help="seed of the split and synthetic data")
    pr.add_argument("--classes", type=int, default=None, metavar="C",
                    help="number of classes (default: max label + 1; 10 for --synthetic)")
    pr.add_argument("--samples", type=int, default=20000, metavar="N",
                    help="--synthetic: number of samples (default: 20000)")
    pr.add_argument("--features", type=int, default=784, metavar="F",
                    help="--synthetic: features per sample (default: 784)")
    pr.add_argument("--x-key", default="x", help="--input: array of samples (default: x)")
    pr.add_argument("--y-key", default="y", help="--input: array of targets (default: y)")
    pr.add_argument("--task", default="auto", choices=("auto", *TASKS),
                    help="--input: what the targets are (default: auto: integer labels are "
                         "classification, other numbers regression)")

    d = sub.add_parser("data", help="datasets: index your own HDF5 files in place",
                       description="Work on datasets without copying them.")
    dsub = d.add_subparsers(dest="data", metavar="ACTION", required=True)
    ix = dsub.add_parser("index", help="write a manifest over HDF5 files, read in place",
                         description="Write DIR/manifest.json referencing the files' own "
                                     "datasets (any path, chunking, filter); nothing is "
                                     "copied. The files must lie inside DIR.")
    ix.add_argument("files", nargs="+", metavar="FILE.h5", help="the training files")
    ix.add_argument("--out", metavar="DIR", help="the dataset directory (default: the files' "
                                                  "common directory)")
    ix.add_argument("--x", required=True, metavar="KEY", help="the features dataset, e.g. "
                                                               "/features")
    ix.add_argument("--y", required=True, metavar="KEY", help="the targets dataset")
    split = ix.add_mutually_exclusive_group()
    split.add_argument("--val-fraction", type=float, default=0.0, metavar="F",
                       help="a random share F of the rows (by blocks) for validation")
    split.add_argument("--val", nargs="+", default=[], metavar="FILE.h5",
                       help="whole files for validation")
    ix.add_argument("--seed", type=int, default=0, help="seed of the validation split")
    ix.add_argument("--task", default="auto", choices=("auto", *TASKS),
                    help="what the targets are (default: auto)")
    ix.add_argument("--classes", type=int, default=None, metavar="C",
                    help="classification: number of classes (default: max label + 1)")

    pd = sub.add_parser("predict", help="predict with a checkpoint, every rank a slice",
                        description="Write one prediction per input row, in input order, to "
                                    "a new HDF5 file: labels and probabilities, values in "
                                    "the targets' units, or label probabilities.")
    pd.add_argument("checkpoint", metavar="CKPT")
    pd.add_argument("--data", required=True, metavar="DIR_OR_FILE.h5",
                    help="a dataset directory (one split) or an HDF5 file")
    pd.add_argument("--x", default=None, metavar="KEY", help="with a file: its features "
                                                             "dataset (default: x)")
    pd.add_argument("--split", default=None, help="with a directory: the split (default: "
                                                  "val, else train)")
    pd.add_argument("--out", required=True, metavar="PRED.h5", help="a new file")

    ev = sub.add_parser("evaluate", help="a checkpoint's metrics on a dataset split",
                        description="The loss and the task's metrics over a split, summed "
                                    "exactly over the ranks.")
    ev.add_argument("checkpoint", metavar="CKPT")
    ev.add_argument("--data", required=True, metavar="DIR")
    ev.add_argument("--split", default="val")

    i = sub.add_parser("inspect", help="show a checkpoint and verify its checksums",
                       description="Print a checkpoint's step, layout, parameters and whether "
                                   "every checksum holds (exit 1 if one does not).")
    i.add_argument("checkpoint", metavar="CKPT", help="a ckpt-*.h5 file")
    i.add_argument("--export", metavar="FILE.npz",
                   help="write the parameters to an .npz, under the same names")

    pl = sub.add_parser("plot", help="plot loss, validation accuracy and samples/s of runs",
                        description="Loss, validation accuracy and samples/s against step, "
                                    "one run or several overlaid (needs matplotlib).")
    pl.add_argument("runs", nargs="+", metavar="RUN_DIR_OR_LOG",
                    help="run directories (their metrics.jsonl) or JSON-lines logs")
    pl.add_argument("--out", metavar="FILE.png", help="default: plot.png beside the first run")

    b = sub.add_parser("bench", help="benchmarks: allreduce, pipeline, train, layers, "
                                     "recovery, stragglers, model",
                       description="Benchmarks; each prints a table on rank 0 and can write JSON.")
    bsub = b.add_subparsers(dest="bench", metavar="BENCH", required=True)
    from .bench import allreduce, layers, model, pipeline, recovery, stragglers, train

    train.add_arguments(bsub.add_parser(
        "train", help="training samples/s at 1, 2, ... ranks; scaling; step time split",
        description=train.__doc__.split("\n\n", 1)[1]))
    allreduce.add_arguments(bsub.add_parser(
        "allreduce", help="ring vs MPI Allreduce: time, algbw, busbw per size",
        description=allreduce.__doc__.split("\n\n", 1)[1]))
    pipeline.add_arguments(bsub.add_parser(
        "pipeline", help="pipeline step time, bubble and activation memory by schedule",
        description=pipeline.__doc__.split("\n\n", 1)[1]))
    layers.add_arguments(bsub.add_parser(
        "layers", help="each layer's forward + backward time, beside PyTorch's",
        description=layers.__doc__.split("\n\n", 1)[1]))
    recovery.add_arguments(bsub.add_parser(
        "recovery", help="time from a rank's death to the next step (shrink, respawn)",
        description=recovery.__doc__.split("\n\n", 1)[1]))

    stragglers.add_arguments(bsub.add_parser(
        "stragglers", help="all-reduce, speed-balanced batches and the parameter server "
                           "with slow and jittery ranks",
        description=stragglers.__doc__.split("\n\n", 1)[1]))

    model.add_arguments(bsub.add_parser(
        "model", help="the all-reduce cost model: fit to measurements, project to 1,024 ranks",
        description=model.__doc__.split("\n\n", 1)[1]))

    sub.add_parser("info", help="print the MPI library, ranks, threads per rank and h5py build",
                   description="Print what this job runs on.")
    return p


def _prepare(args: argparse.Namespace) -> None:
    from .data import prepare

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


def _index(args: argparse.Namespace) -> None:
    from .data.index import index_files

    m = index_files(args.files, args.x, args.y, args.out, val_fraction=args.val_fraction,
                    val_files=args.val, seed=args.seed, task=args.task, classes=args.classes)
    splits = ", ".join(f"{s}: {m.rows(s)} rows in {len(e)} files" for s, e in m.splits.items())
    print(f"wrote {m.path}: {splits}; features {m.features}, {m.dtype}, {_task_text(m)}; "
          "the files are read in place")


def _print_metrics(result: dict) -> None:
    for key, value in result.items():
        if isinstance(value, float):
            value = f"{value:.6g}"
        elif isinstance(value, list):
            value = "[" + ", ".join(f"{v:.4g}" for v in value) + "]"
        print(f"{key:<20} {value}")


def _inspect(args: argparse.Namespace) -> int:
    import numpy as np

    from .fault.checkpoint import inspect

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


def _info(comm) -> None:
    import h5py
    import mpi4py
    import numpy
    from mpi4py import MPI

    from . import __version__
    from .malloc import malloc_report
    from .runtime import library_version
    from .threads import thread_report

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
            ("h5py", f"{h5py.__version__} (HDF5 {h5py.version.hdf5_version})"),
            ("h5py with MPI", "yes (mpio driver available)" if h5py.get_config().mpi
             else "no (serial h5py: shards are read per rank, checkpoints written by one rank)"),
        ]
        width = max(len(k) for k, _ in lines)
        for key, value in lines:
            print(f"{key:<{width}}  {value}")


def main(argv: Optional[List[str]] = None) -> None:
    """Entry point of ``python -m mpitrain``."""
    limit_threads()  # before numpy is imported by anything below
    args = _parser().parse_args(argv)
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    names = {"name_of": None}  # how errors name a parameter: by its flag or TOML key

    def run() -> int:
        if args.command == "train":
            from .config import from_sources
            from .run.fit import train

            cfg, names["name_of"] = agreed(comm, lambda: from_sources(args))
            summary = train(cfg, comm)
            if summary["preempted"]:
                return EXIT_PREEMPTED
        elif args.command == "prepare":
            on_root(comm, lambda: _prepare(args))
        elif args.command == "data":
            on_root(comm, lambda: _index(args))
        elif args.command == "predict":
            from .run.predict import predict

            got = predict(args.checkpoint, args.data, args.out, comm, x_key=args.x,
                          split=args.split)
            if comm.rank == 0:
                print(f"wrote {got['out']}: {got['rows']} rows of {got['data']} "
                      f"({', '.join(got['datasets'])})")
        elif args.command == "evaluate":
            from .run.predict import evaluate

            result = evaluate(args.checkpoint, args.data, comm, args.split)
            if comm.rank == 0:
                _print_metrics(result)
        elif args.command == "plot":
            from .run.plot import default_out, plot_runs

            on_root(comm, lambda: print(
                f"wrote {plot_runs(args.runs, args.out or default_out(args.runs))}"))
        elif args.command == "inspect":  # one print, one --export writer
            return on_root(comm, lambda: _inspect(args))
        elif args.command == "bench":
            from .bench import allreduce, layers, model, pipeline, recovery, stragglers
            from .bench import train as train_bench

            {"allreduce": allreduce, "pipeline": pipeline, "train": train_bench,
             "layers": layers, "recovery": recovery,
             "stragglers": stragglers, "model": model}[args.bench].run(args, comm)
        elif args.command == "info":
            _info(comm)
        return 0

    def render(exc: ConfigError) -> str:
        from .config import flag

        return exc.render(names["name_of"] or flag)

    try:
        code = run_or_abort(run, comm, render=render)
    except SystemExit as exc:  # an error every rank agreed on: all exit with its status
        code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
    if job_comm(None) is not None:  # a healed job: see runtime.bound_finalize
        bound_finalize(30, code)
    sys.exit(code)
