"""$ mpirun -n 4 python examples/torch_digits.py [--epochs 40] [--ckpt-dir DIR]

A small PyTorch CNN on scikit-learn's handwritten digits (1,797 8x8 images,
10 classes; ``pip install scikit-learn torch``), trained data-parallel by
``mpitrain.torch.fit``: a map-style torch ``Dataset`` read through mpitrain's
sampler, the gradients summed by MPI, checkpoints (kill it, run it again: it
resumes), the best checkpoint by validation accuracy.  Prints the validation
accuracy (about 0.98-0.99).
"""
import argparse

import mpitrain

mpitrain.init()  # before numpy and torch load: threads per rank; an error on a rank ends the job
import numpy as np
import torch
from mpi4py import MPI

import mpitrain.torch as mt


def digits() -> torch.utils.data.TensorDataset:
    """The digits as (1, 8, 8) images scaled to [0, 1], and their labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy((d.images / 16.0).astype(np.float32)).unsqueeze(1)
    return torch.utils.data.TensorDataset(x, torch.from_numpy(d.target.astype(np.int64)))


def cnn() -> torch.nn.Module:
    torch.manual_seed(0)  # the same initial values on every rank (fit checks it)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(32 * 4 * 4, 64), torch.nn.ReLU(),
        torch.nn.Dropout(0.2), torch.nn.Linear(64, 10))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--ckpt-dir", default=None)
    args = p.parse_args()
    model = cnn()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    data = mt.TorchDataset(digits(), val_fraction=0.2, seed=0)
    saved = dict(ckpt_dir=args.ckpt_dir, monitor="val_accuracy") if args.ckpt_dir else {}
    model, summary = mt.fit(model, optimizer, torch.nn.functional.cross_entropy, data,
                            batch_size=64, epochs=args.epochs, lr_schedule="cosine",
                            eval_every=100, quiet=True, **saved)
    if MPI.COMM_WORLD.rank == 0:
        print(f"torch_digits: {MPI.COMM_WORLD.size} ranks, {summary['end_step']} steps, "
              f"val_accuracy {summary['val_accuracy']:.3f}")


if __name__ == "__main__":
    main()
