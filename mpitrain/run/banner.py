"""The run's first lines: what runs, on what, and how (rank 0 prints them)."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

__all__ = ["banner"]


def _task_text(task: Dict[str, Any]) -> str:
    if task["name"] == "classification":
        return f"{task['classes']} classes"
    return f"{task['name']}, targets of shape {tuple(task.get('shape') or [])}"


def banner(cfg, trainer, data, ranks: int, total: int, run_dir: Optional[str],
           schedule=None) -> List[str]:
    """The lines a run starts with: versions and threads, data, layout, model, length;
    ``data``: the connected data (``data.datasets.Data``); ``schedule``: the learning
    rate's (a model.schedule.Schedule)."""
    from .. import __version__
    from ..runtime import library_version
    from ..threads import thread_report

    g = trainer.grid
    lines = [f"mpitrain {__version__}: {ranks} ranks, {library_version()}, "
             f"threads per rank {thread_report()}",
             f"run directory {run_dir} (metrics.jsonl)",
             f"data {data.name}: {len(trainer.train)} train / "
             f"{len(trainer.val) if trainer.val else 0} val samples, features {data.features}, "
             f"{_task_text(data.task)}; loss {trainer.describe_loss()}"]
    if cfg.pipelined():
        lines.append(f"pipeline: {g.pp} stages x {g.dp} data-parallel replicas, "
                     f"{cfg.micro()} micro-batches, schedule {cfg.schedule}; "
                     f"{trainer.describe()}; each stage's gradients are exchanged after its "
                     "last backward pass")
    if cfg.ps():
        how = ("synchronous" if cfg.staleness == 0 else
               f"stale-synchronous, workers at most {cfg.staleness} steps ahead of the slowest")
        lines.append(f"parameter server: {cfg.servers} server(s) (ranks 0-{cfg.servers - 1}), "
                     f"{ranks - cfg.servers} workers, {how}")
    if cfg.balance == "speed":
        lines.append(f"batches split by the ranks' speed, measured every {cfg.balance_every} "
                     "steps")
    spec = trainer.spec.get("spec")
    if spec:
        lines.append(f"model {spec}")
    lines.append(trainer.describe_model() + (" (stage 0)" if g.pp > 1 else ""))
    lr = schedule.describe() if schedule is not None else f"lr {cfg.lr}"
    accumulate = (f", in {cfg.accumulate} accumulated micro-batches" if cfg.accumulate > 1
                  else "")
    clip = (f", gradients clipped to norm {cfg.clip_grad_norm:g}"
            if cfg.clip_grad_norm is not None else "")
    parts = ranks - cfg.servers if cfg.ps() else g.dp
    chosen = trainer.resolved.get("allreduce") if cfg.allreduce == "auto" else None
    sync = ("parameter server" if cfg.ps() else f"allreduce {cfg.allreduce}" if not chosen
            else f"allreduce auto: {chosen}")
    if not (cfg.ps() or cfg.reproducible) and g.pp == 1 and ranks > 1:
        sync += f" ({trainer.exchange.describe()})"
    if chosen:
        sync += f", because {trainer.resolved.get('allreduce_why', '')}"
    sync = trainer.describe_sync() or sync
    lines.append(f"{total} steps ({trainer.sampler.steps_per_epoch} per epoch), global batch "
                 f"{cfg.batch_size} (about {cfg.batch_size // parts} per "
                 f"{'worker' if cfg.ps() else 'replica'}{accumulate}), "
                 f"{trainer.describe_optimizer()} {lr}{clip}, {sync}")
    if cfg.early_stop is not None:
        lines.append(f"early stop: after {cfg.early_stop} evaluations without a better "
                     f"{cfg.monitor}")
    return lines
