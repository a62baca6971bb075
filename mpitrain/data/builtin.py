"""The built-in synthetic dataset ``train`` uses when no data directory is given."""
from __future__ import annotations

import os

from ..runtime import MpitrainError, on_root

__all__ = ["BUILTIN", "cache_dir", "builtin_dataset"]

# What the built-in set is: 20,000 samples of 784 features in 10 classes.
BUILTIN = dict(samples=20000, features=784, classes=10, seed=0, shards=4, val_fraction=0.1)


def cache_dir() -> str:
    """$MPITRAIN_CACHE, else $XDG_CACHE_HOME/mpitrain, else ~/.cache/mpitrain."""
    if os.environ.get("MPITRAIN_CACHE"):
        return os.environ["MPITRAIN_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "mpitrain")


def builtin_dataset(comm) -> str:
    """Path of the built-in synthetic set, written by rank 0 if missing (collective)."""
    from .prepare import synthetic

    b = BUILTIN
    path = os.path.join(cache_dir(), f"synthetic-v1-n{b['samples']}-f{b['features']}-"
                                     f"c{b['classes']}-s{b['seed']}")
    manifest = os.path.join(path, "manifest.json")

    def make() -> None:
        if os.path.exists(manifest):
            return
        try:
            synthetic(path, b["samples"], b["features"], b["classes"], b["seed"],
                      b["shards"], b["val_fraction"])
        except MpitrainError:
            if not os.path.exists(manifest):  # else another job wrote it meanwhile: fine
                raise
        except OSError as exc:
            raise MpitrainError(f"{path}: cannot write the built-in dataset: {exc} "
                                "(set MPITRAIN_CACHE)") from None

    on_root(comm, make)
    return path
