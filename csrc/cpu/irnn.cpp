// Fused IRNN (ReLU RNN) scans on the CPU.
//
// Forward:  pre = x W_ih^T + bias (one GEMM, written straight into y), then for each
//           step y_t = relu(y_t + y_{t-1} W_hh^T): one BLAS call accumulating into
//           y_t in place and one vectorised ReLU pass. No allocation inside the loop.
// Backward: g = dL/dh_T; for t = T-1..0: dz_t = (dy_t + g) * [y_t > 0]; g = dz_t W_hh.
//           dh0 = g; the weight gradients are GEMMs over all of dz afterwards.
// Each thread runs both scans on its own slice of the batch (see parallel_batch).
#include <torch/library.h>

#include <vector>

#include "../cell_math.h"
#include "blas.h"
#include "common.h"

namespace fused_rnn {
namespace cpu {
namespace {

template <typename scalar_t>
FUSED_RNN_INLINE inline void relu_rows(scalar_t* z, int64_t count) {
#pragma omp simd
  for (int64_t j = 0; j < count; ++j) z[j] = cell::relu(z[j]);
}

template <typename scalar_t>
FUSED_RNN_INLINE inline void relu_clipped_rows(scalar_t* z, int64_t count, scalar_t clip) {
#pragma omp simd
  for (int64_t j = 0; j < count; ++j) z[j] = cell::relu_clipped(z[j], clip);
}

// dz = (dy + g) * [y > 0], elementwise over `count` elements.
template <typename scalar_t>
FUSED_RNN_INLINE inline void relu_backward_rows(const scalar_t* dy, const scalar_t* g, const scalar_t* y, scalar_t* dz, int64_t count) {
#pragma omp simd
  for (int64_t j = 0; j < count; ++j) dz[j] = cell::relu_backward(dy[j] + g[j], y[j]);
}

// dz = (dy + g) * [0 < y < clip]
template <typename scalar_t>
FUSED_RNN_INLINE inline void relu_clipped_backward_rows(const scalar_t* dy, const scalar_t* g, const scalar_t* y,
                                                           scalar_t* dz, int64_t count, scalar_t clip) {
#pragma omp simd
  for (int64_t j = 0; j < count; ++j) dz[j] = cell::relu_clipped_backward(dy[j] + g[j], y[j], clip);
}

std::tuple<at::Tensor, at::Tensor> irnn_scan_forward(const at::Tensor& x_in, const at::Tensor& h0_in,
                                                      const at::Tensor& w_ih_in, const at::Tensor& w_hh_in,
                                                      const std::optional<at::Tensor>& bias,
                                                      const std::optional<at::Tensor>& recurrent_mask,
                                                      const std::optional<at::Tensor>& lengths,
                                                      std::optional<double> hidden_clip) {
  FUSED_RNN_EXCLUDE_AUTOCAST;
  if (reduced_precision(x_in)) {
    const Bf16Scope bf16_products(x_in.scalar_type() == at::kBFloat16);
    check_layer_tensors(x_in, {{&h0_in, "h0"}}, w_ih_in, w_hh_in, bias, 1, c10::DeviceType::CPU,
                        {at::kBFloat16, at::kHalf});
    auto [y, h_n] = irnn_scan_forward(to_float32(x_in), to_float32(h0_in), to_float32(w_ih_in), to_float32(w_hh_in),
                                      to_float32(bias), to_float32(recurrent_mask), lengths, hidden_clip);
    return {y.to(x_in.scalar_type()), h_n.to(x_in.scalar_type())};
  }
  const auto x = x_in.contiguous(), h0 = h0_in.contiguous();
  const auto w_ih = w_ih_in.contiguous(), w_hh = w_hh_in.contiguous();
  check_layer(x, {{&h0, "h0"}}, w_ih, w_hh, bias, 1);
  const int64_t steps = x.size(0), batch = x.size(1), hidden = w_hh.size(1);
  const ScanOptions options(x, hidden, recurrent_mask, lengths);
  TORCH_CHECK(!hidden_clip.has_value() || *hidden_clip > 0, "fused_rnn: hidden_clip must be positive");
  if (steps == 0) return {x.new_empty({0, batch, hidden}), h0.clone()};
  auto y = input_projection(x, w_ih, bias, sequence_matmul);  // [T, B, H]: z_t, then h_t in place
  const RowIsa isa = row_isa();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "irnn_scan_forward", [&] {
    scalar_t* y_data = y.data_ptr<scalar_t>();
    const scalar_t* mask = options.mask_data<scalar_t>();
    const int64_t* lengths_data = options.lengths_data();
    const int64_t step_elems = batch * hidden;
    // a per-thread buffer of masked h_{t-1} rows, made before the threads start
    std::vector<scalar_t> masked(mask != nullptr ? step_elems : 0);
    const bool pack = packs_weights(steps, batch);
    const auto packed = pack_recurrent(w_hh.const_data_ptr<scalar_t>(), true, hidden, hidden, pack);
    parallel_batch(batch, [&](int64_t b0, int64_t b1) {
      const int64_t rows = b1 - b0, offset = b0 * hidden;
      // z [rows, H] += h_prev [rows, H] @ W_hh^T
      const RecurrentGemm<scalar_t> recurrent(w_hh.const_data_ptr<scalar_t>(), true, rows, hidden, hidden, &packed,
                                              pack);
      for (int64_t t = 0; t < steps; ++t) {
        const scalar_t* h_prev = t == 0 ? h0.const_data_ptr<scalar_t>() : y_data + (t - 1) * step_elems;
        scalar_t* z = y_data + t * step_elems + offset;
        if (mask != nullptr) {
          mask_rows(h_prev, mask, masked.data() + offset, b0, b1, hidden);
          recurrent(masked.data() + offset, 1, z);
        } else {
          recurrent(h_prev + offset, 1, z);
        }
        with_row_isa(isa, [&]() FUSED_RNN_INLINE {
          if (hidden_clip.has_value()) {
            relu_clipped_rows(z, rows * hidden, static_cast<scalar_t>(*hidden_clip));
          } else {
            relu_rows(z, rows * hidden);
          }
        });
        for (int64_t b = b0; b < b1 && lengths_data != nullptr; ++b) {  // past its length a row keeps its state
          if (!step_active(lengths_data, t, b)) std::memcpy(z + (b - b0) * hidden, h_prev + b * hidden,
                                                            hidden * sizeof(scalar_t));
        }
      }
    });
  });
  auto h_n = last_step(y);
  options.zero_beyond_lengths(y);
  return {y, h_n};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> irnn_scan_backward(
    const at::Tensor& grad_y_in, const at::Tensor& grad_h_n_in, const at::Tensor& x_in, const at::Tensor& h0_in,
    const at::Tensor& w_ih_in, const at::Tensor& w_hh_in, const at::Tensor& y_in, bool grad_x,
    const std::optional<at::Tensor>& recurrent_mask, const std::optional<at::Tensor>& lengths,
    std::optional<double> hidden_clip) {
  FUSED_RNN_EXCLUDE_AUTOCAST;
  if (reduced_precision(x_in)) {
    const Bf16Scope bf16_products(x_in.scalar_type() == at::kBFloat16);
    const auto dtype = x_in.scalar_type();
    // y holds h in the inputs' dtype: compare it with the bound as y stores it
    const auto clip = hidden_clip.has_value()
                          ? std::optional<double>(at::scalar_tensor(*hidden_clip, at::TensorOptions(dtype)).item<double>())
                          : std::nullopt;
    auto [dx, dh0, dw_ih, dw_hh, dbias] = irnn_scan_backward(
        to_float32(grad_y_in), to_float32(grad_h_n_in), to_float32(x_in), to_float32(h0_in), to_float32(w_ih_in),
        to_float32(w_hh_in), to_float32(y_in), grad_x, to_float32(recurrent_mask), lengths, clip);
    return {dx.to(dtype), dh0.to(dtype), dw_ih.to(dtype), dw_hh.to(dtype), dbias.to(dtype)};
  }
  const auto grad_y = grad_y_in.contiguous(), grad_h_n = grad_h_n_in.contiguous();
  const auto x = x_in.contiguous(), h0 = h0_in.contiguous(), y = y_in.contiguous();
  const auto w_ih = w_ih_in.contiguous(), w_hh = w_hh_in.contiguous();
  check_layer(x, {{&h0, "h0"}, {&grad_h_n, "grad_h_n"}}, w_ih, w_hh, std::nullopt, 1);
  check_cpu_float(grad_y, "grad_y", x.scalar_type());
  check_cpu_float(y, "y", x.scalar_type());
  const int64_t steps = x.size(0), batch = x.size(1), hidden = w_hh.size(1);
  TORCH_CHECK(grad_y.sizes() == y.sizes() && y.dim() == 3 && y.size(0) == steps && y.size(1) == batch &&
                  y.size(2) == hidden,
              "fused_rnn: grad_y and y must be [T, B, H]");
  const ScanOptions options(x, hidden, recurrent_mask, lengths);
  if (steps == 0) {
    return {grad_x ? at::zeros_like(x) : at::empty({0}, x.options()), grad_h_n.clone(), at::zeros_like(w_ih),
            at::zeros_like(w_hh),
            at::zeros({hidden}, w_hh.options())};
  }
  const auto plan = plan_backward(x, w_ih, w_hh, grad_x);
  auto dz = at::empty_like(y);              // [T, B, H]
  auto carry = grad_h_n.clone();            // [B, H]: dL/dh_t from step t+1 (and from h_T)
  auto saved = options.lengths.defined() ? at::empty_like(carry) : at::Tensor();  // rows past their length
  const RowIsa isa = row_isa();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "irnn_scan_backward", [&] {
    const scalar_t* y_data = y.const_data_ptr<scalar_t>();
    const scalar_t* dy_data = grad_y.const_data_ptr<scalar_t>();
    scalar_t* dz_data = dz.data_ptr<scalar_t>();
    scalar_t* carry_data = carry.data_ptr<scalar_t>();
    scalar_t* saved_data = saved.defined() ? saved.data_ptr<scalar_t>() : nullptr;
    const scalar_t* mask = options.mask_data<scalar_t>();
    const int64_t* lengths_data = options.lengths_data();
    const int64_t step_elems = batch * hidden;
    parallel_batch(batch, [&](int64_t b0, int64_t b1) {
      const int64_t rows = b1 - b0, offset = b0 * hidden;
      // g [rows, H] = dz_t [rows, H] @ W_hh [H, H]
      BackwardStepGemm<scalar_t> step_gemm(plan, hidden, b0, rows);
      scalar_t* g = carry_data + offset;
      for (int64_t t = steps - 1; t >= 0; --t) {
        const int64_t base = t * step_elems + offset;
        scalar_t* dz_t = dz_data + base;
        with_row_isa(isa, [&]() FUSED_RNN_INLINE {
          if (hidden_clip.has_value()) {
            relu_clipped_backward_rows(dy_data + base, g, y_data + base, dz_t, rows * hidden,
                                       static_cast<scalar_t>(*hidden_clip));
          } else {
            relu_backward_rows(dy_data + base, g, y_data + base, dz_t, rows * hidden);
          }
        });
        for (int64_t b = b0; b < b1 && lengths_data != nullptr; ++b) {  // no step past a row's length
          if (!step_active(lengths_data, t, b)) std::memset(dz_t + (b - b0) * hidden, 0, hidden * sizeof(scalar_t));
        }
        save_inactive(lengths_data, t, carry_data, saved_data, b0, b1, hidden);
        step_gemm(t, dz_t, g);
        if (mask != nullptr || lengths_data != nullptr) finish_carry(lengths_data, mask, t, carry_data, saved_data,
                                                                     b0, b1, hidden);
      }
    });
  });
  auto grads = weight_grads(dz, x, options.masked(h0), options.masked(y), options.lengths, w_ih, w_hh,
                            grad_x && !plan.dx_in_step, sequence_matmul, transposed);
  if (plan.dx_in_step) grads.dx = plan.dx;
  return {grads.dx, carry, grads.dw_ih, grads.dw_hh, grads.dbias};
}

// One step is the scan with T = 1, so the step and the scan cannot drift apart.
at::Tensor irnn_step(const at::Tensor& x, const at::Tensor& h, const at::Tensor& w_ih, const at::Tensor& w_hh,
                     const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2, "fused_rnn: x must be 2-D [B, I], got ", x.sizes());
  return std::get<1>(irnn_scan_forward(x.unsqueeze(0), h, w_ih, w_hh, bias, std::nullopt, std::nullopt, std::nullopt));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> irnn_step_backward(
    const at::Tensor& grad_h_new, const at::Tensor& x, const at::Tensor& h, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const at::Tensor& h_new) {
  TORCH_CHECK(x.dim() == 2, "fused_rnn: x must be 2-D [B, I], got ", x.sizes());
  auto grads = irnn_scan_backward(at::zeros_like(h_new).unsqueeze(0), grad_h_new, x.unsqueeze(0), h, w_ih, w_hh,
                                  h_new.unsqueeze(0), true, std::nullopt, std::nullopt, std::nullopt);
  std::get<0>(grads) = std::get<0>(grads).squeeze(0);
  return grads;
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_rnn, CPU, m) {
  m.impl("irnn_scan_forward", &irnn_scan_forward);
  m.impl("irnn_scan_backward", &irnn_scan_backward);
  m.impl("irnn_step", &irnn_step);
  m.impl("irnn_step_backward", &irnn_step_backward);
}

}  // namespace cpu
}  // namespace fused_rnn
