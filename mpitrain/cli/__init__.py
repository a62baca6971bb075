"""Command line: ``python -m mpitrain {train,prepare,data,predict,evaluate,inspect,plot,bench,info}``.

Every subcommand runs inside ``runtime.run_or_abort``: an error on any rank
ends the whole MPI job with the message printed once and a non-zero exit.
"""
from __future__ import annotations

import sys
from typing import List, Optional

from ..process import init
from ..runtime import EXIT_PREEMPTED, ConfigError, agreed, bound_finalize, run_or_abort
from . import commands
from .parser import parser

__all__ = ["main", "parser"]

# subcommand -> its function in ``commands`` (train runs the loop here)
COMMANDS = {"prepare": "run_prepare", "data": "run_index", "predict": "run_predict",
            "evaluate": "run_evaluate", "plot": "run_plot", "inspect": "run_inspect",
            "bench": "run_bench", "info": "info"}


def _torch_front_end():
    """``mpitrain.torch``'s ``train_torch`` (an error naming the missing torch)."""
    from ..torch.training import train_torch

    return train_torch


def main(argv: Optional[List[str]] = None) -> None:
    """Entry point of ``python -m mpitrain``."""
    init()  # threads per rank before numpy loads, malloc, Open MPI's idle waits
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    names = {"name_of": None}  # how errors name a parameter: by its flag or TOML key

    def run() -> int:
        args = parser().parse_args(argv)  # a usage error: every rank's, printed once
        if args.command == "train":
            from ..config import from_sources
            from ..run.fit import train as numpy_train

            cfg, names["name_of"] = agreed(comm, lambda: from_sources(args))
            # a PyTorch model (--torch) trains through mpitrain.torch (needs torch)
            train = numpy_train if cfg.torch is None else agreed(comm, _torch_front_end)
            summary = train(cfg, comm)
            return EXIT_PREEMPTED if summary["preempted"] else 0
        return int(getattr(commands, COMMANDS[args.command])(args, comm) or 0)

    def render(exc: ConfigError) -> str:
        from ..config import flag

        return exc.render(names["name_of"] or flag)

    try:
        code = run_or_abort(run, comm, render=render)
    except SystemExit as exc:  # an error every rank agreed on: all exit with its status
        code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
    bound_finalize(30, code)  # a healed job's end (nothing otherwise): see its docstring
    sys.exit(code)
