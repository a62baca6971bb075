"""``mpitrain.fit``: the training loop of ``mpitrain train`` for a model and data of one's own.

::

    # mpirun -n 4 python my_script.py
    import mpitrain

    model = mpitrain.Sequential([mpitrain.Linear(64, 128), mpitrain.ReLU(),
                                 mpitrain.Linear(128, 10)], seed=0)
    data = mpitrain.ArrayDataset(x, y, val_fraction=0.1)
    model, summary = mpitrain.fit(model, data, epochs=5, optimizer="adam", lr=1e-3,
                                  ckpt_dir="ckpt")

Every option is a ``Config`` key (``mpitrain train --help`` lists them), checked
as the command line checks it; the command line's ``train`` runs the very same
loop (``train(cfg, comm)``): every exchange and strategy, checkpoints and
resume (also on another rank count), the watchdog, pre-emption (``Preempted``,
exit status 75), healing (``on_failure``), early stopping and ``best.h5``,
``metrics.jsonl``, the timeline, ``reproducible``.
"""
from __future__ import annotations

import sys
from typing import Any, Callable, Dict, Optional, TextIO, Tuple

from mpi4py import MPI

from ..config import Config
from ..data.datasets import as_dataset
from ..fault.drills import Faults
from ..fault.resume import Checkpoints
from ..model.sequential import Sequential
from ..process import init
from ..runtime import ConfigError, Preempted, agreed, literal
from .build import build
from .healing import Job
from .loop import Loop
from .outputs import check_run_paths

__all__ = ["fit", "train", "FitResult", "run_training"]

# Keys that shape a model the configuration describes: fit is given the model itself.
GIVEN = {"hidden": "it shapes the default MLP, and fit trains the model it is given",
         "activation": "it shapes the default MLP, and fit trains the model it is given",
         "dropout": "it shapes the default MLP, and fit trains the model it is given"}


class FitResult(tuple):
    """``(model, summary)`` as ``fit`` returns them; ``comm`` is the job's communicator
    afterwards (a healed job's: use it, not COMM_WORLD, for what follows)."""

    def __new__(cls, model: Any, summary: Dict[str, Any], comm: MPI.Comm):
        self = super().__new__(cls, (model, summary))
        self.comm = comm
        return self

    @property
    def model(self) -> Any:
        """The trained model: the same parameters on every rank."""
        return self[0]

    @property
    def summary(self) -> Dict[str, Any]:
        """What the command line prints at the end, as a dict."""
        return self[1]


def _config(model: Any, options: Dict[str, Any]) -> Config:
    """The run's Config from ``fit``'s options: checked as the command line's are."""
    for key in options:
        if key in GIVEN:
            raise ConfigError(f"{{{key}}} does not apply to fit: {GIVEN[key]}", [key])
    if not isinstance(model, Sequential):
        raise ConfigError(f"{{model}}: expected a mpitrain.Sequential of layers, got "
                          f"{literal(type(model).__name__)}", ["model"])
    dtype = model.dtype.name
    if options.get("dtype", dtype) != dtype:
        raise ConfigError(f"{{dtype}} {literal(str(options['dtype']))} does not apply: the "
                          f"model's parameters are {dtype}", ["dtype"])
    return Config(**{**options, "dtype": dtype})


def fit(model: Sequential, data: Any, *, comm: Optional[MPI.Comm] = None,
        out: Optional[TextIO] = None, **options) -> FitResult:
    """Train ``model`` on ``data`` over the ranks of ``comm`` (default ``COMM_WORLD``);
    collective.  Returns ``(model, summary)``: the model trained in place (the same
    parameters on every rank) and the run's summary.

    ``model``: a ``Sequential`` of layers, built-in or registered
    (``register_layer``), so checkpoints can rebuild it.  ``data``: a dataset
    (``ArrayDataset``, ``DirectoryDataset``, ``HDF5File``) or a dataset
    directory's path.  ``options``: ``Config`` keys (all but ``model``,
    ``hidden``, ``activation``, ``dropout`` and ``data``), checked as
    ``mpitrain train`` checks them: a bad one raises ``ConfigError`` naming it,
    on every rank alike.  ``out``: where rank 0 prints (default stdout).

    A pre-emption (SIGTERM or SIGUSR1 with ``ckpt_dir``) writes a checkpoint and
    raises ``Preempted``, which ends an uncaught script with exit status 75;
    run it again to resume.
    """
    init()
    comm = comm if comm is not None else MPI.COMM_WORLD
    cfg = agreed(comm, lambda: _config(model, options))
    dataset = agreed(comm, lambda: as_dataset(data))
    summary, trainer, comm = run_training(cfg, comm, model=model, data=dataset, out=out)
    if trainer.model is not model:  # a pipeline's stages: the whole model on every rank
        model.params[...] = trainer.whole_params()
    if summary["preempted"]:
        raise Preempted(summary["end_step"], summary.get("signal"))
    return FitResult(model, summary, comm)


def train(cfg: Config, comm: MPI.Comm, out: Optional[TextIO] = None) -> Dict[str, Any]:
    """Train as ``cfg`` says (its model text, its data) on the ranks of ``comm``; return
    the summary on every rank: what ``mpitrain train`` runs (collective)."""
    init()
    if cfg.torch is not None:
        raise ConfigError("{torch}: a PyTorch model trains through mpitrain.torch.fit."
                          "train_torch (as the command line does)", ["torch"])
    return run_training(cfg, comm, out=out)[0]


def run_training(cfg: Config, comm: MPI.Comm, *, model: Any = None, data: Any = None,
                 out: Optional[TextIO] = None,
                 make: Optional[Callable[..., Tuple[Any, Any]]] = None
                 ) -> Tuple[Dict[str, Any], Any, MPI.Comm]:
    """The one loop of ``train`` and ``fit``: (summary, the last trainer, the job's
    communicator).  ``model``, ``data``: what ``fit`` was given (None: ``cfg``'s);
    ``make(cfg, comm, check_start)``: the trainer and its data, another front end's
    (default: ``build``).  With ``on_failure`` shrink or respawn a rank's death sends
    the survivors out of the loop; ``run.healing`` heals the job and the loop starts
    again from the state of the rank that got furthest."""
    faults = Faults(cfg.fault)
    check_run_paths(cfg, comm)  # before anything is read or written
    job = Job(cfg, comm, faults)
    ckpts = Checkpoints(job.comm, cfg.ckpt_dir, every=cfg.ckpt_every,
                        keep_last=cfg.keep_last, resume=cfg.resume, config=cfg.to_dict())
    loops = []
    if make is None:
        def make(cfg: Config, comm: MPI.Comm, check_start: bool):
            return build(cfg, comm, model, data, check_start=check_start)

    def attempt(comm: MPI.Comm, carry, notes) -> Dict[str, Any]:
        loops.append(Loop(cfg, comm, ckpts, faults, out or sys.stdout, carry, make))
        return loops[-1].run(notes)

    try:
        with faults.in_checkpoints():
            summary = job.run(ckpts, attempt)
    finally:
        ckpts.close()
    return summary, loops[-1].trainer, job.comm
