"""$ mpirun -n 2 python -m mpitrain bench torch [--models mlp,cnn] [--repeats 5] [--json out.json]

A PyTorch model trained by ``mpitrain.torch`` beside its peers, all in this
one job, at its rank count, on the same model copies, data and threads (one
torch thread per rank): ``mpitrain-mpi`` and ``mpitrain-shm``
(``DistributedOptimizer`` in a loop of one's own; ``mpitrain-shm-sharded`` with
``shard_update``: one copy of the model per node, each rank updating its own
parameters), ``fit`` (which shards the update with ``shm``) and
``fit-reproducible`` (``mpitrain.torch.fit``'s step: mpitrain's sampler and
reader, the metrics; reproducible in 4 fixed groups), ``mpi4py`` (the
gradients as views of one flat buffer, one ``Allreduce`` after backward),
``ddp`` (PyTorch's DistributedDataParallel over Gloo, started in this job),
``lockstep`` (the same step, the ranks waiting for each other instead of
exchanging: what a synchronous step can do) and ``ceiling`` (each rank alone,
no waiting: what the machine can do).  Every setting is built once; they take
turns of ``--block`` steps in a rotating order, ``--repeats`` times, and each
figure is the median over the turns (min-max beside it); the ratios pair each
turn with its peers' in the same repeat.  Models: ``mlp``, the reference MLP
784-1024-1024-10; ``cnn``, two 3x3 convolutions (32, 64 channels) with
max-pooling on 1x28x28 images, then 128 and 10 units; SGD, 128 samples per
rank.
"""
from __future__ import annotations

import argparse
import socket
import statistics
import time
from datetime import timedelta
from typing import Callable, Dict, List

import numpy as np
from mpi4py import MPI

from .common import write_json

__all__ = ["add_arguments", "run", "VARIANTS"]

VARIANTS = ("mpitrain-mpi", "mpitrain-shm", "mpitrain-shm-sharded", "fit", "fit-reproducible",
            "mpi4py", "ddp", "lockstep", "ceiling")
# More settings, measured when asked for: the exchange overlapped with backward on one
# node too (in 2 MiB buckets, a progress thread), and reproducible in 2 groups.
EXTRA = {"mpitrain-mpi-overlap": dict(allreduce="mpi", overlap=True, progress="thread",
                                      bucket_mb=2.0),
         "mpitrain-shm-overlap": dict(allreduce="shm", overlap=True, progress="thread",
                                      bucket_mb=2.0),
         "mpitrain-ring": dict(allreduce="ring"), "fit-reproducible-g2": {},
         "mpitrain-shm-sharded": dict(allreduce="shm", shard_update=True)}
SAMPLES = 2048  # rows of random data each model reads (cycled)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The benchmark's options."""
    p.add_argument("--models", default="mlp,cnn", help="mlp, cnn or both (default)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"settings to measure (default: all of {', '.join(VARIANTS)})")
    p.add_argument("--repeats", type=int, default=5, help="turns of each setting (default 5)")
    p.add_argument("--block", type=int, default=10, help="steps per turn (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--batch-per-rank", type=int, default=128)
    p.add_argument("--json", metavar="FILE", help="write the records here (rank 0)")


def make_model(name: str):
    """The benchmark's model ``name``, the same initial values on every rank."""
    import torch

    torch.manual_seed(0)
    nn = torch.nn
    if name == "mlp":
        return nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                             nn.Linear(1024, 10))
    return nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10))


def _data(name: str):
    rng = np.random.default_rng(0)
    shape = (784,) if name == "mlp" else (1, 28, 28)
    x = rng.normal(size=(SAMPLES, *shape)).astype(np.float32)
    return x, rng.integers(0, 10, SAMPLES).astype(np.int64)


def _ddp_group(comm: MPI.Comm):
    """A Gloo process group over this job's ranks (rank 0's host and a free port)."""
    import torch.distributed as dist

    if comm.rank == 0:
        with socket.socket() as s:
            s.bind(("", 0))
            where = (socket.gethostname(), s.getsockname()[1])
    where = comm.bcast(where if comm.rank == 0 else None, root=0)
    dist.init_process_group("gloo", init_method=f"tcp://{where[0]}:{where[1]}",
                            rank=comm.rank, world_size=comm.size,
                            timeout=timedelta(seconds=120))


def _steppers(model_name: str, variants: List[str], comm: MPI.Comm,
              batch: int) -> Dict[str, Callable[[int], None]]:
    """Each variant's one training step ``step(k)`` on a model copy of its own."""
    import torch

    import mpitrain
    import mpitrain.torch as mt

    x, y = _data(model_name)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    loss_fn = torch.nn.functional.cross_entropy
    rows = SAMPLES // (batch * comm.size) or 1

    def part(k: int):
        a = ((k % rows) * comm.size + comm.rank) * batch % SAMPLES
        return xt[a:a + batch], yt[a:a + batch]

    def loop(model, opt, after_backward=None, zero=None):
        def step(k: int) -> None:
            xb, yb = part(k)
            (zero or opt.zero_grad)()
            loss_fn(model(xb), yb).backward()
            if after_backward is not None:
                after_backward()
            opt.step()
        return step

    out: Dict[str, Callable[[int], None]] = {}
    for v in variants:
        model = make_model(model_name)
        sgd = torch.optim.SGD(model.parameters(), lr=0.01)
        if v.startswith("mpitrain-"):
            options = EXTRA.get(v, dict(allreduce=v.split("-")[1]))
            out[v] = loop(model, mt.DistributedOptimizer(sgd, model, comm=comm, **options))
        elif v.startswith("fit"):
            groups = {"fit-reproducible": 4, "fit-reproducible-g2": 2}.get(v)
            trainer = mt.TorchTrainer(model, loss_fn, sgd, mpitrain.ArrayDataset(x, y), comm,
                                      batch_size=batch * comm.size, seed=0, groups=groups)
            trainer.peak = 0.01
            out[v] = lambda k, t=trainer: t.step(k)
        elif v == "mpi4py":
            flat = torch.zeros(sum(p.numel() for p in model.parameters()))
            offset = 0
            for p in model.parameters():
                p.grad = flat[offset:offset + p.numel()].view_as(p)
                offset += p.numel()

            def summed(flat=flat) -> None:
                comm.Allreduce(MPI.IN_PLACE, flat.numpy(), op=MPI.SUM)
                flat.mul_(1.0 / comm.size)

            out[v] = loop(model, sgd, summed, zero=flat.zero_)
        elif v == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            wrapped = DistributedDataParallel(model)
            out[v] = loop(wrapped, torch.optim.SGD(wrapped.parameters(), lr=0.01))
        elif v == "lockstep":
            out[v] = loop(model, sgd, comm.Barrier)
        else:  # ceiling
            out[v] = loop(model, sgd)
    return out


def _turn(step: Callable[[int], None], first: int, block: int, comm: MPI.Comm,
          alone: bool, batch: int) -> float:
    """Global samples/s of ``block`` steps: the slowest rank's time, or (``alone``) the
    sum of each rank's own rate."""
    comm.Barrier()
    t0 = time.perf_counter()
    for k in range(first, first + block):
        step(k)
    elapsed = time.perf_counter() - t0
    if alone:
        return comm.allreduce(batch * block / elapsed, op=MPI.SUM)
    return batch * block * comm.size / comm.allreduce(elapsed, op=MPI.MAX)


def _measure(model_name: str, variants: List[str], args, comm) -> Dict[str, List[float]]:
    steps = _steppers(model_name, variants, comm, args.batch_per_rank)
    done = {v: 0 for v in variants}
    for v in variants:  # warm-up, untimed
        for _ in range(args.warmup):
            steps[v](done[v])
            done[v] += 1
    rates: Dict[str, List[float]] = {v: [] for v in variants}
    for r in range(args.repeats):
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        for v in order:
            rates[v].append(_turn(steps[v], done[v], args.block, comm, v == "ceiling",
                                  args.batch_per_rank))
            done[v] += args.block
    return rates


def _paired(rates: Dict[str, List[float]], v: str, peer: str) -> float:
    if peer not in rates or peer == v:
        return float("nan")
    return statistics.median(a / b for a, b in zip(rates[v], rates[peer]))


def run(args: argparse.Namespace, comm: MPI.Comm) -> List[Dict[str, object]]:
    """Measure every model and variant; rank 0 prints the tables (and writes JSON)."""
    try:
        import torch
    except ImportError:
        raise SystemExit("bench torch needs torch: pip install 'mpitrain[torch]'") from None
    from ..process import init

    init()
    torch.set_num_threads(1)
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS) - set(EXTRA))
    if unknown:
        raise SystemExit(f"bench torch: unknown variant {unknown[0]!r} (known: "
                         f"{', '.join(dict.fromkeys([*VARIANTS, *EXTRA]))})")
    if "ddp" in variants:
        _ddp_group(comm)
    records = []
    for model_name in args.models.split(","):
        rates = _measure(model_name, variants, args, comm)
        for v in variants:
            records.append({"model": model_name, "variant": v, "ranks": comm.size,
                            "samples_per_s": statistics.median(rates[v]),
                            "min": min(rates[v]), "max": max(rates[v]),
                            "vs_ddp": _paired(rates, v, "ddp"),
                            "vs_fit": _paired(rates, v, "fit"),
                            "vs_lockstep": _paired(rates, v, "lockstep"),
                            "vs_ceiling": _paired(rates, v, "ceiling"), "turns": rates[v]})
    if "ddp" in variants:
        torch.distributed.destroy_process_group()
    if comm.rank == 0:
        _print(records, args, comm.size)
        if args.json:
            write_json(args.json, records)
    return records


def _print(records: List[Dict[str, object]], args, ranks: int) -> None:
    print(f"# {ranks} ranks, {args.batch_per_rank} samples per rank, SGD, 1 torch thread per "
          f"rank; median of {args.repeats} turns of {args.block} steps (min-max)")
    print(f"# {'model':<5} {'variant':<20} {'samples/s':>26} {'x DDP':>6} {'x fit':>6} "
          f"{'x lockstep':>10} {'x ceiling':>9}")
    for r in records:
        span = f"{r['samples_per_s']:>9,.0f} ({r['min']:,.0f}-{r['max']:,.0f})"
        print(f"  {r['model']:<5} {r['variant']:<20} {span:>26} {r['vs_ddp']:>6.2f} "
              f"{r['vs_fit']:>6.2f} {r['vs_lockstep']:>10.2f} {r['vs_ceiling']:>9.2f}")
