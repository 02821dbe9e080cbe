// Helpers shared by the kernels in this folder.
#pragma once

#include <ATen/Dispatch.h>

// float32, float16 and bfloat16 only (no double: it would just double the build time).
#define MYVLLM_DISPATCH_FLOATS(TYPE, NAME, ...)                  \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                 \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)   \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)    \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace myvllm {

// Round a float32 value to T and back: the rounding torch applies between two ops in T.
template <typename T>
__device__ __forceinline__ float round_to(float v) {
  return static_cast<float>(static_cast<T>(v));
}

// VEC elements of T moved as one 16-byte (or narrower) memory access.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

// Sum over the 32 lanes of a warp; every lane gets the total.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// silu(gate) * up as silu_and_mul computes it (see activation.cu): silu in float32, rounded to T
// before the multiply. __expf / __fdividef: a few ulp of float32, far below T's rounding.
template <typename T>
__device__ __forceinline__ float silu_mul(float gate, float up) {
  return round_to<T>(__fdividef(gate, 1.f + __expf(-gate))) * up;
}

}  // namespace myvllm
