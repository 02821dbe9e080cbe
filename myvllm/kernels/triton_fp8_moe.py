"""Fused mixture of experts with block-FP8 expert weights in Triton (vLLM's fused_moe with
`use_fp8_w8a8` and `block_shape=[128, 128]`).

The same pipeline as kernels/triton_fused_moe.py, whose alignment and tile choice it uses:

    x [T, H] --per_token_group_quant--> xq fp8, x_scale [T, H / 128]
    topk_ids --moe_align_block_size--> sorted_ids, expert_ids, num_post_padded
    xq --gemm(w13 fp8, SiLU-mul fused)--> act [T*K, I] in x's dtype
    act --per_token_group_quant--> aq, a_scale --gemm(w2 fp8, x routing weight)--> y [T*K, H]
    y.view(T, K, H).sum(1) -> out [T, H]

Each program of a grouped GEMM computes one [BLOCK_M, BLOCK_N] tile of one expert's rows with
triton_fp8_gemm.block_fp8_tile, given that expert's weight and scale pointers: over the K
blocks, dot(fp8 A, fp8 B) times the rows' activation scales and the columns' weight block
scales, in float32 (BLOCK_K = block_k, so one K step meets one scale per row and column). The
gate/up GEMM runs the tile loop for the gate rows and for the up rows (offset by I), whose
block scales follow from the row index (row // block_n), so the scales of w13 need only tile
its stacked rows. Sentinel rows (padding) read a valid row and are not stored; columns past N
wrap around and are not stored. Graph-safe as the unquantized op: no host synchronisation.

The pure-torch oracle is kernels/reference_fp8_moe.py (fused_experts_w8a8).
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from myvllm.kernels import triton_fp8_gemm
from myvllm.kernels.reference_fp8 import FP8_DTYPE, cdiv
from myvllm.kernels.triton_fp8_gemm import block_fp8_tile, per_token_group_quant
from myvllm.kernels.triton_fused_moe import MoeTiles, expert_block, moe_align_block_size, moe_tiles


def supports(device: torch.device, block_n: int, block_k: int, dtype: torch.dtype) -> str | None:
    """None when the FP8 fused-MoE kernels run for this device, block shape and activation dtype."""
    return triton_fp8_gemm.supports(device, block_n, block_k, dtype)


def fp8_moe_tiles(num_tokens: int, top_k: int, num_experts: int, block_k: int) -> MoeTiles:
    """The unquantized op's tiles for T tokens with the K step of one scale group (block_k)."""
    return dataclasses.replace(moe_tiles(num_tokens, top_k, num_experts), block_k=block_k)


@triton.jit(do_not_specialize=["num_rows", "num_blocks"])
def _fp8_moe_gemm_kernel(a_ptr, a_scale_ptr, b_ptr, b_scale_ptr, c_ptr, topk_weights_ptr,
                         sorted_ids_ptr, expert_ids_ptr, num_post_padded_ptr,
                         N, K, num_rows, num_blocks,
                         stride_am, stride_asm, stride_be, stride_bn, stride_bse, stride_bsn, stride_cm,
                         ROWS_PER_A: tl.constexpr, SILU_MUL: tl.constexpr, MUL_ROUTED_WEIGHT: tl.constexpr,
                         WEIGHT_BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """C[r, n] = (A * a_scale)[r // ROWS_PER_A] . (B * b_scale)[e(r), n] over the rows r of one
    expert's block; SILU_MUL: B holds [gate (N rows); up (N rows)] and C = silu(gate) * up;
    MUL_ROUTED_WEIGHT: C is scaled by topk_weights[r]."""
    pid_n, expert, rows, row_mask = expert_block(sorted_ids_ptr, expert_ids_ptr, num_post_padded_ptr, N, num_rows,
                                                 num_blocks, BLOCK_M, BLOCK_N, GROUP_M)
    if expert < 0:
        return
    a_rows = tl.minimum(rows, num_rows - 1) // ROWS_PER_A  # sentinels read a valid row, not stored
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    b_rows = offs_n % N
    b_expert = b_ptr + expert * stride_be
    bs_expert = b_scale_ptr + expert * stride_bse
    acc = block_fp8_tile(a_ptr, a_scale_ptr, b_expert, bs_expert, a_rows, b_rows, K,
                         stride_am, stride_asm, stride_bn, stride_bsn,
                         WEIGHT_BLOCK_N, BLOCK_M, BLOCK_N, BLOCK_K)
    if SILU_MUL:
        up = block_fp8_tile(a_ptr, a_scale_ptr, b_expert, bs_expert, a_rows, b_rows + N, K,
                            stride_am, stride_asm, stride_bn, stride_bsn,
                            WEIGHT_BLOCK_N, BLOCK_M, BLOCK_N, BLOCK_K)
        acc = acc * tl.sigmoid(acc) * up
    if MUL_ROUTED_WEIGHT:
        weight = tl.load(topk_weights_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
        acc = acc * weight[:, None]
    c_ptrs = c_ptr + rows[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])


def _fp8_moe_gemm(aq: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, c: torch.Tensor,
                  topk_weights: torch.Tensor | None, sorted_ids: torch.Tensor, expert_ids: torch.Tensor,
                  num_post_padded: torch.Tensor, rows_per_a: int, silu_mul: bool, block_n: int,
                  tiles: MoeTiles) -> None:
    n, k = c.shape[1], aq.shape[1]
    num_blocks = expert_ids.shape[0]
    grid = (num_blocks * triton.cdiv(n, tiles.block_n),)
    _fp8_moe_gemm_kernel[grid](
        aq, a_scale, b, b_scale, c, topk_weights if topk_weights is not None else c,
        sorted_ids, expert_ids, num_post_padded, n, k, c.shape[0], num_blocks,
        aq.stride(0), a_scale.stride(0), b.stride(0), b.stride(1), b_scale.stride(0), b_scale.stride(1),
        c.stride(0), ROWS_PER_A=rows_per_a, SILU_MUL=silu_mul, MUL_ROUTED_WEIGHT=topk_weights is not None,
        WEIGHT_BLOCK_N=block_n, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
        GROUP_M=tiles.group_m, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )


def check_shapes(x: torch.Tensor, w13: torch.Tensor, w13_scale: torch.Tensor, w2: torch.Tensor,
                 w2_scale: torch.Tensor, block_n: int, block_k: int) -> None:
    """ValueError unless the FP8 experts and their block scales fit x [T, H] and each other."""
    num_experts, two_i, hidden = w13.shape
    inter = two_i // 2
    want = {"w13": (num_experts, two_i, x.shape[1]), "w2": (num_experts, hidden, inter),
            "w13_scale": (num_experts, cdiv(two_i, block_n), cdiv(hidden, block_k)),
            "w2_scale": (num_experts, cdiv(hidden, block_n), cdiv(inter, block_k))}
    have = {"w13": w13, "w2": w2, "w13_scale": w13_scale, "w2_scale": w2_scale}
    for name, shape in want.items():
        if tuple(have[name].shape) != shape:
            raise ValueError(f"fused_experts_fp8: {name} has shape {tuple(have[name].shape)}, expected {shape} "
                             f"(x {tuple(x.shape)}, blocks ({block_n}, {block_k}))")
    if w13.dtype != FP8_DTYPE or w2.dtype != FP8_DTYPE:
        raise ValueError(f"fused_experts_fp8: expert weights must be {FP8_DTYPE}, got {w13.dtype}, {w2.dtype}")


def fused_experts_fp8(x: torch.Tensor, w13: torch.Tensor, w13_scale: torch.Tensor, w2: torch.Tensor,
                      w2_scale: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                      block_n: int, block_k: int, tiles: MoeTiles | None = None) -> torch.Tensor:
    """sum over k of topk_weights[t, k] * down(silu(gate(x[t])) * up(x[t])) of expert topk_ids[t, k],
    with FP8 experts and activations quantized per token group of block_k.

    x [T, H]; w13 [E, 2I, H] fp8, w13_scale [E, ceil(2I / block_n), ceil(H / block_k)] float32;
    w2 [E, H, I] fp8, w2_scale [E, ceil(H / block_n), ceil(I / block_k)]; topk_weights, topk_ids
    [T, K] -> [T, H] in x's dtype. tiles: the GEMMs' tile sizes (default: fp8_moe_tiles for T;
    block_k must equal the scales' block_k).
    """
    num_tokens, hidden = x.shape
    num_experts, two_i, _ = w13.shape
    top_k = topk_ids.shape[1]
    check_shapes(x, w13, w13_scale, w2, w2_scale, block_n, block_k)
    if num_tokens == 0:
        return torch.zeros_like(x)
    tiles = tiles or fp8_moe_tiles(num_tokens, top_k, num_experts, block_k)
    if tiles.block_k != block_k:
        raise ValueError(f"fused_experts_fp8: tiles.block_k={tiles.block_k} must equal the scales' block_k={block_k}")
    w13, w2 = w13.contiguous(), w2.contiguous()
    w13_scale, w2_scale = w13_scale.float().contiguous(), w2_scale.float().contiguous()
    xq, x_scale = per_token_group_quant(x.contiguous(), block_k)
    weights = topk_weights.to(torch.float32).reshape(-1)  # [T*K]
    sorted_ids, expert_ids, num_post_padded = moe_align_block_size(topk_ids, tiles.block_m, num_experts)
    act = torch.empty(num_tokens * top_k, two_i // 2, dtype=x.dtype, device=x.device)  # [T*K, I]
    _fp8_moe_gemm(xq, x_scale, w13, w13_scale, act, None, sorted_ids, expert_ids, num_post_padded, top_k, True,
                  block_n, tiles)
    aq, a_scale = per_token_group_quant(act, block_k)
    y = torch.empty(num_tokens * top_k, hidden, dtype=x.dtype, device=x.device)  # [T*K, H]
    _fp8_moe_gemm(aq, a_scale, w2, w2_scale, y, weights, sorted_ids, expert_ids, num_post_padded, 1, False,
                  block_n, tiles)
    return y.view(num_tokens, top_k, hidden).sum(dim=1)
