"""$ mpiexec -n 2 python tests/local_sgd_job.py OUT.json '{"sync_every": 3, "outer_lr": null}'

Local SGD through the API (``LocalSGDTrainer``, momentum SGD) for STEPS steps, then
on rank 0 alone a hand-written reference: every replica's own momentum steps on its
slice of each batch (its mean gradient, from the same model code), then the average
(sum, times 1/2), and with ``outer_lr`` DiLoCo's Nesterov outer step, in the same order
of operations.  Writes {"equal": bool, "max_diff": float, "losses": [...]} to OUT.json.
"""
import json
import sys

import numpy as np
from mpi4py import MPI

import mpitrain
from mpitrain.model.layers import Context
from mpitrain.model.losses import make_loss
from mpitrain.parallel.local_sgd import LocalSGDTrainer

STEPS, LR, MU = 8, 0.05, 0.9


def model() -> mpitrain.Sequential:
    return mpitrain.Sequential([mpitrain.Linear(6, 8), mpitrain.ReLU(),
                                mpitrain.Linear(8, 3)], seed=3)


def reference(trainer, h: int, outer_lr, outer_mu: float) -> np.ndarray:
    """Two replicas in this process, as local SGD defines them."""
    f32 = np.float32
    reps = [model() for _ in range(2)]
    vel = [np.zeros_like(r.params) for r in reps]
    anchor, m = reps[0].params.copy(), np.zeros_like(reps[0].params)
    loss = make_loss("ce")
    for step in range(STEPS):
        for r, rep in enumerate(reps):
            ids, _ = trainer.sampler.local(step, r, 2)
            x, y = trainer.train.read(ids)
            out, saved = rep.forward(x, Context(training=True, step=step, ids=ids, seed=0))
            _, dout = loss(out, trainer.task.targets(y, out.dtype), 1.0 / len(ids))
            rep.backward(dout, saved)
            vel[r] *= f32(MU)  # Momentum: v = mu v + g; p += v x (-lr)
            vel[r] += rep.grads
            rep.params[...] += vel[r] * f32(-LR)
        if (step + 1) % h == 0 or step + 1 == STEPS:
            avg = (reps[0].params + reps[1].params) * f32(0.5)
            v = (vel[0] + vel[1]) * f32(0.5)
            if outer_lr is not None:
                delta = anchor - avg
                m = m * f32(outer_mu) + delta
                anchor = anchor - (delta + m * f32(outer_mu)) * f32(outer_lr)
                avg = anchor.copy()
            for r, rep in enumerate(reps):
                rep.params[...] = avg
                vel[r][...] = v
    return reps[0].params


def main() -> None:
    out, options = sys.argv[1], json.loads(sys.argv[2])
    rng = np.random.default_rng(5)
    x = rng.normal(size=(90, 6)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64) + (x[:, 2] > 1)
    comm = MPI.COMM_WORLD
    trainer = LocalSGDTrainer(model(), None, mpitrain.Momentum(lr=LR, momentum=MU),
                              mpitrain.ArrayDataset(x, y), comm, batch_size=20, **options)
    trainer.ends_at(STEPS)
    losses = [trainer.step(k)[0] for k in range(STEPS)]
    got = trainer.model.params.copy()
    same = len(set(comm.allgather(got.tobytes()))) == 1
    trainer.close()
    if comm.rank == 0:
        want = reference(trainer, options["sync_every"], options.get("outer_lr"),
                         options.get("outer_momentum", 0.9))
        with open(out, "w") as f:
            json.dump({"equal": bool(np.array_equal(got, want)), "replicas_equal": same,
                       "max_diff": float(np.max(np.abs(got - want))), "losses": losses}, f)
    trainer.close_data()


if __name__ == "__main__":
    main()
