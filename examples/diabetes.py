"""$ mpirun -n 2 python examples/diabetes.py [--epochs 60] [--out data/diabetes]

Regression on real data: scikit-learn's bundled diabetes set (442 patients,
10 features, one target: disease progression after a year; ``pip install
scikit-learn``), written as an HDF5 file of one's own (chunked, gzip'd),
indexed in place (nothing copied), trained with the targets standardised,
and evaluated on the validation split.  Prints RMSE and R² beside
scikit-learn's ridge regression (RidgeCV) fitted on exactly the same
training rows.
"""
import argparse
import os
import sys
import tempfile

import mpitrain

mpitrain.init()  # before numpy loads: BLAS threads per rank; an error on a rank ends the job
from mpi4py import MPI


def write_and_index(out: str, dataset: str, seed: int = 0) -> None:
    """Rank 0: the data as one HDF5 file in ``out``, and a manifest over it."""
    import h5py
    import numpy as np
    from sklearn import datasets

    from mpitrain.data.index import index_files

    data = getattr(datasets, f"load_{dataset}")()
    y = data.target.reshape(len(data.target), -1).astype(np.float32)
    x = (data.data - data.data.mean(axis=0)) / data.data.std(axis=0)  # the inputs scaled
    os.makedirs(out, exist_ok=True)
    with h5py.File(os.path.join(out, f"{dataset}.h5"), "w") as f:
        f.create_dataset("features", data=x.astype(np.float32), chunks=True,
                         compression="gzip")
        f.create_dataset("targets", data=y if y.shape[1] > 1 else y[:, 0], chunks=True,
                         compression="gzip")
    index_files([os.path.join(out, f"{dataset}.h5")], "features", "targets", out,
                val_fraction=0.2, seed=seed, task="regression")


def baseline(out: str, dataset: str) -> dict:
    """RMSE and R² (per output, averaged) of scikit-learn's ridge regression (its penalty
    chosen by cross-validation on the training rows) on the same split."""
    import h5py
    import numpy as np
    from sklearn.linear_model import RidgeCV

    from mpitrain.data.manifest import read_manifest

    m = read_manifest(out)
    with h5py.File(os.path.join(out, f"{dataset}.h5")) as f:
        x = f["features"][()].astype(np.float64)
        y = f["targets"][()].reshape(len(f["targets"]), -1).astype(np.float64)
    pick = {s: np.concatenate([np.arange(lo, hi) for e in m.splits[s] for lo, hi in e.ranges])
            for s in ("train", "val")}
    model = RidgeCV(alphas=np.logspace(-4, 3, 30)).fit(x[pick["train"]], y[pick["train"]])
    e = model.predict(x[pick["val"]]).reshape(-1, y.shape[1]) - y[pick["val"]]
    yv = y[pick["val"]]
    r2 = 1 - (e ** 2).sum(axis=0) / ((yv - yv.mean(axis=0)) ** 2).sum(axis=0)
    return {"rmse": float(np.sqrt((e ** 2).mean(axis=0)).mean()), "r2": float(r2.mean())}


def run(dataset: str, hidden, default_epochs: int, batch_size: int = 32) -> None:
    """Write, index, train and evaluate ``dataset``; print the result beside the baseline."""
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=default_epochs)
    p.add_argument("--out", default=None, help="dataset directory (default: a temporary one)")
    args = p.parse_args()
    comm = MPI.COMM_WORLD
    out = args.out or os.path.join(tempfile.gettempdir(), f"mpitrain-{dataset}-{os.getuid()}")

    def prepare() -> None:
        if not os.path.exists(os.path.join(out, "manifest.json")):
            try:
                write_and_index(out, dataset)
            except ImportError:
                raise mpitrain.MpitrainError(f"examples/{dataset}.py needs scikit-learn: "
                                             "pip install scikit-learn") from None

    from mpitrain.runtime import on_root

    on_root(comm, prepare)
    cfg = mpitrain.Config(data=out, hidden=hidden, batch_size=batch_size, epochs=args.epochs,
                          optimizer="adamw", lr=3e-3, weight_decay=1e-2, log_every=1000,
                          eval_every=0, quiet=True, run_dir=os.path.join(out, "run"))
    summary = mpitrain.train(cfg, comm)
    ridge = on_root(comm, lambda: baseline(out, dataset))
    if comm.rank == 0:
        print(f"{dataset}: validation RMSE {summary['val_rmse']:.3f}, R2 {summary['val_r2']:.3f} "
              f"after {args.epochs} epochs on {comm.size} ranks; ridge regression on the same "
              f"split: "
              f"RMSE {ridge['rmse']:.3f}, R2 {ridge['r2']:.3f}")


if __name__ == "__main__":
    sys.exit(mpitrain.run_or_abort(lambda: run("diabetes", [32], 60)))
