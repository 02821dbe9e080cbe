"""Split-KV paged attention for decode steps (one new token per sequence), in Triton.

Stage 1, grid `(Hkv, B, num_splits)`: a program takes all query heads of one KV head
(the GQA group, padded to at least 16 rows so that tl.dot applies) and one contiguous
slice of its sequence's context: an equal share, ceil(seq_len / num_splits) tokens
rounded up to the KV tile. It walks that slice through the block table in tiles of
BLOCK_N tokens with an online softmax in float32 and writes the normalised partial
output and its log-sum-exp (natural log). A split with no tokens writes only lse = -inf.

Stage 2, grid `(B, H)`: merges the splits of one head by their log-sum-exp into out.
With one split (large batches) stage 1 writes out itself and stage 2 is not launched.

An fp8 (e4m3) cache is read as it is stored: each tile is converted in registers to the
dtype of the products (`fp8_dot_operand`: fp16 for a bf16 model), the KV head's K scale
is folded into the softmax scale and its V scale into the
program's output, so the values are never dequantized in memory.

On sm_90+ both stages go out with programmatic dependent launch (see launches_pdl).

The launch reads no device data on the host and its grid depends only on B and
num_splits, so it can be captured in a CUDA graph and replayed with new seq_lens and
block tables. A sequence with seq_len 0 (graph padding) reads nothing and yields zeros.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from myvllm.kernels.triton_kv_store import check_kv_scales
from myvllm.kernels.triton_prefill_attention import LOG2E, fp8_dot_operand, kv_token_offsets

MIN_GROUP_ROWS = 16  # smallest M of tl.dot
MAX_SPLITS = 16


@triton.jit
def _decode_split_kernel(
    q_ptr,  # [B, H, D]
    k_cache_ptr,  # [num_blocks, block_size, Hkv, D]
    v_cache_ptr,
    seq_lens_ptr,  # [B] int32
    block_tables_ptr,  # [B, max_blocks] int32
    partial_out_ptr,  # [B_max, H, S_max, D] float32
    partial_lse_ptr,  # [B_max, H, S_max] float32
    out_ptr,  # [B, H, D]: written directly when NUM_SPLITS == 1
    k_scale_ptr,  # [Hkv] float32, read when FP8
    v_scale_ptr,
    qk_scale,  # softmax scale * log2(e)
    stride_qb,
    stride_qh,
    stride_ob,
    stride_oh,
    stride_cache_block,
    stride_cache_token,
    stride_cache_head,
    stride_bt,
    stride_pob,
    stride_poh,
    stride_pos,
    stride_lb,
    stride_lh,
    NUM_SPLITS: tl.constexpr,
    GROUP: tl.constexpr,  # query heads per KV head
    GROUP_PAD: tl.constexpr,  # >= 16, power of two
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # cache block size
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    FP8: tl.constexpr,  # the caches hold e4m3 values times a per-KV-head scale
    USE_PDL: tl.constexpr,  # launched with programmatic dependent launch (see launches_pdl)
):
    kv_head = tl.program_id(0)  # the KV heads of one token are adjacent in the cache: their
    seq = tl.program_id(1)  # programs run side by side and read neighbouring memory
    split = tl.program_id(2)

    seq_len = tl.load(seq_lens_ptr + seq)  # a step input: may be read before the wait
    v_scale = 1.0
    if FP8:  # set at start-up: may be read before the wait too
        qk_scale = qk_scale * tl.load(k_scale_ptr + kv_head)
        v_scale = tl.load(v_scale_ptr + kv_head)
    if USE_PDL:  # q and the newest K/V come from the kernel before
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    split_len = tl.maximum(tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N), 1) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    group_mask = offs_g < GROUP
    heads = kv_head * GROUP + offs_g  # [G] query heads of this KV head
    q = tl.load(
        q_ptr + seq.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
        mask=group_mask[:, None],
        other=0.0,
    )  # [G, D]
    if FP8:
        q = fp8_dot_operand(q)

    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    k_base = k_cache_ptr + kv_head.to(tl.int64) * stride_cache_head
    v_base = v_cache_ptr + kv_head.to(tl.int64) * stride_cache_head

    m_i = tl.full([GROUP_PAD], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], dtype=tl.float32)
    for start_n in range(start, end, BLOCK_N):
        token_mask = start_n + offs_n < end
        kv_off = kv_token_offsets(
            bt_row, start_n, offs_n, token_mask, stride_cache_block, stride_cache_token, BLOCK_SIZE, BLOCK_N
        )
        k = tl.load(k_base + kv_off[:, None] + offs_d[None, :], mask=token_mask[:, None], other=0.0)
        v = tl.load(v_base + kv_off[:, None] + offs_d[None, :], mask=token_mask[:, None], other=0.0)
        if FP8:
            k = k.to(q.dtype)
            v = v.to(q.dtype)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [G, BN]
        qk = tl.where(token_mask[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc=acc, input_precision=DOT_PRECISION)
        m_i = m_new

    # An empty split writes only lse = -inf (the merge then reads nothing else of it).
    nonempty = l_i > 0.0
    acc = acc * (v_scale / tl.where(nonempty, l_i, 1.0))[:, None]
    if NUM_SPLITS == 1:  # the whole context in one program: no merge (an empty one gives zeros)
        tl.store(
            out_ptr + seq.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
            acc.to(out_ptr.dtype.element_ty),
            mask=group_mask[:, None],
        )
        return
    lse = (m_i + tl.log2(tl.where(nonempty, l_i, 1.0))) * 0.6931471805599453  # ln(2): natural-log lse
    lse = tl.where(nonempty, lse, float("-inf"))
    seq64 = seq.to(tl.int64)
    tl.store(
        partial_out_ptr
        + seq64 * stride_pob
        + heads[:, None] * stride_poh
        + split * stride_pos
        + offs_d[None, :],
        acc,
        mask=group_mask[:, None] & (offs_d[None, :] < tl.where(end > start, HEAD_DIM, 0)),
    )
    tl.store(partial_lse_ptr + seq64 * stride_lb + heads * stride_lh + split, lse, mask=group_mask)


@triton.jit
def _decode_merge_kernel(
    partial_out_ptr,  # [B_max, H, S_max, D] float32
    partial_lse_ptr,  # [B_max, H, S_max] float32
    out_ptr,  # [B, H, D]
    stride_pob,
    stride_poh,
    stride_pos,
    stride_lb,
    stride_lh,
    stride_ob,
    stride_oh,
    NUM_SPLITS: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    lse = tl.load(
        partial_lse_ptr + seq * stride_lb + head * stride_lh + offs_s,
        mask=offs_s < NUM_SPLITS,
        other=float("-inf"),
    )  # [S]
    used = lse > float("-inf")
    lse_max = tl.max(lse, 0)
    lse_max = tl.where(lse_max > float("-inf"), lse_max, 0.0)  # all splits empty: zeros
    weight = tl.where(used, tl.exp(lse - lse_max), 0.0)  # [S]
    parts = tl.load(
        partial_out_ptr
        + seq * stride_pob
        + head * stride_poh
        + offs_s[:, None] * stride_pos
        + offs_d[None, :],
        mask=used[:, None],
        other=0.0,
    )  # [S, D]
    total = tl.sum(weight, 0)
    merged = tl.sum(parts * weight[:, None], 0) / tl.where(total > 0.0, total, 1.0)  # [D]
    tl.store(out_ptr + seq * stride_ob + head * stride_oh + offs_d, merged.to(out_ptr.dtype.element_ty))


LARGE_BATCH = 128


@functools.cache
def _sm90_or_later(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def launches_pdl(device: torch.device) -> bool:
    """Whether the kernels here go out with programmatic dependent launch (sm_90+): each may be
    scheduled while the kernels before it run: it lets the next kernel start at once
    (gdc_launch_dependents), then waits for the one before (gdc_wait) before reading its
    outputs (the contract of myvllm/kernels/cuda/common.cuh's launch_pdl, whose kernels
    surround these)."""
    return device.type == "cuda" and _sm90_or_later(device.index if device.index is not None else 0)


def decode_config(head_dim: int, batch: int = 1) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages) of the split kernel: from LARGE_BATCH sequences on, longer
    tiles in fewer stages read the cache faster; below it, shorter tiles keep more programs busy
    (benchmarks/attention_microbench.py measures both; see docs/performance.md)."""
    if head_dim <= 128:
        return (128, 4, 2) if batch >= LARGE_BATCH else (64, 4, 3)
    return 32, 4, 3


def default_num_splits(
    max_model_len: int,
    block_size: int,
    batch_size: int | None = None,
    num_kv_heads: int = 8,
    num_sms: int | None = None,
) -> int:
    """Number of KV splits for decode; depends only on host constants and the batch size.

    Without batch_size: the most splits any batch uses (size the workspace with this):
    up to MAX_SPLITS, with no split shorter than one KV tile at max_model_len. With
    batch_size: only as many splits as it takes for B * num_kv_heads * splits programs
    to reach about two per SM; past that, splitting only adds merge traffic and short
    programs (see docs/performance.md).

    block_size does not enter the current heuristic: splits are cut on KV-tile
    boundaries, which work for every cache block size.
    """
    del block_size
    tile = decode_config(128)[0]
    splits = max(1, min(MAX_SPLITS, max_model_len // tile))
    if batch_size is not None:
        if num_sms is None:
            num_sms = (
                torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
                if torch.cuda.is_available()
                else 132
            )
        programs = max(1, batch_size * num_kv_heads)
        splits = min(splits, max(1, triton.cdiv(2 * num_sms, programs)))
    return splits


def allocate_decode_workspace(
    max_batch: int, num_heads: int, head_dim: int, num_splits: int, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """partial_out `[max_batch, H, num_splits, D]` and partial_lse `[max_batch, H, num_splits]`, float32."""
    partial_out = torch.empty(max_batch, num_heads, num_splits, head_dim, dtype=torch.float32, device=device)
    partial_lse = torch.empty(max_batch, num_heads, num_splits, dtype=torch.float32, device=device)
    return partial_out, partial_lse


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    partial_out: torch.Tensor,
    partial_lse: torch.Tensor,
    num_splits: int,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of one new token per sequence over its paged KV; writes and returns out `[B, H, D]`.

    q `[B, H, D]` (unit stride on D); caches `[num_blocks, block_size, Hkv, D]`;
    seq_lens `[B]` int32 (including the new token); block_tables `[B, max_blocks]` int32;
    partial_out `[B_max, H, S_max, D]` / partial_lse `[B_max, H, S_max]` float32 workspace
    with B_max >= B and S_max >= num_splits. fp8 caches need k_scale / v_scale `[Hkv]` float32
    (the stored values times them are the keys and values); other caches ignore them.
    """
    batch, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    assert out.shape == q.shape and q.stride(-1) == 1 and out.stride(-1) == 1
    assert k_cache.shape == v_cache.shape and k_cache.stride() == v_cache.stride()
    assert k_cache.shape[3] == head_dim and k_cache.stride(3) == 1
    assert num_heads % num_kv_heads == 0 and k_cache.dtype == v_cache.dtype
    fp8 = check_kv_scales(k_cache, k_scale, v_scale)
    assert fp8 or q.dtype == k_cache.dtype
    assert head_dim & (head_dim - 1) == 0 and block_size & (block_size - 1) == 0
    assert seq_lens.shape == (batch,) and block_tables.shape[0] >= batch
    assert partial_out.dtype == torch.float32 and partial_lse.dtype == torch.float32
    assert partial_out.shape[0] >= batch and partial_out.shape[1] == num_heads
    assert partial_out.shape[3] == head_dim and partial_out.stride(3) == 1
    assert 1 <= num_splits <= partial_out.shape[2] and num_splits <= partial_lse.shape[2]
    assert partial_lse.shape[:2] == partial_out.shape[:2] and partial_lse.stride(2) == 1
    if batch == 0:
        return out
    group = num_heads // num_kv_heads
    block_n, num_warps, num_stages = decode_config(head_dim, batch)
    pdl = launches_pdl(q.device)
    _decode_split_kernel[(num_kv_heads, batch, num_splits)](
        q,
        k_cache,
        v_cache,
        seq_lens,
        block_tables,
        partial_out,
        partial_lse,
        out,
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
        partial_out.stride(0),
        partial_out.stride(1),
        partial_out.stride(2),
        partial_lse.stride(0),
        partial_lse.stride(1),
        NUM_SPLITS=num_splits,
        GROUP=group,
        GROUP_PAD=max(MIN_GROUP_ROWS, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_N=block_n,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        FP8=fp8,
        USE_PDL=pdl,
        num_warps=num_warps,
        num_stages=num_stages,
        launch_pdl=pdl,
    )
    if num_splits == 1:
        return out
    _decode_merge_kernel[(batch, num_heads)](
        partial_out,
        partial_lse,
        out,
        partial_out.stride(0),
        partial_out.stride(1),
        partial_out.stride(2),
        partial_lse.stride(0),
        partial_lse.stride(1),
        out.stride(0),
        out.stride(1),
        NUM_SPLITS=num_splits,
        SPLITS_PAD=triton.next_power_of_2(num_splits),
        HEAD_DIM=head_dim,
        USE_PDL=pdl,
        num_warps=max(1, min(4, head_dim // 32)),
        launch_pdl=pdl,
    )
    return out
