"""Throughput of a burst with 10% of its requests constrained by a JSON schema, against the same
burst unconstrained, in one process.

    python benchmarks/constrained_burst.py --model ./huggingface/Qwen3-0.6B [--json out.json]
    python benchmarks/make_bench_tokenizer.py /tmp/tok && \
        python benchmarks/constrained_burst.py --model dummy:qwen3-0.6b --tokenizer /tmp/tok

The burst is bench.py's seed workload (256 prompts of random token ids, temperature 0.6,
ignore_eos). Every tenth request is constrained by SCHEMA (a bounded object: its output ends
with the stop token the grammar forces, after a few dozen tokens). Each round runs
  1. the constrained burst, and checks that every constrained output parses and validates;
  2. the "matched" unconstrained burst: the same requests without the constraint, the ones that
     were constrained given max_tokens equal to the tokens their constrained run produced, so both
     bursts generate the same tokens and the ratio of their throughputs is that of their times;
  3. the plain unconstrained burst (the seed workload as bench.py runs it), for reference.
The best time of --rounds rounds counts. Prefix caching is off, so that a later run does not
reuse an earlier run's prompts. Target: ratio (constrained / matched) >= 0.9.
Needs xgrammar and a tokenizer: a real checkpoint's, or for random weights (`dummy:` models)
one of Qwen3's size from benchmarks/make_bench_tokenizer.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bench  # noqa: E402  (the repository root's bench.py: the seed workload)
from myvllm import LLM, SamplingParams, StructuredOutputsParams  # noqa: E402

CONSTRAINED_EVERY = 10  # one request in ten is constrained


class Order(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: Annotated[int, Field(ge=0, le=9999)]
    name: Annotated[str, Field(pattern=r"^[a-z]{1,12}$")]
    status: Literal["new", "paid", "shipped", "returned", "lost"]
    tags: Annotated[list[Literal["red", "green", "blue"]], Field(max_length=3)]
    rating: Annotated[int, Field(ge=1, le=5)]
    gift: bool


SCHEMA = Order.model_json_schema()


def timed(llm: LLM, prompts, params) -> tuple[float, list, int]:
    """(seconds, outputs, batches scheduled) of one generate."""
    before = llm.engine.get_stats()["num_batches"]
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    return elapsed, outputs, llm.engine.get_stats()["num_batches"] - before


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="./huggingface/Qwen3-0.6B", help="checkpoint directory or hub id")
    parser.add_argument("--num-seqs", type=int, default=bench.GPU_WORKLOAD["num_seqs"])
    parser.add_argument("--max-input-len", type=int, default=bench.GPU_WORKLOAD["max_input_len"])
    parser.add_argument("--max-output-len", type=int, default=bench.GPU_WORKLOAD["max_output_len"])
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's)")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--num-decode-passes", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the three bursts; the best time counts")
    parser.add_argument("--seed", type=int, default=0, help="seed of the workload's prompts and lengths")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--json", default=None, help="write the figures here")
    args = parser.parse_args(argv)

    load_format = "dummy" if args.model.startswith("dummy:") else "auto"
    llm = LLM(args.model, tokenizer=args.tokenizer, load_format=load_format, max_model_len=args.max_model_len,
              kvcache_block_size=256, device=args.device, dtype=args.dtype, num_decode_passes=args.num_decode_passes,
              enable_prefix_caching=False)
    vocab_size = llm.engine.model_config.vocab_size
    prompts, plain = bench.workload(args.num_seqs, args.max_input_len, args.max_output_len, args.seed, vocab_size)
    rows = list(range(0, len(prompts), CONSTRAINED_EVERY))
    spec = StructuredOutputsParams(json=SCHEMA)
    constrained = list(plain)
    for i in rows:
        constrained[i] = dataclasses.replace(plain[i], structured_outputs=spec)
    warm = [bench.random_ids(n, vocab_size) for n in (4, min(300, args.max_input_len), args.max_input_len)]
    llm.generate(warm, [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=32),
                        SamplingParams(temperature=0.6, max_tokens=64, structured_outputs=spec),
                        SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=64)], use_tqdm=False)

    best: dict[str, tuple[float, int, int]] = {}  # run -> (seconds, output tokens, batches)
    invalid = []
    for _ in range(args.rounds):
        t, outputs, batches = timed(llm, prompts, constrained)
        tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        best["constrained"] = min(best.get("constrained", (t, tokens, batches)), (t, tokens, batches))
        for i in rows:
            c = outputs[i].outputs[0]
            try:
                Order.model_validate_json(c.text)
            except ValueError as e:
                invalid.append((i, c.finish_reason, c.text[:200], str(e)[:200]))
        matched = list(plain)
        for i in rows:
            matched[i] = dataclasses.replace(plain[i], max_tokens=len(outputs[i].outputs[0].token_ids))
        t, outputs, batches = timed(llm, prompts, matched)
        tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        best["matched"] = min(best.get("matched", (t, tokens, batches)), (t, tokens, batches))
        t, outputs, batches = timed(llm, prompts, plain)
        tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        best["plain"] = min(best.get("plain", (t, tokens, batches)), (t, tokens, batches))

    record = {name: {"time_s": t, "output_tokens": n, "throughput_tok_s": n / t, "batches": b}
              for name, (t, n, b) in best.items()}
    record["ratio_constrained_vs_matched"] = record["constrained"]["throughput_tok_s"] / record["matched"][
        "throughput_tok_s"]
    record["ratio_constrained_vs_plain"] = record["constrained"]["throughput_tok_s"] / record["plain"][
        "throughput_tok_s"]
    record["constrained_requests"] = len(rows) * args.rounds
    record["invalid_constrained_outputs"] = invalid
    record["config"] = vars(args)
    record["card"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    record["commit"] = bench.git_commit()
    for name in ("constrained", "matched", "plain"):
        r = record[name]
        print(f"{name:>11}: {r['output_tokens']} tok in {r['time_s']:.2f} s = {r['throughput_tok_s']:.0f} tok/s, "
              f"{r['batches']} batches")
    print(f"ratio constrained / matched: {record['ratio_constrained_vs_matched']:.3f} (target >= 0.9); "
          f"constrained / plain: {record['ratio_constrained_vs_plain']:.3f}")
    print(f"constrained outputs: {record['constrained_requests']}, invalid: {len(invalid)}")
    for bad in invalid[:5]:
        print("  invalid:", bad)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)
    if invalid:
        sys.exit(1)


if __name__ == "__main__":
    main()
