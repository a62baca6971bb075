"""Careless and hostile inputs through the command line: one line, the right status, nothing
lost; one job per checkpoint directory; a disk that fills up.  Real MPI jobs, bounded in time.
"""
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from conftest import (clean_env, mpiexec, run_mpi, run_train, scratch_dir, signal_launcher,
                      skip_if_launcher_detaches)
from mpitrain.fault import checkpoint, store

ARGS = ["--hidden", "16", "--batch-size", "64", "--log-every", "5", "--optimizer", "adam",
        "--lr", "0.01"]


def one_error(result, text, status=2):
    """The job ended with ``status`` before step 1, printing ``text`` once, in one line."""
    assert result.returncode == status, (result.returncode, result.stderr[-3000:])
    errors = [line for line in result.stderr.splitlines() if line.startswith("mpitrain: error")]
    assert len(errors) == 1 and text in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "step " not in result.stdout


def test_a_second_job_on_a_checkpoint_directory_is_refused_and_touches_nothing(small_data,
                                                                              tmp_path):
    skip_if_launcher_detaches()
    ckpt = tmp_path / "ckpt"
    cmd = [mpiexec(), "-n", "2", sys.executable, "-m", "mpitrain", "train", "--data",
           small_data, "--ckpt-dir", str(ckpt), *ARGS, "--steps", "100000", "--ckpt-every",
           "0", "--no-keep-best", "--log-every", "1"]  # nothing written while it trains
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=clean_env(), cwd=scratch_dir())
    try:
        for line in first.stdout:  # training is under way, the directory locked
            if line.startswith("step ") and "/100000" in line:
                break
        before = sorted(os.listdir(ckpt))
        second = run_train(2, "--data", small_data, "--ckpt-dir", ckpt, *ARGS, "--steps", "10",
                           timeout=60)
        one_error(second, f"{ckpt}: the checkpoint directory is in use by another job (host ")
        holder = json.loads((ckpt / ".mpitrain.lock").read_text())  # rank 0 of the first
        assert f"pid {holder['pid']}, since {holder['since']}" in second.stderr
        os.kill(holder["pid"], 0)  # alive: the named holder is the running job
        assert sorted(os.listdir(ckpt)) == before
        signal_launcher(first, signal.SIGUSR1)  # the first job checkpoints and stops
        out, err = first.communicate(timeout=60)
    finally:
        first.kill()
    assert first.returncode == 75, err[-2000:]
    assert len((ckpt / "run.jsonl").read_text().splitlines()) == 1  # the first job's only
    [(step, path)] = store.listing(str(ckpt))
    assert checkpoint.load(path).step == step
    assert not os.path.exists(ckpt / ".mpitrain.lock")  # released at the end


def test_a_checkpoint_directory_that_is_a_file(small_data, tmp_path):
    target = tmp_path / "taken"
    target.write_text("precious")
    result = run_train(2, "--data", small_data, "--ckpt-dir", target, *ARGS, "--steps", "5")
    one_error(result, f"--ckpt-dir {target}: not a directory")
    assert target.read_text() == "precious"


def test_a_read_only_checkpoint_directory_is_found_before_step_1(small_data, tmp_path):
    """A private mount namespace makes the directory read-only for this job alone."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("a read-only bind mount needs root and unshare")
    ckpt = tmp_path / "ro"
    ckpt.mkdir()
    cmd = (f"mount --bind -o ro {ckpt} {ckpt} && exec {mpiexec()} -n 2 {sys.executable} -m "
           f"mpitrain train --data {small_data} --ckpt-dir {ckpt} {' '.join(ARGS)} --steps 5")
    result = subprocess.run(["unshare", "-m", "sh", "-c", cmd], capture_output=True, text=True,
                            timeout=60, env=clean_env(), cwd=scratch_dir())
    if "mount:" in result.stderr:
        pytest.skip(f"no bind mount here: {result.stderr.strip()}")
    one_error(result, f"--ckpt-dir {ckpt}: cannot take its lock: Read-only file system "
                      "(errno 30, EROFS)")


FULL_DISK = """
import hashlib, json, os, subprocess, sys
ckpt, out, mpiexec, data = sys.argv[1:5]
args = sys.argv[5:]
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", ckpt], check=True)
run = lambda steps: subprocess.run([mpiexec, "-n", "2", sys.executable, "-m", "mpitrain",
                                    "train", "--data", data, "--ckpt-dir", ckpt, *args,
                                    "--steps", steps], capture_output=True, text=True)
def files():
    return {n: hashlib.sha256(open(os.path.join(ckpt, n), "rb").read()).hexdigest()
            for n in sorted(os.listdir(ckpt)) if n.startswith("ckpt-")}
first = run("20")
before = files()
st = os.statvfs(ckpt)  # leave about 30 kB: less than a checkpoint
with open(os.path.join(ckpt, "filler"), "wb") as f:
    f.write(bytes(max(0, st.f_bavail * st.f_frsize - 30000)))
second = run("40")
json.dump({"first": first.returncode, "first_err": first.stderr[-2000:],
           "code": second.returncode, "stderr": second.stderr, "stdout": second.stdout,
           "before": before, "after": files(), "names": sorted(os.listdir(ckpt))},
          open(out, "w"))
"""


def test_a_disk_that_fills_up_ends_the_job_with_one_line_and_keeps_the_checkpoints(
        small_data, tmp_path):
    """A real full disk: a 2 MB tmpfs, in a mount namespace of this test alone, filled up
    after the first run; the second run's first checkpoint cannot be written."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("a private tmpfs needs root and unshare")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    driver = tmp_path / "full_disk.py"
    driver.write_text(FULL_DISK)
    args = [*ARGS, "--hidden", "256", "--ckpt-every", "10"]
    done = subprocess.run(["unshare", "-m", sys.executable, str(driver), str(ckpt),
                           str(tmp_path / "out.json"), mpiexec(), small_data, *args],
                          capture_output=True, text=True, timeout=240, env=clean_env(),
                          cwd=scratch_dir())
    if "mount:" in done.stderr or not (tmp_path / "out.json").exists():
        pytest.skip(f"no private tmpfs here: {done.stderr.strip()[-500:]}")
    got = json.loads((tmp_path / "out.json").read_text())
    assert got["first"] == 0, got["first_err"]
    assert got["code"] == 74, got["stderr"][-3000:]
    errors = [line for line in got["stderr"].splitlines() if line.startswith("mpitrain: error")]
    assert errors == [f"mpitrain: error: {ckpt}: cannot write the checkpoint of step 30: No "
                      "space left on device (errno 28, ENOSPC); the earlier checkpoints are "
                      "intact"], got["stderr"][-3000:]
    assert "Traceback" not in got["stderr"] and "HDF5" not in got["stderr"]
    assert got["after"] == got["before"] and len(got["before"]) == 2
    assert not [n for n in got["names"] if n.startswith(".ckpt-")]  # no temporary file left


@pytest.mark.parametrize("args,text", [
    (["--hidden", "10000000,10000000"], "the model does not fit in memory: 100,000,170,000,003 "
                                        "parameters x 4 bytes x 5 arrays"),
    # 4 groups (the default) on 2 ranks: 2 buffers of groups held apart, one of shards
    (["--hidden", "10000000,10000000", "--reproducible"],
     "x 4 bytes x 8 arrays (parameters, gradients, the exchange buffer, adam's state, the "
     "groups' buffers of --reproducible)"),
    (["--watchdog", "nan"], "--watchdog: expected a finite number, got nan"),
    (["--bucket-mb", "nan"], "--bucket-mb: expected a finite number, got nan"),
    (["--seed", "-1"], "--seed: expected a value >= 0, got -1"),
    (["--schedule", "gpipe"], "--schedule 'gpipe' does not apply"),
])
def test_bad_options_are_one_line_and_exit_2(small_data, args, text):
    result = run_train(2, "--data", small_data, "--optimizer", "adam", *args, "--steps", "5")
    one_error(result, text)


def test_absurd_classes_in_a_manifest_are_named_with_the_memory_they_need(data_copy):
    path = os.path.join(data_copy, "manifest.json")
    meta = json.load(open(path))
    meta["task"]["classes"] = 10 ** 12
    json.dump(meta, open(path, "w"))
    result = run_train(2, "--data", data_copy, "--steps", "5")
    one_error(result, "the model does not fit in memory: 257,000,000,069,120 parameters")
    assert ("choose a smaller --hidden or --batch-size, or --accumulate the batch in parts "
            "(or check the data's features and classes)") in result.stderr


@pytest.mark.parametrize("make,text", [
    (lambda p: p.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100),
     "input.npz: not a readable HDF5 file: "),  # read as HDF5, whatever its name
    (lambda p: p.write_text("x,y\n1,2\n"), "not an .npz file (an .npz is a zip of arrays"),
    (lambda p: __import__("numpy").save(open(p, "wb"), __import__("numpy").zeros(3)),
     "a single array (.npy), not an .npz of named arrays"),
    (lambda p: __import__("numpy").savez(p, x=__import__("numpy").array([{}, 1], dtype=object),
                                         y=[0, 1]),
     "an array holds Python objects"),
])
def test_prepare_says_what_a_wrong_input_file_is(tmp_path, make, text):
    src = tmp_path / "input.npz"
    make(src)
    result = run_mpi(1, ["-m", "mpitrain", "prepare", "--input", src, "--out", tmp_path / "o"])
    one_error(result, text)
    assert not (tmp_path / "o").exists()


def test_prepare_gives_the_output_the_users_umask(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", "import os, sys; os.umask(0o027); from mpitrain.cli import main;"
         " main(['prepare', '--synthetic', '--samples', '50', '--features', '3', '--out', "
         "sys.argv[1]])", str(tmp_path / "ds")], capture_output=True, text=True, timeout=120,
        env=clean_env())
    assert result.returncode == 0, result.stderr
    assert os.stat(tmp_path / "ds").st_mode & 0o777 == 0o750


def test_the_memory_check_counts_the_buffers_of_groups_held_apart(monkeypatch):
    """--reproducible: a later replica holds its groups apart (and receive shards); one
    rank alone, the groups of its threads but the first; a pipeline stage alone, none."""
    from mpitrain.run import build as building

    monkeypatch.setattr(building, "limit_threads", lambda: {"threads": 2})
    assert building._group_buffers(12, replicas=2, pp=1) == 6 + 1
    assert building._group_buffers(4, replicas=4, pp=1) == 1 + 1
    assert building._group_buffers(12, replicas=1, pp=1) == 6  # 2 threads of 6 groups
    assert building._group_buffers(12, replicas=1, pp=2) == 0
    monkeypatch.setattr(building, "limit_threads", lambda: {"threads": 1})
    assert building._group_buffers(12, replicas=1, pp=1) == 0


def test_an_error_every_rank_finds_is_said_once_without_the_abort_banner(small_data, tmp_path):
    """Usage errors (each rank parses the same flags) and predict's input checks (each rank
    reads its slice) are agreed: one line, exit 2, no MPI_Abort."""
    usage = run_mpi(2, ["-m", "mpitrain", "train", "--hidden", "8,,8"])
    one_error(usage, "argument --hidden: expected comma-separated integers, got '8,,8'")
    assert "usage:" not in usage.stderr and "Abort" not in usage.stderr
    ckpt = tmp_path / "ckpt"
    assert run_train(2, "--data", small_data, *ARGS, "--steps", "3", "--ckpt-dir",
                     ckpt).returncode == 0
    narrow = tmp_path / "narrow.h5"
    import h5py
    import numpy as np

    with h5py.File(narrow, "w") as f:
        f["x"] = np.zeros((10, 5), np.float32)
    got = run_mpi(2, ["-m", "mpitrain", "predict", ckpt / "ckpt-000000003.h5", "--data",
                      narrow, "--out", tmp_path / "p.h5"])
    one_error(got, "samples of shape (5,), and the model of")
    assert "Abort" not in got.stderr and not (tmp_path / "p.h5").exists()


def test_quiet_still_says_a_damaged_checkpoint_was_skipped(small_data, tmp_path):
    ckpt = tmp_path / "ckpt"
    first = run_train(2, "--data", small_data, *ARGS, "--steps", "10", "--ckpt-every", "5",
                      "--ckpt-dir", ckpt, "--quiet")
    assert first.returncode == 0, first.stderr
    with open(ckpt / "ckpt-000000010.h5", "r+b") as f:
        f.truncate(300)
    again = run_train(2, "--data", small_data, *ARGS, "--steps", "12", "--ckpt-dir", ckpt,
                      "--quiet")
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("warning: skipping checkpoint") == 1
    assert "done: steps 6-12" in again.stdout  # from the older one
