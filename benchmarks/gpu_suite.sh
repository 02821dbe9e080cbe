#!/usr/bin/env bash
# The GPU checks of one commit in one go: every GPU test file, spread over PROCS pytest processes
# that share the card (MYVLLM_TEST_GPU_SHARE sizes each engine's KV cache from its own share),
# then the seed benchmark after a full-size warm-up process (the first full-size process on a
# fresh machine runs 15-25% slow; a short warm-up does not remove that).
# Usage: benchmarks/gpu_suite.sh OUT_DIR [TEST_SECONDS] [PROCS]
set -uo pipefail
out=${1:?usage: gpu_suite.sh OUT_DIR [TEST_SECONDS] [PROCS]}
test_seconds=${2:-300}
procs=${3:-5}
mkdir -p "$out"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
git rev-parse --short HEAD 2>/dev/null | tee -a "$out/gpu.txt"

# Build the CUDA kernels once, before the test processes race for the build.
python3 -c "from myvllm.kernels.cuda.build import load_cuda_ops; print('cuda kernels:', load_cuda_ops())"

mapfile -t files < <(grep -l "pytest.mark.gpu" tests/test_*.py)
for ((g = 0; g < procs; g++)); do
  group=()
  for ((i = g; i < ${#files[@]}; i += procs)); do group+=("${files[i]}"); done
  [ ${#group[@]} -eq 0 ] && continue
  MYVLLM_TEST_GPU_SHARE=$(python3 -c "print(round(0.8 / $procs, 3))") \
    timeout "$test_seconds" python3 -m pytest -m gpu -q -rfE -p no:cacheprovider "${group[@]}" \
    > "$out/tests_$g.log" 2>&1 &
done
wait
for f in "$out"/tests_*.log; do
  echo "$f: $(tail -n 1 "$f")"
  grep -E "^(FAILED|ERROR)" "$f" | head -n 10
done

python3 bench.py --dummy --json "$out/bench_warmup.json" > "$out/bench_warmup.log" 2>&1
python3 bench.py --dummy --latency --json "$out/bench_graphs.json" 2>&1 | tail -n 5 | tee "$out/bench_graphs.log"
