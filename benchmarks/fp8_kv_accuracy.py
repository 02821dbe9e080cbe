"""How far an fp8 KV cache moves the model's outputs from a KV cache of the model's dtype.

    python benchmarks/fp8_kv_accuracy.py                       # dummy Qwen3-0.6B weights, bf16, on the GPU
    python benchmarks/fp8_kv_accuracy.py --model ./huggingface/Qwen3-0.6B --json out.json

Both engines run the same weights (random weights are drawn from the same seed) one after the
other. Three figures:

1. Sampled tokens (temperature 0.6, seeded requests): the fp8 engine generates, with the
   logprob of each token it samples (its decode path reads the fp8 cache); an engine with the
   model's dtype in its cache scores the same sequences (prompt_logprobs, one prefill each).
   Reported: mean and largest |logprob difference| over the sampled tokens. The same figure for
   the model-dtype engine's own samples is the floor (decode against prefill rounding).
2. Greedy agreement on a model with peaked logits (the embedding, tied to the LM head, scaled by
   --peaked-scale; with --model, the checkpoint as it is): the share of prompts whose greedy
   continuations are equal, and the share of tokens before the first difference.
3. Teacher-forced top-1 agreement there: of the model-dtype engine's greedy tokens, the share
   that the fp8 engine ranks first given the same prefix.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import random_ids  # noqa: E402
from myvllm import LLM, SamplingParams  # noqa: E402

DUMMY = "dummy:qwen3-0.6b"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint directory (default: dummy Qwen3-0.6B weights)")
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available)")
    parser.add_argument("--dtype", default="auto", help="the model's dtype (auto: the checkpoint's; bf16 for dummy)")
    parser.add_argument("--kv-cache-dtype", default="fp8", help="the fp8 engine's kv_cache_dtype")
    parser.add_argument("--calculate-kv-scales", action="store_true", help="measure the fp8 scales at start-up")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--peaked-scale", type=float, default=20.0,
                        help="factor on the dummy model's embedding for the greedy figures")
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-kv-blocks", type=int, default=None,
                        help="a fixed KV cache size (blocks), independent of other processes on the card")
    parser.add_argument("--json", default=None, help="write the figures here")
    return parser


def make_llm(args: argparse.Namespace, kv_cache_dtype: str, peaked: bool) -> LLM:
    kw = dict(dtype=args.dtype, device=args.device, kvcache_block_size=args.block_size, seed=args.seed,
              max_model_len=args.prompt_len + args.output_len + 1, gpu_memory_utilization=0.85,
              num_kv_blocks=args.num_kv_blocks,
              kv_cache_dtype=kv_cache_dtype, calculate_kv_scales=args.calculate_kv_scales and kv_cache_dtype != "auto")
    if args.model is None:
        llm = LLM(DUMMY, load_format="dummy", skip_tokenizer_init=True, **kw)
        if peaked:  # in place: the captured graphs read the same tensor
            llm.engine.runner.model.model.embed_tokens.weight.data.mul_(args.peaked_scale)
        return llm
    return LLM(args.model, **kw)


def vocab(llm: LLM) -> int:
    return llm.engine.model_config.vocab_size


def sampled_logprobs(llm: LLM, prompts, params) -> tuple[list[list[int]], list[torch.Tensor]]:
    """(prompt + sampled tokens, the engine's logprob of each sampled token) per prompt."""
    outs = llm.generate(prompts, params, use_tqdm=False)
    seqs, lps = [], []
    for prompt, out in zip(prompts, outs):
        c = out.outputs[0]
        seqs.append(prompt + c.token_ids)
        lps.append(torch.tensor([entry[t].logprob for entry, t in zip(c.logprobs, c.token_ids)]))
    return seqs, lps


def scored_logprobs(llm: LLM, seqs: list[list[int]],
                    num_new: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(logprob, rank) of the last num_new[i] tokens of seqs[i], each given the tokens before it."""
    outs = llm.generate(seqs, SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    lps, ranks = [], []
    for seq, n, out in zip(seqs, num_new, outs):
        entries = out.prompt_logprobs[len(seq) - n:]
        lps.append(torch.tensor([e[t].logprob for e, t in zip(entries, seq[len(seq) - n:])]))
        ranks.append(torch.tensor([e[t].rank for e, t in zip(entries, seq[len(seq) - n:])]))
    return lps, ranks


def abs_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> tuple[float, float]:
    d = (torch.cat(a) - torch.cat(b)).abs()
    return d.mean().item(), d.max().item()


def sampled_figures(args: argparse.Namespace) -> dict:
    random.seed(args.seed)
    params = [SamplingParams(temperature=0.6, max_tokens=args.output_len, ignore_eos=True, logprobs=0, seed=i)
              for i in range(args.num_prompts)]
    base = make_llm(args, "auto", peaked=False)
    prompts = [random_ids(args.prompt_len, vocab(base)) for _ in range(args.num_prompts)]
    base_seqs, base_lps = sampled_logprobs(base, prompts, params)
    n = [len(lp) for lp in base_lps]
    floor = abs_diff(base_lps, scored_logprobs(base, base_seqs, n)[0])
    base.shutdown()
    fp8 = make_llm(args, args.kv_cache_dtype, peaked=False)
    fp8_seqs, fp8_lps = sampled_logprobs(fp8, prompts, params)
    fp8.shutdown()
    base = make_llm(args, "auto", peaked=False)
    diff = abs_diff(fp8_lps, scored_logprobs(base, fp8_seqs, [len(lp) for lp in fp8_lps])[0])
    base.shutdown()
    return dict(sampled_mean_abs_logprob_diff=diff[0], sampled_max_abs_logprob_diff=diff[1],
                floor_mean_abs_logprob_diff=floor[0], floor_max_abs_logprob_diff=floor[1],
                mean_sampled_logprob=torch.cat(fp8_lps).mean().item())


def greedy_figures(args: argparse.Namespace) -> dict:
    greedy = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    base = make_llm(args, "auto", peaked=True)
    random.seed(args.seed + 1)
    prompts = [random_ids(args.prompt_len, vocab(base)) for _ in range(args.num_prompts)]
    base_tokens = [o.outputs[0].token_ids for o in base.generate(prompts, greedy, use_tqdm=False)]
    base.shutdown()
    fp8 = make_llm(args, args.kv_cache_dtype, peaked=True)
    fp8_tokens = [o.outputs[0].token_ids for o in fp8.generate(prompts, greedy, use_tqdm=False)]
    _, ranks = scored_logprobs(fp8, [p + t for p, t in zip(prompts, base_tokens)], [len(t) for t in base_tokens])
    fp8.shutdown()

    def common_prefix(a: list[int], b: list[int]) -> int:
        return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))

    prefix = sum(common_prefix(a, b) for a, b in zip(base_tokens, fp8_tokens)) / sum(map(len, base_tokens))
    return dict(greedy_equal_prompts=sum(a == b for a, b in zip(base_tokens, fp8_tokens)) / len(prompts),
                greedy_tokens_before_first_difference=prefix,
                teacher_forced_top1_agreement=(torch.cat(ranks) == 1).float().mean().item())


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    figures = dict(config=vars(args), **sampled_figures(args), **greedy_figures(args))
    for key, value in figures.items():
        if key != "config":
            print(f"{key}: {value:.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
