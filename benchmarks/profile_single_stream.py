"""Where the time of one decode pass goes at batch 1 (bench.py --latency's single stream).

    python benchmarks/profile_single_stream.py [--prompt-len 128] [--output-len 256] [--json out.json]

Dummy Qwen3-0.6B weights. One request is generated under torch.profiler (kernels inside CUDA
graphs included); printed per output token: wall time, GPU busy time (the union of kernel
intervals; kernels overlap under programmatic dependent launch) and, per kernel, how much it adds
to the critical path and how early it starts.
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


def critical_path(events) -> tuple[dict[str, float], dict[str, float]]:
    """Per kernel name, summed over its calls (µs): `added`, the time from the end of the kernel
    launched before it to its own end (kernels of one stream end in launch order, as each waits
    for the one before), and `lead`, how long before that end it started."""
    added: dict[str, float] = defaultdict(float)
    lead: dict[str, float] = defaultdict(float)
    prev_end = None
    for e in sorted(events, key=lambda e: e.time_range.start):
        start, end = e.time_range.start, e.time_range.end
        if prev_end is not None:
            added[e.name] += max(0.0, end - max(prev_end, start))
            lead[e.name] += max(0.0, prev_end - start)
        prev_end = end if prev_end is None else max(prev_end, end)
    return added, lead


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
    cuda_events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    for e in cuda_events:
        k = kernels[e.name]
        k[0] += e.time_range.end - e.time_range.start
        k[1] += 1
    added, lead = critical_path(cuda_events)
    busy_us, span_us = gpu_busy_fraction(prof)
    n = args.output_len
    total_us = sum(t for t, _ in kernels.values())
    print(f"batch 1, {args.prompt_len} prompt tokens, {n} output tokens")
    print(f"without the profiler: {plain_ms:.3f} ms per token")
    print(f"under the profiler: wall {wall_ms / n:.3f} ms per token; GPU busy {busy_us / n:.1f} us per token "
          f"({busy_us / span_us:.1%} of the kernels' span); kernel time summed {total_us / n:.1f} us per token")
    rows = sorted(kernels.items(), key=lambda kv: -added[kv[0]])
    print("added: how much later a kernel ends than the kernel before it (the critical path, summing to the span);")
    print("lead: how long before the kernel before it ends it starts (> 0: its launch overlaps; per call)")
    print(f"{'added us/token':>14} {'us/call':>8} {'lead us/call':>12} {'span us/call':>12} "
          f"{'calls/token':>11}  kernel")
    for name, (t, c) in rows[:args.top]:
        print(f"{added[name] / n:14.1f} {added[name] / c:8.2f} {lead[name] / c:12.2f} {t / c:12.2f} {c / n:11.2f}  "
              f"{name[:70]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(ms_per_token=plain_ms, profiled_wall_ms_per_token=wall_ms / n,
                           gpu_busy_us_per_token=busy_us / n, kernel_us_per_token=total_us / n,
                           kernels={name: dict(us_per_token=t / n, calls_per_token=c / n,
                                               added_us_per_token=added[name] / n, lead_us_per_call=lead[name] / c)
                                    for name, (t, c) in rows}),
                      f, indent=2)


if __name__ == "__main__":
    main()
