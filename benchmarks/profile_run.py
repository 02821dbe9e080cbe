"""Where the time of a bench.py run goes.

    python benchmarks/profile_run.py [--num-decode-passes 8] [--sampling qwen3] [--logprobs 5] [--json out.json]
    (dummy Qwen3-0.6B weights)

1. The whole workload through LLMEngine.step, with host timers around the scheduler,
   the model runner and the bookkeeping after it: wall time per phase, per step.
2. A torch.profiler window over some decode steps in the middle of the run: GPU busy
   fraction (kernel time / wall time) and the kernels that take the most GPU time.
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

from bench import SAMPLING, workload  # noqa: E402
from myvllm import LLM, SamplingParams  # noqa: E402


def timed(fn, bucket: dict, key: str):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            bucket[key] += time.perf_counter() - start
            bucket[key + "_calls"] += 1
    return wrapper


def gpu_busy_fraction(prof) -> tuple[float, float]:
    """(union of CUDA kernel intervals, window span) in microseconds."""
    intervals = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                       if e.device_type == torch.autograd.DeviceType.CUDA)
    if not intervals:
        return 0.0, 0.0
    busy, cur_s, cur_e = 0.0, *intervals[0]
    for s, e in intervals[1:]:
        if s > cur_e:
            busy += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    busy += cur_e - cur_s
    return busy, intervals[-1][1] - intervals[0][0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-seqs", type=int, default=256)
    parser.add_argument("--num-decode-passes", type=int, default=8)
    parser.add_argument("--profile-steps", type=int, default=12, help="engine steps in the profiler window")
    parser.add_argument("--skip-steps", type=int, default=40, help="engine steps before the window")
    parser.add_argument("--sampling", choices=sorted(SAMPLING), default="temperature")
    parser.add_argument("--logprobs", type=int, default=None, help="top-k logprobs per token (default: none)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    llm = LLM("dummy:qwen3-0.6b", load_format="dummy", skip_tokenizer_init=True,
              num_decode_passes=args.num_decode_passes)
    engine = llm.engine
    prompts, params = workload(args.num_seqs, 1024, 1024, 0, sampling=args.sampling, logprobs=args.logprobs)
    llm.generate([[1] * 300, [2] * 1024], SamplingParams(temperature=0.6, max_tokens=32, ignore_eos=True),
                 use_tqdm=False)

    t = defaultdict(float)
    engine.scheduler.schedule = timed(engine.scheduler.schedule, t, "schedule")
    engine.runner.execute = timed(engine.runner.execute, t, "execute")
    engine.runner.collect = timed(engine.runner.collect, t, "collect")
    engine.scheduler.update_from_output = timed(engine.scheduler.update_from_output, t, "update")
    stops = engine.scheduler.stop_checker
    stops.check = timed(stops.check, t, "stop_check")

    for p, sp in zip(prompts, params):
        engine.add_request(p, sp)
    torch.cuda.synchronize()
    start = time.perf_counter()
    steps = 0
    prof = None
    while engine.has_unfinished_requests():
        if steps == args.skip_steps:
            prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                      torch.profiler.ProfilerActivity.CUDA])
            prof.__enter__()
            window_start = time.perf_counter()
        engine.step()
        steps += 1
        if prof is not None and steps == args.skip_steps + args.profile_steps:
            torch.cuda.synchronize()
            window = time.perf_counter() - window_start
            prof.__exit__(None, None, None)
    torch.cuda.synchronize()
    total = time.perf_counter() - start
    if prof is not None and steps < args.skip_steps + args.profile_steps:  # the run ended inside the window
        window = time.perf_counter() - window_start
        prof.__exit__(None, None, None)
    out_tokens = sum(p.max_tokens for p in params)

    print(f"whole run: {total:.2f} s, {steps} engine steps, {out_tokens / total:.0f} output tok/s")
    for key in ("schedule", "execute", "collect", "update", "stop_check"):
        if t[key + "_calls"]:
            print(f"  {key:20s} {t[key]:7.3f} s  {t[key + '_calls']:6.0f} calls  "
                  f"{t[key] / t[key + '_calls'] * 1e3:8.3f} ms/call")
    record = dict(total_s=total, steps=steps, tok_s=out_tokens / total, phases=dict(t))
    if prof is not None:
        busy, span = gpu_busy_fraction(prof)
        print(f"profiler window: {args.profile_steps} steps, {window * 1e3:.1f} ms wall, GPU busy "
              f"{busy / 1e3:.1f} ms ({busy / (window * 1e6):.1%} of wall)")
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60)
        print(table)
        record.update(window_ms=window * 1e3, gpu_busy_ms=busy / 1e3, kernels=table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)


if __name__ == "__main__":
    main()
