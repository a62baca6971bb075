"""The parameter server and speed-balanced batches: real MPI jobs, each bounded in time.

A parameter-server run is compared with an all-reduce run of the same global
batch through the parameters and optimizer state of their final checkpoints.
"""
import json

import numpy as np
import pytest

from conftest import final, run_mpi, run_train, same_bits
from mpitrain.fault import store

ARGS = ["--hidden", "16", "--batch-size", "60", "--steps", "24", "--ckpt-every", "0",
        "--log-every", "4", "--lr", "0.05"]


def train(n, data, ckpt, *extra, timeout=120):
    result = run_train(n, "--data", data, "--ckpt-dir", str(ckpt), *ARGS, *extra,
                       timeout=timeout)
    return result


def trained(n, data, ckpt, *extra):
    result = train(n, data, ckpt, *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    return final(ckpt)


def close(a, b) -> bool:
    """The same step and names; parameters and optimizer state equal to float tolerance."""
    return (a.step == b.step and a.params.keys() == b.params.keys()
            and all(np.allclose(a.params[k], b.params[k], rtol=1e-5, atol=1e-6)
                    for k in a.params)
            and all(np.allclose(a.optimizer_state[s][k], b.optimizer_state[s][k], rtol=1e-4,
                                atol=1e-6)
                    for s in a.optimizer_state for k in a.params))


def events(run_dir, name):
    """The ``event`` records called ``name`` in a run's metrics.jsonl."""
    with open(run_dir / "metrics.jsonl", encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [r for r in records if r.get("event") == name]


@pytest.mark.parametrize("extra", [("--optimizer", "sgd"),
                                   ("--optimizer", "adam", "--lr", "0.01", "--accumulate", "2"),
                                   ("--optimizer", "momentum", "--clip-grad-norm", "0.5")])
def test_synchronous_ps_trains_as_allreduce_does(small_data, tmp_path, extra):
    """1 server + 2 workers against 2 all-reduce ranks: the same global batch in the same
    two parts, so the same gradients; the sums' order may differ (float tolerance)."""
    ps = trained(3, small_data, tmp_path / "ps", "--strategy", "ps", *extra)
    ar = trained(2, small_data, tmp_path / "ar", *extra)
    assert close(ps, ar)
    assert ps.layout["strategy"] == "ps" and ps.layout["servers"] == 1


def test_synchronous_ps_is_bitwise_repeatable_with_one_or_two_servers(small_data, tmp_path):
    one = trained(3, small_data, tmp_path / "one", "--strategy", "ps", "--optimizer", "adam")
    again = trained(3, small_data, tmp_path / "again", "--strategy", "ps", "--optimizer", "adam")
    two = trained(4, small_data, tmp_path / "two", "--strategy", "ps", "--servers", "2",
                  "--optimizer", "adam", "--bucket-mb", "0.001")
    assert same_bits(one, again)
    assert same_bits(one, two)  # 2 workers either way: each slice summed in worker order


def test_ps_checkpoints_resume_as_allreduce_and_the_other_way(small_data, tmp_path):
    """A ps run stopped half-way resumes as all-reduce and the reverse, each ending where
    an uninterrupted run of the other strategy ends."""
    half = [a if a != "24" else "12" for a in ARGS]
    ar_full = trained(2, small_data, tmp_path / "ar", "--optimizer", "adam")
    ps_full = trained(3, small_data, tmp_path / "ps", "--strategy", "ps", "--optimizer", "adam")
    for first, then, reference in ((["--strategy", "ps"], [], ar_full),
                                   ([], ["--strategy", "ps"], ps_full)):
        ckpt = tmp_path / ("from-" + ("ps" if first else "ar"))
        n1, n2 = (3, 2) if first else (2, 3)
        r = run_train(n1, "--data", small_data, "--ckpt-dir", str(ckpt), *half, *first,
                      "--optimizer", "adam")
        assert r.returncode == 0, r.stderr[-2000:]
        assert [s for s, _ in store.listing(str(ckpt))] == [12]
        resumed = trained(n2, small_data, ckpt, *then, "--optimizer", "adam")
        assert close(resumed, reference)


def test_a_killed_ps_run_resumes_bit_identical(small_data, tmp_path):
    reference = trained(3, small_data, tmp_path / "ref", "--strategy", "ps", "--ckpt-every",
                        "5", "--optimizer", "adam")
    ckpt = tmp_path / "killed"
    killed = train(3, small_data, ckpt, "--strategy", "ps", "--ckpt-every", "5",
                   "--optimizer", "adam", "--fault", "kill:rank=2:step=13")
    assert killed.returncode != 0
    assert [s for s, _ in store.listing(str(ckpt))] == [5, 10]
    again = train(3, small_data, ckpt, "--strategy", "ps", "--ckpt-every", "5",
                  "--optimizer", "adam")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "at step 10" in again.stdout
    assert same_bits(final(ckpt), reference)


def test_stale_synchronous_workers_stop_together_s_steps_after_a_request(small_data, tmp_path):
    """A SIGTERM to a worker at step 5 (its stop request rides clock 5) is known to every
    rank by the end of step 5 + S: all stop there, checkpointed, and a relaunch finishes."""
    ckpt = tmp_path / "ssp"
    args = ["--strategy", "ps", "--staleness", "2", "--ckpt-every", "100"]
    stopped = train(4, small_data, ckpt, *args, "--fault", "term:rank=3:step=5:attempt=1")
    assert stopped.returncode == 75, stopped.stderr[-2000:]
    assert [s for s, _ in store.listing(str(ckpt))] == [7]
    done = train(4, small_data, ckpt, *args, "--fault", "term:rank=3:step=5:attempt=1",
                 timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert final(ckpt).step == 24


def test_stale_synchronous_training_learns_and_reports_its_staleness(small_data, tmp_path):
    result = train(4, small_data, tmp_path, "--strategy", "ps", "--staleness", "3",
                   "--fault", "slow:rank=3:factor=3", "--steps", "40")
    assert result.returncode == 0, result.stderr[-2000:]
    line = [ln for ln in result.stdout.splitlines() if ln.startswith("done:")][0]
    assert "staleness" in line, line
    most = int(line.split("staleness at most ")[1].split()[0])
    assert 0 <= most <= 3


@pytest.mark.parametrize("n, extra", [(2, []), (3, ["--strategy", "ps"])])
def test_speed_balanced_batches_give_the_even_split_gradient(small_data, tmp_path, n, extra):
    """A 4x slower last rank gets a smaller share (logged, recorded in the checkpoint); the
    result still equals the even split's to float tolerance."""
    slow = ["--fault", f"slow:rank={n - 1}:factor=4"]
    even = trained(n, small_data, tmp_path / "even", *extra)
    balanced = trained(n, small_data, tmp_path / "bal", *extra, *slow, "--balance", "speed",
                       "--balance-every", "4")
    assert close(balanced, even)
    changes = events(tmp_path / "bal", "balance")
    assert changes, "no split was logged"
    shares = changes[-1]["shares"]
    assert sum(shares) == 60 and shares[-1] < shares[-2]
    assert balanced.layout["shares"] == shares


@pytest.mark.parametrize("n, args, message", [
    (3, ["--strategy", "ps", "--servers", "3"], "--servers 3 with 3 ranks leaves no worker"),
    (2, ["--staleness", "1"], "--staleness 1 does not apply"),
    (4, ["--strategy", "ps", "--pp", "2"], "--strategy ps with --pp 2: not supported"),
    (3, ["--strategy", "ps", "--on-failure", "shrink"], "with --strategy ps: not supported"),
    (3, ["--strategy", "ps", "--allreduce", "ring"], "--allreduce 'ring' does not apply"),
    (3, ["--strategy", "ps", "--staleness", "1", "--balance", "speed"],
     "--balance speed with --staleness 1"),
])
def test_parameter_server_option_errors(small_data, tmp_path, n, args, message):
    result = train(n, small_data, tmp_path, *args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr, result.stderr
    assert result.stderr.count("mpitrain: error") == 1
    assert not list(tmp_path.iterdir())  # refused before anything was written


@pytest.mark.timeout(400)
def test_bench_stragglers_table_and_json(small_data, tmp_path):
    out = tmp_path / "stragglers.json"
    result = run_mpi(3, ["-m", "mpitrain", "bench", "stragglers", "--data", small_data,
                         "--accuracy-data", small_data, "--hidden", "16", "--batch", "30",
                         "--repeats", "2", "--steps", "4", "--warmup", "2", "--epochs", "1",
                         "--variants", "allreduce,allreduce-speed,ps-ssp1",
                         "--json", str(out)], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    records = json.loads(out.read_text())
    speed = [r for r in records if "samples_per_s" in r]
    assert {(r["variant"], r["scenario"]) for r in speed} == {
        (v, s) for v in ("allreduce", "allreduce-speed", "ps-ssp1")
        for s in ("none", "slow", "jitter")}
    assert all(r["min"] <= r["samples_per_s"] <= r["max"] for r in speed)
    assert all(r["vs_allreduce"] == 1.0 for r in speed if r["variant"] == "allreduce")
    accuracy = [r for r in records if "val_accuracy" in r]
    assert len(accuracy) == 9 and all(0 <= r["val_accuracy"] <= 1 for r in accuracy)
    assert "ps-ssp1" in result.stdout and "validation accuracy" in result.stdout
