"""Optimizers that update one flat parameter buffer from one flat gradient buffer.

Their state is a dict of named flat arrays (``state()``), the same length as
the parameters, so a checkpoint stores it as it stores the parameters and a
pipeline stage holds only its own slice.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np

__all__ = ["Optimizer", "SGD", "Momentum", "Adam", "AdamW", "make_optimizer", "optimizer_named",
           "OPTIMIZERS"]


class Optimizer:
    """Base class: ``step()`` updates ``params`` in place from ``grads``.

    Made with its hyper-parameters alone (``Adam(lr=1e-3)``); a trainer then
    ``attach``es it to the flat buffers it updates (the whole model, a pipeline
    stage's, a parameter server's slice), which allocates its state.
    Every rule is elementwise, so it can update any part of the buffers on its
    own (``step(parts)``: a sharded update, where each rank of a node updates
    its share of shared parameters), and works through each part in chunks of
    ``CHUNK`` items, so its temporaries stay in cache instead of making extra
    trips to memory.  ``bind`` moves it onto other buffers (memory the ranks of
    a node share, for a sharded update).
    """

    CHUNK = 1 << 18  # items per chunk: 1 MiB of float32, within a core's L2
    name = "optimizer"  # as the configuration and checkpoints call it

    def __init__(self, lr: float, weight_decay: float = 0.0):
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
            raise ValueError(f"learning rate must be > 0, got {lr!r}")
        if isinstance(weight_decay, bool) or not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        self.params: Optional[np.ndarray] = None
        self.grads: Optional[np.ndarray] = None
        self.lr, self.weight_decay = float(lr), float(weight_decay)
        self.steps = 0

    def attach(self, params: np.ndarray, grads: np.ndarray) -> "Optimizer":
        """Update the flat ``params`` from ``grads`` from now on; the state (zeros) is
        allocated at the first attach and kept when attached again to buffers of the same
        size (a rebuilt trainer).  Returns the optimizer."""
        if params.shape != grads.shape or params.dtype != grads.dtype:
            raise ValueError(f"params {params.dtype}{params.shape} and grads "
                             f"{grads.dtype}{grads.shape} differ")
        same = (self.params is not None and self.params.shape == params.shape
                and self.params.dtype == params.dtype)
        if not same:
            if self.steps:
                raise ValueError(f"{self.name} has taken {self.steps} steps on "
                                 f"{self.params.size} parameters; it cannot move to "
                                 f"{params.size}")
            for key in self.STATE:
                setattr(self, key, np.zeros_like(params))
        self.params, self.grads = params, grads
        self._tmp = np.empty(min(params.size, self.CHUNK), params.dtype)  # scratch
        return self

    def like(self) -> "Optimizer":
        """A new optimizer of this kind and hyper-parameters, not attached."""
        hyper = self.hyper()
        return type(self)(**{k: v for k, v in hyper.items() if k in self._ARGS})

    _ARGS: Sequence[str] = ("lr", "weight_decay")

    def state(self) -> Dict[str, np.ndarray]:
        """Named state arrays (views, not copies), each name that of its attribute."""
        return {name: getattr(self, name) for name in self.STATE}

    STATE: Sequence[str] = ()  # names of the state arrays, each as long as the parameters

    def hyper(self) -> Dict[str, object]:
        """The hyper-parameters, by name (a checkpoint records them)."""
        return {"lr": self.lr, "weight_decay": self.weight_decay}

    def bind(self, params: np.ndarray, grads: np.ndarray,
             state: Optional[Dict[str, np.ndarray]] = None) -> None:
        """Update ``params`` from ``grads`` from now on, with ``state`` (by name) as the
        state arrays; each array is used as it is (copy the values in first to keep them)."""
        if self.params is None:
            self.attach(params, grads)
        for name, array in [("params", params), ("grads", grads), *(state or {}).items()]:
            if array.shape != self.params.shape or array.dtype != self.params.dtype:
                raise ValueError(f"{name}: expected {self.params.dtype}{self.params.shape}, "
                                 f"got {array.dtype}{array.shape}")
        unknown = set(state or ()) - set(self.STATE)
        if unknown:
            raise ValueError(f"unknown state {sorted(unknown)} (this optimizer has "
                             f"{list(self.STATE)})")
        self.params, self.grads = params, grads
        for name, array in (state or {}).items():
            setattr(self, name, array)

    def step(self, parts: Optional[Sequence[slice]] = None) -> None:
        """Apply one update: to all of the buffers, or only to ``parts`` (slices of them)."""
        if self.params is None:
            raise ValueError(f"{self.name} is not attached to any parameters (a trainer "
                             "attaches it; or call attach(params, grads))")
        self.steps += 1
        for part in [slice(0, self.params.size)] if parts is None else parts:
            lo, hi, _ = part.indices(self.params.size)
            for a in range(lo, hi, self.CHUNK):
                chunk = slice(a, min(hi, a + self.CHUNK))
                self._update(chunk, self._tmp[:chunk.stop - chunk.start])

    def _update(self, part: slice, tmp: np.ndarray) -> None:
        """Update ``params[part]`` (``tmp``: scratch of the same length)."""
        raise NotImplementedError

    def _decayed(self, part: slice, tmp: np.ndarray) -> np.ndarray:
        """g + wd * p on ``part`` (in ``tmp``), or g itself without weight decay."""
        if not self.weight_decay:
            return self.grads[part]
        np.multiply(self.params[part], self.weight_decay, out=tmp)
        tmp += self.grads[part]
        return tmp


class SGD(Optimizer):
    """Plain SGD: p -= lr * (g + wd * p)."""

    name = "sgd"

    def __init__(self, lr: float = 0.05, weight_decay: float = 0.0):
        super().__init__(lr, weight_decay)

    def _update(self, part, tmp):
        g = self._decayed(part, tmp)
        np.multiply(g, -self.lr, out=tmp)
        self.params[part] += tmp


class Momentum(Optimizer):
    """SGD with momentum (PyTorch form): v = mu * v + g; p -= lr * v."""

    name = "momentum"
    STATE = ("velocity",)
    _ARGS = ("lr", "weight_decay", "momentum")

    def __init__(self, lr: float = 0.05, weight_decay: float = 0.0, momentum: float = 0.9):
        super().__init__(lr, weight_decay)
        if isinstance(momentum, bool) or not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        self.momentum = momentum

    def hyper(self):
        return {**super().hyper(), "momentum": self.momentum}

    def _update(self, part, tmp):
        v = self.velocity[part]
        v *= self.momentum
        v += self.grads[part]
        if self.weight_decay:  # added after g, as before: the same bits as ever
            np.multiply(self.params[part], self.weight_decay, out=tmp)
            v += tmp
        np.multiply(v, -self.lr, out=tmp)
        self.params[part] += tmp


class Adam(Optimizer):
    """Adam; with ``decoupled=True`` AdamW (weight decay applied to p, not to g)."""

    STATE = ("m", "v")

    @property
    def name(self) -> str:
        return "adamw" if self.decoupled else "adam"

    _ARGS = ("lr", "weight_decay", "betas", "eps", "decoupled")

    def __init__(self, lr: float = 1e-3, weight_decay: float = 0.0,
                 betas: Sequence[float] = (0.9, 0.999), eps: float = 1e-8,
                 decoupled: bool = False):
        super().__init__(lr, weight_decay)
        self.beta1, self.beta2 = betas
        self.eps, self.decoupled = eps, decoupled

    def like(self) -> "Adam":
        return type(self)(self.lr, self.weight_decay, (self.beta1, self.beta2), self.eps,
                          self.decoupled)

    def hyper(self):
        return {**super().hyper(), "beta1": self.beta1, "beta2": self.beta2, "eps": self.eps,
                "decoupled": self.decoupled}

    def _update(self, part, tmp):
        t, p, m, v = self.steps, self.params[part], self.m[part], self.v[part]
        if self.weight_decay and self.decoupled:
            p *= 1 - self.lr * self.weight_decay
            g = self.grads[part]
        else:
            g = self._decayed(part, tmp)
        m *= self.beta1
        m += (1 - self.beta1) * g
        v *= self.beta2
        np.multiply(g, g, out=tmp)
        tmp *= 1 - self.beta2
        v += tmp
        # p -= lr / (1 - b1^t) * m / (sqrt(v / (1 - b2^t)) + eps)
        np.divide(v, 1 - self.beta2 ** t, out=tmp)
        np.sqrt(tmp, out=tmp)
        tmp += self.eps
        np.divide(m, tmp, out=tmp)
        tmp *= -self.lr / (1 - self.beta1 ** t)
        p += tmp


class AdamW(Adam):
    """Adam with decoupled weight decay (p *= 1 - lr * wd before the Adam step)."""

    def __init__(self, lr: float = 1e-3, weight_decay: float = 0.01,
                 betas: Sequence[float] = (0.9, 0.999), eps: float = 1e-8):
        super().__init__(lr, weight_decay, betas, eps, decoupled=True)

    def like(self) -> "AdamW":
        return AdamW(self.lr, self.weight_decay, (self.beta1, self.beta2), self.eps)


OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")


def optimizer_named(name: str, *, lr: float, weight_decay: float = 0.0,
                    momentum: float = 0.9, betas=(0.9, 0.999), eps: float = 1e-8) -> Optimizer:
    """The optimizer called ``name`` (one of ``OPTIMIZERS``), not attached."""
    if name == "sgd":
        return SGD(lr, weight_decay)
    if name == "momentum":
        return Momentum(lr, weight_decay, momentum)
    if name in ("adam", "adamw"):
        return Adam(lr, weight_decay, betas, eps, decoupled=name == "adamw")
    raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")


def make_optimizer(name: str, params: np.ndarray, grads: np.ndarray, *, lr: float,
                   weight_decay: float = 0.0, momentum: float = 0.9,
                   betas=(0.9, 0.999), eps: float = 1e-8) -> Optimizer:
    """The optimizer called ``name``, attached to the flat ``params``/``grads``."""
    return optimizer_named(name, lr=lr, weight_decay=weight_decay, momentum=momentum,
                           betas=betas, eps=eps).attach(params, grads)
