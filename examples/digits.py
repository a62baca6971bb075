"""$ mpirun -n 2 python examples/digits.py [--epochs 30] [--out data/digits]

Train on a real dataset: scikit-learn's bundled handwritten digits (1,797
8x8 images, 10 classes; ``pip install scikit-learn``), converted to HDF5
shards with ``mpitrain prepare``, then trained data-parallel; prints the
validation accuracy.
"""
import argparse
import os
import sys
import tempfile

import mpitrain  # first: sets BLAS threads per rank
from mpi4py import MPI


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--out", default=None, help="dataset directory (default: a temporary one)")
    args = p.parse_args()
    comm = MPI.COMM_WORLD
    out = args.out or os.path.join(tempfile.gettempdir(), f"mpitrain-digits-{os.getuid()}")
    error = None
    if comm.rank == 0 and not os.path.exists(os.path.join(out, "manifest.json")):
        try:
            import numpy as np
            from sklearn.datasets import load_digits

            from mpitrain.data.prepare import from_npz

            digits = load_digits()
            with tempfile.TemporaryDirectory() as tmp:
                npz = os.path.join(tmp, "digits.npz")
                np.savez(npz, x=(digits.data / 16.0).astype(np.float32), y=digits.target)
                from_npz(npz, out, shards=4, val_fraction=0.2, seed=0)
        except ImportError:
            error = "examples/digits.py needs scikit-learn: pip install scikit-learn"
    error = comm.bcast(error, root=0)
    if error:
        raise mpitrain.MpitrainError(error, everywhere=True)
    cfg = mpitrain.Config(data=out, hidden=[64, 64], batch_size=64, epochs=args.epochs,
                          optimizer="adam", lr=3e-3, log_every=50, eval_every=0,
                          run_dir=os.path.join(out, "run"))
    summary = mpitrain.train(cfg, comm)
    if comm.rank == 0:
        print(f"digits: validation accuracy {summary['val_accuracy']:.3f} after "
              f"{args.epochs} epochs on {comm.size} ranks")


if __name__ == "__main__":
    sys.exit(mpitrain.run_or_abort(main))
