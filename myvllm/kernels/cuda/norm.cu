// RMSNorm and fused residual-add + RMSNorm over the last dim, out of place.
//
// Numerics follow myvllm/kernels/reference.py: all arithmetic is float32, and results are
// rounded to the input dtype at the same points as the reference (x + residual before the
// norm, x * rsqrt(var + eps) before the weight). Each such step is computed in float32 and
// rounded once, exactly as torch computes a bf16/fp16 elementwise op, so the only differences
// from the reference are the order of the variance reduction and rsqrtf's last bit.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <type_traits>

#include "common.cuh"

namespace myvllm {
namespace {

constexpr int kMaxThreads = 1024;

// Sum over the block; blockDim.x is a multiple of 32. Every thread gets the total. One
// barrier: each warp publishes its partial sum, then every warp reduces all partials itself.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float warp_sums[32];
  v = warp_sum(v);
  const int lane = threadIdx.x & 31;
  if (lane == 0) warp_sums[threadIdx.x >> 5] = v;
  __syncthreads();
  v = lane < static_cast<int>(blockDim.x >> 5) ? warp_sums[lane] : 0.f;
  return warp_sum(v);
}

// One block per row of n elements. Thread i handles vectors i, i + blockDim, ... (ITEMS of
// them) and keeps them in registers between the sum-of-squares pass and the output pass, so
// the row is read from memory once. The weight is loaded before the reduction too, so its
// latency overlaps the barrier. With ADD, the row is x + residual, which is also stored.
template <typename T, int VEC, int ITEMS, bool ADD>
__global__ void __launch_bounds__(kMaxThreads)
    rms_norm_kernel(T* __restrict__ out, T* __restrict__ res_out, const T* __restrict__ x,
                    const T* __restrict__ res, const T* __restrict__ weight, int64_t x_stride,
                    int64_t res_stride, int n, float eps) {
  using V = Vec<T, VEC>;
  const int nvec = n / VEC;
  const int64_t row = blockIdx.x;
  const V* xv = reinterpret_cast<const V*>(x + row * x_stride);

  const V* wv = reinterpret_cast<const V*>(weight);
  float vals[ITEMS][VEC];
  V w[ITEMS];
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int idx = threadIdx.x + i * blockDim.x;
    if (idx < nvec) w[i] = wv[idx];
  }
  // Launched with launch_pdl (common.cuh): the weight above may be read while the previous kernel
  // runs; x and the residual may not.
  allow_dependent_launch();
  grid_dependency_wait();
  float sumsq = 0.f;
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int idx = threadIdx.x + i * blockDim.x;
    if (idx >= nvec) break;
    const V a = xv[idx];
    if constexpr (ADD) {
      const V b = reinterpret_cast<const V*>(res + row * res_stride)[idx];
      V s;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        s.v[j] = static_cast<T>(static_cast<float>(a.v[j]) + static_cast<float>(b.v[j]));
        vals[i][j] = static_cast<float>(s.v[j]);
      }
      reinterpret_cast<V*>(res_out + row * n)[idx] = s;
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) vals[i][j] = static_cast<float>(a.v[j]);
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) sumsq += vals[i][j] * vals[i][j];
  }

  const float inv_rms = rsqrtf(block_sum(sumsq) / static_cast<float>(n) + eps);

  V* ov = reinterpret_cast<V*>(out + row * n);
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int idx = threadIdx.x + i * blockDim.x;
    if (idx >= nvec) break;
    V o;
#pragma unroll
    for (int j = 0; j < VEC; ++j)
      o.v[j] = static_cast<T>(static_cast<float>(w[i].v[j]) * round_to<T>(vals[i][j] * inv_rms));
    ov[idx] = o;
  }
}

template <typename T, int VEC, bool ADD>
void launch_vec(T* out, T* res_out, const T* x, const T* res, const T* w, int64_t x_stride,
                int64_t res_stride, int64_t rows, int n, float eps, cudaStream_t stream) {
  const int nvec = n / VEC;
  const int threads = std::min(kMaxThreads, (nvec + 31) / 32 * 32);
  const int items = (nvec + threads - 1) / threads;
  // 1024-thread blocks leave 64 registers per thread: rows of up to 16384 elements (all of
  // Qwen3) cache without spilling, longer ones up to 32768 (8192 when unaligned) spill a little.
  constexpr int kMaxItems = VEC <= 4 ? 8 : 4;
  MYVLLM_CHECK(items <= kMaxItems, "rms_norm: rows of %d elements are too long", n);
  const dim3 grid(static_cast<unsigned>(rows));
  auto run = [&](auto items_c) {
    launch_pdl(rms_norm_kernel<T, VEC, decltype(items_c)::value, ADD>, grid, dim3(threads), 0,
               stream, out, res_out, x, res, w, x_stride, res_stride, n, eps);
  };
  if (items == 1) run(std::integral_constant<int, 1>{});
  else if (items == 2) run(std::integral_constant<int, 2>{});
  else if (items <= 4) run(std::integral_constant<int, 4>{});
  else if constexpr (kMaxItems == 8) run(std::integral_constant<int, 8>{});
}

template <typename T, bool ADD>
void launch(T* out, T* res_out, const T* x, const T* res, const T* w, int64_t x_stride,
            int64_t res_stride, int64_t rows, int n, float eps) {
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  constexpr int kVec = 16 / sizeof(T);
  // 16-byte accesses need every row start 16-byte aligned; otherwise fall back to scalars.
  bool vec = n % kVec == 0 && x_stride % kVec == 0 && aligned16(x) && aligned16(w) &&
             aligned16(out);
  if constexpr (ADD) vec = vec && res_stride % kVec == 0 && aligned16(res) && aligned16(res_out);
  if (vec)
    launch_vec<T, kVec, ADD>(out, res_out, x, res, w, x_stride, res_stride, rows, n, eps, stream);
  else
    launch_vec<T, 1, ADD>(out, res_out, x, res, w, x_stride, res_stride, rows, n, eps, stream);
}

// [..., n] -> [rows, n] with unit stride on the last dim (a view whenever possible).
at::Tensor as_rows(const at::Tensor& t, int64_t n) {
  at::Tensor r = t.dim() == 2 ? t : t.reshape({-1, n});
  return r.stride(1) == 1 ? r : r.contiguous();
}

void check_inputs(const at::Tensor& x, const at::Tensor& weight) {
  MYVLLM_CHECK(x.is_cuda(), "rms_norm: x must be a CUDA tensor");
  MYVLLM_CHECK(x.dim() >= 1, "rms_norm: x must have at least one dim");
  MYVLLM_CHECK(weight.device() == x.device(), "rms_norm: weight must be on x's device");
  MYVLLM_CHECK(weight.scalar_type() == x.scalar_type(), "rms_norm: weight dtype %s differs from x dtype %s",
               dtype_name(weight.scalar_type()), dtype_name(x.scalar_type()));
  MYVLLM_CHECK(weight.dim() == 1 && weight.size(0) == x.size(-1), "rms_norm: weight must be [%lld]",
               static_cast<long long>(x.size(-1)));
  MYVLLM_CHECK(x.size(-1) <= INT32_MAX, "rms_norm: last dim too large");
}

}  // namespace

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_inputs(x, weight);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty(x.sizes(), x.options());
  const int64_t n = x.size(-1);
  if (out.numel() == 0) return out;
  const at::Tensor xr = as_rows(x, n);
  const at::Tensor w = weight.contiguous();
  MYVLLM_DISPATCH_FLOATS(x.scalar_type(), "rms_norm", [&] {
    launch<scalar_t, false>(out.data_ptr<scalar_t>(), nullptr, xr.const_data_ptr<scalar_t>(),
                            nullptr, w.const_data_ptr<scalar_t>(), xr.stride(0), 0, xr.size(0),
                            static_cast<int>(n), static_cast<float>(eps));
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> fused_add_rms_norm(const at::Tensor& x,
                                                      const at::Tensor& residual,
                                                      const at::Tensor& weight, double eps) {
  check_inputs(x, weight);
  MYVLLM_CHECK(residual.sizes() == x.sizes(), "fused_add_rms_norm: residual shape %s differs from x shape %s",
               ShapeText(residual.sizes()).text, ShapeText(x.sizes()).text);
  MYVLLM_CHECK(residual.device() == x.device() && residual.scalar_type() == x.scalar_type(),
              "fused_add_rms_norm: residual must match x's device and dtype");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty(x.sizes(), x.options());
  at::Tensor res_out = at::empty(x.sizes(), x.options());
  const int64_t n = x.size(-1);
  if (out.numel() == 0) return {out, res_out};
  const at::Tensor xr = as_rows(x, n);
  const at::Tensor rr = as_rows(residual, n);
  const at::Tensor w = weight.contiguous();
  MYVLLM_DISPATCH_FLOATS(x.scalar_type(), "fused_add_rms_norm", [&] {
    launch<scalar_t, true>(out.data_ptr<scalar_t>(), res_out.data_ptr<scalar_t>(),
                           xr.const_data_ptr<scalar_t>(), rr.const_data_ptr<scalar_t>(),
                           w.const_data_ptr<scalar_t>(), xr.stride(0), rr.stride(0), xr.size(0),
                           static_cast<int>(n), static_cast<float>(eps));
  });
  return {out, res_out};
}

}  // namespace myvllm
