"""Reads stay in the dataset directory; a shard's data lies in the shard; the fast path reads
what h5py reads; every bad manifest or shard is one MpitrainError naming it (serial)."""
import json
import os

import h5py
import numpy as np
import pytest
from mpi4py import MPI

import damage
from mpitrain.data.checks import check_dataset
from mpitrain.data.hdf5 import dataset, mapped
from mpitrain.data.manifest import read_manifest
from mpitrain.data.shards import Shards
from mpitrain.runtime import MpitrainError

SHARD = damage.SHARD


def manifest(root):
    with open(os.path.join(root, "manifest.json")) as f:
        return json.load(f)


def write_manifest(root, meta):
    with open(os.path.join(root, "manifest.json"), "w") as f:
        json.dump(meta, f)


def refused(root, full=True):
    with pytest.raises(MpitrainError) as info:
        check_dataset(read_manifest(root), MPI.COMM_SELF, full=full)
    return str(info.value)


def test_a_manifest_that_is_not_an_object(data_copy):
    with open(os.path.join(data_copy, "manifest.json"), "w") as f:
        json.dump([1, 2], f)
    with pytest.raises(MpitrainError, match=r"manifest.json: should hold a JSON object, got a list"):
        read_manifest(data_copy)


@pytest.mark.parametrize("change,message", [
    (lambda m: m["task"].update(classes=True), "task.classes should be an integer >= 2, got True"),
    (lambda m: m["task"].update(classes="10"), "task.classes should be an integer >= 2, got '10'"),
    (lambda m: m.update(task={"name": "regression", "shape": [2], "std": [1, 0]}),
     "task.std should be a list of 2 finite numbers > 0, got [1, 0]"),
    (lambda m: m.update(targets=[]), "key 'targets' should be"),
    (lambda m: m["splits"]["train"][0].update(ranges=[[5, 2]]), "ranges should be a list of"),
    (lambda m: m["splits"]["train"][0].update(ranges=[[0, 10]]), "its ranges hold 10 rows"),
    (lambda m: m["splits"]["train"][0].update(x=""), 'splits.train[0] should be'),
    (lambda m: m.update(features=[12.0]), "key 'features' should be a list of positive integers"),
    (lambda m: m.update(features=[True]), "key 'features' should be a list of positive integers"),
    (lambda m: m.update(features=12), "key 'features' should be a list of positive integers, got 12"),
    (lambda m: m.update(dtype="f4,f4"), "key 'dtype' should be a numeric type"),
    (lambda m: m.update(dtype=None), "key 'dtype' should be a numeric type such as 'float32', got None"),
    (lambda m: m.update(version="1"), "key 'version' should be an integer, got '1'"),
    (lambda m: m.update(splits=[]), "key 'splits' should be an object"),
    (lambda m: m["splits"].update(train={}), "splits.train should be a list of shards, got {}"),
    (lambda m: m["splits"]["train"][0].update(rows=True), 'splits.train[0] should be {"file": NAME, "rows": N'),
    (lambda m: m["splits"]["train"][0].update(rows=-1), 'splits.train[0] should be'),
    (lambda m: m["splits"]["train"][0].update(file=7), 'splits.train[0] should be'),
    (lambda m: m["splits"]["train"][0].update(extra=1), 'splits.train[0] should be'),
    (lambda m: m["splits"].update(train=[]), "no 'train' split"),
    (lambda m: m.pop("format"), "key 'format' should be 'mpitrain.shards', got None"),
])
def test_wrong_json_types_anywhere_in_a_manifest(data_copy, change, message):
    meta = manifest(data_copy)
    change(meta)
    write_manifest(data_copy, meta)
    with pytest.raises(MpitrainError, match="manifest.json: ") as info:
        read_manifest(data_copy)
    assert message in str(info.value)


@pytest.mark.parametrize("name,why", [
    ("/etc/hostname", "is not a relative path inside the dataset directory"),
    ("../outside.h5", "leaves the dataset directory ('..')"),
    ("sub/../../outside.h5", "leaves the dataset directory ('..')"),
    ("", "is not a relative path inside the dataset directory"),
    (".", "resolves to"),
])
def test_shard_files_outside_the_directory_are_refused(data_copy, name, why):
    meta = manifest(data_copy)
    meta["splits"]["train"][0]["file"] = name
    write_manifest(data_copy, meta)
    with pytest.raises(MpitrainError) as info:
        read_manifest(data_copy)
    assert f"splits.train[0].file {name!r} {why}" in str(info.value)
    assert "shard files are named by paths inside the dataset directory" in str(info.value)


def test_a_symbolic_link_leading_out_is_refused_and_one_staying_in_is_read(data_copy, tmp_path):
    outside = tmp_path / "elsewhere.h5"
    os.rename(os.path.join(data_copy, SHARD), outside)
    os.symlink(outside, os.path.join(data_copy, SHARD))
    with pytest.raises(MpitrainError, match=rf"resolves to {outside}, outside the dataset"):
        read_manifest(data_copy)
    os.remove(os.path.join(data_copy, SHARD))
    os.makedirs(os.path.join(data_copy, "real"))
    os.rename(outside, os.path.join(data_copy, "real", SHARD))
    os.symlink(os.path.join("real", SHARD), os.path.join(data_copy, SHARD))
    check_dataset(read_manifest(data_copy), MPI.COMM_SELF)  # inside: fine


def _replace_x(root, make):
    """Rewrite SHARD with its y, and x made by make(f, x)."""
    path = os.path.join(root, SHARD)
    with h5py.File(path, "r") as f:
        x, y = f["x"][()], f["y"][()]
    os.remove(path)
    with h5py.File(path, "w") as f:
        f["y"] = y
        make(f, x, root)
    return path


def test_an_external_link_is_refused_before_it_is_followed(data_copy, tmp_path):
    outside = tmp_path / "secret.h5"

    def make(f, x, root):
        with h5py.File(outside, "w") as g:
            g["x"] = x
        f["x"] = h5py.ExternalLink(str(outside), "/x")

    _replace_x(data_copy, make)
    os.remove(outside)  # had it been followed, the message would be HDF5's "unable to open"
    message = refused(data_copy)
    assert f"{SHARD}: dataset 'x' is an external link to {outside}:/x; a shard's data must " \
           "lie in the shard" in message


def test_an_external_link_in_a_group_on_the_way_is_refused(data_copy, tmp_path):
    def make(f, x, root):
        with h5py.File(tmp_path / "g.h5", "w") as g:
            g["x"] = x
        f["grp"] = h5py.ExternalLink(str(tmp_path / "g.h5"), "/")
        f["x"] = h5py.SoftLink("/grp/x")

    _replace_x(data_copy, make)
    assert "is an external link to" in refused(data_copy)


def test_a_virtual_dataset_is_refused(data_copy, tmp_path):
    def make(f, x, root):
        src = tmp_path / "source.h5"
        with h5py.File(src, "w") as g:
            g["x"] = x
        layout = h5py.VirtualLayout(shape=x.shape, dtype=x.dtype)
        layout[:] = h5py.VirtualSource(str(src), "x", shape=x.shape)
        f.create_virtual_dataset("x", layout)

    _replace_x(data_copy, make)
    message = refused(data_copy)
    assert f"{SHARD}: dataset 'x' is a virtual dataset (its data comes from " in message
    assert "copy its data into the shard" in message


def test_external_raw_storage_is_refused(data_copy, tmp_path):
    def make(f, x, root):
        raw = tmp_path / "raw.bin"
        x.astype("<f4").tofile(raw)
        f.create_dataset("x", shape=x.shape, dtype="<f4", external=[(str(raw), 0, x.nbytes)])

    _replace_x(data_copy, make)
    assert "keeps its data in external files" in refused(data_copy)


def test_x_that_is_a_group_is_refused(data_copy):
    _replace_x(data_copy, lambda f, x, root: f.create_group("x"))
    assert f"{SHARD}: 'x' is an HDF5 group, expected a dataset" in refused(data_copy)


@pytest.mark.parametrize("label,full", [(3, False), (-1, False), (3, True), (-1, True)])
def test_labels_are_range_checked_in_every_check_mode(data_copy, label, full):
    def change(x, y):
        y = y.copy()
        y[17] = label
        return x, y

    damage._rewrite(data_copy, change)
    assert f"{SHARD}: label {label} at row 17 is out of range, expected 0..2" in refused(
        data_copy, full=full)


def test_a_truncated_contiguous_shard_is_refused_before_step_1(data_copy):
    path = os.path.join(data_copy, SHARD)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    message = refused(data_copy, full=False)
    assert SHARD in message and ("past the end of the file" in message or "unreadable" in message)


LAYOUTS = {
    "contiguous": dict(),
    "big-endian": dict(dtype=">f4"),
    "chunked": dict(chunks=(7, 12)),
    "gzip+shuffle": dict(chunks=(16, 12), compression="gzip", shuffle=True),
    "compact": dict(compact=True),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_the_fast_path_reads_exactly_what_h5py_reads(data_copy, layout):
    opts = dict(LAYOUTS[layout])

    def make(f, x, root):
        dtype = opts.pop("dtype", x.dtype)
        if opts.pop("compact", False):
            dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
            dcpl.set_layout(h5py.h5d.COMPACT)
            space = h5py.h5s.create_simple(x.shape)
            h5py.h5d.create(f.id, b"x", h5py.h5t.py_create(np.dtype(dtype)), space, dcpl=dcpl)
            f["x"][...] = x
        else:
            f.create_dataset("x", data=x.astype(dtype), **opts)

    path = _replace_x(data_copy, make)
    check_dataset(read_manifest(data_copy), MPI.COMM_SELF)
    with h5py.File(path, "r") as f:
        expect = f["x"][()].astype(np.float32)
        view = mapped(dataset(f, "x", path), path)
        assert (view is not None) == (layout in ("contiguous", "big-endian"))
    s = Shards(read_manifest(data_copy), "train")
    k = [os.path.basename(p) for p in s.files].index(SHARD)
    ids = s.offsets[k] + np.random.default_rng(3).permutation(len(expect))
    got, _ = s.read(ids)
    s.close()
    np.testing.assert_array_equal(got, expect[ids - s.offsets[k]])
