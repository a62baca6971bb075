#!/usr/bin/env bash
# NP=4 RETRIES=3 examples/relaunch.sh --ckpt-dir ckpt [train flags...]
#
# The workstation equivalent of slurm/train-requeue.sbatch: run
#   mpiexec -n $NP python -m mpitrain train --resume auto [train flags...]
# and relaunch it after a failure (a rank died, the watchdog fired) or a
# pre-emption (exit status 75), at most $RETRIES times; each relaunch resumes
# from the newest valid checkpoint in --ckpt-dir. $MPITRAIN_ATTEMPT tells
# the job which launch it is (fault drills use it: --fault kill:rank=1:step=30:attempt=1).
set -u
NP=${NP:-4}
RETRIES=${RETRIES:-3}
MPIEXEC=${MPIEXEC:-mpiexec}
PYTHON=${PYTHON:-python}

attempt=1
while :; do
  export MPITRAIN_ATTEMPT=$attempt
  "$MPIEXEC" -n "$NP" "$PYTHON" -m mpitrain train --resume auto "$@"
  status=$?
  case $status in
    0) echo "relaunch.sh: finished on attempt $attempt"; exit 0 ;;
    2) echo "relaunch.sh: bad input or options (exit 2); not relaunching" >&2; exit 2 ;;
    75) why="pre-empted (exit 75)" ;;
    *) why="failed (exit $status)" ;;
  esac
  if [ "$attempt" -gt "$RETRIES" ]; then
    echo "relaunch.sh: attempt $attempt $why; no retries left ($RETRIES)" >&2
    exit "$status"
  fi
  echo "relaunch.sh: attempt $attempt $why; relaunching from the newest checkpoint" >&2
  attempt=$((attempt + 1))
done
