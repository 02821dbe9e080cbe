// The pieces both matrix-vector kernels of gemv.cu share: block shape, limits, and staging
// x (with the norm prologue) in shared memory. Included by gemv.cu only.
#pragma once

#include <cstdint>

#include "common.cuh"

namespace myvllm {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
// Rows of x; M (the kernel's row count) is the number of rows, 1 or 2: past two tokens the
// kernel no longer pays over a decode step, the LM head above all (see docs/performance.md),
// so larger M are not instantiated.
constexpr int kMaxRows = 2;
constexpr int kMaxSmem = 96 * 1024;  // staged x: M * K * sizeof(T) bytes (opted in past 48 KB)

inline int ceil_div(int a, int b) { return (a + b - 1) / b; }

enum Prologue : int { kCopy = 0, kNorm = 1, kAddNorm = 2 };

// Stage x (rows < `rows`, zeros above) in xs [M, K] as the prologue PRO sees it. With kAddNorm
// the sum s = x + residual is what is normalised; block 0 writes it to res_out.
template <typename T, int VEC, int M, int PRO>
__device__ __forceinline__ void stage_x(T* __restrict__ xs, const T* __restrict__ x,
                                        int64_t x_stride, const T* __restrict__ residual,
                                        int64_t res_stride, T* __restrict__ res_out,
                                        const T* __restrict__ norm_w, float eps, int rows,
                                        int k) {
  using V = Vec<T, VEC>;
  const int nvec = k / VEC;
  V* xsv = reinterpret_cast<V*>(xs);
  float sumsq[M];
#pragma unroll
  for (int m = 0; m < M; ++m) sumsq[m] = 0.f;
  // Vector c of all M rows per step: the M loads are in flight together.
  for (int c = threadIdx.x; c < nvec; c += kThreads) {
#pragma unroll
    for (int m = 0; m < M; ++m) {
      V a;
      if (m < rows) {
        a = reinterpret_cast<const V*>(x + m * x_stride)[c];
        if constexpr (PRO == kAddNorm) {
          const V b = reinterpret_cast<const V*>(residual + m * res_stride)[c];
#pragma unroll
          for (int e = 0; e < VEC; ++e)
            a.v[e] = static_cast<T>(static_cast<float>(a.v[e]) + static_cast<float>(b.v[e]));
          if (blockIdx.x == 0) reinterpret_cast<V*>(res_out + m * static_cast<int64_t>(k))[c] = a;
        }
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e) a.v[e] = static_cast<T>(0.f);
      }
      if constexpr (PRO != kCopy) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) sumsq[m] += static_cast<float>(a.v[e]) * static_cast<float>(a.v[e]);
      }
      xsv[m * nvec + c] = a;
    }
  }
  if constexpr (PRO != kCopy) {
    // Block sums of the M rows' squares; each thread then rescales the entries it staged.
    __shared__ float partial[kWarps][M];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll
    for (int m = 0; m < M; ++m) {
      const float s = warp_sum(sumsq[m]);
      if (lane == 0) partial[warp][m] = s;
    }
    __syncthreads();
    float inv_rms[M];
#pragma unroll
    for (int m = 0; m < M; ++m) {
      float total = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) total += partial[w][m];
      inv_rms[m] = rsqrtf(total / static_cast<float>(k) + eps);
    }
    const V* wv = reinterpret_cast<const V*>(norm_w);
    for (int c = threadIdx.x; c < nvec; c += kThreads) {
      const V g = wv[c];
#pragma unroll
      for (int m = 0; m < M; ++m) {
        V a = xsv[m * nvec + c];
#pragma unroll
        for (int e = 0; e < VEC; ++e)
          a.v[e] = static_cast<T>(static_cast<float>(g.v[e]) *
                                  round_to<T>(static_cast<float>(a.v[e]) * inv_rms[m]));
        xsv[m * nvec + c] = a;
      }
    }
  }
  __syncthreads();
}

}  // namespace
}  // namespace myvllm
