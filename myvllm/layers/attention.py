"""Attention layer: writes this step's K/V into the paged cache and attends over it.

The work is done by an attention backend (torch, triton or flash_attn) chosen
once by the model runner; the layer holds its slice of the KV cache, assigned
after the cache is allocated.
"""

from __future__ import annotations

import torch
from torch import nn

from myvllm.attention.backend import AttentionBackend, AttentionMetadata


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 backend: AttentionBackend) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.backend = backend
        self.k_cache = torch.empty(0)  # [num_blocks, block_size, num_kv_heads, head_dim]
        self.v_cache = torch.empty(0)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata,
                kv_stored: bool = False) -> torch.Tensor:
        """q [T, H, D], k and v [T, Hkv, D] -> [T, H, D]. kv_stored: k and v are in the cache already."""
        return self.backend.forward(q, k, v, self.k_cache, self.v_cache, meta, self.scale, kv_stored)
