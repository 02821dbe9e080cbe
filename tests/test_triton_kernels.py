"""Triton attention kernels against the torch reference, small shapes.

Without a GPU these run through Triton's interpreter (tests/conftest.py sets it up),
so shapes stay tiny. Every output is poisoned with NaN first so that an element the
kernel fails to write shows up, and every input is fresh random data.
"""

from __future__ import annotations

import pytest
import torch

from myvllm.kernels import reference
from myvllm.kernels.triton_decode_attention import (
    allocate_decode_workspace,
    decode_attention,
    default_num_splits,
)
from myvllm.kernels.triton_kv_store import store_kvcache
from myvllm.kernels.triton_prefill_attention import prefill_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GARBAGE_BLOCK = 1 << 30  # block-table filler that must never be dereferenced


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def tolerance(dtype: torch.dtype) -> float:
    return 1e-4 if dtype == torch.float32 else 5e-3


def random_cache(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, dtype, gen):
    """Random K and V caches [num_blocks, block_size, Hkv, D]."""
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k = torch.randn(shape, generator=gen).to(dtype).to(DEVICE)
    v = torch.randn(shape, generator=gen).to(dtype).to(DEVICE)
    return k, v


def random_block_tables(seq_lens: list[int], block_size: int, num_blocks: int, gen) -> torch.Tensor:
    """[B, max_blocks] int32: each sequence gets distinct, shuffled blocks; unused entries hold garbage."""
    need = [(s + block_size - 1) // block_size for s in seq_lens]
    width = max(max(need), 1) + 1
    assert sum(need) <= num_blocks
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    table = torch.full((len(seq_lens), width), GARBAGE_BLOCK, dtype=torch.int32)
    pos = 0
    for b, n in enumerate(need):
        table[b, :n] = torch.tensor(perm[pos : pos + n], dtype=torch.int32)
        pos += n
    return table.to(DEVICE)


def packed_qkv(num_tokens: int, num_heads: int, num_kv_heads: int, head_dim: int, dtype, gen):
    """q, k, v as strided views of one packed [T, (H + 2 Hkv) * D] tensor."""
    width = (num_heads + 2 * num_kv_heads) * head_dim
    qkv = torch.randn(num_tokens, width, generator=gen).to(dtype).to(DEVICE)
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    shape = (num_tokens, -1, head_dim)
    return q.view(shape), k.view(shape), v.view(shape)


# ---------------------------------------------------------------------------- store


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_kv_heads,head_dim", [(1, 32), (2, 64), (3, 32)])
def test_store_kvcache(dtype, num_kv_heads, head_dim):
    gen = torch.Generator().manual_seed(1000 + num_kv_heads * 7 + head_dim)
    num_tokens, num_blocks, block_size = 13, 6, 16
    _, key, value = packed_qkv(num_tokens, 4, num_kv_heads, head_dim, dtype, gen)
    assert not key.is_contiguous()
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[torch.tensor([1, 5, 12])] = -1
    slot_mapping = slots.to(torch.int64).to(DEVICE)
    k_cache, v_cache = random_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype, gen)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()

    store_kvcache(key, value, k_cache, v_cache, slot_mapping)
    reference.store_kvcache(key, value, k_ref, v_ref, slot_mapping)
    assert torch.equal(k_cache, k_ref)
    assert torch.equal(v_cache, v_ref)


def test_store_kvcache_all_padding():
    gen = torch.Generator().manual_seed(7)
    key = torch.randn(4, 2, 32, generator=gen).to(DEVICE)
    value = torch.randn(4, 2, 32, generator=gen).to(DEVICE)
    k_cache, v_cache = random_cache(2, 16, 2, 32, torch.float32, gen)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    store_kvcache(key, value, k_cache, v_cache, torch.full((4,), -1, dtype=torch.int64, device=DEVICE))
    assert torch.equal(k_cache, k_before) and torch.equal(v_cache, v_before)


# -------------------------------------------------------------------------- prefill


def run_prefill(
    q_lens: list[int],
    ctx_lens: list[int],
    block_size: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype,
    seed: int,
):
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [c + n for c, n in zip(ctx_lens, q_lens)]
    num_blocks = sum((s + block_size - 1) // block_size for s in seq_lens) + 3
    k_cache, v_cache = random_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype, gen)
    block_tables = random_block_tables(seq_lens, block_size, num_blocks, gen)
    q, _, _ = packed_qkv(sum(q_lens), num_heads, num_kv_heads, head_dim, dtype, gen)
    qsl = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32).to(DEVICE)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    scale = head_dim**-0.5
    out = torch.full_like(q, float("nan"))
    prefill_attention(q, k_cache, v_cache, out, qsl, seq_lens_t, block_tables, max(q_lens), scale)
    ref = reference.paged_attention(q, k_cache, v_cache, qsl, seq_lens_t, block_tables, scale)
    assert not out.isnan().any()
    err = rel_err(out, ref)
    assert err < tolerance(dtype), err


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("group,head_dim", [(1, 32), (2, 64), (4, 32)])
def test_prefill_no_prefix(block_size, group, head_dim):
    run_prefill([37, 5, 70], [0, 0, 0], block_size, 2 * group, 2, head_dim, torch.float32, 10 + group)


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("group", [1, 2, 4])
def test_prefill_with_prefix(block_size, group):
    # Prefix-cache hits, with cached lengths around a KV-tile boundary.
    run_prefill([9, 33, 20], [62, 64, 127], block_size, group, 1, 32, torch.float32, 20 + group)


@pytest.mark.parametrize("block_size", [16, 32])
def test_prefill_chunked_mixed_batch(block_size):
    # Chunked prefill next to decode rows (q_len 1) and a fresh prompt.
    q_lens = [1, 24, 1, 48, 1]
    ctx_lens = [77, 40, 0, 0, 130]
    run_prefill(q_lens, ctx_lens, block_size, 4, 2, 32, torch.float32, 30)


def test_prefill_several_query_tiles():
    # A query longer than one query tile, so that tiles with different causal extents run.
    run_prefill([150, 3], [10, 0], 16, 2, 1, 32, torch.float32, 40)


@pytest.mark.parametrize("seed", range(6))
def test_prefill_random_batches(seed):
    gen = torch.Generator().manual_seed(seed)
    batch = int(torch.randint(1, 6, (1,), generator=gen))
    q_lens = torch.randint(1, 90, (batch,), generator=gen)
    q_lens[torch.rand(batch, generator=gen) < 0.3] = 1
    ctx_lens = torch.randint(0, 160, (batch,), generator=gen)
    ctx_lens[torch.rand(batch, generator=gen) < 0.3] = 0
    block_size = [16, 32, 64][seed % 3]
    group = [1, 2, 4][(seed // 2) % 3]
    run_prefill(q_lens.tolist(), ctx_lens.tolist(), block_size, 2 * group, 2, 32, torch.float32, 500 + seed)


def test_prefill_short_queries():
    # Every q_len <= 16 (decode rows, speculative chunks): the smallest query tile.
    run_prefill([1, 16, 3, 1], [90, 17, 0, 1], 16, 4, 1, 64, torch.float32, 45)


def test_prefill_long_query_tiles():
    # max_query_len >= 2048 selects the large query/KV tiles.
    run_prefill([2048, 5], [0, 40], 32, 1, 1, 32, torch.float32, 46)


def test_prefill_head_dim_256():
    run_prefill([70, 1], [30, 100], 16, 2, 1, 256, torch.float32, 47)


def test_prefill_block_256():
    # Tiles smaller than the cache block: one block-table load per tile.
    run_prefill([40, 1, 17], [200, 300, 0], 256, 2, 1, 32, torch.float32, 50)


def test_prefill_float16():
    run_prefill([20, 1], [13, 50], 16, 4, 2, 64, torch.float16, 60)


# --------------------------------------------------------------------------- decode


def run_decode(
    seq_lens: list[int],
    block_size: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    num_splits: int,
    dtype,
    seed: int,
    workspace_batch: int | None = None,
):
    gen = torch.Generator().manual_seed(seed)
    batch = len(seq_lens)
    num_blocks = sum((s + block_size - 1) // block_size for s in seq_lens) + 2
    k_cache, v_cache = random_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype, gen)
    block_tables = random_block_tables(seq_lens, block_size, num_blocks, gen)
    for b, s in enumerate(seq_lens):
        if s == 0:  # graph padding rows: the whole row is garbage
            block_tables[b] = GARBAGE_BLOCK
    q, _, _ = packed_qkv(batch, num_heads, num_kv_heads, head_dim, dtype, gen)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    scale = head_dim**-0.5
    partial_out, partial_lse = allocate_decode_workspace(
        workspace_batch or batch, num_heads, head_dim, num_splits + 1, DEVICE
    )
    partial_out.fill_(float("nan"))
    partial_lse.fill_(float("nan"))
    out = torch.full_like(q, float("nan"))
    decode_attention(
        q, k_cache, v_cache, out, seq_lens_t, block_tables, scale, partial_out, partial_lse, num_splits
    )
    qsl = torch.arange(batch + 1, dtype=torch.int32, device=DEVICE)
    ref = reference.paged_attention(q, k_cache, v_cache, qsl, seq_lens_t, block_tables, scale)
    assert not out.isnan().any()
    for b, s in enumerate(seq_lens):
        if s == 0:
            assert torch.equal(out[b], torch.zeros_like(out[b]))
    err = rel_err(out, ref)
    assert err < tolerance(dtype), err


@pytest.mark.parametrize("num_splits", [1, 3, 8])
@pytest.mark.parametrize("group,head_dim", [(1, 32), (2, 64), (4, 32)])
def test_decode(num_splits, group, head_dim):
    seq_lens = [1, 0, 150, 64, 17]
    run_decode(seq_lens, 16, 2 * group, 2, head_dim, num_splits, torch.float32, 100 + num_splits * 10 + group)


@pytest.mark.parametrize("block_size", [32, 256])
def test_decode_more_splits_than_tiles(block_size):
    # 16 splits over at most 3 KV tiles: most splits are empty.
    run_decode([130, 5, 0, 64], block_size, 4, 1, 32, 16, torch.float32, 200 + block_size)


def test_decode_workspace_larger_than_batch():
    run_decode([40, 0, 0], 16, 8, 2, 32, 2, torch.float32, 300, workspace_batch=8)


def test_decode_all_padding():
    run_decode([0, 0], 16, 2, 1, 32, 4, torch.float32, 310)


@pytest.mark.parametrize("seed", range(4))
def test_decode_random_batches(seed):
    gen = torch.Generator().manual_seed(seed)
    seq_lens = torch.randint(0, 300, (int(torch.randint(1, 9, (1,), generator=gen)),), generator=gen)
    num_splits = int(torch.randint(1, 17, (1,), generator=gen))
    block_size = [16, 32, 64, 128][seed]
    group = [1, 2, 4, 8][seed]
    run_decode(seq_lens.tolist(), block_size, 2 * group, 2, 32, num_splits, torch.float32, 600 + seed)


def test_decode_head_dim_256():
    run_decode([100, 0, 7], 32, 8, 1, 256, 4, torch.float32, 315)


def test_decode_float16():
    run_decode([90, 33, 0], 16, 4, 2, 64, 4, torch.float16, 320)


def test_default_num_splits():
    most = default_num_splits(4096, 16)
    assert most == 16
    assert default_num_splits(4096, 16, batch_size=1, num_kv_heads=8, num_sms=132) == most
    assert default_num_splits(4096, 16, batch_size=8, num_kv_heads=8, num_sms=132) == 5
    assert default_num_splits(4096, 256, batch_size=256, num_kv_heads=8, num_sms=132) == 1
    assert default_num_splits(64, 256) == 1


def test_decode_large_batch_tiles():
    """From LARGE_BATCH sequences on, the kernel walks the context in larger tiles."""
    from myvllm.kernels.triton_decode_attention import LARGE_BATCH, decode_config

    assert decode_config(128, LARGE_BATCH)[0] > decode_config(128, LARGE_BATCH - 1)[0]
    gen = torch.Generator().manual_seed(5)
    seq_lens = torch.randint(0, 300, (LARGE_BATCH + 2,), generator=gen).tolist()
    run_decode(seq_lens, 16, 2, 1, 128, 1, torch.float32, 700)
