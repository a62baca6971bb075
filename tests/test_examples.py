"""Every example runs as its first line says, with quick settings; and the plot command."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, clean_env, mpiexec, run_mpi, run_train

EXAMPLES = ROOT / "examples"


def test_every_example_starts_with_its_command():
    for path in EXAMPLES.iterdir():
        if not path.is_file():  # __pycache__: digits_cnn.py imports digits.py
            continue
        text = path.read_text()
        first = text.split("\n", 2)[1 if text.startswith("#!") else 0]
        assert path.name in first and ("mpirun" in first or "NP=" in first), path


@pytest.mark.timeout(400)
def test_digits_example_reaches_a_good_accuracy(tmp_path):
    pytest.importorskip("sklearn", reason="examples/digits.py needs scikit-learn")
    result = run_mpi(2, [EXAMPLES / "digits.py", "--epochs", "15", "--out", tmp_path / "d"],
                     timeout=300)
    assert result.returncode == 0, result.stderr
    line = [x for x in result.stdout.splitlines() if x.startswith("digits:")]
    assert len(line) == 1
    accuracy = float(line[0].split("validation accuracy ")[1].split()[0])
    assert accuracy > 0.9  # 10 classes: chance is 0.1


@pytest.mark.timeout(500)
def test_digits_cnn_example_reaches_its_accuracy_at_4_ranks(tmp_path):
    """The issue's bar, at the example's own settings: >= 0.985 on 360 validation images."""
    pytest.importorskip("sklearn", reason="examples/digits_cnn.py needs scikit-learn")
    result = run_mpi(4, [EXAMPLES / "digits_cnn.py", "--out", tmp_path / "d"], timeout=400)
    assert result.returncode == 0, result.stderr
    [line] = [x for x in result.stdout.splitlines() if x.startswith("digits_cnn:")]
    accuracy = float(line.split("validation accuracy ")[1].split()[0])
    best = float(line.split("the best, ")[1].split()[0])
    reloaded = float(line.split("reloaded: ")[1].rstrip(")"))
    assert accuracy >= 0.985 and best >= accuracy and reloaded == best, line


@pytest.mark.timeout(500)
def test_residual_regression_example_beats_ridge_near_the_noise_floor(tmp_path):
    pytest.importorskip("sklearn", reason="examples/residual_regression.py needs scikit-learn")
    result = run_mpi(2, [EXAMPLES / "residual_regression.py", "--out", tmp_path / "f"],
                     timeout=400)
    assert result.returncode == 0, result.stderr
    [line] = [x for x in result.stdout.splitlines() if x.startswith("friedman1:")]
    ours = float(line.split("validation RMSE ")[1].split(",")[0])
    ridge = float(line.split("same split: RMSE ")[1].split(",")[0])
    assert 0.9 < ours < 1.3 and ridge > 2.0, line  # noise floor 1.0; a linear fit ~2.6


@pytest.mark.timeout(400)
@pytest.mark.parametrize("name,least_r2", [("diabetes", 0.4), ("linnerud", None)])
def test_regression_examples_report_rmse_and_r2_beside_ridge(tmp_path, name, least_r2):
    pytest.importorskip("sklearn", reason=f"examples/{name}.py needs scikit-learn")
    result = run_mpi(2, [EXAMPLES / f"{name}.py", "--out", tmp_path / name], timeout=300)
    assert result.returncode == 0, result.stderr
    [line] = [x for x in result.stdout.splitlines() if x.startswith(f"{name}:")]
    ours = float(line.split(", R2 ")[1].split()[0])
    ridge = float(line.split("same split: RMSE ")[1].split("R2 ")[1])
    assert "validation RMSE" in line and np.isfinite(ours) and np.isfinite(ridge)
    if least_r2 is not None:  # 442 patients: a real signal; linnerud's 4 rows: noise
        assert ours > least_r2, line


def test_pipeline_example(small_data):
    result = run_mpi(4, [EXAMPLES / "pipeline.py", "--steps", "10", "--data", small_data,
                         "--schedule", "gpipe"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("pipeline 2 x 2 (gpipe, 4 micro-batches)") == 1
    assert result.stdout.count("stage 1 of 2") == 2


@pytest.mark.timeout(400)
def test_allreduce_bench_example(tmp_path):
    env = clean_env(NP="2", MPIEXEC=mpiexec(), PYTHON=sys.executable)
    result = subprocess.run(["bash", str(EXAMPLES / "allreduce_bench.sh"), "--sizes", "4K,1M",
                             "--repeats", "2", "--warmup", "1"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    records = json.loads((tmp_path / "allreduce-2.json").read_text())
    assert {r["algorithm"] for r in records} == {"mpi", "ring", "shm", "memory"}


def test_plot_overlays_runs(tmp_path, small_data):
    pytest.importorskip("matplotlib", reason="mpitrain plot needs matplotlib")
    for name, lr in (("a", "0.05"), ("b", "0.01")):
        assert run_train(2, "--data", small_data, "--steps", "20", "--lr", lr, "--run-dir",
                         tmp_path / name, "--quiet").returncode == 0
    out = tmp_path / "both.png"
    result = run_mpi(1, ["-m", "mpitrain", "plot", tmp_path / "a", tmp_path / "b" /
                         "metrics.jsonl", "--out", out])
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10000
    default = run_mpi(1, ["-m", "mpitrain", "plot", tmp_path / "a"])
    assert default.returncode == 0 and (tmp_path / "a" / "plot.png").exists()
    missing = run_mpi(1, ["-m", "mpitrain", "plot", tmp_path / "nope"])
    assert missing.returncode == 2 and "nope: no such run directory" in missing.stderr


def test_the_plot_has_a_panel_per_task_metric():
    from mpitrain.run.plot import panels_for

    classification = [{"step": 1, "loss": 1, "accuracy": 0.5, "val_accuracy": 0.4}]
    regression = [{"step": 1, "loss": 1, "rmse": 2.0, "mae": 1.0, "r2": 0.3}]
    assert [k for k, _ in panels_for([classification])] == [
        "loss", "val_loss", "accuracy", "samples_per_s"]
    assert [k for k, _ in panels_for([classification, regression])] == [
        "loss", "val_loss", "accuracy", "rmse", "mae", "r2", "samples_per_s"]


def test_readme_api_example_runs(tmp_path, small_data):
    text = (ROOT / "README.md").read_text()
    start = text.index("# mpirun -n 2 python my_train.py")
    code = text[start:text.index("```", start)]
    code = code.replace("mpitrain.Config(", f"mpitrain.Config(data={small_data!r}, ")
    script = tmp_path / "my_train.py"
    script.write_text(code)
    result = run_mpi(2, [script])
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("val_accuracy") == 1


def rank_pids(script: str) -> list:
    """The pids of the ranks running ``script`` (python processes whose command line
    names it; not the launcher)."""
    from pathlib import Path

    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(script.encode() in a for a in argv) and b"python" in argv[0] \
                and not any(b"mpiexec" in a or b"hydra" in a for a in argv[:1]):
            found.append(int(proc.name))
    return found


@pytest.mark.timeout(400)
def test_own_loop_example_killed_at_a_random_step_and_relaunched_ends_bit_identical(tmp_path):
    """examples/own_loop.py: a loop of one's own over Trainer, Checkpoints, Watchdog,
    Preemption and MetricsLog.  SIGKILL to one of its ranks at a random step, then the
    same command again: it resumes and ends with the bits of the run never killed."""
    import random
    import signal
    import time

    from conftest import final, same_bits, scratch_dir

    script = EXAMPLES / "own_loop.py"
    args = ["--steps", "200", "--every", "20"]
    whole = run_mpi(2, [script, *args, "--ckpt-dir", tmp_path / "whole"], timeout=180)
    assert whole.returncode == 0, whole.stderr
    rng = random.Random(7)
    step, victim = rng.randrange(45, 180), rng.randrange(2)
    ckpt = tmp_path / "killed"
    cmd = [mpiexec(), "-n", "2", sys.executable, str(script), *args, "--ckpt-dir",
           str(ckpt)]
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env=clean_env(), cwd=scratch_dir())
    try:
        deadline = time.monotonic() + 120
        log = ckpt / "metrics.jsonl"
        while time.monotonic() < deadline:
            done = len(log.read_text().splitlines()) if log.exists() else 0
            if done >= step or job.poll() is not None:
                break
            time.sleep(0.01)
        pids = sorted(rank_pids(str(ckpt)))
        assert len(pids) == 2 and job.poll() is None, f"ranks {pids}, step {done}"
        os.kill(pids[victim], signal.SIGKILL)
        job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
            job.communicate()
    assert job.returncode != 0
    again = run_mpi(2, [script, *args, "--ckpt-dir", ckpt], timeout=180)
    assert again.returncode == 0, again.stderr
    assert "resuming from" in again.stdout and "own_loop: 2 ranks, steps " in again.stdout
    assert "steps 1-200" not in again.stdout
    assert same_bits(final(tmp_path / "whole"), final(ckpt)), f"killed near step {done}"
