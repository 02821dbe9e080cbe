"""One attention backend for prefill / mixed steps and another for decode-only steps.

Both read and write the same KV cache, whose layout every backend shares
([num_blocks, block_size, Hkv, D], slot = block * block_size + offset), so a sequence
prefilled by one is decoded by the other. Each step's metadata goes to the backend of its
phase only (`meta.is_decode_only`), so `backend_state` is always that backend's own. The
decode CUDA graphs belong to the decode backend.
"""

from __future__ import annotations

import torch

from myvllm.attention.backend import AttentionBackend, AttentionMetadata


class PhaseBackend(AttentionBackend):
    def __init__(self, prefill: AttentionBackend, decode: AttentionBackend) -> None:
        self.prefill = prefill
        self.decode = decode
        self.name = f"{prefill.name} (prefill) + {decode.name} (decode)"

    def _backend(self, meta: AttentionMetadata) -> AttentionBackend:
        return self.decode if meta.is_decode_only else self.prefill

    def prepare(self, meta: AttentionMetadata) -> None:
        self._backend(meta).prepare(meta)

    def store_kv(self, k, v, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None) -> None:
        # The store does not depend on the phase: both backends write the one cache layout.
        self.decode.store_kv(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)

    def forward(self, q, k_cache, v_cache, meta: AttentionMetadata, scale: float, k_scale=None,
                v_scale=None) -> torch.Tensor:
        return self._backend(meta).forward(q, k_cache, v_cache, meta, scale, k_scale, v_scale)

    def init_graph_buffers(self, max_batch_size: int) -> None:
        self.decode.init_graph_buffers(max_batch_size)

    def prepare_replay(self, meta: AttentionMetadata, padded_batch_size: int) -> None:
        self.decode.prepare_replay(meta, padded_batch_size)
