"""A model written as text, built against the data's sample shape, every shape checked.

Grammar: layers separated by commas; a layer is a name, optionally with
arguments in parentheses (numbers, or ``key=number``); ``residual(...)``
takes layers::

    conv2d(16,3,padding=1),relu,maxpool2d(2),flatten,linear(64),relu,dropout(0.1),linear(10)
    flatten,linear(128),residual(layernorm,linear(128),gelu,dropout(0.1),linear(128)),linear(1)

| layer | arguments |
|---|---|
| ``linear(out)`` | output features |
| ``conv2d(out_channels, kernel, stride=1, padding=0)`` | |
| ``maxpool2d(kernel, stride=kernel)``, ``avgpool2d(...)`` | |
| ``flatten``, ``layernorm``, ``dropout(p)`` | |
| ``relu``, ``tanh``, ``sigmoid``, ``gelu``, ``silu`` | |
| ``residual(layer, ...)`` | a block whose output has its input's shape |
| a registered name | the class's own constructor arguments (``model.registry``) |

Arguments are numbers, quoted strings, ``true``, ``false`` and ``none``.
``build`` walks the layers with the sample's shape, so each layer learns its
input size and a mismatch is refused before step 1, naming the layer and
both shapes; the last layer must give the task's output width.
"""
from __future__ import annotations

import re
from typing import List, Optional, Sequence, Tuple

from .blocks import Dropout, LayerNorm, Residual
from .conv import AvgPool2d, Conv2d, MaxPool2d
from .layers import ACTIVATIONS, Flatten, Layer, Linear
from .registry import BUILTIN, format_call, registered

__all__ = ["parse", "build", "canonical", "mlp_spec", "SpecError", "LAYERS", "names_in"]

Node = Tuple[str, list, dict]  # (name, positional arguments, keyword arguments or children)

LAYERS = BUILTIN
assert set(LAYERS) == {"linear", "conv2d", "maxpool2d", "avgpool2d", "flatten", "layernorm",
                       "dropout", "residual", *ACTIVATIONS}
TOKEN = re.compile(r"\s*(?:([A-Za-z_][A-Za-z0-9_]*)|([-+]?(?:\d+\.?\d*|\.\d+)"
                   r"(?:[eE][-+]?\d+)?)|'([^'\n]*)'|\"([^\"\n]*)\"|(.))")
WORDS = {"true": True, "false": False, "none": None}  # bare words that are values


class SpecError(ValueError):
    """A model text that does not parse, or whose shapes do not fit."""


def _tokens(text: str):
    out = []
    for m in TOKEN.finditer(text):
        name, number, single, double, other = m.groups()
        if name:
            out.append(("name", name))
        elif number:
            out.append(("number", float(number) if any(c in number for c in ".eE")
                        else int(number)))
        elif single is not None or double is not None:
            out.append(("string", single if single is not None else double))
        elif other and not other.isspace():
            out.append(("punct", other))
    return out


def parse(text: str, known: bool = True) -> List[Node]:
    """The layers of a model text, as (name, args, kwargs) nodes (residual: its children
    in args); ``known``: refuse a name that is neither built in nor registered."""
    toks = _tokens(text)
    pos = 0

    def peek():
        return toks[pos] if pos < len(toks) else ("end", None)

    def take(kind, value=None):
        nonlocal pos
        tok = peek()
        if tok[0] != kind or (value is not None and tok[1] != value):
            where = "the end" if tok[0] == "end" else repr(tok[1])
            raise SpecError(f"expected {value or kind} at {where}")
        pos += 1
        return tok[1]

    def value():
        kind, v = peek()
        if kind in ("number", "string"):
            return take(kind)
        if kind == "name" and v.lower() in WORDS:
            take("name")
            return WORDS[v.lower()]
        where = "the end" if kind == "end" else repr(v)
        raise SpecError(f"expected a number, a quoted string, true, false or none at {where}")

    def layer() -> Node:
        name = take("name").lower()
        if known and name not in LAYERS and registered(name) is None:
            raise SpecError(f"unknown layer {name!r} (known: {', '.join(LAYERS)}; a layer "
                            "of one's own is known once registered with "
                            "mpitrain.register_layer)")
        args, kwargs = [], {}
        if peek() == ("punct", "("):
            take("punct", "(")
            if name == "residual":
                args = layers(")")
            elif peek() != ("punct", ")"):
                while True:
                    nxt = toks[pos + 1] if pos + 1 < len(toks) else ("end", None)
                    if peek()[0] == "name" and nxt == ("punct", "="):
                        key = take("name")
                        take("punct", "=")
                        kwargs[key] = value()
                    else:
                        args.append(value())
                    if peek() != ("punct", ","):
                        break
                    take("punct", ",")
            take("punct", ")")
        return name, args, kwargs

    def layers(end) -> List[Node]:
        out = [layer()]
        while peek() == ("punct", ","):
            take("punct", ",")
            out.append(layer())
        if end and peek() != ("punct", end):
            raise SpecError(f"expected {end!r} or ',' after {out[-1][0]}")
        return out

    if not toks:
        raise SpecError("an empty model")
    result = layers(None)
    if pos != len(toks):
        raise SpecError(f"unexpected {toks[pos][1]!r} after {result[-1][0]}")
    return result


SIGNATURES = {"linear": "linear(out_features)",
              "conv2d": "conv2d(out_channels, kernel, stride=1, padding=0)",
              "maxpool2d": "maxpool2d(kernel, stride=kernel)",
              "avgpool2d": "avgpool2d(kernel, stride=kernel)"}


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _make(node: Node, shape: Tuple[int, ...]) -> Layer:
    """The layer ``node`` describes, for inputs of ``shape``."""
    name, args, kwargs = node

    def ints(count):
        usage = SIGNATURES.get(name, name)
        if kwargs:
            raise SpecError(f"takes no {', '.join(sorted(kwargs))}: write {usage}")
        if len(args) != count or not all(_whole(a) and a > 0 for a in args):
            got = ",".join(map(str, args)) or "nothing"
            raise SpecError(f"expected {usage} (positive whole numbers), got {got}")
        return list(args)

    kwargs = dict(kwargs)

    def keyword(key, default, lowest):
        value = kwargs.pop(key, default)
        if not _whole(value) or value < lowest:
            raise SpecError(f"{key} must be a whole number >= {lowest}, got {value}")
        return value

    if name == "linear":
        (out,) = ints(1)
        if len(shape) != 1:
            raise SpecError(f"takes (features,) samples, got shape {shape}: add flatten "
                            "before it")
        return Linear(shape[0], out)
    if name == "conv2d":
        stride, padding = keyword("stride", 1, 1), keyword("padding", 0, 0)
        out, kernel = ints(2)
        if len(shape) != 3:
            raise SpecError(f"takes (channels, height, width) samples, got shape {shape}")
        return Conv2d(shape[0], out, kernel, stride, padding)
    if name in ("maxpool2d", "avgpool2d"):
        stride = keyword("stride", 0, 1) if "stride" in kwargs else 0  # 0: the kernel
        (kernel,) = ints(1)
        return (MaxPool2d if name == "maxpool2d" else AvgPool2d)(kernel, stride)
    if name == "dropout":
        if len(args) != 1 or kwargs or not _number(args[0]):
            raise SpecError(f"takes one probability, got {_arguments(args, kwargs)}")
        if not 0 <= args[0] < 1:
            raise SpecError(f"takes a probability in [0, 1), got {args[0]}")
        return Dropout(float(args[0]))
    if name == "layernorm":
        eps = kwargs.pop("eps", 1e-5)
        ints(0)
        if not _number(eps) or not eps > 0:
            raise SpecError(f"eps must be a number > 0, got {eps}")
        return LayerNorm(shape, eps=float(eps))
    if name == "residual":
        inner, s = [], shape
        for k, child in enumerate(args):
            layer = _make(child, s)
            try:
                s = layer.out_shape(s)
            except ValueError as exc:
                raise SpecError(f"residual's layer {k} ({_text(child)}) {exc}") from None
            inner.append(layer)
        return Residual(inner)
    cls = registered(name)
    if cls is not None:
        try:
            return cls(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - the user's constructor may raise anything
            raise SpecError(f"{cls.__module__}.{cls.__qualname__}{_arguments(args, kwargs)}: "
                            f"{type(exc).__name__}: {exc}") from None
    ints(0)
    return Flatten() if name == "flatten" else ACTIVATIONS[name]()


def _arguments(args, kwargs) -> str:
    return "(" + ", ".join([repr(a) for a in args] + [f"{k}={v!r}" for k, v in
                                                        kwargs.items()]) + ")"


def _text(node: Node) -> str:
    name, args, kwargs = node
    if name == "residual":
        return f"residual({','.join(_text(c) for c in args)})"
    return format_call(name, args, kwargs)


def names_in(text: str) -> List[str]:
    """Every layer name model ``text`` uses, in order of first use (residual's too)."""
    seen: List[str] = []

    def walk(nodes: List[Node]) -> None:
        for name, args, _ in nodes:
            if name not in seen:
                seen.append(name)
            if name == "residual":
                walk(args)

    walk(parse(text, known=False))
    return seen


def build(text: str, shape: Sequence[int], outputs: Optional[int] = None) -> List[Layer]:
    """The layers of model ``text`` for samples of ``shape``, ending in ``outputs``
    values per sample (if given); SpecError naming the layer and both shapes where they
    do not fit."""
    shape = tuple(int(s) for s in shape)
    layers: List[Layer] = []
    for i, node in enumerate(parse(text)):
        try:
            layer = _make(node, shape)
            new = layer.out_shape(shape)
        except (SpecError, ValueError) as exc:
            raise SpecError(f"layer {i} {_text(node)}: {exc}") from None
        layers.append(layer)
        shape = new
    if outputs is not None and shape != (outputs,):
        raise SpecError(f"the model ends in samples of shape {shape}, the task needs "
                        f"({outputs},): end with linear({outputs})")
    return layers


def canonical(text: str) -> str:
    """``text`` written the one way ``build`` reads it: lower case, no spaces."""
    return ",".join(_text(node) for node in parse(text))


def mlp_spec(hidden: Sequence[int], outputs: int, activation: str = "relu",
             flatten: bool = False, dropout: float = 0.0) -> str:
    """The model text of the ``hidden`` shorthand (flattened first for multi-dimensional
    samples; ``dropout`` after each hidden activation)."""
    parts = ["flatten"] if flatten else []
    for h in hidden:
        parts += [f"linear({h})", activation] + ([f"dropout({dropout:g})"] if dropout else [])
    return ",".join(parts + [f"linear({outputs})"])
