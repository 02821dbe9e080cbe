"""Sizing and allocating the paged KV cache, and measuring its fp8 scales.

One tensor [2, num_layers, num_blocks, block_size, num_kv_heads, head_dim] holds
every layer's K and V; each attention layer gets views of its two slices. The cache's
dtype is the model's, or float8 e4m3 (kv_cache_dtype="fp8"): one byte per element, so
the same memory holds twice the blocks of a bf16 cache.

With calculate_kv_scales, an fp8 cache's scales come from one calibration forward at
start-up (vLLM measures them on the first batch instead): CALIBRATION_TOKENS random token
ids, seeded by the engine's seed, through the model with a scratch cache of the model's
dtype. A layer's K scale is the largest |K| that forward stored, divided by
FP8_MAX / KV_SCALE_HEADROOM (and likewise V): the calibration batch's extreme maps to 224,
leaving one binade for activations beyond it before values saturate at +-448. One scale
per layer and per K / V (per tensor), as vLLM's calculate_kv_scales.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from myvllm.config import EngineConfig
from myvllm.kernels.reference import FP8_MAX
from myvllm.runtime.step_inputs import StepInputs

logger = logging.getLogger(__name__)

GIB = 1 << 30
CALIBRATION_TOKENS = 512
KV_SCALE_HEADROOM = 2.0


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


def calibration_inputs(config: EngineConfig, max_model_len: int, vocab_size: int) -> tuple[StepInputs, int]:
    """(one prefill of random tokens that fills blocks 0.., the number of blocks it fills): the
    calibration forward of calculate_kv_scales. The same on every tensor-parallel rank."""
    num_tokens = min(CALIBRATION_TOKENS, max_model_len, config.max_num_batched_tokens)
    num_blocks = math.ceil(num_tokens / config.kvcache_block_size)
    gen = torch.Generator().manual_seed(config.seed)
    ids = torch.randint(vocab_size, (num_tokens,), generator=gen).numpy()
    inputs = StepInputs(
        input_ids=ids.astype(np.int64),
        positions=np.arange(num_tokens, dtype=np.int64),
        slot_mapping=np.arange(num_tokens, dtype=np.int64),
        seq_lens=np.array([num_tokens], dtype=np.int32),
        query_start_loc=np.array([0, num_tokens], dtype=np.int32),
        block_tables=np.arange(num_blocks, dtype=np.int32)[None, :],
        logits_indices=np.array([num_tokens - 1], dtype=np.int64),
        sample_rows=[],
        max_query_len=num_tokens,
        max_seq_len=num_tokens,
        is_decode_only=False,
    )
    return inputs, num_blocks


def kv_scales_from_cache(cache: torch.Tensor) -> torch.Tensor:
    """Scales [2, L] float32 (K and V of each layer) from a calibration cache [2, L, ...] of the
    model's dtype: the largest |value| / (FP8_MAX / KV_SCALE_HEADROOM); 1.0 where all are zero."""
    amax = cache.abs().flatten(2).amax(dim=2).float()  # [2, L]
    return torch.where(amax > 0, amax / (FP8_MAX / KV_SCALE_HEADROOM), 1.0)
