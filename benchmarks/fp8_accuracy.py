"""Block-FP8 against bf16 on the same random weights: mean |logprob error| of sampled tokens
(dense and MoE shape sets: qwen3-30b-a3b quantizes its experts too).

For each built-in shape set: the bf16 dummy model samples continuations of random prompts
(temperature 1); then prompt + continuation is scored (prompt_logprobs) by the bf16 model
itself, by the same weights quantized to block FP8 (128 x 128 blocks) in memory, and (unless
--no-fp32) by the same weights in float32. Reported per model: the mean and the 99th percentile
of |logprob(FP8) - logprob(bf16)| over the continuation tokens, the same for bf16 against float32
(the error budget bf16 itself spends), and FP8 against float32.

    PYTHONPATH=. python benchmarks/fp8_accuracy.py --models qwen3-0.6b qwen3-8b --json fp8_accuracy.json
"""

from __future__ import annotations

import argparse
import gc
import json
import random

import torch

from myvllm import LLM, SamplingParams
from myvllm.kernels.reference_fp8 import quantize_weight


def engine(model: str, dtype: str, quantization: str | None, args) -> LLM:
    return LLM(f"dummy:{model}", load_format="dummy", dtype=dtype, quantization=quantization, seed=args.seed,
               skip_tokenizer_init=True, max_model_len=args.prompt_len + args.max_tokens + 1,
               enable_prefix_caching=False, gpu_memory_utilization=args.gpu_memory_utilization,
               num_kv_blocks=args.num_kv_blocks)


def release(llm: LLM) -> None:
    llm.shutdown()
    del llm
    gc.collect()
    torch.cuda.empty_cache()


def score(llm: LLM, sequences: list[list[int]], prompt_len: int) -> torch.Tensor:
    """Logprobs [num_seqs, continuation] of each sequence's tokens after prompt_len."""
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    outputs = llm.generate([{"prompt_token_ids": s} for s in sequences], params, use_tqdm=False)
    rows = []
    for seq, out in zip(sequences, outputs):
        rows.append([out.prompt_logprobs[i][seq[i]].logprob for i in range(prompt_len, len(seq))])
    return torch.tensor(rows, dtype=torch.float64)


@torch.no_grad()
def load_weights(llm: LLM, state: dict[str, torch.Tensor]) -> None:
    """Copy the bf16 state into llm's model; a block-FP8 layer gets the state's weights quantized
    (`weight` of a linear layer, `w13_weight` and `w2_weight` of an MoE layer's experts)."""
    model = llm.engine.runner.model
    params = dict(model.named_parameters())
    for name, module in model.named_modules():
        method = getattr(module, "quant_method", None)
        if method is None:
            continue
        for scale_name, scale in list(module.named_parameters(prefix=name, recurse=False)):
            if not scale_name.endswith("weight_scale_inv"):
                continue
            weight_name = scale_name.removesuffix("_scale_inv")
            w = state.pop(weight_name).to(scale.device, torch.float32)
            q, s = quantize_weight(w, method.config.block_n, method.config.block_k)
            params.pop(weight_name).copy_(q)
            params.pop(scale_name).copy_(s)
            del w, q, s
    if set(params) != set(state):
        raise ValueError(f"parameters differ: {sorted(set(params) ^ set(state))[:10]}")
    for name, param in params.items():
        param.copy_(state[name])


def stats(err: torch.Tensor) -> dict:
    flat = err.abs().flatten()
    return dict(mean=flat.mean().item(), p99=flat.quantile(0.99).item(), max=flat.max().item())


def measure(model: str, args) -> dict:
    rng = random.Random(args.seed)
    prompts = [[rng.randint(0, args.max_token_id) for _ in range(args.prompt_len)] for _ in range(args.num_seqs)]
    bf16 = engine(model, "bfloat16", None, args)
    sample = SamplingParams(temperature=1.0, max_tokens=args.max_tokens, ignore_eos=True, seed=args.seed)
    outs = bf16.generate([{"prompt_token_ids": p} for p in prompts], sample, use_tqdm=False)
    sequences = [p + o.outputs[0].token_ids for p, o in zip(prompts, outs)]
    lp = {"bf16": score(bf16, sequences, args.prompt_len)}
    state = {n: p.detach().cpu() for n, p in bf16.engine.runner.model.named_parameters()}
    release(bf16)
    for name, dtype, quant in [("fp8", "bfloat16", "fp8"), ("fp32", "float32", None)]:
        if name == "fp32" and args.no_fp32:
            continue
        llm = engine(model, dtype, quant, args)
        load_weights(llm, dict(state))
        lp[name] = score(llm, sequences, args.prompt_len)
        release(llm)
    result = dict(model=model, tokens=lp["bf16"].numel(), fp8_vs_bf16=stats(lp["fp8"] - lp["bf16"]))
    if "fp32" in lp:
        result.update(bf16_vs_fp32=stats(lp["bf16"] - lp["fp32"]), fp8_vs_fp32=stats(lp["fp8"] - lp["fp32"]))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["qwen3-0.6b", "qwen3-8b"], help="built-in shape sets")
    parser.add_argument("--num-seqs", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=128, help="sampled tokens per sequence")
    parser.add_argument("--max-token-id", type=int, default=10000, help="prompt ids drawn from [0, this]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.6)
    parser.add_argument("--no-fp32", action="store_true", help="skip the float32 scoring")
    parser.add_argument("--num-kv-blocks", type=int, default=None,
                        help="a fixed KV cache size (blocks), independent of other processes on the card")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    results = []
    for model in args.models:
        r = measure(model, args)
        results.append(r)
        line = f"{model}: {r['tokens']} tokens, mean |logprob error| FP8 vs bf16 {r['fp8_vs_bf16']['mean']:.4f}"
        if "bf16_vs_fp32" in r:
            line += (f", bf16 vs fp32 {r['bf16_vs_fp32']['mean']:.4f}, FP8 vs fp32 {r['fp8_vs_fp32']['mean']:.4f}")
        print(line, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(config=vars(args), results=results), f, indent=2)


if __name__ == "__main__":
    main()
