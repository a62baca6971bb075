"""Bad input, table-driven (continued): checkpoints, the outputs a run or a command
writes, and the commands besides train (predict, evaluate, inspect, prepare, data index,
plot, bench).  Each row asserts the exit status, the one error line and that nothing
already on disk changed; in this process, through the command line's entry point."""
import json
import os

import h5py
import numpy as np
import pytest

import bad_inputs as b
from test_bad_inputs import newest, rewrite_ckpt, trained

RUN = ["train", "--data", "{data}", "--hidden", "8", "--steps", "4", "--batch-size", "32",
       "--quiet"]


def _ckpt(change=None, *extra):
    """A trained checkpoint directory (root/ckpt), its newest file changed by ``change``."""
    def make(root, sd):
        d = trained(root, sd, *extra)
        if change is not None:
            change(newest(root))
        return {"data": d, "ckpt": os.path.join(root, "ckpt"), "newest": newest(root)}
    return make


def _attr(name, value):
    def change(path):
        with h5py.File(path, "r+") as f:
            f.attrs[name] = value
    return change


def _changed(path):
    with h5py.File(path, "r+") as f:
        f["params/0.weight"][0, 0] += 1.0  # the checksum attribute left as it was


def _nan(path):
    rewrite_ckpt(path, lambda a: a.__setitem__((0, 0), np.nan))


def _inf(path):
    rewrite_ckpt(path, lambda a: a.__setitem__((1, 2), np.inf))


# (id, make, argv, status, text): argv's {names} from make's dict (and {root})
RESUME = [
    ("resume-nan", _ckpt(_nan), RUN + ["--resume", "{newest}", "--ckpt-dir", "{root}/new"], 2,
     "params/0.weight holds nan at [0, 0]: a state no run can continue from"),
    ("resume-inf", _ckpt(_inf), RUN + ["--resume", "{newest}", "--ckpt-dir", "{root}/new"], 2,
     "params/0.weight holds inf at [1, 2]"),
    ("resume-checksum", _ckpt(_changed), RUN + ["--resume", "{newest}", "--ckpt-dir",
                                                "{root}/new"], 2,
     "checksum of params/0.weight does not match (file damaged)"),
    ("resume-newer", _ckpt(_attr("format_version", 99)),
     RUN + ["--resume", "{newest}", "--ckpt-dir", "{root}/new"], 2,
     "format version 99 is newer than this mpitrain reads"),
    ("resume-not-mpitrain", _ckpt(_attr("format", "other")),
     RUN + ["--resume", "{newest}", "--ckpt-dir", "{root}/new"], 2,
     "not an mpitrain checkpoint"),
    ("resume-other-model", _ckpt(),
     ["train", "--data", "{data}", "--hidden", "16", "--steps", "4", "--batch-size", "32",
      "--quiet", "--resume", "{newest}", "--ckpt-dir", "{root}/new"], 2,
     "cannot resume: written for the model linear(8),relu,linear(3)"),
    ("resume-other-optimizer", _ckpt(),
     RUN + ["--optimizer", "adam", "--resume", "{newest}", "--ckpt-dir", "{root}/new"], 2,
     "cannot resume: written with --optimizer momentum, this run has adam"),
    ("resume-other-batch", _ckpt(),
     ["train", "--data", "{data}", "--hidden", "8", "--steps", "4", "--batch-size", "16",
      "--quiet", "--resume", "{newest}", "--ckpt-dir", "{root}/new"], 2,
     "written with --batch-size 32, this run has 16: the sample order would differ"),
    ("resume-none-over-checkpoints", _ckpt(),
     RUN + ["--resume", "none", "--ckpt-dir", "{ckpt}"], 2,
     "--resume none would overwrite them"),
    ("resume-fifo", lambda root, sd: {"data": b.data(root, sd),
                                      "f": b.fifo(os.path.join(root, "c.h5"))},
     RUN + ["--resume", "{f}", "--ckpt-dir", "{root}/new"], 2, "a FIFO, not a checkpoint"),
    ("resume-garbage", lambda root, sd: {"data": b.data(root, sd), "f": b._write_bytes(
        os.path.join(root, "c.h5"), b"garbage" * 100)},
     RUN + ["--resume", "{f}", "--ckpt-dir", "{root}/new"], 2, "c.h5: unreadable"),
]

OUTPUTS = [
    ("timeline-exists", lambda root, sd: {"data": b.data(root, sd), "t": b._write_bytes(
        os.path.join(root, "precious.txt"), b"precious")},
     RUN + ["--timeline", "{t}"], 2, "precious.txt: already exists; the timeline would "
                                     "replace it"),
    ("timeline-directory", lambda root, sd: {"data": b.data(root, sd)},
     RUN + ["--timeline", "{root}"], 2, "a directory; the timeline is written as a file"),
    ("timeline-no-directory", lambda root, sd: {"data": b.data(root, sd)},
     RUN + ["--timeline", "{root}/nodir/sub/t.json"], 2, "/nodir/sub does not exist"),
    ("timeline-fifo", lambda root, sd: {"data": b.data(root, sd),
                                        "t": b.fifo(os.path.join(root, "t.json"))},
     RUN + ["--timeline", "{t}"], 2, "t.json: a FIFO; the timeline is written as a file"),
    ("log-directory", lambda root, sd: {"data": b.data(root, sd)},
     RUN + ["--log", "{root}"], 2, "a directory; the metrics log is written as a file"),
    ("log-no-directory", lambda root, sd: {"data": b.data(root, sd)},
     RUN + ["--log", "{root}/nodir/m.jsonl"], 2, "/nodir does not exist"),
    ("run-dir-file", lambda root, sd: {"data": b.data(root, sd), "f": b._write_bytes(
        os.path.join(root, "f"), b"mine")},
     RUN + ["--run-dir", "{f}"], 2, "a file, not a directory (the run directory)"),
    ("ckpt-dir-file", lambda root, sd: {"data": b.data(root, sd), "f": b._write_bytes(
        os.path.join(root, "f"), b"mine")},
     RUN + ["--ckpt-dir", "{f}"], 2, "--ckpt-dir {f}: not a directory"),
]


def _predict_ready(root, sd):
    names = _ckpt()(root, sd)
    with h5py.File(os.path.join(root, "in.h5"), "w") as f:
        f["x"] = np.zeros((10, 12), np.float32)
        f["bad"] = np.where(np.arange(120).reshape(10, 12) == 50, np.nan, 0).astype(np.float32)
        f["narrow"] = np.zeros((10, 4), np.float32)
        f["text"] = np.array([b"a", b"b"])
    names["in"] = os.path.join(root, "in.h5")
    b._write_bytes(os.path.join(root, "exists.h5"), b"precious")
    return names


PREDICT = ["predict", "{newest}", "--data", "{in}", "--out"]
COMMANDS = [
    ("predict-out-exists", _predict_ready, PREDICT + ["{root}/exists.h5"], 2,
     "exists.h5: already exists; choose another --out, or --overwrite"),
    ("predict-out-no-directory", _predict_ready, PREDICT + ["{root}/nodir/p.h5"], 2,
     "/nodir does not exist"),
    ("predict-out-directory", _predict_ready, PREDICT + ["{root}"], 2,
     "a directory; the predictions is written as a file"),
    ("predict-nan-rows", _predict_ready, PREDICT + ["{root}/p.h5", "--x", "bad"], 2,
     "row 4 holds NaN or inf: its prediction would be NaN"),
    ("predict-other-shape", _predict_ready, PREDICT + ["{root}/p.h5", "--x", "narrow"], 2,
     "samples of shape (4,), and the model of"),
    ("predict-text", _predict_ready, PREDICT + ["{root}/p.h5", "--x", "text"], 2,
     "should hold numbers"),
    ("predict-missing-key", _predict_ready, PREDICT + ["{root}/p.h5", "--x", "nothing"], 2,
     "missing dataset (--x) 'nothing'"),
    ("predict-nan-checkpoint", _ckpt(_nan), ["predict", "{newest}", "--data", "{data}",
                                             "--out", "{root}/p.h5"], 2, "holds nan"),
    ("evaluate-no-split", _ckpt(), ["evaluate", "{newest}", "--data", "{data}", "--split",
                                    "test"], 2, "no 'test' split to evaluate"),
    ("evaluate-missing-checkpoint", _ckpt(), ["evaluate", "{root}/none.h5", "--data",
                                              "{data}"], 2, "none.h5: no such checkpoint"),
    ("inspect-directory", _ckpt(), ["inspect", "{root}"], 2, "no such checkpoint file"),
    ("inspect-garbage", lambda root, sd: {"f": b._write_bytes(os.path.join(root, "c.h5"),
                                                              b"junk" * 64)},
     ["inspect", "{f}"], 2, "c.h5: unreadable"),
    ("inspect-no-format", lambda root, sd: {"f": b.h5(root, "c.h5", x=np.zeros(3))},
     ["inspect", "{f}"], 2, "no 'format' attribute: not an mpitrain checkpoint"),
    ("export-exists", lambda root, sd: {**_ckpt()(root, sd), "e": b._write_bytes(
        os.path.join(root, "e.npz"), b"precious")},
     ["inspect", "{newest}", "--export", "{e}"], 2, "e.npz: already exists"),
    ("prepare-missing", lambda root, sd: {}, ["prepare", "--input", "{root}/no.npz", "--out",
                                              "{root}/o"], 2, "no.npz: cannot read"),
    ("prepare-out-exists", lambda root, sd: {"npz": b.tiny_npz(root), "o": b.data(root, sd)},
     ["prepare", "--input", "{npz}", "--out", "{o}"], 2, "already exists and is not empty"),
    ("prepare-shards-zero", lambda root, sd: {"npz": b.tiny_npz(root)},
     ["prepare", "--input", "{npz}", "--out", "{root}/o", "--shards", "0"], 2,
     "--shards: expected a value >= 1"),
    ("prepare-val-one", lambda root, sd: {"npz": b.tiny_npz(root)},
     ["prepare", "--input", "{npz}", "--out", "{root}/o", "--val-fraction", "1"], 2,
     "--val-fraction: expected a value in [0, 1)"),
    ("prepare-nan", lambda root, sd: {"npz": b.tiny_npz(root, x=np.full((60, 4), np.nan))},
     ["prepare", "--input", "{npz}", "--out", "{root}/o"], 2, "NaN or inf in 'x' at row 0"),
    ("prepare-stray-label", lambda root, sd: {"npz": b.tiny_npz(
        root, y=np.where(np.arange(60) == 5, 1000, np.arange(60) % 2))},
     ["prepare", "--input", "{npz}", "--out", "{root}/o"], 2,
     "labels up to 1,000 make 1,001 classes, and only 3 distinct labels occur"),
    ("prepare-lengths", lambda root, sd: {"npz": b.tiny_npz(root, y=np.zeros(59, np.int64))},
     ["prepare", "--input", "{npz}", "--out", "{root}/o"], 2, "'x' has 60 samples, 'y' has 59"),
    ("index-huge-label", lambda root, sd: {"f": b.h5(root, x=np.zeros((30, 3), np.float32),
                                                     y=np.array([0, 1] * 14 + [2 ** 40, 0]))},
     ["data", "index", "{f}", "--x", "x", "--y", "y"], 2,
     "labels up to 1,099,511,627,776 make 1,099,511,627,777 classes"),
    ("index-unwritten", lambda root, sd: {"f": b.h5(
        root, x=lambda f, k: f.create_dataset(k, (10 ** 12, 8), "f4", chunks=(1024, 8)),
        y=lambda f, k: f.create_dataset(k, (10 ** 12,), "i8", chunks=(1024,)))},
     ["data", "index", "{f}", "--x", "x", "--y", "y"], 2,
     "declares 1,000,000,000,000 rows in 976,562,500 chunks, and only 0 chunks were"),
    ("index-manifest-exists", lambda root, sd: {"f": b.h5(root, x=np.zeros((30, 3)),
                                                          y=np.zeros(30, np.int64)),
                                                "m": b._write_bytes(os.path.join(
                                                    root, "manifest.json"), b"{}")},
     ["data", "index", "{f}", "--x", "x", "--y", "y"], 2,
     "manifest.json already exists; choose another --out"),
    ("index-outside", lambda root, sd: {"f": b.h5(root, x=np.zeros((30, 3)),
                                                  y=np.zeros(30, np.int64))},
     ["data", "index", "{f}", "--x", "x", "--y", "y", "--out", "{root}/sub"], 2,
     "lies outside --out"),
    ("index-missing-key", lambda root, sd: {"f": b.h5(root, x=np.zeros((30, 3)))},
     ["data", "index", "{f}", "--x", "x", "--y", "y"], 2, "missing dataset (--y) 'y'"),
    ("index-x-text", lambda root, sd: {"f": b.h5(root, x=np.array([b"a"] * 30),
                                                 y=np.zeros(30, np.int64))},
     ["data", "index", "{f}", "--x", "x", "--y", "y"], 2, "'x' should hold numbers"),
    ("plot-out-exists", lambda root, sd: {"m": b._write_bytes(os.path.join(
        root, "m.jsonl"), b'{"step": 1, "loss": 1.0}\n'), "p": b._write_bytes(
        os.path.join(root, "p.png"), b"mine")},
     ["plot", "{m}", "--out", "{p}"], 2, "p.png: already exists; the plot would replace it"),
    ("plot-torn-middle", lambda root, sd: {"m": b._write_bytes(os.path.join(
        root, "m.jsonl"), b'{"step": 1, "loss": 1.0}\n{"step": 2, "lo\n{"step": 3}\n')},
     ["plot", "{m}", "--out", "{root}/p.png"], 2, "m.jsonl:2: not a JSON object"),
    ("bench-json-exists", lambda root, sd: {"j": b._write_bytes(os.path.join(root, "b.json"),
                                                                b"[]")},
     ["bench", "allreduce", "--sizes", "4K", "--json", "{j}"], 2,
     "b.json: already exists; the benchmark records would replace it"),
]

CASES = RESUME + OUTPUTS + COMMANDS


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_files(case, small_data, tmp_path, capsys):
    _, make, argv, status, text = case
    root = str(tmp_path)
    names = {"root": root, **make(root, small_data)}
    capsys.readouterr()  # what making the case printed
    argv = [a.format(**names) for a in argv]
    before = b.snapshot(root)
    b.one_line(*b.run_cli(argv, capsys), status, text.format(**names))
    assert b.unchanged(before, b.snapshot(root)) == []


def test_a_torn_last_record_is_skipped_with_a_warning(tmp_path, capsys):
    log = tmp_path / "m.jsonl"
    log.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.9}\n{"step": 3, "lo')
    from mpitrain.run.metrics import read_log

    assert [r["step"] for r in read_log(str(log))] == [1, 2]
    assert "m.jsonl:3: a torn last record, skipped" in capsys.readouterr().err


def test_the_space_reserved_for_a_checkpoint_is_close_to_its_size(tmp_path):
    """Measured: the reservation is at least the file's size and at most a few KiB more
    for a small model (HDF5's own overhead: about 400 bytes a dataset)."""
    from mpitrain.fault import checkpoint
    from mpitrain.fault.checkpoint import State

    for n, size in ((2, 10), (6, 1000), (40, 100), (3, 200_000)):
        params = {f"{i}.weight": np.ones(size, np.float32) for i in range(n)}
        state = State(step=1, epoch=0, epoch_step=1, params=params,
                      optimizer_state={"m": dict(params), "v": dict(params)},
                      optimizer={"name": "adam", "steps": 1}, config={"lr": 0.1},
                      layout={}, sampler={"samples": 10, "batch_size": 10,
                                          "drop_last": False})
        seen = {}
        real = checkpoint._reserve
        checkpoint._reserve = lambda path, nbytes: seen.setdefault("bytes", nbytes)
        try:
            _, written = checkpoint.save(str(tmp_path / f"{n}-{size}"), state)
        finally:
            checkpoint._reserve = real
        assert written <= seen["bytes"] <= written + 16 * 1024 + 250 * 3 * n, (n, size)
