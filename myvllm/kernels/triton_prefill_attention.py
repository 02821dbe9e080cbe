"""Varlen paged causal attention for prefill steps, in Triton.

Handles plain prefill, chunked prefill, prefix-cache hits and mixed batches (decode
rows are sequences with one new token). Computes exactly
`myvllm.kernels.reference.paged_attention`.

Each program owns BLOCK_M queries of one sequence and one query head and walks that
sequence's KV through the block table in tiles of BLOCK_N tokens, with a
flash-attention online softmax in float32 (base 2, log2(e) folded into the scale).
KV tiles that every query of the tile sees are processed without masks; the tiles
that cross the causal diagonal are masked; tiles above it are never loaded.

An fp8 (e4m3) cache is read as it is stored: each tile is converted in registers to the
dtype of the products (`fp8_dot_operand`: fp16 for a bf16 model), the KV head's K scale
is folded into the softmax scale and its V scale into the
output, so the values are never dequantized in memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from myvllm.kernels.triton_kv_store import check_kv_scales

LOG2E = 1.4426950408889634


@triton.jit
def fp8_dot_operand(q):
    """The dtype the products with e4m3 K and V tiles run in: a bf16 q goes to fp16 (clamped to
    its range), since every e4m3 value is exact in fp16 and e4m3 converts to fp16 in one
    instruction, and fp16 keeps three more bits of q and of the probabilities; float32 and fp16
    stay."""
    if q.dtype == tl.bfloat16:
        q = tl.minimum(tl.maximum(q.to(tl.float32), -65504.0), 65504.0).to(tl.float16)
    return q


@triton.jit
def kv_token_offsets(
    block_table_row,  # pointer to this sequence's block table row
    start_n,  # first token of the tile, a multiple of BLOCK_N
    offs_n,  # [BLOCK_N] arange
    token_mask,  # [BLOCK_N] tokens that exist
    stride_cache_block,
    stride_cache_token,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Element offsets `[BLOCK_N]` (int64) of tokens start_n + offs_n in a paged cache.

    When BLOCK_N divides BLOCK_SIZE the tile lies inside one cache block and its block
    id is one scalar load; otherwise every token looks its own block up.
    """
    if BLOCK_N <= BLOCK_SIZE:
        block_id = tl.load(block_table_row + start_n // BLOCK_SIZE).to(tl.int64)
        in_block = (start_n % BLOCK_SIZE + offs_n).to(tl.int64)
        offsets = block_id * stride_cache_block + in_block * stride_cache_token
    else:
        tokens = start_n + offs_n
        block_ids = tl.load(block_table_row + tokens // BLOCK_SIZE, mask=token_mask, other=0).to(tl.int64)
        offsets = block_ids * stride_cache_block + (tokens % BLOCK_SIZE).to(tl.int64) * stride_cache_token
    return offsets


@triton.jit
def _prefill_attention_kernel(
    q_ptr,  # [T, H, D]
    k_cache_ptr,  # [num_blocks, block_size, Hkv, D]
    v_cache_ptr,
    out_ptr,  # [T, H, D]
    query_start_loc_ptr,  # [B + 1] int32
    seq_lens_ptr,  # [B] int32
    block_tables_ptr,  # [B, max_blocks] int32
    k_scale_ptr,  # [Hkv] float32, read when FP8
    v_scale_ptr,
    qk_scale,  # softmax scale * log2(e)
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_cache_block,
    stride_cache_token,
    stride_cache_head,
    stride_bt,
    num_m_tiles,
    GROUP: tl.constexpr,  # query heads per KV head
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # cache block size
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    FP8: tl.constexpr,  # the caches hold e4m3 values times a per-KV-head scale
):
    # The longest query tiles are launched first so that the short ones fill the tail.
    m_tile = num_m_tiles - 1 - tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)

    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if m_tile * BLOCK_M >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx_len = seq_len - q_len  # tokens cached before this step

    offs_m = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] query index within the sequence
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    row_mask = offs_m < q_len
    rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(
        q_ptr + rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
        mask=row_mask[:, None],
        other=0.0,
    )  # [BM, D]
    if FP8:
        q = fp8_dot_operand(q)
    q_pos = ctx_len + offs_m  # [BM]

    # Keys [0, full_end) are visible to every query of the tile; keys [full_end, kv_end)
    # cross the diagonal; keys from kv_end on are seen by none.
    first_pos = ctx_len + m_tile * BLOCK_M
    kv_end = tl.minimum(first_pos + BLOCK_M, seq_len)
    full_end = ((first_pos + 1) // BLOCK_N) * BLOCK_N

    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    k_base = k_cache_ptr + (head // GROUP).to(tl.int64) * stride_cache_head
    v_base = v_cache_ptr + (head // GROUP).to(tl.int64) * stride_cache_head
    v_scale = 1.0
    if FP8:
        qk_scale = qk_scale * tl.load(k_scale_ptr + head // GROUP)
        v_scale = tl.load(v_scale_ptr + head // GROUP)

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    for start_n in range(0, full_end, BLOCK_N):
        tokens = start_n + offs_n
        kv_off = kv_token_offsets(
            bt_row,
            start_n,
            offs_n,
            tokens < seq_len,
            stride_cache_block,
            stride_cache_token,
            BLOCK_SIZE,
            BLOCK_N,
        )
        k = tl.load(k_base + kv_off[:, None] + offs_d[None, :])  # [BN, D]
        if FP8:
            k = k.to(q.dtype)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BM, BN]
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + kv_off[:, None] + offs_d[None, :])  # [BN, D]
        if FP8:
            v = v.to(q.dtype)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc=acc, input_precision=DOT_PRECISION)
        m_i = m_new

    for start_n in range(full_end, kv_end, BLOCK_N):
        tokens = start_n + offs_n
        token_mask = tokens < kv_end
        kv_off = kv_token_offsets(
            bt_row, start_n, offs_n, token_mask, stride_cache_block, stride_cache_token, BLOCK_SIZE, BLOCK_N
        )
        k = tl.load(k_base + kv_off[:, None] + offs_d[None, :], mask=token_mask[:, None], other=0.0)
        if FP8:
            k = k.to(q.dtype)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        visible = (tokens[None, :] <= q_pos[:, None]) & token_mask[None, :]
        qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + kv_off[:, None] + offs_d[None, :], mask=token_mask[:, None], other=0.0)
        if FP8:
            v = v.to(q.dtype)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc=acc, input_precision=DOT_PRECISION)
        m_i = m_new

    acc = acc * (v_scale / tl.where(l_i > 0.0, l_i, 1.0))[:, None]  # rows that saw nothing stay zero
    tl.store(
        out_ptr + rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=row_mask[:, None],
    )


def prefill_config(head_dim: int, max_query_len: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for a head_dim and the step's longest query.

    64x64 tiles with 4 warps suit prompts up to about a thousand tokens at every head_dim up
    to 128; at head_dim 128, 128x128 tiles with 8 warps pay from 2,048-token queries on
    (benchmarks/attention_microbench.py; see docs/performance.md).
    """
    if max_query_len <= 16:  # decode rows, speculative or very short chunks
        return 16, 64 if head_dim <= 128 else 32, 4, 3
    if head_dim > 128:
        return 64, 32, 4, 2
    if head_dim == 128 and max_query_len >= 2048:
        return 128, 128, 8, 2
    return 64, 64, 4, 3


def prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    max_query_len: int,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal paged attention of the step's new tokens; writes and returns out `[T, H, D]`.

    q `[T, H, D]` (unit stride on D); caches `[num_blocks, block_size, Hkv, D]`;
    query_start_loc `[B + 1]` int32; seq_lens `[B]` int32 (cached + new tokens);
    block_tables `[B, max_blocks]` int32; max_query_len: host int >= every q_len. fp8 caches
    need k_scale / v_scale `[Hkv]` float32 (the stored values times them are the keys and
    values); other caches ignore them.
    """
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    num_seqs = seq_lens.shape[0]
    assert out.shape == q.shape and q.stride(-1) == 1 and out.stride(-1) == 1
    assert k_cache.shape == v_cache.shape and k_cache.stride() == v_cache.stride()
    assert k_cache.shape[3] == head_dim and k_cache.stride(3) == 1
    assert num_heads % num_kv_heads == 0 and k_cache.dtype == v_cache.dtype
    fp8 = check_kv_scales(k_cache, k_scale, v_scale)
    assert fp8 or q.dtype == k_cache.dtype
    assert head_dim & (head_dim - 1) == 0 and block_size & (block_size - 1) == 0
    assert query_start_loc.shape == (num_seqs + 1,) and block_tables.shape[0] >= num_seqs
    if num_tokens == 0 or num_seqs == 0 or max_query_len <= 0:
        return out
    block_m, block_n, num_warps, num_stages = prefill_config(head_dim, max_query_len)
    num_m_tiles = triton.cdiv(max_query_len, block_m)
    grid = (num_m_tiles, num_seqs, num_heads)
    _prefill_attention_kernel[grid](
        q,
        k_cache,
        v_cache,
        out,
        query_start_loc,
        seq_lens,
        block_tables,
        k_scale if fp8 else seq_lens,  # never read unless FP8
        v_scale if fp8 else seq_lens,
        scale * LOG2E,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        num_m_tiles,
        GROUP=num_heads // num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        FP8=fp8,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out
