"""$ mpirun -n 2 python examples/custom_model.py [--ckpt-dir DIR] [--epochs N]

A layer of one's own, trained with everything ``mpitrain train`` has.

``Scale`` (one learned factor per feature) is registered under a name, so the
model can be written as text and its checkpoints rebuilt; ``check_layer``
compares its backward pass with central differences; ``fit`` trains it
with checkpoints in ``--ckpt-dir`` (run it again to resume: it starts from the
newest one), on arrays in memory; ``load_model`` rebuilds the trained model
from the checkpoint and predicts exactly what the trained model predicts.
"""
import argparse
import os
import sys

import numpy as np

import mpitrain


@mpitrain.register_layer("scale")
class Scale(mpitrain.Layer):
    """y = x * gamma: a learned factor per feature."""

    def __init__(self, features: int, init: float = 1.0):
        self.features, self.first = features, init

    def shapes(self):
        return {"gamma": (self.features,)}

    def bind(self, params, grads):
        self.gamma, self.ggamma = params["gamma"], grads["gamma"]

    def init(self, params, rng):
        params["gamma"][...] = self.first

    def out_shape(self, shape):
        if shape != (self.features,):
            raise ValueError(f"takes {self.features} features per sample, got shape {shape}")
        return shape

    def forward(self, x, ctx=None):
        return x * self.gamma, x  # what backward needs: the input

    def backward(self, dy, saved, need_dx=True, accumulate=False):
        g = (dy * saved).sum(axis=0)
        if accumulate:
            self.ggamma += g
        else:
            self.ggamma[...] = g
        return dy * self.gamma if need_dx else None


def blobs(n: int = 3000, features: int = 20, classes: int = 4, seed: int = 0):
    """Gaussian clouds around a centre per class, some features scaled up as noise."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1.5, (classes, features))
    y = rng.integers(0, classes, n)
    x = centres[y] + rng.normal(0, 1.0, (n, features))
    x[:, features // 2:] *= 5.0  # half the features on another scale: Scale learns it
    return x.astype(np.float32), y


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt-dir", default="custom_model_ckpt")
    p.add_argument("--epochs", type=int, default=8)
    args = p.parse_args()
    mpitrain.init()  # threads per rank, and an error on any rank ends the job
    mpitrain.check_layer(Scale(6, init=0.5), (6,))  # raises GradientCheckError if wrong
    x, y = blobs()
    model = mpitrain.Sequential([Scale(20), mpitrain.Linear(20, 64), mpitrain.Tanh(),
                                 mpitrain.Linear(64, 4)], seed=1)
    result = mpitrain.fit(model, mpitrain.ArrayDataset(x, y, val_fraction=0.2),
                          epochs=args.epochs, batch_size=64, optimizer="adam", lr=3e-3,
                          ckpt_dir=args.ckpt_dir, quiet=True)
    model, summary = result
    newest = sorted(f for f in os.listdir(args.ckpt_dir) if f.startswith("ckpt-"))[-1]
    reloaded = mpitrain.load_model(os.path.join(args.ckpt_dir, newest))
    same = np.array_equal(reloaded.outputs(x[:500]), model(x[:500]))
    if result.comm.rank == 0:
        print(f"custom_model: {result.comm.size} ranks, model {model.text()}, "
              f"val_accuracy {summary['val_accuracy']:.3f}; reloaded from {newest}: "
              f"the same predictions: {same}")


if __name__ == "__main__":
    sys.exit(main())
