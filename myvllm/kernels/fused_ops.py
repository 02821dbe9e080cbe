"""The fused elementwise ops of the Qwen3 decoder, behind one dispatch object.

The model runner builds one `FusedOps` for its device. On CUDA, when asked to and when the
kernels in `myvllm/kernels/cuda` build, the methods call the custom ops
`torch.ops.myvllm.*` (they work under CUDA graph capture and torch.compile); otherwise
they call the pure-torch functions of `myvllm.kernels.reference`. Both paths take the same
arguments and agree to within bf16 rounding (see the kernel sources).

Input contract of the CUDA path (all met by the Qwen3 model): weights in the activations'
dtype; float32, float16 or bfloat16 activations; positions int64; head_dim 64, 128 or 256;
cos_sin_cache in float32 or q's dtype; unit stride on the last dim (q and k may otherwise
be strided views of the packed qkv projection). Outputs are always new contiguous tensors.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from myvllm.kernels import reference
from myvllm.kernels.cuda.build import load_cuda_ops

Tensor = torch.Tensor


class FusedOps:
    """rms_norm, fused_add_rms_norm, qk_norm_rope and silu_and_mul for one device."""

    def __init__(self, use_cuda_kernels: bool, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.uses_cuda_kernels: bool = use_cuda_kernels and self.device.type == "cuda" and load_cuda_ops()
        self._rms_norm: Callable[[Tensor, Tensor, float], Tensor]
        self._fused_add_rms_norm: Callable[[Tensor, Tensor, Tensor, float], tuple[Tensor, Tensor]]
        self._qk_norm_rope: Callable[..., tuple[Tensor, Tensor]]
        self._qk_norm_rope_store: Callable[..., tuple[Tensor, Tensor]]
        self._silu_and_mul: Callable[[Tensor], Tensor]
        if self.uses_cuda_kernels:
            ops = torch.ops.myvllm
            self._rms_norm = ops.rms_norm.default
            self._fused_add_rms_norm = ops.fused_add_rms_norm.default
            self._qk_norm_rope = ops.qk_norm_rope.default
            self._qk_norm_rope_store = ops.qk_norm_rope_store.default
            self._silu_and_mul = ops.silu_and_mul.default
        else:
            self._rms_norm = reference.rms_norm
            self._fused_add_rms_norm = reference.fused_add_rms_norm
            self._qk_norm_rope = reference.qk_norm_rope
            self._qk_norm_rope_store = reference.qk_norm_rope_store
            self._silu_and_mul = reference.silu_and_mul

    def __repr__(self) -> str:
        backend = "cuda kernels" if self.uses_cuda_kernels else "torch reference"
        return f"FusedOps(device={self.device}, {backend})"

    def rms_norm(self, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        """RMSNorm of x [..., N] over N with weight [N]."""
        return self._rms_norm(x, weight, eps)

    def fused_add_rms_norm(
        self, x: Tensor, residual: Tensor, weight: Tensor, eps: float
    ) -> tuple[Tensor, Tensor]:
        """(rms_norm(x + residual), x + residual); the sum is rounded to x's dtype first."""
        return self._fused_add_rms_norm(x, residual, weight, eps)

    def qk_norm_rope(
        self,
        q: Tensor,
        k: Tensor,
        q_weight: Tensor,
        k_weight: Tensor,
        eps: float,
        positions: Tensor,
        cos_sin_cache: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """Per-head RMSNorm then neox rotary of q [T, H, D] and k [T, Hkv, D] at positions [T]."""
        return self._qk_norm_rope(q, k, q_weight, k_weight, eps, positions, cos_sin_cache)

    def qk_norm_rope_store(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        q_weight: Tensor,
        k_weight: Tensor,
        eps: float,
        positions: Tensor,
        cos_sin_cache: Tensor,
        k_cache: Tensor,
        v_cache: Tensor,
        slot_mapping: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """qk_norm_rope, and the step's K (normalised, rotated) and V written into the paged caches
        [num_blocks, block_size, Hkv, D] at slot_mapping [T] (slot -1: nothing)."""
        return self._qk_norm_rope_store(q, k, v, q_weight, k_weight, eps, positions, cos_sin_cache, k_cache,
                                        v_cache, slot_mapping)

    def silu_and_mul(self, x: Tensor) -> Tensor:
        """x [..., 2I] -> silu(x[..., :I]) * x[..., I:]."""
        return self._silu_and_mul(x)
