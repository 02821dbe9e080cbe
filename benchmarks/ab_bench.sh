#!/usr/bin/env bash
# Throughput of this tree against a baseline tree, in one go on one GPU: bench.py --dummy (plus
# the given flags, e.g. --latency) in both, processes alternating, each tree with its own
# CUDA-kernel build directory. Prints one line per run and writes the JSON records to OUT_DIR.
# Usage: benchmarks/ab_bench.sh BASELINE_DIR OUT_DIR [ROUNDS] [extra bench.py flags...]
set -uo pipefail
base=$(cd "${1:?usage: ab_bench.sh BASELINE_DIR OUT_DIR [ROUNDS] [flags]}" && pwd)
out=$(mkdir -p "${2:?usage: ab_bench.sh BASELINE_DIR OUT_DIR [ROUNDS] [flags]}" && cd "$2" && pwd)
rounds=${3:-2}
shift 3 2>/dev/null || shift $#
here=$(pwd)
ext=${EXT_ROOT:-/tmp/myvllm-ext}  # kernel builds, one folder per tree
export PYTHONUNBUFFERED=1

run() {  # run NAME DIR ROUND
  local name=$1 dir=$2 round=$3
  shift 3
  (cd "$dir" && TORCH_EXTENSIONS_DIR="$ext-$name" PYTHONPATH="$dir" \
    python3 bench.py --dummy "$@" --json "$out/$name-$round.json" > "$out/$name-$round.log" 2>&1)
  echo "$name round $round: $(grep -E 'tok/s|ms' "$out/$name-$round.log" | tail -n 3 | tr '\n' ' ')"
}

for round in $(seq 1 "$rounds"); do
  run baseline "$base" "$round" "$@"
  run current "$here" "$round" "$@"
done
