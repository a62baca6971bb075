"""The training recipe from the command line: real jobs under mpiexec, each bounded in time.

Schedules, clipping, accumulation and dropout across a kill and a relaunch;
early stopping and best.h5; the model text in checkpoints, ``inspect``,
``evaluate`` and ``load_model``; the options' errors.
"""
import numpy as np
import pytest

from conftest import final, run_mpi, run_train, same_bits
from mpitrain.fault import checkpoint, store
from mpitrain.model.schedule import Schedule
from mpitrain.run.metrics import read_log

CNN = ("conv2d(4,3,padding=1),relu,maxpool2d(2),flatten,linear(16),gelu,dropout(0.25),"
       "linear(4)")
RECIPE = ["--model", CNN, "--batch-size", "40", "--steps", "40", "--optimizer", "adamw",
          "--lr", "0.01", "--lr-schedule", "cosine", "--warmup-steps", "8", "--lr-min",
          "0.001", "--clip-grad-norm", "0.5", "--accumulate", "2", "--ckpt-every", "10",
          "--log-every", "1"]


def recipe(n, data, ckpt, *extra, timeout=180):
    return run_train(n, "--data", data, "--ckpt-dir", ckpt, *RECIPE, *extra, timeout=timeout)


@pytest.mark.parametrize("layout", [[], ["--pp", "2", "--microbatches", "2"]],
                         ids=["data-parallel", "pipeline"])
def test_the_recipe_killed_and_relaunched_ends_bit_identical(image_data, tmp_path, layout):
    """A cosine schedule with warm-up, clipping, accumulation and dropout, killed at step 27
    and relaunched: the same bits as the run that was not."""
    whole = recipe(2, image_data, tmp_path / "whole", *layout)
    assert whole.returncode == 0, whole.stderr
    killed = recipe(2, image_data, tmp_path / "killed", *layout, "--fault",
                    "kill:rank=1:step=27")
    assert killed.returncode != 0
    again = recipe(2, image_data, tmp_path / "killed", *layout)
    assert again.returncode == 0, again.stderr
    assert "resuming from" in again.stdout and "at step 20" in again.stdout
    a, b = final(tmp_path / "whole"), final(tmp_path / "killed")
    assert same_bits(a, b)
    assert a.loop == b.loop and a.model == b.model
    # The relaunch logged the same learning rates and losses for steps 21-40.
    first = {r["step"]: r for r in read_log(str(tmp_path / "whole"))}
    second = {r["step"]: r for r in read_log(str(tmp_path / "killed")) if r["step"] > 20}
    assert all(second[s]["lr"] == first[s]["lr"] and second[s]["loss"] == first[s]["loss"]
               for s in second)


def test_the_lr_is_logged_every_step_and_recorded_in_the_checkpoint(image_data, tmp_path):
    result = recipe(1, image_data, tmp_path, "--steps", "30")
    assert result.returncode == 0, result.stderr
    records = read_log(str(tmp_path))
    schedule = Schedule(0.01, "cosine", total=30, warmup=8, lr_min=0.001)
    assert [r["step"] for r in records] == list(range(1, 31))
    assert [r["lr"] for r in records] == [schedule(s) for s in range(30)]
    assert records[0]["lr"] == pytest.approx(0.01 / 8) and records[7]["lr"] == 0.01
    assert records[-1]["lr"] == pytest.approx(0.001, rel=0.05)
    state = final(tmp_path)
    assert state.loop["lr"] == state.optimizer["lr"] == schedule(29)
    assert "cosine to 0.001 over 30 steps, after 8 warm-up steps" in result.stdout


def test_clipping_is_logged_when_it_clips(image_data, tmp_path):
    result = recipe(2, image_data, tmp_path, "--steps", "20", "--clip-grad-norm", "1e-6",
                    "--log-every", "5")
    assert result.returncode == 0, result.stderr
    records = read_log(str(tmp_path))
    assert [r["clipped_steps"] for r in records if "clipped_steps" in r][:4] == [5, 5, 5, 5]
    assert all(r["grad_norm"] > 1e-6 for r in records)
    assert "grad_norm" in result.stdout and "(clipped 5x)" in result.stdout
    assert "20 steps clipped" in result.stdout


def test_the_summary_reports_the_activations_kept_for_backward(image_data, tmp_path):
    """Accumulating over 4 micro-batches keeps a quarter of the activations: the summary
    says so, in MiB, beside the peak resident memory."""
    import re
    kept = {}
    for k in (1, 4):
        result = recipe(1, image_data, tmp_path / str(k), "--steps", "2", "--accumulate",
                        str(k), "--warmup-steps", "1")  # 8 would outlast the 2 steps: refused
        assert result.returncode == 0, result.stderr
        match = re.search(r"memory: ([0-9.,e-]+) MiB of activations kept for backward, "
                          r"[0-9,]+ MiB peak per rank", result.stdout)
        assert match, result.stdout
        kept[k] = float(match.group(1).replace(",", ""))
    assert kept[1] / kept[4] == pytest.approx(4, rel=0.05)


def test_early_stopping_keeps_the_best_checkpoint(image_data, tmp_path):
    """Evaluations every 5 steps, patience 2, a learning rate too high to keep improving:
    it stops early with exit 0, best.h5 holds the best evaluation (never pruned with
    --keep-last 1) and a relaunch has nothing to do."""
    args = ["--data", image_data, "--ckpt-dir", tmp_path, "--model", CNN, "--batch-size",
            "40", "--steps", "400", "--optimizer", "adam", "--lr", "0.05", "--eval-every",
            "5", "--early-stop", "2", "--keep-last", "1", "--log-every", "5"]
    result = run_train(2, *args, timeout=180)
    assert result.returncode == 0, result.stderr
    evals = [r for r in read_log(str(tmp_path)) if "val_loss" in r]
    losses = [r["val_loss"] for r in evals]
    best = int(np.argmin(losses))
    assert len(evals) == best + 3  # the best, then two evaluations without improvement
    stop = evals[-1]["step"]
    assert stop < 400
    assert (f"early stop: val_loss has not improved for 2 evaluations (patience 2; best "
            f"{losses[best]:.6g} at step {evals[best]['step']})") in result.stdout
    assert [s for s, _ in store.listing(str(tmp_path))] == [stop]
    kept = checkpoint.load(str(tmp_path / "best.h5"))
    assert kept.step == evals[best]["step"] and kept.loop["best"] == losses[best]
    # best.h5 is a checkpoint like any: evaluate reproduces its validation loss.
    again = run_mpi(2, ["-m", "mpitrain", "evaluate", tmp_path / "best.h5", "--data",
                        image_data])
    assert again.returncode == 0, again.stderr
    shown = dict(line.split(None, 1) for line in again.stdout.splitlines())
    assert float(shown["loss"]) == pytest.approx(losses[best], rel=1e-5)
    relaunch = run_train(2, *args)
    assert relaunch.returncode == 0, relaunch.stderr
    assert f"nothing to do: the run stopped early at step {stop}" in relaunch.stdout


def test_checkpoints_record_the_model_and_rebuild_it(image_data, tmp_path):
    result = run_train(2, "--data", image_data, "--ckpt-dir", tmp_path, "--model", CNN,
                       "--steps", "12", "--batch-size", "40", "--optimizer", "adam", "--lr",
                       "0.01")
    assert result.returncode == 0, result.stderr
    state = final(tmp_path)
    assert state.model == {"spec": CNN, "input_shape": [2, 6, 6]}
    shown = run_mpi(1, ["-m", "mpitrain", "inspect", store.listing(str(tmp_path))[-1][1]])
    assert f"model {CNN} for samples of shape (2, 6, 6)" in shown.stdout
    from mpitrain import load_model
    from mpitrain.data.manifest import read_manifest
    from mpitrain.data.shards import Shards

    model = load_model(store.listing(str(tmp_path))[-1][1])
    val = Shards(read_manifest(image_data), "val")
    x, y = val.read_range(0, len(val))
    assert x.shape == (80, 2, 6, 6)  # samples keep their shape
    p = model(x)
    assert p.shape == (80, 4) and np.allclose(p.sum(axis=1), 1)
    np.testing.assert_array_equal(model(x.reshape(80, -1)), p)  # flattened samples too
    accuracy = float((p.argmax(axis=1) == y).mean())
    record = [r for r in read_log(str(tmp_path)) if "val_accuracy" in r][-1]
    assert accuracy == pytest.approx(record["val_accuracy"])
    with pytest.raises(Exception, match=r"expected samples of shape \(2, 6, 6\) \(72 values "
                                        r"each\), got inputs of shape \(3, 70\)"):
        model(np.zeros((3, 70), np.float32))


@pytest.mark.parametrize("args,message", [
    (["--microbatches", "4"], "--microbatches 4 does not apply: it cuts a pipeline's batch, "
                              "and --pp is 1: --accumulate N computes each batch in N "
                              "micro-batches without a pipeline"),
    (["--accumulate", "30", "--batch-size", "40"],
     "--accumulate 30 cuts each replica's part of --batch-size 40 (20 samples for 2 replicas) "
     "into 30 micro-batches: more than it has samples"),
    (["--model", "conv2d(4,3),relu,linear(4)"],
     "--model conv2d(4,3),relu,linear(4): layer 2 linear(4): takes (features,) samples, got "
     "shape (4, 4, 4): add flatten before it"),
    (["--model", "flatten,linear(5)"], "the model ends in samples of shape (5,), the task "
                                       "needs (4,): end with linear(4)"),
    (["--monitor", "val_rmse", "--early-stop", "3"],
     "--monitor val_rmse: this task's validation metrics are val_loss, val_accuracy"),
    (["--pp", "2", "--model", "flatten,linear(4)"],
     "--pp 2: more pipeline stages than the model's 1 layers with parameters"),
])
def test_recipe_errors_name_the_flags(image_data, args, message):
    result = run_train(2, "--data", image_data, "--steps", "5", *args)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count(message) == 1, result.stderr


def test_early_stopping_needs_a_validation_split(tmp_path):
    from mpitrain.data.prepare import synthetic

    synthetic(str(tmp_path / "noval"), samples=100, features=4, classes=2, val_fraction=0.0)
    result = run_train(1, "--data", tmp_path / "noval", "--steps", "5", "--batch-size", "20",
                       "--early-stop", "2")
    assert result.returncode == 2
    assert ("--early-stop 2 follows val_loss, and the data has no validation split"
            in result.stderr)
