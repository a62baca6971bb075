"""A server's arithmetic, without MPI: the pushes of each clock summed in worker order,
one optimizer step on the server's slice; and the Python API's ``ParameterServer``."""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ...model.optim import Optimizer, make_optimizer

__all__ = ["ServerShard", "ParameterServer"]


class ServerShard:
    """The parameters ``params`` (a server's slice, updated in place) and their optimizer.

    Each worker's push of clock ``c`` lands in its own slot (``slot``), so however
    the pushes arrive, ``reduce`` adds them in worker order: the same bits every
    run.  ``depth`` clocks may be pending at once (the staleness bound + 1): slot
    ``c % depth`` is reused once clock ``c - depth`` is reduced.  ``width``: the
    metric slots (float64) that ride with each push.
    """

    def __init__(self, params: np.ndarray, optimizer: Union[str, Optimizer] = "sgd", *,
                 width: int = 0, depth: int = 1, **hyper):
        self.params = params
        self.grads = np.zeros_like(params)  # (slice,): the clock's summed gradient
        if isinstance(optimizer, Optimizer):  # attached to this slice
            self.optimizer: Optimizer = optimizer.attach(params, self.grads)
        else:
            self.optimizer = make_optimizer(optimizer, params, self.grads, **hyper)
        self.width, self.depth = width, depth
        self.version = 0  # updates applied
        self._slots: Dict[Tuple[int, int], Tuple[np.ndarray, np.ndarray]] = {}

    def slot(self, worker: int, clock: int) -> Tuple[np.ndarray, np.ndarray]:
        """(gradient, metrics) buffers where ``worker``'s push of ``clock`` goes."""
        key = (worker, clock % self.depth)
        if key not in self._slots:
            self._slots[key] = (np.zeros_like(self.params), np.zeros(self.width))
        return self._slots[key]

    def reduce(self, clock: int, workers: Sequence[int]) -> np.ndarray:
        """Sum the pushes of ``clock`` by ``workers``, in that order, into ``grads``;
        return the summed metrics (float64)."""
        sums = np.zeros(self.width)
        for k, w in enumerate(workers):
            grad, metrics = self.slot(w, clock)
            if k == 0:
                self.grads[...] = grad
            else:
                self.grads += grad
            sums += metrics
        if not workers:
            self.grads[...] = 0
        return sums

    def norm_sq(self) -> float:
        """The squared L2 norm of the summed gradient, added in float64 in a fixed order."""
        total, block = 0.0, 1 << 16
        for lo in range(0, self.grads.size, block):
            v = self.grads[lo:lo + block].astype(np.float64)
            total += float(v @ v)
        return total

    def scale(self, factor: float) -> None:
        """Multiply the summed gradient by ``factor`` (clipping)."""
        self.grads *= self.grads.dtype.type(factor)

    def step(self, lr: Optional[float] = None) -> None:
        """One optimizer step on the slice from the summed gradient (at ``lr`` if given)."""
        if lr is not None:
            self.optimizer.lr = lr
        self.optimizer.step()
        self.version += 1


Params = Union[np.ndarray, Sequence[np.ndarray], Dict[str, np.ndarray]]


class ParameterServer:
    """The parameter server of the original design, in one process: workers push
    gradients, the server sums each round's pushes in worker order and applies plain
    SGD, workers pull the parameters.

    A thin layer over the strategy's own server arithmetic (``ServerShard``), which
    ``--strategy ps`` runs on each server rank::

        ps = ParameterServer({"w": np.zeros((3, 2)), "b": np.zeros(3)})
        ps.push_gradients(0, {"w": gw0, "b": gb0})   # each worker's gradient
        ps.push_gradients(1, {"w": gw1, "b": gb1})
        ps.update_parameters(0.1)                     # params -= 0.1 * (g0 + g1)
        params = ps.pull_parameters()                 # copies, shaped as given

    ``initial_params``: one array, a list of arrays or a dict of named arrays; the
    pushes and pulls take the same shape.  ``average=True`` applies the mean of a
    round's pushes instead of their sum (workers that push their own mean gradient;
    mpitrain's workers divide by the global batch, so their pushes add up).
    """

    def __init__(self, initial_params: Params, *, average: bool = False):
        if isinstance(initial_params, dict):
            self._names: Optional[List[str]] = list(initial_params)
            arrays = [np.asarray(initial_params[k]) for k in self._names]
        elif isinstance(initial_params, np.ndarray):
            self._names, arrays = None, [initial_params]
        else:
            self._names, arrays = None, [np.asarray(a) for a in initial_params]
        self._single = isinstance(initial_params, np.ndarray)
        self._shapes = [a.shape for a in arrays]
        dtype = np.result_type(*arrays) if arrays else np.float32
        if not np.issubdtype(dtype, np.floating):
            dtype = np.float64
        flat = np.concatenate([a.astype(dtype).ravel() for a in arrays]) if arrays else \
            np.zeros(0, dtype)
        self.average = average
        self._shard = ServerShard(flat, "sgd", lr=1.0)
        self._pushed: List[int] = []

    @property
    def version(self) -> int:
        """Updates applied so far."""
        return self._shard.version

    def _flat(self, params: Params) -> np.ndarray:
        arrays = ([params[k] for k in self._names] if self._names is not None
                  else [params] if self._single else list(params))
        if len(arrays) != len(self._shapes):
            raise ValueError(f"expected {len(self._shapes)} gradient arrays, got {len(arrays)}")
        for k, (a, shape) in enumerate(zip(arrays, self._shapes)):
            if np.shape(a) != shape:
                name = self._names[k] if self._names is not None else f"array {k}"
                raise ValueError(f"{name}: expected shape {shape}, got {np.shape(a)}")
        return np.concatenate([np.asarray(a, self._shard.params.dtype).ravel() for a in arrays]) \
            if arrays else np.zeros(0, self._shard.params.dtype)

    def push_gradients(self, worker_id: int, gradients: Params) -> None:
        """Add ``worker_id``'s gradient to this round (once per worker and round)."""
        if worker_id in self._pushed:
            raise ValueError(f"worker {worker_id} pushed twice before update_parameters")
        grad, _ = self._shard.slot(len(self._pushed), 0)
        grad[...] = self._flat(gradients)
        self._pushed.append(worker_id)

    def update_parameters(self, learning_rate: float) -> None:
        """Apply one SGD step with this round's pushes, summed in worker-id order (their
        mean with ``average``), and start the next round."""
        order = sorted(range(len(self._pushed)), key=lambda k: self._pushed[k])
        self._shard.reduce(0, order)
        if self.average and self._pushed:
            self._shard.scale(1.0 / len(self._pushed))
        self._shard.step(learning_rate)
        self._pushed = []
        self._shard._slots.clear()

    def pull_parameters(self) -> Params:
        """The current parameters (copies), shaped as ``initial_params``."""
        out, offset = [], 0
        for shape in self._shapes:
            size = math.prod(shape)
            out.append(self._shard.params[offset:offset + size].reshape(shape).copy())
            offset += size
        if self._names is not None:
            return dict(zip(self._names, out))
        return out[0] if self._single else out
