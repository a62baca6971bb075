"""Ways to break a dataset copy, each with the error it must produce (file and problem)."""
import json
import os

import h5py
import numpy as np

SHARD = "train-00001-of-00003.h5"


def _rewrite(root, change):
    """Rewrite shard SHARD with change(x, y) -> (x, y)."""
    path = os.path.join(root, SHARD)
    with h5py.File(path, "r") as f:
        x, y = f["x"][()], f["y"][()]
    x, y = change(x, y)
    os.remove(path)
    with h5py.File(path, "w") as f:
        if x is not None:
            f["x"] = x
        if y is not None:
            f["y"] = y


def missing_shard(root):
    os.remove(os.path.join(root, SHARD))
    return f"{SHARD}: missing shard"


def unreadable_shard(root):
    with open(os.path.join(root, SHARD), "wb") as f:
        f.write(b"this is not an HDF5 file\n" * 10)
    return f"{SHARD}: unreadable shard"


def missing_key(root):
    _rewrite(root, lambda x, y: (x, None))
    return f"{SHARD}: missing dataset 'y'"


def feature_shape(root):
    _rewrite(root, lambda x, y: (x[:, :11], y))
    return f"{SHARD}: dataset 'x' has feature shape (11,), expected (12,)"


def dtype(root):
    _rewrite(root, lambda x, y: (x.astype(np.float64), y))
    return f"{SHARD}: dataset 'x' is float64, expected float32"


def label_range(root):
    def change(x, y):
        y = y.copy()
        y[17] = 3
        return x, y
    _rewrite(root, change)
    return f"{SHARD}: label 3 at row 17 is out of range, expected 0..2"


def nan_feature(root):
    def change(x, y):
        x = x.copy()
        x[5, 2] = np.nan
        return x, y
    _rewrite(root, change)
    return f"{SHARD}: NaN or inf in 'x' at row 5"


def row_count(root):
    path = os.path.join(root, "manifest.json")
    with open(path) as f:
        meta = json.load(f)
    meta["splits"]["train"][1]["rows"] += 1
    meta["splits"]["train"][1]["ranges"] = [[0, meta["splits"]["train"][1]["rows"]]]
    with open(path, "w") as f:
        json.dump(meta, f)
    return f"{SHARD}: expected 181 rows (from {path}), 'x' has 180 and 'y' has 180"


def missing_manifest(root):
    os.remove(os.path.join(root, "manifest.json"))
    return "manifest.json: missing"


ALL = [missing_shard, unreadable_shard, missing_key, feature_shape, dtype, label_range,
       nan_feature, row_count, missing_manifest]
