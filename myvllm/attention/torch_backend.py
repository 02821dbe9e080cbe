"""Reference backend in plain torch: the CPU path and the oracle for the others."""

from __future__ import annotations

import torch

from myvllm.attention.backend import AttentionBackend, AttentionMetadata
from myvllm.kernels import reference


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float,
                kv_stored: bool = False) -> torch.Tensor:
        if not kv_stored:
            reference.store_kvcache(k, v, k_cache, v_cache, meta.slot_mapping)
        return reference.paged_attention(
            q, k_cache, v_cache, meta.query_start_loc, meta.seq_lens, meta.block_tables, scale
        )
