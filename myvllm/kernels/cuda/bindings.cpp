// Registers the CUDA kernels as torch custom ops in the `myvllm` namespace, so that CUDA graph
// capture sees ordinary dispatcher ops. All ops return new tensors; qk_norm_rope_store also
// mutates the caches it is given (declared in its schema). Their fake (meta) versions, which
// torch.compile traces with, are registered from Python (fake.py).
//
// TORCH_LIBRARY may define a namespace only once per process, so this library owns
// `myvllm`: other code adding ops to it must use TORCH_LIBRARY_FRAGMENT, or
// torch.library.custom_op / Library("myvllm", "FRAGMENT") from Python.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace myvllm {
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
std::tuple<at::Tensor, at::Tensor> fused_add_rms_norm(const at::Tensor& x,
                                                      const at::Tensor& residual,
                                                      const at::Tensor& weight, double eps);
std::tuple<at::Tensor, at::Tensor> qk_norm_rope(const at::Tensor& q, const at::Tensor& k,
                                                const at::Tensor& q_weight,
                                                const at::Tensor& k_weight, double eps,
                                                const at::Tensor& positions,
                                                const at::Tensor& cos_sin_cache);
std::tuple<at::Tensor, at::Tensor> qk_norm_rope_store(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& q_weight,
    const at::Tensor& k_weight, double eps, const at::Tensor& positions,
    const at::Tensor& cos_sin_cache, at::Tensor& k_cache, at::Tensor& v_cache,
    const at::Tensor& slot_mapping, const std::optional<at::Tensor>& k_scale,
    const std::optional<at::Tensor>& v_scale);
at::Tensor silu_and_mul(const at::Tensor& x);
at::Tensor gemv(const at::Tensor& x, const at::Tensor& weight,
                const std::optional<at::Tensor>& norm_weight, double eps, bool silu);
std::tuple<at::Tensor, at::Tensor> add_norm_gemv(const at::Tensor& x, const at::Tensor& residual,
                                                 const at::Tensor& weight,
                                                 const at::Tensor& norm_weight, double eps,
                                                 bool silu);
}  // namespace myvllm

TORCH_LIBRARY(myvllm, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def(
      "fused_add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) "
      "-> (Tensor, Tensor)");
  m.def(
      "qk_norm_rope(Tensor q, Tensor k, Tensor q_weight, Tensor k_weight, float eps, "
      "Tensor positions, Tensor cos_sin_cache) -> (Tensor, Tensor)");
  m.def(
      "qk_norm_rope_store(Tensor q, Tensor k, Tensor v, Tensor q_weight, Tensor k_weight, "
      "float eps, Tensor positions, Tensor cos_sin_cache, Tensor(a!) k_cache, "
      "Tensor(b!) v_cache, Tensor slot_mapping, Tensor? k_scale=None, Tensor? v_scale=None) "
      "-> (Tensor, Tensor)");
  m.def("silu_and_mul(Tensor x) -> Tensor");
  m.def("gemv(Tensor x, Tensor weight, Tensor? norm_weight, float eps, bool silu) -> Tensor");
  m.def(
      "add_norm_gemv(Tensor x, Tensor residual, Tensor weight, Tensor norm_weight, float eps, "
      "bool silu) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(myvllm, CUDA, m) {
  m.impl("rms_norm", &myvllm::rms_norm);
  m.impl("fused_add_rms_norm", &myvllm::fused_add_rms_norm);
  m.impl("qk_norm_rope", &myvllm::qk_norm_rope);
  m.impl("qk_norm_rope_store", &myvllm::qk_norm_rope_store);
  m.impl("silu_and_mul", &myvllm::silu_and_mul);
  m.impl("gemv", &myvllm::gemv);
  m.impl("add_norm_gemv", &myvllm::add_norm_gemv);
}
