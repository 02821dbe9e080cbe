"""The fused ops of the Qwen3 decoder, behind one dispatch object.

The model runner builds one `FusedOps` for its device. On CUDA, when asked to and when the
kernels in `myvllm/kernels/cuda` build, the methods call the custom ops
`torch.ops.myvllm.*` (they work under CUDA graph capture and torch.compile); otherwise
they call the pure-torch functions of `myvllm.kernels.reference`. Both paths take the same
arguments and agree to within bf16 rounding (see the kernel sources).

Input contract of the CUDA path (all met by the Qwen3 model): weights in the activations'
dtype; float32, float16 or bfloat16 activations; positions int64; head_dim 64, 128 or 256;
cos_sin_cache in float32 or q's dtype; unit stride on the last dim (q and k may otherwise
be strided views of the packed qkv projection). Outputs are always new contiguous tensors.

The projections (`linear`, `norm_linear`, `add_norm_linear`) use the CUDA matrix-vector
kernel, with the norm (and residual add, and SiLU) fused in, for up to GEMV_ROWS tokens
whose operands fit its contract (`gemv_fits`); otherwise the norm kernel and cuBLAS.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from myvllm.kernels import reference
from myvllm.kernels.cuda.build import load_cuda_ops

Tensor = torch.Tensor

GEMV_MAX_ROWS = 8  # the most tokens the matrix-vector kernel takes
# Tokens up to which FusedOps uses it instead of cuBLAS: the four projections of a Qwen3-0.6B
# layer take 1.75x less time at one token, 1.36x at two, 1.09x at four, and 1.7x more at eight;
# the final norm + LM head take as long as the norm kernel + cuBLAS at one token, 1.09x as long
# at two and 2.7x at four (benchmarks/gemv_microbench.py on an H200; docs/performance.md).
GEMV_ROWS = 2
GEMV_MAX_STAGED_BYTES = 96 * 1024  # the kernel stages x (rows padded to 1/2/4/8) in shared memory


def gemv_fits(x: Tensor, weight: Tensor) -> bool:
    """Whether torch.ops.myvllm.gemv / add_norm_gemv take x [rows, K] and weight [N, K]:
    1..GEMV_MAX_ROWS rows, 16-byte aligned rows, one dtype, a contiguous weight."""
    if x.dim() != 2 or weight.dim() != 2 or weight.dtype != x.dtype or not weight.is_contiguous():
        return False
    rows, k = x.shape
    vec = 16 // x.element_size()
    padded_rows = 1 << (rows - 1).bit_length() if rows > 0 else 0
    return (1 <= rows <= GEMV_MAX_ROWS and k % vec == 0 and x.stride(1) == 1 and x.stride(0) % vec == 0
            and x.data_ptr() % 16 == 0 and weight.data_ptr() % 16 == 0
            and padded_rows * k * x.element_size() <= GEMV_MAX_STAGED_BYTES)


class FusedOps:
    """Norms, q/k norm + rotary, SiLU and the projections for one device."""

    def __init__(self, use_cuda_kernels: bool, device: torch.device | str, gemv_max_rows: int = GEMV_ROWS) -> None:
        """gemv_max_rows: the most tokens sent to the matrix-vector kernel (0: cuBLAS always;
        at most GEMV_MAX_ROWS)."""
        self.device = torch.device(device)
        self.uses_cuda_kernels: bool = use_cuda_kernels and self.device.type == "cuda" and load_cuda_ops()
        self.gemv_max_rows = min(gemv_max_rows, GEMV_MAX_ROWS)
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

    def _gemv_fits(self, x: Tensor, weight: Tensor, *others: Tensor) -> bool:
        return (self.uses_cuda_kernels and x.shape[0] <= self.gemv_max_rows and gemv_fits(x, weight)
                and all(t.stride(-1) == 1 and t.data_ptr() % 16 == 0 for t in others))

    def linear(self, x: Tensor, weight: Tensor) -> Tensor:
        """x [T, K] @ weight.T -> [T, N]."""
        if self._gemv_fits(x, weight):
            return torch.ops.myvllm.gemv.default(x, weight, None, 0.0, False)
        return F.linear(x, weight)

    def norm_linear(self, x: Tensor, norm_weight: Tensor, eps: float, weight: Tensor, silu: bool = False) -> Tensor:
        """rms_norm(x) @ weight.T [T, N], then silu_and_mul ([T, N/2]) when silu."""
        if self._gemv_fits(x, weight, norm_weight):
            return torch.ops.myvllm.gemv.default(x, weight, norm_weight, eps, silu)
        out = F.linear(self.rms_norm(x, norm_weight, eps), weight)
        return self.silu_and_mul(out) if silu else out

    def add_norm_linear(
        self, x: Tensor, residual: Tensor, norm_weight: Tensor, eps: float, weight: Tensor, silu: bool = False
    ) -> tuple[Tensor, Tensor]:
        """(norm_linear(x + residual, ...), x + residual); the sum is rounded to x's dtype first."""
        if self._gemv_fits(x, weight, norm_weight, residual) and residual.shape == x.shape and \
                residual.stride(0) % (16 // x.element_size()) == 0:
            return torch.ops.myvllm.add_norm_gemv.default(x, residual, weight, norm_weight, eps, silu)
        hidden, residual = self.fused_add_rms_norm(x, residual, norm_weight, eps)
        out = F.linear(hidden, weight)
        return (self.silu_and_mul(out) if silu else out), residual
