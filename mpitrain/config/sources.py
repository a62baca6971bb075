"""The options from the command line and a TOML file: one flag per option, ``--config``.

Values come from the defaults, then the TOML file, then the flags given;
each later source overrides the earlier.  Unknown keys are errors, and every
error names where the bad value came from: the flag (``--lr``), or the file
and key (``run.toml: key 'lr'``).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from typing import Any, Callable, Dict, List, Tuple

from ..paths import input_file, kind_of, reason
from ..runtime import ConfigError, MpitrainError
from .options import CHOICES, Config
from .rules import OK, refuse_what_does_not_apply, types

__all__ = ["flag", "add_arguments", "from_sources"]

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.9/3.10
    import tomli as tomllib

def flag(name: str) -> str:
    """'batch_size' -> '--batch-size'."""
    return "--" + name.replace("_", "-")


def _parse_list(text: str) -> List[int]:
    items = str(text).split(",")
    if any(not v.strip() for v in items) and str(text).strip():
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r} "
                                         "(an empty item)")
    try:
        return [int(v) for v in items if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per Config field (default None: 'not given') and ``--config``."""
    parser.add_argument("--config", metavar="FILE.toml",
                        help="read these keys from a TOML file; flags override it")
    for f in fields(Config):
        kw: Dict[str, Any] = {"default": None, "dest": f.name}
        help = f.metadata["help"]
        if f.name in CHOICES:
            kw["choices"] = CHOICES[f.name]
        if f.type in ("bool", "Optional[bool]"):
            kw["action"] = argparse.BooleanOptionalAction
        elif "List[int]" in f.type:
            kw["type"], kw["metavar"] = _parse_list, "N,N"
        elif "int" in f.type:
            kw["type"], kw["metavar"] = int, "N"
        elif "float" in f.type:
            kw["type"], kw["metavar"] = float, "X"
        default = f.default
        if isinstance(default, tuple):
            default = ",".join(map(str, default))
        if default is not None and f.type != "bool":
            help += f" (default: {default})"
        parser.add_argument(flag(f.name), help=help, **kw)


def from_sources(args: argparse.Namespace) -> Tuple[Config, Callable[[str], str]]:
    """Defaults, then ``args.config`` (TOML), then flags given: the validated Config and
    ``name_of(parameter)``, which says where a parameter's value came from (errors name
    it so: ``--lr``, or ``run.toml: key 'lr'``)."""
    values: Dict[str, Any] = {}
    where: Dict[str, str] = {}
    path = getattr(args, "config", None)
    known = types()
    if path:
        if kind_of(path) is None:
            raise MpitrainError(f"{path}: no such config file")
        input_file(path, "config file")
        try:
            with open(path, "rb") as fh:
                table = tomllib.load(fh)
        except UnicodeDecodeError as exc:
            raise MpitrainError(f"{path}: not a TOML file: byte {exc.start} is not UTF-8 "
                                "text") from None
        except OSError as exc:
            raise MpitrainError(f"{path}: cannot read the config file: {reason(exc)}") from None
        except tomllib.TOMLDecodeError as exc:
            raise MpitrainError(f"{path}: not valid TOML: {exc}") from None
        for key, value in table.items():
            name = key.replace("-", "_")
            if name not in known:
                raise MpitrainError(f"{path}: unknown key {key!r} (known: "
                                    f"{', '.join(sorted(known))})")
            if not OK[known[name]](value):
                raise MpitrainError(f"{path}: key {key!r} should be {known[name]}, got {value!r}")
            values[name] = float(value) if known[name] == "float" else value
            where[name] = f"{path}: key {key!r}"
    for name in known:
        value = getattr(args, name, None)
        if value is not None:
            values[name] = value
            where.pop(name, None)

    def name_of(param: str) -> str:
        return where.get(param, flag(param))

    try:
        cfg = Config(**values)
        refuse_what_does_not_apply(cfg, given=set(values))  # given, even as the default
        return cfg, name_of
    except ConfigError as exc:
        raise MpitrainError(exc.render(name_of)) from None
