"""Block-FP8 in pure torch: weight quantization, dequantization, per-token-group activation
quantization and the block-scaled GEMM. The CPU path and the oracle of kernels/triton_fp8_gemm.py.

Weights [..., N, K] (leading dims: stacked experts [E, N, K]) hold float8_e4m3fn values with one
float32 scale per block_n x block_k block, `scale_inv` [..., ceil(N / block_n), ceil(K / block_k)]:
the weight a block stands for is q * scale_inv (the name is the checkpoints': the inverse of the
factor the weight was multiplied by to quantize it). The last block of a dim may be ragged.
Activations [M, K] are quantized per token and group of `group` features: scale = amax / 448, so
each group uses the whole e4m3 range. The GEMM sums, over the K blocks, the float32 products of
the fp8 values times both blocks' scales: exactly what the Triton kernel computes, in another order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448
# A group or block of zeros gets this smallest amax, so its scale is not zero and x / scale is 0.
AMAX_EPS = 1e-10


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _blocked_amax(w: torch.Tensor, block_n: int, block_k: int) -> torch.Tensor:
    """max |w| over each block of w [..., N, K] -> [..., ceil(N / block_n), ceil(K / block_k)]."""
    *lead, n, k = w.shape
    nb, kb = cdiv(n, block_n), cdiv(k, block_k)
    padded = F.pad(w.abs().float(), (0, kb * block_k - k, 0, nb * block_n - n))  # zeros do not raise the max
    return padded.view(*lead, nb, block_n, kb, block_k).amax(dim=(-3, -1))


def expand_blocks(scale: torch.Tensor, n: int, k: int, block_n: int, block_k: int) -> torch.Tensor:
    """scale [..., Nb, Kb] -> [..., n, k], each block's scale over its block (ragged last blocks cut)."""
    full = scale.repeat_interleave(block_n, dim=-2).repeat_interleave(block_k, dim=-1)
    return full[..., :n, :k]


def quantize_weight(w: torch.Tensor, block_n: int = 128, block_k: int = 128,
                    scale_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] -> (q float8_e4m3fn [..., N, K], scale_inv [..., Nb, Kb] in scale_dtype) with
    q * scale_inv ~ w; q is computed from the scale as rounded to scale_dtype, so that dequantizing
    with the stored scale is exact to fp8 rounding."""
    *_, n, k = w.shape
    scale = (_blocked_amax(w, block_n, block_k).clamp_min(AMAX_EPS) / FP8_MAX).to(scale_dtype)
    full = expand_blocks(scale.float(), n, k, block_n, block_k)
    q = (w.float() / full).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def dequantize_weight(q: torch.Tensor, scale_inv: torch.Tensor, block_n: int, block_k: int,
                      dtype: torch.dtype) -> torch.Tensor:
    """q [..., N, K] fp8 and scale_inv [..., Nb, Kb] -> the weight [..., N, K] in dtype."""
    *_, n, k = q.shape
    return (q.float() * expand_blocks(scale_inv.float(), n, k, block_n, block_k)).to(dtype)


def per_token_group_quant(x: torch.Tensor, group: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (q float8_e4m3fn [M, K], scales float32 [M, ceil(K / group)]) with q * scale ~ x."""
    m, k = x.shape
    scale = _blocked_amax(x, 1, group).clamp_min(AMAX_EPS) / FP8_MAX  # [M, Kg]
    q = (x.float() / expand_blocks(scale, m, k, 1, group)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def block_fp8_matmul(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                     block_n: int, block_k: int, out_dtype: torch.dtype) -> torch.Tensor:
    """(xq [M, K] fp8 with x_scale [M, Kb]) @ (wq [N, K] fp8 with w_scale [Nb, Kb]).T -> [M, N] in
    out_dtype; activation groups are block_k wide. Accumulates in float32 block by block of K."""
    m, k = xq.shape
    n = wq.shape[0]
    w_rows = w_scale.float().repeat_interleave(block_n, dim=0)[:n]  # [N, Kb]
    out = torch.zeros(m, n, dtype=torch.float32, device=xq.device)
    for kb, start in enumerate(range(0, k, block_k)):
        part = xq[:, start:start + block_k].float() @ wq[:, start:start + block_k].float().T  # [M, N]
        out += part * x_scale[:, kb:kb + 1].float() * w_rows[:, kb]
    return out.to(out_dtype)


def w8a8_block_linear(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, block_n: int,
                      block_k: int) -> torch.Tensor:
    """x [M, K] @ W.T with activations quantized per token group of block_k: the kernel's oracle."""
    xq, xs = per_token_group_quant(x, block_k)
    return block_fp8_matmul(xq, xs, wq, w_scale, block_n, block_k, x.dtype)


def dequant_linear(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, block_n: int,
                   block_k: int) -> torch.Tensor:
    """x [M, K] @ W.T with W dequantized to x's dtype and x unquantized: the CPU path."""
    return F.linear(x, dequantize_weight(wq, w_scale, block_n, block_k, x.dtype))
