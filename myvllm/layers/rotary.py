"""Rotary position embedding table (neox layout, as Qwen3 uses)."""

from __future__ import annotations

import torch
from torch import nn

from myvllm.kernels.reference import rotary_cos_sin_cache


class RotaryEmbedding(nn.Module):
    """Holds cos/sin for every position up to max_position: [max_position, head_dim] float32.

    One table serves every layer; the attention layer applies it together with the q/k norms
    (`FusedOps.qk_norm_rope`, or `qk_norm_rope_store`, which also writes the KV cache).
    """

    def __init__(self, head_dim: int, max_position: int, theta: float) -> None:
        super().__init__()
        cache = rotary_cos_sin_cache(head_dim, max_position, theta, torch.float32)
        self.register_buffer("cos_sin_cache", cache, persistent=False)
