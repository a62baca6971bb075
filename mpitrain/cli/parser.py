"""The command line's parser: one subcommand a function, every option with its help.

``parser()`` is what ``main`` parses with, and what the documentation's
command-line reference is generated from.
"""
from __future__ import annotations

import argparse

__all__ = ["parser", "Parser"]


class Parser(argparse.ArgumentParser):
    """argparse, for a job of many ranks: a usage error is an ``MpitrainError`` that every
    rank raises alike (so it is printed once, exit 2), and help is printed by rank 0."""

    def error(self, message: str):
        """A usage error: raised, not printed (every rank has it; rank 0 says it)."""
        from ..runtime import MpitrainError

        raise MpitrainError(f"{self.prog}: {message} (see {self.prog} --help)",
                            everywhere=True)

    def _print_message(self, message, file=None):
        import sys

        mpi = sys.modules.get("mpi4py.MPI")
        if mpi is None or not mpi.Is_initialized() or mpi.COMM_WORLD.Get_rank() == 0:
            super()._print_message(message, file)


def parser() -> argparse.ArgumentParser:
    """``python -m mpitrain``'s parser: train, prepare, data, predict, evaluate, inspect,
    plot, bench, info."""
    from ..config import add_arguments

    p = Parser(
        prog="python -m mpitrain",
        description="Data-parallel training of numpy models over MPI, from HDF5 shards.",
        epilog="Launch with an MPI launcher, e.g.: mpirun -n 4 python -m mpitrain train")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    t = sub.add_parser("train", help="train a model (data-parallel over all ranks)",
                       description="Train a model (an MLP of --hidden, or --model) over all "
                                   "ranks. Keys may also come from a TOML file (--config); "
                                   "flags override it.")
    add_arguments(t)
    _prepare(sub)
    _data(sub)
    _using_checkpoints(sub)
    _bench(sub)
    sub.add_parser("info", help="print the MPI library, ranks, threads per rank and h5py build",
                   description="Print what this job runs on.")
    return p


def _prepare(sub) -> None:
    from ..data.manifest import TASKS

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


def _data(sub) -> None:
    from ..data.manifest import TASKS

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


def _using_checkpoints(sub) -> None:
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
    pd.add_argument("--overwrite", action="store_true", help="replace --out if it exists")

    ev = sub.add_parser("evaluate", help="a checkpoint's metrics on a dataset split",
                        description="The loss and the task's metrics over a split, summed "
                                    "exactly over the ranks.")
    ev.add_argument("checkpoint", metavar="CKPT")
    ev.add_argument("--data", required=True, metavar="DIR")
    ev.add_argument("--split", default="val")

    i = sub.add_parser("inspect", help="show a checkpoint and verify its checksums",
                       description="Print a checkpoint's step, layout, parameters and whether "
                                   "every checksum holds (exit 1 if one does not).")
    i.add_argument("checkpoint", metavar="CKPT", help="a checkpoint file (ckpt-000000500.h5, best.h5)")
    i.add_argument("--export", metavar="FILE.npz",
                   help="write the parameters to an .npz, under the same names")
    i.add_argument("--overwrite", action="store_true", help="replace --export if it exists")

    pl = sub.add_parser("plot", help="plot loss, validation accuracy and samples/s of runs",
                        description="Loss, validation accuracy and samples/s against step, "
                                    "one run or several overlaid (needs matplotlib).")
    pl.add_argument("runs", nargs="+", metavar="RUN_DIR_OR_LOG",
                    help="run directories (their metrics.jsonl) or JSON-lines logs")
    pl.add_argument("--out", metavar="FILE.png", help="default: plot.png beside the first run")
    pl.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def _bench(sub) -> None:
    b = sub.add_parser("bench", help="benchmarks: allreduce, pipeline, train, layers, "
                                     "recovery, stragglers, model, torch",
                       description="Benchmarks; each prints a table on rank 0 and can write JSON.")
    bsub = b.add_subparsers(dest="bench", metavar="BENCH", required=True)
    from ..bench import (allreduce, layers, model, pipeline, recovery, stragglers,
                         torch_peers, train)

    benches = [
        (train, "train", "training samples/s at 1, 2, ... ranks; scaling; step time split"),
        (allreduce, "allreduce", "ring vs MPI Allreduce: time, algbw, busbw per size"),
        (pipeline, "pipeline", "pipeline step time, bubble and activation memory by schedule"),
        (layers, "layers", "each layer's forward + backward time, beside PyTorch's"),
        (recovery, "recovery", "time from a rank's death to the next step (shrink, respawn)"),
        (stragglers, "stragglers", "all-reduce, speed-balanced batches and the parameter "
                                   "server with slow and jittery ranks"),
        (model, "model", "the all-reduce cost model: fit to measurements, project to 1,024 "
                         "ranks"),
        (torch_peers, "torch", "a PyTorch model on mpitrain beside DDP/Gloo, plain mpi4py, "
                               "lockstep and the ceiling")]
    for module, name, summary in benches:
        p = bsub.add_parser(name, help=summary, description=module.__doc__.split("\n\n", 1)[1])
        module.add_arguments(p)
        p.add_argument("--overwrite", action="store_true", help="replace --json if it exists")
