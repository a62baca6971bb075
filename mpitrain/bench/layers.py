"""$ python -m mpitrain bench layers [--layers conv2d,linear] [--repeats 7] [--json out.json]

Forward + backward (the parameter gradients and the input's) of each layer on
a typical shape, one thread, beside PyTorch's CPU implementation of the same
layer when torch is installed (optional: ``pip install torch``).  Both run
in float32 on the same shapes, interleaved, ``--repeats`` times; the table
gives each one's median and the median of the per-repeat ratios
(mpitrain / torch: 1.0 is as fast, 2.0 twice as slow).  Goals: conv2d within
2x of PyTorch, linear within 1.2x.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from ..model.layers import Context
from ..model.sequential import Sequential
from ..model.spec import build
from ..runtime import MpitrainError
from .common import write_json

# name -> (model text, a batch's shape): typical of an MLP on MNIST-sized inputs, a small
# CNN on CIFAR-sized images, a transformer-sized MLP block.
CASES: Dict[str, Tuple[str, Tuple[int, ...]]] = {
    "linear": ("linear(1024)", (256, 1024)),
    "linear-784": ("linear(256)", (128, 784)),
    "conv2d": ("conv2d(32,3,padding=1)", (64, 16, 16, 16)),
    "conv2d-first": ("conv2d(16,3,padding=1)", (64, 3, 32, 32)),
    "conv2d-stride2": ("conv2d(64,3,stride=2,padding=1)", (64, 32, 16, 16)),
    "maxpool2d": ("maxpool2d(2)", (64, 32, 16, 16)),
    "avgpool2d": ("avgpool2d(2)", (64, 32, 16, 16)),
    "flatten": ("flatten", (64, 32, 8, 8)),
    "layernorm": ("layernorm", (256, 1024)),
    "dropout": ("dropout(0.1)", (256, 1024)),
    "gelu": ("gelu", (256, 1024)),
    "silu": ("silu", (256, 1024)),
    "sigmoid": ("sigmoid", (256, 1024)),
    "relu": ("relu", (256, 1024)),
    "tanh": ("tanh", (256, 1024)),
    "residual": ("residual(layernorm,linear(512),gelu,linear(512))", (128, 512)),
}
# mpitrain's time over torch's that each layer should stay within (flatten: no work)
GOALS = {name: 1.3 for name in CASES if name != "flatten"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``bench layers``."""
    p.add_argument("--layers", default=",".join(CASES),
                   help=f"comma-separated, of: {', '.join(CASES)}")
    p.add_argument("--repeats", type=int, default=7, help="samples per layer; medians")
    p.add_argument("--min-time", type=float, default=0.05,
                   help="seconds each sample runs for at least (calls are repeated)")
    p.add_argument("--no-torch", action="store_true", help="time mpitrain's layers alone")
    p.add_argument("--json", metavar="FILE", help="also write the records as JSON")


def _ours(text: str, shape: Tuple[int, ...]) -> Callable[[], None]:
    """One forward + backward of layer ``text`` on a random batch of ``shape``."""
    model = Sequential(build(text, shape[1:]), dtype="float32", seed=0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape, dtype=np.float32)
    ctx = Context(training=True, step=1, ids=np.arange(shape[0]), seed=0)
    out, _ = model.forward(x, ctx)
    dy = rng.standard_normal(out.shape, dtype=np.float32)

    def call() -> None:
        y, saved = model.forward(x, ctx)
        model.backward(dy, saved, need_dx=True)

    return call


def _torch(text: str, shape: Tuple[int, ...]) -> Optional[Callable[[], None]]:
    """The same layer in PyTorch (None without torch)."""
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(1)
    nn = torch.nn
    c = shape[1]
    layer = {
        "linear(1024)": lambda: nn.Linear(c, 1024),
        "linear(256)": lambda: nn.Linear(c, 256),
        "conv2d(32,3,padding=1)": lambda: nn.Conv2d(c, 32, 3, padding=1),
        "conv2d(16,3,padding=1)": lambda: nn.Conv2d(c, 16, 3, padding=1),
        "conv2d(64,3,stride=2,padding=1)": lambda: nn.Conv2d(c, 64, 3, stride=2, padding=1),
        "maxpool2d(2)": lambda: nn.MaxPool2d(2),
        "avgpool2d(2)": lambda: nn.AvgPool2d(2),
        "flatten": lambda: nn.Flatten(),
        "layernorm": lambda: nn.LayerNorm(shape[1:]),
        "dropout(0.1)": lambda: nn.Dropout(0.1),
        "gelu": lambda: nn.GELU(approximate="tanh"),
        "silu": lambda: nn.SiLU(),
        "sigmoid": lambda: nn.Sigmoid(),
        "relu": lambda: nn.ReLU(),
        "tanh": lambda: nn.Tanh(),
        "residual(layernorm,linear(512),gelu,linear(512))": lambda: _TorchResidual(
            nn.Sequential(nn.LayerNorm(c), nn.Linear(c, 512), nn.GELU(approximate="tanh"),
                          nn.Linear(512, 512))),
    }[text]()
    layer.train()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).requires_grad_(True)
    dy = torch.randn(layer(x).shape, generator=g)
    params = [p for p in layer.parameters()]

    def call() -> None:
        for p in params:
            p.grad = None
        x.grad = None
        layer(x).backward(dy)

    return call


class _TorchResidual:
    """x + block(x), as a torch module would be written (kept out of torch's import)."""

    def __init__(self, block):
        self.block = block

    def __call__(self, x):
        return x + self.block(x)

    def parameters(self):
        return self.block.parameters()

    def train(self):
        self.block.train()


def _calls_for(fn: Callable[[], None], min_time: float) -> int:
    """How many calls of ``fn`` take about ``min_time`` seconds (after a warm-up call)."""
    fn()
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-6)
    return max(1, int(math.ceil(min_time / once)))


def _seconds(fn: Callable[[], None], calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def _one_thread() -> str:
    """Pin numpy's BLAS to one thread; say how (or why not)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        from ..threads import blas_threads

        n = blas_threads()
        return (f"BLAS threads: {n if n else 'unknown'} (pip install threadpoolctl to pin 1, "
                "or set OMP_NUM_THREADS=1)")
    threadpool_limits(1)
    return "1 thread (numpy's BLAS pinned with threadpoolctl; torch.set_num_threads(1))"


def run(args: argparse.Namespace, comm) -> None:
    """Time each layer and print the table (rank 0; other ranks idle)."""
    names = [n.strip() for n in args.layers.split(",") if n.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise MpitrainError(f"--layers: unknown {', '.join(unknown)} (known: "
                            f"{', '.join(CASES)})")
    if args.repeats < 1 or args.min_time <= 0:
        raise MpitrainError("--repeats must be >= 1 and --min-time > 0")
    if comm.Get_rank() != 0:
        return
    threads = _one_thread()
    records: List[Dict[str, object]] = []
    torch_seen = False
    print(f"# layers, forward + backward, float32, {threads}; medians of {args.repeats}")
    print(f"# {'layer':<15} {'batch shape':<18} {'mpitrain ms':>11} {'torch ms':>9} "
          f"{'ratio':>6} {'goal':>5}")
    for name in names:
        text, shape = CASES[name]
        ours = _ours(text, shape)
        theirs = None if args.no_torch else _torch(text, shape)
        torch_seen = torch_seen or theirs is not None
        n_ours = _calls_for(ours, args.min_time)
        n_theirs = _calls_for(theirs, args.min_time) if theirs else 0
        mine, other, ratios = [], [], []
        for _ in range(args.repeats):  # interleaved: drift hits both alike
            mine.append(_seconds(ours, n_ours))
            if theirs:
                other.append(_seconds(theirs, n_theirs))
                ratios.append(mine[-1] / other[-1])
        rec = {"layer": name, "model": text, "shape": list(shape),
               "mpitrain_s": statistics.median(mine),
               "torch_s": statistics.median(other) if other else None,
               "ratio": statistics.median(ratios) if ratios else None,
               "goal": GOALS.get(name)}
        records.append(rec)
        torch_ms = f"{rec['torch_s'] * 1e3:9.3f}" if other else f"{'-':>9}"
        ratio = f"{rec['ratio']:6.2f}" if ratios else f"{'-':>6}"
        goal = f"{rec['goal']:5.1f}" if rec["goal"] else f"{'':>5}"
        print(f"  {name:<15} {str(shape):<18} {rec['mpitrain_s'] * 1e3:11.3f} {torch_ms} "
              f"{ratio} {goal}", flush=True)
    if not torch_seen and not args.no_torch:
        print("# torch is not installed: pip install torch for the comparison")
    if args.json:
        write_json(args.json, records)
