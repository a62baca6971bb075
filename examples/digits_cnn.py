"""$ mpirun -n 4 python examples/digits_cnn.py [--epochs 40] [--out data/digits]

A convolutional network on scikit-learn's handwritten digits (1,797 8x8
images, 10 classes; ``pip install scikit-learn``), read in place as
``examples/digits.py`` writes and indexes them, samples kept as (1, 8, 8):

    conv2d(32,3,padding=1), relu, conv2d(64,3,padding=1), relu, maxpool2d(2),
    flatten, linear(128), relu, dropout(0.5), linear(10)

trained data-parallel with AdamW and a cosine learning-rate schedule after a
warm-up, gradients clipped; the best evaluation by validation accuracy is
kept in ``OUT/run-cnn/best.h5``.  Prints the final validation accuracy, and
the best's.
"""
import argparse
import os
import sys
import tempfile

import mpitrain

mpitrain.init()  # before numpy loads: BLAS threads per rank; an error on a rank ends the job
from mpi4py import MPI

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from digits import prepare_on_root  # noqa: E402 - the same files, indexed the same way

MODEL = ("conv2d(32,3,padding=1),relu,conv2d(64,3,padding=1),relu,maxpool2d(2),flatten,"
         "linear(128),relu,dropout(0.5),linear(10)")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="dataset directory (default: a temporary one)")
    args = p.parse_args()
    comm = MPI.COMM_WORLD
    out = args.out or os.path.join(tempfile.gettempdir(), f"mpitrain-digits-{os.getuid()}")

    prepare_on_root(comm, out, "examples/digits_cnn.py")
    run = os.path.join(out, "run-cnn")

    def fresh() -> None:  # each launch trains from scratch
        import shutil

        shutil.rmtree(run, ignore_errors=True)

    from mpitrain.runtime import on_root

    on_root(comm, fresh)
    cfg = mpitrain.Config(data=out, model=MODEL, batch_size=64, epochs=args.epochs,
                          seed=args.seed,
                          optimizer="adamw", lr=3e-3, weight_decay=1e-4,
                          lr_schedule="cosine", warmup_steps=20, clip_grad_norm=5.0,
                          ckpt_dir=run, ckpt_every=0, keep_last=1, monitor="val_accuracy",
                          log_every=100, quiet=True)
    summary = mpitrain.train(cfg, comm)
    best = summary["best"]
    if comm.rank == 0:
        kept = _accuracy(mpitrain.load_model(os.path.join(run, "best.h5")), out)
        print(f"digits_cnn: validation accuracy {summary['val_accuracy']:.3f} after "
              f"{args.epochs} epochs on {comm.size} ranks; the best, {best['best']:.3f} at "
              f"step {best['best_step']}, is in {run}/best.h5 (reloaded: {kept:.3f})")


def _accuracy(model, data: str) -> float:
    """The validation accuracy of ``model`` (rank 0 alone: 360 images)."""
    from mpitrain.data.manifest import read_manifest
    from mpitrain.data.shards import Shards

    val = Shards(read_manifest(data), "val")
    x, y = val.read_range(0, len(val))
    val.close()
    return float((model(x).argmax(axis=1) == y).mean())


if __name__ == "__main__":
    sys.exit(mpitrain.run_or_abort(main))
