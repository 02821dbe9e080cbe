// Helpers shared by the kernels in this folder.
#pragma once

#include <ATen/Dispatch.h>
#include <c10/core/ScalarType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <utility>

// float32, float16 and bfloat16 only (no double: it would just double the build time).
#define MYVLLM_DISPATCH_FLOATS(TYPE, NAME, ...)                  \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                 \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)   \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)    \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace myvllm {

// The argument checks of this library's ops: MYVLLM_CHECK(cond, printf-format, args...) raises
// the RuntimeError TORCH_CHECK raises, with the message formatted on the stack. A TORCH_CHECK
// whose message has arguments builds a std::string here, and such a failed check ended the
// process (a segmentation fault) on the H200 where a plain-string one raised; this form makes
// no std::string and no iostream on this side. Arguments: ints as long long, strings as
// const char* (dtype_name, ShapeText).
[[noreturn]] __attribute__((noinline, format(printf, 4, 5))) inline void check_failed(
    const char* func, const char* file, int line, const char* format, ...) {
  char message[512];
  va_list args;
  va_start(args, format);
  std::vsnprintf(message, sizeof(message), format, args);
  va_end(args);
  ::c10::detail::torchCheckFail(func, file, static_cast<uint32_t>(line), message);
}

#define MYVLLM_CHECK(cond, ...)                                                     \
  do {                                                                              \
    if (C10_UNLIKELY(!(cond))) ::myvllm::check_failed(__func__, __FILE__, __LINE__, __VA_ARGS__); \
  } while (0)

inline const char* dtype_name(c10::ScalarType t) { return c10::toString(t); }

// A shape as text ("[3, 64]") in a buffer of its own, for MYVLLM_CHECK messages.
struct ShapeText {
  char text[96];
  explicit ShapeText(c10::IntArrayRef sizes) {
    int used = std::snprintf(text, sizeof(text), "[");
    for (size_t i = 0; i < sizes.size() && used < static_cast<int>(sizeof(text)); ++i)
      used += std::snprintf(text + used, sizeof(text) - used, i ? ", %lld" : "%lld",
                            static_cast<long long>(sizes[i]));
    if (used < static_cast<int>(sizeof(text))) std::snprintf(text + used, sizeof(text) - used, "]");
  }
};

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

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Programmatic dependent launch (PDL, sm_90+). A kernel launched by launch_pdl may be scheduled
// while the kernels before it in the stream are still running. Its contract:
//   - it calls allow_dependent_launch() first, so the next kernel may be scheduled as soon as
//     all of this one's blocks have started: a chain of such kernels has several resident at
//     once (as many as fit), each held in grid_dependency_wait() until the one before it has
//     finished, which that one only does after its own wait, so every kernel before it has too;
//   - before grid_dependency_wait() it reads only what no kernel of the chain writes (weights,
//     constants, step inputs copied in before the forward) and writes nothing.
// Letting the next kernel start early pays at one token, where a layer is a chain of short
// kernels: their launch and their weight reads leave the critical path (docs/performance.md).
// Both are no-ops in a kernel launched without the attribute (or below sm_90).
__device__ __forceinline__ void grid_dependency_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void allow_dependent_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}

// Hopper and later; read once (one process drives one GPU here).
inline bool supports_pdl() {
  static const bool supported = [] {
    int device = 0, major = 0;
    C10_CUDA_CHECK(cudaGetDevice(&device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    return major >= 9;
  }();
  return supported;
}

// Streaming multiprocessors of the current device; read once, like supports_pdl.
inline int num_sms() {
  static const int count = [] {
    int device = 0, sms = 0;
    C10_CUDA_CHECK(cudaGetDevice(&device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    return sms;
  }();
  return count;
}

// kernel<<<grid, block, smem, stream>>>(args...) with the PDL attribute where supported
// (captured into CUDA graphs as a programmatic edge).
template <typename... Params, typename... Args>
void launch_pdl(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                Args&&... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute pdl;
  pdl.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  pdl.val.programmaticStreamSerializationAllowed = 1;
  config.attrs = &pdl;
  config.numAttrs = supports_pdl() ? 1 : 0;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...));
}

}  // namespace myvllm
