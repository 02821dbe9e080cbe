// Matrix-vector products for a few tokens (decode at small batch), with the decoder's
// neighbouring elementwise ops fused in, out of place:
//
//   gemv(x, W, norm_w?, eps, silu)                 out = epi(pro(x) @ W^T)
//   add_norm_gemv(x, residual, W, norm_w, eps, silu) s = x + residual; out = epi(rms_norm(s) @ W^T)
//                                                   -> (out, s)
//
// x [rows, K] with rows <= kMaxRows (two), W [N, K] row-major (nn.Linear's layout). The
// prologue is nothing or RMSNorm (plus the residual add); the epilogue is nothing or
// silu(gate) * up over the two halves of W's rows (gate_up_proj), which halves the output to
// [rows, N / 2].
//
// Why: at one token a Qwen3 layer is ~11 kernels whose launch and ramp cost more than their
// bytes; this puts norm + projection (+ activation) into one, and reads the weights faster
// than cuBLAS does at these shapes (benchmarks/gemv_microbench.py, docs/performance.md). It is
// launched with programmatic dependent launch (launch_pdl in common.cuh).
//
// Layout: 8 warps per block; each output (each gate/up pair with silu) is computed by 1, 2, 4
// or 8 adjacent warps, each over a contiguous piece of K (more pieces while one wave of blocks
// still holds every output: four for 1,024 outputs); the lanes of a warp read 16-byte vectors
// of a weight row side by side, several in flight before the first use; the weights are loaded
// before the prologue, so their latency overlaps it. The grid is at most one wave: every block
// stages the (normalised) rows of x in shared memory once, then loops over outputs, loading
// the next one's weights while it reduces the current one (the LM head, 151,936 outputs, reads
// as fast as cuBLAS that way). Block 0 alone writes s.
//
// When a block's share of W fits in shared memory (one block an SM), the staged form runs
// instead (gemv_staged_kernel): the weights go to shared memory by cp.async before the
// dependent-launch wait, so its blocks fit beside the kernels before it and fetch their weights
// while those run.
//
// Numerics follow myvllm/kernels/reference.py composed (fused_add_rms_norm or rms_norm,
// F.linear, silu_and_mul): float32 arithmetic rounded to T where the unfused ops round (s, the
// normalised x before the weight, the weight product, the projection output, silu). Only the
// dot products' summation order differs from cuBLAS (it is fixed: the same inputs give the
// same bits on the same GPU).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>

#include "common.cuh"
#include "gemv_stage_x.cuh"
#include "gemv_staged.cuh"

namespace myvllm {
namespace {

// Blocks resident per SM, which caps registers at 64 a thread, and the 16-byte weight vectors
// each lane keeps in flight (over all its rows): four blocks an SM run the 0.6B projections (up
// to 512 blocks) in one wave, each SM with 64 KB of weights in flight.
constexpr int kMinBlocks = 4;
constexpr int kInFlight = 4;

// 16 bytes of weights, read once per pass: kept out of L1.
template <typename V>
__device__ __forceinline__ V load_stream(const V* p) {
  static_assert(sizeof(V) == 16, "16-byte vectors only");
  int4 r;
  asm("ld.global.nc.L1::no_allocate.v4.s32 {%0, %1, %2, %3}, [%4];"
      : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
      : "l"(p));
  return *reinterpret_cast<V*>(&r);
}

// Vectors c0, c0 + 32, ... (U of them, those below c_end) of each of the R rows.
template <typename V, int R, int U>
__device__ __forceinline__ void load_weights(V (&wv)[R][U], const V* const (&wrow)[R],
                                             bool active, int c0, int c_end) {
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int c = c0 + u * 32;
#pragma unroll
    for (int r = 0; r < R; ++r)
      if (active && c < c_end) wv[r][u] = load_stream(wrow[r] + c);
  }
}

// out [rows, n_out]. Output column j is the dot products of W's row j (and, with SILU, row
// j + n_out) with the M staged rows of x. A block takes kWarps / slices columns at a time, each
// column's K split into `slices` contiguous pieces over adjacent warps (their sums added in order
// through shared memory), then moves on by gridDim.x such groups: with a grid of one wave, x is
// staged once per block however many columns there are.
template <typename T, int VEC, int M, int PRO, bool SILU>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    gemv_kernel(T* __restrict__ out, T* __restrict__ res_out, const T* __restrict__ x,
                int64_t x_stride, const T* __restrict__ residual, int64_t res_stride,
                const T* __restrict__ w, const T* __restrict__ norm_w, float eps, int rows,
                int n_out, int k, int slices) {
  using V = Vec<T, VEC>;
  constexpr int R = SILU ? 2 : 1;  // weight rows per column
  constexpr int U = kInFlight / R;  // vectors of each row per sweep
  extern __shared__ __align__(16) unsigned char smem[];
  T* xs = reinterpret_cast<T*>(smem);
  __shared__ float slice_sums[kWarps][R][M];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int cols_per_block = kWarps / slices;
  const int slice = warp % slices;
  const int nvec = k / VEC;
  const int chunk = (nvec + slices - 1) / slices;
  const int c_begin = min(nvec, slice * chunk), c_end = min(nvec, c_begin + chunk);
  const int col_step = gridDim.x * cols_per_block;
  int j = blockIdx.x * cols_per_block + warp / slices;

  const V* wrow[R];
  auto point_at = [&](int col) {
#pragma unroll
    for (int r = 0; r < R; ++r)
      wrow[r] = reinterpret_cast<const V*>(w + static_cast<int64_t>(col < n_out ? col + r * n_out : 0) * k);
  };
  point_at(j);
  V wv[R][U];
  load_weights<V, R, U>(wv, wrow, j < n_out, c_begin + lane, c_end);  // in flight while x is staged
  // Programmatic dependent launch: the weights above need nothing from the kernel before this
  // one; x does. The next kernel may start (and prefetch its own weights) at once.
  allow_dependent_launch();
  grid_dependency_wait();
  stage_x<T, VEC, M, PRO>(xs, x, x_stride, residual, res_stride, res_out, norm_w, eps, rows, k);

  const V* xsv = reinterpret_cast<const V*>(xs);
  // Every warp of the block runs the same iterations (the barriers below need it).
  for (int first = blockIdx.x * cols_per_block; first < n_out; first += col_step, j += col_step) {
    const bool active = j < n_out;
    float acc[R][M];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int m = 0; m < M; ++m) acc[r][m] = 0.f;
    for (int c0 = c_begin + lane;;) {
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int c = c0 + u * 32;
        if (active && c < c_end) {
#pragma unroll
          for (int m = 0; m < M; ++m) {
            const V xv = xsv[m * nvec + c];
#pragma unroll
            for (int r = 0; r < R; ++r)
#pragma unroll
              for (int e = 0; e < VEC; ++e)
                acc[r][m] += static_cast<float>(wv[r][u].v[e]) * static_cast<float>(xv.v[e]);
          }
        }
      }
      c0 += 32 * U;
      if (c0 - lane >= c_end) break;
      load_weights<V, R, U>(wv, wrow, active, c0, c_end);
    }
    // The next column's first vectors are in flight while this one's sums are reduced.
    point_at(j + col_step);
    load_weights<V, R, U>(wv, wrow, j + col_step < n_out, c_begin + lane, c_end);

    float y[R][M];
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
      for (int r = 0; r < R; ++r) y[r][m] = warp_sum(acc[r][m]);
    if (slices > 1) {
      if (lane == 0) {
#pragma unroll
        for (int m = 0; m < M; ++m)
#pragma unroll
          for (int r = 0; r < R; ++r) slice_sums[warp][r][m] = y[r][m];
      }
      __syncthreads();
      if (slice == 0) {
#pragma unroll
        for (int m = 0; m < M; ++m)
#pragma unroll
          for (int r = 0; r < R; ++r) {
            float total = 0.f;
            for (int s = 0; s < slices; ++s) total += slice_sums[warp + s][r][m];
            y[r][m] = total;
          }
      }
      __syncthreads();  // slice_sums is written again in the next iteration
    }
    if (slice == 0 && lane == 0 && active) {
#pragma unroll
      for (int m = 0; m < M; ++m) {
        if (m < rows) {
          float v = round_to<T>(y[0][m]);  // the projection's output in T
          if constexpr (SILU) v = silu_mul<T>(v, round_to<T>(y[R - 1][m]));
          out[m * static_cast<int64_t>(n_out) + j] = static_cast<T>(v);
        }
      }
    }
  }
}

template <typename T, int M, int PRO, bool SILU>
void launch_m(T* out, T* res_out, const T* x, int64_t x_stride, const T* residual,
              int64_t res_stride, const T* w, const T* norm_w, float eps, int rows, int n_out,
              int k) {
  if (launch_staged<T, M, PRO, SILU>(out, res_out, x, x_stride, residual, res_stride, w, norm_w,
                                     eps, rows, n_out, k))
    return;
  constexpr int kVec = 16 / sizeof(T);
  const int smem = M * k * static_cast<int>(sizeof(T));
  auto* kernel = gemv_kernel<T, kVec, M, PRO, SILU>;
  // Over 48 KB of shared memory needs an opt-in, once per kernel (legal under graph capture).
  static const bool opted_in = [&] {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kMaxSmem));
    return true;
  }();
  (void)opted_in;
  const int slots = num_sms() * kMinBlocks;  // blocks resident at once
  const int nvec = k / kVec;
  // Split K over more warps while one wave still holds every block and each piece of K still
  // gives every lane a vector: the 1,024-column projections of Qwen3-0.6B (o, down) get four
  // warps per column, 512 blocks, instead of 128 blocks with too few loads in flight.
  int slices = 1;
  while (slices < kWarps && nvec / (2 * slices) >= 32 &&
         ceil_div(n_out, kWarps / (2 * slices)) <= slots)
    slices *= 2;
  const int blocks = std::min(ceil_div(n_out, kWarps / slices), slots);
  // Programmatic dependent launch: this kernel may be scheduled before the previous one ends; it
  // waits for it before reading x (see gemv_kernel).
  launch_pdl(kernel, dim3(blocks), dim3(kThreads), smem, c10::cuda::getCurrentCUDAStream(), out,
             res_out, x, x_stride, residual, res_stride, w, norm_w, eps, rows, n_out, k, slices);
}

template <typename T, int PRO, bool SILU>
void launch(T* out, T* res_out, const T* x, int64_t x_stride, const T* residual,
            int64_t res_stride, const T* w, const T* norm_w, float eps, int rows, int n_out,
            int k) {
  auto run = [&](auto m_c) {
    launch_m<T, decltype(m_c)::value, PRO, SILU>(out, res_out, x, x_stride, residual, res_stride,
                                                 w, norm_w, eps, rows, n_out, k);
  };
  if (rows == 1) run(std::integral_constant<int, 1>{});
  else run(std::integral_constant<int, 2>{});
}

void check_operand(const at::Tensor& t, const at::Tensor& x, const char* name) {
  MYVLLM_CHECK(t.device() == x.device(), "gemv: %s must be on x's device", name);
  MYVLLM_CHECK(t.scalar_type() == x.scalar_type(), "gemv: %s dtype %s differs from x dtype %s", name,
               dtype_name(t.scalar_type()), dtype_name(x.scalar_type()));
  MYVLLM_CHECK(t.stride(-1) == 1 && aligned16(t.const_data_ptr()),
               "gemv: %s must have unit stride on its last dim and a 16-byte aligned start", name);
}

// A norm weight of x's row length, contiguous (a 1-D tensor with unit stride) and aligned.
void check_norm_weight(const at::Tensor& nw, const at::Tensor& x, const char* op) {
  MYVLLM_CHECK(nw.dim() == 1 && nw.size(0) == x.size(1), "%s: norm_weight must be [%lld]", op,
               static_cast<long long>(x.size(1)));
  check_operand(nw, x, "norm_weight");
}

// Checks the contract that kernels/cuda/support.py's gemv_fits() tests before calling.
void check_inputs(const at::Tensor& x, const at::Tensor& weight, bool silu) {
  MYVLLM_CHECK(x.is_cuda() && x.dim() == 2, "gemv: x must be a 2-D CUDA tensor");
  MYVLLM_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1), "gemv: weight must be [N, %lld], got %s",
               static_cast<long long>(x.size(1)), ShapeText(weight.sizes()).text);
  MYVLLM_CHECK(weight.is_contiguous(), "gemv: weight must be contiguous");
  check_operand(x, x, "x");
  check_operand(weight, x, "weight");
  const int64_t rows = x.size(0), k = x.size(1);
  const int64_t vec = 16 / x.element_size(), max_rows = kMaxRows, max_smem = kMaxSmem;
  MYVLLM_CHECK(rows >= 1 && rows <= max_rows, "gemv: x must have 1..%lld rows, got %lld",
               static_cast<long long>(max_rows), static_cast<long long>(rows));
  MYVLLM_CHECK(k % vec == 0 && x.stride(0) % vec == 0, "gemv: K and x's row stride must be multiples of %lld",
               static_cast<long long>(vec));
  MYVLLM_CHECK(rows * k * x.element_size() <= max_smem,
               "gemv: %lld rows of %lld elements exceed the %lld-byte staging buffer",
               static_cast<long long>(rows), static_cast<long long>(k), static_cast<long long>(max_smem));
  MYVLLM_CHECK(weight.size(0) >= (silu ? 2 : 1) && (!silu || weight.size(0) % 2 == 0),
               "gemv: weight needs %s, got %lld", silu ? "an even number of rows (gate, up)" : "rows",
               static_cast<long long>(weight.size(0)));
  MYVLLM_CHECK(weight.size(0) <= INT32_MAX, "gemv: too many weight rows");
}

template <int PRO, bool SILU>
void dispatch(at::Tensor& out, at::Tensor* res_out, const at::Tensor& x,
              const at::Tensor* residual, const at::Tensor& weight, const at::Tensor* norm_w,
              double eps) {
  const int rows = static_cast<int>(x.size(0)), k = static_cast<int>(x.size(1));
  MYVLLM_DISPATCH_FLOATS(x.scalar_type(), "gemv", [&] {
    launch<scalar_t, PRO, SILU>(
        out.data_ptr<scalar_t>(), res_out ? res_out->data_ptr<scalar_t>() : nullptr,
        x.const_data_ptr<scalar_t>(), x.stride(0),
        residual ? residual->const_data_ptr<scalar_t>() : nullptr, residual ? residual->stride(0) : 0,
        weight.const_data_ptr<scalar_t>(), norm_w ? norm_w->const_data_ptr<scalar_t>() : nullptr,
        static_cast<float>(eps), rows, static_cast<int>(out.size(1)), k);
  });
}

}  // namespace

at::Tensor gemv(const at::Tensor& x, const at::Tensor& weight,
                const std::optional<at::Tensor>& norm_weight, double eps, bool silu) {
  check_inputs(x, weight, silu);
  if (norm_weight.has_value()) check_norm_weight(*norm_weight, x, "gemv");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n_out = silu ? weight.size(0) / 2 : weight.size(0);
  at::Tensor out = at::empty({x.size(0), n_out}, x.options());
  if (norm_weight.has_value()) {
    const at::Tensor& nw = *norm_weight;
    if (silu) dispatch<kNorm, true>(out, nullptr, x, nullptr, weight, &nw, eps);
    else dispatch<kNorm, false>(out, nullptr, x, nullptr, weight, &nw, eps);
  } else {
    if (silu) dispatch<kCopy, true>(out, nullptr, x, nullptr, weight, nullptr, eps);
    else dispatch<kCopy, false>(out, nullptr, x, nullptr, weight, nullptr, eps);
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor> add_norm_gemv(const at::Tensor& x, const at::Tensor& residual,
                                                 const at::Tensor& weight,
                                                 const at::Tensor& norm_weight, double eps,
                                                 bool silu) {
  check_inputs(x, weight, silu);
  MYVLLM_CHECK(residual.sizes() == x.sizes(), "add_norm_gemv: residual shape %s differs from x shape %s",
               ShapeText(residual.sizes()).text, ShapeText(x.sizes()).text);
  check_operand(residual, x, "residual");
  MYVLLM_CHECK(residual.stride(0) % (16 / x.element_size()) == 0,
               "add_norm_gemv: residual's row stride must be a multiple of 16 bytes");
  check_norm_weight(norm_weight, x, "add_norm_gemv");
  const at::Tensor& nw = norm_weight;
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n_out = silu ? weight.size(0) / 2 : weight.size(0);
  at::Tensor out = at::empty({x.size(0), n_out}, x.options());
  at::Tensor res_out = at::empty(x.sizes(), x.options());
  if (silu) dispatch<kAddNorm, true>(out, &res_out, x, &residual, weight, &nw, eps);
  else dispatch<kAddNorm, false>(out, &res_out, x, &residual, weight, &nw, eps);
  return {out, res_out};
}

}  // namespace myvllm
