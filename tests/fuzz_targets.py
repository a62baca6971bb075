"""The fuzz targets (hypothesis): random and mutated manifests, shards and checkpoints fed
to the readers.  Every input is read correctly or refused with mpitrain's error type:
never another exception, never a read outside the dataset directory.

``tests/test_fuzz.py`` runs each target in a process of its own, bounded in time (so a
hang fails, and a file that damages HDF5's state cannot affect another target).
``MPITRAIN_FUZZ_EXAMPLES=N`` runs N examples per target instead of the CI's default, with
fresh random seeds (CI runs a fixed, derandomised set on fixed inputs, so it cannot flake).
"""
import json
import os
import shutil
import sys

import h5py
import numpy as np
import pytest
from mpi4py import MPI

hypothesis = pytest.importorskip("hypothesis", reason="the fuzz tests need hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import mpitrain.data.checks as checks  # noqa: E402
import mpitrain.data.shards as shards  # noqa: E402
from mpitrain.data.checks import check_dataset  # noqa: E402
from mpitrain.data.manifest import read_manifest  # noqa: E402
from mpitrain.data.prepare import synthetic  # noqa: E402
from mpitrain.data.shards import Shards  # noqa: E402
from mpitrain.fault import checkpoint  # noqa: E402
from mpitrain.runtime import MpitrainError  # noqa: E402

EXAMPLES = int(os.environ.get("MPITRAIN_FUZZ_EXAMPLES", "0"))
FUZZ = settings(max_examples=EXAMPLES or 500, deadline=None, derandomize=not EXAMPLES,
                suppress_health_check=list(HealthCheck), database=None)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 40, 2 ** 40) | st.floats(allow_nan=True)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                              max_size=4),
    max_leaves=12)


class Watch:
    """Records every file opened (Python's open and os.open, h5py.File), to show that
    nothing outside the dataset directory is read."""

    def __init__(self, monkeypatch):
        self.paths = []
        sys.addaudithook(self._hook)
        real = checks.open_h5

        def opened(path):
            self.paths.append(os.path.realpath(path))
            return real(path)

        monkeypatch.setattr(checks, "open_h5", opened)
        monkeypatch.setattr(shards, "open_h5", opened)
        self.on = False

    def _hook(self, event, args):
        if self.on and event == "open" and isinstance(args[0], (str, bytes)):
            self.paths.append(os.path.realpath(os.fsdecode(args[0])))

    def outside(self, root):
        top = os.path.realpath(root)
        code = (sys.prefix, sys.base_prefix, "/usr", "/lib", "/proc", "/sys", "/dev")
        return [p for p in self.paths  # Python's own imports aside
                if os.path.commonpath([top, p]) != top and not p.startswith(code)
                and not p.endswith((".py", ".pyc", ".so"))]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz") / "ds"
    synthetic(str(root), samples=60, features=4, classes=3, seed=2, shards=2, val_fraction=0.2)
    return str(root)


@pytest.fixture
def watch(monkeypatch):
    w = Watch(monkeypatch)
    yield w
    w.on = False


def attempt(root, watch):
    """Read the dataset as training would; True if it read, False if it was refused."""
    watch.paths.clear()
    watch.on = True
    try:
        m = read_manifest(root)
        check_dataset(m, MPI.COMM_SELF, full=True)
        for split in m.splits:
            s = Shards(m, split)
            try:
                x, y = s.read(np.arange(len(s))[::-1])
                assert x.shape == (len(s), int(np.prod(m.features)))
                assert np.isfinite(x).all() and ((y >= 0) & (y < m.classes)).all()
            finally:
                s.close()
        return True
    except MpitrainError:
        return False
    finally:
        watch.on = False
        assert watch.outside(root) == [], watch.outside(root)


def copy(pristine, tmp_path, name):
    dst = tmp_path / name
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(pristine, dst)
    return str(dst)


@FUZZ
@given(value=json_values)
def test_random_json_as_a_manifest(pristine, tmp_path_factory, watch, value):
    root = copy(pristine, tmp_path_factory.getbasetemp(), "json")
    with open(os.path.join(root, "manifest.json"), "w") as f:
        json.dump(value, f)
    assert attempt(root, watch) is False


PATHS = st.sampled_from(["/etc/passwd", "../ds/train-00000-of-00002.h5", "..", ".", "",
                         "train-00000-of-00002.h5/..", "val-00000-of-00002.h5",
                         "sub/../train-00001-of-00002.h5", "\x00", "manifest.json",
                         "train-00001-of-00002.h5", "link-out.h5", "nope.h5"])


@FUZZ
@given(data=st.data())
def test_mutated_manifests(pristine, tmp_path_factory, watch, data):
    root = copy(pristine, tmp_path_factory.getbasetemp(), "mutated")
    os.symlink("/etc/hostname", os.path.join(root, "link-out.h5"))
    with open(os.path.join(root, "manifest.json")) as f:
        meta = json.load(f)
    for _ in range(data.draw(st.integers(1, 3))):
        where = data.draw(st.sampled_from(["top", "shard", "file", "rows", "split"]))
        if where == "top":
            key = data.draw(st.sampled_from(sorted(meta) + ["extra"]))
            if data.draw(st.booleans()):
                meta.pop(key, None)
            else:
                meta[key] = data.draw(json_values)
        elif where == "split":
            if isinstance(meta.get("splits"), dict):
                meta["splits"][data.draw(st.sampled_from(["train", "val", "x"]))] = \
                    data.draw(json_values)
        else:
            splits = meta.get("splits")
            shards_ = splits.get("train") if isinstance(splits, dict) else None
            if isinstance(shards_, list) and shards_ and isinstance(shards_[0], dict):
                if where == "file":
                    shards_[0]["file"] = data.draw(PATHS)
                elif where == "rows":
                    shards_[0]["rows"] = data.draw(st.integers(-3, 100) | json_values)
                else:
                    shards_[0] = data.draw(json_values)
    with open(os.path.join(root, "manifest.json"), "w") as f:
        json.dump(meta, f)
    attempt(root, watch)  # read, or refused: anything else fails the test


@FUZZ
@given(data=st.data())
def test_mutated_shard_bytes(pristine, tmp_path_factory, watch, data):
    root = copy(pristine, tmp_path_factory.getbasetemp(), "bytes")
    path = os.path.join(root, "train-00000-of-00002.h5")
    blob = bytearray(open(path, "rb").read())
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, len(blob) - 1))
        blob[i] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        blob = blob[:data.draw(st.integers(0, len(blob)))]
    open(path, "wb").write(bytes(blob))
    if attempt(root, watch):  # what it read is what h5py reads from the same bytes
        s = Shards(read_manifest(root), "train")
        try:
            got, _ = s.read(np.arange(s.offsets[1]))
        finally:
            s.close()
        with h5py.File(path, "r") as f:
            np.testing.assert_array_equal(got, f["x"][()].reshape(len(got), -1))


STRUCTURES = ["external link", "soft link", "soft link to an external link", "virtual",
              "group", "scalar", "strings", "ints", "external storage", "chunked", "compact"]


@FUZZ
@given(kind=st.sampled_from(STRUCTURES), which=st.sampled_from(["x", "y"]))
def test_shard_structures(pristine, tmp_path_factory, watch, kind, which):
    base = tmp_path_factory.getbasetemp()
    root = copy(pristine, base, "structure")
    canary = str(base / "canary.h5")  # outside the dataset: must never be read
    path = os.path.join(root, "train-00000-of-00002.h5")
    with h5py.File(path, "r") as f:
        arrays = {k: f[k][()] for k in ("x", "y")}
    with h5py.File(canary, "w") as g:
        g[which] = arrays[which]
    os.remove(path)
    with h5py.File(path, "w") as f:
        other = "y" if which == "x" else "x"
        f[other] = arrays[other]
        a = arrays[which]
        if kind == "external link":
            f[which] = h5py.ExternalLink(canary, "/" + which)
        elif kind == "soft link":
            f["real"] = a
            f[which] = h5py.SoftLink("/real")
        elif kind == "soft link to an external link":
            f["ext"] = h5py.ExternalLink(canary, "/" + which)
            f[which] = h5py.SoftLink("/ext")
        elif kind == "virtual":
            layout = h5py.VirtualLayout(shape=a.shape, dtype=a.dtype)
            layout[:] = h5py.VirtualSource(canary, which, shape=a.shape)
            f.create_virtual_dataset(which, layout)
        elif kind == "group":
            f.create_group(which)
        elif kind == "scalar":
            f[which] = 1.0
        elif kind == "strings":
            f[which] = np.array([b"a"] * len(a))
        elif kind == "ints":
            f[which] = a.astype(np.int16)
        elif kind == "external storage":
            raw = str(base / "raw.bin")
            a.tofile(raw)
            f.create_dataset(which, shape=a.shape, dtype=a.dtype, external=[(raw, 0, a.nbytes)])
        elif kind == "chunked":
            f.create_dataset(which, data=a, chunks=True, compression="gzip")
        else:
            dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
            dcpl.set_layout(h5py.h5d.COMPACT)
            h5py.h5d.create(f.id, which.encode(), h5py.h5t.py_create(a.dtype),
                            h5py.h5s.create_simple(a.shape), dcpl=dcpl)
            f[which][...] = a
    read = attempt(root, watch)
    expected = kind in ("soft link", "chunked", "compact") or (kind == "ints" and which == "y")
    assert read == expected, (kind, which)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A checkpoint whose bytes are the same on every run (its time stamp fixed)."""
    from test_checkpoint import make_state

    d = tmp_path_factory.mktemp("ckpt")
    path, _ = checkpoint.save(str(d), make_state())
    with h5py.File(path, "r+") as f:
        f.attrs["created"] = "2026-12-01T00:00:00+00:00"
        attrs = {k: f.attrs[k] for k in checkpoint.SCALAR_ATTRS + checkpoint.JSON_ATTRS}
        attrs = {k: (int(v) if isinstance(v, np.integer) else str(v)) for k, v in attrs.items()}
        f.attrs["meta_crc32"] = checkpoint._all_crc(attrs)
    assert checkpoint.load(path).step == 100
    return path, open(path, "rb").read()


@FUZZ
@given(data=st.data())
def test_mutated_checkpoints(saved, tmp_path_factory, data):
    path, blob = saved
    blob = bytearray(blob)
    for _ in range(data.draw(st.integers(1, 6))):
        i = data.draw(st.integers(0, len(blob) - 1))
        blob[i] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        blob = blob[:data.draw(st.integers(0, len(blob)))]
    damaged = str(tmp_path_factory.getbasetemp() / "damaged.h5")
    open(damaged, "wb").write(bytes(blob))
    if os.environ.get("MPITRAIN_FUZZ_KEEP"):  # the last input tried, to reproduce a hang
        shutil.copy(damaged, os.environ["MPITRAIN_FUZZ_KEEP"])
    try:
        state = checkpoint.load(damaged)
    except checkpoint.CheckpointError:
        return
    good = checkpoint.load(path)  # what loads is the checkpoint, bit for bit
    assert state.step == good.step and state.config == good.config
    assert all(np.array_equal(state.params[k], good.params[k]) for k in good.params)


RANGE = st.lists(st.tuples(st.integers(-2, 40), st.integers(-2, 40)), min_size=0, max_size=3)


@FUZZ
@given(data=st.data())
def test_manifests_whose_rows_may_not_add_up(pristine, tmp_path_factory, watch, data):
    """Random row ranges in random entries of both splits, over the same files: a manifest
    either is refused, or every row it lists is read once (no entry's range overlaps
    another's, in a split or across them) and its rows add up to its ranges."""
    root = copy(pristine, tmp_path_factory.getbasetemp(), "ranges")
    with open(os.path.join(root, "manifest.json")) as f:
        meta = json.load(f)
    files = sorted({e["file"] for es in meta["splits"].values() for e in es})
    for split in ("train", "val"):
        entries = []
        for _ in range(data.draw(st.integers(1, 3))):
            ranges = [sorted(r) for r in data.draw(RANGE)]
            rows = sum(b - a for a, b in ranges) + data.draw(st.sampled_from([0, 0, 0, 1]))
            entries.append({"file": data.draw(st.sampled_from(files)), "rows": rows,
                            "x": "x", "y": "y", "ranges": ranges})
        meta["splits"][split] = entries
    with open(os.path.join(root, "manifest.json"), "w") as f:
        json.dump(meta, f)
    if not attempt(root, watch):
        return
    m = read_manifest(root)
    seen = set()
    for split, entries in m.splits.items():
        for e in entries:
            assert sum(b - a for a, b in e.ranges) == e.rows
            for a, b in e.ranges:
                rows = {(e.file, r) for r in range(a, b)}
                assert not rows & seen, (split, e)
                seen |= rows


TOML_TEXT = st.text(alphabet=st.sampled_from(list("abcdefghijklmnopqrstuvwxyz_-=[]{}\"' .,0"
                                                  "123456789\n#+")), max_size=80)


@FUZZ
@given(data=st.data())
def test_random_toml_as_a_config_file(tmp_path_factory, data):
    """Random text, random bytes and random values of real keys as --config: a Config or
    mpitrain's error, never another exception."""
    from mpitrain.cli.parser import parser
    from mpitrain.config import from_sources
    from mpitrain.config.rules import types

    path = tmp_path_factory.getbasetemp() / "run.toml"
    how = data.draw(st.sampled_from(["text", "bytes", "keys"]))
    if how == "bytes":
        path.write_bytes(data.draw(st.binary(max_size=120)))
    elif how == "text":
        path.write_text(data.draw(TOML_TEXT))
    else:
        keys = data.draw(st.lists(st.sampled_from(sorted(types())), min_size=1, max_size=4))
        values = st.integers(-5, 10 ** 6) | st.floats(allow_nan=True) | st.booleans() | \
            st.text(alphabet="abcxyz:=,0123456789", max_size=12) | \
            st.lists(st.integers(-2, 20), max_size=3)
        lines = []
        for key in keys:
            value = data.draw(values)
            lines.append(f"{key} = {json.dumps(value) if not isinstance(value, float) else value}")
        path.write_text("\n".join(lines).replace("NaN", "nan").replace("Infinity", "inf"))
    args = parser().parse_args(["train", "--config", str(path)])
    try:
        from_sources(args)
    except MpitrainError:
        pass


@FUZZ
@given(data=st.data())
def test_checkpoint_values(saved, tmp_path_factory, data):
    """Random values in a checkpoint's arrays, the checksums made to match: it loads, bit
    for bit, exactly when every value is finite; else it is refused naming the array."""
    path, blob = saved
    damaged = str(tmp_path_factory.getbasetemp() / "values.h5")
    open(damaged, "wb").write(blob)
    values = st.floats(allow_nan=True, allow_infinity=True, width=32)
    with h5py.File(damaged, "r+") as f:
        names = sorted(k for k in f["params"])
        name = data.draw(st.sampled_from(names))
        ds = f["params"][name]
        arr = ds[()]
        for _ in range(data.draw(st.integers(1, 4))):
            where = tuple(data.draw(st.integers(0, n - 1)) for n in arr.shape)
            arr[where] = data.draw(values)
        ds[...] = arr
        ds.attrs["crc32"] = checkpoint.crc32(arr)
    try:
        state = checkpoint.load(damaged)
    except checkpoint.CheckpointError as exc:
        assert not np.isfinite(arr).all() and f"params/{name} holds" in str(exc)
        return
    assert np.isfinite(arr).all() and np.array_equal(state.params[name], arr)
