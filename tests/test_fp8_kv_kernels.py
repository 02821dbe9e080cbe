"""The Triton KV store, prefill and decode kernels on fp8 (e4m3) caches against the torch reference.

As in tests/test_triton_kernels.py, each case runs on CPU through Triton's interpreter (small
shapes) and on CUDA as a test marked `gpu` (the shape matrix: batches of 1 to 256, contexts up
to 4096, cache blocks of 16 to 256 tokens, bf16 queries; graph replay). The store must equal
`reference.quantize_kv` bit for bit (ties to even, saturation, subnormals, -0); attention must
match `reference.paged_attention` reading the same fp8 caches with the same per-KV-head scales.
"""

from __future__ import annotations

import pytest
import torch
from capture_util import capture
from test_triton_kernels import (
    CPU,
    CUDA,
    GARBAGE_BLOCK,
    LARGE_TOL,
    cases,
    packed_qkv,
    random_block_tables,
    rel_err,
    small_and_large,
)

from myvllm.kernels import reference
from myvllm.kernels.reference import FP8_KV_DTYPE, FP8_MAX
from myvllm.kernels.triton_decode_attention import allocate_decode_workspace, decode_attention, default_num_splits
from myvllm.kernels.triton_kv_store import store_kvcache
from myvllm.kernels.triton_prefill_attention import prefill_attention

FP8_TOL = 1e-4  # float32 queries: the kernels' own rounding only (the fp8 inputs are the same)


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.uint8)


def same_codes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two e4m3 tensors hold the same codes, +0 and -0 counting as one (a value that
    underflows to zero may keep its sign or not; attention reads both as 0)."""
    def codes(x: torch.Tensor) -> torch.Tensor:
        return torch.where(bits(x) & 0x7F == 0, 0, bits(x))

    return torch.equal(codes(a), codes(b))


def e4m3_values() -> torch.Tensor:
    """Every finite e4m3 value, ascending, as float32 (both zeros included)."""
    values = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(FP8_KV_DTYPE).float()
    return values[values.isfinite()].sort().values


def random_scales(num_kv_heads: int, gen) -> torch.Tensor:
    """[Hkv] float32 in [0.05, 3): per-head scales far from 1."""
    return 0.05 + 2.95 * torch.rand(num_kv_heads, generator=gen, device=gen.device)


def random_fp8_cache(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, gen):
    """K and V caches [num_blocks, block_size, Hkv, D] of e4m3 values spread over their range."""
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k = (8 * torch.randn(shape, generator=gen, device=gen.device)).clamp(-FP8_MAX, FP8_MAX).to(FP8_KV_DTYPE)
    v = (8 * torch.randn(shape, generator=gen, device=gen.device)).clamp(-FP8_MAX, FP8_MAX).to(FP8_KV_DTYPE)
    return k, v


def reference_attention(q, k_cache, v_cache, qsl, seq_lens, block_tables, scale, k_scale, v_scale):
    tables = torch.where(block_tables == GARBAGE_BLOCK, 0, block_tables)
    return reference.paged_attention(q.float(), k_cache, v_cache, qsl, seq_lens, tables, scale, k_scale, v_scale)


# ---------------------------------------------------------------------------- store


@pytest.mark.parametrize(
    "device,num_tokens,num_kv_heads,head_dim,dtype",
    small_and_large([(13, 2, 32, torch.float32), (9, 3, 64, torch.bfloat16), (5, 1, 32, torch.float16)],
                    [(4096, 8, 128, torch.bfloat16), (777, 4, 64, torch.float16), (1, 8, 128, torch.float32)]),
)
def test_store_fp8(device, num_tokens, num_kv_heads, head_dim, dtype):
    """Random values over many binades (saturating, normal, subnormal, zero) through per-head scales."""
    gen = torch.Generator(device=device).manual_seed(num_tokens + 31 * head_dim)
    block_size = 16
    num_blocks = (num_tokens + block_size - 1) // block_size + 3
    _, key, value = packed_qkv(num_tokens, 2 * num_kv_heads, num_kv_heads, head_dim, torch.float32, gen)
    magnitude = torch.logspace(-7, 4, num_tokens * num_kv_heads, device=device).view(num_tokens, num_kv_heads, 1)
    key, value = (key * magnitude).to(dtype), (value * magnitude.flip(0)).to(dtype)
    key[0, 0, :4] = torch.tensor([0.0, -0.0, 1e-30, -1e-30], dtype=dtype)
    slot_mapping = torch.randperm(num_blocks * block_size, generator=gen, device=device)[:num_tokens]
    slot_mapping[1::4] = -1
    k_scale, v_scale = random_scales(num_kv_heads, gen), random_scales(num_kv_heads, gen)
    k_cache, v_cache = random_fp8_cache(num_blocks, block_size, num_kv_heads, head_dim, gen)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()

    store_kvcache(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    reference.store_kvcache(key, value, k_ref, v_ref, slot_mapping, k_scale, v_scale)
    assert same_codes(k_cache, k_ref)
    assert same_codes(v_cache, v_ref)


@pytest.mark.parametrize("device", [CPU, CUDA])
def test_store_fp8_rounds_ties_to_even(device):
    """Every e4m3 value, every midpoint between neighbours (ties), points just off the midpoints,
    and values past the largest (saturated), both signs: exactly torch's conversion."""
    values = e4m3_values().to(device)
    positive = values[values >= 0]
    mids = (positive[1:] + positive[:-1]) / 2
    above, below = mids * (1 + 2**-20), mids * (1 - 2**-20)
    beyond = torch.tensor([449.0, 464.0, 479.9, 480.0, 1e4, 3e38], device=device)
    x = torch.cat([values, mids, -mids, above, -above, below, -below, beyond, -beyond])
    x = torch.cat([x, x.new_zeros((-x.numel()) % 32)]).view(-1, 1, 32)  # [T, 1, 32]
    num_tokens = x.shape[0]
    one = torch.ones(1, device=device)
    k_cache = torch.zeros(num_tokens, 1, 1, 32, dtype=FP8_KV_DTYPE, device=device)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.arange(num_tokens, device=device)
    store_kvcache(x, -x, k_cache, v_cache, slots, one, one)
    assert same_codes(k_cache.view(x.shape), x.clamp(-FP8_MAX, FP8_MAX).to(FP8_KV_DTYPE))
    assert same_codes(v_cache.view(x.shape), (-x).clamp(-FP8_MAX, FP8_MAX).to(FP8_KV_DTYPE))


# -------------------------------------------------------------------------- prefill


def run_prefill(device, q_lens, ctx_lens, block_size, num_heads, num_kv_heads, head_dim, dtype, seed, tol=FP8_TOL):
    gen = torch.Generator(device=device).manual_seed(seed)
    seq_lens = [c + n for c, n in zip(ctx_lens, q_lens)]
    num_blocks = sum((s + block_size - 1) // block_size for s in seq_lens) + 3
    k_cache, v_cache = random_fp8_cache(num_blocks, block_size, num_kv_heads, head_dim, gen)
    k_scale, v_scale = random_scales(num_kv_heads, gen), random_scales(num_kv_heads, gen)
    block_tables = random_block_tables(seq_lens, block_size, num_blocks, gen)
    q, _, _ = packed_qkv(sum(q_lens), num_heads, num_kv_heads, head_dim, dtype, gen)
    q = (q * 0.05).to(dtype)  # scores of a few units: the softmax is neither flat nor one-hot
    qsl = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32).to(device)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    scale = head_dim**-0.5
    out = torch.full_like(q, float("nan"))
    prefill_attention(q, k_cache, v_cache, out, qsl, seq_lens_t, block_tables, max(q_lens), scale, k_scale, v_scale)
    ref = reference_attention(q, k_cache, v_cache, qsl, seq_lens_t, block_tables, scale, k_scale, v_scale)
    assert not out.isnan().any()
    err = rel_err(out, ref)
    assert err < tol, err


@pytest.mark.parametrize("device,block_size,group", cases([CPU, CUDA], (16, 1), (32, 2), (16, 4)))
def test_prefill_fp8(device, block_size, group):
    # fresh prompts, prefix-cache hits around a tile boundary, and decode rows: one mixed batch
    run_prefill(device, [37, 9, 1, 33, 1], [0, 62, 77, 64, 130], block_size, 2 * group, 2, 32, torch.float32,
                10 + group)


@pytest.mark.parametrize("device,dtype", cases([CPU, CUDA], (torch.bfloat16,), (torch.float16,)))
def test_prefill_fp8_half_queries(device, dtype):
    """bf16 queries take the fp16 products (fp8_dot_operand), fp16 ones stay."""
    run_prefill(device, [20, 1, 40], [13, 50, 0], 16, 4, 2, 64, dtype, 12, LARGE_TOL)


@pytest.mark.parametrize("device", [CPU, CUDA])
def test_prefill_fp8_block_256_and_query_tiles(device):
    run_prefill(device, [150, 3, 17], [10, 300, 0], 256, 2, 1, 64, torch.float32, 11)


PREFILL_MATRIX = [
    # block_size, num_heads, num_kv_heads, head_dim, q_lens, ctx_lens
    (16, 16, 8, 128, [1, 2048, 7, 300], [0, 0, 0, 0]),
    (64, 16, 8, 128, [512, 1, 1, 256] + [1] * 60, [1536, 9, 4000, 0] + list(range(10, 3000, 50))),
    (256, 32, 8, 128, [1000, 33, 1, 2], [3000, 4000, 4095, 0]),
    (128, 16, 2, 64, [4096, 1, 600], [0, 3000, 1200]),
    (32, 8, 8, 128, list(range(1, 257)), [(7 * i) % 3000 for i in range(256)]),
]


@pytest.mark.parametrize("device,block_size,num_heads,num_kv_heads,head_dim,q_lens,ctx_lens",
                         cases([CUDA], *PREFILL_MATRIX))
def test_prefill_fp8_shape_matrix(device, block_size, num_heads, num_kv_heads, head_dim, q_lens, ctx_lens):
    run_prefill(device, q_lens, ctx_lens, block_size, num_heads, num_kv_heads, head_dim, torch.bfloat16, 1,
                LARGE_TOL)


# --------------------------------------------------------------------------- decode


def decode_inputs(device, seq_lens, block_size, num_heads, num_kv_heads, head_dim, dtype, seed):
    gen = torch.Generator(device=device).manual_seed(seed)
    num_blocks = sum((s + block_size - 1) // block_size for s in seq_lens) + 2
    k_cache, v_cache = random_fp8_cache(num_blocks, block_size, num_kv_heads, head_dim, gen)
    k_scale, v_scale = random_scales(num_kv_heads, gen), random_scales(num_kv_heads, gen)
    block_tables = random_block_tables(seq_lens, block_size, num_blocks, gen)
    for b, s in enumerate(seq_lens):
        if s == 0:  # graph padding rows
            block_tables[b] = GARBAGE_BLOCK
    q = (0.05 * torch.randn(len(seq_lens), num_heads, head_dim, generator=gen, device=device)).to(dtype)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    return q, k_cache, v_cache, seq_lens_t, block_tables, k_scale, v_scale


def run_decode(device, seq_lens, block_size, num_heads, num_kv_heads, head_dim, num_splits, dtype, seed,
               tol=FP8_TOL):
    q, k_cache, v_cache, seq_lens_t, block_tables, k_scale, v_scale = decode_inputs(
        device, seq_lens, block_size, num_heads, num_kv_heads, head_dim, dtype, seed)
    batch, scale = len(seq_lens), head_dim**-0.5
    partial_out, partial_lse = allocate_decode_workspace(batch, num_heads, head_dim, num_splits, device)
    out = torch.full_like(q, float("nan"))
    decode_attention(q, k_cache, v_cache, out, seq_lens_t, block_tables, scale, partial_out, partial_lse, num_splits,
                     k_scale, v_scale)
    qsl = torch.arange(batch + 1, dtype=torch.int32, device=device)
    ref = reference_attention(q, k_cache, v_cache, qsl, seq_lens_t, block_tables, scale, k_scale, v_scale)
    assert not out.isnan().any()
    for b, s in enumerate(seq_lens):
        if s == 0:
            assert torch.equal(out[b], torch.zeros_like(out[b]))
    err = rel_err(out, ref)
    assert err < tol, err


@pytest.mark.parametrize("device,num_splits,group,head_dim", cases(
    [CPU, CUDA], (1, 1, 32), (3, 2, 64), (8, 4, 32), (16, 2, 32)))
def test_decode_fp8(device, num_splits, group, head_dim):
    run_decode(device, [1, 0, 150, 64, 17], 16, 2 * group, 2, head_dim, num_splits, torch.float32,
               100 + num_splits + group)


@pytest.mark.parametrize("device,dtype", cases([CPU, CUDA], (torch.bfloat16,), (torch.float16,)))
def test_decode_fp8_half_queries(device, dtype):
    run_decode(device, [90, 33, 0, 200], 16, 4, 2, 64, 4, dtype, 13, LARGE_TOL)


DECODE_MATRIX = [
    # batch, max context, block_size, num_heads, num_kv_heads, head_dim
    (1, 4096, 16, 16, 8, 128),
    (1, 4096, 256, 32, 4, 128),
    (4, 4096, 64, 16, 8, 128),
    (33, 2048, 32, 16, 8, 128),
    (64, 4096, 128, 16, 8, 128),
    (128, 3000, 256, 16, 2, 64),
    (256, 4096, 16, 16, 8, 128),
    (256, 1024, 256, 32, 8, 128),
]


@pytest.mark.parametrize("device,batch,max_ctx,block_size,num_heads,num_kv_heads,head_dim",
                         cases([CUDA], *DECODE_MATRIX))
def test_decode_fp8_shape_matrix(device, batch, max_ctx, block_size, num_heads, num_kv_heads, head_dim):
    """Every split count the backend picks for the batch (one split from large batches on)."""
    gen = torch.Generator().manual_seed(batch + max_ctx)
    seq_lens = torch.randint(1, max_ctx + 1, (batch,), generator=gen)
    seq_lens[0] = max_ctx
    if batch > 2:
        seq_lens[-2:] = 0
    splits = default_num_splits(max_ctx, block_size, batch_size=batch, num_kv_heads=num_kv_heads)
    run_decode(device, seq_lens.tolist(), block_size, num_heads, num_kv_heads, head_dim, splits, torch.bfloat16,
               batch, LARGE_TOL)


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 8, 64, 256])
def test_decode_fp8_graph_replay_equals_eager(batch):
    """Captured once, replayed with new seq_lens, block tables and scales: bit-equal to eager calls."""
    device, block_size, num_heads, num_kv_heads, head_dim, width = "cuda", 16, 16, 8, 128, 64
    seq_lens = [width * block_size] * batch
    q, k_cache, v_cache, seq_lens_t, block_tables, k_scale, v_scale = decode_inputs(
        device, seq_lens, block_size, num_heads, num_kv_heads, head_dim, torch.bfloat16, batch)
    num_blocks = k_cache.shape[0]
    splits = default_num_splits(width * block_size, block_size, batch_size=batch, num_kv_heads=num_kv_heads)
    partial_out, partial_lse = allocate_decode_workspace(batch, num_heads, head_dim, splits, device)
    out = torch.empty_like(q)

    def step() -> None:
        decode_attention(q, k_cache, v_cache, out, seq_lens_t, block_tables, head_dim**-0.5, partial_out,
                         partial_lse, splits, k_scale, v_scale)

    graph = capture(step)
    gen = torch.Generator(device=device).manual_seed(9)
    for _ in range(3):
        lens = torch.randint(1, width * block_size + 1, (batch,), generator=gen, device=device)
        seq_lens_t.copy_(lens.to(torch.int32))
        block_tables[:, :width].copy_(torch.randperm(num_blocks, generator=gen, device=device)[: batch * width]
                                      .view(batch, width))
        k_scale.copy_(random_scales(num_kv_heads, gen))
        v_scale.copy_(random_scales(num_kv_heads, gen))
        graph.replay()
        replayed = out.clone()
        step()
        assert torch.equal(replayed, out)


# ------------------------------------------------------------------- fused CUDA store (GPU)


def e4m3_steps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many e4m3 values lie between a and b (fp8 tensors of one shape), elementwise."""
    def ordinal(x):  # e4m3 codes in the order of their values
        code = bits(x).to(torch.int32)
        return torch.where(code >= 128, 128 - code, code)
    return (ordinal(a) - ordinal(b)).abs()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("heads", [(16, 8, 128), (32, 4, 64), (8, 8, 256)], ids=lambda h: "H{}-Hkv{}-D{}".format(*h))
@pytest.mark.parametrize("num_tokens", [1, 7, 300])
def test_fused_qk_norm_rope_store_fp8(num_tokens, heads, dtype):
    """The CUDA q/k norm + rotary + store op into fp8 caches against the reference: V bit for bit,
    K within one e4m3 step (K is the op's own normalised, rotated row, which may differ from the
    reference's by one rounding of the input dtype), slots of -1 and unasked slots untouched."""
    from test_cuda_kernels import EPS, make_cache, make_positions, norm_weight

    from myvllm.kernels.fused_ops import FusedOps

    ops = FusedOps(use_cuda_kernels=True, device="cuda")
    assert ops.uses_cuda_kernels and ops.supports("qk_norm_rope_store", heads[2], (dtype, FP8_KV_DTYPE), torch.float32)
    num_heads, num_kv_heads, head_dim = heads
    gen = torch.Generator(device="cuda").manual_seed(num_tokens + head_dim)
    width = (num_heads + 2 * num_kv_heads) * head_dim
    qkv = (30 * torch.randn(num_tokens, width, device="cuda", generator=gen)).to(dtype)
    q, k, v = (t.view(num_tokens, -1, head_dim) for t in qkv.split(
        [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1))
    q_weight, k_weight = norm_weight(head_dim, dtype), norm_weight(head_dim, dtype)
    cos_sin, positions = make_cache(head_dim, torch.float32), make_positions(num_tokens)
    k_scale, v_scale = random_scales(num_kv_heads, gen), random_scales(num_kv_heads, gen)
    num_blocks, block_size = 2 + num_tokens // 16, 16
    slots = torch.randperm(num_blocks * block_size, device="cuda", generator=gen)[:num_tokens]
    slots[1::3] = -1  # token 0 is always written, one token in three never
    fill = torch.tensor(0x7F, dtype=torch.uint8, device="cuda").view(FP8_KV_DTYPE)  # NaN: unwritten
    caches = [fill.expand(num_blocks, block_size, num_kv_heads, head_dim).clone() for _ in range(4)]
    args = (q, k, v, q_weight, k_weight, EPS, positions, cos_sin)
    q_out, k_out = ops.qk_norm_rope_store(*args, caches[0], caches[1], slots, k_scale, v_scale)
    q_ref, k_ref = reference.qk_norm_rope_store(*args, caches[2], caches[3], slots, k_scale, v_scale)
    torch.testing.assert_close(q_out.float(), q_ref.float(), rtol=2e-2, atol=2e-2)
    written = torch.zeros(num_blocks * block_size, dtype=torch.bool, device="cuda")
    written[slots[slots >= 0]] = True
    k_ours, v_ours, k_theirs, v_theirs = (c.view(-1, num_kv_heads, head_dim) for c in caches)
    assert (bits(k_ours[~written]) == 0x7F).all() and (bits(v_ours[~written]) == 0x7F).all()
    assert same_codes(v_ours[written], v_theirs[written])
    steps = e4m3_steps_apart(k_ours[written], k_theirs[written])
    assert steps.max() <= 1 and steps.float().mean() < 0.05, (steps.max(), steps.float().mean())
    # the K the op returns is the one it quantized
    requant = reference.quantize_kv(k_out[slots >= 0], FP8_KV_DTYPE, k_scale)
    assert same_codes(k_ours[slots[slots >= 0]], requant)
