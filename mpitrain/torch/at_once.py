"""A rank's groups of a torch model computed at once, where every row keeps its bits.

``reproducible`` computes each group with the shapes it has on its own (its
rows alone), since a product's bits depend on them; a rank holding several
groups then pays each layer's fixed cost once a group (two passes of 64 rows
where the default path makes one of 128).  As ``parallel.batched`` does for
mpitrain's layers, the run of a rank's groups goes through forward, and
through backward's input gradients, in one call per layer, where that gives
every row the bits it gets alone; only the parameters' gradients, which add
up over a group's rows, are computed group by group, each written (or added)
into the group's place of the fixed-order sum (``comm.ordered``)::

    forward     x[0:128] -> one call per Linear                (2 groups of 64)
    backward    Linear k: dW_g = dy[g]^T x[g], db_g = dy[g].sum(0)   g = 0, 1
                          dx = dy W                             one call, 128 rows

The products are torch's own, as its ``Linear`` backward makes them, so a
group's gradient has the bits it gets alone.  That is not assumed: for each
shape of run (its groups' sizes) ``AtOnce.check`` computes a run of random
rows and the step's own rows both ways (each group alone through autograd,
and at once) and compares the outputs, the losses and every group's gradients
bit for bit; a shape that differs (or raises on the way) goes group by
group.  Only a model whose trainable parameters are all the weights and
biases of ``torch.nn.Linear`` modules, without buffers, dropout modules or
hooks on them, on the CPU, is tried; a pass that draws random numbers (each
group's own draws would differ), calls a ``Linear`` twice or with an input not
2-D goes group by group.  ``MPITRAIN_GROUPS_AT_ONCE=0`` turns it off.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["AtOnce", "linear_modules"]

Place = Tuple[np.ndarray, bool]  # (buffer, add): where a group's gradient goes (numpy)


def linear_modules(model: torch.nn.Module,
                   params: Sequence[torch.nn.Parameter]) -> Optional[List[torch.nn.Linear]]:
    """The ``Linear`` modules holding every one of ``params`` (each once), or None if some
    trainable parameter is elsewhere, the model has buffers or a dropout module, or a
    hook or a forward of the user's own would see what autograd's own path gives it
    (a parameter's gradient hooks, a Linear's backward hooks or its own ``forward``)."""
    if any(b.numel() for b in model.buffers()):
        return None
    for p in params:  # (one post-accumulate hook is mpitrain's: torch.grads)
        if getattr(p, "_backward_hooks", None) or \
                len(getattr(p, "_post_accumulate_grad_hooks", None) or ()) > 1:
            return None
    linears, held = [], set()
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.p > 0:
            return None
        if type(module) is torch.nn.Linear:  # a subclass may compute otherwise
            if module._backward_hooks or module._backward_pre_hooks or \
                    "forward" in vars(module):
                return None
            own = [p for p in (module.weight, module.bias) if p is not None]
            if any(id(p) in held for p in own):
                return None  # a parameter shared by two modules
            held.update(id(p) for p in own)
            linears.append(module)
    if {id(p) for p in params} != held:
        return None
    return linears


class _Plan:
    """Where each group's parameter gradients go in this pass: ``places`` (set before
    backward) for the groups of the run cut at ``cuts`` (rows), each parameter at
    ``spans[id(p)]`` of the flat buffer."""

    def __init__(self, cuts: Sequence[int], spans: Dict[int, Tuple[int, int]]):
        self.pairs = list(zip(cuts, cuts[1:]))
        self.rows = cuts[-1]
        self.places: List[Tuple[torch.Tensor, bool]] = []
        self.spans = spans
        self.written: set = set()
        self.called: set = set()  # the Linear modules the forward pass called
        self.unfit = False  # the path does not take this pass (an input not 2-D...)

    def set_places(self, places: Sequence[Place]) -> None:
        """The groups' places ``(buffer, add)``, in group order (before backward)."""
        assert len(places) == len(self.pairs), (len(places), len(self.pairs))
        self.places = [(torch.from_numpy(into), add) for into, add in places]

    def write(self, p: torch.Tensor, grads: Callable[[int, int], torch.Tensor]) -> None:
        """Each group's gradient of ``p``, ``grads(lo, hi)``, into its place, in order."""
        assert self.places, "set_places before backward"
        a, b = self.spans[id(p)]
        for (lo, hi), (into, add) in zip(self.pairs, self.places):
            view = into[a:b].view_as(p)
            if add:
                view.add_(grads(lo, hi))
            else:
                view.copy_(grads(lo, hi))
        self.written.add(id(p))

    def zero_unreached(self, params: Sequence[torch.nn.Parameter]) -> None:
        """A parameter no pass reached: each group's gradient +0.0, as group by group."""
        for p in params:
            if id(p) not in self.written:
                a, b = self.spans[id(p)]
                for into, add in self.places:
                    if add:
                        into[a:b].add_(0.0)
                    else:
                        into[a:b].zero_()


class _Linear(torch.autograd.Function):
    """``F.linear`` whose backward writes each group's weight and bias gradients into its
    place (``_Plan``) and returns the input's gradient for all rows at once."""

    @staticmethod
    def forward(ctx, x, weight, bias, plan):
        ctx.save_for_backward(x, weight)
        ctx.plan, ctx.bias = plan, bias  # (the parameter: its place is found by it)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        plan = ctx.plan
        # as torch's addmm/mm backward makes them, on the group's rows alone
        plan.write(weight, lambda lo, hi: dy[lo:hi].t().mm(x[lo:hi]))
        if ctx.bias is not None:
            plan.write(ctx.bias, lambda lo, hi: dy[lo:hi].sum(0))
        dx = dy.mm(weight) if ctx.needs_input_grad[0] else None
        return dx, None, None, None


@contextmanager
def _patched(linears: Sequence[torch.nn.Linear], plan: _Plan) -> Iterator[None]:
    """The ``Linear`` modules' forward through ``_Linear`` for the block."""
    def forward_of(module):
        def forward(x):
            # a module called twice would have its places written twice (once, natively,
            # its two gradients are added): the run goes group by group
            if x.dim() != 2 or len(x) != plan.rows or id(module) in plan.called:
                plan.unfit = True
            plan.called.add(id(module))
            if plan.unfit:
                return F.linear(x, module.weight, module.bias)
            return _Linear.apply(x, module.weight, module.bias, plan)
        return forward

    for module in linears:
        module.forward = forward_of(module)
    try:
        yield
    finally:
        for module in linears:
            del module.forward


class AtOnce:
    """Runs of a rank's groups through a torch model at once, where ``check`` found every
    row's bits kept, for each shape of run."""

    def __init__(self, model: torch.nn.Module, params: Sequence[torch.nn.Parameter],
                 offsets: Sequence[int]):
        self.model, self.params = model, list(params)
        self.spans = {id(p): (a, b) for p, a, b in zip(self.params, offsets, offsets[1:])}
        self.size = int(offsets[-1])
        enabled = os.environ.get("MPITRAIN_GROUPS_AT_ONCE", "1") != "0" and bool(self.params)
        self.dtype = torch.empty(0, dtype=self.params[0].dtype).numpy().dtype if enabled else None
        enabled = enabled and all(p.device.type == "cpu" for p in self.params)
        self.linears = linear_modules(model, self.params) if enabled else None
        self.shapes: Dict[Tuple[int, ...], bool] = {}  # run shape -> checked alike

    def known(self, sizes: Sequence[int]) -> Optional[bool]:
        """Whether a run of groups of ``sizes`` rows goes at once (None: not checked yet)."""
        if self.linears is None or len(sizes) < 2:
            return False
        return self.shapes.get(tuple(sizes))

    def forward(self, x: torch.Tensor, cuts: Sequence[int]) -> Tuple[torch.Tensor, _Plan]:
        """The run's output (all rows, groups cut at ``cuts``), and the plan its backward
        writes by (``plan.unfit``: the model took an input the path does not, called a
        ``Linear`` twice or drew random numbers)."""
        plan = _Plan(cuts, self.spans)
        drawn = torch.random.get_rng_state()
        with _patched(self.linears, plan):
            out = self.model(x)
        if not torch.equal(drawn, torch.random.get_rng_state()):
            plan.unfit = True  # random numbers: the groups' own draws differ
        return out, plan

    def check(self, sizes: Sequence[int], inputs: Sequence[torch.Tensor],
              loss: Callable[[torch.Tensor, int, int], torch.Tensor],
              seed: Callable[[int], None]) -> bool:
        """Compute each of ``inputs`` (runs of the run's shape: random rows, the step's
        rows) group by group through autograd and at once; record and return whether
        every group's output, loss and gradients have the same bits (an error on the way:
        not).  ``loss(out, lo, hi)``: a group's loss (its weight included); ``seed(g)``:
        seed torch's generator for group g.  The parameters' ``.grad`` are left as
        they were."""
        grads = [p.grad for p in self.params]
        try:
            for p in self.params:
                p.grad = None
            same = all(self._alike(sizes, x, loss, seed) for x in inputs)
        except Exception:  # (the run goes group by group, which raises what is wrong)
            same = False
        finally:
            for p, g in zip(self.params, grads):
                p.grad = g
        self.shapes[tuple(sizes)] = same
        return same

    def _alike(self, sizes: Sequence[int], x: torch.Tensor,
               loss: Callable[[torch.Tensor, int, int], torch.Tensor],
               seed: Callable[[int], None]) -> bool:
        """One run ``x`` both ways; False also if autograd reached a parameter itself."""
        cuts = np.concatenate([[0], np.cumsum(sizes)]).astype(int).tolist()
        pairs = list(zip(cuts, cuts[1:]))
        alone = []
        for g, (lo, hi) in enumerate(pairs):
            seed(g)
            out = self.model(x[lo:hi])
            value = loss(out, lo, hi)
            got = torch.autograd.grad(value, self.params, allow_unused=True)
            alone.append((out.detach(), value.detach(), [
                torch.zeros_like(p) if d is None else d for p, d in zip(self.params, got)]))
        places = [(np.zeros(self.size, self.dtype), False) for _ in sizes]
        seed(0)
        out, plan = self.forward(x, cuts)
        if plan.unfit:
            return False
        plan.set_places(places)
        parts = out.split(list(sizes))
        values = [loss(part, lo, hi) for part, (lo, hi) in zip(parts, pairs)]
        torch.autograd.backward(values)
        plan.zero_unreached(self.params)
        if any(p.grad is not None for p in self.params):
            return False  # a parameter used outside its Linear's pass
        for part, value, (into, _), (o, v, grads) in zip(parts, values, places, alone):
            flat = torch.from_numpy(into)
            if not (_same_bits(part, o) and _same_bits(value, v) and all(
                    _same_bits(flat[slice(*self.spans[id(p)])].view_as(p), d)
                    for p, d in zip(self.params, grads))):
                return False
        return True


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit (NaN as NaN, -0.0 apart from +0.0)."""
    return a.shape == b.shape and a.dtype == b.dtype and \
        a.detach().cpu().contiguous().numpy().tobytes() == \
        b.detach().cpu().contiguous().numpy().tobytes()
