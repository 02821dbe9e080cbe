// The staged matrix-vector kernel (a block's share of W in shared memory), launched by gemv.cu's
// launch_m where it applies. Included by gemv.cu only.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"
#include "gemv_stage_x.cuh"

namespace myvllm {
namespace {

// cp.async (sm_80+): 16 bytes from global to shared memory without passing through registers,
// cached in L2 only (the weights are read once a pass).
__device__ __forceinline__ void copy_async16(void* dst, const void* src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(s), "l"(src) : "memory");
#else
  *reinterpret_cast<int4*>(dst) = *reinterpret_cast<const int4*>(src);
#endif
}

// Waits for this thread's copy_async16 copies; a barrier then publishes every thread's.
__device__ __forceinline__ void wait_async_copies() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n\tcp.async.wait_group 0;" ::: "memory");
#endif
}

// The staged form, for when a block's share of W fits in shared memory (all four projections of
// Qwen3-0.6B): block b owns the contiguous output columns
// [b * cols_per_block, ...) and copies their weight rows (and, with SILU, the matching up rows)
// into shared memory with cp.async before it waits for the kernel before it. The copies hold no
// registers, so the block is small enough to be resident beside the blocks of the kernels before
// it; and it lets the next kernel launch at once (allow_dependent_launch first), so the weights
// of the next projections stream in while this one and the attention kernels run. What is left
// after the wait: staging x, and dot products out of shared memory.
template <typename T, int VEC, int M, int PRO, bool SILU>
__global__ void __launch_bounds__(kThreads)
    gemv_staged_kernel(T* __restrict__ out, T* __restrict__ res_out, const T* __restrict__ x,
                       int64_t x_stride, const T* __restrict__ residual, int64_t res_stride,
                       const T* __restrict__ w, const T* __restrict__ norm_w, float eps, int rows,
                       int n_out, int k, int cols_per_block) {
  using V = Vec<T, VEC>;
  constexpr int R = SILU ? 2 : 1;  // weight rows per column
  extern __shared__ __align__(16) unsigned char smem[];
  const int nvec = k / VEC;
  const int j0 = blockIdx.x * cols_per_block;
  const int cols = min(cols_per_block, n_out - j0);
  V* ws = reinterpret_cast<V*>(smem);  // [R][cols_per_block][nvec]
  T* xs = reinterpret_cast<T*>(ws + R * cols_per_block * nvec);  // [M][k]
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const V* src = reinterpret_cast<const V*>(w + (static_cast<int64_t>(r) * n_out + j0) * k);
    V* dst = ws + r * cols_per_block * nvec;
    for (int i = threadIdx.x; i < cols * nvec; i += kThreads) copy_async16(dst + i, src + i);
  }
  allow_dependent_launch();
  grid_dependency_wait();
  stage_x<T, VEC, M, PRO>(xs, x, x_stride, residual, res_stride, res_out, norm_w, eps, rows, k);
  wait_async_copies();
  __syncthreads();

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const V* xsv = reinterpret_cast<const V*>(xs);
  for (int c = warp; c < cols; c += kWarps) {
    float acc[R][M];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int m = 0; m < M; ++m) acc[r][m] = 0.f;
#pragma unroll 4
    for (int v = lane; v < nvec; v += 32) {
      V wv[R];
#pragma unroll
      for (int r = 0; r < R; ++r) wv[r] = ws[(r * cols_per_block + c) * nvec + v];
#pragma unroll
      for (int m = 0; m < M; ++m) {
        const V xv = xsv[m * nvec + v];
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
          for (int e = 0; e < VEC; ++e)
            acc[r][m] += static_cast<float>(wv[r].v[e]) * static_cast<float>(xv.v[e]);
      }
    }
    float y[R][M];
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
      for (int r = 0; r < R; ++r) y[r][m] = warp_sum(acc[r][m]);
    if (lane == 0) {
#pragma unroll
      for (int m = 0; m < M; ++m) {
        if (m < rows) {
          float v = round_to<T>(y[0][m]);  // the projection's output in T
          if constexpr (SILU) v = silu_mul<T>(v, round_to<T>(y[R - 1][m]));
          out[m * static_cast<int64_t>(n_out) + j0 + c] = static_cast<T>(v);
        }
      }
    }
  }
}

constexpr int kMaxStagedWeights = 112 * 1024;  // a block's share of W in the staged form

// Launches the staged form when it applies (with one block an SM, a block's share of W within
// kMaxStagedWeights); false if not.
template <typename T, int M, int PRO, bool SILU>
bool launch_staged(T* out, T* res_out, const T* x, int64_t x_stride, const T* residual,
                   int64_t res_stride, const T* w, const T* norm_w, float eps, int rows, int n_out,
                   int k) {
  constexpr int R = SILU ? 2 : 1;
  const int cols_per_block = ceil_div(n_out, num_sms());
  const int64_t weight_bytes = static_cast<int64_t>(R) * cols_per_block * k * sizeof(T);
  if (weight_bytes > kMaxStagedWeights) return false;
  constexpr int kVec = 16 / sizeof(T);
  auto* kernel = gemv_staged_kernel<T, kVec, M, PRO, SILU>;
  static const bool configured = [&] {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        kMaxStagedWeights + kMaxSmem));
    // Keep the SMs configured for the most shared memory, so that the next kernel's blocks
    // fit beside this one's without the SM draining to change its L1/shared split.
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                        cudaSharedmemCarveoutMaxShared));
    return true;
  }();
  (void)configured;
  const int smem = static_cast<int>(weight_bytes) + M * k * static_cast<int>(sizeof(T));
  launch_pdl(kernel, dim3(ceil_div(n_out, cols_per_block)), dim3(kThreads), smem,
             c10::cuda::getCurrentCUDAStream(), out, res_out, x, x_stride, residual, res_stride,
             w, norm_w, eps, rows, n_out, k, cols_per_block);
  return true;
}

}  // namespace
}  // namespace myvllm
