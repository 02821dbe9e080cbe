// SwiGLU activation: x [T, 2I] -> silu(x[:, :I]) * x[:, I:], out of place.
//
// Numerics follow myvllm/kernels/reference.py: silu is evaluated in float32 as
// g / (1 + exp(-g)) (the formula torch uses) and rounded to the input dtype before the
// multiply, whose float32 product is rounded once more. exp and the division use the
// hardware approximations (__expf, __fdividef): their few-ulp float32 error is far below
// bf16/fp16 rounding (and < 1e-5 relative in float32), while the accurate sequences sit on
// the critical path of this latency-bound kernel at decode sizes.
// The limits stay right: g -> -inf gives g / inf = -0, g -> +inf gives g.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common.cuh"

namespace myvllm {
namespace {

constexpr int kThreads = 256;

// grid = (T, chunks of kThreads vectors): a single token still spreads over several SMs.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    silu_and_mul_kernel(T* __restrict__ out, const T* __restrict__ x, int64_t x_stride, int d) {
  using V = Vec<T, VEC>;
  const int64_t row = blockIdx.x;
  const V* gate = reinterpret_cast<const V*>(x + row * x_stride);
  const V* up = reinterpret_cast<const V*>(x + row * x_stride + d);
  V* o = reinterpret_cast<V*>(out + row * d);
  const int nvec = d / VEC;
  // Launched with launch_pdl (common.cuh): x comes from the kernel before.
  allow_dependent_launch();
  grid_dependency_wait();
  for (int idx = blockIdx.y * blockDim.x + threadIdx.x; idx < nvec; idx += gridDim.y * blockDim.x) {
    const V g = gate[idx], u = up[idx];
    V r;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      r.v[j] = static_cast<T>(silu_mul<T>(static_cast<float>(g.v[j]), static_cast<float>(u.v[j])));
    }
    o[idx] = r;
  }
}

template <typename T, int VEC>
void launch(T* out, const T* x, int64_t x_stride, int64_t rows, int d) {
  const int nvec = d / VEC;
  const int threads = std::min(kThreads, (nvec + 31) / 32 * 32);
  const dim3 grid(static_cast<unsigned>(rows), std::min((nvec + threads - 1) / threads, 65535));
  launch_pdl(silu_and_mul_kernel<T, VEC>, grid, dim3(threads), 0,
             c10::cuda::getCurrentCUDAStream(), out, x, x_stride, d);
}

}  // namespace

at::Tensor silu_and_mul(const at::Tensor& x) {
  MYVLLM_CHECK(x.is_cuda(), "silu_and_mul: x must be a CUDA tensor");
  MYVLLM_CHECK(x.dim() >= 1 && x.size(-1) % 2 == 0, "silu_and_mul: last dim of x must be even");
  const int64_t d = x.size(-1) / 2;
  MYVLLM_CHECK(d <= INT32_MAX, "silu_and_mul: last dim too large");
  const c10::cuda::CUDAGuard guard(x.device());
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = d;
  at::Tensor out = at::empty(out_shape, x.options());
  if (out.numel() == 0) return out;
  at::Tensor xr = x.dim() == 2 ? x : x.reshape({-1, 2 * d});
  if (xr.stride(1) != 1) xr = xr.contiguous();
  MYVLLM_DISPATCH_FLOATS(x.scalar_type(), "silu_and_mul", [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    const scalar_t* xp = xr.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    // The up half starts d elements into each row, so d itself must be a multiple of kVec.
    if (d % kVec == 0 && xr.stride(0) % kVec == 0 && aligned16(xp) && aligned16(op))
      launch<scalar_t, kVec>(op, xp, xr.stride(0), xr.size(0), static_cast<int>(d));
    else
      launch<scalar_t, 1>(op, xp, xr.stride(0), xr.size(0), static_cast<int>(d));
  });
  return out;
}

}  // namespace myvllm
