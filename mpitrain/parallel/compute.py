"""A rank's part of a step: forward and backward in micro-batches, and the speed
measurements that balance the batch."""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

import numpy as np

from ..balance import rank_slice
from ..model.layers import Context, saved_bytes
from ..model.sequential import Sequential
from ..timeline import span

__all__ = ["Computing"]


class Computing:
    """What a trainer computes on its rank; ``TrainerBase`` holds it (see there for the
    attributes: ``model``, ``loss``, ``task``, ``accumulate``, ``seed``, ``balancer``,
    ``on_event``)."""

    def _compute(self, step: int, ids: np.ndarray, x: np.ndarray, y: np.ndarray, batch: int,
                 metrics: np.ndarray, final: Optional[Callable[[int], None]],
                 pieces: Optional[int] = None, add: bool = False,
                 model: Optional[Sequential] = None) -> None:
        """Forward and backward of this rank's part of a batch of ``batch`` samples (global
        ``ids``, rows ``x``, targets ``y``) into the model's gradients, adding the loss
        sum to ``metrics[0]`` and the task's sums to ``metrics[2:]`` (zeroed first).

        In ``accumulate`` micro-batches, one after the other: the first writes the
        gradients, the others add to them, and only the last reports to ``final``
        what backward has made final.  ``pieces``: micro-batches instead of
        ``accumulate``; ``add``: the first adds to the gradients too; ``model``: a copy
        of the model that computes instead (``parallel.reproducible``'s threads).
        """
        model = self.model if model is None else model
        metrics[:] = 0
        count = max(1, min(self.accumulate if pieces is None else pieces, len(ids)))
        parts = [rank_slice(len(ids), k, count) for k in range(count)]
        with np.errstate(over="ignore", invalid="ignore"):  # a diverged loss is caught later
            for k, (lo, hi) in enumerate(parts):
                ctx = Context(training=True, step=step, ids=ids[lo:hi], seed=self.seed)
                with span("forward", "compute", samples=hi - lo):
                    out, saved = model.forward(x[lo:hi], ctx)  # (b / K, outputs)
                self.peak_activation_bytes = max(self.peak_activation_bytes,
                                                 saved_bytes(saved))
                dout = self._loss_grad(out, y[lo:hi], batch, metrics)
                last = k == len(parts) - 1
                with span("backward", "compute", samples=hi - lo):
                    model.backward(dout, saved, accumulate=k > 0 or add,
                                   final_from=final if last else None)

    def _loss_grad(self, out: np.ndarray, y: np.ndarray, batch: int,
                   into: np.ndarray) -> np.ndarray:
        """dL/d(out) of rows ``out`` (targets ``y``) of a batch of ``batch`` samples, adding
        their loss sum to ``into[0]`` and the task's sums to ``into[2:]`` — one way for
        every trainer, so a row's loss has the same bits in any layout."""
        loss_sum, dout = self.loss(out, self.task.targets(y, out.dtype), 1.0 / batch)
        into[0] += loss_sum
        into[2:] += self.task.sums(out, y)
        return dout

    def _observe(self, step: int, seconds: float, samples: int) -> None:
        """With speed-balanced batches: record this rank's compute time of ``step`` and
        agree on a new split every so often (collective)."""
        if self.balancer is None:
            return
        new = self.balancer.observe(seconds, samples)
        if new is not None:
            self.on_event(f"step {step + 1}: each global batch is now split {new} among the "
                          "ranks, in proportion to their measured speed (--balance speed)",
                          {"event": "balance", "step": step + 1, "shares": new})
            self._restart_prefetch(step + 1)

    def _restart_prefetch(self, start: int) -> None:
        """Read ahead again from ``start`` (the split changed), if this trainer reads ahead."""

    def shares(self) -> Optional[List[int]]:
        """The ranks' parts of a full batch when they are uneven (speed), else None."""
        return None if self.balancer is None else self.balancer.shares

    def extras(self, steps: int) -> Dict[str, Any]:
        """What this strategy adds to the run's summary, over ``steps`` steps
        (collective)."""
        return {}

