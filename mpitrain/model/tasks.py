"""Tasks: what the targets are, which losses fit them, and their metrics as exact sums.

- ``classification``: integer labels in 0..classes-1; loss ``ce`` (or ``mse``
  against one-hot labels); metric: accuracy.
- ``regression``: float targets of any shape (flattened to k outputs),
  standardised from the training split (the model learns ``(y - mean) /
  std``; predictions are turned back); losses ``mse``, ``mae``, ``huber``;
  metrics per output and averaged: RMSE, MAE and R², in the targets' units.
- ``multilabel``: 0/1 targets for L labels; loss ``bce``; a label is predicted
  when its sigmoid passes 0.5; metrics per label and averaged: accuracy and F1.

A metric is computed from sums (``sums``: a float64 vector of ``width``
numbers per batch) that ranks add up exactly, then turned into values
(``summarize``); the same code serves a training step and an evaluation, at
any number of ranks.  Nothing here imports MPI.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np

from .losses import sigmoid, softmax

__all__ = ["TASKS", "Task", "Classification", "Regression", "Multilabel", "make_task"]

TASKS = ("classification", "regression", "multilabel")  # as data.manifest knows them


class Task:
    """Base class; see the module's docstring."""

    name = "task"
    losses: Sequence[str] = ()  # the losses that fit it, the first the default
    headline = "loss"  # the metric the progress line shows
    # Metric -> whether larger ("max") or smaller ("min") is better: what early stopping
    # and the best checkpoint may follow (the loss always).
    goals: Dict[str, str] = {"loss": "min"}
    outputs = 1  # the model's output width
    width = 0  # length of ``sums``

    def targets(self, y: np.ndarray, dtype) -> np.ndarray:
        """What the loss compares the outputs with (n, ...), from the stored targets."""
        return y

    def sums(self, out: np.ndarray, y: np.ndarray) -> np.ndarray:
        """The metric sums of a batch: outputs ``out`` (n, outputs), stored targets ``y``."""
        raise NotImplementedError

    def summarize(self, sums: np.ndarray, n: int) -> Dict[str, object]:
        """Metric values from the global ``sums`` of ``n`` samples."""
        raise NotImplementedError

    def predict(self, out: np.ndarray) -> Dict[str, np.ndarray]:
        """What a prediction holds for outputs ``out`` (n, outputs), by name."""
        raise NotImplementedError

    def describe(self) -> Dict[str, object]:
        """The task as a manifest and a checkpoint record it (JSON)."""
        return {"name": self.name}


class Classification(Task):
    """Integer labels in 0..classes-1."""

    name, losses, headline, width = "classification", ("ce", "mse"), "accuracy", 1
    goals = {"loss": "min", "accuracy": "max"}

    def __init__(self, classes: int):
        self.classes = self.outputs = int(classes)

    def sums(self, out, y):
        return np.array([np.count_nonzero(out.argmax(axis=1) == y)], np.float64)

    def summarize(self, sums, n):
        return {"accuracy": float(sums[0]) / n if n else float("nan")}

    def predict(self, out):
        return {"label": out.argmax(axis=1).astype(np.int64),
                "probabilities": softmax(out.astype(np.float64)).astype(out.dtype)}

    def describe(self):
        return {"name": self.name, "classes": self.classes}


class Regression(Task):
    """Float targets of shape ``shape``, standardised by ``mean`` and ``std`` (per output)."""

    name, losses, headline = "regression", ("mse", "mae", "huber"), "rmse"
    goals = {"loss": "min", "rmse": "min", "mae": "min", "r2": "max"}

    def __init__(self, shape: Sequence[int], mean: Optional[Sequence[float]] = None,
                 std: Optional[Sequence[float]] = None):
        self.shape = tuple(int(s) for s in shape)
        self.outputs = int(np.prod(self.shape)) if self.shape else 1
        k = self.outputs
        self.mean = np.zeros(k) if mean is None else np.asarray(mean, np.float64).reshape(k)
        self.std = np.ones(k) if std is None else np.asarray(std, np.float64).reshape(k)
        self.width = 4 * k  # per output: sum e^2, sum |e|, sum y, sum y^2 (target units)

    def targets(self, y, dtype):
        return ((y.reshape(len(y), -1) - self.mean) / self.std).astype(dtype)

    def sums(self, out, y):
        y = y.reshape(len(y), -1).astype(np.float64)
        e = out.astype(np.float64) * self.std + self.mean - y
        return np.concatenate([(e * e).sum(axis=0), np.abs(e).sum(axis=0), y.sum(axis=0),
                               (y * y).sum(axis=0)])

    def summarize(self, sums, n):
        k = self.outputs
        se, ae, sy, syy = (sums[i * k:(i + 1) * k] for i in range(4))
        if not n:
            return {"rmse": float("nan"), "mae": float("nan"), "r2": float("nan")}
        rmse, mae = np.sqrt(se / n), ae / n
        total = syy - sy * sy / n  # sum of (y - mean y)^2
        with np.errstate(divide="ignore", invalid="ignore"):
            r2 = np.where(total > 0, 1.0 - se / total, np.nan)
        out: Dict[str, object] = {"rmse": float(rmse.mean()), "mae": float(mae.mean()),
                                  "r2": float(np.nanmean(r2)) if np.isfinite(r2).any()
                                  else float("nan")}
        if k > 1:
            out.update(rmse_per_output=rmse.tolist(), mae_per_output=mae.tolist(),
                       r2_per_output=r2.tolist())
        return out

    def predict(self, out):
        values = out.astype(np.float64) * self.std + self.mean
        return {"value": values.reshape(len(out), *self.shape).astype(out.dtype)}

    def describe(self):
        return {"name": self.name, "shape": list(self.shape), "mean": self.mean.tolist(),
                "std": self.std.tolist()}


class Multilabel(Task):
    """0/1 targets for ``labels`` labels (targets of shape ``shape``, flattened)."""

    name, losses, headline = "multilabel", ("bce",), "f1"
    goals = {"loss": "min", "accuracy": "max", "f1": "max"}

    def __init__(self, shape: Sequence[int]):
        self.shape = tuple(int(s) for s in shape)
        self.outputs = int(np.prod(self.shape)) if self.shape else 1
        self.width = 4 * self.outputs  # per label: true positives, false positives,
        # false negatives, correct

    def targets(self, y, dtype):
        return y.reshape(len(y), -1).astype(dtype)

    def sums(self, out, y):
        t = y.reshape(len(y), -1) > 0.5
        p = out > 0  # sigmoid(z) > 0.5
        return np.concatenate([(p & t).sum(axis=0), (p & ~t).sum(axis=0),
                               (~p & t).sum(axis=0), (p == t).sum(axis=0)]).astype(np.float64)

    def summarize(self, sums, n):
        k = self.outputs
        tp, fp, fn, right = (sums[i * k:(i + 1) * k] for i in range(4))
        with np.errstate(divide="ignore", invalid="ignore"):
            f1 = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), 1.0)
        acc = right / n if n else np.full(k, np.nan)
        out: Dict[str, object] = {"accuracy": float(acc.mean()), "f1": float(f1.mean())}
        if k > 1:
            out.update(accuracy_per_label=acc.tolist(), f1_per_label=f1.tolist())
        return out

    def predict(self, out):
        shape = (len(out), *self.shape)
        return {"labels": (out > 0).astype(np.int8).reshape(shape),
                "probabilities": sigmoid(out).reshape(shape)}

    def describe(self):
        return {"name": self.name, "shape": list(self.shape)}


def make_task(record: Dict[str, object]) -> Task:
    """The task a manifest or checkpoint describes (``Task.describe()``)."""
    name = record.get("name", "classification")
    if name == "classification":
        return Classification(int(record["classes"]))
    if name == "regression":
        return Regression(record.get("shape", []), record.get("mean"), record.get("std"))
    if name == "multilabel":
        return Multilabel(record.get("shape", []))
    raise ValueError(f"task must be one of {', '.join(TASKS)}, got {name!r}")
