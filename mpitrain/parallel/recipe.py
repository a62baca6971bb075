"""What every trainer takes besides its strategy's own options, and the checks they share.

Every trainer is made the same way::

    Trainer(model, loss, optimizer, data, comm, **options)

``model`` a ``Sequential`` (a pipeline also takes a list of layers), ``loss``
a loss object, a loss name (``"ce"``) or None (the task's own), ``optimizer``
an optimizer object (``mpitrain.Adam(lr=1e-3)``: the trainer binds it to the
parameters it updates), ``data`` a dataset (``ArrayDataset``, a dataset
directory, ...), ``comm`` a communicator (or a ``Grid``).  ``options`` are
the strategy's own (``allreduce=``, ``servers=``, ``microbatches=``...) and
the ``Recipe``'s, which every trainer takes, each a ``Config`` key of the
same name with the same rules.

Before anything runs, the model is walked with the data's sample shape:
a layer that cannot take what reaches it, or a last layer that does not give
the task's width, is refused naming the layer, on every rank alike.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..data.checks import MODES as CHECKS
from ..data.datasets import Data, as_dataset
from ..data.sampler import Sampler
from ..model.losses import LOSSES, make_loss
from ..model.tasks import Task, make_task
from ..runtime import ConfigError, MpitrainError, agreed, literal
from .speed import BALANCE

__all__ = ["Recipe", "RECIPE_BOUNDS", "SHUFFLES", "CHECKS", "BALANCE", "split_options",
           "connect", "walk_shapes", "loss_for", "sampler_for", "check_batch"]

SHUFFLES = ("auto", "global", "chunks")  # the sample orders (data.sampler)
# name -> (comparison, bound): what config.rules checks for the same keys.
RECIPE_BOUNDS = {"batch_size": (">", 0), "seed": (">=", 0), "accumulate": (">=", 1),
                 "clip_grad_norm": (">", 0), "shuffle_window": (">=", 1),
                 "cache_mb": (">=", 0), "balance_every": (">=", 1)}


@dataclass(frozen=True)
class Recipe:
    """The options every trainer takes (each as ``Config`` has it).

    ``batch_size``: the global batch, split among the replicas; ``seed``: the
    sample order's and dropout's; ``accumulate``: micro-batches per step;
    ``clip_grad_norm``: the summed gradient's largest L2 norm (None: no
    clipping); ``drop_last``: skip each epoch's short last batch; ``shuffle``,
    ``shuffle_window``: global or chunk-aware order (``data.sampler``);
    ``cache_mb``: decoded chunks kept per rank and split; ``check_data``:
    ``full`` scans every value before step 1, ``meta`` only the structure;
    ``balance``, ``balance_every``: split batches by the ranks' speed.
    """

    batch_size: int = 128
    seed: int = 0
    accumulate: int = 1
    clip_grad_norm: Optional[float] = None
    drop_last: bool = False
    shuffle: str = "auto"
    shuffle_window: int = 32
    cache_mb: float = 1024.0
    check_data: str = "full"
    balance: str = "none"
    balance_every: int = 20

    def __post_init__(self) -> None:
        for name, (op, bound) in RECIPE_BOUNDS.items():
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    value > bound if op == ">" else value >= bound):
                raise ConfigError(f"{{{name}}}: expected a value {op} {bound}, got "
                                  f"{literal(repr(value))}", [name])
        for name, choices in (("shuffle", SHUFFLES), ("check_data", CHECKS),
                              ("balance", BALANCE)):
            if getattr(self, name) not in choices:
                raise ConfigError(f"{{{name}}}: expected one of {', '.join(choices)}, got "
                                  f"{literal(repr(getattr(self, name)))}", [name])


RECIPE_KEYS = tuple(f.name for f in dataclasses.fields(Recipe))


def split_options(who: str, options: Dict[str, Any]) -> Recipe:
    """The ``Recipe`` of a trainer's remaining keyword ``options``; an unknown one is a
    ConfigError naming it."""
    unknown = sorted(set(options) - set(RECIPE_KEYS))
    if unknown:
        raise ConfigError(f"{who}: unknown option {{{unknown[0]}}} (the options every "
                          f"trainer takes: {', '.join(RECIPE_KEYS)})", [unknown[0]])
    return Recipe(**options)


def connect(data: Any, comm, recipe: Recipe, dtype) -> Data:
    """``data`` connected on ``comm`` (collective), unless it already is."""
    if isinstance(data, Data):
        return data
    return as_dataset(data).connect(comm, dtype=dtype, cache_mb=recipe.cache_mb,
                                    check=recipe.check_data)


def walk_shapes(layers: Sequence[Any], shape: Tuple[int, ...], outputs: int,
                index: Optional[Sequence[int]] = None) -> List[Tuple[int, ...]]:
    """A sample's shape before each layer and after the last, checked: a layer that
    cannot take its input, or a model that does not end in ``(outputs,)``, is an
    MpitrainError naming the layer and both shapes."""
    shapes = [tuple(shape)]
    index = list(range(len(layers))) if index is None else list(index)
    for i, layer in zip(index, layers):
        try:
            shapes.append(tuple(layer.out_shape(shapes[-1])))
        except ValueError as exc:
            raise MpitrainError(f"model: layer {i} {layer!r} {exc}") from None
    if shapes[-1] != (outputs,):
        raise MpitrainError(f"model: it ends in samples of shape {shapes[-1]}, and the task "
                            f"needs ({outputs},)")
    return shapes


def loss_for(loss: Any, task: Task):
    """The loss object: ``loss`` itself, the loss of that name, or the task's own (None or
    'auto'); a named loss must fit the task."""
    if loss is None or loss == "auto":
        return make_loss(task.losses[0])
    if isinstance(loss, str):
        if loss not in LOSSES:
            raise ConfigError(f"{{loss}}: expected auto or one of {', '.join(LOSSES)}, got "
                              f"{literal(repr(loss))}", ["loss"])
        if loss not in task.losses:
            raise ConfigError(f"{{loss}} {loss} does not fit the data's task, {task.name} (it "
                              f"takes {', '.join(task.losses)})", ["loss"])
        return make_loss(loss)
    if not callable(loss):
        raise ConfigError(f"{{loss}}: expected a loss (a name, or a callable (outputs, "
                          f"targets, scale) -> (loss sum, gradient)), got "
                          f"{literal(type(loss).__name__)}", ["loss"])
    return loss


def task_of(data: Data) -> Task:
    """The data's task, as an object."""
    return make_task(data.task)


def sampler_for(data: Data, recipe: Recipe) -> Sampler:
    """The sample order of the training split, as the recipe asks (chunk-aware for
    chunked data with ``shuffle`` auto)."""
    train = data.train
    chunks = recipe.shuffle == "chunks" or (recipe.shuffle == "auto" and train.chunked())
    if chunks:
        window = train.chunk_bytes() * recipe.shuffle_window
        if window > recipe.cache_mb * 2 ** 20:
            raise ConfigError(f"{{shuffle_window}} {recipe.shuffle_window} chunks of "
                              f"{train.chunk_bytes() / 2 ** 20:.1f} MiB need "
                              f"{window / 2 ** 20:.0f} MiB of decoded chunks at once, more "
                              f"than {{cache_mb}} {recipe.cache_mb:g}: every chunk would be "
                              "decompressed again and again; give a larger cache or a "
                              "smaller window", ["shuffle_window", "cache_mb"],
                              everywhere=True)
    return Sampler(len(train), recipe.batch_size, recipe.seed, recipe.drop_last,
                   blocks=train.blocks() if chunks else None, window=recipe.shuffle_window)


def check_batch(comm, recipe: Recipe, data: Data, replicas: int, who: str) -> None:
    """Every replica gets a sample of every batch and micro-batch (collective)."""

    def check() -> None:
        n = len(data.train)
        if n < replicas:
            raise MpitrainError(f"{data.name}: {n} training samples for {replicas} {who}; "
                                "need at least one each")
        if recipe.batch_size < replicas:
            raise ConfigError(f"{{batch_size}} {recipe.batch_size} is smaller than the "
                              f"{replicas} {who}; each needs at least one sample",
                              ["batch_size"])
        if recipe.batch_size > n:
            raise ConfigError(f"{{batch_size}} {recipe.batch_size} is larger than the {n} "
                              f"training samples of {literal(data.name)}", ["batch_size"])

    agreed(comm, check)
