"""Block-scaled FP8 GEMM in Triton: y = x @ W.T with W in float8_e4m3fn and one scale per
128 x 128 block, x quantized to fp8 per token and group of 128 features on the fly.

Two kernels, as in vLLM's `per_token_group_quant_fp8` + `w8a8_block_fp8_matmul`:
  - `per_token_group_quant`: x [M, K] -> q fp8 [M, K] and scales float32 [M, ceil(K / 128)],
    scale = amax(|group|) / 448 (the whole e4m3 range per group);
  - `block_fp8_matmul`: for each [BLOCK_M, BLOCK_N] tile of the output, over the K blocks,
    acc += dot(q_x, q_w) * x_scale[:, None] * w_scale[None, :] in float32 (BLOCK_K = block_k, so
    one K step meets one scale per row and per weight column), then cast to the output dtype.
The pure-torch oracle of both is kernels/reference_fp8.py (per_token_group_quant,
block_fp8_matmul). The last block of N or K may be ragged (masked loads, zero fill).

`block_fp8_tile` computes one output tile from base pointers and strides, so that a grouped
(MoE) GEMM over stacked expert weights [E, N, K] with scales [E, Nb, Kb] can call it with the
expert's offsets added to the weight and scale pointers.

Everything here is graph-safe: no host synchronisation, outputs allocated with torch.empty.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from myvllm.kernels.reference_fp8 import AMAX_EPS, FP8_DTYPE, FP8_MAX

ACT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MIN_CAPABILITY = (8, 9)  # fp8 tensor-core dot: Ada and Hopper onwards
QUANT_GROUPS_PER_PROGRAM = 4


def supports(device: torch.device, block_n: int, block_k: int, dtype: torch.dtype) -> str | None:
    """None when the kernels run for this device, block shape and activation dtype, else why not."""
    if device.type != "cuda":
        return f"device {device} is not CUDA"
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        return f"compute capability {capability} < {MIN_CAPABILITY} (no fp8 tensor-core dot)"
    if block_k < 16 or block_k & (block_k - 1):
        return f"weight block_k={block_k} is not a power of two >= 16"
    if block_n < 1:
        return f"weight block_n={block_n} is not positive"
    if dtype not in ACT_DTYPES:
        return f"activation dtype {dtype} not in {[str(d) for d in ACT_DTYPES]}"
    return None


@triton.jit
def _per_token_group_quant_kernel(
    x_ptr,  # [M, K], unit stride on K
    q_ptr,  # [M, K] fp8, contiguous
    s_ptr,  # [M, num_groups] float32, contiguous
    K,
    num_groups,
    stride_xm,
    GROUP: tl.constexpr,
    GROUPS: tl.constexpr,  # groups per program
    EPS: tl.constexpr,
    QMAX: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    groups = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)  # [G]
    cols = groups[:, None] * GROUP + tl.arange(0, GROUP)[None, :]  # [G, GROUP]
    mask = (cols < K) & (groups[:, None] < num_groups)
    x = tl.load(x_ptr + row * stride_xm + cols, mask=mask, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), axis=1), EPS) / QMAX  # [G]
    q = tl.clamp(x / scale[:, None], -QMAX, QMAX)
    tl.store(q_ptr + row * K + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + row * num_groups + groups, scale, mask=groups < num_groups)


def per_token_group_quant(x: torch.Tensor, group: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (unit stride on K) -> (q float8_e4m3fn [M, K], scales float32 [M, ceil(K / group)])."""
    m, k = x.shape
    if x.stride(1) != 1:
        raise ValueError(f"per_token_group_quant needs unit stride on K, got strides {x.stride()}")
    num_groups = triton.cdiv(k, group)
    q = torch.empty(m, k, dtype=FP8_DTYPE, device=x.device)
    s = torch.empty(m, num_groups, dtype=torch.float32, device=x.device)
    if m == 0:
        return q, s
    groups = min(QUANT_GROUPS_PER_PROGRAM, triton.next_power_of_2(num_groups))
    grid = (m, triton.cdiv(num_groups, groups))
    _per_token_group_quant_kernel[grid](x, q, s, k, num_groups, x.stride(0), GROUP=group, GROUPS=groups,
                                        EPS=AMAX_EPS, QMAX=FP8_MAX, num_warps=1 if groups == 1 else 2)
    return q, s


@triton.jit
def block_fp8_tile(
    a_ptr, a_scale_ptr, b_ptr, b_scale_ptr,
    offs_m,  # [BLOCK_M] int64 rows of A, all in range
    offs_n,  # [BLOCK_N] int64 rows of B (output columns), all in range
    K,
    stride_am, stride_asm, stride_bn, stride_bsn,
    WEIGHT_BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """float32 [BLOCK_M, BLOCK_N] tile of (A * a_scale) @ (B * b_scale).T: A [M, K] fp8 with scales
    [M, Kb] (unit stride on Kb), B [N, K] fp8 with scales [Nb, Kb] (unit stride on Kb), BLOCK_K the
    scales' group along K."""
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :]  # [BM, BK]
    b_ptrs = b_ptr + offs_n[None, :] * stride_bn + offs_k[:, None]  # [BK, BN]: W.T's tile
    as_ptrs = a_scale_ptr + offs_m * stride_asm  # [BM]
    bs_ptrs = b_scale_ptr + (offs_n // WEIGHT_BLOCK_N) * stride_bsn  # [BN]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - kb * BLOCK_K
        a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        a_s = tl.load(as_ptrs + kb)
        b_s = tl.load(bs_ptrs + kb)
        acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    return acc


@triton.jit
def _block_fp8_matmul_kernel(
    a_ptr, a_scale_ptr, b_ptr, b_scale_ptr, c_ptr,
    M, N, K,
    stride_am, stride_asm, stride_bn, stride_bsn, stride_cm,
    WEIGHT_BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # GROUP_M row tiles walk the columns together, so their weight tiles are reused from L2
    per_group = GROUP_M * num_pid_n
    first_m = (pid // per_group) * GROUP_M
    group_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    # out-of-range rows and columns read valid memory (wrapped) and are not stored
    acc = block_fp8_tile(a_ptr, a_scale_ptr, b_ptr, b_scale_ptr, rows % M, cols % N, K,
                         stride_am, stride_asm, stride_bn, stride_bsn,
                         WEIGHT_BLOCK_N, BLOCK_M, BLOCK_N, BLOCK_K)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    tl.store(c_ptr + rows[:, None] * stride_cm + cols[None, :], acc.to(c_ptr.dtype.element_ty), mask=mask)


# Below this many output columns a decode-sized GEMM takes the narrowest tiles, so that enough
# programs stream the weight (Qwen3-0.6B's o_proj and down_proj have 1024).
NARROW_N = 4096


def matmul_config(m: int, n: int) -> dict:
    """Tile sizes by the number of rows (and columns): narrow tiles and more of them at decode
    sizes, where the GEMM reads weights; wide tiles for prefill, where it computes."""
    if m <= 16:
        return dict(BLOCK_M=16, BLOCK_N=32 if n <= NARROW_N else 64, GROUP_M=1, num_warps=4, num_stages=4)
    if m <= 128:
        return dict(BLOCK_M=64, BLOCK_N=64, GROUP_M=1, num_warps=4, num_stages=4)
    if m <= 512:
        return dict(BLOCK_M=64, BLOCK_N=128, GROUP_M=8, num_warps=4, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=128, GROUP_M=8, num_warps=8, num_stages=3)


def block_fp8_matmul(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                     block_n: int, block_k: int, out_dtype: torch.dtype) -> torch.Tensor:
    """(xq [M, K] fp8, x_scale [M, ceil(K / block_k)]) @ (wq [N, K] fp8, w_scale [ceil(N / block_n),
    ceil(K / block_k)]).T -> [M, N] in out_dtype. Unit stride on K and on the scales' last dim."""
    m, k = xq.shape
    n = wq.shape[0]
    kb, nb = triton.cdiv(k, block_k), triton.cdiv(n, block_n)
    if wq.shape[1] != k or tuple(x_scale.shape) != (m, kb) or tuple(w_scale.shape) != (nb, kb):
        raise ValueError(f"block_fp8_matmul: shapes x {tuple(xq.shape)}, x_scale {tuple(x_scale.shape)}, "
                         f"w {tuple(wq.shape)}, w_scale {tuple(w_scale.shape)} do not fit blocks "
                         f"({block_n}, {block_k})")
    if xq.stride(1) != 1 or wq.stride(1) != 1 or x_scale.stride(1) != 1 or w_scale.stride(1) != 1:
        raise ValueError("block_fp8_matmul needs unit stride on K and on the scales' last dim")
    out = torch.empty(m, n, dtype=out_dtype, device=xq.device)
    if m == 0:
        return out
    cfg = matmul_config(m, n)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    _block_fp8_matmul_kernel[grid](xq, x_scale, wq, w_scale, out, m, n, k,
                                   xq.stride(0), x_scale.stride(0), wq.stride(0), w_scale.stride(0), out.stride(0),
                                   WEIGHT_BLOCK_N=block_n, BLOCK_K=block_k, **cfg)
    return out


def w8a8_block_linear(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, block_n: int,
                      block_k: int) -> torch.Tensor:
    """x [M, K] @ W.T -> [M, N] in x's dtype, x quantized per token group of block_k on the fly."""
    xq, xs = per_token_group_quant(x, block_k)
    return block_fp8_matmul(xq, xs, wq, w_scale, block_n, block_k, x.dtype)
