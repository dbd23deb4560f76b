// The fused_rnn:: op schemas (one place for all of them), and the Python module
// fused_rnn._C, which also reports how this extension was built.
//
// Shapes: T steps, B batch, I inputs, H hidden, G = 1 (IRNN) or 4 (LSTM, gates
// i, f, g, o). `bias` is b_ih + b_hh, [G*H]. `cells` are c_1..c_T and `gates` the
// activated gates, both saved by the LSTM forward for its backward. A scan backward
// with grad_x=false skips dx = dpre @ W_ih (a skinny GEMM that costs as much as the
// pointwise passes of the whole scan when I is small) and returns an empty grad_x.
// Scan options (fused_rnn.irnn / lstm): recurrent_mask [B, H] multiplies h_{t-1} in the
// recurrent product; lengths [B] (integers, any device) stop each sequence after its
// length (state frozen, y zero beyond it); hidden_clip bounds the IRNN's h. The
// backward takes the same options as its forward. w_hr [P, H] is the LSTM's output
// projection (nn.LSTM(proj_size=P), CPU kernels only): h_t = (o * tanh(c_t)) w_hr^T, so
// h0, h_n, y and the mask have P columns and w_hh is [4H, P]; grad_w_hr is empty without it.
#include <torch/extension.h>
#include <torch/library.h>

#include "build_info.h"
#include "cuda/persistent_plan.h"

#if defined(FUSED_RNN_WITH_CUDA)
namespace fused_rnn {
namespace cuda {
// csrc/cuda/device.cu: why the persistent scan cannot take this layer on `device`
// ("" if it can).
std::string cuda_scan_unsupported(int device, int64_t gates, at::ScalarType dtype, int64_t hidden);
}  // namespace cuda
}  // namespace fused_rnn
#endif

namespace {

#if defined(FUSED_RNN_WITH_CUDA)
at::ScalarType scalar_type_named(const std::string& name) {
  if (name == "float32") return at::kFloat;
  if (name == "bfloat16") return at::kBFloat16;
  if (name == "float16") return at::kHalf;
  TORCH_CHECK(false, "fused_rnn: the CUDA kernels take float32, bfloat16 or float16, got ", name);
}
#endif

pybind11::dict scan_plan_dict(int64_t gates, int64_t weight_size, int64_t hidden, bool backward, int64_t sm_count,
                              int64_t smem_per_block, int64_t batch) {
  const auto plan = fused_rnn::cuda::plan_scan(gates, weight_size, hidden, backward, sm_count, smem_per_block, batch);
  pybind11::dict out;
  out["units"] = plan.units;
  out["blocks"] = plan.blocks;
  out["rows"] = plan.rows;
  out["weight_bytes"] = plan.weight_bytes;
  out["stage_bytes"] = plan.stage_bytes;
  out["smem_bytes"] = plan.smem_bytes;
  out["fits"] = plan.fits;
  return out;
}

}  // namespace

TORCH_LIBRARY(fused_rnn, m) {
  // The fake (meta) kernels and autograd formulas live in fused_rnn/ops.py.
  m.set_python_module("fused_rnn.ops");
  m.def(
      "irnn_scan_forward(Tensor x, Tensor h0, Tensor w_ih, Tensor w_hh, Tensor? bias, Tensor? recurrent_mask=None,"
      " Tensor? lengths=None, float? hidden_clip=None) -> (Tensor y, Tensor h_n)");
  m.def(
      "irnn_scan_backward(Tensor grad_y, Tensor grad_h_n, Tensor x, Tensor h0, Tensor w_ih, Tensor w_hh, Tensor y,"
      " bool grad_x=True, Tensor? recurrent_mask=None, Tensor? lengths=None, float? hidden_clip=None)"
      " -> (Tensor grad_x, Tensor grad_h0, Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_bias)");
  m.def("irnn_step(Tensor x, Tensor h, Tensor w_ih, Tensor w_hh, Tensor? bias) -> Tensor h_new");
  m.def(
      "irnn_step_backward(Tensor grad_h_new, Tensor x, Tensor h, Tensor w_ih, Tensor w_hh, Tensor h_new)"
      " -> (Tensor grad_x, Tensor grad_h, Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_bias)");
  m.def(
      "lstm_scan_forward(Tensor x, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? bias,"
      " Tensor? recurrent_mask=None, Tensor? lengths=None, Tensor? w_hr=None)"
      " -> (Tensor y, Tensor h_n, Tensor c_n, Tensor cells, Tensor gates)");
  m.def(
      "lstm_scan_backward(Tensor grad_y, Tensor grad_h_n, Tensor grad_c_n, Tensor x, Tensor h0, Tensor c0,"
      " Tensor w_ih, Tensor w_hh, Tensor y, Tensor cells, Tensor gates, bool grad_x=True,"
      " Tensor? recurrent_mask=None, Tensor? lengths=None, Tensor? w_hr=None)"
      " -> (Tensor grad_x, Tensor grad_h0, Tensor grad_c0, Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_bias,"
      " Tensor grad_w_hr)");
  m.def(
      "lstm_step(Tensor x, Tensor h, Tensor c, Tensor w_ih, Tensor w_hh, Tensor? bias)"
      " -> (Tensor h_new, Tensor c_new, Tensor gates)");
  m.def(
      "lstm_step_backward(Tensor grad_h_new, Tensor grad_c_new, Tensor x, Tensor h, Tensor c, Tensor w_ih,"
      " Tensor w_hh, Tensor c_new, Tensor gates)"
      " -> (Tensor grad_x, Tensor grad_h, Tensor grad_c, Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_bias)");
}

namespace {

// The CPU bf16 kernel's product alone (csrc/cpu/gemm_bf16.h), for the tests: c (+)= a @ W'
// (+ bias) with W' = w^T for w [N, K] when trans_w, else w [K, N]; float32 in and out,
// with the products FUSED_RNN_CPU_BF16 selects for a bfloat16 layer. With c, the
// product is added to a copy of it.
at::Tensor cpu_bf16_matmul(const at::Tensor& a, const at::Tensor& w, bool trans_w,
                           const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& c) {
  using namespace fused_rnn::cpu;
  for (const auto* t : {&a, &w}) {
    TORCH_CHECK(t->dim() == 2 && t->device().is_cpu() && t->scalar_type() == at::kFloat,
                "fused_rnn: cpu_bf16_matmul takes 2-D float32 CPU tensors, got ", t->sizes(), " ",
                t->scalar_type(), " on ", t->device());
  }
  const int64_t m = a.size(0), k = a.size(1), n = trans_w ? w.size(0) : w.size(1);
  TORCH_CHECK((trans_w ? w.size(1) : w.size(0)) == k, "fused_rnn: w must be ", trans_w ? "[N, " : "[", k,
              trans_w ? "]" : ", N]", " for a ", a.sizes(), ", got ", w.sizes());
  const Bf16Products mode = bf16_products();
  TORCH_CHECK(mode != Bf16Products::kOff, "fused_rnn: this CPU has no bf16 products (FUSED_RNN_CPU_BF16=",
              "emulate runs them on AVX2)");
  const auto lhs = a.contiguous(), weight = w.contiguous();
  const auto bias_values = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  TORCH_CHECK(!bias_values.defined() || bias_values.numel() == n, "fused_rnn: bias must have ", n,
              " elements, got ", bias_values.numel());
  auto out = c.has_value() ? c->to(at::kFloat).contiguous().clone() : at::empty({m, n}, a.options());
  TORCH_CHECK(out.sizes() == at::IntArrayRef({m, n}), "fused_rnn: c must be [", m, ", ", n, "], got ", out.sizes());
  if (m == 0 || n == 0) return out;
  const PackedWeight packed(gemm_kernel(), mode, weight.const_data_ptr<float>(), trans_w, weight.size(1), n, k);
  packed.multiply(m, lhs.const_data_ptr<float>(), k, c.has_value() ? 1.0f : 0.0f, out.data_ptr<float>(), n,
                  bias_values.defined() ? bias_values.const_data_ptr<float>() : nullptr);
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fused_rnn compiled kernels; importing this module registers the fused_rnn:: ops";
  m.def("build_info", &fused_rnn::build_info_dict, "How this extension was built (backends, CUDA archs, compiler)");
  // The persistent CUDA scans' plan (csrc/cuda/persistent_plan.h), for any device: plain
  // arithmetic, available in CPU-only builds too.
  m.def("cuda_scan_plan", &scan_plan_dict,
        "plan_scan(gates, weight_size, hidden, backward, sm_count, smem_per_block, batch=1)", pybind11::arg("gates"),
        pybind11::arg("weight_size"), pybind11::arg("hidden"), pybind11::arg("backward"), pybind11::arg("sm_count"),
        pybind11::arg("smem_per_block"), pybind11::arg("batch") = 1);
  m.def("cpu_bf16_matmul", &cpu_bf16_matmul,
        "cpu_bf16_matmul(a, w, trans_w, bias=None, c=None): the CPU bf16 kernel's product alone, for the tests",
        pybind11::arg("a"), pybind11::arg("w"), pybind11::arg("trans_w"), pybind11::arg("bias") = pybind11::none(),
        pybind11::arg("c") = pybind11::none());
  m.def("cuda_max_hidden_on_chip", &fused_rnn::cuda::max_hidden_on_chip,
        "max_hidden_on_chip(gates, weight_size, sm_count, smem_per_block)");
#if defined(FUSED_RNN_WITH_CUDA)
  m.def(
      "cuda_scan_unsupported",
      [](int device, int64_t gates, const std::string& dtype, int64_t hidden) {
        return fused_rnn::cuda::cuda_scan_unsupported(device, gates, scalar_type_named(dtype), hidden);
      },
      "Why the persistent CUDA scan cannot take (gates, dtype, hidden) on this device ('' if it can)");
#endif
}
