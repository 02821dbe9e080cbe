"""Fused mixture-of-experts in Triton: tokens sorted by expert, two grouped GEMMs, a weighted sum.

    topk_ids [T, K] --moe_align_block_size--> sorted_ids, expert_ids, num_post_padded
    x [T, H] --gemm(w13, SiLU-mul fused)--> act [T*K, I] --gemm(w2, x routing weight)--> y [T*K, H]
    y.view(T, K, H).sum(1) -> out [T, H]

A (token, k) pair is one row r = t * K + k. `moe_align_block_size` lists the rows of each
expert together, each expert's list padded to a multiple of BLOCK_M with the sentinel T * K:

    sorted_ids   | e0 rows ... pad | e1 rows ... pad pad | e3 rows ... | (sentinels to the end)
    expert_ids   |  e0   |  e0     |  e1   |  e1         |  e3 | -1 -1 ...   one per BLOCK_M rows

so that every BLOCK_M block of sorted_ids belongs to one expert, and one program of the
grouped GEMM multiplies one block of rows by one tile of that expert's weight. Buffers and
grids are sized by the worst case for T tokens (`max_padded_rows`); programs past the
device-side count `num_post_padded` return at once. Nothing depends on host-side values of
the routing, so the whole op runs under CUDA graph capture, and the tile sizes depend on T
only. The order of rows within an expert's list (atomic counters) does not change any
result: each row's dot products do not depend on the other rows of its block.

Expert weights are stacked: w13 [E, 2I, H] (gate rows, then up rows), w2 [E, H, I].
The reference (kernels/reference_moe.py) computes the same in torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Vector widths of the alignment: the one-program count walks the rows COUNT_BLOCK at a time;
# each program of the scatter places SCATTER_BLOCK rows.
COUNT_BLOCK = 4096
SCATTER_BLOCK = 1024


@dataclass(frozen=True)
class MoeTiles:
    """Tile sizes and launch settings of the grouped GEMMs (the same BLOCK_M for both: the
    alignment depends on it)."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int


def moe_tiles(num_tokens: int, top_k: int, num_experts: int, dtype: torch.dtype = torch.bfloat16) -> MoeTiles:
    """Tiles by the mean number of rows per expert: few rows (decode) take thin row blocks and
    long K steps, the GEMMs being a read of the weights; many rows take larger tiles, with 8
    warps for the two accumulators of the gate/up GEMM. Programs run GROUP_M row blocks per
    weight tile, so the blocks of one expert read its weights from L2 after the first. float32
    halves the K step, so that the pipeline's stages of A, gate and up tiles fit in shared memory."""
    rows_per_expert = num_tokens * top_k / num_experts
    if rows_per_expert <= 16:
        tiles = MoeTiles(16, 64, 128, 8, 4, 3)
    elif rows_per_expert <= 64:
        tiles = MoeTiles(32, 64, 128, 8, 4, 3)
    else:
        tiles = MoeTiles(64, 128, 64, 8, 8, 3)
    return dataclasses.replace(tiles, block_k=tiles.block_k // 2) if dtype == torch.float32 else tiles


def max_padded_rows(num_rows: int, num_experts: int, block_m: int) -> int:
    """The most entries sorted_ids can need, rounded up to whole blocks: each non-empty expert
    pads fewer than block_m rows, and at most min(E, rows) experts are non-empty."""
    worst = num_rows + min(num_experts, num_rows) * (block_m - 1)
    return triton.cdiv(worst, block_m) * block_m


def supports(device: torch.device, dtype: torch.dtype) -> str | None:
    """None when the fused kernel runs for this device and dtype, else the reason it does not."""
    if device.type != "cuda":
        return f"device {device} is not CUDA"
    if dtype not in DTYPES:
        return f"dtype {dtype} is not one of {DTYPES}"
    return None


# ---- alignment ---------------------------------------------------------------------------------

# The row and block counts change with the token count: not specialised on, so that a new
# token count compiles nothing (the tile sizes alone select a compiled kernel).
@triton.jit(do_not_specialize=["num_rows", "num_blocks"])
def _moe_count_kernel(topk_ids_ptr, cursor_ptr, expert_ids_ptr, num_post_padded_ptr,
                      num_rows, num_experts, num_blocks,
                      BLOCK_M: tl.constexpr, NUM_BINS: tl.constexpr, BLOCK: tl.constexpr,
                      BLOCK_B: tl.constexpr):
    """One program: per-expert row counts -> each expert's first padded row (into cursor),
    the block -> expert map, the padded total."""
    offs = tl.arange(0, BLOCK)
    counts = tl.zeros((NUM_BINS,), dtype=tl.int32)
    for start in range(0, num_rows, BLOCK):
        # lanes past the end count into bin NUM_BINS - 1 >= num_experts, which is dropped below
        ids = tl.load(topk_ids_ptr + start + offs, mask=start + offs < num_rows, other=NUM_BINS - 1)
        counts += tl.histogram(ids.to(tl.int32), NUM_BINS)
    bins = tl.arange(0, NUM_BINS)
    counts = tl.where(bins < num_experts, counts, 0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, 0)  # [NUM_BINS]; bins >= num_experts end at the total
    total = tl.sum(padded, 0)
    tl.store(cursor_ptr + bins, ends - padded, mask=bins < num_experts)
    tl.store(num_post_padded_ptr, total)
    for b0 in range(0, num_blocks, BLOCK_B):
        blocks = b0 + tl.arange(0, BLOCK_B)
        first_row = blocks * BLOCK_M
        expert = tl.sum((ends[None, :] <= first_row[:, None]).to(tl.int32), axis=1)  # [BLOCK_B]
        expert = tl.where(first_row < total, expert, -1)
        tl.store(expert_ids_ptr + blocks, expert, mask=blocks < num_blocks)


@triton.jit(do_not_specialize=["num_rows"])
def _moe_scatter_kernel(topk_ids_ptr, cursor_ptr, sorted_ids_ptr, num_rows, BLOCK: tl.constexpr):
    """Each row r takes the next free slot of its expert's list: sorted_ids[slot] = r."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = rows < num_rows
    ids = tl.load(topk_ids_ptr + rows, mask=mask, other=0)
    slot = tl.atomic_add(cursor_ptr + ids, 1, mask=mask)
    tl.store(sorted_ids_ptr + slot, rows.to(tl.int32), mask=mask)


def moe_align_block_size(topk_ids: torch.Tensor, block_m: int,
                         num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """topk_ids [T, K] -> (sorted_ids [P] int32, expert_ids [P / block_m] int32 (-1: an unused
    block), num_post_padded [1] int32), P = max_padded_rows(T * K, E, block_m). Sentinel rows are T * K."""
    num_rows = topk_ids.numel()
    device = topk_ids.device
    num_padded = max_padded_rows(num_rows, num_experts, block_m)
    num_blocks = num_padded // block_m
    sorted_ids = torch.full((num_padded,), num_rows, dtype=torch.int32, device=device)  # sentinels
    expert_ids = torch.empty(num_blocks, dtype=torch.int32, device=device)
    num_post_padded = torch.empty(1, dtype=torch.int32, device=device)
    cursor = torch.empty(num_experts, dtype=torch.int32, device=device)
    flat = topk_ids.reshape(-1)
    num_bins = triton.next_power_of_2(num_experts + 1)
    _moe_count_kernel[(1,)](flat, cursor, expert_ids, num_post_padded, num_rows, num_experts, num_blocks,
                            BLOCK_M=block_m, NUM_BINS=num_bins, BLOCK=COUNT_BLOCK,
                            BLOCK_B=max(16, COUNT_BLOCK * 4 // num_bins), num_warps=8)
    _moe_scatter_kernel[(triton.cdiv(num_rows, SCATTER_BLOCK),)](flat, cursor, sorted_ids, num_rows,
                                                                 BLOCK=SCATTER_BLOCK)
    return sorted_ids, expert_ids, num_post_padded


# ---- grouped GEMM ------------------------------------------------------------------------------

@triton.jit
def expert_block(sorted_ids_ptr, expert_ids_ptr, num_post_padded_ptr, N, num_rows, num_blocks,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's block of sorted rows and tile of the N columns, in a grouped GEMM over
    moe_align_block_size's blocks: (pid_n, expert int64, rows [BLOCK_M] int64, row_mask).

    expert is -1 for a block past num_post_padded: the caller returns; nothing of expert_ids
    or sorted_ids is read for such a block, whose rows are all sentinels.
    """
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_pid_n  # programs of GROUP_M row blocks share B tiles in L2
    first_m = pid // group * GROUP_M
    group_m = min(num_blocks - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_m
    pid_n = (pid % group) // group_m
    num_post_padded = tl.load(num_post_padded_ptr)  # a whole number of blocks
    expert = tl.load(expert_ids_ptr + pid_m, mask=pid_m * BLOCK_M < num_post_padded, other=-1).to(tl.int64)
    slots = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = tl.load(sorted_ids_ptr + slots, mask=slots < num_post_padded, other=num_rows).to(tl.int64)
    return pid_n, expert, rows, rows < num_rows


@triton.jit(do_not_specialize=["num_rows", "num_blocks"])
def _moe_gemm_kernel(a_ptr, b_ptr, c_ptr, topk_weights_ptr, sorted_ids_ptr, expert_ids_ptr, num_post_padded_ptr,
                     N, K, num_rows, num_blocks,
                     stride_am, stride_be, stride_bn, stride_cm,
                     ROWS_PER_A: tl.constexpr, SILU_MUL: tl.constexpr, MUL_ROUTED_WEIGHT: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr):
    """C[r, n] = A[r // ROWS_PER_A] . B[e(r), n] over the rows r of one expert's block.

    SILU_MUL: B holds [gate (N rows); up (N rows)] and C = silu(A . gate) * (A . up).
    MUL_ROUTED_WEIGHT: C is scaled by topk_weights[r]. A, B, C have unit inner strides.
    """
    pid_n, expert, rows, row_mask = expert_block(sorted_ids_ptr, expert_ids_ptr, num_post_padded_ptr, N, num_rows,
                                                 num_blocks, BLOCK_M, BLOCK_N, GROUP_M)
    if expert < 0:
        return
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + (rows // ROWS_PER_A)[:, None] * stride_am + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
    b_ptrs = (b_ptr + expert * stride_be + offs_n[None, :].to(tl.int64) * stride_bn
              + offs_k[:, None])  # [BLOCK_K, BLOCK_N]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if SILU_MUL:
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            k_mask = offs_k < BLOCK_K
        else:
            k_mask = offs_k < K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if SILU_MUL:
            b_up = tl.load(b_ptrs + N * stride_bn, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            acc_up = tl.dot(a, b_up, acc_up, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if SILU_MUL:
        acc = acc * tl.sigmoid(acc) * acc_up
    if MUL_ROUTED_WEIGHT:
        weight = tl.load(topk_weights_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
        acc = acc * weight[:, None]
    c_ptrs = c_ptr + rows[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])


def _moe_gemm(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, topk_weights: torch.Tensor | None,
              sorted_ids: torch.Tensor, expert_ids: torch.Tensor, num_post_padded: torch.Tensor,
              rows_per_a: int, silu_mul: bool, tiles: MoeTiles) -> None:
    n = c.shape[1]
    k = a.shape[1]
    num_blocks = expert_ids.shape[0]
    grid = (num_blocks * triton.cdiv(n, tiles.block_n),)
    _moe_gemm_kernel[grid](
        a, b, c, topk_weights if topk_weights is not None else c, sorted_ids, expert_ids, num_post_padded,
        n, k, c.shape[0], num_blocks, a.stride(0), b.stride(0), b.stride(1), c.stride(0),
        ROWS_PER_A=rows_per_a, SILU_MUL=silu_mul, MUL_ROUTED_WEIGHT=topk_weights is not None,
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, GROUP_M=tiles.group_m,
        EVEN_K=k % tiles.block_k == 0, PRECISION="ieee" if a.dtype == torch.float32 else None,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )


def fused_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, tiles: MoeTiles | None = None) -> torch.Tensor:
    """sum over k of topk_weights[t, k] * down(silu(gate(x[t])) * up(x[t])) of expert topk_ids[t, k].

    x [T, H]; w13 [E, 2I, H]; w2 [E, H, I]; topk_weights, topk_ids [T, K] -> [T, H] in x's dtype.
    tiles: the GEMMs' tile sizes (default: moe_tiles for T).
    """
    num_tokens, hidden = x.shape
    num_experts, two_i, _ = w13.shape
    top_k = topk_ids.shape[1]
    if num_tokens == 0:  # no rows: nothing to launch
        return torch.zeros_like(x)
    tiles = tiles or moe_tiles(num_tokens, top_k, num_experts, x.dtype)
    x, w13, w2 = x.contiguous(), w13.contiguous(), w2.contiguous()
    weights = topk_weights.to(torch.float32).reshape(-1)  # [T*K]
    sorted_ids, expert_ids, num_post_padded = moe_align_block_size(topk_ids, tiles.block_m, num_experts)
    act = torch.empty(num_tokens * top_k, two_i // 2, dtype=x.dtype, device=x.device)  # [T*K, I]
    _moe_gemm(x, w13, act, None, sorted_ids, expert_ids, num_post_padded, top_k, True, tiles)
    y = torch.empty(num_tokens * top_k, hidden, dtype=x.dtype, device=x.device)  # [T*K, H]
    _moe_gemm(act, w2, y, weights, sorted_ids, expert_ids, num_post_padded, 1, False, tiles)
    return y.view(num_tokens, top_k, hidden).sum(dim=1)
