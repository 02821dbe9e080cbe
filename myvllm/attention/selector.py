"""Choose the attention backend of each phase for a device and block size, and say why.

`attention_backend="auto"` picks, per phase (prefill / mixed steps, and decode-only steps),
the backend that measured faster there (`MEASURED_FASTER`, at the head dims measured), provided
it can read the cache;
when the two phases pick different backends, a `PhaseBackend` runs each step on its phase's.
A named backend ("torch", "triton", "flash_attn") runs both phases. flash-attn's rule the user
can read: its paged KV needs `kvcache_block_size % 256 == 0` and the `flash_attn` package, and
it reads no fp8 KV cache.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass

import torch

from myvllm.attention.backend import AttentionBackend

logger = logging.getLogger(__name__)

# flash-attn reads a paged cache through block_table only at block sizes that are multiples of this.
# It lives here, not in flash_attn_backend, so that choosing a backend imports no kernel module.
FLASH_ATTN_BLOCK_MULTIPLE = 256
PHASES = ("prefill", "decode")
# The faster backend of each phase on CUDA, as benchmarks/attention_backends.py measures it
# (docs/performance.md holds the numbers): an entry names flash_attn only where flash-attn beat
# Triton. Triton is the fallback wherever flash-attn cannot read the cache.
MEASURED_FASTER = {"prefill": "triton", "decode": "triton"}
# The head dims those measurements hold for (every Qwen3 dense model has 128); at others auto
# runs Triton.
MEASURED_HEAD_DIMS = (128,)


@dataclass(frozen=True)
class BackendChoice:
    """The backend name of each phase and why it was chosen (for the log)."""

    prefill: str
    decode: str
    reason: str


def flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def flash_attn_unusable(block_size: int, installed: bool, kv_cache_dtype: str = "auto") -> str | None:
    """Why flash-attn cannot read this KV cache, or None when it can."""
    if not installed:
        return "flash_attn is not installed"
    if kv_cache_dtype != "auto":
        return f"kv_cache_dtype={kv_cache_dtype!r}, which flash-attn does not read"
    if block_size % FLASH_ATTN_BLOCK_MULTIPLE:
        return (f"kvcache_block_size={block_size} is not a multiple of {FLASH_ATTN_BLOCK_MULTIPLE} "
                f"(flash-attn's paged KV needs that)")
    return None


def choose_backends(requested: str, device_type: str, block_size: int, head_dim: int, flash_attn_present: bool,
                    interpreted_triton: bool = False, kv_cache_dtype: str = "auto") -> BackendChoice:
    """The backend of each phase for attention_backend=requested on a device of device_type
    ('cuda' or 'cpu'), with EngineConfig.kv_cache_dtype. interpreted_triton: Triton runs through
    its interpreter (CPU tests)."""
    flash_problem = flash_attn_unusable(block_size, flash_attn_present, kv_cache_dtype)
    if requested != "auto":
        if device_type == "cpu" and requested != "torch" and not (requested == "triton" and interpreted_triton):
            raise ValueError(f"attention_backend={requested!r} needs CUDA; on CPU use 'torch' or 'auto'")
        if requested == "flash_attn" and flash_problem is not None:
            raise ValueError(f"attention_backend='flash_attn' cannot be used: {flash_problem}")
        return BackendChoice(requested, requested, "asked for")
    if device_type == "cpu":
        return BackendChoice("torch", "torch", "the device is a CPU")
    if flash_problem is None and head_dim not in MEASURED_HEAD_DIMS:
        flash_problem = f"head_dim={head_dim}: the backends were measured at head_dim {list(MEASURED_HEAD_DIMS)}"
    names, reasons = {}, []
    for phase in PHASES:
        name = MEASURED_FASTER[phase]
        if name == "flash_attn" and flash_problem is not None:
            names[phase] = "triton"
            reasons.append(f"{phase}: triton ({flash_problem})")
        else:
            names[phase] = name
            reasons.append(f"{phase}: {name} (measured faster)")
    return BackendChoice(names["prefill"], names["decode"], "; ".join(reasons))


def _build(name: str, device: torch.device, block_size: int, num_heads: int, head_dim: int, max_num_seqs: int,
           max_model_len: int) -> AttentionBackend:
    if name == "torch":
        from myvllm.attention.torch_backend import TorchAttentionBackend

        return TorchAttentionBackend()
    if name == "flash_attn":
        from myvllm.attention.flash_attn_backend import FlashAttnBackend

        return FlashAttnBackend()
    from myvllm.attention.triton_backend import TritonAttentionBackend

    return TritonAttentionBackend(num_heads, head_dim, max_num_seqs, max_model_len, block_size, device)


def create_backend(requested: str, device: torch.device, block_size: int, num_heads: int, head_dim: int,
                   max_num_seqs: int, max_model_len: int, kv_cache_dtype: str = "auto") -> AttentionBackend:
    choice = choose_backends(requested, device.type, block_size, head_dim, flash_attn_installed(),
                             interpreted_triton=os.environ.get("TRITON_INTERPRET") == "1",
                             kv_cache_dtype=kv_cache_dtype)
    args = (device, block_size, num_heads, head_dim, max_num_seqs, max_model_len)
    if choice.prefill == choice.decode:
        logger.info("attention backend: %s (%s)", choice.prefill, choice.reason)
        return _build(choice.prefill, *args)
    from myvllm.attention.phase_backend import PhaseBackend

    logger.info("attention backends: %s for prefill and mixed steps, %s for decode (%s)", choice.prefill,
                choice.decode, choice.reason)
    return PhaseBackend(_build(choice.prefill, *args), _build(choice.decode, *args))
