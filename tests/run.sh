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
if [ "$fast" = 1 ]; then
  exec .venv/bin/python -m pytest tests -m "not engine and not processes" "$@"
fi
# The SLURM integration tests start a real 2-node cluster on this machine: install its packages.
bash tests/cluster/install-packages.sh
exec .venv/bin/python -m pytest tests "$@"
