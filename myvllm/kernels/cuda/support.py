"""What each CUDA op of this folder accepts, stated in Python so that it is checked before an op
is chosen (`FusedOps.supports`): an argument outside these contracts never reaches a kernel.

Each function below takes the static properties of one op's arguments (sizes and dtypes, which
the model fixes when it is built) and returns None when the op takes them, else the reason it
does not, for the log. The layout invariants the model always meets (unit stride on the last
dim of q/k/v, contiguous KV caches, int64 positions and slots) are left to the ops' own checks,
which raise RuntimeError. `gemv_fits` is the matrix-vector kernel's per-call check (the number
of rows and the alignment change from step to step).
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Rows up to this many elements fit the norm kernel's register cache at any alignment (norm.cu).
NORM_MAX_HIDDEN = 8192
QK_HEAD_DIMS = (64, 128, 256)  # the head dims qk_norm_rope.cu is instantiated for
# The matrix-vector kernel beats cuBLAS over a decode step at one and two tokens, not past them
# (see docs/performance.md); it is instantiated for those row counts only (gemv.cu's kMaxRows).
GEMV_MAX_ROWS = 2
GEMV_MAX_STAGED_BYTES = 96 * 1024  # the rows of x it stages in shared memory (gemv.cu's kMaxSmem)


def _dtypes(dtypes: tuple[torch.dtype, ...]) -> str | None:
    if len(set(dtypes)) != 1:
        return f"mixed dtypes {sorted(map(str, set(dtypes)))}; the kernel takes one"
    if dtypes[0] not in FLOAT_DTYPES:
        return f"dtype {dtypes[0]} not in {[str(d) for d in FLOAT_DTYPES]}"
    return None


def rms_norm(hidden_size: int, dtypes: tuple[torch.dtype, ...]) -> str | None:
    """rms_norm and fused_add_rms_norm over rows of hidden_size; dtypes: x's (and residual's) and the weight's."""
    if not 1 <= hidden_size <= NORM_MAX_HIDDEN:
        return f"hidden size {hidden_size} not in [1, {NORM_MAX_HIDDEN}]"
    return _dtypes(dtypes)


def qk_norm_rope(head_dim: int, dtypes: tuple[torch.dtype, ...], cos_sin_dtype: torch.dtype) -> str | None:
    """qk_norm_rope and qk_norm_rope_store; dtypes: those of q, k and the norm weights (and, for the
    store, of v and the caches)."""
    if head_dim not in QK_HEAD_DIMS:
        return f"head_dim {head_dim} not in {list(QK_HEAD_DIMS)}"
    reason = _dtypes(dtypes)
    if reason is None and cos_sin_dtype not in (torch.float32, dtypes[0]):
        return f"cos_sin_cache dtype {cos_sin_dtype} is neither float32 nor {dtypes[0]}"
    return reason


def qk_norm_rope_store(head_dim: int, dtypes: tuple[torch.dtype, ...], cos_sin_dtype: torch.dtype) -> str | None:
    """qk_norm_rope_store; dtypes: those of the activations and the caches, which hold the
    activations' dtype or float8_e4m3fn (the op then quantizes with the layer's scales)."""
    return qk_norm_rope(head_dim, tuple(d for d in dtypes if d != torch.float8_e4m3fn), cos_sin_dtype)


def silu_and_mul(width: int, dtype: torch.dtype) -> str | None:
    """silu_and_mul of rows of width [gate, up] elements."""
    if width % 2 or width < 2:
        return f"width {width} is not a positive even number"
    return _dtypes((dtype,))


CHECKS = {
    "rms_norm": rms_norm,
    "fused_add_rms_norm": rms_norm,
    "qk_norm_rope": qk_norm_rope,
    "qk_norm_rope_store": qk_norm_rope_store,
    "silu_and_mul": silu_and_mul,
}


def gemv_fits(x: torch.Tensor, weight: torch.Tensor, silu: bool = False, norm_weight: torch.Tensor | None = None,
              residual: torch.Tensor | None = None) -> bool:
    """Whether torch.ops.myvllm.gemv / add_norm_gemv take x [rows, K], weight [N, K] and the optional norm
    weight [K] and residual [rows, K]: 1..GEMV_MAX_ROWS rows, one float dtype, 16-byte aligned rows and
    starts, a contiguous weight (with an even number of rows for silu), x within the staging buffer."""
    if x.dim() != 2 or weight.dim() != 2 or weight.dtype != x.dtype or x.dtype not in FLOAT_DTYPES:
        return False
    rows, k = x.shape
    n = weight.shape[0]
    vec = 16 // x.element_size()
    fits = (1 <= rows <= GEMV_MAX_ROWS and weight.shape[1] == k and weight.is_contiguous()
            and n >= (2 if silu else 1) and not (silu and n % 2)
            and k % vec == 0 and x.stride(1) == 1 and x.stride(0) % vec == 0
            and _aligned(x) and _aligned(weight)
            and rows * k * x.element_size() <= GEMV_MAX_STAGED_BYTES)
    if fits and norm_weight is not None:
        fits = (norm_weight.shape == (k,) and norm_weight.dtype == x.dtype and norm_weight.stride(0) == 1
                and _aligned(norm_weight))
    if fits and residual is not None:
        fits = (residual.shape == x.shape and residual.dtype == x.dtype and residual.stride(1) == 1
                and residual.stride(0) % vec == 0 and _aligned(residual))
    return fits


def _aligned(t: torch.Tensor) -> bool:
    """Whether t starts on a 16-byte boundary. Inside a torch.compile trace there is no address:
    there the operands are parameters and outputs of earlier ops (new allocations, aligned), and
    the kernel checks the address again when it runs."""
    return torch.compiler.is_compiling() or t.data_ptr() % 16 == 0
