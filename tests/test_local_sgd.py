"""Local SGD (``sync_every``, ``outer_lr``): exact against a reference, resumable bit for
bit after a kill or a pre-emption, and refused with the reason where it cannot apply."""
import json
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import (ROOT, clean_env, final, limit, run_mpi, run_train, same_bits,
                      ulfm_mpiexec)
from mpitrain import Config, ConfigError
from mpitrain.fault import store

STEPS = 32
ARGS = ["--hidden", "16", "--batch-size", "64", "--steps", str(STEPS), "--optimizer", "adam",
        "--lr", "0.01", "--log-every", "4"]
LOCAL = ["--sync-every", "4", "--outer-lr", "0.7", "--ckpt-every", "8"]


def train(data, ckpt, *extra, n=2):
    return run_train(n, "--data", data, "--ckpt-dir", ckpt, *ARGS, *extra, timeout=60)


@pytest.fixture(scope="module")
def reference(small_data, tmp_path_factory):
    """An uninterrupted 2-rank local-SGD run with DiLoCo's outer step."""
    ckpt = tmp_path_factory.mktemp("local-reference")
    result = train(small_data, ckpt, *LOCAL)
    assert result.returncode == 0, result.stderr
    assert [s for s, _ in store.listing(str(ckpt))] == [16, 24, 32]
    assert "local SGD: parameters and optimizer state averaged through shared memory (shm) every 4 " \
           "steps, outer Nesterov step lr 0.7 momentum 0.9" in result.stdout
    return final(ckpt)


@pytest.mark.timeout(150)
def test_sync_every_1_is_the_synchronous_step(small_data, tmp_path):
    runs = []
    for name, extra in (("plain", []), ("one", ["--sync-every", "1"])):
        result = train(small_data, tmp_path / name, *extra)
        assert result.returncode == 0, result.stderr
        runs.append(final(tmp_path / name))
    assert same_bits(*runs)


@pytest.mark.timeout(150)
@pytest.mark.parametrize("n", [2, 3])
def test_each_sum_of_the_sync_averages_the_same(small_data, tmp_path, n):
    """The sync's sum by each exchange (auto takes shm on one node): at 2 ranks the same
    bits (a + b in any order), at 3 the same values to rounding; the header names it."""
    runs = {}
    for by, said in (("auto", "shared memory (shm)"), ("mpi", "MPI Allreduce"),
                     ("ring", "mpitrain's ring")):
        extra = [] if by == "auto" else ["--allreduce", by]
        result = train(small_data, tmp_path / by, *LOCAL, *extra, n=n)
        assert result.returncode == 0, result.stderr
        assert f"averaged through {said} every 4 steps" in result.stdout
        runs[by] = final(tmp_path / by)
    if n == 2:
        assert same_bits(runs["auto"], runs["mpi"]) and same_bits(runs["auto"], runs["ring"])
    for by in ("mpi", "ring"):
        for name, value in runs["auto"].params.items():
            np.testing.assert_allclose(runs[by].params[name], value, rtol=1e-4, atol=1e-5)


def heal_train(data, ckpt, *extra, n):
    """A healing local-SGD job under Open MPI's ULFM (skipped elsewhere)."""
    return run_mpi(n, ["-m", "mpitrain", "train", "--data", data, "--ckpt-dir", ckpt, *ARGS,
                       *LOCAL, "--watchdog", "60", *extra], timeout=120,
                   launcher=ulfm_mpiexec())


@pytest.mark.timeout(300)
@pytest.mark.parametrize("n,rank,step", [(2, 1, 22), (3, 0, 13)])
def test_respawn_goes_back_to_the_last_sync_and_ends_bit_identical(small_data, tmp_path, n,
                                                                  rank, step):
    """A rank killed between syncs: every survivor goes back to the last sync point (the
    state every replica held), a replacement takes it, and the steps since run again:
    the bits of the run that never failed (rank 0 writes the logs and checkpoints)."""
    whole = heal_train(small_data, tmp_path / "whole", "--on-failure", "respawn", n=n)
    assert whole.returncode == 0, whole.stderr
    healed = heal_train(small_data, tmp_path / "healed", "--on-failure", "respawn",
                        "--fault", f"kill:rank={rank}:step={step}", n=n)
    assert healed.returncode == 0, healed.stderr
    back = (step - 1) // 4 * 4  # the last sync point before the death
    # The survivors see the death a step or two later (at the stop flags' sum or the sync).
    seen = re.findall(rf"rank {rank} died by step (\d+): respawned it in", healed.stdout)
    assert len(seen) == 1 and step <= int(seen[0]) <= back + 4, healed.stdout
    source = 1 if rank == 0 else 0  # the lowest survivor hands its state over
    assert (f"went on from step {back + 1} with rank {source}'s state (its last sync point: "
            f"steps {back + 1}-{seen[0]} run again)") in healed.stdout
    assert same_bits(final(tmp_path / "healed"), final(tmp_path / "whole"))


@pytest.mark.timeout(200)
def test_shrink_goes_on_from_the_last_sync_with_the_survivors(small_data, tmp_path):
    result = heal_train(small_data, tmp_path, "--on-failure", "shrink", "--fault",
                        "kill:rank=2:step=10", n=3)
    assert result.returncode == 0, result.stderr
    assert re.search(r"rank 2 died by step 1[012]: shrank to 2 ranks in .* went on from "
                     r"step 9 with rank 0's state", result.stdout), result.stdout
    state = final(tmp_path)
    assert state.step == STEPS and all(np.isfinite(a).all() for a in state.params.values())


@pytest.mark.timeout(100)
@pytest.mark.parametrize("options", [{"sync_every": 3},
                                     {"sync_every": 3, "outer_lr": 0.7, "outer_momentum": 0.8}])
def test_two_replicas_equal_a_hand_written_reference(tmp_path, options):
    out = tmp_path / "out.json"
    env = clean_env(PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}")
    result = run_mpi(2, [ROOT / "tests" / "local_sgd_job.py", out, json.dumps(options)],
                     timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    got = json.loads(out.read_text())
    assert got["replicas_equal"] and got["equal"], got


@pytest.mark.timeout(200)
def test_killed_between_syncs_and_relaunched_ends_bit_identical(small_data, tmp_path,
                                                               reference):
    killed = train(small_data, tmp_path, *LOCAL, "--fault", "kill:rank=1:step=22")
    assert killed.returncode != 0
    assert [s for s, _ in store.listing(str(tmp_path))] == [8, 16]
    again = train(small_data, tmp_path, *LOCAL)
    assert again.returncode == 0, again.stderr
    assert "at step 16" in again.stdout
    got = final(tmp_path)
    assert set(got.optimizer_state) >= {"outer_anchor", "outer_momentum"}
    assert same_bits(got, reference)


@pytest.mark.timeout(200)
@pytest.mark.parametrize("term,stop", [(9, 8), (13, 12), (11, 12)])
def test_preemption_stops_at_a_sync_point_and_resumes_bit_identical(small_data, tmp_path,
                                                                   reference, term, stop):
    """SIGTERM to one rank: the ranks learn it a step later (a non-blocking sum of the
    flags), go back to the last sync point and checkpoint it, or stop at the sync that
    comes first (syncs every 4 steps here); exit 75, and the resumed run ends with the
    bits of the run that never stopped."""
    stopped = train(small_data, tmp_path, *LOCAL, "--fault", f"term:rank=1:step={term}")
    assert stopped.returncode == 75, stopped.stderr
    assert [s for s, _ in store.listing(str(tmp_path))] == sorted({8, stop})
    assert stopped.stdout.count(f"stopped at step {stop}") == 1, stopped.stdout
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "step" in r and "loss" in r]
    assert len(steps) == len(set(steps))  # no record written twice
    again = train(small_data, tmp_path, *LOCAL)
    assert again.returncode == 0 and f"at step {stop}" in again.stdout, again.stderr
    assert same_bits(final(tmp_path), reference)


REFUSED = [
    (dict(strategy="ps"), "sync_every 8 with strategy ps: not supported: local SGD averages "
     "the replicas' own copies of the model, and a parameter server's workers hold none "
     "(use strategy allreduce)"),
    (dict(pp=2), "sync_every 8 with pp 2: not supported: local SGD averages whole replicas, "
     "and a pipeline stage holds a part of the model"),
    (dict(reproducible=True), "sync_every 8 with reproducible: not supported: its fixed "
     "groups make one synchronous sum the same at any rank count, and a local step is each "
     "replica's own"),
    (dict(torch="m:f"), "sync_every 8 with torch: not supported: the PyTorch front end "
     "exchanges gradients every step (local SGD covers mpitrain's own models)"),
    (dict(balance="speed"), "sync_every 8 with balance speed: not supported: local SGD "
     "weighs the replicas by fixed slices of each batch"),
    (dict(grad_dtype="bfloat16"), "sync_every 8 with grad_dtype bfloat16: not supported: "
     "no gradient is exchanged; the parameters are averaged in their own dtype"),
    (dict(ckpt_dir="c", ckpt_every=10), "ckpt_every 10 is not a multiple of sync_every 8: "
     "logs, evaluations and checkpoints fall on sync points, where the replicas agree"),
    (dict(eval_every=12), "eval_every 12 is not a multiple of sync_every 8: logs, "
     "evaluations and checkpoints fall on sync points, where the replicas agree"),
    (dict(log_every=4), "log_every 4 is not a multiple of sync_every 8: logs, evaluations "
     "and checkpoints fall on sync points, where the replicas agree"),
    (dict(overlap=True), "overlap True does not apply: it shapes the gradients' exchange, and "
     "with sync_every > 1 none crosses ranks: the parameters are averaged at each sync, by "
     "allreduce"),
    (dict(sync_every=0), "sync_every: expected a value >= 1 (1: a synchronous step), got 0"),
    (dict(sync_every=1, outer_lr=0.5), "outer_lr 0.5 does not apply: it is local SGD's "
     "outer step, and sync_every is 1"),
    (dict(outer_momentum=0.5), "outer_momentum 0.5 does not apply: it is the momentum of "
     "the outer step, and no outer_lr is given"),
]


@pytest.mark.parametrize("options, message", REFUSED)
def test_refusals_name_the_reason(options, message):
    with pytest.raises(ConfigError) as info:
        Config(**{"sync_every": 8, **options})
    assert str(info.value) == message


@pytest.mark.timeout(60)
def test_the_command_line_refuses_in_one_line_with_exit_2():
    cmd = [sys.executable, "-m", "mpitrain", "train", "--sync-every", "8", "--ckpt-dir", "c",
           "--ckpt-every", "10"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=clean_env(),
                            timeout=limit(30))
    assert result.returncode == 2
    assert result.stderr == ("mpitrain: error: --ckpt-every 10 is not a multiple of "
                             "--sync-every 8: logs, evaluations and checkpoints fall on sync "
                             "points, where the replicas agree\n")


@pytest.mark.timeout(60)
def test_a_diverged_replica_is_reported_by_every_rank_at_the_sync(small_data, tmp_path):
    result = run_train(2, "--data", small_data, "--hidden", "16", "--batch-size", "64",
                       "--steps", "20", "--sync-every", "4", "--optimizer", "sgd",
                       "--lr", "1e30", "--quiet", timeout=40)
    assert result.returncode == 2
    assert result.stderr.count("mpitrain: error: loss is not finite in steps 1-4 (epoch 0) "
                               "on some replica; try a lower lr (now 1e+30)") == 1
