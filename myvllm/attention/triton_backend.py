"""Our own Triton kernels: KV store, varlen paged prefill, split-KV decode.

Decode-only steps use the split-KV (flash-decoding) kernel, whose grid depends
only on the batch size, so it replays inside CUDA graphs; every other step
(prefill, chunked prefill, prefix hits, mixed prefill + decode) uses the varlen
paged kernel.
"""

from __future__ import annotations

import torch

from myvllm.attention import ops
from myvllm.attention.backend import AttentionBackend, AttentionMetadata
from myvllm.kernels.triton_decode_attention import allocate_decode_workspace, default_num_splits


class TritonAttentionBackend(AttentionBackend):
    name = "triton"

    def __init__(self, num_heads: int, head_dim: int, max_num_seqs: int, max_model_len: int,
                 block_size: int, device: torch.device) -> None:
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.max_model_len = max_model_len
        self.block_size = block_size
        self.num_splits = default_num_splits(max_model_len, block_size)  # the most any batch uses
        self.num_sms = (torch.cuda.get_device_properties(device).multi_processor_count
                        if device.type == "cuda" else 0)  # 0: unknown
        self.device = device
        self._workspace_batch = 0
        self._ensure_workspace(max_num_seqs)

    def _ensure_workspace(self, batch: int) -> None:
        if batch > self._workspace_batch:
            self.partial_out, self.partial_lse = allocate_decode_workspace(
                batch, self.num_heads, self.head_dim, self.num_splits, self.device
            )
            self._workspace_batch = batch

    def init_graph_buffers(self, max_batch_size: int) -> None:
        self._ensure_workspace(max_batch_size)

    def store_kv(self, k, v, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None) -> None:
        ops.triton_store_kv(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)

    def forward(self, q, k_cache, v_cache, meta: AttentionMetadata, scale: float, k_scale=None,
                v_scale=None) -> torch.Tensor:
        if meta.is_decode_only:
            # Fewer splits when the batch alone fills the GPU (decided inside the op from B: graph-safe).
            return ops.triton_decode(q, k_cache, v_cache, meta.seq_lens, meta.block_tables, scale,
                                     self.partial_out, self.partial_lse, self.max_model_len, self.num_sms,
                                     k_scale, v_scale)
        return ops.triton_prefill(q, k_cache, v_cache, meta.query_start_loc, meta.seq_lens, meta.block_tables,
                                  meta.max_query_len, scale, k_scale, v_scale)
