"""Attention layer: q/k norm + rotary, this step's K/V into the paged cache, attention over it.

This layer is the one place that decides who writes the step's K and V: the fused CUDA op
(per-head q/k RMSNorm, rotary and the KV store in one kernel) when it supports the layer's
head_dim and the dtypes of the activations and the cache, else the q/k op followed by the
backend's `store_kv`. The backend (torch, triton or flash_attn, chosen once by the model
runner) then only attends. The layer also holds the cache's scales: `k_scale` and `v_scale`
[num_kv_heads] float32, which an fp8 cache divides K and V by when storing and multiplies by
when reading (1.0 unless the checkpoint has `self_attn.k_scale` / `v_scale` or the runner
measures them).

The layer holds the whole KV cache (bound after the cache is allocated, `bind_kv_cache`) and
its index into it. Under torch.compile it takes its K and V views inside forward, so that every
layer writes views of one graph input, which the compiler updates in place (views held as
attributes would be inputs aliasing each other, which it copies whole); eager steps use views
made once.
"""

from __future__ import annotations

import torch
from torch import nn

from myvllm.attention.backend import AttentionBackend, AttentionMetadata
from myvllm.layers.norm import RMSNorm
from myvllm.layers.rotary import RotaryEmbedding
from myvllm.models.weight_utils import Loaded, as_tensor


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, rotary: RotaryEmbedding,
                 backend: AttentionBackend, ops, dtype: torch.dtype) -> None:
        """ops: kernels.fused_ops.FusedOps; dtype: that of the activations (and of the KV cache
        until bind_kv_cache binds one of another dtype)."""
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.rotary = rotary
        self.backend = backend
        self.ops = ops
        self.dtype = dtype
        self.k_scale = self._kv_scale()
        self.v_scale = self._kv_scale()
        self.bind_kv_cache(torch.empty(2, 1, 0, dtype=dtype), 0)

    def _kv_scale(self) -> nn.Parameter:
        scale = nn.Parameter(torch.ones(self.num_kv_heads, dtype=torch.float32), requires_grad=False)
        scale.weight_loader = self.load_kv_scale
        scale.checkpoint_optional = True  # a checkpoint without it leaves 1.0
        return scale

    def _fused_store_supported(self, cache_dtype: torch.dtype) -> bool:
        # All tensors of the fused op are in one dtype except the float32 cos/sin table.
        return self.ops.supports("qk_norm_rope_store", self.head_dim, (self.dtype, cache_dtype),
                                 self.rotary.cos_sin_cache.dtype)

    def bind_kv_cache(self, kv_cache: torch.Tensor, layer_index: int) -> None:
        """kv_cache [2, layers, num_blocks, block_size, num_kv_heads, head_dim]; this layer's K and V
        are kv_cache[0, layer_index] and kv_cache[1, layer_index]."""
        self.kv_cache, self.layer_index = kv_cache, layer_index
        self.k_cache, self.v_cache = kv_cache[0, layer_index], kv_cache[1, layer_index]  # eager steps' views
        self.fused_kv_store = self._fused_store_supported(kv_cache.dtype)

    def load_kv_scale(self, param: nn.Parameter, loaded: Loaded) -> None:
        """A checkpoint's k_scale / v_scale: one per-tensor value (shape [] or [1]), or one per KV
        head ([num_kv_heads]); positive and finite."""
        if tuple(loaded.shape) not in ((), (1,), (self.num_kv_heads,)):
            raise ValueError(f"KV cache scale of shape {tuple(loaded.shape)}: expected one value (shape [] or "
                             f"[1]) or one per KV head ([{self.num_kv_heads}] on this rank)")
        value = as_tensor(loaded).float().reshape(-1)
        if not (torch.isfinite(value).all() and (value > 0).all()):
            raise ValueError(f"KV cache scale {value.tolist()} must be positive and finite")
        param.data.copy_(value.expand(self.num_kv_heads))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                q_norm: RMSNorm, k_norm: RMSNorm, meta: AttentionMetadata) -> torch.Tensor:
        """q [T, H, D], k and v [T, Hkv, D] as projected (unit stride on D), positions [T] -> [T, H, D]."""
        cos_sin = self.rotary.cos_sin_cache
        if torch.compiler.is_compiling():  # views of the one cache input (see the module docstring)
            k_cache, v_cache = self.kv_cache[0, self.layer_index], self.kv_cache[1, self.layer_index]
        else:
            k_cache, v_cache = self.k_cache, self.v_cache
        scales = dict(k_scale=self.k_scale, v_scale=self.v_scale)
        if self.fused_kv_store:  # one kernel normalises and rotates q and k and writes K and V
            q, k = self.ops.qk_norm_rope_store(q, k, v, q_norm.weight, k_norm.weight, q_norm.eps, positions, cos_sin,
                                               k_cache, v_cache, meta.slot_mapping, **scales)
        else:
            q, k = self.ops.qk_norm_rope(q, k, q_norm.weight, k_norm.weight, q_norm.eps, positions, cos_sin)
            self.backend.store_kv(k, v, k_cache, v_cache, meta.slot_mapping, **scales)
        return self.backend.forward(q, k_cache, v_cache, meta, self.scale, **scales)
