"""Microbenchmark of the sampler on CUDA at Qwen3's vocabulary (151,936), bf16 logits.

For N = 1, 64, 256 rows, the time of one Sampler call (as the engine makes it: eager, after
the decode graph's replay) on each path:

  - temperature (T 0.6): the torch exponential race; the Gumbel kernel;
  - qwen3 (T 0.6, top_k 20, top_p 0.95): the torch path with a full sort and with the partial
    top-k sort; the sorting-free kernels;
  - penalties (qwen3 + presence 1.5 + repetition 1.05, 200 prompt and 100 output tokens per
    row): the same three;
  - top_p 0.9 alone: the torch path with a full sort; the kernels;
  - logprobs=5 on temperature sampling and on qwen3: the torch log_softmax path; the kernels.

Times are medians over repeats of CUDA-event timings of 50 back-to-back calls.

    python benchmarks/sampling_microbench.py [--rows 1,64,256] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from myvllm.sample import sampler as sampler_module  # noqa: E402
from myvllm.sample.metadata import SamplingMetadata  # noqa: E402
from myvllm.sample.sampler import Sampler  # noqa: E402

VOCAB = 151936
CALLS = 50
REPEATS = 7


def make_logits(n: int, gen: torch.Generator) -> torch.Tensor:
    """A bulk of small logits and a head of 64 likely tokens per row, like a language model's."""
    logits = torch.randn(n, VOCAB, generator=gen, device="cuda")
    head = torch.randint(0, VOCAB, (n, 64), generator=gen, device="cuda")
    logits.scatter_(1, head, 14 + 1.5 * torch.randn(n, 64, generator=gen, device="cuda"))
    return logits.bfloat16()


def penalty_fields(n: int, gen: torch.Generator) -> dict:
    counts = torch.zeros(n, VOCAB, device="cuda")
    out_ids = torch.randint(0, VOCAB, (n, 100), generator=gen, device="cuda")
    counts.scatter_add_(1, out_ids, torch.ones_like(out_ids, dtype=torch.float32))
    prompt = torch.zeros(n, VOCAB, dtype=torch.bool, device="cuda")
    prompt.scatter_(1, torch.randint(0, VOCAB, (n, 200), generator=gen, device="cuda"), True)
    return dict(output_counts=counts, prompt_mask=prompt, presence_penalties=torch.full((n,), 1.5, device="cuda"),
                frequency_penalties=torch.zeros(n, device="cuda"),
                repetition_penalties=torch.full((n,), 1.05, device="cuda"))


def metadata(n: int, path: str, filters: bool | str, penalties: bool, logprobs: int | None,
             gen: torch.Generator) -> SamplingMetadata:
    """path: "torch-full" (full sort), "torch-partial" (top-k sort), "kernel"."""
    temps = torch.full((n,), 0.6, device="cuda")
    meta = SamplingMetadata(all_greedy=False, num_logprobs=logprobs)
    if path == "kernel":
        meta.fused_temperatures = temps
        meta.fused_seeds = torch.arange(n, dtype=torch.int64, device="cuda")[None]
    else:
        meta.temperatures = temps
        meta.generator = torch.Generator(device="cuda").manual_seed(0)
    if filters == "top_p":
        meta.top_p = torch.full((n,), 0.9, device="cuda")
    elif filters:
        meta.top_k = torch.full((n,), 20, dtype=torch.int64, device="cuda")
        meta.top_p = torch.full((n,), 0.95, device="cuda")
        meta.max_top_k = 20 if path != "torch-full" else None
    if penalties:
        for name, value in penalty_fields(n, gen).items():
            setattr(meta, name, value)
    return meta


def time_us(fn) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(REPEATS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(CALLS):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000 / CALLS)
    return statistics.median(times)


CASES = {  # name: (filters, penalties, logprobs, paths)
    "temperature": (False, False, None, ["torch-full", "kernel"]),
    "qwen3": (True, False, None, ["torch-full", "torch-partial", "kernel"]),
    "penalties": (True, True, None, ["torch-full", "torch-partial", "kernel"]),
    # top_p alone: the kernels bound the nucleus by a mass histogram
    "top_p0.9-only": ("top_p", False, None, ["torch-full", "kernel"]),
    "temperature+logprobs5": (False, False, 5, ["kernel+torch-logprobs", "kernel"]),
    "qwen3+logprobs5": (True, False, 5, ["torch-partial", "kernel+torch-logprobs", "kernel"]),
}


def run_case(n: int, filters: bool | str, penalties: bool, logprobs: int | None, path: str) -> float:
    gen = torch.Generator(device="cuda").manual_seed(n)
    logits = make_logits(n, gen)
    torch_logprobs = path != "kernel"
    meta = metadata(n, path.split("+")[0], filters, penalties, logprobs, gen)
    sampler = Sampler()
    kernels_support = sampler_module.logits_kernels_support
    if torch_logprobs:  # today's logprobs: log_softmax over the whole vocabulary
        sampler_module.logits_kernels_support = lambda logits: False
    try:
        return time_us(lambda: sampler(logits, meta))
    finally:
        sampler_module.logits_kernels_support = kernels_support


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,64,256", help="comma-separated batch sizes")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    results = []
    print(f"{'case':<24}{'N':>5}  {'path':<24}{'us/call':>10}{'vs first':>10}")
    for name, (filters, penalties, logprobs, paths) in CASES.items():
        for n in rows:
            first = None
            for path in paths:
                us = run_case(n, filters, penalties, logprobs, path)
                first = first or us
                results.append(dict(case=name, rows=n, path=path, us=us))
                print(f"{name:<24}{n:>5}  {path:<24}{us:>10.1f}{first / us:>9.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
