"""The training recipe under mpiexec (pytest-mpi): new layers, dropout, accumulation and
clipping, each compared with one process training the same model on the same batches.

    $ mpiexec -n 4 python -m pytest --with-mpi -m mpi tests/test_mpi_recipe.py
"""
import numpy as np
import pytest
from mpi4py import MPI

from conftest import agree
from mpitrain.config import Config
from mpitrain.run.build import build

pytestmark = [pytest.mark.mpi(min_size=2), pytest.mark.timeout(240)]

COMM = MPI.COMM_WORLD
# Three layers with parameters each (so up to three pipeline stages), dropout in both.
CNN = ("conv2d(4,3,padding=1),relu,maxpool2d(2),flatten,linear(16),gelu,dropout(0.25),"
       "linear(4)")
RESIDUAL = ("flatten,linear(16),residual(layernorm,linear(16),silu,dropout(0.3),linear(16)),"
            "tanh,linear(4)")


def cfg(data, **kw):
    base = dict(data=data, batch_size=48, dtype="float64", seed=3, optimizer="adam", lr=0.01)
    return Config(**{**base, **kw})


def run(config, comm, steps):
    trainer, _ = build(config, comm)
    out = [trainer.step(k) for k in range(steps)]
    return trainer, [loss for loss, _, _ in out], [metrics for _, metrics, _ in out]


def params_of(trainer):
    """Every parameter by name: this stage's (a pipeline's other stages hold the rest)."""
    return trainer.model.named_params()


def close_to(trainer, single, rtol=1e-9):
    ref, mine = single.model.named_params(), params_of(trainer)
    return len(mine) > 0 and all(np.allclose(mine[n], ref[n], rtol=rtol, atol=1e-12)
                                 for n in mine)


@pytest.mark.parametrize("model", [CNN, RESIDUAL], ids=["cnn", "residual"])
def test_new_layers_and_dropout_train_as_in_one_process(image_data, model):
    """Dropout draws by (seed, step, sample id, layer, unit): N ranks, each holding a part
    of every batch, drop exactly the units one process drops."""
    world, losses, _ = run(cfg(image_data, model=model), COMM, 15)
    single, reference, _ = run(cfg(image_data, model=model), MPI.COMM_SELF, 15)
    agree(COMM, np.allclose(losses, reference, rtol=1e-10), "losses match 1 process")
    agree(COMM, close_to(world, single), "parameters match 1 process")
    without, no_dropout, _ = run(cfg(image_data, model=model.replace("dropout(0.25),", "")
                                     .replace("dropout(0.3),", "")), MPI.COMM_SELF, 15)
    agree(COMM, not np.allclose(reference, no_dropout), "dropout changes the run")


@pytest.mark.parametrize("model", [CNN, RESIDUAL], ids=["cnn", "residual"])
def test_dropout_is_the_same_in_every_pipeline_layout(image_data, model):
    single, reference, _ = run(cfg(image_data, model=model), MPI.COMM_SELF, 12)
    for pp in (2, 3):
        if COMM.Get_size() % pp:
            continue
        world, losses, _ = run(cfg(image_data, model=model, pp=pp, microbatches=3), COMM, 12)
        agree(COMM, np.allclose(losses, reference, rtol=1e-10), f"pp={pp}: losses")
        agree(COMM, close_to(world, single), f"pp={pp}: parameters")
        world.close()


def test_accumulation_equals_the_whole_batch_with_a_quarter_of_the_activations(image_data):
    """Each rank's part of a 48-sample batch (24, 16 or 12 rows at 2, 3 or 4 ranks) in 4
    micro-batches: the same parameters, and the activations kept for backward of one
    micro-batch at a time, 1/4 of the whole part's."""
    whole, losses, _ = run(cfg(image_data, model=CNN), COMM, 10)
    parts, accumulated, _ = run(cfg(image_data, model=CNN, accumulate=4), COMM, 10)
    agree(COMM, np.allclose(losses, accumulated, rtol=1e-10), "losses")
    agree(COMM, close_to(parts, whole, rtol=1e-9), "parameters")
    ratio = whole.peak_activation_bytes / parts.peak_activation_bytes
    agree(COMM, ratio == pytest.approx(4, rel=0.01), f"activations fall by 4, not {ratio:.2f}")


def test_pipeline_accumulation_equals_one_process(image_data):
    pp = 2 if COMM.Get_size() % 2 == 0 else 3
    single, reference, _ = run(cfg(image_data, model=CNN), MPI.COMM_SELF, 10)
    world, losses, _ = run(cfg(image_data, model=CNN, pp=pp, microbatches=2, accumulate=2),
                           COMM, 10)
    agree(COMM, np.allclose(losses, reference, rtol=1e-10), "losses")
    agree(COMM, close_to(world, single), "parameters")
    half, _, _ = run(cfg(image_data, model=CNN, pp=pp, microbatches=2), COMM, 2)
    agree(COMM, world.peak_activation_bytes < half.peak_activation_bytes,
          "a stage holds one chunk's activations at a time")
    world.close()
    half.close()


@pytest.mark.parametrize("layout", [dict(allreduce="mpi"), dict(allreduce="ring"),
                                    dict(allreduce="shm"), dict(pp=2, microbatches=2)],
                         ids=["mpi", "ring", "shm", "pipeline"])
def test_clipping_uses_the_summed_gradient_norm_the_same_on_every_rank(image_data, layout):
    if COMM.Get_size() % layout.get("pp", 1):
        pytest.skip("the world does not split into 2 stages")
    clip = dict(clip_grad_norm=0.05)  # below the norms here: every step clips
    world, losses, metrics = run(cfg(image_data, model=CNN, **clip, **layout), COMM, 8)
    single, reference, ref_metrics = run(cfg(image_data, model=CNN, **clip), MPI.COMM_SELF, 8)
    norms = [m["grad_norm"] for m in metrics]
    agree(COMM, all(m["clipped"] for m in metrics), "every step clipped")
    agree(COMM, len(set(COMM.allgather(tuple(norms)))) == 1, "the same norm on every rank")
    agree(COMM, np.allclose(norms, [m["grad_norm"] for m in ref_metrics], rtol=1e-9),
          "the norm of the summed gradient (one process's)")
    agree(COMM, close_to(world, single), "parameters match 1 process")
    unclipped, _, _ = run(cfg(image_data, model=CNN), MPI.COMM_SELF, 8)
    agree(COMM, not close_to(unclipped, single), "clipping changed the run")
    world.close()
