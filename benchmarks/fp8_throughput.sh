#!/usr/bin/env bash
# Throughput of block-FP8 against bf16 on random weights, in one run on one GPU: bench.py on the
# seed workload for each built-in shape set given (default qwen3-0.6b qwen3-8b), bf16 then FP8,
# plus any extra bench.py flags. Prints one line per run and writes the JSON records to OUT_DIR.
# Usage: benchmarks/fp8_throughput.sh OUT_DIR [MODEL...] [-- extra bench.py flags...]
set -uo pipefail
out=$(mkdir -p "${1:?usage: fp8_throughput.sh OUT_DIR [MODEL...] [-- flags]}" && cd "$1" && pwd)
shift
models=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do models+=("$1"); shift; done
[ $# -gt 0 ] && shift
[ ${#models[@]} -eq 0 ] && models=(qwen3-0.6b qwen3-8b)
export PYTHONUNBUFFERED=1

for model in "${models[@]}"; do
  for quant in bf16 fp8; do
    flags=()
    [ "$quant" = fp8 ] && flags=(--quantization fp8)
    log="$out/$model-$quant.log"
    python3 bench.py --model "dummy:$model" "${flags[@]}" "$@" --json "$out/$model-$quant.json" > "$log" 2>&1
    echo "$model $quant: $(grep -E 'tok/s' "$log" | tail -n 1)"
  done
done
