"""Checkpoint files: round trip, checksums, damage, leftovers, pruning (serial)."""
import os

import h5py
import numpy as np
import pytest

from mpitrain.fault import checkpoint, store
from mpitrain.fault.checkpoint import CheckpointError, State


def make_state(step=100, seed=0):
    rng = np.random.default_rng(seed)
    params = {"0.weight": rng.normal(size=(4, 3)).astype(np.float32),
              "0.bias": rng.normal(size=4).astype(np.float32)}
    epoch, epoch_step = divmod(step, 12)  # 96 samples in batches of 8
    return State(step=step, epoch=epoch, epoch_step=epoch_step, params=params,
                 optimizer_state={"m": {k: v * 2 for k, v in params.items()},
                                  "v": {k: v * 3 for k, v in params.items()}},
                 optimizer={"name": "adam", "steps": step, "lr": 0.001},
                 config={"hidden": [4], "lr": 0.001}, layout={"world_size": 4, "pp": 1, "dp": 4},
                 sampler={"seed": 0, "batch_size": 8, "samples": 96, "drop_last": False},
                 rng={"sample_order": "default_rng([seed, epoch])"},
                 model={"spec": "linear(4)", "input_shape": [3]},
                 loop={"lr": 0.001, "best": 0.25, "best_step": 96, "bad_evals": 1})


def test_round_trip(tmp_path):
    state = make_state()
    path, nbytes = checkpoint.save(str(tmp_path), state)
    assert path == str(tmp_path / "ckpt-000000100.h5") and nbytes == os.path.getsize(path)
    got = checkpoint.load(path)
    assert got.model == state.model and got.loop == state.loop
    for name in state.params:
        np.testing.assert_array_equal(got.params[name], state.params[name])
        assert got.params[name].dtype == np.float32
        for key in ("m", "v"):
            np.testing.assert_array_equal(got.optimizer_state[key][name],
                                          state.optimizer_state[key][name])
    for key in ("step", "epoch", "epoch_step", "optimizer", "config", "layout", "sampler", "rng"):
        assert getattr(got, key) == getattr(state, key), key
    assert os.listdir(tmp_path) == ["ckpt-000000100.h5"]


def test_the_file_is_plain_hdf5_with_the_documented_schema(tmp_path):
    path, _ = checkpoint.save(str(tmp_path), make_state())
    with h5py.File(path, "r") as f:
        assert f.attrs["format"] == "mpitrain.checkpoint" and f.attrs["format_version"] == 3
        assert sorted(f["params"]) == ["0.bias", "0.weight"]
        assert sorted(f["optimizer"]) == ["m", "v"]
        seen = []
        f.visititems(lambda name, obj: seen.append(obj) if isinstance(obj, h5py.Dataset) else None)
        assert len(seen) == 6
        for ds in seen:  # numbers only: nothing to unpickle, nothing executed on load
            assert ds.dtype.kind == "f" and "crc32" in ds.attrs
        for key in ("config", "layout", "sampler", "rng", "optimizer"):
            assert isinstance(f.attrs[key], str)


def flip_byte(path, dataset, index=5):
    with h5py.File(path, "r") as f:
        offset = f[dataset].id.get_offset()
    with open(path, "r+b") as fh:
        fh.seek(offset + index)
        byte = fh.read(1)
        fh.seek(offset + index)
        fh.write(bytes([byte[0] ^ 0x10]))


def test_a_flipped_bit_is_caught(tmp_path):
    path, _ = checkpoint.save(str(tmp_path), make_state())
    flip_byte(path, "params/0.weight")
    with pytest.raises(CheckpointError, match="checksum of params/0.weight does not match"):
        checkpoint.load(path)
    state, rows = checkpoint.inspect(path)
    assert [r[0] for r in rows if not r[3]] == ["params/0.weight"]


@pytest.mark.parametrize("attr,value", [
    ("config", None), ("step", 101), ("epoch", 9), ("epoch_step", 3), ("created", "yesterday"),
    ("mpitrain_version", "9.9"), ("format_version", 1), ("layout", '{"world_size": 2}'),
    ("sampler", '{"seed": 1}'), ("optimizer", '{"name": "sgd"}'), ("rng", "{}"),
    ("task", '{"name": "regression"}'),
])
def test_every_attribute_is_covered_by_the_checksum(tmp_path, attr, value):
    path, _ = checkpoint.save(str(tmp_path), make_state())
    with h5py.File(path, "r+") as f:
        if value is None:
            value = f.attrs["config"].replace("0.001", "0.002")
        f.attrs[attr] = value
    with pytest.raises(CheckpointError, match="checksum of the metadata does not match"):
        checkpoint.load(path)
    warnings = []
    assert store.newest_valid(str(tmp_path), warnings.append) is None
    assert len(warnings) == 1 and "checksum of the metadata" in warnings[0]


@pytest.mark.parametrize("change,why", [
    (dict(optimizer={"name": "adam", "steps": 90, "lr": 0.001}),
     "its step 100 disagrees with its optimizer's 90 updates"),
    (dict(epoch=3, epoch_step=4), "its step 100 is epoch 8, step 4 of 12 per epoch, but it "
                                  "says epoch 3, step 4"),
])
def test_a_step_that_disagrees_with_its_own_state_is_damage(tmp_path, change, why):
    import dataclasses

    state = dataclasses.replace(make_state(), **change)  # written consistent checksums and all
    path, _ = checkpoint.save(str(tmp_path), state)
    with pytest.raises(CheckpointError, match=f"damaged: {why}"):
        checkpoint.load(path)
    warnings = []
    assert store.newest_valid(str(tmp_path), warnings.append) is None
    assert why in warnings[0]


def test_a_damaged_header_is_named_as_such(tmp_path):
    path, _ = checkpoint.save(str(tmp_path), make_state())
    with h5py.File(path, "r+") as f:
        del f.attrs["format"]
    with pytest.raises(CheckpointError, match="no 'format' attribute: not an mpitrain "
                                              "checkpoint, or its header is damaged"):
        checkpoint.load(path)
    with h5py.File(path, "r+") as f:
        f.attrs["format"] = "mpitrain.checkpoint"
        del f.attrs["step"]
    with pytest.raises(CheckpointError, match=r"damaged: attribute\(s\) step missing"):
        checkpoint.load(path)


def test_a_version_1_checkpoint_still_loads(tmp_path):
    """Version 1 covered the JSON attributes alone; it is read as it was written."""
    import json
    import zlib

    path, _ = checkpoint.save(str(tmp_path), make_state())
    with h5py.File(path, "r+") as f:
        f.attrs["format_version"] = 1
        for key in ("task", "model", "loop"):  # version 1 had none
            del f.attrs[key]
        texts = [str(f.attrs[k]) for k in checkpoint.JSON_OF[1]]
        f.attrs["meta_crc32"] = zlib.crc32("\n".join(texts).encode()) & 0xFFFFFFFF
    assert checkpoint.load(path).step == 100 and checkpoint.load(path).task == {}
    json.dumps(checkpoint.load(path).config)


def test_a_version_2_checkpoint_still_loads(tmp_path):
    """Version 2 had no model nor loop attributes; its checksum covers what it had."""
    import json
    import zlib

    path, _ = checkpoint.save(str(tmp_path), make_state())
    with h5py.File(path, "r+") as f:
        f.attrs["format_version"] = 2
        for key in ("model", "loop"):
            del f.attrs[key]
        attrs = {k: f.attrs[k] for k in checkpoint.SCALAR_ATTRS + checkpoint.JSON_OF[2]}
        attrs = {k: (int(v) if k in ("format_version", "step", "epoch", "epoch_step")
                     else str(v)) for k, v in attrs.items()}
        text = json.dumps(attrs, sort_keys=True)
        f.attrs["meta_crc32"] = zlib.crc32(text.encode()) & 0xFFFFFFFF
    state = checkpoint.load(path)
    assert state.step == 100 and state.model == {} and state.loop == {}
    assert state.task == make_state().task


def test_a_failed_write_is_one_line_and_leaves_the_earlier_checkpoints(tmp_path):
    """The file size limit (RLIMIT_FSIZE) makes the kernel refuse the write, as a full
    disk would: one CheckpointWriteError naming the directory and the OS error."""
    import subprocess
    import sys

    checkpoint.save(str(tmp_path), make_state(10))
    code = ("import resource, signal, sys\n"
            "sys.path.insert(0, sys.argv[2])\n"
            "from test_checkpoint import make_state\n"
            "from mpitrain.fault import checkpoint\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
            "try:\n"
            "    checkpoint.save(sys.argv[1], make_state(20))\n"
            "except checkpoint.CheckpointWriteError as exc:\n"
            "    print(exc.code, exc)\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path),
                          os.path.dirname(__file__)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == (f"74 {tmp_path}: cannot write the checkpoint of step 20: "
                                  "File too large (errno 27, EFBIG); the earlier checkpoints "
                                  "are intact")
    assert os.listdir(tmp_path) == ["ckpt-000000010.h5"]
    assert checkpoint.load(str(tmp_path / "ckpt-000000010.h5")).step == 10


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.0])
def test_a_truncated_file_is_caught(tmp_path, keep):
    path, size = checkpoint.save(str(tmp_path), make_state())
    with open(path, "r+b") as fh:
        fh.truncate(int(size * keep))
    with pytest.raises(CheckpointError, match="unreadable .*truncated or damaged"):
        checkpoint.load(path)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        checkpoint.load(str(tmp_path / "nope.h5"))
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = 1
    with pytest.raises(CheckpointError, match="not an mpitrain checkpoint"):
        checkpoint.load(str(tmp_path / "other.h5"))


def test_newest_valid_skips_damaged_files_with_a_warning(tmp_path):
    for step in (10, 20, 30):
        checkpoint.save(str(tmp_path), make_state(step))
    flip_byte(str(tmp_path / "ckpt-000000030.h5"), "optimizer/v/0.bias", 0)
    with open(tmp_path / "ckpt-000000020.h5", "r+b") as fh:
        fh.truncate(1000)
    warnings = []
    state, path = store.newest_valid(str(tmp_path), warnings.append)
    assert state.step == 10 and path.endswith("ckpt-000000010.h5")
    assert len(warnings) == 2
    assert "ckpt-000000030.h5: checksum of optimizer/v/0.bias" in warnings[0]
    assert "ckpt-000000020.h5: unreadable" in warnings[1]
    assert store.newest_valid(str(tmp_path / "empty"), warnings.append) is None


def test_an_interrupted_write_leaves_no_file_and_the_older_one_intact(tmp_path, monkeypatch):
    checkpoint.save(str(tmp_path), make_state(10))
    write = checkpoint.write_datasets

    def die(f, datasets):  # stands for a crash half-way through the file
        write(f, datasets[:len(datasets) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "write_datasets", die)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(str(tmp_path), make_state(20))
    assert os.listdir(tmp_path) == ["ckpt-000000010.h5"]
    assert checkpoint.load(str(tmp_path / "ckpt-000000010.h5")).step == 10


def dead_pid() -> int:
    """The pid of a process that has ended."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_leftovers_of_writers_that_are_gone_are_cleaned_and_nothing_else(tmp_path):
    import socket
    import subprocess
    import sys

    checkpoint.save(str(tmp_path), make_state(10))
    host, dead = socket.gethostname(), dead_pid()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        gone = [f".ckpt-000000020.h5.tmp-{host}-{dead}", f".ckpt-000000030.h5.tmp-{dead}",
                ".ckpt-000000040.h5.tmp-another-host-1"]
        writing = f".ckpt-000000050.h5.tmp-{host}-{alive.pid}"  # a live writer here
        for name in gone + [writing, "notes.txt", "ckpt-x.h5"]:
            (tmp_path / name).write_text("x")
        removed = store.clean_leftovers(str(tmp_path))
        assert sorted(removed) == sorted(str(tmp_path / n) for n in gone)
        assert sorted(os.listdir(tmp_path)) == sorted(["ckpt-000000010.h5", "ckpt-x.h5",
                                                       "notes.txt", writing])
        assert [s for s, _ in store.listing(str(tmp_path))] == [10]
    finally:
        alive.kill()
        alive.wait()


def test_prune_keeps_the_newest_and_never_the_written_one_or_later(tmp_path):
    for step in (10, 20, 30, 40, 50):
        checkpoint.save(str(tmp_path), make_state(step))
    # 50 exists from another timeline; we just wrote 30.
    removed = store.prune(str(tmp_path), keep_last=2, written_step=30)
    assert [os.path.basename(p) for p in removed] == ["ckpt-000000010.h5"]
    assert [s for s, _ in store.listing(str(tmp_path))] == [20, 30, 40, 50]
    store.prune(str(tmp_path), keep_last=1, written_step=50)
    assert [s for s, _ in store.listing(str(tmp_path))] == [50]


@pytest.mark.parametrize("damage,why", [
    (lambda f: f["optimizer/m"].pop("0.weight"), "optimizer/m/0.weight is missing"),
    (lambda f: (f["optimizer/m"].pop("0.bias"),
                f["optimizer/m"].create_dataset("0.bias", data=np.zeros(1, np.float32)),
                f["optimizer/m/0.bias"].attrs.create(
                    "crc32", checkpoint.crc32(np.zeros(1, np.float32)))),
     "optimizer/m/0.bias is float32 (1,), its parameter float32 (4,)"),
])
def test_optimizer_state_that_does_not_match_the_parameters_is_damage(tmp_path, damage, why):
    import re

    path, _ = checkpoint.save(str(tmp_path), make_state())
    with h5py.File(path, "r+") as f:
        damage(f)
    with pytest.raises(CheckpointError, match="damaged: " + re.escape(why)):
        checkpoint.load(path)
    state, rows = checkpoint.inspect(path)
    assert ("consistency", (), "check", False) in rows
