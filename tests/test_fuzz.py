"""Fuzz the readers, each target of ``fuzz_targets.py`` in a process of its own (serial,
about a minute in all): a hang fails at the time limit instead of holding the suite (a
thread of pytest-timeout cannot interrupt HDF5 holding the GIL), and a malformed file
that damages HDF5's state cannot leak into another target.
"""
import subprocess
import sys

import pytest

from conftest import ROOT, clean_env

pytest.importorskip("hypothesis", reason="the fuzz tests need hypothesis")

TARGETS = ["test_random_json_as_a_manifest", "test_mutated_manifests",
           "test_mutated_shard_bytes", "test_shard_structures", "test_mutated_checkpoints",
           "test_manifests_whose_rows_may_not_add_up", "test_random_toml_as_a_config_file",
           "test_checkpoint_values"]


@pytest.mark.parametrize("target", TARGETS)
def test_fuzz(target, tmp_path):
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-o",
           "addopts=", "--basetemp", str(tmp_path), f"{ROOT / 'tests' / 'fuzz_targets.py'}::{target}"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=150, env=clean_env(),
                              cwd=ROOT / "tests")
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{target}: no result within 150 s (a hang?)\n{exc.stdout}")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout
