"""The checkpoint directory's lock, and the run directory (serial)."""
import json
import os
import socket
import subprocess
import sys

import pytest
from mpi4py import MPI

from mpitrain.fault.lock import NAME, DirectoryLock, LockHeld
from mpitrain.run.rundir import open_run_dir


def holder(directory):
    """Another process holding the lock of ``directory`` until its stdin closes."""
    code = ("import sys\n"
            "from mpitrain.fault.lock import DirectoryLock\n"
            "lock = DirectoryLock(sys.argv[1]); lock.acquire()\n"
            "print('held', flush=True); sys.stdin.read(); lock.release()\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(directory)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "SLURM_JOB_ID": "4242"})
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_job_is_refused_naming_the_holder(tmp_path):
    proc = holder(tmp_path)
    try:
        with pytest.raises(LockHeld) as info:
            DirectoryLock(str(tmp_path)).acquire()
        message = str(info.value)
        assert f"{tmp_path}: the checkpoint directory is in use by another job (host " \
               f"{socket.gethostname()}, pid {proc.pid}, job 4242, since " in message
    finally:
        proc.communicate("", timeout=30)
    lock = DirectoryLock(str(tmp_path))  # released: free again, and the file is gone
    assert not os.path.exists(tmp_path / NAME)
    assert lock.acquire() is None
    lock.release()


def test_the_lock_of_a_job_that_died_is_taken_over(tmp_path):
    proc = holder(tmp_path)
    proc.kill()  # SIGKILL: no release, the record stays, the kernel drops the flock
    proc.wait()
    assert json.loads((tmp_path / NAME).read_text())["pid"] == proc.pid
    lock = DirectoryLock(str(tmp_path))
    note = lock.acquire()
    assert note.startswith(f"took over the lock of a job that is gone (host "
                           f"{socket.gethostname()}, pid {proc.pid}")
    assert json.loads((tmp_path / NAME).read_text())["pid"] == os.getpid()
    lock.release()


def test_a_record_from_another_host_is_taken_over_only_by_the_same_job(tmp_path, monkeypatch):
    record = {"host": "node-17", "pid": 99, "job": "777", "since": "2026-12-01T00:00:00+00:00"}
    (tmp_path / NAME).write_text(json.dumps(record))
    monkeypatch.setenv("SLURM_JOB_ID", "778")
    with pytest.raises(LockHeld, match=r"locked by a job on another host \(host node-17, pid 99, "
                                       r"job 777, .*\), which cannot be checked from here; if "
                                       rf"that job is gone, remove {tmp_path}/{NAME}"):
        DirectoryLock(str(tmp_path)).acquire()
    monkeypatch.setenv("SLURM_JOB_ID", "777")  # a relaunch or requeue of that job
    lock = DirectoryLock(str(tmp_path))
    assert "took over the lock of an earlier run of this job" in lock.acquire()
    lock.release()


def test_run_directories_are_unique_and_record_the_launch(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    config = {"run_dir": None, "ckpt_dir": None, "lr": 0.1}
    made = [open_run_dir(config, MPI.COMM_SELF) for _ in range(3)]  # within one second
    assert len(set(made)) == 3 and all(os.path.isdir(p) for p in made)
    record = json.loads(open(os.path.join(made[0], "run.jsonl")).read())
    assert record["config"] == config and record["mpitrain_version"]
    assert record["mpi_library"].startswith(("MPICH", "Open MPI"))
    given = open_run_dir({**config, "run_dir": "mine"}, MPI.COMM_SELF)
    again = open_run_dir({**config, "run_dir": "mine"}, MPI.COMM_SELF)
    assert given == again == "mine"
    assert len(open("mine/run.jsonl").readlines()) == 2  # each launch appended


def test_concurrent_runs_never_share_a_directory(tmp_path):
    code = ("from mpi4py import MPI\n"
            "from mpitrain.run.rundir import open_run_dir\n"
            "print(open_run_dir({'run_dir': None, 'ckpt_dir': None}, MPI.COMM_SELF))\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI", "SLURM"))}
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, text=True) for _ in range(6)]
    dirs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert len(set(dirs)) == 6, dirs
