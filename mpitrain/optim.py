"""Optimizers that update one flat parameter buffer from one flat gradient buffer.

Their state is a dict of named flat arrays (``state()``), the same length as
the parameters, so a checkpoint stores it as it stores the parameters and a
pipeline stage holds only its own slice.
"""
from __future__ import annotations

from typing import Dict

import numpy as np

__all__ = ["SGD", "Momentum", "Adam", "make_optimizer", "OPTIMIZERS"]


class Optimizer:
    """Base class: ``step()`` updates ``params`` in place from ``grads``."""

    def __init__(self, params: np.ndarray, grads: np.ndarray, lr: float,
                 weight_decay: float = 0.0):
        if params.shape != grads.shape or params.dtype != grads.dtype:
            raise ValueError(f"params {params.dtype}{params.shape} and grads "
                             f"{grads.dtype}{grads.shape} differ")
        if not lr > 0:
            raise ValueError(f"learning rate must be > 0, got {lr}")
        self.params, self.grads = params, grads
        self.lr, self.weight_decay = lr, weight_decay
        self.steps = 0
        self._tmp = np.empty_like(params)  # scratch, so a step allocates nothing

    def state(self) -> Dict[str, np.ndarray]:
        """Named state arrays (views, not copies)."""
        return {}

    def step(self) -> None:
        """Apply one update."""
        raise NotImplementedError


class SGD(Optimizer):
    """Plain SGD: p -= lr * (g + wd * p)."""

    def step(self):
        g = self.grads
        if self.weight_decay:
            g = np.multiply(self.params, self.weight_decay, out=self._tmp)
            g += self.grads
        np.multiply(g, -self.lr, out=self._tmp)
        self.params += self._tmp
        self.steps += 1


class Momentum(Optimizer):
    """SGD with momentum (PyTorch form): v = mu * v + g; p -= lr * v."""

    def __init__(self, params, grads, lr, weight_decay=0.0, momentum=0.9):
        super().__init__(params, grads, lr, weight_decay)
        self.momentum = momentum
        self.velocity = np.zeros_like(params)

    def state(self):
        return {"velocity": self.velocity}

    def step(self):
        v = self.velocity
        v *= self.momentum
        v += self.grads
        if self.weight_decay:
            np.multiply(self.params, self.weight_decay, out=self._tmp)
            v += self._tmp
        np.multiply(v, -self.lr, out=self._tmp)
        self.params += self._tmp
        self.steps += 1


class Adam(Optimizer):
    """Adam; with ``decoupled=True`` AdamW (weight decay applied to p, not to g)."""

    def __init__(self, params, grads, lr, weight_decay=0.0, betas=(0.9, 0.999),
                 eps=1e-8, decoupled=False):
        super().__init__(params, grads, lr, weight_decay)
        self.beta1, self.beta2 = betas
        self.eps, self.decoupled = eps, decoupled
        self.m = np.zeros_like(params)
        self.v = np.zeros_like(params)

    def state(self):
        return {"m": self.m, "v": self.v}

    def step(self):
        self.steps += 1
        t, tmp, g = self.steps, self._tmp, self.grads
        if self.weight_decay and self.decoupled:
            self.params *= 1 - self.lr * self.weight_decay
        elif self.weight_decay:
            g = np.multiply(self.params, self.weight_decay, out=tmp)
            g += self.grads
        self.m *= self.beta1
        self.m += (1 - self.beta1) * g
        self.v *= self.beta2
        np.multiply(g, g, out=tmp)
        tmp *= 1 - self.beta2
        self.v += tmp
        # p -= lr / (1 - b1^t) * m / (sqrt(v / (1 - b2^t)) + eps)
        np.divide(self.v, 1 - self.beta2 ** t, out=tmp)
        np.sqrt(tmp, out=tmp)
        tmp += self.eps
        np.divide(self.m, tmp, out=tmp)
        tmp *= -self.lr / (1 - self.beta1 ** t)
        self.params += tmp


OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")


def make_optimizer(name: str, params: np.ndarray, grads: np.ndarray, *, lr: float,
                   weight_decay: float = 0.0, momentum: float = 0.9,
                   betas=(0.9, 0.999), eps: float = 1e-8) -> Optimizer:
    """The optimizer called ``name`` over the flat ``params``/``grads``."""
    if name == "sgd":
        return SGD(params, grads, lr, weight_decay)
    if name == "momentum":
        return Momentum(params, grads, lr, weight_decay, momentum)
    if name in ("adam", "adamw"):
        return Adam(params, grads, lr, weight_decay, betas, eps, decoupled=name == "adamw")
    raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")
