"""Reference backend in plain torch: the CPU path and the oracle for the others."""

from __future__ import annotations

import torch

from myvllm.attention import ops
from myvllm.attention.backend import AttentionBackend, AttentionMetadata


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def store_kv(self, k, v, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None) -> None:
        ops.torch_store_kv(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)

    def forward(self, q, k_cache, v_cache, meta: AttentionMetadata, scale: float, k_scale=None,
                v_scale=None) -> torch.Tensor:
        return ops.torch_attention(q, k_cache, v_cache, meta.query_start_loc, meta.seq_lens, meta.block_tables,
                                   scale, k_scale, v_scale)
