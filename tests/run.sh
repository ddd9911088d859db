#!/usr/bin/env bash
# Set up (first time), check style and types, and run the test suite. Extra arguments go to pytest,
# e.g. -k config.
#   bash tests/run.sh          everything: real engines, worker processes, MPI, a 2-node SLURM cluster
#   bash tests/run.sh --fast   lint, types and the tests that need no engine, worker process or cluster
set -euo pipefail
cd "$(dirname "$0")/.."
fast=0
if [ "${1:-}" = "--fast" ]; then fast=1; shift; fi
bash jobs/setup.sh
echo "checks: ruff, mypy"
.venv/bin/ruff check src tests jobs
.venv/bin/mypy
# Tests run on SHARDINFER_TEST_WORKERS pytest-xdist workers (default 2; 0: in this process). Tests that
# share a job stay on one worker and the longest start first (tests/conftest.py).
xdist=(-n "${SHARDINFER_TEST_WORKERS:-2}" --dist loadgroup --no-loadscope-reorder)
if [ "$fast" = 1 ]; then
  exec .venv/bin/python -m pytest tests -m "not engine and not processes and not cluster" "${xdist[@]}" "$@"
fi
# The SLURM integration tests start a real 2-node cluster on this machine (one per xdist worker that
# runs some): install its packages.
bash tests/cluster/install-packages.sh
exec .venv/bin/python -m pytest tests "${xdist[@]}" "$@"
