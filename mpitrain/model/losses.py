"""Losses: each returns the sum of per-sample losses and the gradient of ``scale`` times it."""
from __future__ import annotations

from typing import Tuple

import numpy as np

__all__ = ["SoftmaxCrossEntropy", "MSELoss", "LOSSES", "make_loss"]


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


class MSELoss:
    """Mean squared error between outputs (n, k) and one-hot labels (n,), per sample."""

    def __call__(self, outputs: np.ndarray, labels: np.ndarray,
                 scale: float) -> Tuple[float, np.ndarray]:
        """Return (sum of per-sample losses, d(scale * that sum)/d outputs)."""
        diff = outputs.copy()
        diff[np.arange(len(labels)), labels] -= 1
        k = outputs.shape[1]
        loss = float(np.sum(np.square(diff, dtype=np.float64)) / k)
        diff *= outputs.dtype.type(2.0 * scale / k)
        return loss, diff


LOSSES = {"ce": SoftmaxCrossEntropy, "mse": MSELoss}


def make_loss(name: str):
    """The loss called ``name`` ('ce' or 'mse')."""
    if name not in LOSSES:
        raise ValueError(f"loss must be one of {sorted(LOSSES)}, got {name!r}")
    return LOSSES[name]()
