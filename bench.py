"""Throughput on a fixed workload, plus single-stream latency and prefill throughput.

    python bench.py --dummy                    # random weights with Qwen3-0.6B shapes
    python bench.py --model ./huggingface/Qwen3-0.6B --json out.json

The workload: random.seed(seed); num_seqs prompts of randint(100, max_input_len) token ids
drawn from randint(0, 10000); then num_seqs max_tokens of randint(100, max_output_len);
temperature 0.6, ignore_eos, max_model_len 4096. Throughput = output tokens / wall time
of generate (engine start and graph capture excluded; one warm-up generate first).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from random import randint, seed

import torch

from myvllm import LLM, SamplingParams


def git_commit() -> str:
    if os.environ.get("MYVLLM_COMMIT"):
        return os.environ["MYVLLM_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def workload(num_seqs: int, max_input_len: int, max_output_len: int, rng_seed: int):
    seed(rng_seed)
    prompts = [[randint(0, 10000) for _ in range(randint(100, max_input_len))] for _ in range(num_seqs)]
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=randint(100, max_output_len))
              for _ in range(num_seqs)]
    return prompts, params


def timed_generate(llm: LLM, prompts, params) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - start


def single_stream_ms_per_token(llm: LLM, prompt_len: int = 128, output_len: int = 512) -> float:
    """(time of prompt + output_len tokens - time of prompt + 1 token) / (output_len - 1), best of 3."""
    prompt = [randint(0, 10000) for _ in range(prompt_len)]
    first = min(timed_generate(llm, [prompt], SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=1))
                for _ in range(3))
    full = min(timed_generate(llm, [prompt], SamplingParams(temperature=0.6, ignore_eos=True,
                                                            max_tokens=output_len)) for _ in range(3))
    return (full - first) / (output_len - 1) * 1000


def prefill_tokens_per_s(llm: LLM, num_prompts: int = 64, prompt_len: int = 1024) -> float:
    prompts = [[randint(0, 10000) for _ in range(prompt_len)] for _ in range(num_prompts)]
    elapsed = timed_generate(llm, prompts, SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=1))
    return num_prompts * prompt_len / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="./huggingface/Qwen3-0.6B")
    parser.add_argument("--dummy", action="store_true", help="random weights with Qwen3-0.6B shapes, no files")
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--num-seqs", type=int, default=256)
    parser.add_argument("--max-input-len", type=int, default=1024)
    parser.add_argument("--max-output-len", type=int, default=1024)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--attention-backend", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-scheduler-steps", type=int, default=8, help="decode passes per schedule")
    parser.add_argument("--no-async-scheduling", action="store_true",
                        help="read every decode window back before scheduling the next")
    parser.add_argument("--latency", action="store_true", help="also single-stream latency and prefill throughput")
    parser.add_argument("--json", default=None, help="write a JSON record here")
    args = parser.parse_args()

    engine_args = dict(enforce_eager=args.enforce_eager, max_model_len=args.max_model_len,
                       kvcache_block_size=args.block_size, attention_backend=args.attention_backend,
                       num_scheduler_steps=args.num_scheduler_steps,
                       async_scheduling=not args.no_async_scheduling)
    if args.dummy:
        model = "dummy:qwen3-0.6b"
        engine_args.update(load_format="dummy", skip_tokenizer_init=True)
    else:
        model = args.model
    start = time.perf_counter()
    llm = LLM(model, **engine_args)
    init_time = time.perf_counter() - start
    graph_runner = llm.engine.runner.graph_runner

    prompts, params = workload(args.num_seqs, args.max_input_len, args.max_output_len, args.seed)
    # warm-up: short and long prompts, sampled decode
    warm = [[randint(0, 10000) for _ in range(n)] for n in (4, 300, args.max_input_len)]
    llm.generate(warm, SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=32), use_tqdm=False)
    elapsed = timed_generate(llm, prompts, params)
    total = sum(p.max_tokens for p in params)
    throughput = total / elapsed
    print(f"Total: {total}tok, Time: {elapsed:.2f}s, Throughput: {throughput:.2f}tok/s")

    record = dict(
        throughput_tok_s=throughput, time_s=elapsed, output_tokens=total,
        prompt_tokens=sum(len(p) for p in prompts), init_time_s=init_time,
        capture_time_s=getattr(graph_runner, "capture_time", None),
        card=torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        torch=torch.__version__, commit=git_commit(), config=vars(args),
        attention_backend=llm.engine.runner.backend.name, num_kv_blocks=llm.engine.runner.num_blocks,
    )
    if args.latency:
        record["single_stream_ms_per_token"] = single_stream_ms_per_token(llm)
        record["prefill_tok_s"] = prefill_tokens_per_s(llm)
        print(f"Single stream: {record['single_stream_ms_per_token']:.3f} ms/token, "
              f"Prefill: {record['prefill_tok_s']:.0f} tok/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)


if __name__ == "__main__":
    main()
