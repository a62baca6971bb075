"""Runs the MPI tests (marked ``mpi`` or ``anysize``) under mpiexec -n 2, 3 and 4,
each job bounded in time.

This is how ``python -m pytest`` covers them; to run one size yourself:

    $ mpiexec -n 4 python -m pytest --with-mpi -m "mpi or anysize" tests/

4 ranks oversubscribe a 2-core machine: slower, and still correct.
"""
import sys

import pytest

from conftest import ROOT, run_mpi


@pytest.mark.timeout(700)
@pytest.mark.parametrize("n", [2, 3, 4])
def test_mpi_suite(n, request):
    if request.config.getoption("--with-mpi", default=False):
        pytest.skip("already running under mpiexec")
    result = run_mpi(n, ["-m", "pytest", "--with-mpi", "-m", "mpi or anysize", "-q", "-p",
                         "no:cacheprovider", "-o", "addopts=", str(ROOT / "tests")],
                     timeout=600)
    tail = "\n".join(result.stdout.splitlines()[-40:])
    assert result.returncode == 0, f"mpiexec -n {n} pytest failed:\n{tail}\n{result.stderr[-3000:]}"
    assert " passed" in result.stdout and " failed" not in result.stdout
    sys.stdout.write(result.stdout.splitlines()[-1] + "\n")
