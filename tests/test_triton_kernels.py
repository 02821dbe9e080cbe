"""Triton attention kernels against the torch reference, on CPU and on CUDA.

Each test runs on both devices: on CPU through Triton's interpreter (tests/conftest.py sets it
up when there is no GPU), on CUDA as a test marked `gpu`. The small cases run on both; the
large ones (long contexts, many sequences, bf16, graph replay) on CUDA only. The reference
runs in float32 on the same inputs; every output is poisoned with NaN first so that an element
the kernel fails to write shows up, and every input is fresh random data.
"""

from __future__ import annotations

import os

import pytest
import torch
from capture_util import capture

from myvllm.kernels import reference
from myvllm.kernels.triton_decode_attention import (
    LARGE_BATCH,
    allocate_decode_workspace,
    decode_attention,
    decode_config,
    default_num_splits,
)
from myvllm.kernels.triton_kv_store import store_kvcache
from myvllm.kernels.triton_prefill_attention import prefill_attention

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
CPU = pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRETED, reason="Triton runs on CPU only interpreted"),
                   id="cpu")
CUDA = pytest.param("cuda", marks=pytest.mark.gpu, id="cuda")
GARBAGE_BLOCK = 1 << 30  # block-table filler that must never be dereferenced
LARGE_TOL = 1e-2  # bf16 kernels against the float32 reference on the same inputs


def cases(devices: list, *params) -> list:
    """pytest params: each of params (a tuple of arguments) on each of devices."""
    return [pytest.param(d.values[0], *p, marks=d.marks, id=f"{d.id}-{'-'.join(map(str, p))}")
            for p in params for d in devices]


def small_and_large(small: list[tuple], large: list[tuple]) -> list:
    return cases([CPU, CUDA], *small) + cases([CUDA], *large)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def tolerance(dtype: torch.dtype) -> float:
    return 1e-4 if dtype == torch.float32 else 5e-3


def random_cache(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, dtype, gen):
    """Random K and V caches [num_blocks, block_size, Hkv, D] on gen's device."""
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k = torch.randn(shape, generator=gen, device=gen.device).to(dtype)
    v = torch.randn(shape, generator=gen, device=gen.device).to(dtype)
    return k, v


def random_block_tables(seq_lens: list[int], block_size: int, num_blocks: int, gen) -> torch.Tensor:
    """[B, max_blocks] int32: each sequence gets distinct, shuffled blocks; unused entries hold garbage."""
    need = [(s + block_size - 1) // block_size for s in seq_lens]
    width = max(max(need), 1) + 1
    assert sum(need) <= num_blocks
    perm = torch.randperm(num_blocks, generator=gen, device=gen.device).to(torch.int32)
    table = torch.full((len(seq_lens), width), GARBAGE_BLOCK, dtype=torch.int32, device=gen.device)
    pos = 0
    for b, n in enumerate(need):
        table[b, :n] = perm[pos : pos + n]
        pos += n
    return table


def packed_qkv(num_tokens: int, num_heads: int, num_kv_heads: int, head_dim: int, dtype, gen):
    """q, k, v as strided views of one packed [T, (H + 2 Hkv) * D] tensor."""
    width = (num_heads + 2 * num_kv_heads) * head_dim
    qkv = torch.randn(num_tokens, width, generator=gen, device=gen.device).to(dtype)
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    shape = (num_tokens, -1, head_dim)
    return q.view(shape), k.view(shape), v.view(shape)


def reference_attention(q, k_cache, v_cache, qsl, seq_lens, block_tables, scale) -> torch.Tensor:
    """float32 reference on the same inputs, garbage table entries made harmless."""
    tables = torch.where(block_tables == GARBAGE_BLOCK, 0, block_tables)
    return reference.paged_attention(q.float(), k_cache.float(), v_cache.float(), qsl, seq_lens, tables, scale)


# ---------------------------------------------------------------------------- store


@pytest.mark.parametrize(
    "device,num_tokens,num_kv_heads,head_dim,dtype",
    small_and_large([(13, h, d, t) for t in (torch.float32, torch.float16) for h, d in [(1, 32), (2, 64), (3, 32)]],
                    [(1, 8, 128, torch.bfloat16), (4096, 8, 128, torch.bfloat16), (777, 4, 64, torch.bfloat16)]),
)
def test_store_kvcache(device, num_tokens, num_kv_heads, head_dim, dtype):
    gen = torch.Generator(device=device).manual_seed(1000 + num_tokens + num_kv_heads * 7 + head_dim)
    block_size = 16
    num_blocks = (num_tokens + block_size - 1) // block_size + 4
    _, key, value = packed_qkv(num_tokens, 2 * num_kv_heads, num_kv_heads, head_dim, dtype, gen)
    assert num_tokens == 1 or not key.is_contiguous()
    slot_mapping = torch.randperm(num_blocks * block_size, generator=gen, device=device)[:num_tokens]
    slot_mapping[1::5] = -1
    k_cache, v_cache = random_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype, gen)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()

    store_kvcache(key, value, k_cache, v_cache, slot_mapping)
    reference.store_kvcache(key, value, k_ref, v_ref, slot_mapping)
    assert torch.equal(k_cache, k_ref)
    assert torch.equal(v_cache, v_ref)


@pytest.mark.parametrize("device", [CPU, CUDA])
def test_store_kvcache_all_padding(device):
    gen = torch.Generator(device=device).manual_seed(7)
    key = torch.randn(4, 2, 32, generator=gen, device=device)
    value = torch.randn(4, 2, 32, generator=gen, device=device)
    k_cache, v_cache = random_cache(2, 16, 2, 32, torch.float32, gen)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    store_kvcache(key, value, k_cache, v_cache, torch.full((4,), -1, dtype=torch.int64, device=device))
    assert torch.equal(k_cache, k_before) and torch.equal(v_cache, v_before)


# -------------------------------------------------------------------------- prefill


def run_prefill(device, q_lens, ctx_lens, block_size, num_heads, num_kv_heads, head_dim, dtype, seed,
                tol=None):
    gen = torch.Generator(device=device).manual_seed(seed)
    seq_lens = [c + n for c, n in zip(ctx_lens, q_lens)]
    num_blocks = sum((s + block_size - 1) // block_size for s in seq_lens) + 3
    k_cache, v_cache = random_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype, gen)
    block_tables = random_block_tables(seq_lens, block_size, num_blocks, gen)
    q, _, _ = packed_qkv(sum(q_lens), num_heads, num_kv_heads, head_dim, dtype, gen)
    qsl = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32).to(device)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    scale = head_dim**-0.5
    out = torch.full_like(q, float("nan"))
    prefill_attention(q, k_cache, v_cache, out, qsl, seq_lens_t, block_tables, max(q_lens), scale)
    ref = reference_attention(q, k_cache, v_cache, qsl, seq_lens_t, block_tables, scale)
    assert not out.isnan().any()
    err = rel_err(out, ref)
    assert err < (tol or tolerance(dtype)), err


@pytest.mark.parametrize("device", [CPU, CUDA])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("group,head_dim", [(1, 32), (2, 64), (4, 32)])
def test_prefill_no_prefix(device, block_size, group, head_dim):
    run_prefill(device, [37, 5, 70], [0, 0, 0], block_size, 2 * group, 2, head_dim, torch.float32, 10 + group)


@pytest.mark.parametrize("device", [CPU, CUDA])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("group", [1, 2, 4])
def test_prefill_with_prefix(device, block_size, group):
    # Prefix-cache hits, with cached lengths around a KV-tile boundary.
    run_prefill(device, [9, 33, 20], [62, 64, 127], block_size, group, 1, 32, torch.float32, 20 + group)


PREFILL_CASES = [
    # block_size, num_heads, num_kv_heads, head_dim
    (16, 16, 16, 128),
    (64, 16, 8, 128),
    (256, 32, 8, 128),
    (16, 32, 4, 128),
    (64, 8, 8, 64),
    (256, 16, 8, 64),
    (16, 16, 4, 64),
    (256, 16, 2, 64),
]


@pytest.mark.parametrize("device,block_size,num_heads,num_kv_heads,head_dim", cases([CUDA], *PREFILL_CASES))
def test_prefill_long_prompts_and_prefixes(device, block_size, num_heads, num_kv_heads, head_dim):
    gen = torch.Generator().manual_seed(block_size + num_heads + head_dim)
    q_lens = [1, 2048, 7, 300, 1000] + torch.randint(1, 600, (3,), generator=gen).tolist()
    ctx_lens = [0, 0, 0, 0, 0, 0, 0, 0]
    run_prefill(device, q_lens, ctx_lens, block_size, num_heads, num_kv_heads, head_dim, torch.bfloat16, 1, LARGE_TOL)
    # Same shapes with cached prefixes (prefix-cache hits / later chunks).
    ctx_lens = [8191, 1000, 4000, 65, 777] + torch.randint(0, 3000, (3,), generator=gen).tolist()
    run_prefill(device, q_lens, ctx_lens, block_size, num_heads, num_kv_heads, head_dim, torch.bfloat16, 2, LARGE_TOL)


@pytest.mark.parametrize("device,block_size,large", small_and_large([(16, False), (32, False)],
                                                                     [(16, True), (256, True)]))
def test_prefill_chunked_mixed_batch(device, block_size, large):
    if large:  # chunked prefill next to many decode rows
        gen = torch.Generator().manual_seed(block_size)
        q_lens = [512, 1, 1, 256] + [1] * 60
        ctx_lens = [1536, 9, 4000, 0] + torch.randint(1, 3000, (60,), generator=gen).tolist()
        run_prefill(device, q_lens, ctx_lens, block_size, 16, 8, 128, torch.bfloat16, 3, LARGE_TOL)
    else:  # chunked prefill next to decode rows (q_len 1) and a fresh prompt
        run_prefill(device, [1, 24, 1, 48, 1], [77, 40, 0, 0, 130], block_size, 4, 2, 32, torch.float32, 30)


@pytest.mark.parametrize("device", [CPU, CUDA])
def test_prefill_several_query_tiles(device):
    # A query longer than one query tile, so that tiles with different causal extents run.
    run_prefill(device, [150, 3], [10, 0], 16, 2, 1, 32, torch.float32, 40)


@pytest.mark.parametrize("device", [CPU, CUDA])
@pytest.mark.parametrize("seed", range(6))
def test_prefill_random_batches(device, seed):
    gen = torch.Generator().manual_seed(seed)
    batch = int(torch.randint(1, 6, (1,), generator=gen))
    q_lens = torch.randint(1, 90, (batch,), generator=gen)
    q_lens[torch.rand(batch, generator=gen) < 0.3] = 1
    ctx_lens = torch.randint(0, 160, (batch,), generator=gen)
    ctx_lens[torch.rand(batch, generator=gen) < 0.3] = 0
    block_size = [16, 32, 64][seed % 3]
    group = [1, 2, 4][(seed // 2) % 3]
    run_prefill(device, q_lens.tolist(), ctx_lens.tolist(), block_size, 2 * group, 2, 32, torch.float32, 500 + seed)


@pytest.mark.parametrize("device", [CUDA])
def test_prefill_many_short_sequences(device):
    gen = torch.Generator().manual_seed(4)
    q_lens = torch.randint(1, 40, (256,), generator=gen).tolist()
    ctx_lens = torch.randint(0, 100, (256,), generator=gen).tolist()
    run_prefill(device, q_lens, ctx_lens, 16, 16, 8, 128, torch.bfloat16, 4, LARGE_TOL)


@pytest.mark.parametrize("device,large", small_and_large([(False,)], [(True,)]))
def test_prefill_short_queries(device, large):
    # Every q_len <= 16 (decode rows, speculative chunks): the smallest query tile.
    if large:
        gen = torch.Generator().manual_seed(5)
        q_lens = torch.randint(1, 17, (128,), generator=gen).tolist()
        ctx_lens = torch.randint(0, 2000, (128,), generator=gen).tolist()
        run_prefill(device, q_lens, ctx_lens, 64, 32, 8, 128, torch.bfloat16, 5, LARGE_TOL)
    else:
        run_prefill(device, [1, 16, 3, 1], [90, 17, 0, 1], 16, 4, 1, 64, torch.float32, 45)


@pytest.mark.parametrize("device", [CPU, CUDA])
def test_prefill_long_query_tiles(device):
    # max_query_len >= 2048 selects the large query/KV tiles.
    run_prefill(device, [2048, 5], [0, 40], 32, 1, 1, 32, torch.float32, 46)


@pytest.mark.parametrize("device,head_dim,large", small_and_large([(256, False)], [(32, True), (256, True)]))
def test_prefill_head_dims(device, head_dim, large):
    if large:
        run_prefill(device, [1500, 1, 200, 33], [0, 900, 300, 0], 16, 8, 2, head_dim, torch.bfloat16, head_dim,
                    LARGE_TOL)
    else:
        run_prefill(device, [70, 1], [30, 100], 16, 2, 1, head_dim, torch.float32, 47)


@pytest.mark.parametrize("device", [CPU, CUDA])
def test_prefill_block_256(device):
    # Tiles smaller than the cache block: one block-table load per tile.
    run_prefill(device, [40, 1, 17], [200, 300, 0], 256, 2, 1, 32, torch.float32, 50)


@pytest.mark.parametrize("device,dtype,large", small_and_large(
    [(torch.float16, False)], [(torch.float16, True), (torch.float32, True)]))
def test_prefill_dtypes(device, dtype, large):
    if large:
        run_prefill(device, [300, 1, 64], [100, 200, 0], 16, 8, 2, 128, dtype, 5, LARGE_TOL)
    else:
        run_prefill(device, [20, 1], [13, 50], 16, 4, 2, 64, dtype, 60)


# --------------------------------------------------------------------------- decode


def run_decode(device, seq_lens, block_size, num_heads, num_kv_heads, head_dim, num_splits, dtype, seed,
               tol=None, workspace_batch=None):
    gen = torch.Generator(device=device).manual_seed(seed)
    batch = len(seq_lens)
    num_blocks = sum((s + block_size - 1) // block_size for s in seq_lens) + 2
    k_cache, v_cache = random_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype, gen)
    block_tables = random_block_tables(seq_lens, block_size, num_blocks, gen)
    for b, s in enumerate(seq_lens):
        if s == 0:  # graph padding rows: the whole row is garbage
            block_tables[b] = GARBAGE_BLOCK
    q, _, _ = packed_qkv(batch, num_heads, num_kv_heads, head_dim, dtype, gen)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    scale = head_dim**-0.5
    partial_out, partial_lse = allocate_decode_workspace(
        workspace_batch or batch, num_heads, head_dim, num_splits + 1, device
    )
    partial_out.fill_(float("nan"))
    partial_lse.fill_(float("nan"))
    out = torch.full_like(q, float("nan"))
    decode_attention(
        q, k_cache, v_cache, out, seq_lens_t, block_tables, scale, partial_out, partial_lse, num_splits
    )
    qsl = torch.arange(batch + 1, dtype=torch.int32, device=device)
    ref = reference_attention(q, k_cache, v_cache, qsl, seq_lens_t, block_tables, scale)
    assert not out.isnan().any()
    for b, s in enumerate(seq_lens):
        if s == 0:
            assert torch.equal(out[b], torch.zeros_like(out[b]))
    err = rel_err(out, ref)
    assert err < (tol or tolerance(dtype)), err


DECODE_CASES = [
    # batch, max context, block_size, num_heads, num_kv_heads, head_dim, num_splits
    (1, 8192, 16, 16, 8, 128, 16),
    (1, 8192, 256, 32, 4, 128, 8),
    (4, 8192, 64, 64, 8, 128, 16),
    (64, 4096, 16, 16, 8, 128, 8),
    (64, 4096, 64, 16, 2, 64, 4),
    (256, 1024, 256, 16, 8, 128, 2),
    (512, 512, 16, 32, 4, 128, 1),
    (512, 256, 64, 16, 16, 64, 3),
    (128, 2048, 256, 16, 2, 64, 16),
    (33, 100, 16, 8, 1, 128, 16),
]


@pytest.mark.parametrize("device,num_splits,group,head_dim", cases(
    [CPU, CUDA], *[(s, g, d) for s in (1, 3, 8) for g, d in [(1, 32), (2, 64), (4, 32)]]))
def test_decode(device, num_splits, group, head_dim):
    seq_lens = [1, 0, 150, 64, 17]
    run_decode(device, seq_lens, 16, 2 * group, 2, head_dim, num_splits, torch.float32, 100 + num_splits * 10 + group)


@pytest.mark.parametrize("device,batch,max_ctx,block_size,num_heads,num_kv_heads,head_dim,num_splits",
                         cases([CUDA], *DECODE_CASES))
def test_decode_long_contexts_and_large_batches(device, batch, max_ctx, block_size, num_heads, num_kv_heads,
                                                head_dim, num_splits):
    gen = torch.Generator().manual_seed(batch * 31 + max_ctx)
    seq_lens = torch.randint(1, max_ctx + 1, (batch,), generator=gen)
    seq_lens[0] = max_ctx
    if batch > 2:
        seq_lens[-2:] = 0  # graph padding rows
    run_decode(device, seq_lens.tolist(), block_size, num_heads, num_kv_heads, head_dim, num_splits, torch.bfloat16,
               batch, LARGE_TOL, workspace_batch=batch + 3)


@pytest.mark.parametrize("device", [CPU, CUDA])
@pytest.mark.parametrize("block_size", [32, 256])
def test_decode_more_splits_than_tiles(device, block_size):
    # 16 splits over at most 3 KV tiles: most splits are empty.
    run_decode(device, [130, 5, 0, 64], block_size, 4, 1, 32, 16, torch.float32, 200 + block_size)


@pytest.mark.parametrize("device", [CPU, CUDA])
def test_decode_workspace_larger_than_batch(device):
    run_decode(device, [40, 0, 0], 16, 8, 2, 32, 2, torch.float32, 300, workspace_batch=8)


@pytest.mark.parametrize("device", [CPU, CUDA])
def test_decode_all_padding(device):
    run_decode(device, [0, 0], 16, 2, 1, 32, 4, torch.float32, 310)


@pytest.mark.parametrize("device", [CPU, CUDA])
@pytest.mark.parametrize("seed", range(4))
def test_decode_random_batches(device, seed):
    gen = torch.Generator().manual_seed(seed)
    seq_lens = torch.randint(0, 300, (int(torch.randint(1, 9, (1,), generator=gen)),), generator=gen)
    num_splits = int(torch.randint(1, 17, (1,), generator=gen))
    block_size = [16, 32, 64, 128][seed]
    group = [1, 2, 4, 8][seed]
    run_decode(device, seq_lens.tolist(), block_size, 2 * group, 2, 32, num_splits, torch.float32, 600 + seed)


@pytest.mark.parametrize("device,head_dim,large", small_and_large([(256, False)], [(32, True), (256, True)]))
def test_decode_head_dims(device, head_dim, large):
    if large:
        run_decode(device, [3000, 1, 0, 257, 64], 16, 8, 2, head_dim, 8, torch.bfloat16, head_dim, LARGE_TOL)
    else:
        run_decode(device, [100, 0, 7], 32, 8, 1, head_dim, 4, torch.float32, 315)


@pytest.mark.parametrize("device,dtype,large", small_and_large(
    [(torch.float16, False)], [(torch.float16, True), (torch.float32, True)]))
def test_decode_dtypes(device, dtype, large):
    if large:
        run_decode(device, [1000, 1, 0, 4097], 16, 16, 4, 128, 8, dtype, 6, LARGE_TOL)
    else:
        run_decode(device, [90, 33, 0], 16, 4, 2, 64, 4, dtype, 320)


def test_default_num_splits():
    most = default_num_splits(4096, 16)
    assert most == 16
    assert default_num_splits(4096, 16, batch_size=1, num_kv_heads=8, num_sms=132) == most
    assert default_num_splits(4096, 16, batch_size=8, num_kv_heads=8, num_sms=132) == 5
    assert default_num_splits(4096, 256, batch_size=256, num_kv_heads=8, num_sms=132) == 1
    assert default_num_splits(64, 256) == 1


@pytest.mark.parametrize("device", [CUDA])
def test_decode_default_splits(device):
    splits = default_num_splits(8192, 16, batch_size=8, num_kv_heads=8)
    run_decode(device, [8192, 5, 3000, 1, 0, 0, 700, 64], 16, 16, 8, 128, splits, torch.bfloat16, 7, LARGE_TOL,
               workspace_batch=11)


@pytest.mark.parametrize("device", [CPU, CUDA])
def test_decode_large_batch_tiles(device):
    """From LARGE_BATCH sequences on, the kernel walks the context in larger tiles."""
    assert decode_config(128, LARGE_BATCH)[0] > decode_config(128, LARGE_BATCH - 1)[0]
    gen = torch.Generator().manual_seed(5)
    seq_lens = torch.randint(0, 300, (LARGE_BATCH + 2,), generator=gen).tolist()
    run_decode(device, seq_lens, 16, 2, 1, 128, 1, torch.float32, 700)


@pytest.mark.gpu
def test_decode_cuda_graph_replay():
    """Captured once, replayed with new seq_lens and block tables: results follow the new inputs."""
    device, dtype = "cuda", torch.bfloat16
    batch, num_heads, num_kv_heads, head_dim, block_size, width = 32, 16, 8, 128, 16, 64
    num_splits = default_num_splits(width * block_size, block_size)
    gen = torch.Generator(device=device).manual_seed(8)
    num_blocks = batch * width + 1
    k_cache, v_cache = random_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype, gen)
    q = torch.randn(batch, num_heads, head_dim, generator=gen, device=device).to(dtype)
    seq_lens = torch.zeros(batch, dtype=torch.int32, device=device)
    block_tables = torch.zeros(batch, width, dtype=torch.int32, device=device)
    out = torch.empty_like(q)
    partial_out, partial_lse = allocate_decode_workspace(batch, num_heads, head_dim, num_splits, device)
    scale = head_dim**-0.5

    def step() -> None:
        decode_attention(
            q, k_cache, v_cache, out, seq_lens, block_tables, scale, partial_out, partial_lse, num_splits
        )

    graph = capture(step)

    qsl = torch.arange(batch + 1, dtype=torch.int32, device=device)
    for trial in range(3):
        lens = torch.randint(1, width * block_size + 1, (batch,), generator=gen, device=device)
        lens[-3:] = 0
        seq_lens.copy_(lens.to(torch.int32))
        block_tables.copy_(
            torch.randperm(num_blocks - 1, generator=gen, device=device)[: batch * width].view(batch, width)
        )
        q.copy_(torch.randn(q.shape, generator=gen, device=device).to(dtype))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref = reference_attention(q, k_cache, v_cache, qsl, seq_lens, block_tables, scale)
        assert not out.isnan().any()
        err = rel_err(out, ref)
        assert err < LARGE_TOL, (trial, err)
