// Per-head RMSNorm of q and k followed by neox-style rotary embedding, out of place.
//
// q [T, H, D] and k [T, Hkv, D] may be strided views of the packed qkv projection output
// (unit stride on D only); q_out and k_out are contiguous. One warp per (token, head) row:
// lane l owns the rotary pairs (j, j + D/2) for j = l, l + 32, ..., so every load and store
// instruction of the warp touches 32 consecutive elements.
//
// qk_norm_rope_store also writes the step's K (normalised and rotated) and V rows into the
// paged caches [num_blocks, block_size, Hkv, D] at slot_mapping (slot -1: nothing), saving the
// separate KV-store kernel: the grid gets Hkv more warps per token, which copy V. An fp8
// (e4m3) cache gets value / scale (one float32 scale per KV head), rounded to nearest even and
// saturated to +-448 (cvt.rn.satfinite), as kernels/reference.py's quantize_kv: K as the
// normalised, rotated row rounded to the input dtype (the k_out row), V as it comes.
//
// Numerics follow myvllm/kernels/reference.py: float32 arithmetic, rounded to the input
// dtype where the reference rounds (normalised x, x * weight, cos/sin cast to the input
// dtype, each rotary product, the rotary sum). Each step is computed in float32 and rounded
// once, as torch computes a bf16/fp16 elementwise op, so the kernel differs from the
// reference only through the variance reduction order and rsqrtf's last bit. (Keeping
// float32 throughout would be marginally more accurate but would drift from the reference,
// and from transformers' Qwen3, by an ulp here and there.)
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_fp8.h>

#include <cstdint>
#include <optional>
#include <initializer_list>
#include <tuple>
#include <type_traits>

#include "common.cuh"

namespace myvllm {
namespace {

constexpr int kWarpsPerBlock = 8;

// Where qk_norm_rope_store puts the step's K and V (all null for plain qk_norm_rope); kFp8:
// the caches hold e4m3 values of value / scale.
template <typename T, bool kFp8>
struct KVStore {
  using Cache = std::conditional_t<kFp8, __nv_fp8_storage_t, T>;
  const T* v = nullptr;
  int64_t v_stride_t = 0, v_stride_h = 0;
  Cache* k_cache = nullptr;  // [num_blocks, block_size, Hkv, D], contiguous
  Cache* v_cache = nullptr;
  const int64_t* slot_mapping = nullptr;
  const float* k_scale = nullptr;  // [Hkv] float32, fp8 caches only
  const float* v_scale = nullptr;
};

// x as a cache element: itself, or for an fp8 cache e4m3(x / scale), saturated.
template <bool kFp8, typename T>
__device__ __forceinline__ auto to_cache(T x, float scale) {
  if constexpr (kFp8) {
    return __nv_cvt_float_to_fp8(static_cast<float>(x) / scale, __NV_SATFINITE, __NV_E4M3);
  } else {
    return x;
  }
}

// T: q/k dtype, C: cos/sin cache dtype (T or float), D: head dim, kStore: also fill the caches,
// kFp8: they are e4m3.
template <typename T, typename C, int D, bool kStore, bool kFp8>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    qk_norm_rope_kernel(T* __restrict__ q_out, T* __restrict__ k_out, const T* __restrict__ q,
                        const T* __restrict__ k, const T* __restrict__ q_weight,
                        const T* __restrict__ k_weight, const int64_t* __restrict__ positions,
                        const C* __restrict__ cos_sin_cache, int64_t q_stride_t, int64_t q_stride_h,
                        int64_t k_stride_t, int64_t k_stride_h, int64_t num_tokens, int num_heads,
                        int num_kv_heads, float eps, KVStore<T, kFp8> store) {
  constexpr int kHalf = D / 2;
  constexpr int kPairs = kHalf / 32;  // rotary pairs per lane
  const int heads = num_heads + num_kv_heads * (kStore ? 2 : 1);
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  if (row >= num_tokens * heads) return;  // whole warps exit together: no shuffle hazard
  const int lane = threadIdx.x & 31;
  const int64_t t = row / heads;
  const int h = static_cast<int>(row % heads);
  // Launched with launch_pdl (common.cuh): positions, slots, weights and cos/sin are read while
  // the previous kernel (the qkv projection) may still run; q, k and v only after it ends.
  const int64_t slot = kStore ? store.slot_mapping[t] : -1;
  if (kStore && h >= num_heads + num_kv_heads) {  // a V row: copy it into the cache
    if (slot < 0) return;
    const int kvh = h - num_heads - num_kv_heads;
    const T* src = store.v + t * store.v_stride_t + kvh * store.v_stride_h;
    auto* dst = store.v_cache + (slot * num_kv_heads + kvh) * D;
    const float scale = kFp8 ? store.v_scale[kvh] : 1.f;  // set at start-up: read before the wait
    allow_dependent_launch();
    grid_dependency_wait();
#pragma unroll
    for (int j = lane; j < D; j += 32) dst[j] = to_cache<kFp8>(src[j], scale);
    return;
  }

  const bool is_q = h < num_heads;
  const T* src = is_q ? q + t * q_stride_t + h * q_stride_h
                      : k + t * k_stride_t + (h - num_heads) * k_stride_h;
  T* dst = is_q ? q_out + (t * num_heads + h) * D
                : k_out + (t * num_kv_heads + (h - num_heads)) * D;
  const T* weight = is_q ? q_weight : k_weight;
  const float k_scale = kFp8 && !is_q ? store.k_scale[h - num_heads] : 1.f;

  // Issue every load (weight, cos/sin, then x) before the reduction so their latencies overlap.
  const C* cs = cos_sin_cache + positions[t] * D;  // cos in [0, D/2), sin in [D/2, D)
  float x1[kPairs], x2[kPairs], w1[kPairs], w2[kPairs], c[kPairs], s[kPairs];
#pragma unroll
  for (int p = 0; p < kPairs; ++p) {
    const int j = lane + 32 * p;
    w1[p] = static_cast<float>(weight[j]);
    w2[p] = static_cast<float>(weight[kHalf + j]);
    c[p] = round_to<T>(static_cast<float>(cs[j]));
    s[p] = round_to<T>(static_cast<float>(cs[kHalf + j]));
  }
  allow_dependent_launch();
  grid_dependency_wait();
  float sumsq = 0.f;
#pragma unroll
  for (int p = 0; p < kPairs; ++p) {
    const int j = lane + 32 * p;
    x1[p] = static_cast<float>(src[j]);
    x2[p] = static_cast<float>(src[kHalf + j]);
    sumsq += x1[p] * x1[p] + x2[p] * x2[p];
  }
  sumsq = warp_sum(sumsq);
  const float inv_rms = rsqrtf(sumsq / static_cast<float>(D) + eps);

#pragma unroll
  for (int p = 0; p < kPairs; ++p) {
    const int j = lane + 32 * p;
    const float n1 = round_to<T>(w1[p] * round_to<T>(x1[p] * inv_rms));
    const float n2 = round_to<T>(w2[p] * round_to<T>(x2[p] * inv_rms));
    const T out1 = static_cast<T>(round_to<T>(n1 * c[p]) - round_to<T>(n2 * s[p]));
    const T out2 = static_cast<T>(round_to<T>(n2 * c[p]) + round_to<T>(n1 * s[p]));
    dst[j] = out1;
    dst[kHalf + j] = out2;
    if (kStore && !is_q && slot >= 0) {
      auto* cached = store.k_cache + (slot * num_kv_heads + (h - num_heads)) * D;
      cached[j] = to_cache<kFp8>(out1, k_scale);
      cached[kHalf + j] = to_cache<kFp8>(out2, k_scale);
    }
  }
}

template <typename T, typename C, bool kStore, bool kFp8>
void launch(at::Tensor& q_out, at::Tensor& k_out, const at::Tensor& q, const at::Tensor& k,
            const at::Tensor& q_weight, const at::Tensor& k_weight, const at::Tensor& positions,
            const at::Tensor& cache, float eps, KVStore<T, kFp8> store) {
  const int64_t num_tokens = q.size(0);
  const int num_heads = static_cast<int>(q.size(1)), num_kv_heads = static_cast<int>(k.size(1));
  const int64_t rows = num_tokens * (num_heads + num_kv_heads * (kStore ? 2 : 1));
  const auto blocks = static_cast<unsigned>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto run = [&](auto d_c) {
    launch_pdl(qk_norm_rope_kernel<T, C, decltype(d_c)::value, kStore, kFp8>, dim3(blocks),
               dim3(kWarpsPerBlock * 32), 0, stream, q_out.data_ptr<T>(), k_out.data_ptr<T>(),
               q.const_data_ptr<T>(), k.const_data_ptr<T>(), q_weight.const_data_ptr<T>(),
               k_weight.const_data_ptr<T>(), positions.const_data_ptr<int64_t>(),
               cache.const_data_ptr<C>(), q.stride(0), q.stride(1), k.stride(0), k.stride(1),
               num_tokens, num_heads, num_kv_heads, eps, store);
  };
  switch (q.size(2)) {
    case 64: run(std::integral_constant<int, 64>{}); break;
    case 128: run(std::integral_constant<int, 128>{}); break;
    case 256: run(std::integral_constant<int, 256>{}); break;
    default: MYVLLM_CHECK(false, "qk_norm_rope: unsupported head_dim %lld", static_cast<long long>(q.size(2)));
  }
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& q_weight,
                  const at::Tensor& k_weight, const at::Tensor& positions,
                  const at::Tensor& cos_sin_cache) {
  MYVLLM_CHECK(q.is_cuda(), "qk_norm_rope: q must be a CUDA tensor");
  MYVLLM_CHECK(q.dim() == 3 && k.dim() == 3, "qk_norm_rope: q and k must be [T, heads, D]");
  const int64_t T = q.size(0), D = q.size(2);
  MYVLLM_CHECK(k.size(0) == T && k.size(2) == D, "qk_norm_rope: k shape %s does not match q shape %s",
               ShapeText(k.sizes()).text, ShapeText(q.sizes()).text);
  MYVLLM_CHECK(D == 64 || D == 128 || D == 256, "qk_norm_rope: head_dim %lld not in {64, 128, 256}",
               static_cast<long long>(D));
  MYVLLM_CHECK(q.stride(2) == 1 && k.stride(2) == 1,
              "qk_norm_rope: q and k need unit stride on the head dim");
  MYVLLM_CHECK(k.scalar_type() == q.scalar_type() && q_weight.scalar_type() == q.scalar_type() &&
                  k_weight.scalar_type() == q.scalar_type(),
              "qk_norm_rope: q, k, q_weight and k_weight must share one dtype");
  MYVLLM_CHECK(q_weight.numel() == D && k_weight.numel() == D,
              "qk_norm_rope: q_weight and k_weight must have head_dim elements");
  MYVLLM_CHECK(positions.scalar_type() == at::kLong && positions.dim() == 1 &&
                  positions.size(0) == T,
              "qk_norm_rope: positions must be int64 [T]");
  MYVLLM_CHECK(cos_sin_cache.dim() == 2 && cos_sin_cache.size(1) == D,
              "qk_norm_rope: cos_sin_cache must be [max_position, head_dim]");
  MYVLLM_CHECK(cos_sin_cache.scalar_type() == q.scalar_type() ||
                  cos_sin_cache.scalar_type() == at::kFloat,
              "qk_norm_rope: cos_sin_cache must be float32 or q's dtype");
  for (const at::Tensor* t : {&k, &q_weight, &k_weight, &positions, &cos_sin_cache})
    MYVLLM_CHECK(t->device() == q.device(), "qk_norm_rope: all tensors must be on q's device");
}

// Launches with the cos/sin cache's dtype (float32 or T).
template <typename T, bool kStore, bool kFp8>
void launch_cos_sin(at::Tensor& q_out, at::Tensor& k_out, const at::Tensor& q, const at::Tensor& k,
                    const at::Tensor& q_weight, const at::Tensor& k_weight, const at::Tensor& positions,
                    const at::Tensor& cache, float eps, KVStore<T, kFp8> store) {
  if (cache.scalar_type() == at::kFloat)
    launch<T, float, kStore, kFp8>(q_out, k_out, q, k, q_weight, k_weight, positions, cache, eps, store);
  else
    launch<T, T, kStore, kFp8>(q_out, k_out, q, k, q_weight, k_weight, positions, cache, eps, store);
}

// v, k_cache, v_cache, slot_mapping: all defined (store) or none; k_scale and v_scale: defined
// for fp8 caches.
std::tuple<at::Tensor, at::Tensor> dispatch(const at::Tensor& q, const at::Tensor& k,
                                       const at::Tensor& q_weight, const at::Tensor& k_weight,
                                       double eps, const at::Tensor& positions,
                                       const at::Tensor& cos_sin_cache, const at::Tensor* v,
                                       at::Tensor* k_cache, at::Tensor* v_cache,
                                       const at::Tensor* slot_mapping,
                                       const at::Tensor* k_scale = nullptr,
                                       const at::Tensor* v_scale = nullptr) {
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor q_out = at::empty(q.sizes(), q.options());
  at::Tensor k_out = at::empty(k.sizes(), k.options());
  if (q.size(0) == 0 || q.size(1) + k.size(1) == 0) return {q_out, k_out};
  // Positions must lie in [0, max_position); they are not bounds-checked on the device.
  const at::Tensor qw = q_weight.contiguous(), kw = k_weight.contiguous();
  const at::Tensor pos = positions.contiguous(), cache = cos_sin_cache.contiguous();
  const at::Tensor slots = slot_mapping ? slot_mapping->contiguous() : at::Tensor();
  const bool fp8 = k_cache && k_cache->scalar_type() == at::kFloat8_e4m3fn;
  MYVLLM_DISPATCH_FLOATS(q.scalar_type(), "qk_norm_rope", [&] {
    const float e = static_cast<float>(eps);
    if (fp8) {
      KVStore<scalar_t, true> store{v->const_data_ptr<scalar_t>(), v->stride(0), v->stride(1),
                                    static_cast<__nv_fp8_storage_t*>(k_cache->data_ptr()),
                                    static_cast<__nv_fp8_storage_t*>(v_cache->data_ptr()),
                                    slots.const_data_ptr<int64_t>(), k_scale->const_data_ptr<float>(),
                                    v_scale->const_data_ptr<float>()};
      launch_cos_sin<scalar_t, true, true>(q_out, k_out, q, k, qw, kw, pos, cache, e, store);
    } else if (v) {
      KVStore<scalar_t, false> store{v->const_data_ptr<scalar_t>(), v->stride(0), v->stride(1),
                                     k_cache->data_ptr<scalar_t>(), v_cache->data_ptr<scalar_t>(),
                                     slots.const_data_ptr<int64_t>()};
      launch_cos_sin<scalar_t, true, false>(q_out, k_out, q, k, qw, kw, pos, cache, e, store);
    } else {
      launch_cos_sin<scalar_t, false, false>(q_out, k_out, q, k, qw, kw, pos, cache, e,
                                             KVStore<scalar_t, false>{});
    }
  });
  return {q_out, k_out};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> qk_norm_rope(const at::Tensor& q, const at::Tensor& k,
                                                const at::Tensor& q_weight,
                                                const at::Tensor& k_weight, double eps,
                                                const at::Tensor& positions,
                                                const at::Tensor& cos_sin_cache) {
  check_inputs(q, k, q_weight, k_weight, positions, cos_sin_cache);
  return dispatch(q, k, q_weight, k_weight, eps, positions, cos_sin_cache, nullptr, nullptr, nullptr,
             nullptr);
}

std::tuple<at::Tensor, at::Tensor> qk_norm_rope_store(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& q_weight,
    const at::Tensor& k_weight, double eps, const at::Tensor& positions,
    const at::Tensor& cos_sin_cache, at::Tensor& k_cache, at::Tensor& v_cache,
    const at::Tensor& slot_mapping, const std::optional<at::Tensor>& k_scale,
    const std::optional<at::Tensor>& v_scale) {
  check_inputs(q, k, q_weight, k_weight, positions, cos_sin_cache);
  MYVLLM_CHECK(v.sizes() == k.sizes() && v.stride(2) == 1 && v.scalar_type() == q.scalar_type(),
              "qk_norm_rope_store: v must match k's shape and dtype, with unit stride on D");
  MYVLLM_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() &&
                  k_cache.size(2) == k.size(1) && k_cache.size(3) == k.size(2),
              "qk_norm_rope_store: caches must be [num_blocks, block_size, Hkv, D], got %s and %s",
              ShapeText(k_cache.sizes()).text, ShapeText(v_cache.sizes()).text);
  const bool fp8 = k_cache.scalar_type() == at::kFloat8_e4m3fn;
  MYVLLM_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  (k_cache.scalar_type() == q.scalar_type() || fp8) &&
                  v_cache.scalar_type() == k_cache.scalar_type(),
              "qk_norm_rope_store: caches must be contiguous, both in q's dtype or both float8_e4m3fn");
  if (fp8) {
    for (const std::optional<at::Tensor>* scale : {&k_scale, &v_scale})
      MYVLLM_CHECK(scale->has_value() && (*scale)->scalar_type() == at::kFloat &&
                      (*scale)->dim() == 1 && (*scale)->size(0) == k.size(1) &&
                      (*scale)->is_contiguous() && (*scale)->device() == q.device(),
                  "qk_norm_rope_store: an fp8 cache needs k_scale and v_scale, float32 [Hkv] on q's device");
  }
  MYVLLM_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.dim() == 1 &&
                  slot_mapping.size(0) == q.size(0),
              "qk_norm_rope_store: slot_mapping must be int64 [T]");
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&v, &k_cache, &v_cache, &slot_mapping})
    MYVLLM_CHECK(t->device() == q.device(), "qk_norm_rope_store: all tensors must be on q's device");
  // Slots must lie in [-1, num_blocks * block_size); they are not bounds-checked on the device.
  return dispatch(q, k, q_weight, k_weight, eps, positions, cos_sin_cache, &v, &k_cache, &v_cache,
             &slot_mapping, fp8 ? &*k_scale : nullptr, fp8 ? &*v_scale : nullptr);
}

}  // namespace myvllm
