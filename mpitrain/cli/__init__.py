"""Command line: ``python -m mpitrain {train,prepare,data,predict,evaluate,inspect,plot,bench,info}``.

Every subcommand runs inside ``runtime.run_or_abort``: an error on any rank
ends the whole MPI job with the message printed once and a non-zero exit.
"""
from __future__ import annotations

import sys
from typing import List, Optional

from ..process import init
from ..runtime import (EXIT_PREEMPTED, ConfigError, agreed, bound_finalize, job_comm, on_root,
                       run_or_abort)
from . import commands
from .parser import parser

__all__ = ["main", "parser"]


def main(argv: Optional[List[str]] = None) -> None:
    """Entry point of ``python -m mpitrain``."""
    init()  # threads per rank before numpy loads, malloc, Open MPI's idle waits
    args = parser().parse_args(argv)
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    names = {"name_of": None}  # how errors name a parameter: by its flag or TOML key

    def run() -> int:
        if args.command == "train":
            from ..config import from_sources
            from ..run.fit import train

            cfg, names["name_of"] = agreed(comm, lambda: from_sources(args))
            summary = train(cfg, comm)
            if summary["preempted"]:
                return EXIT_PREEMPTED
        elif args.command == "prepare":
            on_root(comm, lambda: commands.prepare(args))
        elif args.command == "data":
            on_root(comm, lambda: commands.index(args))
        elif args.command == "predict":
            from ..run.predict import predict

            got = predict(args.checkpoint, args.data, args.out, comm, x_key=args.x,
                          split=args.split)
            if comm.rank == 0:
                print(f"wrote {got['out']}: {got['rows']} rows of {got['data']} "
                      f"({', '.join(got['datasets'])})")
        elif args.command == "evaluate":
            from ..run.predict import evaluate

            result = evaluate(args.checkpoint, args.data, comm, args.split)
            if comm.rank == 0:
                commands.print_metrics(result)
        elif args.command == "plot":
            from ..run.plot import default_out, plot_runs

            on_root(comm, lambda: print(
                f"wrote {plot_runs(args.runs, args.out or default_out(args.runs))}"))
        elif args.command == "inspect":  # one print, one --export writer
            return on_root(comm, lambda: commands.inspect(args))
        elif args.command == "bench":
            from ..bench import allreduce, layers, model, pipeline, recovery, stragglers
            from ..bench import train as train_bench

            {"allreduce": allreduce, "pipeline": pipeline, "train": train_bench,
             "layers": layers, "recovery": recovery,
             "stragglers": stragglers, "model": model}[args.bench].run(args, comm)
        elif args.command == "info":
            commands.info(comm)
        return 0

    def render(exc: ConfigError) -> str:
        from ..config import flag

        return exc.render(names["name_of"] or flag)

    try:
        code = run_or_abort(run, comm, render=render)
    except SystemExit as exc:  # an error every rank agreed on: all exit with its status
        code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
    if job_comm(None) is not None:  # a healed job: see runtime.bound_finalize
        bound_finalize(30, code)
    sys.exit(code)
