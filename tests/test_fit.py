"""mpitrain.fit on a model with a layer of one's own, on arrays: the guarantees of
``mpitrain train`` through the Python API (jobs under mpiexec, each bounded in time).

The job is tests/fit_job.py; its model has ``fit_layers.Gate``, registered as ``gate``.
"""
import json
import random
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, clean_env, final, run_mpi, same_bits

JOB = ROOT / "tests" / "fit_job.py"
BASE = {"batch_size": 48, "optimizer": "adam", "lr": 0.01, "quiet": True, "steps": 30}


def fit(n, out, timeout=120, env=None, **options):
    """Run the fit job at ``n`` ranks; (completed process, its params by name)."""
    result = run_mpi(n, [JOB, out, json.dumps({**BASE, **options})], timeout=timeout, env=env)
    params = dict(np.load(out / "params.npz")) if (out / "params.npz").exists() else None
    return result, params


def equal(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.timeout(600)
def test_reproducible_fit_of_a_registered_layer_has_the_same_bits_at_1_to_4_ranks(tmp_path):
    runs = {}
    for n in (1, 2, 3, 4):
        result, runs[n] = fit(n, tmp_path / str(n), reproducible=True)
        assert result.returncode == 0, result.stderr
    assert all(equal(runs[1], runs[n]) for n in (2, 3, 4))
    for n in (2, 3, 4):
        assert json.loads((tmp_path / str(n) / "summary.json").read_text())["replicas_equal"]
    plain, params = fit(2, tmp_path / "plain")  # not reproducible: other bits, same names
    assert plain.returncode == 0 and params.keys() == runs[1].keys()


def drill(n, seed):
    """A rank and a step to kill, drawn from the test's own seed (printed on failure)."""
    rng = random.Random(f"fit-{n}-{seed}")
    return rng.randrange(n), rng.randrange(7, 27)  # after the first checkpoint (step 5)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("n,layout,seed", [(1, {}, 0), (2, {}, 1), (3, {}, 2),
                                           (4, {"pp": 2}, 3), (3, {"strategy": "ps"}, 4)],
                         ids=["1", "2", "3", "4-pp2", "3-ps"])
def test_fit_killed_at_a_random_step_and_relaunched_ends_bit_identical(tmp_path, n, layout,
                                                                        seed):
    common = dict(ckpt_every=5, **layout)
    whole, params = fit(n, tmp_path / "whole", ckpt_dir=str(tmp_path / "whole-ckpt"),
                        **common)
    assert whole.returncode == 0, whole.stderr
    rank, step = drill(n, seed)
    ckpt = str(tmp_path / "killed-ckpt")
    killed, _ = fit(n, tmp_path / "killed", ckpt_dir=ckpt, fault=f"kill:rank={rank}:step={step}",
                    **common)
    assert killed.returncode != 0 and not (tmp_path / "killed" / "params.npz").exists()
    again, resumed = fit(n, tmp_path / "killed", ckpt_dir=ckpt, **common)
    assert again.returncode == 0, again.stderr
    assert "done: steps 1-" not in again.stdout  # it resumed from a checkpoint
    assert equal(params, resumed), f"rank {rank} killed at step {step}"
    assert json.loads((tmp_path / "killed" / "summary.json").read_text())["replicas_equal"]
    assert same_bits(final(tmp_path / "whole-ckpt"), final(ckpt))


@pytest.mark.timeout(300)
def test_a_pre_empted_fit_exits_75_and_resumes_bit_identical(tmp_path):
    whole, params = fit(2, tmp_path / "whole", ckpt_dir=str(tmp_path / "a"))
    assert whole.returncode == 0, whole.stderr
    stopped, _ = fit(2, tmp_path / "b", ckpt_dir=str(tmp_path / "b-ckpt"),
                     fault="term:rank=1:step=12")
    assert stopped.returncode == 75, stopped.stderr
    assert "stopped at step 12 on" in stopped.stdout
    assert "Traceback" not in stopped.stderr
    again, resumed = fit(2, tmp_path / "b", ckpt_dir=str(tmp_path / "b-ckpt"))
    assert again.returncode == 0 and equal(params, resumed), again.stderr


def load_outputs(ckpt, importing: bool):
    """A fresh process's load_model of checkpoint ``ckpt`` (it imports the module of the
    registered layer or not), its outputs on the first 100 samples to ``ckpt.out.npy``."""
    script = ("import sys, numpy as np, mpitrain\n"
              + ("sys.path.insert(0, sys.argv[2])\nfrom fit_layers import arrays\n"
                 if importing else "") +
              "m = mpitrain.load_model(sys.argv[1])\n"
              "np.save(sys.argv[1] + '.out.npy', m.outputs(arrays()[0][:100]))\n")
    return subprocess.run([sys.executable, "-c", script, str(ckpt), str(ROOT / "tests")],
                          capture_output=True, text=True, env=clean_env(), timeout=120, cwd="/")


@pytest.mark.timeout(300)
def test_load_model_rebuilds_a_registered_layer_in_a_fresh_process_or_names_it(tmp_path):
    result, _ = fit(2, tmp_path / "run", ckpt_dir=str(tmp_path / "ckpt"))
    assert result.returncode == 0, result.stderr
    path = final_path(tmp_path / "ckpt")
    loaded = load_outputs(path, importing=True)
    assert loaded.returncode == 0, loaded.stderr
    assert np.array_equal(np.load(path + ".out.npy"),
                          np.load(tmp_path / "run" / "outputs.npy"))
    refused = load_outputs(path, importing=False)
    assert refused.returncode == 1
    assert ("needs layer 'gate', which is not registered in this process: import fit_layers "
            "(which registers fit_layers.Gate)") in refused.stderr


def final_path(ckpt):
    from mpitrain.fault import store

    return store.listing(str(ckpt))[-1][1]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("n", [2, 3])
def test_arrays_on_every_rank_on_one_rank_and_as_a_directory_give_the_same_bits(tmp_path, n):
    """ArrayDataset(x, y) everywhere, ArrayDataset(root=0), and a dataset directory prepared
    from the same arrays with the same validation share: the same rows, the same order."""
    from fit_layers import arrays
    from mpitrain.data.prepare import from_npz

    x, y = arrays()
    np.savez(tmp_path / "arrays.npz", x=x, y=y)
    from_npz(str(tmp_path / "arrays.npz"), str(tmp_path / "data"), shards=3, val_fraction=0.2)
    got = {}
    for where in ("arrays", "root", str(tmp_path / "data")):
        result, got[where] = fit(n, tmp_path / where.replace("/", "_"), data=where,
                                 eval_every=10)
        assert result.returncode == 0, result.stderr
        summary = json.loads((tmp_path / where.replace("/", "_") / "summary.json").read_text())
        got[where]["val"] = np.array([summary["val_loss"], summary["val_accuracy"]])
    assert equal(got["arrays"], got["root"])
    assert equal(got["arrays"], got[str(tmp_path / "data")])


@pytest.mark.timeout(300)
def test_fit_writes_every_output_and_resumes_on_another_rank_count(tmp_path):
    """The loop's outputs through fit: checkpoints, best.h5, metrics.jsonl, the timeline;
    early stopping; then a relaunch on 3 ranks resumes what 2 ranks wrote."""
    ckpt = tmp_path / "ckpt"
    first, _ = fit(2, tmp_path / "a", ckpt_dir=str(ckpt), steps=16, eval_every=4,
                   timeline=str(tmp_path / "t.json"), monitor="val_accuracy")
    assert first.returncode == 0, first.stderr
    names = sorted(p.name for p in ckpt.iterdir())
    assert {"best.h5", "ckpt-000000016.h5", "metrics.jsonl", "run.jsonl"} <= set(names)
    events = json.loads((tmp_path / "t.json").read_text())["traceEvents"]
    assert {e["pid"] for e in events if "pid" in e} == {0, 1}
    again, params = fit(3, tmp_path / "b", ckpt_dir=str(ckpt), steps=40, eval_every=4,
                        early_stop=2, monitor="val_loss")
    assert again.returncode == 0, again.stderr
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["start_step"] == 16 and summary["ranks"] == 3
    assert summary["replicas_equal"] and params is not None
