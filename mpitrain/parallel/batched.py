"""A rank's run of groups computed at once, where every row keeps the bits it has alone.

``--reproducible`` computes each group with the shapes it has on its own, since
a product's bits depend on them.  But a small group pays a product's fixed
cost at every layer (each weight matrix read and packed once per call): here,
4 groups of 32 rows took 1.8x the time of one batch of 128 (one thread, MLP
784-1024-1024-10).  In exact arithmetic the rows of a product do not depend
on each other, and in a BLAS whose kernel computes every row the same way
whatever rows lie beside it they keep their bits too (numpy's OpenBLAS with
its SkylakeX kernel does; with an older kernel forced, a row's bits followed
its place in the call modulo 12).  Where that holds, a run of groups goes
through forward, and through backward's input gradients, in one call per
layer; only the parameters' gradients, which add up over a group's rows,
are computed group by group, each into its group's place::

    forward     x[0:96] -> one call per layer        (the rows of 3 groups of 32)
    backward    layer k: dW_g from dy[g], x[g]       for g = 0, 1, 2, in order
                         dx = dy @ W                 one call, all 96 rows

Whether it holds is not assumed: ``rows_alike`` computes a run of random rows
both ways, layer by layer, forward and input gradient, and compares their
bits; each shape of run (its groups' sizes) is checked once.  A layer that fails takes the groups one by one (here: the last layer,
1024 -> 10, whose product takes another kernel by the number of rows); a
model with a layer with parameters that is not ``Linear`` (convolutions,
norms, residual blocks) is computed group by group.
``MPITRAIN_GROUPS_AT_ONCE=0`` turns it off.
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..model.layers import Context, Layer, Linear, saved_bytes
from ..model.sequential import Sequential
from ..timeline import span

__all__ = ["AtOnce", "eligible", "rows_alike", "compute_at_once"]

# dL/dy of a group's rows [lo, hi) of the run, given their output (the loss's gradient)
LossGrad = Callable[[int, int, np.ndarray], np.ndarray]


def eligible(model: Sequential) -> bool:
    """Whether every layer with parameters is a ``Linear`` (whose gradients this module
    computes group by group); a model with others is computed group by group."""
    return all(isinstance(layer, Linear) or not layer.shapes() for layer in model.layers)


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def _input_grad(layer: Layer, dy: np.ndarray, keep: Any) -> np.ndarray:
    if isinstance(layer, Linear):
        return layer.input_grad(dy)
    return layer.backward(dy, keep, need_dx=True)  # no parameters: writes nothing


def rows_alike(model: Sequential, x: np.ndarray, ctx: Callable[[int, int], Context],
               cuts: Sequence[int]) -> List[bool]:
    """For each layer, whether its forward and input gradient, on a run of rows shaped as
    ``x`` at once (its groups cut at ``cuts``, ``ctx(lo, hi)`` the context of rows
    lo..hi), give every row the bits it gets when its group goes alone.  Checked on
    random rows of the run's shapes, each layer on its own: the step's real rows could
    hide a difference (zeros, dead units, saturated gradients come out alike)."""
    pairs = list(zip(cuts, cuts[1:]))
    rng = np.random.default_rng([len(x), *cuts])
    shape, dtype = x.shape, x.dtype
    alike = []
    for k, layer in enumerate(model.layers):
        x = rng.standard_normal(shape).astype(dtype)
        y, keep = layer.forward(x, ctx(0, len(x)))
        own = [layer.forward(x[lo:hi], ctx(lo, hi)) for lo, hi in pairs]
        same = all(_same_bits(y[lo:hi], o[0]) for (lo, hi), o in zip(pairs, own))
        if same and k > 0:  # layer 0's input needs no gradient
            dy = rng.standard_normal(y.shape).astype(y.dtype)
            dx = _input_grad(layer, dy, keep)
            same = all(_same_bits(dx[lo:hi], _input_grad(layer, dy[lo:hi], o[1]))
                       for (lo, hi), o in zip(pairs, own))
        alike.append(same)
        shape, dtype = y.shape, y.dtype
    return alike


def compute_at_once(model: Sequential, x: np.ndarray, ctx: Callable[[int, int], Context],
                    cuts: Sequence[int], places: Sequence[Tuple[np.ndarray, bool]],
                    loss_grad: LossGrad, plan: Sequence[bool]) -> Tuple[float, float, int]:
    """Forward and backward of the run ``x`` (groups cut at ``cuts``): the layers ``plan``
    allows at once, the others group by group; each group's parameter gradients written,
    or added, into its place ``(buffer, add)`` as group by group.  Return the seconds of
    forward and backward and the bytes kept for backward."""
    pairs = list(zip(cuts, cuts[1:]))
    t0 = time.perf_counter()
    saved: List[Tuple[Any, List[Any]]] = []  # per layer: what it kept at once, or per group
    with span("forward", "compute", samples=len(x)):
        for i, layer, whole in zip(model.index, model.layers, plan):
            with span(f"forward {i}: {type(layer).__name__}", "layer"):
                if whole:
                    x, keep = layer.forward(x, ctx(0, len(x)))
                    saved.append((keep, [None] * len(pairs)))
                else:
                    own = [layer.forward(x[lo:hi], ctx(lo, hi)) for lo, hi in pairs]
                    x = np.concatenate([o[0] for o in own])
                    saved.append((None, [o[1] for o in own]))
    dy = np.concatenate([loss_grad(lo, hi, x[lo:hi]) for lo, hi in pairs])  # (n, outputs)
    t1 = time.perf_counter()
    with span("backward", "compute", samples=len(x)):
        for k in range(len(model.layers) - 1, -1, -1):
            layer, (keep, own) = model.layers[k], saved[k]
            with span(f"backward {model.index[k]}: {type(layer).__name__}", "layer"):
                if layer.shapes():  # a Linear (it kept its input): dW over a group's rows
                    for (lo, hi), o, (into, add) in zip(pairs, own, places):
                        model.bind_layer_grads(k, into)
                        layer.backward(dy[lo:hi], keep[lo:hi] if o is None else o,
                                       need_dx=False, accumulate=add)
                if k > 0 and plan[k]:
                    dy = _input_grad(layer, dy, keep)  # (n, inputs of layer k)
                elif k > 0:
                    dy = np.concatenate([_input_grad(layer, dy[lo:hi], o)
                                         for (lo, hi), o in zip(pairs, own)])
    return t1 - t0, time.perf_counter() - t1, saved_bytes(saved)


class AtOnce:
    """Which layers may take a run of groups at once, for each shape of run (its groups'
    sizes): checked once with ``rows_alike``, on random rows of that shape."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled and os.environ.get("MPITRAIN_GROUPS_AT_ONCE", "1") != "0"
        self.plans: Dict[Tuple[int, ...], List[bool]] = {}

    def plan(self, model: Sequential, x: np.ndarray, ctx: Callable[[int, int], Context],
             cuts: Sequence[int]) -> Optional[List[bool]]:
        """For each layer, whether it takes this run of groups at once (checked if its
        shape is new); None if the run goes group by group."""
        if not self.enabled or len(cuts) < 3 or not eligible(model):
            return None
        sizes = tuple(b - a for a, b in zip(cuts, cuts[1:]))
        if sizes not in self.plans:  # (threads may both check a new shape: the same answer)
            with np.errstate(over="ignore", invalid="ignore"):
                self.plans[sizes] = rows_alike(model, x, ctx, cuts)
        return self.plans[sizes] if any(self.plans[sizes]) else None
