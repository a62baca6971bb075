"""The harness of the bad-input suite (tests/test_bad_*.py): a case is a table row, run
in this process through the command line's own entry point (or the Python API), checked
for the exit status, the one error line (naming the file or the parameter) and that
nothing already on disk changed.

A row: ``(id, make, argv, status, text)``; ``make(root)`` builds what the case needs in
the case's own directory and returns a dict of names for ``argv``'s ``{placeholders}``
(``{root}``, ``{data}``: a copy of the small dataset, ...).
"""
import hashlib
import json
import os
import shutil
import stat

import h5py
import numpy as np

SHARD = "train-00001-of-00003.h5"


def snapshot(root: str) -> dict:
    """Every file below ``root``: (kind, size, content hash), by relative path."""
    out = {}
    for base, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(base, name)
            mode = os.lstat(path).st_mode
            rel = os.path.relpath(path, root)
            if stat.S_ISREG(mode):
                with open(path, "rb") as f:
                    out[rel] = ("file", os.path.getsize(path),
                                hashlib.sha256(f.read()).hexdigest())
            else:
                out[rel] = ("dir" if stat.S_ISDIR(mode) else "other", 0, "")
    return out


def unchanged(before: dict, after: dict) -> list:
    """The paths that existed before and are gone or changed (new ones are allowed)."""
    return [p for p, v in before.items() if after.get(p) != v]


def run_cli(argv, capsys):
    """``python -m mpitrain ARGV`` in this process: (status, stdout, stderr)."""
    from mpitrain.cli import main

    try:
        main([str(a) for a in argv])
        status = 0
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else 1
    got = capsys.readouterr()
    return status, got.out, got.err


def one_line(status, out, err, expect_status, text):
    """The case ended with ``expect_status`` and said ``text`` in one error line."""
    errors = [ln for ln in err.splitlines() if ln.startswith("mpitrain: error")]
    assert status == expect_status, (status, err[-2000:])
    assert len(errors) == 1, err[-2000:]
    assert text in errors[0], (text, errors[0])
    assert "Traceback" not in err


# -- what cases build ------------------------------------------------------------------------
def data(root, small_data):
    """A copy of the small dataset at root/data."""
    shutil.copytree(small_data, os.path.join(root, "data"))
    return os.path.join(root, "data")


def manifest(root, small_data, change):
    """The small dataset at root/data, its manifest.json passed through ``change(meta)``."""
    d = data(root, small_data)
    path = os.path.join(d, "manifest.json")
    meta = json.load(open(path))
    change(meta)
    with open(path, "w") as f:
        json.dump(meta, f)
    return d


def shard(root, small_data, change):
    """The small dataset at root/data, shard SHARD rewritten with ``change(f, x, y)`` on a
    new file holding nothing (it writes what the shard should hold)."""
    d = data(root, small_data)
    path = os.path.join(d, SHARD)
    with h5py.File(path, "r") as f:
        x, y = f["x"][()], f["y"][()]
    os.remove(path)
    with h5py.File(path, "w") as f:
        change(f, x, y)
    return d


def fifo(path):
    os.mkfifo(path)
    return path


def tiny_npz(root, x=None, y=None):
    path = os.path.join(root, "arrays.npz")
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.normal(size=(60, 4)).astype(np.float32) if x is None else x,
             y=rng.integers(0, 3, 60) if y is None else y)
    return path


def h5(root, name="in.h5", **datasets):
    path = os.path.join(root, name)
    with h5py.File(path, "w") as f:
        for key, value in datasets.items():
            if callable(value):
                value(f, key)
            else:
                f[key] = value
    return path


def _write_bytes(path, content: bytes):
    with open(path, "wb") as f:
        f.write(content)
    return path
