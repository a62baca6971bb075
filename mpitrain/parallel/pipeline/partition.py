"""Cutting a model's layers into pipeline stages: contiguous, balanced, pure arithmetic.

The unit of a cut is a layer with parameters and the parameter-free layers
after it (an activation, a pooling, a dropout stay with the layer they
follow).  Stages are balanced by estimated compute: each layer's ``flops``
for its input shape, which the shapes of the data give (a convolution on a
large image outweighs a wide Linear layer with more parameters)::

    >>> from mpitrain.model.layers import mlp
    >>> stage_ranges(mlp(784, [256, 256], 10), 2, shape=(784,))
    [(0, 2), (2, 5)]
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np

from ...model.layers import Layer
from ...runtime import ConfigError

__all__ = ["units", "shapes_along", "partition", "stage_ranges", "bubble"]

Shape = Tuple[int, ...]


def units(layers: Sequence[Layer]) -> List[Tuple[int, int]]:
    """The layers grouped as [start, end): each layer with parameters and the layers
    without after it (those before the first join the first)."""
    starts = [i for i, layer in enumerate(layers) if layer.shapes()]
    if not starts:
        raise ValueError("a pipelined model needs layers with parameters")
    starts[0] = 0
    return list(zip(starts, starts[1:] + [len(layers)]))


def shapes_along(layers: Sequence[Layer], shape: Sequence[int]) -> List[Shape]:
    """A sample's shape before each layer, then after the last (len(layers) + 1 shapes)."""
    out = [tuple(shape)]
    for layer in layers:
        out.append(tuple(layer.out_shape(out[-1])))
    return out


def partition(weights: Sequence[float], stages: int) -> List[int]:
    """How many consecutive items each of ``stages`` parts takes, each at least one,
    minimising the heaviest part's total weight (ties: earlier parts lighter)."""
    n = len(weights)
    if not 1 <= stages <= n:
        raise ValueError(f"cannot cut {n} layers into {stages} stages")
    prefix = np.concatenate([[0], np.cumsum(weights)])
    # best[s][i]: the lightest heaviest part for the first i items in s parts.
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0
    for s in range(1, stages + 1):
        for i in range(s, n + 1):
            for j in range(s - 1, i):
                cost = max(best[s - 1][j], prefix[i] - prefix[j])
                if cost < best[s][i]:
                    best[s][i], cut[s][i] = cost, j
    counts, i = [], n
    for s in range(stages, 0, -1):
        counts.append(i - cut[s][i])
        i = cut[s][i]
    return counts[::-1]


def stage_ranges(layers: Sequence[Layer], stages: int, counts: Optional[Sequence[int]] = None,
                 *, shape: Sequence[int]) -> List[Tuple[int, int]]:
    """The [start, end) layer range of each stage, for samples of ``shape``: balanced by
    estimated compute unless ``counts`` (layers with parameters per stage,
    ``stage_layers``) is given."""
    groups = units(layers)
    if stages > len(groups):
        raise ConfigError(f"{{pp}} {stages}: more pipeline stages than the model's "
                          f"{len(groups)} layers with parameters", ["pp"], everywhere=True)
    if counts is None:
        along = shapes_along(layers, shape)
        weights = [sum(layers[i].flops(along[i]) for i in range(a, b)) for a, b in groups]
        counts = partition(weights, stages)
    elif len(counts) != stages or sum(counts) != len(groups) or min(counts) < 1:
        raise ConfigError(f"{{stage_layers}} {','.join(map(str, counts))}: expected {stages} "
                          f"counts >= 1 adding up to the model's {len(groups)} layers with "
                          "parameters", ["stage_layers"], everywhere=True)
    ranges, k = [], 0
    for count in counts:
        ranges.append((groups[k][0], groups[k + count - 1][1]))
        k += count
    return ranges


def bubble(stages: int, microbatches: int) -> float:
    """The idle share of a GPipe/1F1B step in theory: (p - 1) / (m + p - 1)."""
    return (stages - 1) / (microbatches + stages - 1)
