"""Layers with explicit forward and backward, losses, and flat parameter buffers.

Every parameter of a :class:`Sequential` is a view into one contiguous array
``model.params`` and every gradient a view into ``model.grads``, so the
gradient exchange and the optimizer each touch one buffer, with no copies.

Shapes: a batch is ``(n, features)``; ``Linear.weight`` is ``(out, in)`` as
in PyTorch, so ``y = x @ weight.T + bias``.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["Layer", "Linear", "ReLU", "Tanh", "Sequential", "mlp", "saved_bytes",
           "SoftmaxCrossEntropy", "MSELoss", "make_loss"]


def saved_bytes(saved: Any) -> int:
    """Bytes of the arrays a forward pass keeps for its backward pass, each counted once
    (tanh's output is also the next Linear's input)."""
    arrays: Dict[int, np.ndarray] = {}
    todo = [saved]
    while todo:
        item = todo.pop()
        if isinstance(item, np.ndarray):
            arrays[id(item)] = item
        elif isinstance(item, (list, tuple)):
            todo.extend(item)
    return sum(a.nbytes for a in arrays.values())


class Layer:
    """A layer: ``forward`` returns its output and what ``backward`` will need.

    Nothing of a batch is kept in the layer itself, so several micro-batches
    can be in flight at once (a pipeline stage holds one ``saved`` per
    micro-batch until its backward pass).
    """

    def shapes(self) -> Dict[str, Tuple[int, ...]]:
        """Parameter name -> shape, in buffer order."""
        return {}

    def bind(self, params: Dict[str, np.ndarray], grads: Dict[str, np.ndarray]) -> None:
        """Receive the views of the flat buffers this layer owns."""

    def init(self, params: Dict[str, np.ndarray], rng: np.random.Generator) -> None:
        """Fill this layer's parameters in place from ``rng``."""

    def forward(self, x: np.ndarray) -> Tuple[np.ndarray, Any]:
        """(output, saved): ``saved`` is what ``backward`` needs of this batch."""
        raise NotImplementedError

    def backward(self, dy: np.ndarray, saved: Any, need_dx: bool = True,
                 accumulate: bool = False) -> Optional[np.ndarray]:
        """Write (or with ``accumulate`` add) parameter gradients; return dL/dx if asked."""
        raise NotImplementedError


class Linear(Layer):
    """Affine map ``y = x @ weight.T + bias``; He-uniform weights, zero bias."""

    def __init__(self, in_features: int, out_features: int):
        self.in_features, self.out_features = in_features, out_features

    def __repr__(self) -> str:
        return f"Linear({self.in_features}, {self.out_features})"

    def shapes(self):
        return {"weight": (self.out_features, self.in_features),
                "bias": (self.out_features,)}

    def bind(self, params, grads):
        self.weight, self.bias = params["weight"], params["bias"]
        self.gweight, self.gbias = grads["weight"], grads["bias"]

    def init(self, params, rng):
        bound = math.sqrt(6.0 / self.in_features)  # He/Kaiming uniform, for ReLU
        # Drawn in float64 and rounded, so float32 and float64 models start alike.
        params["weight"][...] = rng.uniform(-bound, bound, params["weight"].shape)
        params["bias"][...] = 0.0

    def forward(self, x):
        y = x @ self.weight.T  # (n, in) @ (in, out)
        y += self.bias
        return y, x

    # With ``rows_done``, the weight gradient is computed in blocks of about this
    # many bytes, last rows first, reporting each, so its exchange can start early.
    BLOCK_BYTES = 1 << 20

    def backward(self, dy, saved, need_dx=True, accumulate=False, rows_done=None):
        x = saved
        if accumulate:
            self.gweight += dy.T @ x
            self.gbias += dy.sum(axis=0)
        elif rows_done is None:
            np.matmul(dy.T, x, out=self.gweight)  # (out, n) @ (n, in)
            np.sum(dy, axis=0, out=self.gbias)
        else:
            np.sum(dy, axis=0, out=self.gbias)  # the bias lies after the weight
            rows_done(self.out_features)
            block = max(1, self.BLOCK_BYTES // (self.in_features * self.gweight.itemsize))
            for hi in range(self.out_features, 0, -block):
                lo = max(0, hi - block)
                np.matmul(dy[:, lo:hi].T, x, out=self.gweight[lo:hi])
                rows_done(lo)  # rows lo.. of the weight are final, never written again
        return dy @ self.weight if need_dx else None  # (n, in)


class ReLU(Layer):
    """max(x, 0)."""

    def __repr__(self) -> str:
        return "ReLU()"

    def forward(self, x):
        # np.maximum and a multiply by the mask: ~15x faster here than np.where.
        y = np.maximum(x, x.dtype.type(0))
        return y, y

    def backward(self, dy, saved, need_dx=True, accumulate=False):
        return dy * (saved > 0) if need_dx else None


class Tanh(Layer):
    """tanh(x)."""

    def __repr__(self) -> str:
        return "Tanh()"

    def forward(self, x):
        y = np.tanh(x)
        return y, y

    def backward(self, dy, saved, need_dx=True, accumulate=False):
        return dy * (1 - saved * saved) if need_dx else None


ACTIVATIONS = {"relu": ReLU, "tanh": Tanh}


def mlp(in_features: int, hidden: Sequence[int], out_features: int,
        activation: str = "relu") -> List[Layer]:
    """The layers of a multilayer perceptron: Linear, activation, ..., Linear."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    sizes = [in_features, *hidden, out_features]
    layers: List[Layer] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(ACTIVATIONS[activation]())
    return layers


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
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise ValueError(f"dtype must be float32 or float64, got {self.dtype}")
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

    def bind_params(self, buffer: np.ndarray, copy: bool = True) -> None:
        """Make the parameters views of ``buffer`` (length ``size``), e.g. memory shared
        by the ranks of a node; ``copy=False`` leaves the copying to another rank."""
        self._check_buffer(buffer)
        if copy:
            buffer[...] = self.params
        self.params = buffer
        self._bind()

    def bind_grads(self, buffer: np.ndarray) -> None:
        """Make the gradients views of ``buffer`` (length ``size``), e.g. part of an exchange buffer."""
        self._check_buffer(buffer)
        buffer[...] = self.grads
        self.grads = buffer
        self._bind()

    def named_params(self) -> Dict[str, np.ndarray]:
        """Parameter name -> view into ``params``, in buffer order."""
        return {n: self.params[s].reshape(self.shapes[n]) for n, s in self.slices.items()}

    def named_grads(self) -> Dict[str, np.ndarray]:
        """Parameter name -> view into ``grads``, in buffer order."""
        return {n: self.grads[s].reshape(self.shapes[n]) for n, s in self.slices.items()}

    def forward(self, x: np.ndarray) -> Tuple[np.ndarray, List[Any]]:
        """Apply the layers to ``x`` (n, in): (output (n, out), what backward needs)."""
        saved = []
        for layer in self.layers:
            x, keep = layer.forward(x)
            saved.append(keep)
        return x, saved

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """The output alone (inference)."""
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
            if final_from is not None and isinstance(layer, Linear) and not accumulate:
                start = self.slices[f"{self.index[k]}.weight"].start
                kw["rows_done"] = lambda r, start=start, width=layer.in_features: final_from(
                    start + r * width)
            dy = layer.backward(dy, saved[k], need_dx=need_dx or k > 0,
                                accumulate=accumulate, **kw)
        return dy

    def __repr__(self) -> str:
        inner = ", ".join(f"{i}: {layer!r}" for i, layer in zip(self.index, self.layers))
        return f"Sequential({inner}; {self.size} parameters, {self.dtype})"


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
