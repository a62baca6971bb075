"""A model's gradients as views of one flat buffer, which backward reports as it fills.

The exchange (``comm.exchange``) sums one flat numpy buffer in place.  Each
trainable parameter's ``.grad`` is made a view of its slice of that buffer
(``torch.from_numpy``: no copy), so the gradients lie where the exchange sums
them: a step's first backward pass makes its own tensor, copied in once
(below), and later passes add into the view in place.  A
``register_post_accumulate_grad_hook`` on each parameter tells when its
gradient is final; whenever every parameter from some offset to the end of the
buffer is final, ``on_final(offset)`` starts the buckets that lie there, while
backward goes on with the layers before::

    params   p0      p1        p2     p3          (model.parameters() order)
    buffer   [....][........][....][......]       backward fills p3, p2, ... first

A parameter whose ``.grad`` is None (``zero`` sets them so: one pass, where
adding into a zeroed buffer would be two and a half) gets a new tensor from
autograd: the hook copies it into its slice and puts the view back; later
passes of an accumulation add into the view.  A parameter that got no
gradient in a step (an unused branch) keeps zeros, so every rank sums the same
buffer and applies the same update.

Staged (parameters on a GPU, with an MPI that cannot read GPU memory): the
gradients stay on the device; the hook copies each into its slice of the host
buffer, page-locked for CUDA (one copy out), and ``unstage`` copies the sums
back (one copy in).
"""
from __future__ import annotations

from typing import Callable, List, Sequence

import numpy as np
import torch

__all__ = ["FlatGrads", "trainable", "pin"]


def trainable(model: torch.nn.Module) -> List[torch.nn.Parameter]:
    """The parameters that take gradients, in ``model.parameters()`` order, each once."""
    seen, out = set(), []
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


class FlatGrads:
    """The gradients of ``params`` as views of ``buffer`` (numpy, at least as long as the
    parameters); ``on_final(offset)`` when everything from ``offset`` on is final."""

    def __init__(self, params: Sequence[torch.nn.Parameter], buffer: np.ndarray,
                 on_final: Callable[[int], None], staged: bool = False):
        self.params = list(params)
        sizes = [p.numel() for p in self.params]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int).tolist()
        self.size = self.offsets[-1]
        self.on_final, self.staged = on_final, staged
        self.reporting = True  # report what is final (off on an accumulation's early passes)
        self.bind(buffer)
        self.fired = [False] * len(self.params)  # reached by this backward pass
        self.used = [False] * len(self.params)  # reached by a pass since the last zero
        self.mark = len(self.params)  # params[mark:] are final this step
        self._hooks = [p.register_post_accumulate_grad_hook(self._hook(i))
                       for i, p in enumerate(self.params)]

    def bind(self, buffer: np.ndarray) -> None:
        """Make the gradients views of ``buffer`` (keeping what it holds)."""
        self.host = torch.from_numpy(buffer[:self.size])
        if self.staged and getattr(self, "pinned", None) is None:  # the exchange's buffer
            self.pinned = pin(self.host)
        self.views = [self.host[a:b].view_as(p) for p, a, b in
                      zip(self.params, self.offsets, self.offsets[1:])]
        if not self.staged:
            for p, view in zip(self.params, self.views):
                p.grad = view

    def _hook(self, i: int) -> Callable[[torch.Tensor], None]:
        def final(p: torch.Tensor) -> None:
            if p.grad is None:  # autograd passed no gradient (a Function returned None)
                return
            view = self.views[i]
            if self.staged:
                view.copy_(p.grad)
            elif p.grad is not view:  # set to None and made anew by autograd
                view.copy_(p.grad.to_dense() if p.grad.is_sparse else p.grad)
                p.grad = view
            self.fired[i] = self.used[i] = True
            if not self.reporting:
                return
            mark = self.mark
            while mark > 0 and self.fired[mark - 1]:
                mark -= 1
            if mark < self.mark:
                self.mark = mark
                if self.staged and p.is_cuda:
                    torch.cuda.current_stream(p.device).synchronize()
                self.on_final(self.offsets[mark])
        return final

    def begin(self, reporting: bool = True) -> None:
        """A new backward pass (``reporting``: whether it reports what is final)."""
        self.reporting = reporting
        self.fired = [False] * len(self.params)
        self.mark = len(self.params)

    def zero(self, to_none: bool = True) -> None:
        """Start a new sum of gradients.  ``to_none`` (not staged): every ``.grad`` None,
        so backward makes its own tensor and the hook copies it into its slice: one pass
        over the gradients, where zeroing the buffer and adding into it would be two and
        a half; ``settle`` zeroes what no pass reached.  Otherwise every gradient 0 (the
        views kept)."""
        self.used = [False] * len(self.params)
        if to_none and not self.staged:
            for p in self.params:
                p.grad = None
            return
        self.host.zero_()
        if self.staged:
            for p in self.params:
                if p.grad is not None:
                    p.grad.zero_()

    def settle(self) -> None:
        """Before the sum: a parameter no backward pass reached since the last ``zero``
        holds zeros, and every ``.grad`` is its view again."""
        for i, p in enumerate(self.params):
            if not self.used[i]:
                self.views[i].zero_()
            if not self.staged and p.grad is not self.views[i]:
                p.grad = self.views[i]

    def unstage(self) -> None:
        """Staged: the sums back into the device gradients (one copy each)."""
        if not self.staged:
            return
        for p, view in zip(self.params, self.views):
            if p.grad is None:
                p.grad = torch.empty_like(p)
            p.grad.copy_(view, non_blocking=True)

    def remove(self) -> None:
        """Take the hooks off the parameters (and unpin the host buffer)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if getattr(self, "pinned", None) is not None:
            torch.cuda.cudart().cudaHostUnregister(self.pinned)
            self.pinned = None


def pin(host: torch.Tensor):
    """Page-lock ``host``'s memory for CUDA's copies (its address, to unpin), or None
    without CUDA."""
    if not torch.cuda.is_available() or host.numel() == 0:
        return None
    ptr = host.data_ptr()
    torch.cuda.cudart().cudaHostRegister(ptr, host.numel() * host.element_size(), 0)
    return ptr
