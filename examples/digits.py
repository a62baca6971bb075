"""$ mpirun -n 2 python examples/digits.py [--epochs 30] [--out data/digits]

Train on a real dataset read in place: scikit-learn's bundled handwritten
digits (1,797 8x8 images, 10 classes; ``pip install scikit-learn``) written
as an HDF5 file of one's own (images kept as (1, 8, 8), chunked and gzip'd),
indexed with ``mpitrain data index`` (nothing copied), then trained
data-parallel; prints the validation accuracy.
"""
import argparse
import os
import sys
import tempfile

import mpitrain

mpitrain.init()  # before numpy loads: BLAS threads per rank; an error on a rank ends the job
from mpi4py import MPI


def write_and_index(out: str) -> None:
    """Rank 0: the digits as ``out/digits.h5`` (/images, /labels) and a manifest over it."""
    import h5py
    import numpy as np
    from sklearn.datasets import load_digits

    from mpitrain.data.index import index_files

    digits = load_digits()
    os.makedirs(out, exist_ok=True)
    with h5py.File(os.path.join(out, "digits.h5"), "w") as f:
        f.create_dataset("images", data=(digits.images / 16.0).astype(np.float32)[:, None],
                         chunks=(64, 1, 8, 8), compression="gzip")
        f.create_dataset("labels", data=digits.target.astype(np.int64), chunks=(64,),
                         compression="gzip")
    index_files([os.path.join(out, "digits.h5")], "images", "labels", out, val_fraction=0.2)


def prepare_on_root(comm, out: str, script: str) -> None:
    """Rank 0 writes and indexes the digits into ``out`` unless they are there (collective)."""
    from mpitrain.runtime import on_root

    def prepare() -> None:
        if not os.path.exists(os.path.join(out, "manifest.json")):
            try:
                write_and_index(out)
            except ImportError:
                raise mpitrain.MpitrainError(f"{script} needs scikit-learn: pip install "
                                             "scikit-learn") from None

    on_root(comm, prepare)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--out", default=None, help="dataset directory (default: a temporary one)")
    args = p.parse_args()
    comm = MPI.COMM_WORLD
    out = args.out or os.path.join(tempfile.gettempdir(), f"mpitrain-digits-{os.getuid()}")

    prepare_on_root(comm, out, "examples/digits.py")
    cfg = mpitrain.Config(data=out, hidden=[64, 64], batch_size=64, epochs=args.epochs,
                          optimizer="adam", lr=3e-3, log_every=50, eval_every=0,
                          run_dir=os.path.join(out, "run"))
    summary = mpitrain.train(cfg, comm)
    if comm.rank == 0:
        print(f"digits: validation accuracy {summary['val_accuracy']:.3f} after "
              f"{args.epochs} epochs on {comm.size} ranks")


if __name__ == "__main__":
    sys.exit(mpitrain.run_or_abort(main))
