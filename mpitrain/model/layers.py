"""Layers with explicit forward and backward, on views of flat parameter buffers.

Shapes: a batch is ``(n, *sample shape)``; ``Linear`` takes ``(n, features)``
and its weight is ``(out, in)`` as in PyTorch, so ``y = x @ weight.T +
bias``.  A layer keeps nothing of a batch (``forward`` returns what
``backward`` will need), so several micro-batches can be in flight at once.
Every layer says what it makes of a sample's shape (``out_shape``), so a
model's shapes are checked before anything runs, and roughly what it costs
(``flops``), so a pipeline can balance its stages.

``forward(x, ctx)`` receives a ``Context``: whether the model trains, the
step, the global ids of the batch's samples, the seed (dropout draws from
them; see ``blocks.Dropout``).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import kernels
from .gemm import add_product
from .registry import text_of

__all__ = ["Context", "Layer", "Linear", "Flatten", "ReLU", "Tanh", "Sigmoid", "GELU", "SiLU",
           "ACTIVATIONS", "mlp", "saved_bytes"]

Shape = Tuple[int, ...]


@dataclass
class Context:
    """What a forward pass may need besides its input."""

    training: bool = False
    step: int = 0
    ids: Optional[np.ndarray] = None  # (n,) global sample ids of the batch's rows
    seed: int = 0


EVAL = Context()


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

    The protocol, which a layer of one's own implements (then registers with
    ``mpitrain.register_layer`` so checkpoints can rebuild it, and checks with
    ``mpitrain.check_layer``):

    - ``shapes()``: its parameters' names and shapes (none: ``{}``);
    - ``bind(params, grads)``: receive views of the model's flat buffers, by
      name; keep them (``self.weight = params["weight"]``) and write gradients
      into ``grads`` in place;
    - ``init(params, rng)``: fill the parameters from ``rng`` (a generator keyed
      to the seed and the layer's place in the model);
    - ``out_shape(shape)``: a sample's shape after the layer (``ValueError``
      saying why if it cannot take ``shape``); ``flops(shape)``: about what it
      costs per sample (pipelines balance stages by it);
    - ``forward(x, ctx)``: ``(y, saved)``, ``x`` a batch ``(n, *shape)``; keep
      nothing of the batch in the layer, return it in ``saved``;
    - ``backward(dy, saved, need_dx, accumulate)``: write the parameters'
      gradients (or add to them with ``accumulate``) and return dL/dx if
      ``need_dx`` (else None).

    Nothing of a batch is kept in the layer itself, so several micro-batches
    can be in flight at once (a pipeline stage holds one ``saved`` per
    micro-batch until its backward pass).
    """

    index = 0  # the layer's place in its model (dropout keys its draws to it)

    def text(self) -> Optional[str]:
        """This layer as the model text writes it (``linear(64)``), or None if it
        cannot be written (a class that is not registered)."""
        return text_of(self)[0]

    def shapes(self) -> Dict[str, Shape]:
        """Parameter name -> shape, in buffer order."""
        return {}

    def bind(self, params: Dict[str, np.ndarray], grads: Dict[str, np.ndarray]) -> None:
        """Receive the views of the flat buffers this layer owns."""

    def init(self, params: Dict[str, np.ndarray], rng: np.random.Generator) -> None:
        """Fill this layer's parameters in place from ``rng``."""

    def out_shape(self, shape: Shape) -> Shape:
        """A sample's shape after this layer, given its shape before (ValueError if the
        layer cannot take it)."""
        return shape

    def flops(self, shape: Shape) -> float:
        """About how many floating-point operations forward and backward take per sample
        of ``shape`` (a pipeline balances its stages by it)."""
        return 3.0 * math.prod(shape)

    def activation_elems(self, shape: Shape) -> int:
        """About how many numbers per sample of ``shape`` its forward pass keeps for
        backward (the memory check sizes a batch's activations by it)."""
        return math.prod(self.out_shape(shape))

    def forward(self, x: np.ndarray, ctx: Context = EVAL) -> Tuple[np.ndarray, Any]:
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

    def text(self) -> str:
        return f"linear({self.out_features})"

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

    def out_shape(self, shape):
        if shape != (self.in_features,):
            raise ValueError(f"takes {self.in_features} features per sample, got shape {shape}"
                             + (" (add flatten before it)" if len(shape) > 1 else ""))
        return (self.out_features,)

    def flops(self, shape):
        return 6.0 * self.in_features * self.out_features  # forward, and two in backward

    def forward(self, x, ctx=EVAL):
        y = x @ self.weight.T  # (n, in) @ (in, out)
        y += self.bias
        return y, x

    # With ``rows_done``, the weight gradient is computed in blocks of about this
    # many bytes, last rows first, reporting each, so its exchange can start early.
    BLOCK_BYTES = 1 << 20

    def backward(self, dy, saved, need_dx=True, accumulate=False, rows_done=None):
        x = saved
        if rows_done is None:
            if accumulate:
                add_product(self.gweight, dy, x)  # += dy.T @ x, in one pass where exact
                self.gbias += dy.sum(axis=0)
            else:
                np.matmul(dy.T, x, out=self.gweight)  # (out, n) @ (n, in)
                np.sum(dy, axis=0, out=self.gbias)
        else:
            if accumulate:  # the bias lies after the weight
                self.gbias += dy.sum(axis=0)
            else:
                np.sum(dy, axis=0, out=self.gbias)
            rows_done(self.out_features)
            block = max(1, self.BLOCK_BYTES // (self.in_features * self.gweight.itemsize))
            for hi in range(self.out_features, 0, -block):
                lo = max(0, hi - block)
                if accumulate:
                    self.gweight[lo:hi] += dy[:, lo:hi].T @ x
                else:
                    np.matmul(dy[:, lo:hi].T, x, out=self.gweight[lo:hi])
                rows_done(lo)  # rows lo.. of the weight are final, never written again
        return self.input_grad(dy) if need_dx else None

    def input_grad(self, dy: np.ndarray) -> np.ndarray:
        """dL/dx (n, in) from dL/dy (n, out), without the parameters' gradients."""
        return dy @ self.weight


class Flatten(Layer):
    """(n, *shape) -> (n, prod(shape))."""

    def __repr__(self) -> str:
        return "Flatten()"

    def text(self) -> str:
        return "flatten"

    def out_shape(self, shape):
        return (math.prod(shape),)

    def flops(self, shape):
        return 0.0

    def forward(self, x, ctx=EVAL):
        return x.reshape(len(x), -1), x.shape

    def backward(self, dy, saved, need_dx=True, accumulate=False):
        return dy.reshape(saved) if need_dx else None


@functools.lru_cache(maxsize=None)
def _zeros(length: int, dtype: str) -> np.ndarray:
    """A read-only row of ``length`` zeros, shared."""
    row = np.zeros(length, dtype)
    row.flags.writeable = False
    return row


def _relu(x: np.ndarray) -> np.ndarray:
    """max(x, 0) in a new array: x viewed as (-1, length) against a row of zeros broadcast
    over its rows, not against a scalar 0, as numpy's vectorised loop takes two arrays
    (its loop for an array and a scalar is the slower one).  Same values either way."""
    length = math.gcd(x.size, 4096) if x.flags.c_contiguous else 1
    if length < 64:  # short rows: the scalar loop
        return np.maximum(x, x.dtype.type(0))
    y = np.maximum(x.reshape(-1, length), _zeros(length, x.dtype.str))
    return y.reshape(x.shape)


class ReLU(Layer):
    """max(x, 0)."""

    def __repr__(self) -> str:
        return "ReLU()"

    def text(self) -> str:
        return "relu"

    def forward(self, x, ctx=EVAL):
        y = _relu(x)
        return y, y

    def backward(self, dy, saved, need_dx=True, accumulate=False):
        # a multiply by the mask: np.where takes a much slower loop
        return dy * (saved > 0) if need_dx else None


class Tanh(Layer):
    """tanh(x)."""

    def __repr__(self) -> str:
        return "Tanh()"

    def text(self) -> str:
        return "tanh"

    def forward(self, x, ctx=EVAL):
        y = np.tanh(x)
        return y, y

    def backward(self, dy, saved, need_dx=True, accumulate=False):
        if not need_dx:
            return None
        # dy (1 - y^2) in one temporary, of the type dy * y has
        g = np.multiply(saved, saved, dtype=np.result_type(saved, dy))
        np.subtract(1, g, out=g)
        g *= dy
        return g


class Sigmoid(Layer):
    """1 / (1 + exp(-x)); in float32 one fused loop (``model.kernels``: the compiled one, or
    numpy's passes with the same bits)."""

    def __repr__(self) -> str:
        return "Sigmoid()"

    def text(self) -> str:
        return "sigmoid"

    def forward(self, x, ctx=EVAL):
        y = kernels.sigmoid(x)
        return y, y

    def backward(self, dy, saved, need_dx=True, accumulate=False):
        if not need_dx:
            return None
        return kernels.sigmoid_grad(dy, saved)


class GELU(Layer):
    """x * Phi(x), in its tanh form: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
    (PyTorch's ``gelu(approximate="tanh")``; numpy has no erf)."""

    C = math.sqrt(2 / math.pi)

    def __repr__(self) -> str:
        return "GELU()"

    def text(self) -> str:
        return "gelu"

    def forward(self, x, ctx=EVAL):
        t = np.tanh(x.dtype.type(self.C) * (x + x.dtype.type(0.044715) * x * x * x))
        return 0.5 * x * (1 + t), (x, t)

    def backward(self, dy, saved, need_dx=True, accumulate=False):
        if not need_dx:
            return None
        x, t = saved
        c = x.dtype.type(self.C)
        inner = c * (1 + x.dtype.type(3 * 0.044715) * x * x)
        return dy * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * inner)


class SiLU(Layer):
    """x * sigmoid(x)."""

    def __repr__(self) -> str:
        return "SiLU()"

    def text(self) -> str:
        return "silu"

    def forward(self, x, ctx=EVAL):
        s = kernels.sigmoid(x)
        return x * s, (x, s)

    def backward(self, dy, saved, need_dx=True, accumulate=False):
        if not need_dx:
            return None
        x, s = saved
        # dy s (1 + x (1 - s)) in one temporary, of the type dy * s has
        g = np.subtract(1, s, dtype=np.result_type(s, dy))
        g *= x
        g += 1
        g *= s
        g *= dy
        return g


ACTIVATIONS = {"relu": ReLU, "tanh": Tanh, "sigmoid": Sigmoid, "gelu": GELU, "silu": SiLU}


def mlp(in_features, hidden: Sequence[int], out_features: int,
        activation: str = "relu") -> List[Layer]:
    """The layers of a multilayer perceptron: Linear, activation, ..., Linear.
    ``in_features`` may be a sample's shape: a multi-dimensional one is flattened first."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got "
                         f"{activation!r}")
    shape = (in_features,) if isinstance(in_features, int) else tuple(in_features)
    layers: List[Layer] = [Flatten()] if len(shape) > 1 else []
    sizes = [math.prod(shape), *hidden, out_features]
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(ACTIVATIONS[activation]())
    return layers
