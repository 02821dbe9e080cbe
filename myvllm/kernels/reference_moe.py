"""Pure-torch mixture-of-experts ops: the CPU path and the oracle of kernels/triton_fused_moe.py.

They follow transformers' Qwen3-MoE numerics: the router softmax in float32, top-k, the
optional renormalisation, the weights cast back to the logits' dtype; each expert's
down(silu(gate(x)) * up(x)) scaled by its routing weight and summed over the experts in
ascending expert order.

Shapes: T = tokens, H = hidden size, E = experts, K = experts per token (top-k),
I = one rank's share of an expert's intermediate size. Expert weights are stacked:
w13 [E, 2I, H] (gate rows, then up rows), w2 [E, H, I].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def topk_softmax(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] -> (weights [T, K] in the logits' dtype, expert ids [T, K] int64), the
    experts of each token in descending probability."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)  # [T, E]
    weights, ids = torch.topk(probs, top_k, dim=-1)  # [T, K]
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(router_logits.dtype), ids


def fused_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor) -> torch.Tensor:
    """sum over k of topk_weights[t, k] * expert_{topk_ids[t, k]}(x[t]) -> [T, H].

    Every expert runs on every token and is weighted by zero where the token did not choose it:
    E / K times the work of the kernel, but no data-dependent shapes, so it needs no host sync
    and also runs inside a CUDA graph.
    """
    num_experts = w13.shape[0]
    out = torch.zeros_like(x)  # [T, H]
    for e in range(num_experts):
        weight = (topk_weights * (topk_ids == e)).sum(dim=-1, keepdim=True)  # [T, 1]: 0 unless chosen
        gate, up = F.linear(x, w13[e]).chunk(2, dim=-1)  # [T, I] each
        out += F.linear(F.silu(gate) * up, w2[e]) * weight
    return out
