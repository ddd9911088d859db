#!/usr/bin/env bash
# Set up (first time) and run the embedded demo: summarize the bundled corpus with the tiny local
# model on the vLLM engine, 2 local workers. Extra arguments are config overrides, e.g.
#   bash jobs/demo.sh model.engine=hf model.engine_args={} run.directory=runs/demo-hf
set -euo pipefail
cd "$(dirname "$0")/.."
bash jobs/setup.sh
exec .venv/bin/shardinfer run configs/demo.yaml "$@"
