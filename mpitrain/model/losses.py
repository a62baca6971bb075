"""Losses: each returns the sum of per-sample losses and the gradient of ``scale`` times it.

``outputs`` is (n, k).  Targets are integer labels (n,) for ``ce`` (and for
``mse`` against one-hot labels), else floats (n, k): standardised values for
regression, 0/1 for ``bce``.  A per-sample loss is the mean over the k
outputs, so its size does not grow with k.  Sums are taken in float64.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np

__all__ = ["SoftmaxCrossEntropy", "MSELoss", "MAELoss", "HuberLoss", "BinaryCrossEntropy",
           "LOSSES", "make_loss", "sigmoid", "softmax"]


def sigmoid(z: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-z)), without overflow."""
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(z.dtype)


def softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise softmax of logits (n, classes)."""
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


class SoftmaxCrossEntropy:
    """Softmax cross-entropy of logits (n, classes) against integer labels (n,)."""

    def __call__(self, logits: np.ndarray, labels: np.ndarray,
                 scale: float) -> Tuple[float, np.ndarray]:
        """Return (sum of per-sample losses, d(scale * that sum)/d logits)."""
        shifted = logits - logits.max(axis=1, keepdims=True)
        exp = np.exp(shifted)
        total = exp.sum(axis=1, keepdims=True)
        rows = np.arange(len(labels))
        loss = float(np.sum(np.log(total[:, 0]) - shifted[rows, labels], dtype=np.float64))
        grad = exp
        grad *= (scale / total).astype(logits.dtype)  # softmax * scale
        grad[rows, labels] -= logits.dtype.type(scale)
        return loss, grad


def _error(outputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """outputs - targets (n, k); integer labels (n,) stand for one-hot rows."""
    diff = outputs.copy()
    if targets.ndim == 1:
        diff[np.arange(len(targets)), targets] -= 1
    else:
        diff -= targets.reshape(diff.shape)
    return diff


class MSELoss:
    """Mean squared error over the outputs (n, k), per sample, against float targets
    (n, k) or one-hot labels (n,)."""

    def __call__(self, outputs: np.ndarray, targets: np.ndarray,
                 scale: float) -> Tuple[float, np.ndarray]:
        """Return (sum of per-sample losses, d(scale * that sum)/d outputs)."""
        diff = _error(outputs, targets)
        k = outputs.shape[1]
        loss = float(np.sum(np.square(diff, dtype=np.float64)) / k)
        diff *= outputs.dtype.type(2.0 * scale / k)
        return loss, diff


class MAELoss:
    """Mean absolute error over the outputs (n, k), per sample."""

    def __call__(self, outputs, targets, scale):
        """Return (sum of per-sample losses, d(scale * that sum)/d outputs)."""
        diff = _error(outputs, targets)
        k = outputs.shape[1]
        loss = float(np.sum(np.abs(diff), dtype=np.float64) / k)
        grad = np.sign(diff)
        grad *= outputs.dtype.type(scale / k)
        return loss, grad


class HuberLoss:
    """Huber loss (quadratic within ``delta`` of the target, linear beyond), mean over
    the outputs, per sample; ``delta`` in the targets' (standardised) units."""

    def __init__(self, delta: float = 1.0):
        self.delta = float(delta)

    def __call__(self, outputs, targets, scale):
        """Return (sum of per-sample losses, d(scale * that sum)/d outputs)."""
        diff = _error(outputs, targets)
        k, d = outputs.shape[1], self.delta
        small = np.abs(diff) <= d
        per = np.where(small, 0.5 * np.square(diff, dtype=np.float64),
                       d * (np.abs(diff, dtype=np.float64) - 0.5 * d))
        loss = float(per.sum() / k)
        grad = np.clip(diff, -d, d)
        grad *= outputs.dtype.type(scale / k)
        return loss, grad


class BinaryCrossEntropy:
    """Sigmoid cross-entropy of logits (n, L) against 0/1 targets (n, L), mean over the
    labels, per sample; computed stably as max(z, 0) - z t + log(1 + exp(-|z|))."""

    def __call__(self, logits, targets, scale):
        """Return (sum of per-sample losses, d(scale * that sum)/d logits)."""
        t = targets.reshape(logits.shape).astype(logits.dtype, copy=False)
        z = logits
        k = z.shape[1]
        per = (np.maximum(z, 0) - z * t + np.log1p(np.exp(-np.abs(z)))).astype(np.float64)
        loss = float(per.sum() / k)
        grad = sigmoid(z)
        grad -= t
        grad *= z.dtype.type(scale / k)
        return loss, grad


LOSSES = {"ce": SoftmaxCrossEntropy, "bce": BinaryCrossEntropy, "mse": MSELoss,
          "mae": MAELoss, "huber": HuberLoss}


def make_loss(name: str):
    """The loss called ``name`` (one of ``LOSSES``)."""
    if name not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {name!r}")
    return LOSSES[name]()
