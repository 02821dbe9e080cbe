"""Throughput on a fixed workload, plus single-stream latency and prefill throughput.

    python bench.py --dummy                    # random weights with Qwen3-0.6B shapes
    python bench.py --model dummy:qwen3-30b-a3b   # random weights with other built-in shapes
    python bench.py --dummy --kv-cache-dtype fp8   # the same with an fp8 KV cache
    python bench.py --model ./huggingface/Qwen3-0.6B --json out.json
    python bench.py --dummy --quantization fp8  # random block-FP8 weights, Qwen3-0.6B shapes
    python bench.py --model dummy:qwen3-8b --quantization fp8  # another built-in shape set
    python bench.py --model dummy:qwen3-30b-a3b --quantization fp8  # block-FP8 experts too

The workload: random.seed(seed); num_seqs prompts of randint(100, max_input_len) token ids
drawn from randint(0, 10000) (capped at the model's largest token id); then num_seqs
max_tokens of randint(100, max_output_len) (a length bound below 100 is used as it is);
temperature 0.6, ignore_eos, max_model_len 4096. Throughput = output tokens / wall time
of generate (engine start and graph capture excluded; one warm-up generate first).

On a CPU the default workload is a small one (see CPU_WORKLOAD): the GPU's would run for hours.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import time
from random import randint, seed

import torch

from myvllm import LLM, SamplingParams
from myvllm.config import BUILTIN_SHAPES, DUMMY_PREFIX, KV_CACHE_DTYPES, resolve_device

logger = logging.getLogger("bench")

# Token ids of the seed workload are drawn from [0, SEED_MAX_TOKEN_ID].
SEED_MAX_TOKEN_ID = 10000
# Shortest prompt and output of the workload (when the length bounds allow it).
MIN_LEN = 100
# Workload sizes when neither --num-seqs, --max-input-len nor --max-output-len says otherwise,
# and the sizes of --latency's measurements. GPU_WORKLOAD is the seed workload.
GPU_WORKLOAD = dict(num_seqs=256, max_input_len=1024, max_output_len=1024,
                    stream_prompt_len=128, stream_output_len=512, prefill_prompts=64, prefill_prompt_len=1024)
CPU_WORKLOAD = dict(num_seqs=4, max_input_len=128, max_output_len=64,
                    stream_prompt_len=32, stream_output_len=32, prefill_prompts=4, prefill_prompt_len=128)
SIZE_FLAGS = ("num_seqs", "max_input_len", "max_output_len")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the docstring's layout and appends each flag's default; a default of None is left to
    the flag's own help text, which says what it means."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None:
            return action.help or ""
        return super()._get_help_string(action)


def git_commit() -> str:
    if os.environ.get("MYVLLM_COMMIT"):
        return os.environ["MYVLLM_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def random_ids(length: int, vocab_size: int) -> list[int]:
    """length token ids from randint(0, 10000), or from the whole vocabulary if it is smaller."""
    high = min(SEED_MAX_TOKEN_ID, vocab_size - 1)
    return [randint(0, high) for _ in range(length)]


# --sampling: the seed workload's temperature alone, Qwen3's recommended sampling (its
# generation_config.json), and that with penalties.
SAMPLING = {
    "temperature": dict(temperature=0.6),
    "qwen3": dict(temperature=0.6, top_k=20, top_p=0.95),
    "penalties": dict(temperature=0.6, top_k=20, top_p=0.95, presence_penalty=1.5, repetition_penalty=1.05),
}


def workload(num_seqs: int, max_input_len: int, max_output_len: int, rng_seed: int,
             vocab_size: int = SEED_MAX_TOKEN_ID + 1, sampling: str = "temperature", logprobs: int | None = None):
    seed(rng_seed)
    prompts = [random_ids(randint(min(MIN_LEN, max_input_len), max_input_len), vocab_size)
               for _ in range(num_seqs)]
    params = [SamplingParams(**SAMPLING[sampling], ignore_eos=True, logprobs=logprobs,
                             max_tokens=randint(min(MIN_LEN, max_output_len), max_output_len))
              for _ in range(num_seqs)]
    return prompts, params


def timed_generate(llm: LLM, prompts, params) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - start


def single_stream_ms_per_token(llm: LLM, vocab_size: int, prompt_len: int = 128, output_len: int = 512) -> float:
    """(time of prompt + output_len tokens - time of prompt + 1 token) / (output_len - 1), best of 3."""
    prompt = random_ids(prompt_len, vocab_size)
    first = min(timed_generate(llm, [prompt], SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=1))
                for _ in range(3))
    full = min(timed_generate(llm, [prompt], SamplingParams(temperature=0.6, ignore_eos=True,
                                                            max_tokens=output_len)) for _ in range(3))
    return (full - first) / (output_len - 1) * 1000


def prefill_tokens_per_s(llm: LLM, vocab_size: int, num_prompts: int = 64, prompt_len: int = 1024) -> float:
    prompts = [random_ids(prompt_len, vocab_size) for _ in range(num_prompts)]
    elapsed = timed_generate(llm, prompts, SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=1))
    return num_prompts * prompt_len / elapsed


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--model", default="./huggingface/Qwen3-0.6B",
                        help=f"checkpoint directory, hub id, or {DUMMY_PREFIX}NAME for random weights with built-in "
                             f"shapes ({', '.join(BUILTIN_SHAPES)})")
    parser.add_argument("--dummy", action="store_true", help="random weights with Qwen3-0.6B shapes, no files")
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default="auto", help="auto (the checkpoint's), bfloat16, float16 or float32")
    parser.add_argument("--quantization", choices=["fp8"], default=None,
                        help="fp8: block-FP8 weights (random ones with --dummy); default: the checkpoint's")
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                        help="GPUs to split the model over (one rank each)")
    parser.add_argument("--num-seqs", type=int, default=None,
                        help=f"prompts in the workload (default: {GPU_WORKLOAD['num_seqs']} on a GPU, "
                             f"{CPU_WORKLOAD['num_seqs']} on a CPU)")
    parser.add_argument("--max-input-len", type=int, default=None,
                        help=f"longest prompt, in tokens (default: {GPU_WORKLOAD['max_input_len']} on a GPU, "
                             f"{CPU_WORKLOAD['max_input_len']} on a CPU)")
    parser.add_argument("--max-output-len", type=int, default=None,
                        help=f"largest max_tokens of a prompt (default: {GPU_WORKLOAD['max_output_len']} on a "
                             f"GPU, {CPU_WORKLOAD['max_output_len']} on a CPU)")
    parser.add_argument("--max-model-len", type=int, default=4096, help="prompt + output tokens of one sequence")
    parser.add_argument("--block-size", type=int, default=256, help="tokens per KV cache block")
    parser.add_argument("--attention-backend", default="auto", help="auto, torch, triton or flash_attn")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=sorted(KV_CACHE_DTYPES),
                        help="auto (the model's dtype) or fp8 / fp8_e4m3 (float8 e4m3, scales from the checkpoint "
                             "or 1.0)")
    parser.add_argument("--compilation-level", type=int, default=0, choices=(0, 1),
                        help="1: the model's forward through torch.compile (inside the decode graphs too)")
    parser.add_argument("--no-cuda-kernels", action="store_true",
                        help="torch ops instead of the fused CUDA kernels (with --compilation-level 1, Inductor "
                             "fuses the norms, rotary and SiLU itself)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the workload's random prompts and lengths")
    parser.add_argument("--num-decode-passes", "--num-scheduler-steps", type=int, default=8,
                        help="forward passes a decode-only batch runs per schedule")
    parser.add_argument("--no-async-scheduling", action="store_true",
                        help="read every decode window back before scheduling the next")
    parser.add_argument("--sampling", choices=sorted(SAMPLING), default="temperature",
                        help="temperature: T 0.6; qwen3: T 0.6, top_k 20, top_p 0.95; penalties: qwen3 + presence 1.5 "
                             "+ repetition 1.05")
    parser.add_argument("--logprobs", type=int, default=None, help="top-k logprobs per token (default: none)")
    parser.add_argument("--latency", action="store_true", help="also single-stream latency and prefill throughput")
    parser.add_argument("--json", default=None, help="write a JSON record here (default: no record)")
    return parser


def default_workload(args: argparse.Namespace, device: torch.device) -> dict:
    """The workload sizes for device; fills the size flags the user left out into args."""
    sizes = CPU_WORKLOAD if device.type == "cpu" else GPU_WORKLOAD
    if device.type == "cpu":
        given = [name for name in SIZE_FLAGS if getattr(args, name) is not None]
        if not given:
            logger.warning("bench.py runs on a CPU: the GPU workload would take hours, so this run uses a small "
                           "one (%s); give --num-seqs, --max-input-len and --max-output-len to change it",
                           ", ".join(f"{name}={sizes[name]}" for name in SIZE_FLAGS))
    for name in SIZE_FLAGS:
        if getattr(args, name) is None:
            setattr(args, name, sizes[name])
    return sizes


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    device = resolve_device(args.device)
    sizes = default_workload(args, device)
    engine_args = dict(enforce_eager=args.enforce_eager, max_model_len=args.max_model_len,
                       kvcache_block_size=args.block_size, attention_backend=args.attention_backend,
                       kv_cache_dtype=args.kv_cache_dtype,
                       num_decode_passes=args.num_decode_passes,
                       async_scheduling=not args.no_async_scheduling, device=args.device, dtype=args.dtype,
                       quantization=args.quantization, tensor_parallel_size=args.tensor_parallel_size)
    model = "dummy:qwen3-0.6b" if args.dummy else args.model
    if model.startswith(DUMMY_PREFIX):  # built-in shapes, random weights
        engine_args.update(load_format="dummy", skip_tokenizer_init=True)
    start = time.perf_counter()
    llm = LLM(model, compilation_level=args.compilation_level, use_cuda_kernels=not args.no_cuda_kernels,
              **engine_args)
    init_time = time.perf_counter() - start
    print(f"Engine start: {init_time:.2f}s")
    graph_runner = llm.engine.runner.graph_runner
    vocab_size = llm.engine.model_config.vocab_size

    prompts, params = workload(args.num_seqs, args.max_input_len, args.max_output_len, args.seed, vocab_size,
                               args.sampling, args.logprobs)
    # warm-up: short and long prompts, decode sampled as measured (its sampling kernels compiled)
    warm = [random_ids(n, vocab_size) for n in (4, min(300, args.max_input_len), args.max_input_len)]
    llm.generate(warm, SamplingParams(**SAMPLING[args.sampling], logprobs=args.logprobs, ignore_eos=True,
                                      max_tokens=32), use_tqdm=False)
    elapsed = timed_generate(llm, prompts, params)
    total = sum(p.max_tokens for p in params)
    throughput = total / elapsed
    print(f"Total: {total}tok, Time: {elapsed:.2f}s, Throughput: {throughput:.2f}tok/s")

    record = dict(
        throughput_tok_s=throughput, time_s=elapsed, output_tokens=total,
        prompt_tokens=sum(len(p) for p in prompts), init_time_s=init_time,
        capture_time_s=getattr(graph_runner, "capture_time", None),
        card=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        torch=torch.__version__, commit=git_commit(), config=vars(args),
        attention_backend=llm.engine.runner.backend.name, num_kv_blocks=llm.engine.runner.num_blocks,
    )
    if args.latency:
        record["single_stream_ms_per_token"] = single_stream_ms_per_token(
            llm, vocab_size, sizes["stream_prompt_len"], sizes["stream_output_len"])
        record["prefill_tok_s"] = prefill_tokens_per_s(llm, vocab_size, sizes["prefill_prompts"],
                                                       sizes["prefill_prompt_len"])
        print(f"Single stream: {record['single_stream_ms_per_token']:.3f} ms/token, "
              f"Prefill: {record['prefill_tok_s']:.0f} tok/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)


if __name__ == "__main__":
    main()
