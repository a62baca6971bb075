"""Checkpoint, kill, relaunch: real MPI jobs, real signals, each bounded in time.

A run is compared with an uninterrupted run of the same length through the
parameters and optimizer state of their final checkpoints.
"""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import (clean_env, final, mpiexec, run_train, same_bits, scratch_dir,
                      signal_launcher, skip_if_launcher_detaches, without)
from mpitrain.fault import checkpoint, store

STEPS = 60
ARGS = ["--hidden", "16", "--batch-size", "64", "--steps", str(STEPS), "--ckpt-every", "10",
        "--log-every", "5", "--optimizer", "adam", "--lr", "0.01"]


def train(n, data, ckpt, *extra, timeout=120):
    return run_train(n, "--data", data, "--ckpt-dir", ckpt, *ARGS, *extra, timeout=timeout)




@pytest.fixture(scope="module")
def reference(small_data, tmp_path_factory):
    """An uninterrupted 4-rank run of STEPS steps."""
    ckpt = tmp_path_factory.mktemp("reference")
    result = train(4, small_data, ckpt)
    assert result.returncode == 0, result.stderr
    assert [s for s, _ in store.listing(str(ckpt))] == [40, 50, 60]  # --keep-last 3
    return final(ckpt)


def test_sigkill_of_a_rank_ends_the_job_and_a_relaunch_ends_bit_identical(
        small_data, tmp_path, reference):
    killed = train(4, small_data, tmp_path, "--fault", "kill:rank=2:step=37")
    assert killed.returncode != 0  # mpiexec ends every rank when one dies
    assert "step 35/60" in killed.stdout and "step 40/60" not in killed.stdout
    assert [s for s, _ in store.listing(str(tmp_path))] == [10, 20, 30]
    again = train(4, small_data, tmp_path)
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("resuming from") == 1 and "at step 30" in again.stdout
    assert same_bits(final(tmp_path), reference)


def test_shm_allreduce_killed_and_relaunched_ends_bit_identical(small_data, tmp_path):
    """The sharded update keeps parameters and Adam's moments in memory the node's
    ranks share: its checkpoints and resume must be as exact as MPI's."""
    runs = {}
    for name, allreduce in (("mpi", "mpi"), ("shm", "shm")):
        runs[name] = tmp_path / name
        result = train(2, small_data, runs[name], "--allreduce", allreduce)
        assert result.returncode == 0, result.stderr
    killed_dir = tmp_path / "killed"
    killed = train(2, small_data, killed_dir, "--allreduce", "shm",
                   "--fault", "kill:rank=1:step=37")
    assert killed.returncode != 0
    again = train(2, small_data, killed_dir, "--allreduce", "shm")
    assert again.returncode == 0, again.stderr
    assert "at step 30" in again.stdout
    assert same_bits(final(killed_dir), final(runs["shm"]))
    assert same_bits(final(runs["shm"]), final(runs["mpi"]))  # 2 ranks: a + b = b + a


def test_kill_during_a_checkpoint_write(small_data, tmp_path, reference):
    killed = train(2, small_data, tmp_path, "--fault", "ckpt-kill:step=20")
    assert killed.returncode != 0
    names = sorted(os.listdir(tmp_path))  # the run directory is the checkpoint directory
    assert names[0].startswith(".ckpt-000000020.h5.tmp-")
    # The killed job's lock stays (its flock went with the process): the relaunch takes it.
    # best.h5: the best evaluation so far (each epoch's end, step 9 and 18), never pruned.
    assert names[1:] == [".mpitrain.lock", "best.h5", "ckpt-000000010.h5", "metrics.jsonl",
                         "run.jsonl"]
    assert checkpoint.load(str(tmp_path / "ckpt-000000010.h5")).step == 10
    again = train(4, small_data, tmp_path)
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("the leftover of an interrupted checkpoint write") == 1
    assert again.stdout.count("took over the lock of a job that is gone") == 1
    assert "at step 10" in again.stdout
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]
    # Written with 2 ranks up to step 10, finished with 4: close, not bitwise.
    got = final(tmp_path)
    assert got.step == 60
    for k in got.params:
        np.testing.assert_allclose(got.params[k], reference.params[k], rtol=2e-3, atol=2e-4)


def test_damaged_newest_checkpoints_are_skipped_with_a_warning(small_data, tmp_path, reference):
    first = train(4, small_data, tmp_path, "--fault", "kill:rank=0:step=45")
    assert first.returncode != 0
    from test_checkpoint import flip_byte

    flip_byte(str(tmp_path / "ckpt-000000040.h5"), "params/2.weight")
    with open(tmp_path / "ckpt-000000030.h5", "r+b") as fh:
        fh.truncate(2000)
    again = train(4, small_data, tmp_path)
    assert again.returncode == 0, again.stderr
    assert "warning: skipping checkpoint " in again.stdout
    assert "ckpt-000000040.h5: checksum of params/2.weight does not match" in again.stdout
    assert "ckpt-000000030.h5: unreadable" in again.stdout
    assert "at step 20" in again.stdout
    assert same_bits(final(tmp_path), reference)


@pytest.mark.parametrize("ranks", [2, 1])
def test_resume_on_fewer_ranks(small_data, tmp_path, reference, ranks):
    killed = train(4, small_data, tmp_path, "--fault", "kill:rank=1:step=33")
    assert killed.returncode != 0
    again = train(ranks, small_data, tmp_path)
    assert again.returncode == 0, again.stderr
    assert f"at step 30 (epoch 3), written by 4 ranks (pp 1 x dp 4), now {ranks} (pp 1 x dp {ranks})" in again.stdout
    got = final(tmp_path)
    assert got.step == 60 and got.layout["world_size"] == ranks
    for k in got.params:  # another reduction order: close, not bitwise
        np.testing.assert_allclose(got.params[k], reference.params[k], rtol=1e-3, atol=1e-4)


def test_preemption_signal_to_one_rank_checkpoints_everyone_at_the_same_step(
        small_data, tmp_path, reference):
    stopped = train(4, small_data, tmp_path, "--fault", "term:rank=3:step=23")
    assert stopped.returncode == 75, stopped.stderr
    assert [s for s, _ in store.listing(str(tmp_path))] == [10, 20, 23]
    assert stopped.stdout.count("stopped at step 23") == 1
    again = train(4, small_data, tmp_path)
    assert again.returncode == 0 and "at step 23" in again.stdout
    assert same_bits(final(tmp_path), reference)


@pytest.mark.parametrize("signame", ["SIGUSR1", "SIGTERM"])
def test_preemption_signal_through_mpiexec(small_data, tmp_path, signame):
    """The launcher forwards the signal; the job checkpoints, exits 75, and resumes exactly."""
    skip_if_launcher_detaches()
    cmd = [mpiexec(), "-n", "2", sys.executable, "-m", "mpitrain", "train", "--data",
           small_data, "--ckpt-dir", str(tmp_path), *ARGS, "--log-every", "1",
           "--steps", "100000", "--ckpt-every", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=clean_env(), cwd=scratch_dir())
    try:
        for line in proc.stdout:  # wait until training is under way
            if line.startswith("step ") and "/100000" in line:
                signal_launcher(proc, getattr(signal, signame))
                break
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 75, err
    assert "stopped at step" in out and f"on {signame}" in out
    [(step, path)] = store.listing(str(tmp_path))
    assert step >= 1
    # Continue a little past the stop, and compare with a run that never stopped.
    target = str(max(STEPS, step + 10))
    again = train(2, small_data, tmp_path, "--steps", target)
    assert again.returncode == 0, again.stderr
    assert f"at step {step}" in again.stdout
    whole = tmp_path / "whole"
    assert train(2, small_data, whole, "--steps", target).returncode == 0
    assert same_bits(final(tmp_path), final(whole))


@pytest.mark.parametrize("allreduce", ["mpi", "shm"], ids=["allreduce-mpi", "allreduce-shm"])
def test_watchdog_ends_a_job_with_a_stopped_rank(small_data, tmp_path, allreduce):
    result = train(4, small_data, tmp_path, "--fault", "stop:rank=1:step=12",
                   "--watchdog", "3", "--allreduce", allreduce, timeout=90)
    # MPI_Abort(3); mpiexec may report instead the SIGKILL (9) it sends the stopped rank
    assert result.returncode in (3, 9), (result.returncode, result.stderr[-2000:])
    assert result.stderr.count("mpitrain: watchdog: no progress for") == 1, (
        result.returncode, result.stdout[-800:], result.stderr)
    assert "at step 12: rank(s) [1] did not answer" in result.stderr
    assert "ranks [0, 2, 3] in exchange" in result.stderr


def test_resume_errors(small_data, tmp_path):
    assert train(2, small_data, tmp_path, "--steps", "10").returncode == 0
    none = train(2, small_data, tmp_path, "--resume", "none")
    assert none.returncode == 2
    assert none.stderr.count("holds checkpoints up to step 10; --resume none would "
                             "overwrite them") == 1
    other = train(2, small_data, tmp_path, "--hidden", "8")
    assert other.returncode == 2
    assert ("cannot resume: written for the model linear(16),relu,linear(3), this run's is "
            "linear(8),relu,linear(3) (check --model or --hidden)") in other.stderr
    batch = train(2, small_data, tmp_path, "--batch-size", "32")
    assert batch.returncode == 2 and "written with --batch-size 64, this run has 32" in batch.stderr
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"garbage")
    explicit = train(2, small_data, tmp_path, "--resume", bad)
    assert explicit.returncode == 2 and explicit.stderr.count("bad.h5: unreadable") == 1
    done = train(2, small_data, tmp_path, "--steps", "10")
    assert done.returncode == 0 and "nothing to do: the checkpoint is at step 10 of 10" in done.stdout
    # Rank 0 alone looks for a --resume file (the others may not see its disk).
    missing = train(2, small_data, tmp_path, "--resume", tmp_path / "nope.h5")
    assert missing.returncode == 2 and missing.stderr.count("nope.h5: no such checkpoint file") == 1


def test_a_stop_at_the_last_step_is_just_the_end(small_data, tmp_path):
    """A pre-emption signal on the last step: the run is complete, not pre-empted."""
    result = train(2, small_data, tmp_path, "--fault", f"term:rank=1:step={STEPS}")
    assert result.returncode == 0, result.stderr
    assert "stopped at step" not in result.stdout and "done: steps 1-60" in result.stdout
    assert store.listing(str(tmp_path))[-1][0] == STEPS


def test_local_relaunch_wrapper_survives_a_killed_rank(small_data, tmp_path):
    from conftest import ROOT

    env = clean_env(NP="2", RETRIES="2", MPIEXEC=mpiexec(), PYTHON=sys.executable)
    cmd = ["bash", str(ROOT / "examples" / "relaunch.sh"), "--data", small_data,
           "--ckpt-dir", str(tmp_path / "ckpt"), *ARGS,
           "--fault", "kill:rank=1:step=25:attempt=1,kill:rank=0:step=47:attempt=2"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("relaunching from the newest checkpoint") == 2
    assert "finished on attempt 3" in result.stdout
    assert "at step 20" in result.stdout and "at step 40" in result.stdout
    reference = tmp_path / "reference"
    assert train(2, small_data, reference).returncode == 0
    assert same_bits(final(tmp_path / "ckpt"), final(reference))


def test_relaunch_wrapper_gives_up_after_its_retries(small_data, tmp_path):
    from conftest import ROOT

    env = clean_env(NP="2", RETRIES="1", MPIEXEC=mpiexec(), PYTHON=sys.executable)
    cmd = ["bash", str(ROOT / "examples" / "relaunch.sh"), "--data", small_data,
           "--ckpt-dir", str(tmp_path), *ARGS, "--fault", "kill:rank=1:step=5"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode != 0
    assert "attempt 2 failed" in result.stderr and "no retries left (1)" in result.stderr


def test_pipeline_checkpoints_resume_bitwise_and_in_another_layout(small_data, tmp_path):
    pipe = ["--pp", "2", "--hidden", "16,12,8", "--microbatches", "3"]
    whole = tmp_path / "whole"
    assert train(4, small_data, whole, *pipe).returncode == 0
    broken = tmp_path / "broken"
    killed = train(4, small_data, broken, *pipe, "--fault", "kill:rank=3:step=27")
    assert killed.returncode != 0
    again = train(4, small_data, broken, *pipe)
    assert again.returncode == 0, again.stderr
    assert "written by 4 ranks (pp 2 x dp 2), now 4 (pp 2 x dp 2)" in again.stdout
    assert same_bits(final(broken), final(whole))
    # Written as pp=2 x dp=2 at step 40, finished as pp=1 x dp=2 (and pp=4 x dp=1).
    for n, layout in [(2, ["--pp", "1"]), (4, ["--pp", "4", "--schedule", "gpipe"])]:
        other = tmp_path / f"other{n}"
        other.mkdir()
        import shutil

        shutil.copy(broken / "ckpt-000000040.h5", other)
        result = train(n, small_data, other, "--hidden", "16,12,8", *layout)
        assert result.returncode == 0, result.stderr
        assert "at step 40" in result.stdout
        got, ref = final(other), final(whole)
        assert got.step == 60
        for k in ref.params:
            np.testing.assert_allclose(got.params[k], ref.params[k], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("args,message", [
    (["--pp", "3"], "--pp 3: the 4 ranks do not split into 3 pipeline stages"),
    (["--pp", "4", "--hidden", "8"], "--pp 4: more pipeline stages than the model's 2 layers with "
                                     "parameters"),
    (["--pp", "2", "--stage-layers", "1,1"], "--stage-layers 1,1: expected 2 counts >= 1 "
                                             "adding up to the model's 3 layers with parameters"),
    (["--pp", "2", "--batch-size", "1"], "--batch-size 1 is smaller than the 2 data-parallel "
                                         "replicas"),
])
def test_pipeline_option_errors(small_data, tmp_path, args, message):
    result = run_train(4, "--data", small_data, "--hidden", "8,8", *args)
    assert result.returncode == 2
    assert result.stderr.count(message) == 1, result.stderr


def test_sigterm_to_a_job_stuck_in_a_collective_aborts_after_the_grace(small_data, tmp_path):
    """Rank 1 is stopped, rank 0 waits in the all-reduce: a SIGTERM cannot be answered by a
    checkpoint, so the job aborts after --sigterm-grace instead of waiting for SIGKILL."""
    cmd = [mpiexec(), "-n", "2", sys.executable, "-m", "mpitrain", "train", "--data",
           small_data, *ARGS, "--ckpt-dir", str(tmp_path), "--watchdog", "0",
           "--sigterm-grace", "2", "--fault", "stop:rank=1:step=10"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=clean_env(), cwd=scratch_dir())
    try:
        for line in proc.stderr:  # rank 1 has stopped itself
            if "fault drill: rank 1 sends itself SIGSTOP at step 10" in line:
                t0 = time.monotonic()
                signal_launcher(proc, signal.SIGTERM)  # mpiexec forwards it to the ranks
                break
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode != 0 and proc.returncode != 75
    assert err.count("SIGTERM: the ranks did not stop within 2 s") == 1  # rank 1 is stopped
    # The stuck rank waited out the grace, then ended itself: long before a launcher's
    # KillWait (Slurm: 30 s) would have.
    assert 2 <= time.monotonic() - t0 < 10 * 2


def test_without_a_checkpoint_directory_a_signal_just_ends_the_job(small_data):
    """Nothing to checkpoint to: SIGTERM keeps its default effect (the ranks end at once,
    by the signal), never a checkpoint and exit 75."""
    skip_if_launcher_detaches()
    args = without(ARGS, "--ckpt-every")
    cmd = [mpiexec(), "-n", "2", sys.executable, "-m", "mpitrain", "train", "--data",
           small_data, *args, "--steps", "100000", "--log-every", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=clean_env(), cwd=scratch_dir())
    sent = False
    try:
        for line in proc.stdout:
            if line.startswith("step ") and "/100000" in line:
                signal_launcher(proc, signal.SIGTERM)
                sent = True
                break
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert sent, f"training never started: {err[-2000:]}"
    # mpiexec reports the ranks' end by SIGTERM as status 15 (143 from a shell)
    assert proc.returncode in (15, 143, -15), (proc.returncode, err[-2000:])
    assert "stopped at step" not in out and "done: steps" not in out


LEAVING = {
    # The pre-emption: the signal is recorded, the ranks agree, the block ends; then
    # srun --kill-on-bad-exit=1 signals this rank because another already exited 75.
    "preempted": """
with Preemption(10.0) as preemption:
    os.kill(os.getpid(), signal.SIGTERM)
    assert preemption.requested
    preemption.agree()
os.kill(os.getpid(), signal.SIGTERM)
sys.exit(75)
""",
    # An agreed error (bad input): rank 0 has printed it and left with 2.
    "agreed error": """
def fail():
    raise MpitrainError("shard 3 has 780 features, expected 784", everywhere=True)
try:
    run_or_abort(fail)
except SystemExit as exc:
    os.kill(os.getpid(), signal.SIGTERM)
    sys.exit(exc.code)
""",
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case,status", [("preempted", 75), ("agreed error", 2)])
def test_a_sigterm_after_the_ranks_agreed_to_leave_keeps_the_agreed_status(case, status):
    """srun --kill-on-bad-exit=1 sends SIGTERM to the tasks still alive when the first
    exits non-zero: a rank must still leave with the agreed status, not die by the signal
    (143), or the requeue script relaunches a pre-empted job instead of requeueing it."""
    code = ("import os, signal, sys\n"
            "from mpitrain.fault.preemption import Preemption\n"
            "from mpitrain.runtime import MpitrainError, run_or_abort\n" + LEAVING[case])
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=clean_env(), cwd=scratch_dir(), timeout=50)
    assert proc.returncode == status, (proc.returncode, proc.stderr[-2000:])
