"""The attention backend protocol and the per-step metadata every backend reads.

`AttentionMetadata` is built by the model runner for each step and passed
explicitly down to every attention layer (no global context). A captured CUDA
graph holds one instance whose tensors are static buffers; replay copies the
step's values into them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int64; -1 = padding, write nothing
    block_tables: torch.Tensor  # [batch, max_blocks] int32
    seq_lens: torch.Tensor  # [batch] int32, cached + new tokens
    query_start_loc: torch.Tensor  # [batch + 1] int32, cumulative new tokens
    max_query_len: int
    max_seq_len: int
    logits_indices: torch.Tensor  # [num_sampled] int64, rows of the hidden states to sample
    is_decode_only: bool  # every sequence has exactly one new token
    backend_state: Any = None  # whatever the backend's prepare() derives

    @property
    def batch_size(self) -> int:
        return self.seq_lens.shape[0]


class AttentionBackend(ABC):
    """Stores the step's K/V in the paged cache and attends over each sequence's cache.

    Cache layout for all backends: [num_blocks, block_size, num_kv_heads, head_dim]
    for K and for V, slot = block_id * block_size + offset. The attention layer decides
    whether `store_kv` runs (layers/attention.py): a fused CUDA op may have written K/V already.

    An fp8 cache (float8_e4m3fn) holds K / k_scale and V / v_scale, with the layer's scales
    [num_kv_heads] float32 (one per KV head); `store_kv` quantizes and `forward` reads the values
    times their scales. Caches of the model's dtype ignore the scales. flash-attn reads no fp8
    cache (attention/selector.py never pairs them).
    """

    name: str = "abstract"

    def prepare(self, meta: AttentionMetadata) -> None:
        """Derive per-step state once per step (before the first layer runs)."""

    @abstractmethod
    def store_kv(
        self,
        k: torch.Tensor,  # [T, Hkv, D], unit stride on D
        v: torch.Tensor,  # [T, Hkv, D], unit stride on D
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,  # [T] int64, -1 = write nothing
        k_scale: torch.Tensor | None = None,  # [Hkv] float32, used by fp8 caches
        v_scale: torch.Tensor | None = None,
    ) -> None:
        """Write k and v into the caches at slot_mapping."""

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,  # [T, H, D]
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        k_scale: torch.Tensor | None = None,  # [Hkv] float32, used by fp8 caches
        v_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:  # [T, H, D]
        """Attend over the caches, which already hold this step's K/V."""

    def init_graph_buffers(self, max_batch_size: int) -> None:
        """Allocate whatever static state decode graphs of up to this batch size need."""

    def prepare_replay(self, meta: AttentionMetadata, padded_batch_size: int) -> None:
        """Refresh backend state in meta's static buffers before a graph replay."""
