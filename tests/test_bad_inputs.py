"""Bad input through the command line, table-driven: each row one careless or hostile input;
each asserts the exit status, the one error line (naming the file, the flag or the key)
and that nothing already on disk changed.  Run in this process through the command
line's entry point (serial; the multi-rank cases are in test_inputs.py).

Categories: train's flags, TOML files, data files and manifests, checkpoints, the other
commands' files, file kinds (directories, FIFOs where files are read or written).
"""
import json
import os

import h5py
import numpy as np
import pytest

import bad_inputs as b
from bad_inputs import SHARD

TRAIN = ["train", "--data", "{data}", "--steps", "3", "--batch-size", "32", "--quiet"]


def trained(root, small_data, *extra):
    """A dataset copy and a checkpoint directory with checkpoints of 2 steps (hidden 8)."""
    from mpitrain.cli import main

    d = b.data(root, small_data)
    try:
        main(["train", "--data", d, "--hidden", "8", "--steps", "2", "--batch-size", "32",
              "--quiet", "--ckpt-dir", os.path.join(root, "ckpt"), *extra])
    except SystemExit as exc:
        assert exc.code == 0
    return d


def newest(root):
    from mpitrain.fault import store

    return store.listing(os.path.join(root, "ckpt"))[-1][1]


def rewrite_ckpt(path, change):
    """Change a checkpoint's datasets in place and recompute their checksums (a damage the
    checksums cannot see)."""
    from mpitrain.fault.checkpoint import crc32

    with h5py.File(path, "r+") as f:
        ds = f["params/0.weight"]
        arr = ds[()]
        change(arr)
        ds[...] = arr
        ds.attrs["crc32"] = crc32(arr)


# (id, extra train flags, status, text): each appended to TRAIN
FLAGS = [
    ("batch-zero", ["--batch-size", "0"], 2, "--batch-size: expected a value > 0, got 0"),
    ("batch-huge", ["--batch-size", "100000"], 2,
     "--batch-size 100000 is larger than the 540 training samples"),
    ("lr-zero", ["--lr", "0"], 2, "--lr: expected a value > 0, got 0.0"),
    ("lr-nan", ["--lr", "nan"], 2, "--lr: expected a finite number, got nan"),
    ("lr-inf", ["--lr", "inf"], 2, "--lr: expected a finite number, got inf"),
    ("lr-text", ["--lr", "fast"], 2, "argument --lr: invalid float value: 'fast'"),
    ("steps-zero", ["--steps", "0"], 2, "--steps: expected a value >= 1, got 0"),
    ("epochs-zero", ["--epochs", "0"], 2, "--epochs: expected a value >= 1, got 0"),
    ("steps-and-epochs", ["--epochs", "1"], 2, "give one of the two, not both"),
    ("hidden-zero", ["--hidden", "0"], 2, "--hidden: expected one or more positive widths"),
    ("hidden-empty-item", ["--hidden", "8,,8"], 2, "'8,,8' (an empty item)"),
    ("hidden-text", ["--hidden", "big"], 2, "expected comma-separated integers, got 'big'"),
    ("momentum-one", ["--momentum", "1"], 2, "--momentum: expected a value in [0, 1)"),
    ("momentum-adam", ["--optimizer", "adam", "--momentum", "0.5"], 2,
     "--momentum 0.5 does not apply: it is the momentum of --optimizer momentum"),
    ("dropout-one", ["--dropout", "1"], 2, "--dropout: expected a probability in [0, 1)"),
    ("decay-negative", ["--weight-decay", "-1"], 2, "--weight-decay: expected a value >= 0"),
    ("optimizer-unknown", ["--optimizer", "lbfgs"], 2, "invalid choice: 'lbfgs'"),
    ("loss-misfit", ["--loss", "bce"], 2,
     "--loss bce does not fit the data's task, classification"),
    ("dtype-unknown", ["--dtype", "float16"], 2, "invalid choice: 'float16'"),
    ("warmup-too-long", ["--warmup-steps", "100"], 2,
     "--warmup-steps 100 is as long as the run (3 steps) or longer"),
    ("step-schedule-too-long", ["--lr-schedule", "step"], 2,
     "the step --lr-schedule would never lower the lr"),
    ("lr-min-above-lr", ["--lr-schedule", "cosine", "--lr-min", "1"], 2,
     "--lr-min 1 is above --lr 0.05"),
    ("lr-min-constant", ["--lr-min", "0.01"], 2,
     "--lr-min 0.01 does not apply: it ends the cosine --lr-schedule"),
    ("lr-gamma-constant", ["--lr-gamma", "0.5"], 2, "--lr-gamma 0.5 does not apply"),
    ("clip-zero", ["--clip-grad-norm", "0"], 2, "--clip-grad-norm: expected a value > 0"),
    ("accumulate-zero", ["--accumulate", "0"], 2, "--accumulate: expected a value >= 1"),
    ("accumulate-too-many", ["--accumulate", "50"], 2,
     "--accumulate 50 cuts each replica's part of --batch-size 32"),
    ("seed-negative", ["--seed", "-1"], 2, "--seed: expected a value >= 0, got -1"),
    ("servers-no-worker", ["--strategy", "ps", "--servers", "1"], 2,
     "--servers 1 with 1 ranks leaves no worker"),
    ("servers-allreduce", ["--servers", "2"], 2, "--servers 2 does not apply"),
    ("staleness-allreduce", ["--staleness", "2"], 2, "--staleness 2 does not apply"),
    ("balance-never", ["--balance", "speed", "--balance-every", "50"], 2,
     "--balance-every 50 is as long as the run (3 steps) or longer"),
    ("reproducible-shm", ["--reproducible", "--allreduce", "shm", "--pp", "2"], 2,
     "--reproducible with --allreduce shm and --pp 2: a stage's fixed-order sum"),
    ("groups-unused", ["--groups", "3"], 2, "--groups 3 does not apply"),
    ("groups-too-many", ["--reproducible", "--groups", "1000"], 2,
     "--groups 1000 with 1 ranks and --batch-size 32"),
    ("allreduce-unknown", ["--allreduce", "mpix"], 2, "invalid choice: 'mpix'"),
    ("bucket-negative", ["--bucket-mb", "-1"], 2, "--bucket-mb: expected a value >= 0"),
    ("bucket-nan", ["--bucket-mb", "nan"], 2, "--bucket-mb: expected a finite number"),
    ("progress-ring-test", ["--allreduce", "ring", "--progress", "test"], 2,
     "--progress test drives MPI requests"),
    ("wire-mpi", ["--grad-dtype", "float16", "--allreduce", "mpi"], 2, "--grad-dtype float16 needs --allreduce ring"),
    ("pp-zero", ["--pp", "0"], 2, "--pp: expected a value >= 1"),
    ("pp-too-many", ["--pp", "2"], 2, "pp"),
    ("microbatches-unused", ["--microbatches", "4"], 2, "--microbatches 4 does not apply"),
    ("schedule-unused", ["--schedule", "gpipe"], 2, "--schedule 'gpipe' does not apply"),
    ("stage-layers-unused", ["--stage-layers", "1"], 2, "--stage-layers [1] does not apply"),
    ("keep-last-zero", ["--ckpt-dir", "{root}/c", "--keep-last", "0"], 2,
     "--keep-last: expected a value >= 1"),
    ("keep-last-unused", ["--keep-last", "2"], 2, "--keep-last 2 does not apply"),
    ("ckpt-every-negative", ["--ckpt-dir", "{root}/c", "--ckpt-every", "-1"], 2,
     "--ckpt-every: expected a value >= 0"),
    ("early-stop-zero", ["--early-stop", "0"], 2, "--early-stop: expected a value >= 1"),
    ("early-stop-never", ["--early-stop", "2", "--eval-every", "0"], 2,
     "the run could never stop early"),
    ("monitor-other-task", ["--early-stop", "2", "--monitor", "val_rmse"], 2,
     "--monitor val_rmse: this task's validation metrics are val_loss, val_accuracy"),
    ("monitor-not-val", ["--early-stop", "2", "--monitor", "loss"], 2,
     "--monitor: expected a validation metric"),
    ("resume-missing", ["--ckpt-dir", "{root}/c", "--resume", "{root}/none.h5"], 2,
     "--resume {root}/none.h5: no such checkpoint file"),
    ("resume-dir", ["--ckpt-dir", "{root}/c", "--resume", "{root}"], 2,
     "--resume {root}: a directory, not a checkpoint file"),
    ("watchdog-negative", ["--watchdog", "-1"], 2, "--watchdog: expected a value >= 0"),
    ("grace-negative", ["--ckpt-dir", "{root}/c", "--sigterm-grace", "-1"], 2,
     "--sigterm-grace: expected a value >= 0"),
    ("respawn-mpich", ["--on-failure", "respawn"], 2, "--on-failure respawn: needs"),
    ("max-failures-unused", ["--max-failures", "2"], 2, "--max-failures 2 does not apply"),
    ("fault-rank", ["--fault", "kill:rank=5:step=2"], 2,
     "names rank 5, and the job has 1 ranks"),
    ("fault-unknown", ["--fault", "explode:rank=0"], 2, "unknown action 'explode'"),
    ("timeline-window-reversed", ["--timeline", "{root}/t.json", "--timeline-steps", "5:3"], 2,
     "--timeline-steps: expected FIRST:LAST"),
    ("timeline-window-late", ["--timeline", "{root}/t.json", "--timeline-steps", "100:200"],
     2, "--timeline-steps 100:200 starts after the run's last step (3)"),
    ("timeline-overwrite-unused", ["--overwrite"], 2, "--overwrite True does not apply"),
    ("cache-negative", ["--cache-mb", "-1"], 2, "--cache-mb: expected a value >= 0"),
    ("window-zero", ["--shuffle-window", "0"], 2, "--shuffle-window: expected a value >= 1"),
    ("window-global", ["--shuffle", "global", "--shuffle-window", "4"], 2,
     "--shuffle-window 4 does not apply"),
    ("log-every-zero", ["--log-every", "0"], 2, "--log-every: expected a value > 0"),
    ("eval-every-negative", ["--eval-every", "-1"], 2, "--eval-every: expected a value >= 0"),
    ("model-wrong-width", ["--model", "linear(8),relu,linear(7)"], 2,
     "the model ends in samples of shape (7,), the task needs (3,)"),
    ("model-conv-on-vectors", ["--model", "conv2d(4,3),flatten,linear(3)"], 2,
     "takes (channels, height, width) samples, got shape (12,)"),
    ("model-unknown-layer", ["--model", "bogus(3),linear(3)"], 2, "unknown layer 'bogus'"),
    ("model-unclosed", ["--model", "linear(8"], 2, "--model linear(8: expected ) at the end"),
    ("model-and-hidden", ["--model", "linear(3)", "--hidden", "8"], 2,
     "--hidden [8] does not apply"),
    ("data-missing", ["--data", "{root}/nodata"], 2, "{root}/nodata: no such dataset directory"),
    ("empty-path", ["--log", " "], 2, "--log: expected a path or value"),
]


@pytest.mark.parametrize("case", FLAGS, ids=[c[0] for c in FLAGS])
def test_train_flags(case, small_data, tmp_path, capsys):
    _, extra, status, text = case
    root = str(tmp_path)
    names = {"root": root, "data": b.data(root, small_data)}
    model = [] if "--model" in extra or "--hidden" in extra else ["--hidden", "8"]
    argv = [a.format(**names) for a in TRAIN + model + extra]
    before = b.snapshot(root)
    b.one_line(*b.run_cli(argv, capsys), status, text.format(**names))
    assert b.unchanged(before, b.snapshot(root)) == []


def _toml(text):
    return lambda root: {"toml": _write(os.path.join(root, "run.toml"), text)}


def _write(path, text):
    mode = "wb" if isinstance(text, bytes) else "w"
    with open(path, mode) as f:
        f.write(text)
    return path


TOML = [
    ("unknown-key", _toml("colour = 1\n"), "run.toml: unknown key 'colour'"),
    ("lr-string", _toml("lr = 'fast'\n"), "run.toml: key 'lr' should be float, got 'fast'"),
    ("hidden-string-item", _toml("hidden = [8, 'a']\n"), "key 'hidden' should be List[int]"),
    ("hidden-empty", _toml("hidden = []\n"), "key 'hidden': expected one or more positive"),
    ("batch-zero", _toml("batch_size = 0\n"), "key 'batch_size': expected a value > 0"),
    ("batch-dash-zero", _toml("batch-size = 0\n"), "key 'batch-size': expected a value > 0"),
    ("optimizer-unknown", _toml("optimizer = 'lbfgs'\n"), "key 'optimizer': expected one of"),
    ("syntax", _toml("lr = [\n"), "run.toml: not valid TOML"),
    ("not-utf8", _toml(b"lr = '\xff\xfe'\n"), "run.toml: not a TOML file: byte 6 is not UTF-8"),
    ("random-bytes", _toml(bytes(range(256)) * 2), "run.toml: not a TOML file"),
    ("nul-bytes", _toml(b"\0" * 64), "run.toml: not valid TOML"),
    ("steps-float", _toml("steps = 5.0\n"), "key 'steps' should be int, got 5.0"),
    ("quiet-string", _toml("quiet = 'yes'\n"), "key 'quiet' should be bool, got 'yes'"),
    ("table", _toml("[train]\nlr = 0.1\n"), "run.toml: unknown key 'train'"),
    ("log-empty", _toml("log = ''\n"), "key 'log': expected a path or value"),
    ("momentum-adam", _toml("optimizer = 'adam'\nmomentum = 0.5\n"),
     "key 'momentum' 0.5 does not apply"),
    ("fault-bad", _toml("fault = 'kill:rank=x'\n"), "expected KEY=NUMBER pairs"),
    ("lr-negative", _toml("lr = -1\n"), "key 'lr': expected a value > 0, got -1.0"),
    ("missing", lambda root: {"toml": os.path.join(root, "none.toml")},
     "none.toml: no such config file"),
    ("directory", lambda root: {"toml": root}, "a directory, not a config file"),
    ("fifo", lambda root: {"toml": b.fifo(os.path.join(root, "f.toml"))},
     "f.toml: a FIFO, not a config file"),
]


@pytest.mark.parametrize("case", TOML, ids=[c[0] for c in TOML])
def test_toml_files(case, small_data, tmp_path, capsys):
    _, make, text = case
    root = str(tmp_path)
    names = {"root": root, "data": b.data(root, small_data), **make(root)}
    argv = ["train", "--data", names["data"], "--steps", "3", "--quiet", "--config",
            names["toml"]]
    before = b.snapshot(root)
    b.one_line(*b.run_cli(argv, capsys), 2, text)
    assert b.unchanged(before, b.snapshot(root)) == []


def _meta(change):
    return lambda root, sd: b.manifest(root, sd, change)


def _shard(change):
    return lambda root, sd: b.shard(root, sd, change)


def _external(f, x, y):
    other = os.path.join(os.path.dirname(f.filename), "..", "elsewhere.h5")
    with h5py.File(other, "w") as g:
        g["x"] = x
    f["x"] = h5py.ExternalLink(other, "x")
    f["y"] = y


def _virtual(f, x, y):
    layout = h5py.VirtualLayout(shape=x.shape, dtype=x.dtype)
    layout[:] = h5py.VirtualSource("other.h5", "x", shape=x.shape)
    f.create_virtual_dataset("x", layout)
    f["y"] = y


def _file_kind(kind):
    def make(root, sd):
        d = b.data(root, sd)
        path = os.path.join(d, SHARD)
        os.remove(path)
        os.mkdir(path) if kind == "dir" else os.mkfifo(path)
        return d
    return make


def _manifest_kind(kind):
    def make(root, sd):
        d = b.data(root, sd)
        path = os.path.join(d, "manifest.json")
        os.remove(path)
        os.mkdir(path) if kind == "dir" else os.mkfifo(path)
        return d
    return make


def _garbage(name, content):
    def make(root, sd):
        d = b.data(root, sd)
        _write(os.path.join(d, name), content)
        return d
    return make


def _missing(name):
    def make(root, sd):
        d = b.data(root, sd)
        os.remove(os.path.join(d, name))
        return d
    return make


def _truncate(root, sd):
    d = b.data(root, sd)
    path = os.path.join(d, SHARD)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 500)
    return d


def _train0(meta):
    return meta["splits"]["train"][0]


DATA = [
    ("shard-missing", _missing(SHARD), f"{SHARD}: missing shard"),
    ("shard-garbage", _garbage(SHARD, b"not hdf5\n" * 50), f"{SHARD}: unreadable shard"),
    ("shard-directory", _file_kind("dir"), f"{SHARD}: not a file"),
    ("shard-fifo", _file_kind("fifo"), f"{SHARD}: not a file"),
    ("shard-truncated", _truncate, f"{SHARD}"),
    ("manifest-missing", _missing("manifest.json"), "manifest.json: missing"),
    ("manifest-not-json", _garbage("manifest.json", "{not json"), "manifest.json: unreadable"),
    ("manifest-list", _garbage("manifest.json", "[1, 2]"),
     "manifest.json: should hold a JSON object, got a list"),
    ("manifest-binary", _garbage("manifest.json", bytes(range(256))),
     "manifest.json: unreadable"),
    ("manifest-fifo", _manifest_kind("fifo"), "manifest.json: a FIFO, not a manifest file"),
    ("manifest-directory", _manifest_kind("dir"),
     "manifest.json: a directory, not a manifest file"),
    ("format-wrong", _meta(lambda m: m.update(format="other")),
     "key 'format' should be 'mpitrain.shards'"),
    ("version-newer", _meta(lambda m: m.update(version=99)), "format version 99 is newer"),
    ("features-empty", _meta(lambda m: m.update(features=[])),
     "key 'features' should be a list of positive integers"),
    ("features-zero", _meta(lambda m: m.update(features=[0])),
     "key 'features' should be a list of positive integers"),
    ("features-text", _meta(lambda m: m.update(features="12")), "key 'features' should be"),
    ("features-other", _meta(lambda m: m.update(features=[13])),
     "has feature shape (12,), expected (13,)"),
    ("dtype-text", _meta(lambda m: m.update(dtype="str")), "key 'dtype' should be a numeric"),
    ("task-bogus", _meta(lambda m: m.update(task={"name": "ranking"})),
     "key 'task' should be an object with a name among"),
    ("classes-one", _meta(lambda m: m["task"].update(classes=1)),
     "task.classes should be an integer >= 2, got 1"),
    ("classes-fewer", _meta(lambda m: m["task"].update(classes=2)), "is out of range"),
    ("no-train", _meta(lambda m: m["splits"].pop("train")), "no 'train' split"),
    ("entry-outside", _meta(lambda m: _train0(m).update(file="../x.h5")),
     "leaves the dataset directory ('..')"),
    ("entry-absolute", _meta(lambda m: _train0(m).update(file="/etc/passwd")),
     "is not a relative path inside the dataset directory"),
    ("entry-rows-negative", _meta(lambda m: _train0(m).update(rows=-1)),
     "splits.train[0] should be"),
    ("ranges-beyond", _meta(lambda m: _train0(m).update(rows=500, ranges=[[0, 500]])),
     "expected 500 rows"),
    ("ranges-sum", _meta(lambda m: _train0(m).update(ranges=[[0, 10]])),
     "its ranges hold 10 rows, its 'rows' says 180"),
    ("ranges-reversed", _meta(lambda m: _train0(m).update(ranges=[[20, 10]])),
     "ranges should be a list of [lo, hi] row ranges with 0 <= lo <= hi"),
    ("train-in-val", _meta(lambda m: m["splits"]["val"].append(dict(_train0(m)))),
     "splits.train[0] and splits.val[3] both hold rows 0..179 of train-00000-of-00003.h5"),
    ("train-twice", _meta(lambda m: m["splits"]["train"].append(dict(_train0(m)))),
     "splits.train[0] and splits.train[3] both hold rows"),
    ("ranges-overlap", _meta(lambda m: _train0(m).update(rows=200,
                                                        ranges=[[0, 100], [50, 150]])),
     "splits.train[0] both hold rows 50..99"),
    ("y-missing", _shard(lambda f, x, y: f.create_dataset("x", data=x)),
     f"{SHARD}: missing dataset 'y'"),
    ("x-shape", _shard(lambda f, x, y: (f.create_dataset("x", data=x[:, :5]),
                                        f.create_dataset("y", data=y))),
     "has feature shape (5,), expected (12,)"),
    ("x-dtype", _shard(lambda f, x, y: (f.create_dataset("x", data=x.astype(np.float64)),
                                        f.create_dataset("y", data=y))),
     "is float64, expected float32"),
    ("label-range", _shard(lambda f, x, y: (f.create_dataset("x", data=x),
                                            f.create_dataset("y", data=np.where(
                                                np.arange(len(y)) == 7, 3, y)))),
     "label 3 at row 7 is out of range, expected 0..2"),
    ("label-float", _shard(lambda f, x, y: (f.create_dataset("x", data=x),
                                            f.create_dataset("y", data=y.astype(np.float32)))),
     "should be 1-D integer labels"),
    ("x-nan", _shard(lambda f, x, y: (x.__setitem__((9, 3), np.nan),
                                      f.create_dataset("x", data=x),
                                      f.create_dataset("y", data=y))),
     "NaN or inf in 'x' at row 9"),
    ("x-external-link", _shard(_external), "is an external link to"),
    ("x-virtual", _shard(_virtual), "is a virtual dataset"),
    ("x-unwritten", _shard(lambda f, x, y: (
        f.create_dataset("x", shape=x.shape, dtype=x.dtype, chunks=(16, 12)),
        f["x"].__setitem__(slice(0, 16), x[:16]), f.create_dataset("y", data=y))),
     "only 1 chunks were written"),
]


@pytest.mark.parametrize("case", DATA, ids=[c[0] for c in DATA])
def test_data_files_and_manifests(case, small_data, tmp_path, capsys):
    _, make, text = case
    root = str(tmp_path)
    d = make(root, small_data)
    before = b.snapshot(root)
    argv = [a.format(root=root, data=d) for a in TRAIN]
    b.one_line(*b.run_cli(argv, capsys), 2, text)
    assert b.unchanged(before, b.snapshot(root)) == []
