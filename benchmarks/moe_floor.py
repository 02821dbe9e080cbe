"""The physical floor of the seed workload for a built-in MoE shape (default Qwen3-30B-A3B, bf16).

The time the card needs to move the bytes and do the arithmetic of the workload once:
  - decode, pass by pass: the batch of pass s is every request with more than s output tokens;
    the pass reads the dense weights (attention, routers, norms, LM head), the experts its
    tokens choose (an expert of a layer is read once however many tokens choose it; with
    uniform routing a layer reads E * (1 - (1 - K / E) ** B) experts for a batch of B), and
    the KV cache of every sequence in the batch;
  - prefill: the matmuls (2 FLOP per active weight per prompt token) and causal attention.
Ceilings default to those measured on the H200 (docs/performance.md).

    python benchmarks/moe_floor.py [--model qwen3-30b-a3b] [--bandwidth 4.27e12] [--flops 803e12]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

import bench  # noqa: E402
from myvllm.config import ModelConfig  # noqa: E402

BYTES = 2  # bf16


def floor(cfg: ModelConfig, prompt_lens: list[int], output_lens: list[int], bandwidth: float,
          flops: float) -> dict[str, float]:
    h, layers, e, k = cfg.hidden_size, cfg.num_hidden_layers, cfg.num_experts, cfg.num_experts_per_tok
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    attention = layers * (h * (q + 2 * kv) + q * h)  # q/k/v/o projections
    router = layers * e * h
    expert = 3 * h * cfg.moe_intermediate_size  # one expert's gate, up and down
    lm_head = cfg.vocab_size * h
    dense_bytes = (attention + router + lm_head) * BYTES
    kv_per_token = cfg.kv_bytes_per_token(torch.bfloat16)
    weight_bytes = expert_bytes = kv_reads = 0.0
    for s in range(1, max(output_lens)):  # pass s computes output token s + 1 (token 1 comes with the prefill)
        batch = [(p, o) for p, o in zip(prompt_lens, output_lens) if o > s]
        hit = e * (1 - (1 - k / e) ** len(batch))  # experts read per layer
        weight_bytes += dense_bytes
        expert_bytes += layers * hit * expert * BYTES
        kv_reads += sum(p + s for p, _ in batch)  # context of the token being computed
    active = attention + router + layers * k * expert  # matmul weights one prompt token meets
    prefill_flops = 2 * active * sum(prompt_lens)
    prefill_flops += sum(4 * layers * q * p * (p + 1) / 2 for p in prompt_lens)  # QK^T and PV, causal
    terms = dict(
        dense_weights_s=weight_bytes / bandwidth,
        experts_s=expert_bytes / bandwidth,
        kv_s=kv_reads * kv_per_token / bandwidth,
        prefill_s=prefill_flops / flops,
    )
    terms["floor_s"] = sum(terms.values())
    terms["output_tokens"] = sum(output_lens)
    terms["floor_tok_s"] = terms["output_tokens"] / terms["floor_s"]
    terms["kv_token_reads"] = kv_reads
    terms["expert_tb"] = expert_bytes / 1e12
    terms["batch256_pass_experts_ms"] = layers * e * (1 - (1 - k / e) ** 256) * expert * BYTES / bandwidth * 1e3
    return terms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen3-30b-a3b", help="a built-in MoE shape")
    parser.add_argument("--bandwidth", type=float, default=4.27e12, help="bytes/s (H200 device copy)")
    parser.add_argument("--flops", type=float, default=803e12, help="bf16 matmul FLOP/s (H200)")
    args = parser.parse_args()
    cfg = ModelConfig.builtin(args.model)
    sizes = bench.GPU_WORKLOAD
    prompts, params = bench.workload(sizes["num_seqs"], sizes["max_input_len"], sizes["max_output_len"], 0,
                                     cfg.vocab_size)
    terms = floor(cfg, [len(p) for p in prompts], [p.max_tokens for p in params], args.bandwidth, args.flops)
    for name, value in terms.items():
        print(f"{name:>26}: {value:,.4g}")


if __name__ == "__main__":
    main()
