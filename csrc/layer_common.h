// What the CPU (csrc/cpu) and CUDA (csrc/cuda) scans share on the ATen side: the
// argument checks, the input projection before a scan and the weight-gradient GEMMs
// after it.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <initializer_list>
#include <optional>
#include <utility>

namespace fused_rnn {

// Kernels run on the tensors' own dtype: the custom ops have no autocast kernel, so
// without this guard autocast would still be active inside them and turn their ATen
// GEMMs into bfloat16 (under torch.autocast), mismatching the raw pointers.
#define FUSED_RNN_EXCLUDE_AUTOCAST c10::impl::ExcludeDispatchKeyGuard no_autocast_guard(c10::autocast_dispatch_keyset)

// Device type, device and dtype of one argument. Every kernel entry point makes its
// inputs contiguous itself (a no-op when they already are), so strided inputs are
// accepted.
inline void check_tensor(const at::Tensor& t, const char* name, c10::DeviceType device_type, at::ScalarType dtype,
                         const at::Tensor* same_device_as = nullptr) {
  TORCH_CHECK(t.device().type() == device_type, "fused_rnn: ", name, " must be a ", c10::DeviceTypeName(device_type),
              " tensor, got ", t.device());
  TORCH_CHECK(same_device_as == nullptr || t.device() == same_device_as->device(), "fused_rnn: ", name,
              " must be on ", same_device_as->device(), " like x, got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, "fused_rnn: ", name, " must be ", dtype, " like x, got ", t.scalar_type());
}

// Checks one layer's tensors; gates = 1 (IRNN) or 4 (LSTM). x is [T, B, I]; its dtype
// must be one of `dtypes`, and every other tensor must match x's dtype and device.
inline void check_layer_tensors(const at::Tensor& x,
                                std::initializer_list<std::pair<const at::Tensor*, const char*>> states,
                                const at::Tensor& w_ih, const at::Tensor& w_hh, const std::optional<at::Tensor>& bias,
                                int64_t gates, c10::DeviceType device_type,
                                std::initializer_list<at::ScalarType> dtypes) {
  TORCH_CHECK(x.dim() == 3, "fused_rnn: x must be 3-D [T, B, I], got ", x.sizes());
  bool known = false;
  std::string names;
  for (const auto dtype : dtypes) {
    known = known || x.scalar_type() == dtype;
    names += (names.empty() ? "" : ", ") + std::string(c10::toString(dtype));
  }
  TORCH_CHECK(known, "fused_rnn: the ", c10::DeviceTypeName(device_type), " kernels take ", names, ", got ",
              x.scalar_type());
  const auto dtype = x.scalar_type();
  check_tensor(x, "x", device_type, dtype);
  TORCH_CHECK(w_hh.dim() == 2 && w_hh.size(0) == gates * w_hh.size(1), "fused_rnn: w_hh must be [", gates,
              "*H, H], got ", w_hh.sizes());
  const int64_t hidden = w_hh.size(1);
  TORCH_CHECK(w_ih.dim() == 2 && w_ih.size(0) == gates * hidden && w_ih.size(1) == x.size(2),
              "fused_rnn: w_ih must be [", gates * hidden, ", ", x.size(2), "], got ", w_ih.sizes());
  check_tensor(w_ih, "w_ih", device_type, dtype, &x);
  check_tensor(w_hh, "w_hh", device_type, dtype, &x);
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == gates * hidden, "fused_rnn: bias must be [",
                gates * hidden, "], got ", bias->sizes());
    check_tensor(*bias, "bias", device_type, dtype, &x);
  }
  for (const auto& [state, name] : states) {
    TORCH_CHECK(state->dim() == 2 && state->size(0) == x.size(1) && state->size(1) == hidden, "fused_rnn: ",
                name, " must be [", x.size(1), ", ", hidden, "], got ", state->sizes());
    check_tensor(*state, name, device_type, dtype, &x);
  }
}

// The matrix product of the whole-sequence GEMMs below, a [M, K] @ b [K, N] (+ bias [N]
// on every row): ATen's by default; the CPU scans pass their own (cpu/blas.h).
using Matmul = at::Tensor (*)(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& bias);

inline at::Tensor aten_matmul(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& bias) {
  return bias.has_value() ? at::addmm(*bias, a, b) : at::mm(a, b);
}

// a^T as a contiguous tensor, for the weight gradients below: ATen's by default; the CPU
// scans pass their own (cpu/blas.h).
using Transpose = at::Tensor (*)(const at::Tensor& a);

inline at::Tensor aten_transposed(const at::Tensor& a) { return a.t().contiguous(); }

// [T, B, G*H] = x @ w_ih^T + bias: the input projection of all steps in one GEMM.
inline at::Tensor input_projection(const at::Tensor& x, const at::Tensor& w_ih,
                                   const std::optional<at::Tensor>& bias, Matmul matmul = aten_matmul) {
  const auto rows = x.size(0) * x.size(1);
  auto pre = matmul(x.view({rows, x.size(2)}), w_ih.t(), bias);
  // not a view: the CPU IRNN returns this buffer as y, and an op's output that is a view
  // (of a tensor no one else holds) makes autograd refuse in-place changes of it
  return at::_unsafe_view(pre, {x.size(0), x.size(1), w_ih.size(0)});
}

struct WeightGrads {
  at::Tensor dx, dw_ih, dw_hh, dbias;
};

// The gradients that are sums over time, as one GEMM over the whole sequence once the
// backward scan has produced dpre = dL/d(pre-activation), [T, B, G*H]:
//   [dW_ih | dW_hh | dbias]^T = [x_t | h_{t-1} | 1]^T dpre  (h_{t-1} = h0 at t = 0, else y_{t-1})
// One GEMM with K = T*B and I + H + 1 output rows instead of three (a skinny N = I GEMM,
// the dW_hh GEMM and a column sum): at T = 64, B = 64, I = 42, H = 256 (LSTM, 2 threads,
// min of 20) 17.6 ms against 15.2 + 5.0 + 0.5 ms. dx = dpre @ W_ih if need_dx, else empty.
// Below this many rows (T*B: a step or a few steps of a few sequences) the stacked GEMM's
// set-up (the operand matrix and its copies, the two transposes of the result, their
// threads) costs more than its products, and three products straight into their layouts
// do better: dW_ih = dpre^T x, dW_hh = dpre^T h_prev, dbias = 1^T dpre, through `matmul`
// as the stacked one (so a bf16 layer's products round the same operands). The CPU
// backward op alone (2 threads, H = 256, I = 42; medians of 5 processes, alternating):
// IRNN T = 1, B = 1 207 -> 87 us, LSTM 371 -> 184 us; 4 and 8 rows 1.1-1.9x; from 16 rows
// on neither way is clearly faster.
constexpr int64_t kStackedMinRows = 16;

// `lengths` [B] (int64, or undefined without the option): the rows (t, b) with t past
// their sequence's length ran no step, so their dpre is zero, but their x (padding,
// which may hold anything) and h_{t-1} (an initial state a length-0 row never used)
// must not reach the products either: 0 * NaN is NaN. Those operand rows are zeroed.
inline WeightGrads weight_grads(const at::Tensor& dpre, const at::Tensor& x, const at::Tensor& h0,
                                const at::Tensor& y, const at::Tensor& lengths, const at::Tensor& w_ih,
                                const at::Tensor& w_hh, bool need_dx, Matmul matmul = aten_matmul,
                                Transpose transposed = aten_transposed) {
  const int64_t steps = x.size(0), batch = x.size(1), inputs = x.size(2), hidden = w_hh.size(1);
  const int64_t rows = steps * batch, gh = w_hh.size(0);
  auto dpre2d = dpre.view({rows, gh});
  WeightGrads grads;
  grads.dx = need_dx ? matmul(dpre2d, w_ih, std::nullopt).view(x.sizes()) : at::empty({0}, x.options());
  const at::Tensor inactive =  // [T*B, 1]: row (t, b) past its length
      lengths.defined() ? (at::arange(steps, lengths.options()).unsqueeze(1) >= lengths.unsqueeze(0))
                              .view({rows, 1})
                              .to(x.device())
                        : at::Tensor();
  if (rows < kStackedMinRows) {  // each gradient straight into its own layout
    const auto dpre_t = dpre2d.t();
    auto x2d = x.view({rows, inputs});
    auto h_prev = steps == 1 ? h0 : at::cat({h0, y.slice(0, 0, steps - 1).reshape({rows - batch, hidden})}, 0);
    if (inactive.defined()) {
      x2d = x2d.masked_fill(inactive, 0);
      h_prev = h_prev.masked_fill(inactive, 0);
    }
    grads.dw_ih = matmul(dpre_t, x2d, std::nullopt);
    grads.dw_hh = matmul(dpre_t, h_prev, std::nullopt);
    grads.dbias = matmul(at::ones({1, rows}, dpre.options()), dpre2d, std::nullopt).view({gh});
    return grads;
  }
  // [T*B, I + H + 1]: each row is [x_t | h_{t-1} | 1] of one (t, b)
  auto operands = at::empty({rows, inputs + hidden + 1}, x.options());
  operands.narrow(1, 0, inputs).copy_(x.view({rows, inputs}));
  auto h_prev = operands.narrow(1, inputs, hidden);
  h_prev.narrow(0, 0, batch).copy_(h0);
  if (steps > 1) h_prev.narrow(0, batch, rows - batch).copy_(y.slice(0, 0, steps - 1).reshape({rows - batch, hidden}));
  operands.narrow(1, inputs + hidden, 1).fill_(1);
  if (inactive.defined()) {  // the bias column too: its dpre is zero there
    if (operands.is_cpu()) {   // only the inactive rows: a third of the broadcast masked_fill's time
      operands.index_fill_(0, inactive.view({rows}).nonzero().view({-1}), 0);
    } else {  // no nonzero, which would wait for the device
      operands.masked_fill_(inactive, 0);
    }
  }
  auto stacked = matmul(operands.t(), dpre2d, std::nullopt);  // [I + H + 1, G*H]
  grads.dw_ih = transposed(stacked.narrow(0, 0, inputs));
  grads.dw_hh = transposed(stacked.narrow(0, inputs, hidden));
  grads.dbias = stacked[inputs + hidden].clone();
  return grads;
}

}  // namespace fused_rnn
