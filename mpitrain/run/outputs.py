"""Every path a run names, checked before anything is read or written (collective).

``check_run_paths`` runs before the data is opened and before step 1: a
checkpoint to resume from must be a readable regular file; the run directory
a directory that takes files; the metrics log (appended to) and the timeline
(written at the end) files whose directory exists and takes a file; an
existing timeline is not replaced unless ``overwrite``.  The checkpoint
directory is checked (and locked) by ``fault.resume.Checkpoints.open``, the
data by its ``connect``.  Rank 0 writes the outputs, so rank 0 checks them.
"""
from __future__ import annotations

from ..config import Config
from ..paths import input_file, output_dir, output_file
from ..runtime import on_root

__all__ = ["check_run_paths"]


def check_run_paths(cfg: Config, comm) -> None:
    """Refuse, on every rank alike, a path of ``cfg`` that cannot serve (collective)."""

    def check() -> None:
        if cfg.resume not in ("auto", "none"):
            input_file(cfg.resume, "checkpoint file", "resume")
        if cfg.run_dir:
            output_dir(cfg.run_dir, "run directory", "run_dir")
        if cfg.log:  # appended: a file that exists is continued
            output_file(cfg.log, "metrics log", "log", overwrite=True)
        if cfg.timeline:
            output_file(cfg.timeline, "timeline", "timeline", overwrite=cfg.overwrite)

    on_root(comm, check)
