"""Grid arithmetic and stage partitioning (serial)."""
import pytest
from mpi4py import MPI

from mpitrain.model.layers import mlp
from mpitrain.parallel.pipeline.partition import bubble, partition, stage_ranges, units
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
    # Parameters: 200,960 / 65,792 / 2,570: the first Linear alone outweighs the rest.
    assert stage_ranges(layers, 2) == [(0, 2), (2, 5)]
    assert stage_ranges(layers, 3) == [(0, 2), (2, 4), (4, 5)]
    assert stage_ranges(layers, 2, [2, 1]) == [(0, 4), (4, 5)]
    with pytest.raises(MpitrainError, match="more pipeline stages than the model's 3 Linear"):
        stage_ranges(layers, 4)
    with pytest.raises(MpitrainError, match=r"^stage_layers 2,2: expected 2 counts >= 1 "
                                            r"adding up to the model's 3 Linear layers"):
        stage_ranges(layers, 2, [2, 2])


def test_theoretical_bubble():
    assert bubble(1, 8) == 0
    assert bubble(4, 1) == pytest.approx(3 / 4)
    assert bubble(4, 8) == pytest.approx(3 / 11)
