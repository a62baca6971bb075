"""Bad input through the Python API, table-driven: the same rules as the command line
(Config in code, fit, the trainers, ArrayDataset, DistributedTrainer, the pieces of a loop
of one's own), each refusal an MpitrainError naming the parameter; nothing on disk
changed.  And the small disks: full, read-only."""
import os
import subprocess

import numpy as np
import pytest
from mpi4py import MPI

import bad_inputs as b
import mpitrain
from mpitrain import ArrayDataset, Config, Linear, ReLU, Sequential
from mpitrain.runtime import ConfigError, MpitrainError

SELF = MPI.COMM_SELF
RNG = np.random.default_rng(0)
X = RNG.normal(size=(120, 5)).astype(np.float32)
Y = np.arange(120) % 3


def model(features=5, classes=3):
    return Sequential([Linear(features, 8), ReLU(), Linear(8, classes)], seed=0)


def arrays(**kw):
    return ArrayDataset(X, Y, **kw)


def fit(**options):
    return lambda root: mpitrain.fit(model(), arrays(), comm=SELF, quiet=True,
                                     **{"batch_size": 16, **options})


def trainer(m=None, loss=None, data=None, cls="Trainer", **options):
    return lambda root: getattr(mpitrain, cls)(m or model(), loss, mpitrain.Adam(),
                                               data or arrays(), SELF,
                                               **{"batch_size": 16, **options})


def config(**kw):
    return lambda root: Config(**kw)


def connect(**kw):
    return lambda root: ArrayDataset(**kw).connect(SELF)


def _existing(root):
    return b._write_bytes(os.path.join(root, "precious.txt"), b"precious")


def _nan_checkpoint(root):
    from mpitrain.fault.checkpoint import State, save

    params = {"0.weight": np.full((3, 5), np.nan, np.float32), "0.bias": np.zeros(3, np.float32)}
    state = State(step=0, epoch=0, epoch_step=0, params=params, optimizer_state={},
                  optimizer={"name": "sgd", "steps": 0}, config={}, layout={},
                  sampler={"samples": 10, "batch_size": 10, "drop_last": False},
                  task={"name": "classification", "classes": 3},
                  model={"spec": "linear(3)", "input_shape": [5]})
    return save(root, state)[0]


# (id, call(root), exception type, text)
CASES = [
    ("config-lr", config(lr=-1), ConfigError, "lr: expected a value > 0, got -1"),
    ("config-batch", config(batch_size=0), ConfigError, "batch_size: expected a value > 0"),
    ("config-hidden", config(hidden=[8, 0]), ConfigError,
     "hidden: expected one or more positive widths"),
    ("config-optimizer", config(optimizer="lbfgs"), ConfigError,
     "optimizer: expected one of sgd, momentum, adam, adamw"),
    ("config-momentum-adam", config(optimizer="adam", momentum=0.5), ConfigError,
     "momentum 0.5 does not apply"),
    ("config-steps-epochs", config(steps=5, epochs=1), ConfigError,
     "steps and epochs: give one of the two"),
    ("config-reproducible-shm", config(reproducible=True, allreduce="shm", pp=2), ConfigError,
     "reproducible with allreduce shm and pp 2: a stage's fixed-order sum"),
    ("config-wire-mpi", config(grad_dtype="float16", allreduce="mpi"), ConfigError,
     "grad_dtype float16 needs allreduce ring"),
    ("config-window", config(timeline="t.json", timeline_steps="5:3"), ConfigError,
     "timeline_steps: expected FIRST:LAST"),
    ("config-overwrite", config(overwrite=True), ConfigError,
     "overwrite True does not apply"),
    ("config-empty-path", config(log=" "), ConfigError, "log: expected a path or value"),
    ("config-replace", lambda root: Config().replace(lr=0), ConfigError,
     "lr: expected a value > 0, got 0"),
    ("config-type", config(steps="5"), ConfigError, "steps: expected a value of type int"),
    ("fit-hidden", fit(hidden=[8]), ConfigError, "hidden does not apply to fit"),
    ("fit-dropout", fit(dropout=0.1), ConfigError, "dropout does not apply to fit"),
    ("fit-dtype", fit(dtype="float64"), ConfigError,
     "dtype float64 does not apply: the model's parameters are float32"),
    ("fit-model-type", lambda root: mpitrain.fit([Linear(5, 3)], arrays(), comm=SELF),
     ConfigError, "model: expected a mpitrain.Sequential of layers, got list"),
    ("fit-data-type", lambda root: mpitrain.fit(model(), 42, comm=SELF), MpitrainError,
     "data: expected a dataset directory, an HDF5 file, or a dataset"),
    ("fit-warmup", fit(warmup_steps=1000, steps=10), ConfigError,
     "warmup_steps 1000 is as long as the run (10 steps) or longer"),
    ("fit-timeline-exists", lambda root: mpitrain.fit(
        model(), arrays(), comm=SELF, steps=3, timeline=_existing(root)), ConfigError,
     "precious.txt: already exists; the timeline would replace it"),
    ("fit-ckpt-dir-file", lambda root: mpitrain.fit(
        model(), arrays(), comm=SELF, steps=3, ckpt_dir=_existing(root)), ConfigError,
     "ckpt_dir {root}/precious.txt: not a directory"),
    ("fit-resume-missing", lambda root: mpitrain.fit(
        model(), arrays(), comm=SELF, steps=3, ckpt_dir=root + "/c",
        resume=root + "/none.h5"), ConfigError, "resume {root}/none.h5: no such checkpoint file"),
    ("fit-wrong-width", lambda root: mpitrain.fit(model(classes=7), arrays(), comm=SELF,
                                                  batch_size=16),
     MpitrainError, "model: it ends in samples of shape (7,), and the task needs (3,)"),
    ("fit-wrong-input", lambda root: mpitrain.fit(model(features=9), arrays(), comm=SELF,
                                                  batch_size=16),
     MpitrainError, "model: layer 0 Linear(9, 8) takes 9 features per sample, got shape (5,)"),
    ("trainer-width", trainer(m=model(classes=7)), MpitrainError,
     "model: it ends in samples of shape (7,)"),
    ("trainer-chain", trainer(m=Sequential([Linear(5, 8), ReLU(), Linear(6, 3)])),
     MpitrainError, "model: layer 2 Linear(6, 3) takes 6 features per sample, got shape (8,)"),
    ("trainer-loss", trainer(loss="bce"), ConfigError,
     "loss bce does not fit the data's task, classification"),
    ("trainer-loss-unknown", trainer(loss="hinge"), ConfigError, "loss: expected auto or one"),
    ("trainer-batch", trainer(batch_size=0), ConfigError, "batch_size: expected a value > 0"),
    ("trainer-unknown-option", trainer(colour=1), ConfigError,
     "Trainer: unknown option colour"),
    ("trainer-accumulate", trainer(accumulate=100), ConfigError,
     "accumulate 100 cuts each replica's part of batch_size 16"),
    ("trainer-layers", trainer(m=[Linear(5, 3)]), ConfigError,
     "model: expected a mpitrain.Sequential"),
    ("trainer-shuffle", trainer(shuffle="random"), ConfigError,
     "shuffle: expected one of auto, global, chunks"),
    ("ps-no-worker", trainer(cls="PSTrainer"), ConfigError,
     "servers 1 with 1 ranks leaves no worker"),
    ("trainer-missing-data", trainer(data="/nonexistent/data"), MpitrainError,
     "/nonexistent/data: no such dataset directory"),
    ("arrays-none", connect(x=None, y=None), ConfigError, "x: no array given"),
    ("arrays-lengths", connect(x=X, y=Y[:119]), ConfigError, "x has 120 samples, y has 119"),
    ("arrays-nan", connect(x=np.where(np.arange(600).reshape(120, 5) == 33, np.nan, X), y=Y),
     ConfigError, "NaN or inf in x at row 6"),
    ("arrays-stray-label", connect(x=X, y=np.where(np.arange(120) == 5, 999, Y)),
     ConfigError, "labels up to 999 make 1,000 classes, and only 4 distinct labels occur"),
    ("arrays-val-shape", connect(x=X, y=Y, val=(X[:, :4], Y)), ConfigError,
     "val: a sample's shape is (4,), the training arrays' (5,)"),
    ("arrays-val-both", lambda root: ArrayDataset(X, Y, val=(X, Y), val_fraction=0.1),
     ConfigError, "val and val_fraction: give one of the two"),
    ("arrays-val-fraction", lambda root: ArrayDataset(X, Y, val_fraction=1.0), ConfigError,
     "val_fraction: expected a value in [0, 1)"),
    ("arrays-root", lambda root: ArrayDataset(X, Y, root=-1), ConfigError,
     "root: expected a rank (an integer >= 0) or None"),
    ("arrays-root-beyond", connect(x=X, y=Y, root=3), ConfigError,
     "root 3: the job has 1 ranks"),
    ("arrays-text", connect(x=np.array([["a"]] * 120), y=Y), ConfigError,
     "x: x should hold numbers"),
    ("arrays-2d-labels", connect(x=X, y=np.zeros((120, 2), np.int64), task="classification"),
     MpitrainError, "classification needs 1-D integer labels"),
    ("arrays-multilabel", connect(x=X, y=np.full((120, 2), 2), task="multilabel"),
     MpitrainError, "a value other than 0 or 1 in the targets at row 0"),
    ("arrays-regression-nan", connect(x=X, y=np.where(np.arange(120) == 8, np.nan, 1.5)),
     MpitrainError, "NaN or inf in the targets at row 8"),
    ("arrays-task", connect(x=X, y=Y, task="ranking"), ConfigError,
     "task: expected auto or one of classification, regression, multilabel"),
    ("distributed-ranks", lambda root: mpitrain.DistributedTrainer(num_workers=2, comm=SELF),
     ConfigError, "num_workers 2 + servers 1 needs 3 ranks, and this job has 1"),
    ("distributed-strategy", lambda root: mpitrain.DistributedTrainer(
        1, strategy="gossip", comm=SELF), ConfigError, "strategy: expected one of ps, allreduce"),
    ("distributed-servers", lambda root: mpitrain.DistributedTrainer(
        1, servers=1, strategy="allreduce", comm=SELF), ConfigError,
     "servers 1 does not apply: with strategy allreduce every rank computes"),
    ("register-name", lambda root: mpitrain.register_layer("Bad Name"), ValueError,
     "lower-case letters"),
    ("register-builtin", lambda root: mpitrain.register_layer("relu"), ValueError,
     "'relu' is a built-in layer's name"),
    ("metrics-log-directory", lambda root: mpitrain.MetricsLog(SELF, root), MpitrainError,
     "cannot write the metrics there"),
    ("checkpoints-file", lambda root: mpitrain.Checkpoints(SELF, _existing(root)).open(),
     ConfigError, "ckpt_dir {root}/precious.txt: not a directory"),
    ("load-model-nan", lambda root: mpitrain.load_model(_nan_checkpoint(root)), MpitrainError,
     "params/0.weight holds nan at [0, 0]"),
    ("load-model-missing", lambda root: mpitrain.load_model(root + "/none.h5"), MpitrainError,
     "none.h5: no such checkpoint file"),
    ("optimizer-lr", lambda root: mpitrain.SGD(lr=0), ValueError,
     "learning rate must be > 0"),
    ("optimizer-momentum", lambda root: mpitrain.Momentum(momentum=1.5), ValueError,
     "momentum must be in [0, 1)"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_api(case, tmp_path, capsys):
    _, call, kind, text = case
    root = str(tmp_path)
    b._write_bytes(os.path.join(root, "mine.txt"), b"mine")
    before = b.snapshot(root)
    with pytest.raises(kind) as info:
        call(root)
    assert text.format(root=root) in str(info.value)
    after = b.snapshot(root)
    assert b.unchanged(before, after) == []


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs at tmp_path/disk (root only), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)],
                          capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"no tmpfs here: {done.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_checkpoint_that_needs_little_fits_a_nearly_full_disk(small_disk, capsys):
    """The reservation is the checkpoint's size (within HDF5's overhead), not that plus a
    MiB: a small model's checkpoints are written on a disk with ~1 MiB left."""
    m = model()
    mpitrain.fit(m, arrays(val_fraction=0.2), comm=SELF, steps=4, ckpt_dir=str(small_disk),
                 quiet=True, batch_size=16)
    assert os.path.exists(small_disk / "ckpt-000000004.h5")


def test_a_full_disk_ends_the_run_with_one_line_and_keeps_the_checkpoints(small_disk, capsys):
    big = Sequential([Linear(5, 256), ReLU(), Linear(256, 3)], seed=0)  # ~35 KB a file
    with open(small_disk / "ballast", "wb") as f:
        f.write(b"\0" * (1024 * 1024 - 200 * 1024))  # leaves about 200 KiB
    with pytest.raises(MpitrainError) as info:
        mpitrain.fit(big, arrays(), comm=SELF, steps=40, ckpt_every=2, batch_size=16,
                     ckpt_dir=str(small_disk / "c"), quiet=True, keep_last=100)
    assert info.value.code == 74
    assert "cannot write the checkpoint of step" in str(info.value)
    assert "No space left on device" in str(info.value)
    from mpitrain.fault import checkpoint, store

    kept = store.listing(str(small_disk / "c"))
    assert kept and all(checkpoint.load(p).step == s for s, p in kept)  # every one whole
    assert not [n for n in os.listdir(small_disk / "c") if n.startswith(".ckpt-")]


def test_a_read_only_run_directory_is_refused_before_step_1(small_disk, capsys):
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    with pytest.raises(ConfigError, match="run_dir .*: cannot write the run directory there: "
                                          "Read-only file system"):
        mpitrain.fit(model(), arrays(), comm=SELF, steps=3, run_dir=str(small_disk / "r"),
                     quiet=True)
