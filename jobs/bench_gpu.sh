#!/usr/bin/env bash
# GPU throughput series (jobs/benchmarks.md): a dummy-weight Qwen3-8B (its real config.json, random
# weights) with the tiny model's tokenizer; documents of 2,000-4,000 prompt tokens, 200 output tokens.
# Built to fit one drawn GPU task (15 minutes of device time in all, staging included): every step
# runs under `timeout` within what is left of BUDGET_S, the cheap engine-setting sweeps come first,
# and each step's bench.md and bench.json go to OUT_DIR as soon as it ends, whether it succeeded or not.
#
#   bash jobs/bench_gpu.sh [STEP ...]       steps: sweep pipeline hf strategies (default: sweep pipeline)
#
#   sweep      raw vLLM only, eager, 256 documents, fp8 weights + fp8 KV cache: random token ids at
#              max_num_seqs 256 (the H200 probe), real text at 256, real text at vLLM's default, real
#              text without the prefix cache. Which of them explains the H200 raw figure.
#   pipeline   raw vLLM against the pipeline with the same engine arguments (SETTINGS), 512 documents
#   hf         the hf engine against the naive batch-16 transformers loop, 64 documents
#   strategies one at a time / static batches / continuous batching, 64 documents
#
# Environment: BUDGET_S (default 540: one device call of at most 600 s), OUT_DIR (default $OUT, else
# bench-gpu/results), SETTINGS (engine arguments of the pipeline step, default fp8 weights + fp8 KV),
# PYTHON. Works from a plain checkout: PYTHONPATH=$PWD/src (plus wherever vLLM is) is enough.
set -uo pipefail
cd "$(dirname "$0")/.."
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(sweep pipeline)
py=${PYTHON:-python3}
work=bench-gpu
out_dir=${OUT_DIR:-${OUT:-$work/results}}
budget=${BUDGET_S:-540}
settings=${SETTINGS:-"--engine-arg quantization=fp8 --engine-arg kv_cache_dtype=fp8"}
start=$(date +%s)
model="$work/qwen3-8b-dummy"
mkdir -p "$work" "$out_dir"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

left() { echo $(( budget - ($(date +%s) - start) )); }

make_model() {
  [ -f "$model/config.json" ] && return 0
  "$py" -m shardinfer.cli tiny-model "$work/tiny" > /dev/null || return 1  # only for its tokenizer
  mkdir -p "$model"
  cp "$work"/tiny/tokenizer.json "$work"/tiny/tokenizer_config.json "$model"/
  cp "$work"/tiny/special_tokens_map.json "$model"/ 2>/dev/null || true
  "$py" - "$work/tiny/config.json" "$model/config.json" <<'PY'
import json, sys
cfg = json.load(open(sys.argv[1]))
cfg.update(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
           head_dim=128, intermediate_size=12288, vocab_size=151936, max_position_embeddings=40960,
           max_window_layers=36, layer_types=["full_attention"] * 36, tie_word_embeddings=False,
           rope_parameters={"rope_theta": 1000000.0, "rope_type": "default"}, dtype="bfloat16")
json.dump(cfg, open(sys.argv[2], "w"), indent=1)
PY
}

# One bench run: NAME LIMIT_S ARGS... Copies its results to OUT_DIR whatever happens.
bench() {
  local name=$1 limit=$2; shift 2
  local remaining; remaining=$(left)
  if [ "$remaining" -lt 60 ]; then echo "== $name: skipped, $remaining s left of the budget" | tee -a "$out_dir/series.log"; return 0; fi
  [ "$limit" -gt "$remaining" ] && limit=$remaining
  echo "== $name (limit ${limit} s): shardinfer bench $*" | tee -a "$out_dir/series.log"
  timeout --signal=TERM --kill-after=20 "$limit" "$py" -m shardinfer.cli bench --model "$model" --dummy-weights \
      --output-len 200 --max-model-len 8192 --engine-arg gpu_memory_utilization=0.9 --out "$work/$name" "$@" \
      > "$work/$name.log" 2>&1
  local code=$?
  echo "== $name: exit $code after $(( $(date +%s) - start )) s of the budget" | tee -a "$out_dir/series.log"
  [ -f "$work/$name/bench.md" ] && { echo "## $name"; cat "$work/$name/bench.md"; } >> "$out_dir/series.md"
  [ -f "$work/$name/bench.json" ] && cp "$work/$name/bench.json" "$out_dir/$name.json"
  [ "$code" -ne 0 ] && tail -25 "$work/$name.log" >> "$out_dir/series.log"
  return 0
}

sweep() {
  local eager="--engine-arg enforce_eager=true --docs 256 --input-len 2000-4000 --skip-pipeline $settings"
  # shellcheck disable=SC2086
  bench sweep-random-256 150 $eager --prompt-kind random --engine-arg max_num_seqs=256
  # shellcheck disable=SC2086
  bench sweep-text-256 150 $eager --engine-arg max_num_seqs=256
  # shellcheck disable=SC2086
  bench sweep-text-default 180 $eager
  # shellcheck disable=SC2086
  bench sweep-text-256-noprefix 150 $eager --engine-arg max_num_seqs=256 --engine-arg enable_prefix_caching=false
}

pipeline() {
  # shellcheck disable=SC2086
  bench pipeline 420 --docs 512 --input-len 2000-4000 --engine-arg enforce_eager=true $settings
}

hf() {
  bench hf 300 --engine hf --docs 64 --input-len 2000-4000
}

strategies() {
  # shellcheck disable=SC2086
  bench strategies 300 --docs 64 --input-len 2000-4000 --skip-raw --strategies --strategy-docs 64 $settings
}

make_model > "$work/model.log" 2>&1 || { echo "could not write the dummy model:"; tail "$work/model.log"; } | tee -a "$out_dir/series.log"
for step in "${steps[@]}"; do
  case "$step" in
    sweep|pipeline|hf|strategies) "$step" ;;
    *) echo "unknown step $step (sweep, pipeline, hf, strategies)" | tee -a "$out_dir/series.log" ;;
  esac
done
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> "$out_dir/series.log" 2>/dev/null || true
echo "results: $out_dir/series.md, $out_dir/series.log and one JSON per run"
