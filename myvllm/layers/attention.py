"""Attention layer: q/k norm + rotary, this step's K/V into the paged cache, attention over it.

This layer is the one place that decides who writes the step's K and V: the fused CUDA op
(per-head q/k RMSNorm, rotary and the KV store in one kernel) when it supports the layer's
head_dim and dtype, else the q/k op followed by the backend's `store_kv`. The backend (torch,
triton or flash_attn, chosen once by the model runner) then only attends.

The layer holds the whole KV cache (assigned after the cache is allocated) and its index into
it. Under torch.compile it takes its K and V views inside forward, so that every layer writes
views of one graph input, which the compiler updates in place (views held as attributes would
be inputs aliasing each other, which it copies whole); eager steps use views made once.
"""

from __future__ import annotations

import torch
from torch import nn

from myvllm.attention.backend import AttentionBackend, AttentionMetadata
from myvllm.layers.norm import RMSNorm
from myvllm.layers.rotary import RotaryEmbedding


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, rotary: RotaryEmbedding,
                 backend: AttentionBackend, ops, dtype: torch.dtype) -> None:
        """ops: kernels.fused_ops.FusedOps; dtype: that of the activations and the KV cache."""
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.rotary = rotary
        self.backend = backend
        self.ops = ops
        # All tensors of the fused op are in the model's dtype except the float32 cos/sin table.
        self.fused_kv_store = ops.supports("qk_norm_rope_store", head_dim, (dtype,), rotary.cos_sin_cache.dtype)
        self.bind_kv_cache(torch.empty(2, 1, 0), 0)

    def bind_kv_cache(self, kv_cache: torch.Tensor, layer_index: int) -> None:
        """kv_cache [2, layers, num_blocks, block_size, num_kv_heads, head_dim]; this layer's K and V
        are kv_cache[0, layer_index] and kv_cache[1, layer_index]."""
        self.kv_cache, self.layer_index = kv_cache, layer_index
        self.k_cache, self.v_cache = kv_cache[0, layer_index], kv_cache[1, layer_index]  # eager steps' views

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                q_norm: RMSNorm, k_norm: RMSNorm, meta: AttentionMetadata) -> torch.Tensor:
        """q [T, H, D], k and v [T, Hkv, D] as projected (unit stride on D), positions [T] -> [T, H, D]."""
        cos_sin = self.rotary.cos_sin_cache
        if torch.compiler.is_compiling():  # views of the one cache input (see the module docstring)
            k_cache, v_cache = self.kv_cache[0, self.layer_index], self.kv_cache[1, self.layer_index]
        else:
            k_cache, v_cache = self.k_cache, self.v_cache
        if self.fused_kv_store:  # one kernel normalises and rotates q and k and writes K and V
            q, k = self.ops.qk_norm_rope_store(q, k, v, q_norm.weight, k_norm.weight, q_norm.eps, positions, cos_sin,
                                               k_cache, v_cache, meta.slot_mapping)
        else:
            q, k = self.ops.qk_norm_rope(q, k, q_norm.weight, k_norm.weight, q_norm.eps, positions, cos_sin)
            self.backend.store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        return self.backend.forward(q, k_cache, v_cache, meta, self.scale)
