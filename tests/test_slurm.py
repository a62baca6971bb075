"""The sbatch scripts under a real Slurm: a one-node cluster on this host.

tests/slurm_cluster.py installs (apt-get, as root, if missing) and starts
munged, slurmctld and slurmd; without root or where that fails these tests
are skipped with the reason. Each job runs 2 tasks (the machine may have
only 2 cores), is bounded in time, and is cancelled if it overstays.

Training runs are compared with an uninterrupted run of slurm/train.sbatch
through their final checkpoints, bit for bit where the layout is the same.
"""
import signal
import textwrap
import time

import numpy as np
import pytest

from mpitrain.fault import store
from conftest import final, same_bits, without
from slurm_cluster import (SETUP_BUDGET, launched_by, ok, pending, signal_state,  # noqa: F401
                           slurm, took)

STEPS = 60
ARGS = ["--hidden", "16", "--batch-size", "64", "--steps", str(STEPS), "--ckpt-every", "10",
        "--log-every", "5", "--optimizer", "adam", "--lr", "0.01"]



@pytest.fixture(scope="module")
def reference(slurm, small_data, tmp_path_factory):
    """train.sbatch on 2 tasks, uninterrupted: (the job, its final checkpoint)."""
    ckpt = tmp_path_factory.mktemp("slurm-reference")
    job = slurm.submit("slurm/train.sbatch",
                       ["--data", small_data, "--ckpt-dir", ckpt, *ARGS], timeout=120)
    ok(job)
    return job, final(ckpt)


@pytest.mark.timeout(SETUP_BUDGET + 150)
def test_train_sbatch_completes(slurm, reference, record_property):
    job, state = reference
    took(record_property, "train.sbatch, 2 tasks, 60 steps", job.seconds)
    assert "done: steps 1-60" in job.output
    assert ": 2 ranks, " in job.output
    assert state.step == STEPS
    # srun --mpi=pmi2 where Slurm has PMI-2 (Debian's has), else mpiexec
    has_pmi2 = "pmi2" in slurm.run("srun", "--mpi=list").stdout
    assert launched_by(job.output) == ("srun" if has_pmi2 else "mpiexec"), job.output[:600]


@pytest.mark.timeout(SETUP_BUDGET + 150)
def test_train_sbatch_with_mpiexec_gives_the_same_bits(slurm, small_data, tmp_path, reference,
                                                       record_property):
    """The fallback launcher (Slurm without PMI-2), forced: the same run, the same bits."""
    env = slurm.env(MPITRAIN_LAUNCHER="mpiexec")
    job = slurm.submit("slurm/train.sbatch",
                       ["--data", small_data, "--ckpt-dir", tmp_path, *ARGS], env=env,
                       timeout=120)
    took(record_property, "train.sbatch via mpiexec", job.seconds)
    ok(job)
    assert launched_by(job.output) == "mpiexec", job.output[:600]
    assert same_bits(final(tmp_path), reference[1])


@pytest.mark.timeout(SETUP_BUDGET + 150)
def test_pipeline_sbatch_completes(slurm, small_data, tmp_path, reference, record_property):
    job = slurm.submit("slurm/pipeline.sbatch",
                       ["--pp", "2", "--microbatches", "4", "--data", small_data,
                        "--ckpt-dir", tmp_path, *ARGS], timeout=120)
    took(record_property, "pipeline.sbatch --pp 2, 2 tasks", job.seconds)
    ok(job)
    assert "pipeline: 2 stages x 1 data-parallel replicas, 4 micro-batches" in job.output
    assert "done: steps 1-60" in job.output
    got = final(tmp_path)  # checkpoints are layout-free: compare with the dp=2 run
    assert got.step == STEPS and got.layout["pp"] == 2
    for k in got.params:  # micro-batches sum in another order: close, not bitwise
        np.testing.assert_allclose(got.params[k], reference[1].params[k], rtol=1e-3, atol=1e-4)


@pytest.mark.timeout(SETUP_BUDGET + 60)
def test_pipeline_sbatch_without_pp_refuses(slurm, small_data, record_property):
    job = slurm.submit("slurm/pipeline.sbatch", ["--data", small_data, *ARGS], timeout=60)
    took(record_property, "pipeline.sbatch without --pp, refused", job.seconds)
    assert job.state == "FAILED" and job.exit_code == 2, f"{job}\n{job.output}"
    assert "pipeline.sbatch: give --pp STAGES (a divisor of the 2 tasks)" in job.output


@pytest.mark.timeout(SETUP_BUDGET + 180)
def test_requeue_sbatch_relaunches_after_a_dead_rank_and_ends_bit_identical(
        slurm, small_data, tmp_path, reference, record_property):
    job = slurm.submit("slurm/train-requeue.sbatch",
                       ["--ckpt-dir", tmp_path, "--data", small_data, *ARGS,
                        "--fault", "kill:rank=1:step=25:attempt=1"], timeout=150)
    took(record_property, "train-requeue.sbatch, rank 1 killed at step 25, relaunched",
         job.seconds)
    ok(job)
    out = job.output
    assert "fault drill: rank 1 sends itself SIGKILL at step 25" in out
    assert "requeue 0 attempt 1: exit 0" not in out
    assert "train-requeue: job " in out and "requeue 0 attempt 2: exit 0" in out, out
    assert out.count("resuming from") == 1 and "at step 20 (epoch 2)" in out
    assert job.restarts == 0  # relaunched within the allocation, not requeued
    assert same_bits(final(tmp_path), reference[1])


@pytest.mark.timeout(SETUP_BUDGET + 180)
def test_requeue_sbatch_preempted_by_usr1_requeues_and_resumes_bit_identical(
        slurm, small_data, tmp_path, reference, record_property):
    """scancel --signal=USR1 (what --signal=USR1@120 sends before the time limit) reaches
    the ranks: they checkpoint at one step and exit 75; the script requeues the job;
    Slurm runs it again and it resumes from that checkpoint.

    Rank 0 stops itself (SIGSTOP, first launch only) at step 25, so that the signal
    surely meets a run in progress however fast the steps are; SIGCONT follows once
    the USR1 is seen pending on rank 0."""
    t0 = time.monotonic()
    job_id = slurm.sbatch("slurm/train-requeue.sbatch",
                          ["--ckpt-dir", tmp_path, "--data", small_data, *ARGS,
                           "--fault", "stop:rank=0:step=25:attempt=1"])
    deadline = time.monotonic() + 90
    rank0 = None
    while rank0 is None or not signal_state(rank0).get("State", "").startswith("T"):
        if time.monotonic() > deadline:  # cancels a running job and fails with its output
            job = slurm.wait(job_id, timeout=0)
            pytest.fail(f"rank 0 never stopped at step 25; the job ended:\n{job.output}")
        time.sleep(0.1)  # polling under a deadline
        rank0 = slurm.job_processes(job_id).get(0)
    slurm.run("scancel", "--signal=USR1", job_id)  # to the job's steps, not the script
    deadline = time.monotonic() + 30
    while not pending(rank0, signal.SIGUSR1):
        if time.monotonic() > deadline:
            job = slurm.wait(job_id, timeout=0)
            pytest.fail(f"USR1 never reached rank 0; the job ended:\n{job.output}")
        time.sleep(0.05)
    slurm.run("scancel", "--signal=CONT", job_id)
    job = slurm.wait(job_id, timeout=120, since=t0)
    took(record_property, "train-requeue.sbatch, USR1 -> exit 75 -> requeue -> resume",
         job.seconds)
    ok(job)
    out = job.output
    assert "stopped at step 25 on SIGUSR1; exit status 75" in out, out
    assert "requeue 0 attempt 1: exit 75" in out
    assert "train-requeue: pre-empted; requeueing to resume from the checkpoint" in out
    assert job.restarts == 1, job
    assert out.count("resuming from") == 1 and "at step 25 (epoch 2)" in out
    assert "requeue 1 attempt 1: exit 0" in out
    assert same_bits(final(tmp_path), reference[1])


@pytest.mark.timeout(SETUP_BUDGET + 90)
def test_requeue_sbatch_reports_a_refused_requeue_as_a_failure(slurm, small_data, tmp_path,
                                                               record_property):
    """Submitted with --no-requeue, 'scontrol requeue' is refused: the job must not
    end COMPLETED with its training unfinished."""
    job = slurm.submit("slurm/train-requeue.sbatch",
                       ["--ckpt-dir", tmp_path, "--data", small_data, *ARGS,
                        "--fault", "term:rank=0:step=25:attempt=1"],
                       sbatch_args=["--no-requeue"], timeout=60)
    took(record_property, "train-requeue.sbatch --no-requeue, pre-empted", job.seconds)
    assert job.state == "FAILED" and job.exit_code == 75, f"{job}\n{job.output}"
    assert "stopped at step 25 on SIGTERM" in job.output
    assert f"scontrol requeue {job.id} failed; resubmit to resume" in job.output
    assert [s for s, _ in store.listing(str(tmp_path))] == [10, 20, 25]


@pytest.mark.timeout(SETUP_BUDGET + 90)
def test_a_job_past_its_deadline_is_cancelled_and_the_test_fails(slurm, tmp_path,
                                                                 record_property):
    """The helper itself: a hung job must fail the test and be cancelled, not hang CI."""
    script = tmp_path / "hang.sbatch"
    script.write_text(textwrap.dedent("""\
        #!/bin/bash
        echo hanging
        exec sleep 600
        """))
    t0 = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match=r"after 5 s: cancelled it") as failed:
        slurm.submit(str(script), timeout=5)
    took(record_property, "a hung job cancelled at its 5 s deadline", time.monotonic() - t0)
    job_id = str(failed.value).split()[1]
    assert slurm.show(job_id).get("JobState") == "CANCELLED", slurm.show(job_id)


@pytest.mark.timeout(SETUP_BUDGET + 150)
def test_train_sbatch_submitted_from_anywhere_with_a_named_venv(slurm, small_data, tmp_path,
                                                                reference, record_property):
    """Submitted from a directory outside the checkout, with no venv on PATH: the script
    activates MPITRAIN_VENV and writes its runs/ where it was submitted."""
    import os
    import sys
    from pathlib import Path

    elsewhere = tmp_path / "my-project"
    elsewhere.mkdir()
    venv = Path(sys.executable).parent.parent
    env = slurm.env(MPITRAIN_VENV=str(venv))
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep)
                                  if not p.startswith(str(venv)))
    args = without(ARGS, "--ckpt-every")
    job = slurm.submit("slurm/train.sbatch", ["--data", small_data, *args],
                       env=env, cwd=elsewhere, timeout=120)
    took(record_property, "train.sbatch from outside the checkout", job.seconds)
    ok(job)
    assert "done: steps 1-60" in job.output
    assert [p.name for p in (elsewhere / "runs").iterdir()], "the run directory is there"


@pytest.mark.timeout(SETUP_BUDGET + 60)
def test_a_missing_python_is_said_with_its_own_status(slurm, small_data, tmp_path,
                                                      record_property):
    job = slurm.submit("slurm/train.sbatch", ["--data", small_data],
                       env=slurm.env(MPITRAIN_PYTHON="/nonexistent/python3"), cwd=tmp_path,
                       timeout=60)
    took(record_property, "train.sbatch with no usable python", job.seconds)
    assert job.state == "FAILED" and job.exit_code == 69, f"{job}\n{job.output}"
    assert ("train.sbatch: cannot run mpitrain: found /nonexistent/python3, which cannot "
            "import mpitrain; looked at MPITRAIN_PYTHON (/nonexistent/python3)") in job.output


@pytest.mark.timeout(SETUP_BUDGET + 200)
def test_train_elastic_sbatch_heals_a_killed_rank(slurm, small_data, tmp_path,
                                                    record_property):
    """slurm/train-elastic.sbatch (Open MPI's mpiexec --with-ft ulfm in the allocation):
    rank 1 is killed at step 20, a replacement takes its place, the job completes with
    the bits of the same script's uninterrupted run."""
    from conftest import ulfm_mpiexec

    import sys

    ulfm_mpiexec()  # Open MPI, or skip (CI's Open MPI pass requires it)
    # This venv (Open MPI's), not the checkout's .venv that the script would pick by default.
    env = slurm.env(MPITRAIN_VENV=sys.prefix)
    whole = slurm.submit("slurm/train-elastic.sbatch",
                         ["--data", small_data, "--ckpt-dir", tmp_path / "whole", *ARGS],
                         timeout=150, env=env)
    ok(whole)
    healed = slurm.submit("slurm/train-elastic.sbatch",
                          ["--data", small_data, "--ckpt-dir", tmp_path / "healed", *ARGS,
                           "--fault", "kill:rank=1:step=20"], timeout=150, env=env)
    ok(healed)
    assert "rank 1 died at step 20: respawned it in" in healed.output
    assert same_bits(final(tmp_path / "healed"), final(tmp_path / "whole"))
    took(record_property, "train-elastic.sbatch healed", healed.seconds)


@pytest.mark.timeout(SETUP_BUDGET + 150)
def test_train_sbatch_trains_a_torch_factory(slurm, small_data, tmp_path, record_property):
    """``--torch MODULE:FUNCTION`` through train.sbatch: the factory imported from the
    directory the job was submitted from, checkpoints in mpitrain's format."""
    import os
    import shutil
    from pathlib import Path

    if os.environ.get("MPITRAIN_TORCH_TESTS", "").strip().lower() != "require":
        pytest.importorskip("torch", reason="the PyTorch front end needs torch (optional)")
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(Path(__file__).with_name("torch_models.py"), project)
    job = slurm.submit("slurm/train.sbatch",
                       ["--torch", "torch_models:mlp", "--data", small_data, "--steps", "12",
                        "--batch-size", "64", "--ckpt-dir", tmp_path / "ckpt",
                        "--ckpt-every", "6"], cwd=project, timeout=120)
    took(record_property, "train.sbatch --torch", job.seconds)
    ok(job)
    assert "done: steps 1-12" in job.output
    state = final(tmp_path / "ckpt")
    assert state.step == 12 and "0.weight" in state.params
