"""A registered layer of the tests' own, and the arrays the fit tests train on.

Imported by tests/fit_job.py (the job) and by a fresh process that loads its
checkpoint: without this import, the checkpoint is refused naming ``gate``.
"""
import numpy as np

import mpitrain


@mpitrain.register_layer("gate")
class Gate(mpitrain.Layer):
    """y = x * tanh(w) + b: a learned gate and shift per feature."""

    def __init__(self, features: int, scale: float = 1.0):
        self.features, self.scale = features, scale

    def shapes(self):
        return {"w": (self.features,), "b": (self.features,)}

    def bind(self, params, grads):
        self.w, self.b = params["w"], params["b"]
        self.gw, self.gb = grads["w"], grads["b"]

    def init(self, params, rng):
        params["w"][...] = rng.uniform(0.5, 1.0, self.features) * self.scale
        params["b"][...] = 0.0

    def out_shape(self, shape):
        if shape != (self.features,):
            raise ValueError(f"takes {self.features} features per sample, got shape {shape}")
        return shape

    def forward(self, x, ctx=None):
        t = np.tanh(self.w)
        return x * t + self.b, (x, t)

    def backward(self, dy, saved, need_dx=True, accumulate=False):
        x, t = saved
        gw = (dy * x).sum(axis=0) * (1 - t * t)
        gb = dy.sum(axis=0)
        if accumulate:
            self.gw += gw
            self.gb += gb
        else:
            self.gw[...] = gw
            self.gb[...] = gb
        return dy * t if need_dx else None


def arrays(n: int = 600, features: int = 12, classes: int = 3, seed: int = 0):
    """Float32 samples and int64 labels of a learnable problem."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1.0, (classes, features))
    y = rng.integers(0, classes, n)
    return (centres[y] + rng.normal(0, 1.0, (n, features))).astype(np.float32), y


def model(features: int = 12, classes: int = 3, dtype: str = "float32"):
    """The model the fit tests train: the registered gate first."""
    return mpitrain.Sequential([Gate(features, scale=0.9), mpitrain.Linear(features, 16),
                                mpitrain.Tanh(), mpitrain.Dropout(0.1),
                                mpitrain.Linear(16, classes)], dtype=dtype, seed=3)
