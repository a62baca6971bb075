"""The communicator grid: pipeline stages x data-parallel replicas.

One pure function does the rank arithmetic; ``make_grid`` builds the
communicators once, and the resulting ``Grid`` is passed explicitly to
whatever needs it (library code never reaches for ``COMM_WORLD``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

from mpi4py import MPI

from ..runtime import ConfigError

__all__ = ["Grid", "grid_coords", "grid_rank", "make_grid"]


def grid_coords(rank: int, pp: int, dp: int) -> Tuple[int, int]:
    """World ``rank`` -> (pp_rank, dp_rank) in a grid of ``pp`` stages x ``dp`` replicas.

    The rank equation (as Megatron-LM orders it, pipeline outermost)::

        rank = pp_rank * dp + dp_rank

    so the ranks of one stage are consecutive, and the data-parallel
    all-reduce of a stage's gradients (the heaviest traffic) stays among
    neighbouring ranks, usually on one node.  Worked example, 8 ranks,
    pp = 4 stages x dp = 2 replicas::

        rank       0  1  2  3  4  5  6  7
        pp_rank    0  0  1  1  2  2  3  3
        dp_rank    0  1  0  1  0  1  0  1

        pipelines (pp_comm, one per dp_rank):   0 -> 2 -> 4 -> 6    1 -> 3 -> 5 -> 7
        data-parallel groups (dp_comm):         {0,1} {2,3} {4,5} {6,7}
    """
    if pp < 1 or dp < 1 or not 0 <= rank < pp * dp:
        raise ValueError(f"rank {rank} is not in a grid of {pp} x {dp}")
    return divmod(rank, dp)


def grid_rank(pp_rank: int, dp_rank: int, pp: int, dp: int) -> int:
    """(pp_rank, dp_rank) -> world rank; the inverse of ``grid_coords``."""
    if not (0 <= pp_rank < pp and 0 <= dp_rank < dp):
        raise ValueError(f"({pp_rank}, {dp_rank}) is not in a grid of {pp} x {dp}")
    return pp_rank * dp + dp_rank


@dataclass(frozen=True)
class Grid:
    """This rank's place in the grid, and the communicators of its row and column.

    ``pp_comm`` joins the stages of this rank's pipeline (rank in it =
    ``pp_rank``); ``dp_comm`` joins the replicas of this rank's stage (rank
    in it = ``dp_rank``).  ``next_rank``/``prev_rank`` are ranks in
    ``pp_comm``, None at the ends.
    """

    world: MPI.Comm
    pp: int
    dp: int
    pp_rank: int
    dp_rank: int
    pp_comm: MPI.Comm
    dp_comm: MPI.Comm
    owned: bool = True  # the communicators were made here (free() frees them)

    @property
    def rank(self) -> int:
        return self.world.Get_rank()

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def next_rank(self) -> Optional[int]:
        return None if self.is_last_stage else self.pp_rank + 1

    @property
    def prev_rank(self) -> Optional[int]:
        return None if self.is_first_stage else self.pp_rank - 1

    def world_rank(self, pp_rank: int, dp_rank: int) -> int:
        """The world rank at (pp_rank, dp_rank)."""
        return grid_rank(pp_rank, dp_rank, self.pp, self.dp)

    def free(self) -> None:
        """Free the two communicators if they were made for this grid (collective)."""
        if self.owned:
            self.pp_comm.Free()
            self.dp_comm.Free()


def make_grid(comm: MPI.Comm, pp: int) -> Grid:
    """Split ``comm`` into ``pp`` stages x ``size / pp`` replicas (collective)."""
    size = comm.Get_size()
    if pp < 1 or size % pp:
        raise ConfigError(f"{{pp}} {pp}: the {size} ranks do not split into {pp} pipeline "
                          f"stages of equal size ({size} % {pp} = {size % pp if pp else '-'})",
                          ["pp"], everywhere=True)
    dp = size // pp
    pp_rank, dp_rank = grid_coords(comm.Get_rank(), pp, dp)
    if pp == 1:  # data parallelism only: no pipeline, the replicas are ``comm`` itself
        return Grid(comm, 1, dp, 0, dp_rank, MPI.COMM_SELF, comm, owned=False)
    pp_comm = comm.Split(color=dp_rank, key=pp_rank)
    dp_comm = comm.Split(color=pp_rank, key=dp_rank)
    return Grid(comm, pp, dp, pp_rank, dp_rank, pp_comm, dp_comm)
