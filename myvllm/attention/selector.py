"""Choose the attention backend for a device and block size, and say why."""

from __future__ import annotations

import importlib.util
import logging
import os

import torch

from myvllm.attention.backend import AttentionBackend

logger = logging.getLogger(__name__)

# flash-attn reads a paged cache through block_table only at block sizes that are multiples of this.
# It lives here, not in flash_attn_backend, so that choosing a backend imports no kernel module.
FLASH_ATTN_BLOCK_MULTIPLE = 256


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def choose_backend_name(requested: str, device: torch.device, block_size: int,
                        kv_cache_dtype: str = "auto") -> tuple[str, str]:
    """(backend name, reason) for attention_backend=requested and EngineConfig.kv_cache_dtype
    (flash-attn reads no fp8 KV cache)."""
    fp8_kv = kv_cache_dtype != "auto"
    if requested != "auto":
        # On CPU, Triton kernels run only through Triton's interpreter (tests use it).
        interpreted = requested == "triton" and os.environ.get("TRITON_INTERPRET") == "1"
        if device.type == "cpu" and requested != "torch" and not interpreted:
            raise ValueError(f"attention_backend={requested!r} needs CUDA; on CPU use 'torch' or 'auto'")
        if requested == "flash_attn":
            if fp8_kv:
                raise ValueError(f"attention_backend='flash_attn' does not read an fp8 KV cache "
                                 f"(kv_cache_dtype={kv_cache_dtype!r}): use attention_backend='triton' or "
                                 f"'auto', or kv_cache_dtype='auto'")
            if not flash_attn_available():
                raise ValueError("attention_backend='flash_attn' but the flash_attn package is not installed")
            if block_size % FLASH_ATTN_BLOCK_MULTIPLE:
                raise ValueError(
                    f"attention_backend='flash_attn' needs kvcache_block_size to be a multiple of "
                    f"{FLASH_ATTN_BLOCK_MULTIPLE}, got {block_size}"
                )
        return requested, "asked for"
    if device.type == "cpu":
        return "torch", "the device is a CPU"
    if fp8_kv:
        return "triton", f"kv_cache_dtype={kv_cache_dtype!r}, which flash_attn does not read"
    if not flash_attn_available():
        return "triton", "flash_attn is not installed"
    if block_size % FLASH_ATTN_BLOCK_MULTIPLE:
        return "triton", f"kvcache_block_size={block_size} is not a multiple of {FLASH_ATTN_BLOCK_MULTIPLE}"
    return "flash_attn", "flash_attn is installed and the block size suits it"


def create_backend(requested: str, device: torch.device, block_size: int, num_heads: int, head_dim: int,
                   max_num_seqs: int, max_model_len: int, kv_cache_dtype: str = "auto") -> AttentionBackend:
    name, why = choose_backend_name(requested, device, block_size, kv_cache_dtype)
    logger.info("attention backend: %s (%s)", name, why)
    if name == "torch":
        from myvllm.attention.torch_backend import TorchAttentionBackend

        return TorchAttentionBackend()
    if name == "flash_attn":
        from myvllm.attention.flash_attn_backend import FlashAttnBackend

        return FlashAttnBackend()
    from myvllm.attention.triton_backend import TritonAttentionBackend

    return TritonAttentionBackend(num_heads, head_dim, max_num_seqs, max_model_len, block_size, device)
