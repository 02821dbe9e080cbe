"""Triton kernel that scatters new keys and values into the paged KV cache.

Cache layout: `[num_blocks, block_size, Hkv, D]`, contiguous, one cache for keys and
one for values per layer. A token's slot is `block_id * block_size + offset`; a slot
of -1 marks a padding token, for which nothing is written.

One program handles one token: all of its KV heads, for keys and values, as one
`[Hkv, D]` tile each, so that every thread moves 16-byte vectors.

An fp8 (e4m3) cache stores value / scale, with one float32 scale per KV head, saturated to
+-448 and rounded to the nearest e4m3 value (ties to even): exactly
`myvllm.kernels.reference.quantize_kv`. The rounding is done in float32 (`round_to_e4m3`)
so that the conversion to e4m3 only ever sees representable values, whatever rounding the
conversion itself uses.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from myvllm.kernels.reference import FP8_KV_DTYPE, FP8_MAX

E4M3_MAX = tl.constexpr(FP8_MAX)
E4M3_MIN_NORMAL = tl.constexpr(2.0**-6)  # below it e4m3 values are subnormal, 2^-9 apart
# 1.5 * 2^14: float32 numbers near it are 2^-9 apart, so (x + this) - this rounds x to a multiple of 2^-9.
SUBNORMAL_ROUNDER = tl.constexpr(24576.0)


@triton.jit
def round_to_e4m3(x):
    """float32 x within +-448 -> the nearest e4m3 value (ties to even), still in float32."""
    bits = x.to(tl.int32, bitcast=True)
    # Normal range: keep 3 of float32's 23 mantissa bits, rounding the 20 dropped ones to nearest
    # even (a carry moves into the exponent, as it should).
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000).to(tl.float32, bitcast=True)
    sub = tl.abs((x + SUBNORMAL_ROUNDER) - SUBNORMAL_ROUNDER)
    sub = tl.where(bits < 0, -sub, sub)  # the sign bit's: a negative value rounded to zero is -0.0
    return tl.where(tl.abs(x) < E4M3_MIN_NORMAL, sub, normal)


@triton.jit
def quantize_e4m3(x, scale):
    """x / scale in float32 (IEEE division), saturated to +-448, as an e4m3 tensor."""
    y = tl.div_rn(x.to(tl.float32), scale)
    y = tl.minimum(tl.maximum(y, -E4M3_MAX), E4M3_MAX)
    return round_to_e4m3(y).to(tl.float8e4nv)


@triton.jit
def _store_kvcache_kernel(
    key_ptr,  # [T, Hkv, D], unit stride on D
    value_ptr,  # [T, Hkv, D], unit stride on D
    k_cache_ptr,  # [num_blocks * block_size, Hkv, D]
    v_cache_ptr,
    slot_mapping_ptr,  # [T] int64
    k_scale_ptr,  # [Hkv] float32, read when FP8
    v_scale_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cache_slot,
    stride_cache_head,
    NUM_KV_HEADS: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    FP8: tl.constexpr,  # the caches are e4m3: store value / scale
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
    if FP8:
        key = quantize_e4m3(key, tl.load(k_scale_ptr + heads, mask=mask, other=1.0))
        value = quantize_e4m3(value, tl.load(v_scale_ptr + heads, mask=mask, other=1.0))
    dst = slot * stride_cache_slot + heads * stride_cache_head + dims
    tl.store(k_cache_ptr + dst, key.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, value.to(v_cache_ptr.dtype.element_ty), mask=mask)


def check_kv_scales(k_cache: torch.Tensor, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None) -> bool:
    """Whether the caches are fp8 (then k_scale and v_scale must be [Hkv] float32, contiguous)."""
    if k_cache.dtype != FP8_KV_DTYPE:
        return False
    num_kv_heads = k_cache.shape[2]
    for scale in (k_scale, v_scale):
        assert scale is not None, "an fp8 KV cache needs k_scale and v_scale"
        assert scale.shape == (num_kv_heads,) and scale.dtype == torch.float32 and scale.is_contiguous()
    return True


def store_kvcache(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Write key/value `[T, Hkv, D]` into caches `[num_blocks, block_size, Hkv, D]` at slot_mapping `[T]`.

    key and value may be strided views (for example slices of a packed qkv tensor) as
    long as their last dim has unit stride. Slots of -1 are skipped. For fp8 caches,
    k_scale and v_scale `[Hkv]` float32 divide the values first; other caches ignore them.
    """
    num_tokens, num_kv_heads, head_dim = key.shape
    assert value.shape == key.shape
    assert k_cache.shape == v_cache.shape and k_cache.dtype == v_cache.dtype
    assert k_cache.shape[2:] == (num_kv_heads, head_dim)
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    assert key.stride(-1) == 1 and value.stride(-1) == 1
    assert head_dim & (head_dim - 1) == 0, "head_dim must be a power of two"
    assert slot_mapping.shape == (num_tokens,)
    fp8 = check_kv_scales(k_cache, k_scale, v_scale)
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
        k_scale if fp8 else slot_mapping,  # never read unless FP8
        v_scale if fp8 else slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        k_cache.stride(1),
        k_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads,
        HEADS_PAD=heads_pad,
        HEAD_DIM=head_dim,
        FP8=fp8,
        num_warps=num_warps,
    )
