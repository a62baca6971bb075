"""Grid arithmetic and stage partitioning (serial)."""
import numpy as np
import pytest
from mpi4py import MPI

from mpitrain.model.layers import mlp
from mpitrain.parallel.pipeline.partition import (bubble, partition, shapes_along,
                                                  stage_ranges, units)
from mpitrain.runtime import MpitrainError
from mpitrain.comm.topology import grid_coords, grid_rank, make_grid


def test_rank_equation_and_the_docstring_example():
    assert [grid_coords(r, 4, 2) for r in range(8)] == [
        (0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1), (3, 0), (3, 1)]
    pipelines = [[grid_rank(p, d, 4, 2) for p in range(4)] for d in range(2)]
    assert pipelines == [[0, 2, 4, 6], [1, 3, 5, 7]]
    for pp, dp in [(1, 5), (5, 1), (2, 3), (3, 4)]:
        for rank in range(pp * dp):
            assert grid_rank(*grid_coords(rank, pp, dp), pp, dp) == rank
    with pytest.raises(ValueError, match="rank 8 is not in a grid of 4 x 2"):
        grid_coords(8, 4, 2)


def test_single_rank_grid():
    g = make_grid(MPI.COMM_SELF, 1)
    assert (g.pp, g.dp, g.pp_rank, g.dp_rank) == (1, 1, 0, 0)
    assert g.is_first_stage and g.is_last_stage and g.next_rank is None and g.prev_rank is None
    with pytest.raises(MpitrainError, match=r"^pp 2: the 1 ranks do not split into 2"):
        make_grid(MPI.COMM_SELF, 2)


def test_partition_is_contiguous_and_minimises_the_heaviest_stage():
    assert partition([5, 5, 5, 5], 2) == [2, 2]
    assert partition([100, 1, 1, 1], 2) == [1, 3]
    assert partition([1, 1, 1, 100], 2) == [3, 1]
    assert partition([3, 3, 3], 3) == [1, 1, 1]
    assert partition([7], 1) == [1]
    counts = partition([4, 9, 2, 6, 6, 1, 8], 3)
    assert sum(counts) == 7 and min(counts) >= 1
    with pytest.raises(ValueError):
        partition([1, 2], 3)


def test_stage_ranges_keep_activations_with_their_linear():
    layers = mlp(784, [256, 256], 10)  # Linear ReLU Linear ReLU Linear
    assert units(layers) == [(0, 2), (2, 4), (4, 5)]
    # Compute follows the weights here: 200,704 / 65,536 / 2,560 multiply-adds per sample
    # (and the activations'): the first Linear alone outweighs the rest.
    assert stage_ranges(layers, 2, shape=(784,)) == [(0, 2), (2, 5)]
    assert stage_ranges(layers, 3, shape=(784,)) == [(0, 2), (2, 4), (4, 5)]
    assert stage_ranges(layers, 2, [2, 1], shape=(784,)) == [(0, 4), (4, 5)]
    with pytest.raises(MpitrainError, match="more pipeline stages than the model's 3 layers "
                                            "with parameters"):
        stage_ranges(layers, 4, shape=(784,))
    with pytest.raises(MpitrainError, match=r"^stage_layers 2,2: expected 2 counts >= 1 "
                                            r"adding up to the model's 3 layers with param"):
        stage_ranges(layers, 2, [2, 2], shape=(784,))


def test_stages_are_balanced_by_compute_not_parameters():
    from mpitrain.model.spec import build

    # A 3x3 convolution of 16 to 32 channels on 32x32 images: 4,640 parameters, 28M
    # flops per sample.  The Linear after it: 8.4M parameters, 50M flops.  By parameters
    # the convolution would join that Linear's stage (4,640 is nothing beside 8.4M);
    # by compute it makes a stage of its own.
    layers = build("conv2d(32,3,padding=1),relu,flatten,linear(256),relu,linear(256),relu,"
                   "linear(10)", (16, 32, 32), 10)
    assert units(layers) == [(0, 3), (3, 5), (5, 7), (7, 8)]
    params = [sum(np.prod(s) for i in range(a, b) for s in layers[i].shapes().values())
              for a, b in units(layers)]
    assert partition(params, 2) == [2, 2]
    assert stage_ranges(layers, 2, shape=(16, 32, 32)) == [(0, 3), (3, 8)]
    assert shapes_along(layers, (16, 32, 32))[3] == (32 * 32 * 32,)


def test_theoretical_bubble():
    assert bubble(1, 8) == 0
    assert bubble(4, 1) == pytest.approx(3 / 4)
    assert bubble(4, 8) == pytest.approx(3 / 11)


def test_a_stage_refuses_shm_for_the_fixed_order_sum():
    """Built directly, as the configuration refuses it: the groups' sum runs on MPI."""
    from mpitrain.data.arrays import ArrayDataset
    from mpitrain.model.optim import SGD
    from mpitrain.parallel.pipeline.stage import PipelineTrainer
    from mpitrain.runtime import ConfigError
    rng = np.random.default_rng(0)
    data = ArrayDataset(rng.standard_normal((32, 4)).astype(np.float32),
                        rng.integers(0, 2, 32), classes=2)
    with pytest.raises(ConfigError, match=r"^allreduce shm with groups: a stage's fixed-order"):
        PipelineTrainer(mlp(4, [8], 2), "ce", SGD(lr=0.1), data, MPI.COMM_SELF, pp=1,
                        allreduce="shm", groups=4)
