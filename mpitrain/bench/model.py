"""$ python -m mpitrain bench model [--measured FILE.json ...] [--json out.json]

An alpha-beta-gamma cost model of the gradient all-reduce: the time of each
algorithm from a message's latency (alpha, s), the link's and the node's
seconds per byte (beta) and the reduction's seconds per byte (gamma).  With
``--measured`` (``bench allreduce --json`` files, their name ``RATE-PPN-...``
as the emulated-node runs write them) it fits the inter-node alpha and beta
by least squares and prints each measurement beside the model's prediction;
then it projects the all-reduce of the reference model's gradients (MLP
784-1024-1024-10, 7.45 MB) to 8, 64 and 1,024 ranks at 8 per node and 25,
100 and 400 Gbit/s: which algorithm wins, and its share of a step.

For ``N`` bytes, ``p`` ranks, ``q`` per node, ``m = p / q`` nodes::

    ring (flat)      2(p-1) a + 2(p-1)/p N b_link + (p-1)/p N g    each node's one
                     outgoing hop carries N/p per step, so the link sets the pace
    rec. doubling    log2(p) (a + N b) + log2(p) N g; its log2(m) inter-node steps
                     put q N through a node's link at once
    Rabenseifner     reduce-scatter by recursive halving (nearest first) and all-gather:
                     2 log2(p) a + 2(q-1)/q N b_node + 2(m-1)/m N b_link + (p-1)/p N g
    hierarchical     intra-node reduce-scatter and gather (2 N b_node + N g), then
                     q concurrent rings over the m nodes, N/q bytes each, sharing
                     the link: 2(m-1) a + 2(m-1)/m N b_link
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
from dataclasses import asdict, dataclass, replace
from typing import Dict, List

__all__ = ["Machine", "predict", "fit", "project", "run", "add_arguments", "ALGORITHMS"]


@dataclass(frozen=True)
class Machine:
    """The model's parameters: seconds per message and per byte."""

    alpha_node: float = 5e-6  # a message within a node (shared memory)
    beta_node: float = 1 / 8e9  # a byte copied within a node (memory bandwidth, 8 GB/s)
    alpha_link: float = 2e-6  # a message between nodes
    beta_link: float = 8 / 25e9  # a byte over a node's link, each way
    gamma: float = 1 / 8e9  # a byte reduced (a += b, memory bound)


# Constants fitted to emulated nodes (network namespaces, TCP over veth, tbf at 1 Gbit/s,
# `bench model --measured ...`): a link with both directions busy delivers well below its
# rate; the fit's figures are on the benchmarks page.
THIS_MACHINE = Machine(alpha_node=5e-6, beta_node=1 / 8e9, alpha_link=4.0e-4,
                       beta_link=1 / 72e6, gamma=1 / 8e9)


def _ring(n: float, p: int, q: int, mc: Machine) -> float:
    if p == 1:
        return 0.0
    link = q < p  # the ring leaves the node
    a, b = (mc.alpha_link, mc.beta_link) if link else (mc.alpha_node, mc.beta_node)
    return 2 * (p - 1) * a + 2 * (p - 1) / p * n * b + (p - 1) / p * n * mc.gamma


def _recursive_doubling(n: float, p: int, q: int, mc: Machine) -> float:
    steps = math.ceil(math.log2(p)) if p > 1 else 0
    inter = math.ceil(math.log2(max(1, p // q)))
    intra = steps - inter
    return (intra * (mc.alpha_node + n * mc.beta_node) + inter * (mc.alpha_link + q * n * mc.beta_link)
            + steps * n * mc.gamma)


def _hierarchical(n: float, p: int, q: int, mc: Machine) -> float:
    m = max(1, p // q)
    node = (2 * (q - 1) / q * n * mc.beta_node + (q - 1) / q * n * mc.gamma
            + 2 * (q - 1) * mc.alpha_node) if q > 1 else 0.0
    if m == 1:
        return node
    inter = 2 * (m - 1) * mc.alpha_link + 2 * (m - 1) / m * n * mc.beta_link \
        + (m - 1) / m * n / q * mc.gamma
    return node + inter


def _rabenseifner(n: float, p: int, q: int, mc: Machine) -> float:
    """Reduce-scatter by recursive halving, nearest partners first, then the mirror
    all-gather: the intra-node steps halve the data before any leaves the node."""
    if p == 1:
        return 0.0
    m = max(1, p // q)
    intra, inter = math.ceil(math.log2(q)) if q > 1 else 0, math.ceil(math.log2(m))
    return (2 * intra * mc.alpha_node + 2 * (q - 1) / q * n * mc.beta_node
            + 2 * inter * mc.alpha_link + 2 * (m - 1) / m * n * mc.beta_link
            + (p - 1) / p * n * mc.gamma)


ALGORITHMS = {"ring": _ring, "recursive_doubling": _recursive_doubling,
              "rabenseifner": _rabenseifner, "hierarchical": _hierarchical}
# What each measured algorithm is, for the model: mpitrain's ring and a flat MPICH ring are
# rings; shm and MPICH's defaults across nodes (its node-aware composition, which moves
# N bytes each way as the link counters show) are hierarchical.
MEASURED_AS = {"ring": "ring", "shm": "hierarchical", "mpi": "hierarchical",
               "mpi-flatring": "ring", "mpi-flatrd": "recursive_doubling",
               "mpi-flatrsag": "rabenseifner"}


def predict(algorithm: str, nbytes: float, ranks: int, per_node: int, mc: Machine) -> float:
    """Seconds for one all-reduce of ``nbytes`` by ``algorithm``."""
    return ALGORITHMS[algorithm](float(nbytes), ranks, min(per_node, ranks), mc)


def _records(paths: List[str]) -> List[Dict[str, object]]:
    """The records of ``bench allreduce --json`` files named RATE-PPN-VARIANT.json."""
    out = []
    for path in paths:
        got = re.match(r"(\w+?)-(\d+)-(\w+)\.json$", os.path.basename(path))
        if not got:
            continue
        rate, ppn, variant = got.group(1), int(got.group(2)), got.group(3)
        with open(path, encoding="utf-8") as f:
            for rec in json.load(f):
                name = rec["algorithm"]
                if name == "mpi" and variant.startswith("flat"):
                    name = "mpi-" + variant
                elif name == "mpi" and variant != "auto":
                    continue  # MPICH's other settings: node-aware too, not fitted
                if name in MEASURED_AS and rec["bytes"] >= 1 << 20:
                    out.append({**rec, "rate": rate, "per_node": ppn, "name": name})
    return out


def fit(records: List[Dict[str, object]], base: Machine = THIS_MACHINE) -> Machine:
    """The link's alpha and beta that fit ``records`` best (least squares on relative
    error), the node's parameters kept from ``base``."""
    import numpy as np

    rows, rhs = [], []
    for r in records:
        f = ALGORITHMS[MEASURED_AS[r["name"]]]
        n, p, q = float(r["bytes"]), int(r["ranks"]), int(r["per_node"])
        fixed = f(n, p, q, replace(base, alpha_link=0.0, beta_link=0.0))
        da = f(n, p, q, replace(base, alpha_link=1.0, beta_link=0.0)) - fixed
        db = f(n, p, q, replace(base, alpha_link=0.0, beta_link=1.0)) - fixed
        t = float(r["time_s"])
        rows.append([da / t, db / t])
        rhs.append((t - fixed) / t)
    (a, b), *_ = np.linalg.lstsq(np.array(rows), np.array(rhs), rcond=None)
    return replace(base, alpha_link=max(0.0, float(a)), beta_link=max(1e-12, float(b)))


def project(mc_for_rate, step_s: float, nbytes: float = 7.45e6,
            ranks=(8, 64, 1024), per_node: int = 8,
            rates=(25, 100, 400)) -> List[Dict[str, object]]:
    """The best algorithm and its share of a step at each rank count and link rate."""
    out = []
    for rate in rates:
        mc = mc_for_rate(rate)
        for p in ranks:
            times = {a: predict(a, nbytes, p, per_node, mc) for a in ALGORITHMS}
            best = min(times, key=times.get)
            out.append({"gbit": rate, "ranks": p, "per_node": per_node, **times, "best": best,
                        "share": times[best] / (times[best] + step_s)})
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``bench model``."""
    p.add_argument("--measured", nargs="*", default=[], metavar="FILE.json",
                   help="bench allreduce JSON files named RATE-PPN-VARIANT.json (a glob works)")
    p.add_argument("--step-ms", type=float, default=14.0,
                   help="compute time of one step of the reference model per rank (ms; this "
                        "machine: 14 at 128 samples)")
    p.add_argument("--alpha-us", type=float, default=2.0,
                   help="the projected network's latency per message (µs)")
    p.add_argument("--efficiency", type=float, default=0.9,
                   help="the share of the projected links' rate a transfer reaches")
    p.add_argument("--json", metavar="FILE", help="write the fit, comparison and projection")


def run(args: argparse.Namespace, comm=None) -> Dict[str, object]:
    """Fit (with --measured), compare and project; print on rank 0."""
    rank = comm.Get_rank() if comm is not None else 0
    out = print if rank == 0 else (lambda *a, **k: None)
    paths = [p for pattern in args.measured for p in sorted(glob.glob(pattern))]
    records = _records(paths)
    fitted = {}
    compared = []
    # One fit per link rate and ranks per node: on this machine the links' TCP runs on
    # the ranks' own two cores, so a link carries less with more ranks per node.
    for rate, ppn in sorted({(r["rate"], r["per_node"]) for r in records}):
        mine = [r for r in records if (r["rate"], r["per_node"]) == (rate, ppn)]
        mc = fit(mine)
        fitted[f"{rate}-{ppn}"] = asdict(mc)
        out(f"# {rate}, {ppn} rank(s) per node: alpha_link {mc.alpha_link * 1e6:.0f} us, link "
            f"{1 / mc.beta_link / 1e6:.0f} MB/s each way (fitted on {len(mine)} measurements)")
        out(f"  {'algorithm':<14} {'ranks':>5} {'per node':>8} {'bytes':>9} {'measured':>10} "
            f"{'model':>10} {'error':>7}")
        for r in mine:
            t = predict(MEASURED_AS[r["name"]], r["bytes"], r["ranks"], r["per_node"], mc)
            err = t / r["time_s"] - 1
            compared.append({**{k: r[k] for k in ("name", "rate", "ranks", "per_node", "bytes",
                                                  "time_s")}, "model_s": t, "error": err})
            out(f"  {r['name']:<14} {r['ranks']:>5} {r['per_node']:>8} {r['bytes']:>9} "
                f"{r['time_s'] * 1e3:>8.1f}ms {t * 1e3:>8.1f}ms {err:>+7.0%}")
    if compared:
        errors = sorted(abs(c["error"]) for c in compared)
        within = sum(e <= 0.25 for e in errors)
        out(f"# {within} of {len(errors)} predictions within 25% of the measurement; median "
            f"error {errors[len(errors) // 2]:.0%}, largest {errors[-1]:.0%}")

    def machine(gbit: float) -> Machine:  # a real cluster: the node from this machine
        return replace(THIS_MACHINE, alpha_link=args.alpha_us * 1e-6,
                       beta_link=8 / (gbit * 1e9 * args.efficiency))

    rows = project(machine, args.step_ms / 1e3)
    out(f"# projection: the reference model's gradients (7.45 MB), 8 ranks per node, links at "
        f"{args.efficiency:.0%} of their rate, {args.alpha_us:g} us per message, a step's compute "
        f"{args.step_ms:g} ms")
    out(f"  {'Gbit/s':>6} {'ranks':>6} {'ring':>9} {'rec.dbl':>9} {'rabens.':>9} {'hier.':>9} "
        f"{'best':>13} {'share of step':>13}")
    for r in rows:
        out(f"  {r['gbit']:>6} {r['ranks']:>6} {r['ring'] * 1e3:>7.2f}ms "
            f"{r['recursive_doubling'] * 1e3:>7.2f}ms {r['rabenseifner'] * 1e3:>7.2f}ms "
            f"{r['hierarchical'] * 1e3:>7.2f}ms {r['best']:>13} {r['share']:>13.0%}")
    result = {"fitted": fitted, "compared": compared, "projection": rows}
    if args.json and rank == 0:
        from ..paths import replace

        with replace(args.json) as f:
            json.dump(result, f, indent=1)
    return result
