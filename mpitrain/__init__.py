"""mpitrain: data-parallel and pipeline training of numpy models over MPI.

Importing mpitrain limits BLAS/OpenMP threads to the cores available per
rank (unless the user set them), so it should come before numpy.
"""
from .runtime import limit_threads

limit_threads()

__version__ = "0.1.0"

from .runtime import MpitrainError  # noqa: E402

__all__ = ["__version__", "MpitrainError", "limit_threads"]
