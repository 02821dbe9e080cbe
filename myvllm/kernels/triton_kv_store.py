"""Triton kernel that scatters new keys and values into the paged KV cache.

Cache layout: `[num_blocks, block_size, Hkv, D]`, contiguous, one cache for keys and
one for values per layer. A token's slot is `block_id * block_size + offset`; a slot
of -1 marks a padding token, for which nothing is written.

One program handles one token: all of its KV heads, for keys and values, as one
`[Hkv, D]` tile each, so that every thread moves 16-byte vectors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kvcache_kernel(
    key_ptr,  # [T, Hkv, D], unit stride on D
    value_ptr,  # [T, Hkv, D], unit stride on D
    k_cache_ptr,  # [num_blocks * block_size, Hkv, D]
    v_cache_ptr,
    slot_mapping_ptr,  # [T] int64
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cache_slot,
    stride_cache_head,
    NUM_KV_HEADS: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return
    heads = tl.arange(0, HEADS_PAD)[:, None]  # [Hp, 1]
    dims = tl.arange(0, HEAD_DIM)[None, :]  # [1, D]
    mask = heads < NUM_KV_HEADS
    key = tl.load(key_ptr + token * stride_kt + heads * stride_kh + dims, mask=mask)
    value = tl.load(value_ptr + token * stride_vt + heads * stride_vh + dims, mask=mask)
    dst = slot * stride_cache_slot + heads * stride_cache_head + dims
    tl.store(k_cache_ptr + dst, key.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, value.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kvcache(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write key/value `[T, Hkv, D]` into caches `[num_blocks, block_size, Hkv, D]` at slot_mapping `[T]`.

    key and value may be strided views (for example slices of a packed qkv tensor) as
    long as their last dim has unit stride. Slots of -1 are skipped.
    """
    num_tokens, num_kv_heads, head_dim = key.shape
    assert value.shape == key.shape
    assert k_cache.shape == v_cache.shape and k_cache.dtype == v_cache.dtype
    assert k_cache.shape[2:] == (num_kv_heads, head_dim)
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    assert key.stride(-1) == 1 and value.stride(-1) == 1
    assert head_dim & (head_dim - 1) == 0, "head_dim must be a power of two"
    assert slot_mapping.shape == (num_tokens,)
    if num_tokens == 0:
        return
    heads_pad = triton.next_power_of_2(num_kv_heads)
    tile_bytes = heads_pad * head_dim * key.element_size()
    num_warps = max(1, min(8, tile_bytes // (16 * 32)))  # one 16-byte vector per thread
    _store_kvcache_kernel[(num_tokens,)](
        key,
        value,
        k_cache,
        v_cache,
        slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        k_cache.stride(1),
        k_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads,
        HEADS_PAD=heads_pad,
        HEAD_DIM=head_dim,
        num_warps=num_warps,
    )
