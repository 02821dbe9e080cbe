"""Sizing and allocating the paged KV cache.

One tensor [2, num_layers, num_blocks, block_size, num_kv_heads, head_dim] holds
every layer's K and V; each attention layer gets views of its two slices.
"""

from __future__ import annotations

import logging
import math

import torch

from myvllm.config import EngineConfig

logger = logging.getLogger(__name__)

GIB = 1 << 30


def block_bytes(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    elem = torch.tensor([], dtype=dtype).element_size()
    return 2 * num_layers * block_size * num_kv_heads * head_dim * elem


def min_blocks(config: EngineConfig, max_model_len: int) -> int:
    """Blocks one sequence of max_model_len tokens needs."""
    return math.ceil(max_model_len / config.kvcache_block_size)


def cpu_num_blocks(config: EngineConfig, bytes_per_block: int, max_model_len: int) -> int:
    """From cpu_kv_cache_gib, capped at what max_num_seqs full-length sequences could use."""
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    by_memory = int(config.cpu_kv_cache_gib * GIB) // bytes_per_block
    useful = config.max_num_seqs * min_blocks(config, max_model_len)
    return min(by_memory, useful)


def cuda_num_blocks(config: EngineConfig, bytes_per_block: int, peak_bytes: int, device: torch.device) -> int:
    """gpu_memory_utilization x total - (peak use of the profiling forward + memory held outside torch)."""
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    free, total = torch.cuda.mem_get_info(device)
    outside_torch = (total - free) - torch.cuda.memory_reserved(device)
    budget = config.gpu_memory_utilization * total - peak_bytes - outside_torch
    logger.info(
        "KV cache budget: %.2f GiB = %.2f x %.2f GiB total - %.2f GiB peak - %.2f GiB outside torch",
        budget / GIB, config.gpu_memory_utilization, total / GIB, peak_bytes / GIB, outside_torch / GIB,
    )
    return max(0, int(budget // bytes_per_block))


def check_fits(num_blocks: int, config: EngineConfig, max_model_len: int, bytes_per_block: int) -> None:
    need = min_blocks(config, max_model_len)
    if num_blocks < need:
        raise ValueError(
            f"the KV cache has room for {num_blocks} blocks ({num_blocks * bytes_per_block / GIB:.3f} GiB) but "
            f"one sequence of max_model_len={max_model_len} tokens needs {need} blocks "
            f"({need * bytes_per_block / GIB:.3f} GiB): raise gpu_memory_utilization (or cpu_kv_cache_gib / "
            f"num_kv_blocks), or lower max_model_len or max_num_batched_tokens"
        )


def allocate_kv_cache(num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                      dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # [2, L, N, block_size, Hkv, D]; zero-filled so padding reads are finite
    return torch.zeros(2, num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=device)
