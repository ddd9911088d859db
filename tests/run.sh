#!/usr/bin/env bash
# Set up (first time) and run the whole test suite. Extra arguments go to pytest, e.g. -k config.
set -euo pipefail
cd "$(dirname "$0")/.."
bash jobs/setup.sh
# The SLURM integration tests start a real 2-node cluster on this machine: install its packages.
bash tests/cluster/install-packages.sh
exec .venv/bin/python -m pytest tests "$@"
