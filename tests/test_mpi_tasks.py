"""Regression and multilabel training, exact metrics and predictions under mpiexec, from the
user's own chunked gzip file indexed in place (pytest-mpi, run by tests/test_mpi_suite.py)."""
import os

import h5py
import numpy as np
import pytest
from mpi4py import MPI

from conftest import agree
from mpitrain.config import Config
from mpitrain.run.build import build

pytestmark = [pytest.mark.mpi(min_size=2), pytest.mark.timeout(180)]

COMM = MPI.COMM_WORLD


@pytest.fixture(scope="module", params=["regression", "multilabel"])
def indexed(request, tmp_path_factory):
    """A chunked, gzip'd file of one's own, indexed in place (by rank 0)."""
    task = request.param
    root = None
    if COMM.rank == 0:
        from mpitrain.data.index import index_files
        from test_tasks import user_file

        root = tmp_path_factory.mktemp(task)
        user_file(root / "mine.h5", n=900, chunk=50, task=task)
        index_files([root / "mine.h5"], "/inputs/features", "targets", str(root),
                    val_fraction=0.2, task=task)
        root = str(root)
    return task, COMM.bcast(root, root=0)


def cfg(root, **kw):
    return Config(**{**dict(data=root, hidden=[16], batch_size=40, dtype="float64", seed=3,
                            optimizer="adam", lr=0.01), **kw})


def test_training_on_n_ranks_equals_one_process_with_exact_metrics(indexed):
    task, root = indexed
    world, _ = build(cfg(root), COMM)
    single, _ = build(cfg(root), MPI.COMM_SELF)
    assert world.task.name == task and type(world.loss).__name__ == (
        "MSELoss" if task == "regression" else "BinaryCrossEntropy")
    assert world.sampler.meta()["shuffle"] == "chunks"  # chunked data: chunk-aware order
    for k in range(30):
        a, ma, _ = world.step(k)
        b, mb, _ = single.step(k)
    agree(COMM, np.allclose(a, b, rtol=1e-10) and ma.keys() == mb.keys(), "losses match")
    agree(COMM, np.allclose(world.model.params, single.model.params, rtol=1e-9, atol=1e-12),
          "parameters match 1 process")
    va, vb = world.evaluate(), single.evaluate()
    keys = [k for k in va if isinstance(va[k], float)]
    agree(COMM, va.keys() == vb.keys() and np.allclose([va[k] for k in keys],
                                                       [vb[k] for k in keys], rtol=1e-9),
          f"validation metrics match 1 process: {va}")
    headline = "rmse" if task == "regression" else "f1"
    agree(COMM, headline in va and np.isfinite(va[headline]), "the task's metric")
    for t in (world, single):
        t.close()
        t.close_data()


def test_predictions_cover_every_row_in_input_order(indexed, tmp_path_factory):
    from mpitrain.run.predict import load_model, predict

    task, root = indexed
    trainer, _ = build(cfg(root), COMM)
    for k in range(10):
        trainer.step(k)
    out = COMM.bcast(str(tmp_path_factory.mktemp("pred")) if COMM.rank == 0 else None, 0)
    state = trainer.capture(10, cfg(root).to_dict())
    path = None
    if COMM.rank == 0:
        from mpitrain.fault import checkpoint

        path, _ = checkpoint.save(out, state)
    path = COMM.bcast(path, root=0)
    trainer.close()
    trainer.close_data()
    pred = os.path.join(out, "pred.h5")
    got = predict(path, os.path.join(root, "mine.h5"), pred, COMM, x_key="/inputs/features")
    agree(COMM, got["rows"] == 900, "every row")
    if COMM.rank == 0:
        model = load_model(path)
        with h5py.File(os.path.join(root, "mine.h5")) as f, h5py.File(pred) as p:
            x = f["inputs/features"][()]
            key = "value" if task == "regression" else "probabilities"
            ok = np.allclose(p[key][()], model(x), rtol=1e-12) and len(p[key]) == 900
    else:
        ok = True
    agree(COMM, ok, "predictions in input order, as load_model gives them")
    from mpitrain.runtime import MpitrainError

    try:
        predict(path, root, pred, COMM)
        refused = False
    except MpitrainError as exc:
        refused = "already exists" in str(exc) and exc.everywhere
    agree(COMM, refused, "an existing output is never overwritten")
