"""Dataset format, checks, row reader and sampler (serial)."""
import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
from mpi4py import MPI

import damage
from mpitrain.balance import rank_slice
from mpitrain.data.checks import check_dataset
from mpitrain.data.manifest import read_manifest
from mpitrain.data.sampler import Sampler
from mpitrain.data.shards import Shards
from mpitrain.data.prepare import from_npz, synthetic, synthetic_rows
from mpitrain.runtime import MpitrainError


def read_all(root, split):
    s = Shards(read_manifest(root), split)
    try:
        return s.read_range(0, len(s))
    finally:
        s.close()


def test_npz_round_trip_with_validation_split(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(103, 2, 3)).astype(np.float32)
    y = rng.integers(0, 5, 103)
    np.savez(tmp_path / "in.npz", x=x, y=y)
    m = from_npz(str(tmp_path / "in.npz"), str(tmp_path / "ds"), shards=4, val_fraction=0.2)
    assert m.features == (2, 3) and m.classes == 5 and m.dtype == np.float32
    assert m.rows("train") == 82 and m.rows("val") == 21
    assert [e.rows for e in m.splits["train"]] == [20, 21, 20, 21]
    xt, yt = read_all(str(tmp_path / "ds"), "train")
    xv, yv = read_all(str(tmp_path / "ds"), "val")
    # The two splits together are the input, each sample once.
    got = np.concatenate([xt, xv]).reshape(103, -1)
    order = np.lexsort(got.T[::-1])
    ref = x.reshape(103, -1)
    np.testing.assert_array_equal(got[order], ref[np.lexsort(ref.T[::-1])])
    np.testing.assert_array_equal(np.sort(np.concatenate([yt, yv])), np.sort(y))


def test_prepare_never_overwrites(tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(MpitrainError, match="already exists and is not empty"):
        synthetic(str(out), 100, 4, 2)
    assert os.listdir(out) == ["precious.txt"]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]


def test_npz_errors(tmp_path):
    np.savez(tmp_path / "a.npz", x=np.zeros((4, 2)), labels=np.zeros(4, int))
    with pytest.raises(MpitrainError, match=r"a.npz: missing array 'y' \(has \['labels', 'x'\]\)"):
        from_npz(str(tmp_path / "a.npz"), str(tmp_path / "o"), 1)
    np.savez(tmp_path / "b.npz", x=np.full((4, 2), np.inf), y=np.zeros(4, int))
    with pytest.raises(MpitrainError, match="b.npz: NaN or inf in 'x' at row 0"):
        from_npz(str(tmp_path / "b.npz"), str(tmp_path / "o"), 1)
    np.savez(tmp_path / "c.npz", x=np.zeros((4, 2)), y=np.zeros(3, int))
    with pytest.raises(MpitrainError, match="c.npz: 'x' has 4 samples, 'y' has 3"):
        from_npz(str(tmp_path / "c.npz"), str(tmp_path / "o"), 1)
    assert not (tmp_path / "o").exists()


def test_synthetic_is_deterministic_and_independent_of_sharding(tmp_path):
    synthetic(str(tmp_path / "one"), 9000, 5, 3, seed=4, shards=1, val_fraction=0.1)
    synthetic(str(tmp_path / "five"), 9000, 5, 3, seed=4, shards=5, val_fraction=0.1)
    for split in ("train", "val"):
        a, b = read_all(str(tmp_path / "one"), split), read_all(str(tmp_path / "five"), split)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
    x, y = synthetic_rows(9000, 5, 3, seed=5)(0, 100)
    assert not np.array_equal(x, read_all(str(tmp_path / "one"), "train")[0][:100])
    assert set(np.unique(read_all(str(tmp_path / "one"), "train")[1])) == {0, 1, 2}


def test_reader_returns_the_rows_asked_for_in_their_order(small_data):
    xs, ys = read_all(small_data, "train")
    s = Shards(read_manifest(small_data), "train")
    ids = np.random.default_rng(1).permutation(len(s))[:97]
    x, y = s.read(ids)
    np.testing.assert_array_equal(x, xs[ids])
    np.testing.assert_array_equal(y, ys[ids])
    x, y = s.read(np.array([], np.int64))
    assert x.shape == (0, 12) and y.shape == (0,)
    s64 = Shards(read_manifest(small_data), "train", "float64")
    assert s64.read(ids[:3])[0].dtype == np.float64
    s.close()
    s64.close()


def test_chunked_shards_are_read_by_chunk_each_decompressed_once(data_copy):
    """A chunked, compressed shard (not memory-mappable) reads the same rows, each chunk
    read and decompressed once while it stays in the cache."""
    ref = read_all(data_copy, "train")
    path = os.path.join(data_copy, damage.SHARD)
    with h5py.File(path, "r") as f:
        x, y = f["x"][()], f["y"][()]
    os.remove(path)
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=x, chunks=(7, 12), compression="gzip")
        f.create_dataset("y", data=y, chunks=(7,))
    s = Shards(read_manifest(data_copy), "train")
    ids = np.random.default_rng(2).permutation(len(s))
    got = s.read(ids)
    assert s._columns(1)[0].view is None and s._columns(1)[0].chunk_rows == 7
    assert isinstance(s._columns(0)[0].view, np.memmap)
    np.testing.assert_array_equal(got[0], ref[0][ids])
    np.testing.assert_array_equal(got[1], ref[1][ids])
    reads = s.cache.reads
    assert reads == 2 * -(-180 // 7)  # x and y, every chunk once
    s.read(ids[::-1])
    assert s.cache.reads == reads  # all cached
    s.close()
    small = Shards(read_manifest(data_copy), "train", cache_bytes=7 * 12 * 4)  # one chunk
    got = small.read(ids)
    np.testing.assert_array_equal(got[0], ref[0][ids])
    assert small.cache.held <= 7 * 12 * 4 * 2
    small.close()


def test_shards_open_while_another_process_holds_a_write_lock(data_copy):
    """Shards are opened without HDF5 file locking, so a writer's lock does not block them."""
    path = os.path.join(data_copy, "val-00000-of-00003.h5")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import h5py, sys; f = h5py.File(sys.argv[1], 'r+', locking=True);"
         " print('locked', flush=True); sys.stdin.read()", path],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OSError):  # a locking reader is refused...
            h5py.File(path, "r", locking=True).close()
        s = Shards(read_manifest(data_copy), "val")  # ...ours is not
        assert len(s.read_range(0, 5)[0]) == 5
        s.close()
    finally:
        holder.communicate("", timeout=30)


@pytest.mark.parametrize("n,batch", [(10, 3), (12, 4), (7, 7), (100, 32)])
def test_each_epoch_uses_every_sample_exactly_once(n, batch):
    sampler = Sampler(n, batch, seed=3)
    for epoch in range(3):
        steps = range(epoch * sampler.steps_per_epoch, (epoch + 1) * sampler.steps_per_epoch)
        ids = np.concatenate([sampler.batch(k) for k in steps])
        np.testing.assert_array_equal(np.sort(ids), np.arange(n))
        assert all(len(sampler.batch(k)) == batch for k in steps[:-1])
    assert not np.array_equal(sampler.order(0), sampler.order(1))
    np.testing.assert_array_equal(Sampler(n, batch, seed=3).order(2), sampler.order(2))


def test_drop_last_skips_the_short_batch():
    sampler = Sampler(10, 3, seed=0, drop_last=True)
    assert sampler.steps_per_epoch == 3
    ids = np.concatenate([sampler.batch(k) for k in range(3)])
    assert len(ids) == 9 and len(np.unique(ids)) == 9
    assert sampler.locate(3) == (1, 0)


@pytest.mark.parametrize("size", [1, 2, 3, 4, 7])
def test_rank_parts_reassemble_the_global_batch(size):
    sampler = Sampler(50, 8, seed=9)
    for step in range(2 * sampler.steps_per_epoch):
        parts = [sampler.local(step, r, size) for r in range(size)]
        assert {b for _, b in parts} == {len(sampler.batch(step))}
        np.testing.assert_array_equal(np.concatenate([p for p, _ in parts]), sampler.batch(step))
        assert max(len(p) for p, _ in parts) - min(len(p) for p, _ in parts) <= 1


def test_rank_slice_covers_exactly():
    for count in range(0, 20):
        for size in range(1, 6):
            parts = [rank_slice(count, r, size) for r in range(size)]
            assert parts[0][0] == 0 and parts[-1][1] == count
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))


@pytest.mark.parametrize("damage_fn", damage.ALL, ids=lambda f: f.__name__)
def test_bad_dataset_is_refused_with_file_and_problem(data_copy, damage_fn):
    expected = damage_fn(data_copy)
    with pytest.raises(MpitrainError) as info:
        check_dataset(read_manifest(data_copy), MPI.COMM_SELF)
    assert expected in str(info.value)
    assert info.value.everywhere or damage_fn is damage.missing_manifest


def test_structure_only_check_skips_values(data_copy):
    damage.nan_feature(data_copy)
    check_dataset(read_manifest(data_copy), MPI.COMM_SELF, full=False)  # no error
    with pytest.raises(MpitrainError, match="NaN or inf"):
        check_dataset(read_manifest(data_copy), MPI.COMM_SELF, full=True)


def test_manifest_errors(data_copy):
    path = os.path.join(data_copy, "manifest.json")
    with open(path) as f:
        meta = json.load(f)
    for key, value, message in [
        ("task", {"name": "classification", "classes": 1},
         "task.classes should be an integer >= 2, got 1"),
        ("task", {"name": "clustering"}, "key 'task' should be an object with a name among"),
        ("features", [], "key 'features' should be a list of positive integers"),
        ("dtype", "complex64", "key 'dtype' should be a numeric type such as 'float32', "
                               "got 'complex64'"),
        ("version", 99, "format version 99 is newer than this mpitrain reads"),
    ]:
        with open(path, "w") as f:
            json.dump({**meta, key: value}, f)
        with pytest.raises(MpitrainError, match=message):
            read_manifest(data_copy)
    with open(path, "w") as f:
        f.write("{not json")
    with pytest.raises(MpitrainError, match="manifest.json: unreadable"):
        read_manifest(data_copy)
    with pytest.raises(MpitrainError, match="no such dataset directory"):
        read_manifest(data_copy + "-nope")


def test_prefetcher_reads_ahead_in_order_and_refuses_other_steps(small_data):
    from mpitrain.data.prefetch import Prefetcher

    s = Shards(read_manifest(small_data), "train")
    sampler = Sampler(len(s), 50, seed=1)
    pre = Prefetcher(s, sampler, rank=1, size=3, start=4, stop=8)
    for step in range(4, 8):
        got_ids, x, y, batch = pre.get(step)
        ids, expect_batch = sampler.local(step, 1, 3)
        np.testing.assert_array_equal(got_ids, ids)
        np.testing.assert_array_equal(x, s.read(ids)[0])
        assert batch == expect_batch
    with pytest.raises(RuntimeError, match="asked for step 8; it reads steps in order"):
        pre.get(8)
    pre.close()
    s.close()


def test_prefetcher_reads_in_bursts_within_its_depth_and_stops_on_close(small_data):
    from mpitrain.data.prefetch import Prefetcher

    s = Shards(read_manifest(small_data), "train")
    sampler = Sampler(len(s), 8, seed=3)
    reads = []
    read = s.read
    s.read = lambda ids: (reads.append(len(ids)), read(ids))[1]
    pre = Prefetcher(s, sampler, rank=0, size=1, start=0, stop=1000, depth=4)
    assert pre.depth == 4
    for step in range(9):
        _, x, _, _ = pre.get(step)
        np.testing.assert_array_equal(x, read(sampler.local(step, 0, 1)[0])[0])
        with pre._cv:  # never more than depth batches read ahead
            assert len(pre._ready) <= 4
    pre.close()
    assert not pre._thread.is_alive()
    assert 9 <= len(reads) <= 9 + 4  # read on demand, not all 1000 steps
    # The default depth keeps the read-ahead within max_bytes (at least 2 batches).
    assert Prefetcher(s, sampler, 0, 1, 0, 0).depth == 8
    assert Prefetcher(s, Sampler(len(s), 64, seed=3), 0, 1, 0, 0,
                      max_bytes=3 * 64 * 4 * s.features[0]).depth == 3
    s.close()


def test_prefetcher_raises_a_reader_error_at_its_step(small_data):
    from mpitrain.data.prefetch import Prefetcher

    s = Shards(read_manifest(small_data), "train")
    sampler = Sampler(len(s), 8, seed=3)
    read = s.read
    s.read = lambda ids: (_ for _ in ()).throw(OSError("disk gone")) if 5 in ids else read(ids)
    bad = next(k for k in range(100) if 5 in sampler.local(k, 0, 1)[0])
    pre = Prefetcher(s, sampler, rank=0, size=1, start=0, stop=bad + 3, depth=4)
    for step in range(bad):
        pre.get(step)
    with pytest.raises(OSError, match="disk gone"):
        pre.get(bad)
    pre.close()
    s.close()
