"""Tasks, their losses and metrics; your own HDF5 files indexed in place or copied; the
chunk-aware sample order (serial)."""
import json
import os

import h5py
import numpy as np
import pytest
from mpi4py import MPI

from mpitrain.data.checks import check_dataset
from mpitrain.data.index import index_files
from mpitrain.data.manifest import read_manifest
from mpitrain.data.prepare import from_hdf5
from mpitrain.data.sampler import Sampler
from mpitrain.data.shards import Shards
from mpitrain.model.losses import make_loss
from mpitrain.model.tasks import Classification, Multilabel, Regression
from mpitrain.runtime import MpitrainError


@pytest.mark.parametrize("name,targets", [
    ("mse", lambda rng: rng.normal(size=(6, 3))),
    ("mae", lambda rng: rng.normal(size=(6, 3))),
    ("huber", lambda rng: 3 * rng.normal(size=(6, 3))),
    ("bce", lambda rng: rng.integers(0, 2, (6, 3)).astype(float)),
    ("ce", lambda rng: rng.integers(0, 3, 6)),
    ("mse", lambda rng: rng.integers(0, 3, 6)),  # against one-hot labels
])
def test_loss_gradients_match_finite_differences(name, targets):
    rng = np.random.default_rng(4)
    out = rng.normal(size=(6, 3))
    t = targets(rng)
    loss = make_loss(name)
    _, grad = loss(out, t, 0.5)
    numeric = np.zeros_like(out)
    eps = 1e-6
    for i in np.ndindex(out.shape):
        up, down = out.copy(), out.copy()
        up[i] += eps
        down[i] -= eps
        numeric[i] = 0.5 * (loss(up, t, 1)[0] - loss(down, t, 1)[0]) / (2 * eps)
    np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-8)


def test_bce_is_stable_for_large_logits():
    loss, grad = make_loss("bce")(np.array([[800.0, -800.0]]), np.array([[0.0, 1.0]]), 1.0)
    assert np.isfinite(loss) and loss == pytest.approx(800.0)
    assert np.isfinite(grad).all()


def test_regression_metrics_are_in_the_targets_units_and_exact_from_sums():
    rng = np.random.default_rng(1)
    y = rng.normal(50, 10, size=(40, 2))
    task = Regression([2], mean=y.mean(axis=0), std=y.std(axis=0))
    pred = y + rng.normal(0, 2, size=y.shape)
    out = (pred - task.mean) / task.std  # what the network would output
    # Sums of two halves, added, give the metrics of the whole (as ranks add them).
    sums = task.sums(out[:15], y[:15]) + task.sums(out[15:], y[15:])
    got = task.summarize(sums, 40)
    e = pred - y
    r2 = 1 - (e ** 2).sum(axis=0) / ((y - y.mean(axis=0)) ** 2).sum(axis=0)
    np.testing.assert_allclose(got["rmse_per_output"], np.sqrt((e ** 2).mean(axis=0)))
    np.testing.assert_allclose(got["mae_per_output"], np.abs(e).mean(axis=0))
    np.testing.assert_allclose(got["r2_per_output"], r2)
    assert got["r2"] == pytest.approx(r2.mean())
    np.testing.assert_allclose(task.predict(out)["value"], pred)


def test_multilabel_metrics():
    t = np.array([[1, 0, 1], [0, 0, 1], [1, 1, 0], [0, 1, 1]])
    logits = np.array([[2., -1, 3], [1, -2, 2], [-1, 1, -1], [-2, -1, 1]])  # p = z > 0
    got = Multilabel([3]).summarize(Multilabel([3]).sums(logits, t), 4)
    p = logits > 0
    f1 = [2 * (p[:, j] & (t[:, j] == 1)).sum() / (p[:, j].sum() + t[:, j].sum())
          for j in range(3)]
    np.testing.assert_allclose(got["f1_per_label"], f1)
    np.testing.assert_allclose(got["accuracy_per_label"], (p == (t == 1)).mean(axis=0))
    assert Classification(3).summarize(Classification(3).sums(logits, np.array([2, 2, 1, 2])),
                                       4) == {"accuracy": 1.0}


def user_file(path, n=700, chunk=64, task="regression", seed=0):
    """An HDF5 file of one's own: /inputs/features (n, 2, 3), chunked and gzip'd, and
    targets under /targets."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 2, 3)).astype(np.float32)
    if task == "regression":
        y = np.stack([x.reshape(n, -1).sum(axis=1) * 5 + 20, x[:, 0, 0] * 2], axis=1)
    elif task == "multilabel":
        y = (x.reshape(n, -1)[:, :4] > 0).astype(np.uint8)
    else:
        y = (x.reshape(n, -1)[:, 0] > 0).astype(np.int64) + (x.reshape(n, -1)[:, 1] > 0)
    with h5py.File(path, "w") as f:
        f.create_dataset("inputs/features", data=x, chunks=(chunk, 2, 3), compression="gzip",
                         shuffle=True)
        f.create_dataset("targets", data=y, chunks=(chunk, *y.shape[1:]), compression="gzip")
    return x, y


def test_index_in_place_reads_the_files_own_datasets(tmp_path):
    x, y = user_file(tmp_path / "a.h5")
    x2, y2 = user_file(tmp_path / "b.h5", n=300, seed=1)
    before = {p: os.path.getmtime(p) for p in (tmp_path / "a.h5", tmp_path / "b.h5")}
    m = index_files([tmp_path / "a.h5", tmp_path / "b.h5"], "/inputs/features", "targets",
                    str(tmp_path), val_fraction=0.25, seed=3)
    assert m.task["name"] == "regression" and m.features == (2, 3)
    assert sorted(os.listdir(tmp_path)) == ["a.h5", "b.h5", "manifest.json"]  # nothing copied
    assert {p: os.path.getmtime(p) for p in before} == before
    meta = json.loads((tmp_path / "manifest.json").read_text())
    entry = meta["splits"]["train"][0]
    assert entry["file"] == "a.h5" and entry["x"] == "/inputs/features"
    assert m.rows("train") + m.rows("val") == 1000 and 200 <= m.rows("val") <= 300
    # Standardised from the training split: its mean and std, per output.
    train_rows = np.concatenate([y[lo:hi] for lo, hi in m.splits["train"][0].ranges]
                                + [y2[lo:hi] for lo, hi in m.splits["train"][1].ranges])
    np.testing.assert_allclose(m.task["mean"], train_rows.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(m.task["std"], train_rows.std(axis=0), rtol=1e-6)
    check_dataset(read_manifest(str(tmp_path)), MPI.COMM_SELF)
    s = Shards(read_manifest(str(tmp_path)), "val")
    ids = np.random.default_rng(0).permutation(len(s))
    got_x, got_y = s.read(ids)
    rows = [(k, r) for k, e in enumerate(m.splits["val"]) for lo, hi in e.ranges
            for r in range(lo, hi)]
    xs, ys = (x, x2), (y, y2)
    want_x = np.stack([xs[k][r] for k, r in rows])[ids]  # each sample in its shape
    want_y = np.stack([ys[k][r] for k, r in rows])[ids]
    np.testing.assert_array_equal(got_x, want_x)
    np.testing.assert_allclose(got_y, want_y)
    s.close()


def test_index_refuses_files_outside_the_dataset_directory(tmp_path):
    user_file(tmp_path / "a.h5")
    (tmp_path / "ds").mkdir()
    with pytest.raises(MpitrainError, match=r"a.h5 lies outside out .*/ds: a dataset reads "
                                            r"only files inside its directory"):
        index_files([tmp_path / "a.h5"], "/inputs/features", "targets", str(tmp_path / "ds"))
    index_files([tmp_path / "a.h5"], "/inputs/features", "targets")  # their directory
    with pytest.raises(MpitrainError, match="manifest.json already exists"):
        index_files([tmp_path / "a.h5"], "/inputs/features", "targets")


@pytest.mark.parametrize("task,spoil,message", [
    ("regression", lambda y: y.__setitem__((5, 1), np.nan), "NaN or inf in the targets at row 5"),
    ("multilabel", lambda y: y.__setitem__((7, 2), 2), "a value other than 0 or 1 in the "
                                                       "targets at row 7"),
    ("classification", lambda y: y.__setitem__(3, -1), "negative label -1 at row 3"),
])
def test_bad_targets_are_refused_with_their_row(tmp_path, task, spoil, message):
    _, y = user_file(tmp_path / "a.h5", task=task)
    y = y.astype(np.float32) if task == "regression" else y.copy()
    spoil(y)
    with h5py.File(tmp_path / "a.h5", "r+") as f:
        del f["targets"]
        f["targets"] = y
    with pytest.raises(MpitrainError, match=message):
        index_files([tmp_path / "a.h5"], "/inputs/features", "targets", task=task)


def test_files_that_disagree_are_refused(tmp_path):
    user_file(tmp_path / "a.h5")
    with h5py.File(tmp_path / "b.h5", "w") as f:
        f["inputs/features"] = np.zeros((5, 3, 2), np.float32)
        f["targets"] = np.zeros((5, 2))
    with pytest.raises(MpitrainError, match=r"b.h5: feature shape \(3, 2\) differs from .*a.h5's "
                                            r"\(2, 3\)"):
        index_files([tmp_path / "a.h5", tmp_path / "b.h5"], "/inputs/features", "targets")


def test_prepare_copies_an_hdf5_file_into_shards_streaming(tmp_path):
    x, y = user_file(tmp_path / "a.h5", task="multilabel")
    m = from_hdf5(str(tmp_path / "a.h5"), str(tmp_path / "ds"), shards=3, val_fraction=0.2,
                  x_key="/inputs/features", y_key="targets", task="multilabel")
    assert m.task == {"name": "multilabel", "shape": [4]} and m.features == (2, 3)
    got = [Shards(read_manifest(str(tmp_path / "ds")), s) for s in ("train", "val")]
    xs = np.concatenate([g.read_range(0, len(g))[0] for g in got])
    ys = np.concatenate([g.read_range(0, len(g))[1] for g in got])
    assert len(xs) == 700 and 100 <= len(got[1]) <= 180
    assert xs.shape[1:] == (2, 3)  # each sample in its shape, not flattened
    # The two splits are the input, each row once.
    key = np.lexsort(x.reshape(700, -1).T)
    mine = np.lexsort(xs.reshape(700, -1).T)
    np.testing.assert_array_equal(xs[mine], x[key])
    np.testing.assert_array_equal(ys[mine], y[key])
    for g in got:
        g.close()


def test_the_chunk_aware_order_is_pure_covers_each_sample_once_and_stays_local():
    blocks = [64] * 30 + [10]  # 1,930 ids in chunks of 64
    n, batch = sum(blocks), 48
    a = Sampler(n, batch, seed=5, blocks=blocks, window=6)
    b = Sampler(n, batch, seed=5, blocks=blocks, window=6)
    for epoch in range(2):
        steps = range(epoch * a.steps_per_epoch, (epoch + 1) * a.steps_per_epoch)
        ids = np.concatenate([a.batch(k) for k in steps])
        np.testing.assert_array_equal(np.sort(ids), np.arange(n))  # each sample once
        for k in steps:
            np.testing.assert_array_equal(a.batch(k), b.batch(k))  # a pure function
            assert np.all(np.diff(a.batch(k)) > 0)  # sorted within the batch
    assert not np.array_equal(a.order(0), a.order(1))
    # A rank's part of a batch falls in few chunks: at 4 ranks, each reads about a quarter
    # of the chunks of its window, not all of them.
    chunk_of = np.repeat(np.arange(len(blocks)), blocks)
    touched = []
    for k in range(a.steps_per_epoch - 1):
        parts = [a.local(k, r, 4)[0] for r in range(4)]
        touched += [len(np.unique(chunk_of[p])) for p in parts]
    assert max(touched) <= 4 and np.mean(touched) < 3, touched  # of the window's 6
    # The same global batches whatever the rank count: the parts put together are the batch.
    for size in (1, 3, 4):
        np.testing.assert_array_equal(
            np.concatenate([a.local(7, r, size)[0] for r in range(size)]), a.batch(7))
    assert a.meta()["shuffle"] == "chunks" and "blocks" in a.meta()
    assert "shuffle" not in Sampler(n, batch, seed=5).meta()  # global: as it always was
