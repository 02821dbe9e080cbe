"""Pure-torch versions of every op the model uses.

These run the CPU path and are the oracle that the Triton and CUDA kernels are
tested against. They follow the numerics of `transformers`' Qwen3 (upcast to
float32 for norms, rotary in the input dtype) so that float32 on CPU matches the
reference model token for token.

Shapes: T = tokens in the step, H = query heads, Hkv = KV heads, D = head_dim,
B = sequences in the step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, computed in float32, weight applied in x's dtype."""
    dtype = x.dtype
    xf = x.float()
    variance = xf.pow(2).mean(-1, keepdim=True)
    xf = xf * torch.rsqrt(variance + eps)
    return weight * xf.to(dtype)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """residual += x; return (rms_norm(residual), residual). Out of place."""
    residual = x + residual
    return rms_norm(residual, weight, eps), residual


def norm_linear(
    x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor, silu: bool = False
) -> torch.Tensor:
    """rms_norm(x) @ weight.T [T, N], then silu_and_mul ([T, N/2]) when silu: a norm feeding a projection."""
    out = F.linear(rms_norm(x, norm_weight, eps), weight)
    return silu_and_mul(out) if silu else out


def add_norm_linear(
    x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
    silu: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm_linear(x + residual, ...), x + residual). Out of place."""
    residual = x + residual
    return norm_linear(residual, norm_weight, eps, weight, silu), residual


def rotary_cos_sin_cache(
    head_dim: int, max_position: int, theta: float, dtype: torch.dtype, device=None
) -> torch.Tensor:
    """[max_position, head_dim]: cos in the first half, sin in the second (neox layout).

    inv_freq and the angle products are formed exactly as transformers does it.
    """
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (theta**exponent)  # [D/2]
    t = torch.arange(max_position, dtype=torch.float32, device=device)
    freqs = torch.outer(t, inv_freq)  # [P, D/2]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(dtype)


def apply_rotary(x: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> torch.Tensor:
    """Neox-style rotary on x [T, heads, D] at positions [T]."""
    half = x.shape[-1] // 2
    cos_sin = cos_sin_cache[positions]  # [T, D]
    cos = cos_sin[:, :half].to(x.dtype).unsqueeze(1)  # [T, 1, D/2]
    sin = cos_sin[:, half:].to(x.dtype).unsqueeze(1)
    cos = torch.cat([cos, cos], dim=-1)  # [T, 1, D]
    sin = torch.cat([sin, sin], dim=-1)
    x1, x2 = x[..., :half], x[..., half:]
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos + rotated * sin


def qk_norm_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    eps: float,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head RMSNorm of q [T, H, D] and k [T, Hkv, D], then rotary on both."""
    q = rms_norm(q, q_weight, eps)
    k = rms_norm(k, k_weight, eps)
    return apply_rotary(q, positions, cos_sin_cache), apply_rotary(k, positions, cos_sin_cache)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [T, 2I] -> silu(x[:, :I]) * x[:, I:]."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


FP8_KV_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_KV_DTYPE).max  # 448: the largest finite e4m3 value


def quantize_kv(x: torch.Tensor, cache_dtype: torch.dtype, scale: torch.Tensor | None) -> torch.Tensor:
    """x [T, Hkv, D] as a cache of cache_dtype holds it. An fp8 cache holds x / scale (scale [Hkv]
    float32, one per KV head), divided in float32, saturated to +-FP8_MAX and rounded to nearest
    even; any other cache holds x in its dtype (scale unused)."""
    if cache_dtype != FP8_KV_DTYPE:
        return x.to(cache_dtype)
    assert scale is not None, "an fp8 KV cache needs its scales"
    return (x.float() / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(cache_dtype)


def dequantize_kv(x: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """Cache contents [..., Hkv, D] in float32: fp8 values times their KV head's scale [Hkv]."""
    if x.dtype != FP8_KV_DTYPE:
        return x.float()
    assert scale is not None, "an fp8 KV cache needs its scales"
    return x.float() * scale[:, None]


def store_kvcache(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Scatter key/value [T, Hkv, D] into caches [num_blocks, block_size, Hkv, D].

    slot = block_id * block_size + offset; slot -1 writes nothing. fp8 caches store
    quantize_kv(key, k_scale) and quantize_kv(value, v_scale); the scales are [Hkv] float32.
    """
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    k_flat = k_cache.view(-1, *k_cache.shape[2:])
    v_flat = v_cache.view(-1, *v_cache.shape[2:])
    k_flat[slots] = quantize_kv(key[valid], k_cache.dtype, k_scale)
    v_flat[slots] = quantize_kv(value[valid], v_cache.dtype, v_scale)


def gather_kv(
    cache: torch.Tensor, block_table: torch.Tensor, seq_len: int
) -> torch.Tensor:
    """The first seq_len tokens of one sequence from a paged cache -> [seq_len, Hkv, D]."""
    block_size = cache.shape[1]
    num_blocks = (seq_len + block_size - 1) // block_size
    blocks = cache[block_table[:num_blocks].long()]  # [n, block_size, Hkv, D]
    return blocks.reshape(-1, *cache.shape[2:])[:seq_len]


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of new queries over each sequence's paged KV.

    q: [T, H, D], the new tokens of B sequences packed back to back;
    query_start_loc: [B + 1] cumulative query lengths; seq_lens: [B] cached + new
    tokens (the new tokens' K/V are already in the cache). Query i of a sequence
    with q_len new tokens sits at position seq_len - q_len + i and sees keys at
    positions <= its own. A sequence with seq_len 0 (graph padding) yields zeros.
    Returns [T, H, D] in q's dtype; computed in float32. fp8 caches are read as their
    values times k_scale / v_scale [Hkv] (dequantize_kv).
    """
    out = torch.zeros_like(q)
    num_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    qsl = query_start_loc.tolist()
    lens = seq_lens.tolist()
    for b, seq_len in enumerate(lens):
        start, end = qsl[b], qsl[b + 1]
        q_len = end - start
        if q_len == 0 or seq_len == 0:
            continue
        k = dequantize_kv(gather_kv(k_cache, block_tables[b], seq_len), k_scale)  # [S, Hkv, D] float32
        v = dequantize_kv(gather_kv(v_cache, block_tables[b], seq_len), v_scale)
        k = k.repeat_interleave(group, dim=1).transpose(0, 1)  # [H, S, D]
        v = v.repeat_interleave(group, dim=1).transpose(0, 1)
        qb = q[start:end].float().transpose(0, 1)  # [H, q_len, D]
        scores = torch.matmul(qb, k.transpose(1, 2)) * scale  # [H, q_len, S]
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
        k_pos = torch.arange(seq_len, device=q.device)
        mask = k_pos[None, :] > q_pos[:, None]  # [q_len, S]
        scores.masked_fill_(mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[start:end] = torch.matmul(probs, v).transpose(0, 1).to(q.dtype)
    return out


def qk_norm_rope_store(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    eps: float,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """qk_norm_rope, then the normalised, rotated k and v stored into the caches at slot_mapping
    (as store_kvcache does, scales included)."""
    q_out, k_out = qk_norm_rope(q, k, q_weight, k_weight, eps, positions, cos_sin_cache)
    store_kvcache(k_out, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    return q_out, k_out
