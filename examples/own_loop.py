"""$ mpirun -n 2 python examples/own_loop.py [--ckpt-dir DIR] [--steps N]

A training loop of one's own over mpitrain's pieces, with the guarantees of
``mpitrain train``: the Trainer's step (its part of the batch, forward,
backward, the exchange, the update), crash-safe checkpoints in a directory
locked for this job (kill it, run it again: it resumes from the newest one and
ends with the bits of a run that never stopped), the watchdog (a stuck rank
ends the job), pre-emption (SIGTERM: a checkpoint at the same step on every
rank, then exit 75) and the metrics log.
"""
import argparse

import numpy as np
from mpi4py import MPI

import mpitrain


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt-dir", default="own_loop_ckpt")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--every", type=int, default=25, help="checkpoint every N steps")
    args = p.parse_args()
    mpitrain.init()  # threads per rank, and an error on any rank ends the job
    comm = MPI.COMM_WORLD
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4000, 32)).astype(np.float32)
    y = (x[:, :8].sum(axis=1) > 0) + 2 * (x[:, 8:16].sum(axis=1) > 0)  # 4 classes
    model = mpitrain.Sequential([mpitrain.Linear(32, 64), mpitrain.ReLU(),
                                 mpitrain.Linear(64, 4)], seed=0)
    data = mpitrain.ArrayDataset(x, y, val_fraction=0.1)
    trainer = mpitrain.Trainer(model, None, mpitrain.Adam(lr=1e-3), data, comm,
                               batch_size=64, seed=0)

    with mpitrain.Checkpoints(comm, args.ckpt_dir, every=args.every) as ckpts, \
            mpitrain.Watchdog(comm, 60) as dog, mpitrain.Preemption() as signals, \
            mpitrain.MetricsLog(comm, f"{args.ckpt_dir}/metrics.jsonl") as log:
        start = ckpts.restore(trainer)  # the newest checkpoint's steps (0: none)
        for step in range(start, args.steps):
            dog.beat(step + 1)
            loss, metrics, _ = trainer.step(step, stop=signals)
            log.write(step=step + 1, loss=loss, **metrics)
            if ckpts.due(step + 1, args.steps, stopping=trainer.stop_agreed):
                ckpts.save(trainer, step + 1)
            if trainer.stop_agreed:  # a SIGTERM reached some rank: stop here, all of us
                raise mpitrain.Preempted(step + 1, signals.signal)

    val = trainer.evaluate()
    trainer.close()
    if comm.rank == 0:
        print(f"own_loop: {comm.size} ranks, steps {start + 1}-{args.steps}, loss {loss:.4f}, "
              f"val_accuracy {val['accuracy']:.3f}")


if __name__ == "__main__":
    main()
