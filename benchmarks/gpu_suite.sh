#!/usr/bin/env bash
# The GPU checks and measurements of one commit, in one go:
#   GPU tests, the attention micro-benchmark, bench.py with graphs and eager.
# Usage: benchmarks/gpu_suite.sh OUT_DIR [quick]
set -uo pipefail
out=${1:?usage: gpu_suite.sh OUT_DIR [quick]}
mode=${2:-full}
mkdir -p "$out"
export PYTHONPATH=.
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
git rev-parse --short HEAD 2>/dev/null | tee -a "$out/gpu.txt"

python3 -m pytest -m gpu -q -rA -s -p no:cacheprovider tests 2>&1 | tail -n 200 > "$out/gpu_tests.log"
grep -E "passed|failed|error" "$out/gpu_tests.log" | tail -3

python3 benchmarks/attention_microbench.py --graph --json "$out/attention.json" 2>&1 | tail -n 30 > "$out/attention.log"
tail -n 12 "$out/attention.log"

args=""
[ "$mode" = quick ] && args="--num-seqs 64"
python3 bench.py --dummy $args --latency --json "$out/bench_graphs.json" 2>&1 | tail -n 5 | tee "$out/bench_graphs.log"
python3 bench.py --dummy $args --enforce-eager --json "$out/bench_eager.json" 2>&1 | tail -n 5 | tee "$out/bench_eager.log"
