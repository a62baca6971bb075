"""Layers by name: the model text's vocabulary, built in and registered by users.

A model is written as text (``model.spec``) so that a checkpoint can say what it
holds and a loading process can rebuild it.  The built-in layers know their
own text; a user's ``Layer`` subclass joins the vocabulary by registering under
a name, and its constructor arguments become the text's arguments::

    @mpitrain.register_layer("scale")
    class Scale(mpitrain.Layer):
        def __init__(self, features: int, init: float = 1.0): ...

    Sequential([Linear(8, 8), Scale(8, init=0.5)]).text()   # 'linear(8),scale(8,init=0.5)'

Arguments are written as numbers, quoted strings, ``true``, ``false`` and
``none``: a registered layer takes those, nothing else.  A class keeps the
name it was registered under, and a checkpoint records the class's module, so
a process that lacks the registration is told which module to import.
"""
from __future__ import annotations

import functools
import math
import re
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

__all__ = ["register_layer", "registered", "registered_name", "format_call", "BUILTIN",
           "NAME"]

# The names the model text itself knows (model.spec builds them from a sample's shape).
BUILTIN = ("linear", "conv2d", "maxpool2d", "avgpool2d", "flatten", "layernorm", "dropout",
           "residual", "relu", "tanh", "sigmoid", "gelu", "silu")
NAME = re.compile(r"^[a-z_][a-z0-9_]*$")

_REGISTRY: Dict[str, type] = {}


def registered(name: str) -> Optional[type]:
    """The class registered as ``name``, or None."""
    return _REGISTRY.get(name)


def registered_name(cls: type) -> Optional[str]:
    """The name ``cls`` itself was registered under (not a base class's), or None."""
    return cls.__dict__.get("_registered_as")


def register_layer(name: str) -> Callable[[type], type]:
    """Class decorator: put a ``Layer`` subclass into the model text as ``name``.

    Its instances then write themselves as ``name(args)``, from the arguments
    their constructor was called with, so a model holding them can be
    checkpointed and rebuilt by ``load_model``, ``predict``, ``evaluate`` and a
    resume, in any process that imported the module defining the class.
    ``name``: lower-case letters, digits and ``_``, not a built-in layer's name.
    Registering the same class again under its name is allowed (a module
    imported twice); another class under a taken name is refused.
    """
    if not isinstance(name, str) or not NAME.match(name):
        raise ValueError(f"register_layer: a layer's name is lower-case letters, digits and "
                         f"'_', starting with a letter, got {name!r}")
    if name in BUILTIN:
        raise ValueError(f"register_layer: {name!r} is a built-in layer's name")

    def decorate(cls: type) -> type:
        if not isinstance(cls, type):
            raise TypeError(f"register_layer({name!r}) decorates a class, got {cls!r}")
        taken = _REGISTRY.get(name)
        if taken is not None and _qualname(taken) != _qualname(cls):
            raise ValueError(f"register_layer: {name!r} is taken by {_qualname(taken)}")
        init = cls.__dict__.get("__init__")
        if init is not None and not getattr(init, "_records_arguments", False):
            cls.__init__ = _recording(cls, init)
        cls._registered_as = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def _recording(cls: type, init: Callable) -> Callable:
    """``init`` that also records its arguments on an instance of ``cls`` itself (a
    registered subclass records its own, not its base's)."""

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        if type(self) is cls:
            self._text_arguments = (tuple(args), dict(kwargs))
        init(self, *args, **kwargs)

    __init__._records_arguments = True
    return __init__


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def format_value(value: Any) -> str:
    """One argument as the model text writes it; ValueError for what it cannot hold."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"the model text holds finite numbers, got {value}")
        return repr(value)
    if isinstance(value, str):
        if "'" in value or "\n" in value:
            raise ValueError(f"the model text holds strings without ' or newlines, got "
                             f"{value!r}")
        return f"'{value}'"
    try:  # numpy scalars
        import numpy as np

        if isinstance(value, np.generic):
            return format_value(value.item())
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
    raise ValueError(f"the model text holds numbers, strings, true, false and none; got "
                     f"{type(value).__name__} {value!r}")


def format_call(name: str, args: Sequence[Any] = (), kwargs: Optional[Dict[str, Any]] = None
                ) -> str:
    """``name(a,b,key=c)``, or ``name`` alone without arguments."""
    parts = [format_value(a) for a in args]
    parts += [f"{k}={format_value(v)}" for k, v in (kwargs or {}).items()]
    return name + (f"({','.join(parts)})" if parts else "")


def text_of(layer: Any) -> Tuple[Optional[str], Optional[str]]:
    """(text, None) of a registered layer's instance, or (None, why it has none)."""
    cls = type(layer)
    name = registered_name(cls)
    if name is None:
        return None, (f"{_qualname(cls)} is not registered (decorate it with "
                      "@mpitrain.register_layer(NAME))")
    if not hasattr(layer, "_text_arguments"):
        return None, f"{_qualname(cls)} was made without its constructor"
    args, kwargs = layer._text_arguments
    try:
        return format_call(name, args, kwargs), None
    except ValueError as exc:
        return None, f"{name}: {exc}"


def modules_of(names: Sequence[str]) -> Dict[str, str]:
    """{name: 'module.Class'} of the registered names among ``names`` (a checkpoint keeps
    them, so a process that lacks one can be told what to import)."""
    return {n: _qualname(_REGISTRY[n]) for n in names if n in _REGISTRY}
