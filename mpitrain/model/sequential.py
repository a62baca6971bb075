"""A model: layers applied in order, their parameters and gradients in two flat buffers.

Every parameter of a :class:`Sequential` is a view into one contiguous array
``model.params`` and every gradient a view into ``model.grads``, so the
gradient exchange and the optimizer each touch one buffer, with no copies.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .blocks import Residual
from .layers import EVAL, Context, Layer, Linear
from ..timeline import span

__all__ = ["Sequential", "DTYPES", "layers_text"]

DTYPES = ("float32", "float64")  # parameter and compute precision


def layers_text(layers: Sequence[Layer]) -> Optional[str]:
    """The model text of ``layers`` in order, or None if one of them has none."""
    parts = [layer.text() for layer in layers]
    return None if None in parts else ",".join(parts)


class Sequential:
    """Layers applied in order, their parameters and gradients in two flat buffers.

    ``index`` names the layers: parameter ``weight`` of layer ``i`` is called
    ``f"{index[i]}.weight"``.  A pipeline stage holding layers 4..7 of a model
    passes their global indices, so names and initial values are the same as
    in the whole model: each layer is initialised from its own generator,
    keyed by (seed, global layer index).
    """

    def __init__(self, layers: Sequence[Layer], *, dtype="float32", seed: int = 0,
                 index: Optional[Sequence[int]] = None):
        self.layers = list(layers)
        self.index = list(range(len(self.layers))) if index is None else list(index)
        if len(self.index) != len(self.layers):
            raise ValueError(f"expected {len(self.layers)} layer indices, got {len(self.index)}")
        self.seed = seed  # each layer's initial values come from (seed, its index)
        self.dtype = np.dtype(dtype)
        if self.dtype.name not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype}")
        self.slices: Dict[str, slice] = {}  # name -> where it lives in the buffers
        self.shapes: Dict[str, Tuple[int, ...]] = {}
        offset = 0
        for i, layer in zip(self.index, self.layers):
            for key, shape in layer.shapes().items():
                size = math.prod(shape)
                self.slices[f"{i}.{key}"] = slice(offset, offset + size)
                self.shapes[f"{i}.{key}"] = tuple(shape)
                offset += size
        self.size = offset
        self.params = np.zeros(self.size, self.dtype)
        self.grads = np.zeros(self.size, self.dtype)
        for i, layer in zip(self.index, self.layers):  # dropout keys its draws to it
            if isinstance(layer, Residual):
                layer.set_index(i)
            else:
                layer.index = i
        self._bind()
        for i, layer in zip(self.index, self.layers):
            rng = np.random.default_rng([seed, i])
            layer.init(self._views(self.params, i, layer), rng)

    def _views(self, flat: np.ndarray, i: int, layer: Layer) -> Dict[str, np.ndarray]:
        return {key: flat[self.slices[f"{i}.{key}"]].reshape(shape)
                for key, shape in layer.shapes().items()}

    def _bind(self) -> None:
        for i, layer in zip(self.index, self.layers):
            layer.bind(self._views(self.params, i, layer), self._views(self.grads, i, layer))

    def _check_buffer(self, buffer: np.ndarray) -> None:
        if buffer.shape != (self.size,) or buffer.dtype != self.dtype:
            raise ValueError(f"expected a {self.dtype} buffer of {self.size} elements, "
                             f"got {buffer.dtype} {buffer.shape}")

    def bind_params(self, buffer: np.ndarray) -> None:
        """Make the parameters views of ``buffer`` (``size`` items, e.g. memory the ranks
        of a node share), as it holds them: copy the current values in first to keep them."""
        self._check_buffer(buffer)
        self.params = buffer
        self._bind()

    def bind_grads(self, buffer: np.ndarray) -> None:
        """Make the gradients views of ``buffer`` (``size`` items, e.g. the exchange's)."""
        self._check_buffer(buffer)
        self.grads = buffer
        self._bind()

    def bind_layer_grads(self, k: int, buffer: np.ndarray) -> None:
        """Make layer ``k``'s gradients views of ``buffer`` alone (``size`` items, where the
        whole model's would lie); the other layers keep theirs, and ``grads`` stays."""
        self._check_buffer(buffer)
        layer, i = self.layers[k], self.index[k]
        layer.bind(self._views(self.params, i, layer), self._views(buffer, i, layer))

    def named_params(self) -> Dict[str, np.ndarray]:
        """Parameter name -> view into ``params``, in buffer order."""
        return {n: self.params[s].reshape(self.shapes[n]) for n, s in self.slices.items()}

    def named_grads(self) -> Dict[str, np.ndarray]:
        """Parameter name -> view into ``grads``, in buffer order."""
        return {n: self.grads[s].reshape(self.shapes[n]) for n, s in self.slices.items()}

    def forward(self, x: np.ndarray, ctx: Context = EVAL) -> Tuple[np.ndarray, List[Any]]:
        """Apply the layers to ``x`` (n, *shape): (output (n, out), what backward needs);
        ``ctx`` says whether it trains (dropout) and which samples these are."""
        saved = []
        for i, layer in zip(self.index, self.layers):
            with span(f"forward {i}: {type(layer).__name__}", "layer"):
                x, keep = layer.forward(x, ctx)
            saved.append(keep)
        return x, saved

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """The output alone (inference: no dropout)."""
        return self.forward(x)[0]

    def backward(self, dy: np.ndarray, saved: List[Any], need_dx: bool = False,
                 accumulate: bool = False,
                 final_from: Optional[Callable[[int], None]] = None) -> Optional[np.ndarray]:
        """Write (or add) ``grads`` from dL/dy (n, out); return dL/dx if ``need_dx``.

        ``final_from(offset)`` is called whenever ``grads[offset:]`` has become
        final, so its exchange can start while backward goes on.
        """
        for k in range(len(self.layers) - 1, -1, -1):
            layer = self.layers[k]
            kw = {}
            if final_from is not None and isinstance(layer, Linear):
                start = self.slices[f"{self.index[k]}.weight"].start
                kw["rows_done"] = lambda r, start=start, width=layer.in_features: final_from(
                    start + r * width)
            with span(f"backward {self.index[k]}: {type(layer).__name__}", "layer"):
                dy = layer.backward(dy, saved[k], need_dx=need_dx or k > 0,
                                    accumulate=accumulate, **kw)
            names = [f"{self.index[k]}.{key}" for key in layer.shapes()]
            if final_from is not None and names and not isinstance(layer, Linear):
                final_from(self.slices[names[0]].start)  # the whole layer is final
        return dy

    def text(self) -> Optional[str]:
        """The model as text (``model.spec``: ``"linear(64),relu,linear(10)"``), which
        rebuilds it for samples of its input shape; None if a layer cannot be written
        (``unwritable`` says which and why)."""
        return layers_text(self.layers)

    def unwritable(self) -> Optional[str]:
        """Why the model has no text (its first layer that has none), or None."""
        from .registry import text_of

        for i, layer in zip(self.index, self.layers):
            if layer.text() is None:
                while isinstance(layer, Residual):  # the block's own layer that has none
                    layer = next(inner for inner in layer.layers if inner.text() is None)
                why = text_of(layer)[1] or "it has no text"
                return f"layer {i} ({type(layer).__name__}): {why}"
        return None

    def __repr__(self) -> str:
        inner = ", ".join(f"{i}: {layer!r}" for i, layer in zip(self.index, self.layers))
        return f"Sequential({inner}; {self.size} parameters, {self.dtype})"
