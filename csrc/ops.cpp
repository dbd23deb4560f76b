// The fused_rnn:: op schemas (one place for all of them), and the Python module
// fused_rnn._C, which also reports how this extension was built.
//
// Shapes: T steps, B batch, I inputs, H hidden, G = 1 (IRNN) or 4 (LSTM, gates
// i, f, g, o). `bias` is b_ih + b_hh, [G*H]. `cells` are c_1..c_T and `gates` the
// activated gates, both saved by the LSTM forward for its backward. A scan backward
// with grad_x=false skips dx = dpre @ W_ih (a skinny GEMM that costs as much as the
// pointwise passes of the whole scan when I is small) and returns an empty grad_x.
#include <torch/extension.h>
#include <torch/library.h>

#include "build_info.h"

TORCH_LIBRARY(fused_rnn, m) {
  // The fake (meta) kernels and autograd formulas live in fused_rnn/ops.py.
  m.set_python_module("fused_rnn.ops");
  m.def("irnn_scan_forward(Tensor x, Tensor h0, Tensor w_ih, Tensor w_hh, Tensor? bias) -> (Tensor y, Tensor h_n)");
  m.def(
      "irnn_scan_backward(Tensor grad_y, Tensor grad_h_n, Tensor x, Tensor h0, Tensor w_ih, Tensor w_hh, Tensor y,"
      " bool grad_x=True)"
      " -> (Tensor grad_x, Tensor grad_h0, Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_bias)");
  m.def("irnn_step(Tensor x, Tensor h, Tensor w_ih, Tensor w_hh, Tensor? bias) -> Tensor h_new");
  m.def(
      "irnn_step_backward(Tensor grad_h_new, Tensor x, Tensor h, Tensor w_ih, Tensor w_hh, Tensor h_new)"
      " -> (Tensor grad_x, Tensor grad_h, Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_bias)");
  m.def(
      "lstm_scan_forward(Tensor x, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? bias)"
      " -> (Tensor y, Tensor h_n, Tensor c_n, Tensor cells, Tensor gates)");
  m.def(
      "lstm_scan_backward(Tensor grad_y, Tensor grad_h_n, Tensor grad_c_n, Tensor x, Tensor h0, Tensor c0,"
      " Tensor w_ih, Tensor w_hh, Tensor y, Tensor cells, Tensor gates, bool grad_x=True)"
      " -> (Tensor grad_x, Tensor grad_h0, Tensor grad_c0, Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_bias)");
  m.def(
      "lstm_step(Tensor x, Tensor h, Tensor c, Tensor w_ih, Tensor w_hh, Tensor? bias)"
      " -> (Tensor h_new, Tensor c_new, Tensor gates)");
  m.def(
      "lstm_step_backward(Tensor grad_h_new, Tensor grad_c_new, Tensor x, Tensor h, Tensor c, Tensor w_ih,"
      " Tensor w_hh, Tensor c_new, Tensor gates)"
      " -> (Tensor grad_x, Tensor grad_h, Tensor grad_c, Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_bias)");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fused_rnn compiled kernels; importing this module registers the fused_rnn:: ops";
  m.def("build_info", &fused_rnn::build_info_dict, "How this extension was built (backends, CUDA archs, compiler)");
}
