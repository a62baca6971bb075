#!/usr/bin/env bash
# NP=2 examples/allreduce_bench.sh [--sizes 1M,16M,64M] [--repeats 5]
#
# Ring and shared-memory vs MPI all-reduce on this machine, as nccl-tests
# reports it (time, algbw, busbw; ring/mpi > 1 means the ring is faster), written to
# allreduce-NP.json as well. Runs from the checkout's venv if it is active.
set -euo pipefail
NP=${NP:-2}
MPIEXEC=${MPIEXEC:-mpiexec}
PYTHON=${PYTHON:-python}
"$MPIEXEC" -n "$NP" "$PYTHON" -m mpitrain bench allreduce --json "allreduce-$NP.json" "$@"
echo "wrote allreduce-$NP.json"
