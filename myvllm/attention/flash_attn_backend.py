"""flash-attn's paged API, used when the `flash_attn` package is installed.

flash-attn reads a paged cache through `block_table` only when the block size is
a multiple of 256. New K/V are stored with our Triton store kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from myvllm.attention.backend import AttentionBackend, AttentionMetadata
from myvllm.kernels.triton_kv_store import store_kvcache


class FlashAttnBackend(AttentionBackend):
    name = "flash_attn"

    def __init__(self) -> None:
        from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache

        self._varlen = flash_attn_varlen_func
        self._with_kvcache = flash_attn_with_kvcache

    def prepare(self, meta: AttentionMetadata) -> None:
        if not meta.is_decode_only:  # cumulative key lengths for the varlen call
            meta.backend_state = F.pad(torch.cumsum(meta.seq_lens, 0, dtype=torch.int32), (1, 0))

    def store_kv(self, k, v, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None) -> None:
        store_kvcache(k, v, k_cache, v_cache, slot_mapping)

    def forward(self, q, k_cache, v_cache, meta: AttentionMetadata, scale: float, k_scale=None,
                v_scale=None) -> torch.Tensor:
        if meta.is_decode_only:
            out = self._with_kvcache(
                q.unsqueeze(1), k_cache, v_cache, cache_seqlens=meta.seq_lens,
                block_table=meta.block_tables, softmax_scale=scale, causal=True,
            )
            return out.squeeze(1)
        return self._varlen(
            q, k_cache, v_cache,
            cu_seqlens_q=meta.query_start_loc, cu_seqlens_k=meta.backend_state,
            max_seqlen_q=meta.max_query_len, max_seqlen_k=meta.max_seq_len,
            softmax_scale=scale, causal=True, block_table=meta.block_tables,
        )
