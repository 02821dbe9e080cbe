"""flash-attn's paged API, used when the `flash_attn` package is installed.

Decode-only steps call `flash_attn_with_kvcache` with the block table (graph-safe: its split
count depends only on static shapes); every other step (prefill, chunks, prefix hits, mixed)
calls `flash_attn_varlen_func` over the paged cache. flash-attn reads a paged cache through
`block_table` only when the block size is a multiple of 256 (attention/selector.py checks
that). New K/V are stored with our Triton store kernel, in the same cache layout
[num_blocks, block_size, Hkv, D] the Triton backend reads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from myvllm.attention import ops
from myvllm.attention.backend import AttentionBackend, AttentionMetadata


class FlashAttnBackend(AttentionBackend):
    name = "flash_attn"

    def __init__(self) -> None:
        import flash_attn  # noqa: F401 - fail here, at engine start, when it is not installed

    def prepare(self, meta: AttentionMetadata) -> None:
        if not meta.is_decode_only:  # cumulative key lengths [B + 1] for the varlen call
            meta.backend_state = F.pad(torch.cumsum(meta.seq_lens, 0, dtype=torch.int32), (1, 0))

    def store_kv(self, k, v, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None) -> None:
        ops.triton_store_kv(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)

    def forward(self, q, k_cache, v_cache, meta: AttentionMetadata, scale: float, k_scale=None,
                v_scale=None) -> torch.Tensor:
        """k_scale and v_scale go unread: the selector gives flash-attn no fp8 cache."""
        if meta.is_decode_only:
            return ops.flash_decode(q, k_cache, v_cache, meta.seq_lens, meta.block_tables, scale)
        return ops.flash_varlen(q, k_cache, v_cache, meta.query_start_loc, meta.backend_state, meta.max_query_len,
                                meta.max_seq_len, scale, meta.block_tables)
