"""The fused ops of the Qwen3 decoder, behind one dispatch object.

The model runner builds one `FusedOps` for its device. A method calls the CUDA op
`torch.ops.myvllm.*` when the kernels are loaded (CUDA, asked for, built) and the op takes
the arguments (`supports`, checked before the op is chosen; kernels/cuda/support.py states
each op's contract); otherwise the pure-torch function of `myvllm.kernels.reference`. Both
take the same arguments and agree to within bf16 rounding (see the kernel sources); the CUDA
ops work under CUDA graph capture. Outputs are always new contiguous tensors.

The projections (`linear`, `norm_linear`, `add_norm_linear`) use the matrix-vector kernel,
with the norm (and residual add, and SiLU) fused in, for up to GEMV_MAX_ROWS tokens whose
operands fit its contract (`gemv_fits`); otherwise the norm kernel and cuBLAS.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from myvllm.kernels import reference
from myvllm.kernels.cuda import support
from myvllm.kernels.cuda.build import load_cuda_ops
from myvllm.kernels.cuda.support import gemv_fits

logger = logging.getLogger(__name__)

Tensor = torch.Tensor
KERNELS = (*support.CHECKS, "gemv", "add_norm_gemv")  # the ops of torch.ops.myvllm


class FusedOps:
    """Norms, q/k norm + rotary (+ KV store), SiLU and the projections for one device."""

    def __init__(self, use_cuda_kernels: bool, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.uses_cuda_kernels: bool = use_cuda_kernels and self.device.type == "cuda" and load_cuda_ops()
        # op name -> its torch.ops.myvllm overload, looked up once
        self._kernel = {op: getattr(torch.ops.myvllm, op).default for op in KERNELS} if self.uses_cuda_kernels else {}
        self._decided: dict[tuple, bool] = {}
        self._refused: set[tuple[str, str]] = set()

    def __repr__(self) -> str:
        backend = "cuda kernels" if self.uses_cuda_kernels else "torch reference"
        return f"FusedOps(device={self.device}, {backend})"

    def supports(self, op: str, *args) -> bool:
        """Whether op's CUDA kernel runs for these static arguments (those of support.CHECKS[op]).

        False without the kernels. Decided once per argument set; each (op, reason) it refuses
        is logged once, at INFO, and the op then runs as the torch reference.
        """
        key = (op, *args)
        ok = self._decided.get(key)
        if ok is None:
            reason = support.CHECKS[op](*args) if self.uses_cuda_kernels else "no CUDA kernels"
            ok = reason is None
            if self.uses_cuda_kernels and not ok and (op, reason) not in self._refused:
                self._refused.add((op, reason))
                logger.info("%s: CUDA kernel not used (%s); running the torch reference instead", op, reason)
            self._decided[key] = ok
        return ok

    def rms_norm(self, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        """RMSNorm of x [..., N] over N with weight [N]."""
        if self.supports("rms_norm", x.shape[-1], (x.dtype, weight.dtype)):
            return self._kernel["rms_norm"](x, weight, eps)
        return reference.rms_norm(x, weight, eps)

    def fused_add_rms_norm(self, x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        """(rms_norm(x + residual), x + residual); the sum is rounded to x's dtype first."""
        if self.supports("fused_add_rms_norm", x.shape[-1], (x.dtype, residual.dtype, weight.dtype)):
            return self._kernel["fused_add_rms_norm"](x, residual, weight, eps)
        return reference.fused_add_rms_norm(x, residual, weight, eps)

    def qk_norm_rope(self, q: Tensor, k: Tensor, q_weight: Tensor, k_weight: Tensor, eps: float,
                     positions: Tensor, cos_sin_cache: Tensor) -> tuple[Tensor, Tensor]:
        """Per-head RMSNorm then neox rotary of q [T, H, D] and k [T, Hkv, D] at positions [T]."""
        dtypes = (q.dtype, k.dtype, q_weight.dtype, k_weight.dtype)
        if self.supports("qk_norm_rope", q.shape[-1], dtypes, cos_sin_cache.dtype):
            return self._kernel["qk_norm_rope"](q, k, q_weight, k_weight, eps, positions, cos_sin_cache)
        return reference.qk_norm_rope(q, k, q_weight, k_weight, eps, positions, cos_sin_cache)

    def qk_norm_rope_store(self, q: Tensor, k: Tensor, v: Tensor, q_weight: Tensor, k_weight: Tensor, eps: float,
                           positions: Tensor, cos_sin_cache: Tensor, k_cache: Tensor, v_cache: Tensor,
                           slot_mapping: Tensor, k_scale: Tensor | None = None,
                           v_scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """qk_norm_rope, and the step's K (normalised, rotated) and V written into the paged caches
        [num_blocks, block_size, Hkv, D] at slot_mapping [T] (slot -1: nothing); fp8 caches get
        K / k_scale and V / v_scale ([Hkv] float32), as reference.quantize_kv."""
        dtypes = (q.dtype, k.dtype, v.dtype, q_weight.dtype, k_weight.dtype, k_cache.dtype, v_cache.dtype)
        args = (q, k, v, q_weight, k_weight, eps, positions, cos_sin_cache, k_cache, v_cache, slot_mapping,
                k_scale, v_scale)
        if self.supports("qk_norm_rope_store", q.shape[-1], dtypes, cos_sin_cache.dtype):
            return self._kernel["qk_norm_rope_store"](*args)
        return reference.qk_norm_rope_store(*args)

    def silu_and_mul(self, x: Tensor) -> Tensor:
        """x [..., 2I] -> silu(x[..., :I]) * x[..., I:]."""
        if self.supports("silu_and_mul", x.shape[-1], x.dtype):
            return self._kernel["silu_and_mul"](x)
        return reference.silu_and_mul(x)

    def linear(self, x: Tensor, weight: Tensor) -> Tensor:
        """x [T, K] @ weight.T -> [T, N]."""
        if self.uses_cuda_kernels and gemv_fits(x, weight):
            return self._kernel["gemv"](x, weight, None, 0.0, False)
        return F.linear(x, weight)

    def norm_linear(self, x: Tensor, norm_weight: Tensor, eps: float, weight: Tensor, silu: bool = False) -> Tensor:
        """rms_norm(x) @ weight.T [T, N], then silu_and_mul ([T, N/2]) when silu."""
        if self.uses_cuda_kernels and gemv_fits(x, weight, silu, norm_weight):
            return self._kernel["gemv"](x, weight, norm_weight, eps, silu)
        out = F.linear(self.rms_norm(x, norm_weight, eps), weight)
        return self.silu_and_mul(out) if silu else out

    def add_norm_linear(self, x: Tensor, residual: Tensor, norm_weight: Tensor, eps: float, weight: Tensor,
                        silu: bool = False) -> tuple[Tensor, Tensor]:
        """(norm_linear(x + residual, ...), x + residual); the sum is rounded to x's dtype first."""
        if self.uses_cuda_kernels and gemv_fits(x, weight, silu, norm_weight, residual):
            return self._kernel["add_norm_gemv"](x, residual, weight, norm_weight, eps, silu)
        hidden, residual = self.fused_add_rms_norm(x, residual, norm_weight, eps)
        out = F.linear(hidden, weight)
        return (self.silu_and_mul(out) if silu else out), residual
