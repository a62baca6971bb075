"""$ mpirun -n 2 python examples/residual_regression.py [--epochs 200] [--out data/friedman]

A residual MLP with layer normalisation and dropout on a regression set:
Friedman's benchmark #1 (scikit-learn's ``make_friedman1``: 10 inputs, 5 of
them used, y = 10 sin(pi x1 x2) + 20 (x3 - 0.5)^2 + 10 x4 + 5 x5 + noise of
standard deviation 1, so the best RMSE possible is 1.0), 5,000 rows written
as one HDF5 file of one's own and indexed in place (20% for validation):

    linear(64), residual(layernorm, linear(128), gelu, dropout(0.1), linear(64)) x 2,
    layernorm, linear(1)

trained with AdamW, a cosine schedule after a warm-up, and early stopping on
the validation RMSE (patience 10 evaluations, one per epoch); the best
evaluation is kept in ``OUT/run/best.h5``.  Prints its RMSE and R² beside
scikit-learn's ridge regression (RidgeCV) on exactly the same rows, and the
noise floor.
"""
import argparse
import os
import sys
import tempfile

import mpitrain

mpitrain.init()  # before numpy loads: BLAS threads per rank; an error on a rank ends the job
from mpi4py import MPI

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from diabetes import baseline  # noqa: E402 - RidgeCV on the same split

BLOCK = "residual(layernorm,linear(128),gelu,dropout(0.1),linear(64))"
MODEL = f"linear(64),{BLOCK},{BLOCK},layernorm,linear(1)"
NAME = "friedman1"


def write_and_index(out: str, samples: int = 5000, seed: int = 0) -> None:
    """Rank 0: the set as ``out/friedman1.h5`` (/features, /targets) and a manifest."""
    import h5py
    import numpy as np
    from sklearn.datasets import make_friedman1

    from mpitrain.data.index import index_files

    x, y = make_friedman1(n_samples=samples, n_features=10, noise=1.0, random_state=seed)
    os.makedirs(out, exist_ok=True)
    with h5py.File(os.path.join(out, f"{NAME}.h5"), "w") as f:
        f.create_dataset("features", data=x.astype(np.float32), chunks=(500, 10),
                         compression="gzip")
        f.create_dataset("targets", data=y.astype(np.float32), chunks=(500,),
                         compression="gzip")
    index_files([os.path.join(out, f"{NAME}.h5")], "features", "targets", out,
                val_fraction=0.2, seed=seed, task="regression")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--out", default=None, help="dataset directory (default: a temporary one)")
    args = p.parse_args()
    comm = MPI.COMM_WORLD
    out = args.out or os.path.join(tempfile.gettempdir(), f"mpitrain-{NAME}-{os.getuid()}")
    run = os.path.join(out, "run")

    def prepare() -> None:
        import shutil

        if not os.path.exists(os.path.join(out, "manifest.json")):
            try:
                write_and_index(out)
            except ImportError:
                raise mpitrain.MpitrainError("examples/residual_regression.py needs "
                                             "scikit-learn: pip install scikit-learn") from None
        shutil.rmtree(run, ignore_errors=True)  # each launch trains from scratch

    from mpitrain.runtime import on_root

    on_root(comm, prepare)
    cfg = mpitrain.Config(data=out, model=MODEL, batch_size=64, epochs=args.epochs,
                          optimizer="adamw", lr=2e-3, weight_decay=1e-4,
                          lr_schedule="cosine", warmup_steps=100, early_stop=10,
                          monitor="val_rmse", ckpt_dir=run, ckpt_every=0, keep_last=1,
                          log_every=1000, quiet=True)
    summary = mpitrain.train(cfg, comm)
    ridge = on_root(comm, lambda: baseline(out, NAME))
    from mpitrain.run.predict import evaluate

    best = evaluate(os.path.join(run, "best.h5"), out, comm)  # the kept state, reloaded
    if comm.rank == 0:
        stopped = f"stopped early at step {summary['end_step']}" if summary["early_stop"] \
            else f"{args.epochs} epochs"
        print(f"{NAME}: validation RMSE {best['rmse']:.3f}, R2 {best['r2']:.3f} (best.h5, "
              f"step {summary['best']['best_step']}; {stopped}) on {comm.size} ranks; ridge "
              f"regression on the same split: RMSE {ridge['rmse']:.3f}, R2 {ridge['r2']:.3f}; "
              "noise floor RMSE 1.000")


if __name__ == "__main__":
    sys.exit(mpitrain.run_or_abort(main))
