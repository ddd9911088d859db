#!/usr/bin/env bash
# Idempotent set-up of a development machine (CPU): .venv with shardinfer (editable), the CPU build
# of vLLM, transformers, matplotlib and the test tools; then the tiny local model in .cache/tiny-qwen3.
# Re-running it is cheap: packages are reinstalled only when pyproject.toml changes.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${SHARDINFER_VENV:-.venv}
stamp="$VENV/.shardinfer-setup"
want="$(sha256sum pyproject.toml | cut -c1-16)"

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing shardinfer[cpu,plot,test] into $VENV (a few minutes the first time; log: $VENV/setup.log)"
  if ! "$VENV/bin/pip" install -e ".[cpu,plot,test]" > "$VENV/setup.log" 2>&1; then
    tail -30 "$VENV/setup.log"; echo "setup: pip install failed; full log in $VENV/setup.log" >&2; exit 1
  fi
  # pip pulls torchvision/torchaudio built for another torch; transformers then fails to import.
  "$VENV/bin/pip" uninstall -y torchvision torchaudio torchcodec >> "$VENV/setup.log" 2>&1 || true
  echo "$want" > "$stamp"
fi
"$VENV/bin/shardinfer" tiny-model .cache/tiny-qwen3 --corpus jobs/data/python-docs.jsonl.gz > /dev/null
echo "setup: ready ($VENV, model .cache/tiny-qwen3)"
