"""$ mpirun -n 4 python examples/pipeline.py [--pp 2] [--schedule 1f1b]

Pipeline-parallel training with the library API: the world becomes pp
stages x (ranks / pp) data-parallel replicas; each rank holds one stage of a
5-layer MLP and micro-batches flow between the stages.  Prints the stage
split and the result on rank 0.
"""
import argparse
import sys

import mpitrain

mpitrain.init()  # before numpy loads: BLAS threads per rank; an error on a rank ends the job
from mpi4py import MPI


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--pp", type=int, default=2)
    p.add_argument("--schedule", choices=("gpipe", "1f1b"), default="1f1b")
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--data", default=None, help="dataset (default: the built-in set)")
    args = p.parse_args()
    comm = MPI.COMM_WORLD
    cfg = mpitrain.Config(data=args.data, hidden=[256, 256, 256, 256], pp=args.pp,
                          microbatches=args.microbatches, schedule=args.schedule,
                          steps=args.steps, batch_size=128, log_every=25, quiet=True)
    trainer, manifest = mpitrain.build(cfg, comm)
    g = trainer.grid
    print(f"rank {comm.rank}: stage {g.pp_rank} of {g.pp}, replica {g.dp_rank} of {g.dp}, "
          f"{trainer.model.size:,} parameters", flush=True)
    for step in range(args.steps):
        loss, metrics, _ = trainer.step(step)  # metrics: the task's, e.g. {"accuracy": ...}
    val = trainer.evaluate()  # {"loss": ..., "accuracy": ...} over the validation split
    if comm.rank == 0:
        print(f"pipeline {g.pp} x {g.dp} ({args.schedule}, {args.microbatches} micro-batches): "
              f"{trainer.describe()}; loss {loss:.3f}, val_accuracy {val['accuracy']:.3f}")


if __name__ == "__main__":
    sys.exit(mpitrain.run_or_abort(main))
