"""$ python -m mpitrain.bench.ddp [--ranks 1,2] [--variants mpi,shm] [--repeats 5] [--json out.json]

mpitrain against its peer, PyTorch DistributedDataParallel (gloo backend,
CPU, ``torch.set_num_threads(1)`` per rank), on the same MLP
(784-1024-1024-10, ReLU, softmax cross-entropy, SGD), the same global batch
(128 per rank), ranks and threads, measured interleaved in one run:
mpitrain through ``mpiexec -n N python -m mpitrain bench train``, DDP through
``torch.multiprocessing``.  DDP trains from tensors already in memory (the
same built-in data), mpitrain reads its HDF5 shards as it goes.

torch is needed for this benchmark only (``pip install torch``; a CPU build
is enough); mpitrain never imports it otherwise.  Where the machine forces an
old OpenBLAS kernel (``OPENBLAS_CORETYPE``), unset it for this command alone
to compare with torch's own kernels:
``env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python -m mpitrain.bench.ddp``.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

from .common import write_json


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, size: int, port: int, data: str, hidden: List[int], batch: int,
                steps: int, warmup: int, out: str) -> None:
    """One DDP rank: train ``warmup + steps`` steps, rank 0 writes samples/s to ``out``."""
    import numpy as np
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=size)
    from mpitrain.data.manifest import read_manifest
    from mpitrain.data.shards import Shards

    shards = Shards(read_manifest(data), "train")
    x_all, y_all = shards.read_range(0, len(shards))
    shards.close()
    x_all, y_all = torch.from_numpy(x_all), torch.from_numpy(y_all)
    torch.manual_seed(0)
    widths = [x_all.shape[1], *hidden, int(y_all.max()) + 1]
    layers: List[torch.nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(torch.nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(torch.nn.ReLU())
    model = DistributedDataParallel(torch.nn.Sequential(*layers))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss_fn = torch.nn.CrossEntropyLoss()
    rng = np.random.default_rng(rank)
    t0 = 0.0
    for k in range(warmup + steps):
        if k == warmup:
            dist.barrier()
            t0 = time.perf_counter()
        idx = torch.from_numpy(rng.integers(0, len(x_all), batch))
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x_all[idx]), y_all[idx])
        loss.backward()
        opt.step()
    dist.barrier()
    elapsed = time.perf_counter() - t0
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"samples_per_s": size * batch * steps / elapsed}, f)
    dist.destroy_process_group()


def ddp_samples_per_s(size: int, data: str, hidden: List[int], batch: int, steps: int,
                      warmup: int) -> float:
    """Global samples/s of a DDP run on ``size`` processes."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "ddp.json")
        for attempt in (1, 2):  # gloo's TCP rendezvous can lose its port to another process
            try:
                mp.spawn(_ddp_worker, args=(size, _free_port(), data, hidden, batch, steps,
                                            warmup, out), nprocs=size, join=True)
                break
            except (mp.ProcessRaisedException, mp.ProcessExitedException) as exc:
                if attempt == 2:
                    raise
                print(f"DDP run failed ({type(exc).__name__}: {exc}); trying once more",
                      file=sys.stderr)
        with open(out) as f:
            return json.load(f)["samples_per_s"]


def mpitrain_samples_per_s(size: int, data: str, hidden: List[int], batch: int, steps: int,
                           warmup: int, mpiexec: str, variant: str = "mpi") -> Dict[str, float]:
    """Global samples/s (and the time split) of ``mpiexec -n size ... bench train``."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "train.json")
        cmd = [mpiexec, "-n", str(size), sys.executable, "-m", "mpitrain", "bench", "train",
               "--ranks", str(size), "--repeats", "1", "--steps", str(steps), "--warmup",
               str(warmup), "--hidden", ",".join(map(str, hidden)), "--batch-per-rank",
               str(batch), "--data", data, "--variants", variant, "--json", out]
        from ..threads import THREAD_VARS, child_env

        env = {**child_env(), **{v: "1" for v in THREAD_VARS}}  # one thread, as DDP's ranks
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env, timeout=600)
        with open(out) as f:
            return json.load(f)[0]


def main(argv=None) -> None:
    """``python -m mpitrain.bench.ddp``: measure, print the table, write JSON."""
    p = argparse.ArgumentParser(prog="python -m mpitrain.bench.ddp", description=__doc__)
    p.add_argument("--ranks", default="1,2", help="rank counts (default: 1,2)")
    p.add_argument("--variants", default="mpi,shm",
                   help="mpitrain's variants (see bench train --variants), e.g. mpi,shm")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--hidden", default="1024,1024")
    p.add_argument("--batch-per-rank", type=int, default=128)
    p.add_argument("--data", default=None, help="dataset (default: the built-in set)")
    p.add_argument("--mpiexec", default=os.path.join(os.path.dirname(sys.executable), "mpiexec"))
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)
    try:
        import torch  # noqa: F401
    except ImportError:
        sys.exit("python -m mpitrain.bench.ddp needs torch: pip install torch (a CPU build)")
    from mpi4py import MPI

    from ..data.builtin import builtin_dataset

    data = args.data or builtin_dataset(MPI.COMM_SELF)
    ranks = [int(r) for r in args.ranks.split(",")]
    hidden = [int(h) for h in args.hidden.split(",")]
    variants = args.variants.split(",")
    ours: Dict[tuple, List[float]] = {(r, v): [] for r in ranks for v in variants}
    theirs: Dict[int, List[float]] = {r: [] for r in ranks}
    for _ in range(args.repeats):  # interleaved, so both see the same machine
        for r in ranks:
            for v in variants:
                ours[r, v].append(mpitrain_samples_per_s(r, data, hidden, args.batch_per_rank,
                                                         args.steps, args.warmup,
                                                         args.mpiexec, v)["samples_per_s"])
            theirs[r].append(ddp_samples_per_s(r, data, hidden, args.batch_per_rank,
                                               args.steps, args.warmup))
    print(f"# MLP 784-{'-'.join(map(str, hidden))}-10, {args.batch_per_rank} samples per rank, "
          f"SGD, 1 thread per rank; median of {args.repeats} (min-max)")
    print(f"# {'ranks':>5} {'variant':<8} {'mpitrain samples/s':>24} {'DDP gloo samples/s':>24} "
          f"{'ratio':>6} {'eff. mpitrain':>13} {'eff. DDP':>9}")
    records = []
    for v in variants:
        for r in ranks:
            m, d = statistics.median(ours[r, v]), statistics.median(theirs[r])
            m1, d1 = statistics.median(ours[ranks[0], v]), statistics.median(theirs[ranks[0]])
            rec = {"ranks": r, "variant": v, "mpitrain_samples_per_s": m,
                   "ddp_samples_per_s": d, "ratio": m / d,
                   "ratios": [a / b for a, b in zip(ours[r, v], theirs[r])],
                   "efficiency_mpitrain": m / (r / ranks[0] * m1),
                   "efficiency_ddp": d / (r / ranks[0] * d1)}
            records.append(rec)
            print(f"  {r:>5} {v:<8} {m:>10,.0f} ({min(ours[r, v]):,.0f}-{max(ours[r, v]):,.0f}) "
                  f"{d:>10,.0f} ({min(theirs[r]):,.0f}-{max(theirs[r]):,.0f}) {m / d:>6.2f} "
                  f"{rec['efficiency_mpitrain']:>13.2f} {rec['efficiency_ddp']:>9.2f}")
    if args.json:
        write_json(args.json, records)


if __name__ == "__main__":
    main()
