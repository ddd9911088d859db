#!/usr/bin/env bash
# GPU throughput benchmarks (jobs/benchmarks.md): a dummy-weight Qwen3-8B (its real config.json,
# random weights) with the tiny model's tokenizer, 1,024 documents of 2,000-4,000 prompt tokens,
# 200 output tokens each; raw vLLM against the pipeline with the same engine arguments.
#
#   bash jobs/bench_gpu.sh [bf16|fp8|strategies|all] [OUT]      (default: all, bench-gpu)
#
# Needs shardinfer and vLLM importable (pip install -e '.[vllm,plot]', or PYTHONPATH=...:$PWD/src).
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
out=${2:-bench-gpu}
py=${PYTHON:-python3}
model="$out/qwen3-8b-dummy"
mkdir -p "$out"

if [ ! -f "$model/config.json" ]; then
  "$py" -m shardinfer.cli tiny-model "$out/tiny" > /dev/null  # only for its tokenizer
  mkdir -p "$model"
  cp "$out"/tiny/tokenizer.json "$out"/tiny/tokenizer_config.json "$model"/
  cp "$out"/tiny/special_tokens_map.json "$model"/ 2>/dev/null || true
  "$py" - "$out/tiny/config.json" "$model/config.json" <<'PY'
import json, sys
cfg = json.load(open(sys.argv[1]))
cfg.update(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
           head_dim=128, intermediate_size=12288, vocab_size=151936, max_position_embeddings=40960,
           max_window_layers=36, layer_types=["full_attention"] * 36, tie_word_embeddings=False,
           rope_parameters={"rope_theta": 1000000.0, "rope_type": "default"}, dtype="bfloat16")
json.dump(cfg, open(sys.argv[2], "w"), indent=1)
PY
fi

shape=(--model "$model" --dummy-weights --docs 1024 --input-len 2000-4000 --output-len 200
       --max-model-len 8192 --engine-arg gpu_memory_utilization=0.9)
run() { echo "== $*"; "$py" -m shardinfer.cli bench "$@"; }
case "$what" in bf16|all) run "${shape[@]}" --out "$out/bf16" ;; esac
case "$what" in fp8|all) run "${shape[@]}" --engine-arg quantization=fp8 --engine-arg kv_cache_dtype=fp8 --out "$out/fp8" ;; esac
case "$what" in strategies|all) run "${shape[@]}" --skip-raw --docs 256 --strategies --strategy-docs 64 --out "$out/strategies" ;; esac
echo "results under $out/*/bench.md"
