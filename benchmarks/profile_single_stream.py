"""Where the time of one decode pass goes at batch 1 (bench.py --latency's single stream).

    python benchmarks/profile_single_stream.py [--prompt-len 128] [--output-len 256] [--json out.json]

Dummy Qwen3-0.6B weights. One request is generated under torch.profiler (kernels inside CUDA
graphs included); printed per output token: wall time, GPU busy time (the union of kernel
intervals; kernels overlap under programmatic dependent launch) and each kernel's time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.profile_run import gpu_busy_fraction  # noqa: E402
from myvllm import LLM, SamplingParams  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--top", type=int, default=16, help="kernels listed")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    llm = LLM("dummy:qwen3-0.6b", load_format="dummy", skip_tokenizer_init=True)
    prompt = [[(7 * i) % 10000 for i in range(args.prompt_len)]]
    params = SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=args.output_len)
    llm.generate(prompt, params, use_tqdm=False)  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    llm.generate(prompt, params, use_tqdm=False)
    torch.cuda.synchronize()
    plain_ms = (time.perf_counter() - start) * 1e3 / args.output_len

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        llm.generate(prompt, params, use_tqdm=False)
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - start) * 1e3
    kernels = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            k = kernels[e.name]
            k[0] += e.time_range.end - e.time_range.start
            k[1] += 1
    busy_us, span_us = gpu_busy_fraction(prof)
    n = args.output_len
    total_us = sum(t for t, _ in kernels.values())
    print(f"batch 1, {args.prompt_len} prompt tokens, {n} output tokens")
    print(f"without the profiler: {plain_ms:.3f} ms per token")
    print(f"under the profiler: wall {wall_ms / n:.3f} ms per token; GPU busy {busy_us / n:.1f} us per token "
          f"({busy_us / span_us:.1%} of the kernels' span); kernel time summed {total_us / n:.1f} us per token")
    rows = sorted(kernels.items(), key=lambda kv: -kv[1][0])
    print(f"{'us/token':>9} {'calls/token':>11} {'us/call':>8}  kernel")
    for name, (t, c) in rows[:args.top]:
        print(f"{t / n:9.1f} {c / n:11.2f} {t / c:8.2f}  {name[:90]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(ms_per_token=plain_ms, profiled_wall_ms_per_token=wall_ms / n,
                           gpu_busy_us_per_token=busy_us / n, kernel_us_per_token=total_us / n,
                           kernels={name: dict(us_per_token=t / n, calls_per_token=c / n) for name, (t, c) in rows}),
                      f, indent=2)


if __name__ == "__main__":
    main()
