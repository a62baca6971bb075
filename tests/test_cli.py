"""The command line under mpiexec: the default run, the log, and every refused input.

Each test launches a real MPI job and bounds it in time, so a hang fails.
"""
import json
import os
import statistics
import subprocess
import sys

import numpy as np
import pytest

import damage
from conftest import ROOT, clean_env, run_mpi, run_train


@pytest.mark.timeout(400)
def test_train_with_no_arguments_builds_the_builtin_data_and_learns(tmp_path):
    env = clean_env(MPITRAIN_CACHE=str(tmp_path / "cache"))
    result = run_train(4, "--log", tmp_path / "log.jsonl", env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "mpitrain" in out and "4 ranks" in out and "282 steps" in out
    assert out.count("\ndone: steps 1-282 in") == 1
    records = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert [r["step"] for r in records][:3] == [10, 20, 30] and records[-1]["step"] == 282
    assert records[-1]["val_accuracy"] > 0.75  # 10 classes: chance is 0.1
    assert records[-1]["loss"] < records[0]["loss"] / 3
    assert os.path.exists(tmp_path / "cache")


def test_log_records(tmp_path, small_data):
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 0, "earlier": "run"}\n')  # appended to, never truncated
    result = run_train(2, "--data", small_data, "--steps", "20", "--batch-size", "50",
                       "--log", log, "--log-every", "5", "--eval-every", "8", "--hidden", "16")
    assert result.returncode == 0, result.stderr
    lines = log.read_text().splitlines()
    assert json.loads(lines[0]) == {"step": 0, "earlier": "run"}
    records = [json.loads(line) for line in lines[1:]]
    assert [r["step"] for r in records] == [5, 8, 10, 15, 16, 20]
    for r in records:
        assert {"step", "epoch", "loss", "accuracy", "samples_per_s"} <= set(r)
        assert r["samples_per_s"] > 0 and np.isfinite(r["loss"])
        assert ("val_loss" in r) == (r["step"] in (8, 16, 20))
        assert r["epoch"] == (r["step"] - 1) // 11  # 540 samples / 50 -> 11 steps per epoch
    assert 0 <= records[-1]["val_accuracy"] <= 1


@pytest.mark.parametrize("damage_fn", damage.ALL, ids=lambda f: f.__name__)
def test_bad_data_stops_before_the_first_step_with_one_message(data_copy, damage_fn):
    expected = damage_fn(data_copy)
    result = run_train(2, "--data", data_copy, "--steps", "3")
    assert result.returncode != 0
    assert result.stderr.count(expected) == 1, result.stderr
    assert result.stderr.count("mpitrain: error") == 1
    assert "step " not in result.stdout


def test_fewer_samples_than_ranks(tmp_path):
    from mpitrain.data.prepare import synthetic

    synthetic(str(tmp_path / "tiny"), samples=3, features=2, classes=2, val_fraction=0)
    result = run_train(4, "--data", tmp_path / "tiny", "--batch-size", "4")
    assert result.returncode != 0
    assert result.stderr.count("3 training samples for 4 ranks") == 1, result.stderr


@pytest.mark.parametrize("args,message", [
    (["--batch-size", "3"], "--batch-size 3 is smaller than the 4 ranks"),
    (["--batch-size", "10000"], "--batch-size 10000 is larger than the 540 training samples"),
    (["--lr", "-1"], "--lr: expected a value > 0, got -1.0"),
    (["--lr", "1000", "--optimizer", "sgd", "--steps", "50"], "loss is nan at step 4 (epoch 0)"),
])
def test_bad_options_and_divergence_end_the_job_with_one_message(small_data, args, message):
    result = run_train(4, "--data", small_data, *args)
    assert result.returncode == 2
    assert result.stderr.count(message) == 1, result.stderr
    assert "Warning" not in result.stderr


def test_an_exception_on_one_rank_aborts_the_whole_job():
    """Rank 1 fails while rank 0 waits in a collective: the job ends, non-zero, message once."""
    script = ("from mpi4py import MPI\n"
              "from mpitrain.runtime import run_or_abort\n"
              "def work():\n"
              "    comm = MPI.COMM_WORLD\n"
              "    if comm.rank == 1:\n"
              "        raise ValueError('disk on fire')\n"
              "    comm.Barrier()  # would wait forever without the abort\n"
              "run_or_abort(work)\n")
    result = run_mpi(3, ["-c", script], timeout=60)
    assert result.returncode != 0
    assert result.stderr.count("mpitrain: error (rank 1 of 3): ValueError: disk on fire") == 1


def test_info(tmp_path):
    result = run_mpi(2, ["-m", "mpitrain", "info"])
    assert result.returncode == 0, result.stderr
    per_rank = max(1, len(os.sched_getaffinity(0)) // 2)  # the cores here, shared by 2 ranks
    for key in ("MPI library", "ranks             2 on 1 node",
                f"threads per rank  {per_rank} (", "h5py", "h5py with MPI",
                "malloc            glibc keeps freed memory"):
        assert key in result.stdout


def test_info_names_the_malloc_setting_it_was_told():
    result = run_mpi(1, ["-m", "mpitrain", "info"], env=clean_env(MPITRAIN_MALLOC="system"))
    assert result.returncode == 0, result.stderr
    assert "malloc            the system's defaults (MPITRAIN_MALLOC=system)" in result.stdout


@pytest.mark.parametrize("n,env,expected", [
    (1, {}, str(len(os.sched_getaffinity(0)))),
    (4, {}, str(max(1, len(os.sched_getaffinity(0)) // 4))),
    (2, {"OMP_NUM_THREADS": "3"}, "3"),
])
def test_threads_per_rank(n, env, expected):
    script = ("import os, mpitrain\n"
              "mpitrain.init()\n"
              "import numpy\n"
              "from mpi4py import MPI\n"
              "seen = MPI.COMM_WORLD.gather(os.environ['OMP_NUM_THREADS'] + ' '"
              " + os.environ['OPENBLAS_NUM_THREADS'], root=0)\n"
              "if seen: print('\\n'.join(seen))\n")
    result = run_mpi(n, ["-c", script], env=clean_env(**env))
    assert result.returncode == 0, result.stderr
    omp = expected
    blas = expected if not env else str(max(1, len(os.sched_getaffinity(0)) // n))
    assert result.stdout.split("\n")[:n] == [f"{omp} {blas}"] * n


def test_importing_mpitrain_changes_nothing_in_the_process():
    """No environment variable, no malloc setting, no excepthook until init()."""
    script = ("import os, sys, json; before = dict(os.environ); hook = sys.excepthook\n"
              "import mpitrain, mpitrain.run.fit\n"
              "changed = sorted(k for k in set(before) | set(os.environ)\n"
              "                 if before.get(k) != os.environ.get(k))\n"
              "from mpitrain import malloc, process\n"
              "print(json.dumps([changed, sys.excepthook is hook, bool(malloc._STATE)]))\n"
              "mpitrain.init()\n"
              "changed = sorted(k for k in set(before) | set(os.environ)\n"
              "                 if before.get(k) != os.environ.get(k))\n"
              "print(json.dumps([changed, sys.excepthook is hook, bool(malloc._STATE)]))\n")
    env = clean_env()
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    first, second = (json.loads(line) for line in result.stdout.splitlines())
    assert first == [[], True, False]
    assert "OMP_NUM_THREADS" in second[0] and second[1:] == [False, True], second


def test_init_leaves_a_users_own_excepthook_and_settings_alone():
    script = ("import os, sys\n"
              "os.environ['OMP_NUM_THREADS'] = '3'\n"
              "def mine(*a): print('mine')\n"
              "sys.excepthook = mine\n"
              "import mpitrain; report = mpitrain.init()\n"
              "print(sys.excepthook is mine, os.environ['OMP_NUM_THREADS'],\n"
              "      report['uncaught errors'])\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=clean_env(), timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[0] == "True 3 the program's own (left alone)"


@pytest.mark.parametrize("given,expected", [(None, "1"), ("0", "0")])
def test_init_asks_open_mpi_to_yield_unless_the_user_chose(given, expected):
    script = ("import os, mpitrain; mpitrain.init(); "
              "print(os.environ['OMPI_MCA_mpi_yield_when_idle'])")
    env = clean_env()
    env.pop("OMPI_MCA_mpi_yield_when_idle", None)
    if given is not None:
        env["OMPI_MCA_mpi_yield_when_idle"] = given
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=env, timeout=60)
    assert result.returncode == 0 and result.stdout.split() == [expected], result.stderr


@pytest.mark.parametrize("first", ["mpitrain", "mpi4py.MPI"])
def test_the_bucket_sums_wait_by_the_librarys_cheaper_means(first):
    """MPICH's blocking calls spin: the exchange's helper thread runs its sums as
    persistent requests and polls them, yielding the core.  Open MPI's yield by
    themselves if mpi_yield_when_idle reached MPI_Init (mpitrain sets it when imported
    first) and its blocking Allreduce costs a third of its persistent one's CPU: the
    thread calls it.  Imported after MPI started, the setting comes too late: polling."""
    order = ("import mpitrain; mpitrain.init()\nimport mpi4py.MPI\n" if first == "mpitrain"
             else "import mpi4py.MPI\nimport mpitrain; mpitrain.init()\n")
    script = (order +
              "import numpy as np\n"
              "from mpi4py import MPI\n"
              "from mpitrain.comm.exchange import Exchange\n"
              "from mpitrain.comm.polling import blocking_yields\n"
              "x = Exchange(MPI.COMM_WORLD, 1000, np.float32, algorithm='mpi', overlap=True)\n"
              "seen = MPI.COMM_WORLD.gather((MPI.get_vendor()[0], blocking_yields(),\n"
              "                              bool(x._persistent)))\n"
              "x.close()\n"
              "if seen: print(seen)\n")
    env = clean_env()
    env.pop("OMPI_MCA_mpi_yield_when_idle", None)
    result = run_mpi(2, ["-c", script], env=env)
    assert result.returncode == 0, result.stderr
    open_mpi = "Open MPI" in result.stdout
    yields = open_mpi and first == "mpitrain"
    vendor = "Open MPI" if open_mpi else "MPICH"
    assert result.stdout.strip() == str([(vendor, yields, not yields)] * 2), result.stdout


@pytest.mark.parametrize("first", ["numpy", "mpitrain"])
def test_the_loaded_blas_runs_the_threads_per_rank_whatever_was_imported_first(first):
    """numpy imported before mpitrain has read the environment already: mpitrain then
    sets its OpenBLAS directly (2 threads per rank on 2 cores would thrash)."""
    order = ("import numpy\nimport mpitrain; mpitrain.init()\n" if first == "numpy"
             else "import mpitrain; mpitrain.init()\nimport numpy\n")
    script = (order +
              "from mpi4py import MPI\n"
              "from mpitrain.threads import blas_threads\n"
              "seen = MPI.COMM_WORLD.gather(str(blas_threads()), root=0)\n"
              "if seen: print(' '.join(seen))\n")
    result = run_mpi(2, ["-c", script], env=clean_env())
    assert result.returncode == 0, result.stderr
    if result.stdout.split()[0] == "None":
        pytest.skip("numpy's BLAS here is not OpenBLAS")
    expected = str(max(1, len(os.sched_getaffinity(0)) // 2))
    assert result.stdout.split()[:2] == [expected, expected]


def test_one_blas_thread_sets_the_loaded_blas_and_restores_it():
    """--reproducible's steps run at one BLAS thread, set on the library numpy loaded,
    and restored after, an error too; the count before is the threads of groups."""
    from mpitrain.threads import blas_control, one_blas_thread

    libs = blas_control()
    if not libs:
        pytest.skip("numpy's BLAS here is not OpenBLAS and threadpoolctl is missing")
    before = [lib.get() for lib in libs]
    for lib in libs:
        lib.set(2)
    try:
        with one_blas_thread() as threads:
            assert [lib.get() for lib in libs] == [1] * len(libs)
            assert threads == (2 if all(lib.concurrent for lib in libs) else 1)
        assert [lib.get() for lib in libs] == [2] * len(libs)
        with pytest.raises(ZeroDivisionError), one_blas_thread():
            1 / 0
        assert [lib.get() for lib in libs] == [2] * len(libs)
    finally:
        for lib, count in zip(libs, before):
            lib.set(count)


def test_reproducible_refuses_a_blas_it_cannot_hold_at_one_thread(small_data, monkeypatch):
    from mpi4py import MPI

    from mpitrain.config import Config
    from mpitrain.run import build as building
    from mpitrain.runtime import ConfigError
    from mpitrain.threads import THREAD_VARS

    monkeypatch.setattr(building, "blas_control", lambda: [])
    for var in THREAD_VARS:
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("MKL_NUM_THREADS", "4")
    with pytest.raises(ConfigError, match="reproducible computes at one BLAS thread.*"
                                          "OMP_NUM_THREADS=1.*threadpoolctl"):
        building.build(Config(data=small_data, reproducible=True), MPI.COMM_SELF)
    monkeypatch.setenv("MKL_NUM_THREADS", "1")  # the user's 1 everywhere: nothing to set
    building.build(Config(data=small_data, reproducible=True, hidden=[8]), MPI.COMM_SELF)


def test_inspect_prints_once_and_exports_once(tmp_path, small_data):
    assert run_train(2, "--data", small_data, "--steps", "5", "--hidden", "8", "--ckpt-dir",
                     tmp_path / "ck", "--quiet").returncode == 0
    ckpt = next((tmp_path / "ck").glob("*.h5"))
    out = tmp_path / "params.npz"
    result = run_mpi(2, ["-m", "mpitrain", "inspect", ckpt, "--export", out])
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("mpitrain checkpoint, written by") == 1
    assert result.stdout.count(f"wrote {out}") == 1
    assert set(np.load(out)) == {"0.weight", "0.bias", "2.weight", "2.bias"}


def test_prepare_and_help(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "in.npz", x=rng.normal(size=(50, 3)), y=rng.integers(0, 4, 50))
    result = run_mpi(2, ["-m", "mpitrain", "prepare", "--input", tmp_path / "in.npz",
                         "--out", tmp_path / "ds", "--shards", "2", "--val-fraction", "0.2"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("wrote ") == 1
    assert "train: 40 rows in 2 shards, val: 10 rows in 2 shards" in result.stdout
    again = run_mpi(2, ["-m", "mpitrain", "prepare", "--synthetic", "--out", tmp_path / "ds"])
    assert again.returncode == 2 and again.stderr.count("already exists") == 1
    for cmd in ([], ["train"], ["prepare"], ["info"]):

        h = subprocess.run([sys.executable, "-m", "mpitrain", *cmd, "--help"], cwd=ROOT,
                           capture_output=True, text=True, timeout=60, env=clean_env())
        assert h.returncode == 0 and "usage: python -m mpitrain" in h.stdout


def test_custom_model_example(tmp_path):
    """A registered layer of one's own, checked, trained by fit with checkpoints, and
    rebuilt by load_model with the same predictions; run again, it resumes."""
    for epochs in (3, 4):
        result = run_mpi(2, [ROOT / "examples" / "custom_model.py", "--epochs", epochs,
                             "--ckpt-dir", tmp_path / "ckpt"])
        assert result.returncode == 0, result.stderr
        [line] = [x for x in result.stdout.splitlines() if x.startswith("custom_model:")]
        assert "2 ranks, model scale(20),linear(64),tanh,linear(4)" in line
        assert line.endswith("the same predictions: True")
    assert "done: steps 1-" not in result.stdout  # the second run resumed


def test_bench_allreduce_table_and_json(tmp_path):
    out = tmp_path / "bench.json"
    result = run_mpi(2, ["-m", "mpitrain", "bench", "allreduce", "--sizes", "4K,100K",
                         "--repeats", "2", "--warmup", "1", "--json", out])
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("# all-reduce, 2 ranks, float32") == 1
    assert result.stdout.count("memory bandwidth") == 1
    records = json.loads(out.read_text())
    keys = {"algorithm", "ranks", "bytes", "time_s", "algbw_GBps", "busbw_GBps"}
    assert all(set(r) == keys for r in records)
    pairs = [(r["algorithm"], r["bytes"]) for r in records]
    assert pairs == [("mpi", 4096), ("ring", 4096), ("shm", 4096), ("mpi", 102400),
                     ("ring", 102400), ("shm", 102400), ("memory", 64 << 20)]
    for r in records[:6]:
        assert r["ranks"] == 2 and r["time_s"] > 0
        assert r["algbw_GBps"] == pytest.approx(r["bytes"] / r["time_s"] / 1e9)
        assert r["busbw_GBps"] == pytest.approx(r["algbw_GBps"])  # 2 (p - 1) / p = 1 at p = 2
    bad = run_mpi(2, ["-m", "mpitrain", "bench", "allreduce", "--sizes", "4Q"])
    assert bad.returncode == 2 and bad.stderr.count("not a size: '4Q'") == 1


def test_bench_pipeline_table_and_json(tmp_path, small_data):
    out = tmp_path / "pipe.json"
    result = run_mpi(2, ["-m", "mpitrain", "bench", "pipeline", "--data", small_data,
                         "--microbatches", "1,4", "--hidden", "16,16", "--batch-size", "64",
                         "--steps", "3", "--warmup", "1", "--json", out])
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("# pipeline, 2 ranks: pp=2 x dp=1 against pp=1 x dp=2") == 1
    records = json.loads(out.read_text())
    assert [(r["schedule"], r["microbatches"]) for r in records] == [
        ("none", 1), ("gpipe", 1), ("gpipe", 4), ("1f1b", 1), ("1f1b", 4)]
    for r in records[1:]:
        assert r["bubble_theory"] == pytest.approx(1 / (r["microbatches"] + 1))
        assert len(r["bubble_by_stage"]) == 2 and all(0 <= b < 1 for b in r["bubble_by_stage"])
        assert len(r["activation_bytes_by_stage"]) == 2
    gpipe4, f1b4 = records[2], records[4]
    # 1F1B holds at most (stages - stage index) of the 4 micro-batches: stage 1 holds one.
    assert f1b4["activation_bytes_by_stage"][1] < gpipe4["activation_bytes_by_stage"][1]


def test_bench_train_json(tmp_path, small_data):
    out = tmp_path / "train.json"
    result = run_mpi(2, ["-m", "mpitrain", "bench", "train", "--data", small_data,
                         "--hidden", "16", "--batch-per-rank", "8", "--steps", "3",
                         "--block", "1",  # the settings take turns step by step
                         "--warmup", "1", "--repeats", "2", "--variants", "mpi,ring-bf16,shm",
                         "--json", out])
    assert result.returncode == 0, result.stderr
    records = json.loads(out.read_text())
    assert [(r["ranks"], r["variant"]) for r in records] == [
        (1, "mpi"), (2, "mpi"), (1, "ring-bf16"), (2, "ring-bf16"), (1, "shm"), (2, "shm")]
    for r in records:
        assert r["samples_per_s"] > 0 and 0 < r["share_compute"] <= 1
        assert {"share_exchange", "share_data", "efficiency", "step_s"} <= set(r)
    assert records[0]["efficiency"] == 1.0
    by = {(r["ranks"], r["variant"]): r for r in records}
    for (n, v), r in by.items():  # samples/s at p / (p x samples/s at 1)
        assert r["efficiency"] == pytest.approx(
            r["samples_per_s"] / (n * by[1, v]["samples_per_s"]))
    for n in (1, 2):  # one ceiling per rank count, shared by the variants
        ceilings = {by[n, v]["ceiling_samples_per_s"] for v in ("mpi", "ring-bf16", "shm")}
        assert len(ceilings) == 1 and ceilings.pop() > 0
    for r in records:
        assert r["of_ceiling"] == pytest.approx(r["samples_per_s"] / r["ceiling_samples_per_s"])
        assert r["of_ceiling_min"] <= r["of_ceiling"] and r["oversubscribed"] is False
        assert len(r["of_ceiling_each"]) == 2  # one per repeat, each against its own ceiling
        assert r["of_ceiling_worst"] == min(r["of_ceiling_each"])
        assert r["of_lockstep"] == pytest.approx(r["samples_per_s"] / r["lockstep_samples_per_s"])
        assert len(r["of_lockstep_each"]) == 2
        # the hypervisor's share of the cores' time, per repeat (Linux has /proc/stat)
        assert len(r["stolen_each"]) == len(r["ceiling_stolen_each"]) == 2
        assert all(0 <= x <= 1 for x in r["stolen_each"] + r["ceiling_stolen_each"])
        assert r["stolen"] == statistics.median(r["stolen_each"])
    assert "ceiling" in result.stdout and "of ceiling" in result.stdout


def test_idle_ranks_nap_longer_and_longer_while_others_are_measured(monkeypatch):
    """The benchmarks' idle ranks wait in quiet_barrier: naps double from 1 ms to 50 ms,
    so 2 s idle wake a rank 45 times, not 2,000 (each wake-up takes a measured rank's
    core); the deadline still holds.  A clock that moves only when the rank sleeps."""
    import time
    from mpitrain.runtime import quiet_barrier

    clock, naps = [0.0], []

    def sleep(seconds):
        naps.append(seconds)
        clock[0] += seconds

    class Comm:  # a barrier the other ranks reach at 2 s
        def Ibarrier(self):
            return type("Request", (), {"Test": lambda self: clock[0] >= 2.0})()

    monkeypatch.setattr(time, "sleep", sleep)
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    assert quiet_barrier(Comm())
    assert naps[:4] == [0.001, 0.002, 0.004, 0.008] and max(naps) == 0.05
    assert len(naps) == 45  # 1 + 2 + ... + 32 ms, then 50 ms naps up to 2 s
    clock[0], naps[:] = 0.0, []
    assert not quiet_barrier(Comm(), seconds=1.0) and 1.0 < clock[0] < 1.06


@pytest.mark.timeout(400)
def test_ddp_peer_benchmark(tmp_path, small_data):
    pytest.importorskip("torch", reason="the DDP comparison needs torch (optional)")
    out = tmp_path / "ddp.json"
    result = subprocess.run(
        [sys.executable, "-m", "mpitrain.bench.ddp", "--ranks", "1,2", "--repeats", "1",
         "--steps", "3", "--warmup", "1", "--hidden", "16", "--data", small_data,
         "--json", str(out)], capture_output=True, text=True, timeout=300, env=clean_env())
    assert result.returncode == 0, result.stderr
    records = json.loads(out.read_text())
    assert [(r["ranks"], r["variant"]) for r in records] == [(1, "mpi"), (2, "mpi"),
                                                             (1, "shm"), (2, "shm")]
    for r in records:
        assert r["ratio"] == pytest.approx(r["mpitrain_samples_per_s"] / r["ddp_samples_per_s"])


def test_run_directory_quiet_and_live_progress(tmp_path, small_data):
    run_dir = tmp_path / "run"
    quiet = run_train(2, "--data", small_data, "--steps", "20", "--run-dir", run_dir, "--quiet",
                      "--log-every", "5")
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stdout.splitlines()[0].startswith("done: steps 1-20")
    assert len(quiet.stdout.splitlines()) == 1
    from mpitrain.run.metrics import read_log

    assert [r["step"] for r in read_log(str(run_dir))] == [5, 10, 15, 20]
    record = json.loads((run_dir / "run.jsonl").read_text())  # what ran, the plan resolved
    assert record["ranks"] == 2
    assert [record["config"][k] for k in ("overlap", "bucket_mb", "progress")] == \
        [False, 0.0, "thread"]
    live = run_train(2, "--data", small_data, "--steps", "20", "--run-dir", run_dir,
                     env=clean_env(MPITRAIN_PROGRESS="live"))
    assert live.returncode == 0
    # (text mode turned the carriage returns into newlines)
    assert "\x1b[Kstep  1/20" in live.stdout and "ETA 0:00:0" in live.stdout
    assert len(read_log(str(run_dir))) == 8  # appended: 4 + 4 (every epoch end is logged)
    plain = run_train(2, "--data", small_data, "--steps", "20", "--run-dir", run_dir,
                      env=clean_env(MPITRAIN_PROGRESS="plain"))
    assert "\x1b" not in plain.stdout and "step 10/20" in plain.stdout


def test_bench_train_error_on_a_sub_communicator_ends_the_job(small_data):
    """An error agreed only by the measured ranks must still end every rank of the job."""
    result = run_mpi(2, ["-m", "mpitrain", "bench", "train", "--data", small_data,
                         "--batch-per-rank", "1000", "--hidden", "8", "--steps", "2",
                         "--repeats", "1"], timeout=60)
    assert result.returncode == 2
    assert result.stderr.count("the global batch (--batch-per-rank x ranks) 1000 is larger than "
                               "the 540 training samples") == 1


def test_ranks_that_see_different_files_agree_on_the_error(tmp_path, small_data):
    """One rank's file system lacks the dataset: every rank stops with that rank's error."""
    script = ("import os, sys\n"
              "from mpi4py import MPI\n"
              "from mpitrain.cli import main\n"
              "data = sys.argv[1] if MPI.COMM_WORLD.rank != 1 else sys.argv[2]\n"
              "main(['train', '--data', data, '--steps', '2'])\n")
    result = run_mpi(3, ["-c", script, small_data, tmp_path / "missing"], timeout=60)
    assert result.returncode == 2
    assert result.stderr.count("missing: no such dataset directory") == 1, result.stderr


def test_a_non_zero_exit_on_one_rank_ends_the_whole_job():
    """sys.exit(3) on rank 1 while rank 0 waits in a collective: the job ends, status 3."""
    script = ("import sys\n"
              "from mpi4py import MPI\n"
              "from mpitrain.runtime import run_or_abort\n"
              "def work():\n"
              "    if MPI.COMM_WORLD.rank == 1:\n"
              "        sys.exit(3)\n"
              "    MPI.COMM_WORLD.Barrier()  # would wait forever without the abort\n"
              "run_or_abort(work)\n")
    result = run_mpi(2, ["-c", script], timeout=60)
    assert result.returncode == 3, result.stderr
    assert result.stderr.count("mpitrain: rank 1 of 2 exited with status 3; ending the job") == 1


def test_helper_threads_that_call_mpi_need_thread_multiple(small_data):
    """Below MPI_THREAD_MULTIPLE the watchdog and the exchange thread are refused, with what
    to set; without them (--watchdog 0, no overlapped thread: the default on one node, or
    --progress none) the run goes on."""
    env = clean_env(MPI4PY_RC_THREAD_LEVEL="serialized")
    mpi = ("--allreduce", "mpi")  # the exchange whose helper thread calls MPI
    refused = run_train(2, "--data", small_data, "--steps", "2", *mpi, env=env, timeout=60)
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.count("MPI runs at thread level 'serialized', but the watchdog "
                                "(--watchdog 0 turns it off) calls MPI from its own thread while "
                                "the main thread does, which needs 'multiple': unset "
                                "MPI4PY_RC_THREAD_LEVEL") == 1
    exchange = run_train(2, "--data", small_data, "--steps", "2", "--watchdog", "0",
                         "--overlap", *mpi, env=env, timeout=60)
    assert exchange.returncode == 2
    assert ("the exchange's helper thread (--progress none avoids it, as does turning "
            "--overlap off)") in exchange.stderr
    for fine, plan in ((("--progress", "none"), "(one bucket overlapped with backward)"),
                       ((), "(one bucket after backward)")):
        done = run_train(2, "--data", small_data, "--steps", "2", "--watchdog", "0", *fine,
                         *mpi, "--hidden", "8", env=env, timeout=60)
        assert done.returncode == 0, done.stderr
        assert f"allreduce mpi {plan}" in done.stdout  # the run's header says how


def test_bench_layers_table_and_json(tmp_path):
    out = tmp_path / "layers.json"
    result = run_mpi(1, ["-m", "mpitrain", "bench", "layers", "--layers", "conv2d,residual",
                         "--repeats", "2", "--min-time", "0.001", "--no-torch", "--json", out])
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("# layers, forward + backward, float32") == 1
    records = json.loads(out.read_text())
    assert [(r["layer"], r["shape"], r["torch_s"]) for r in records] == [
        ("conv2d", [64, 16, 16, 16], None), ("residual", [128, 512], None)]
    assert all(r["mpitrain_s"] > 0 for r in records)
    bad = run_mpi(1, ["-m", "mpitrain", "bench", "layers", "--layers", "conv3d"])
    assert bad.returncode == 2 and bad.stderr.count("--layers: unknown conv3d") == 1
