"""Block-FP8 mixture of experts in pure torch: the CPU path and the oracle of
kernels/triton_fp8_moe.py.

Expert weights are stacked as in kernels/reference_moe.py, in float8_e4m3fn with one scale per
block_n x block_k block: w13 [E, 2I, H] with w13_scale [E, ceil(2I / block_n), ceil(H / block_k)],
w2 [E, H, I] with w2_scale [E, ceil(H / block_n), ceil(I / block_k)].

  - `fused_experts_dequant` (the CPU path): the weights dequantized to the activations' dtype and
    kernels/reference_moe.fused_experts, so the FP8 model computes what its dequantized
    checkpoint does.
  - `fused_experts_w8a8` (the kernel's oracle): what the Triton kernel computes, with the
    activations quantized per token and group of block_k (the hidden state before the gate/up
    GEMM, silu(gate) * up before the down GEMM, as vLLM's `use_fp8_w8a8` path does) and every
    product accumulated in float32 block by block of K. It runs each expert on its own tokens
    only (data-dependent shapes: a test oracle, not for CUDA graphs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from myvllm.kernels import reference_moe
from myvllm.kernels.reference_fp8 import block_fp8_matmul, dequantize_weight, per_token_group_quant


def fused_experts_dequant(x: torch.Tensor, w13: torch.Tensor, w13_scale: torch.Tensor, w2: torch.Tensor,
                          w2_scale: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                          block_n: int, block_k: int) -> torch.Tensor:
    """x [T, H], the FP8 experts and the routing [T, K] -> [T, H] in x's dtype, on dequantized weights."""
    w13 = dequantize_weight(w13, w13_scale, block_n, block_k, x.dtype)
    w2 = dequantize_weight(w2, w2_scale, block_n, block_k, x.dtype)
    return reference_moe.fused_experts(x, w13, w2, topk_weights, topk_ids)


def fused_experts_w8a8(x: torch.Tensor, w13: torch.Tensor, w13_scale: torch.Tensor, w2: torch.Tensor,
                       w2_scale: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                       block_n: int, block_k: int) -> torch.Tensor:
    """The kernel's numerics: sum over k of topk_weights[t, k] * down(q(silu(gate) * up)) with
    gate, up = q(x[t]) @ w13[e].T, q the per-token-group quantization; silu(gate) * up rounded to
    x's dtype before it is quantized (the kernel stores it so). -> [T, H] in x's dtype."""
    num_tokens, hidden = x.shape
    inter = w13.shape[1] // 2
    xq, xs = per_token_group_quant(x, block_k)
    out = torch.zeros(num_tokens, hidden, dtype=torch.float32, device=x.device)
    for e in range(w13.shape[0]):
        tokens, slot = (topk_ids == e).nonzero(as_tuple=True)
        if tokens.numel() == 0:
            continue
        h = block_fp8_matmul(xq[tokens], xs[tokens], w13[e], w13_scale[e], block_n, block_k, torch.float32)
        act = (F.silu(h[:, :inter]) * h[:, inter:]).to(x.dtype)
        aq, a_scale = per_token_group_quant(act, block_k)
        y = block_fp8_matmul(aq, a_scale, w2[e], w2_scale[e], block_n, block_k, torch.float32)
        out.index_add_(0, tokens, y * topk_weights[tokens, slot].float()[:, None])
    return out.to(x.dtype)
