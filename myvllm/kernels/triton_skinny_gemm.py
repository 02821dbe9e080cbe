"""y = x @ W^T for a few rows of x (decode at small batch), in Triton.

At batch 1..16 a decoder's projections are matrix-vector products: the time is that of
reading W once. cuBLAS's kernels for these shapes read the Qwen3-0.6B projections at about
1.3 TB/s on an H100 (5-7 us for 4-12 MB, plus a split-K reduction for the down projection).
Here each program owns BLOCK_N rows of W and walks the whole K dimension with a deep
software pipeline (num_stages), so every SM streams its own slice of W; x (at most 16 rows,
padded to 16 for tl.dot) stays in registers per K tile. Accumulation is in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

MAX_ROWS = 16  # rows of x this kernel serves (the M of one tl.dot)


@dataclass(frozen=True)
class SkinnyConfig:
    block_n: int = 32
    block_k: int = 256
    num_warps: int = 4
    num_stages: int = 4


@triton.jit
def _skinny_gemm_kernel(
    x_ptr,  # [M, K]
    w_ptr,  # [N, K]
    y_ptr,  # [M, N]
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_ym,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    x_rows = x_ptr + offs_m[:, None] * stride_xm
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in tl.range(0, K, BLOCK_K, num_stages=NUM_STAGES):
        k_mask = k + offs_k < K
        x = tl.load(x_rows + (k + offs_k)[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_rows + (k + offs_k)[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc=acc)
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


# Measured best per (N, K) on an H100 (benchmarks/gemm_microbench.py); others take the default.
TUNED: dict[tuple[int, int], SkinnyConfig] = {}


def config_for(n: int, k: int) -> SkinnyConfig:
    return TUNED.get((n, k), SkinnyConfig())


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, config: SkinnyConfig | None = None) -> torch.Tensor:
    """x [M, K] @ weight [N, K]^T -> [M, N] in x's dtype, for 1 <= M <= MAX_ROWS (fp16/bf16)."""
    m, k = x.shape
    n = weight.shape[0]
    config = config or config_for(n, k)
    assert 1 <= m <= MAX_ROWS and weight.shape[1] == k and x.dtype == weight.dtype
    assert x.stride(1) == 1 and weight.stride(1) == 1
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    _skinny_gemm_kernel[(triton.cdiv(n, config.block_n),)](
        x, weight, y, m, n, k, x.stride(0), weight.stride(0), y.stride(0),
        BLOCK_M=MAX_ROWS, BLOCK_N=config.block_n, BLOCK_K=config.block_k, NUM_STAGES=config.num_stages,
        num_warps=config.num_warps,
    )
    return y
