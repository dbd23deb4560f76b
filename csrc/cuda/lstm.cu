// The LSTM's fused_rnn:: ops on CUDA tensors (gate order i, f, g, o): the persistent
// scans (persistent_scan.cuh) with the GEMMs around them (cuBLAS through ATen, in
// float32), and the single step, launched on the current stream of the inputs' device.
// The scans take the recurrent mask and lengths of fused_rnn.lstm; not the projection.
#include <torch/library.h>

#include "common.cuh"

namespace fused_rnn {
namespace cuda {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_scan_forward(
    const at::Tensor& x_in, const at::Tensor& h0_in, const at::Tensor& c0_in, const at::Tensor& w_ih_in,
    const at::Tensor& w_hh_in, const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& recurrent_mask,
    const std::optional<at::Tensor>& lengths, const std::optional<at::Tensor>& w_hr) {
  FUSED_RNN_EXCLUDE_AUTOCAST;
  check_no_projection(w_hr);
  const auto x = x_in.contiguous(), h0 = h0_in.contiguous(), c0 = c0_in.contiguous();
  const auto w_ih = w_ih_in.contiguous(), w_hh = w_hh_in.contiguous();
  check_cuda_layer(x, {{&h0, "h0"}, {&c0, "c0"}}, w_ih, w_hh, bias, 4);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t steps = x.size(0), batch = x.size(1), hidden = w_hh.size(1);
  const CudaScanOptions scan_options(x, hidden, recurrent_mask, lengths);
  const auto options = x.options().dtype(at::kFloat);
  if (steps == 0 || batch == 0 || hidden == 0) {
    return {x.new_zeros({steps, batch, hidden}), h0.clone(), c0.clone(), at::zeros({steps, batch, hidden}, options),
            at::zeros({steps, batch, 4 * hidden}, options)};
  }
  const ScanPlan plan = plan_or_fail(x, 4, hidden, false);
  auto gates = input_projection(f32(x), f32(w_ih), f32(bias));  // [T, B, 4H]: pre-activations, then activations
  auto y = at::empty({steps, batch, hidden}, x.options());
  auto state = at::empty({2, batch, hidden}, options);
  auto cells = at::empty({steps, batch, hidden}, options);
  const auto h0_f = f32(h0), c0_f = f32(c0);
  dispatch_dtype(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    ForwardArgs<scalar_t> args{ptr<float>(gates), ptr<float>(h0_f), ptr<float>(c0_f), ptr<scalar_t>(w_hh),
                               ptr<scalar_t>(y), ptr<float>(state), ptr<float>(cells), steps, batch, hidden};
    scan_options.fill(args);
    check_cooperative_launch(launch_scan_forward<scalar_t, 4>(args, plan, at::cuda::getCurrentCUDAStream()),
                             "LSTM scan");
  });
  const auto dtype = x.scalar_type();
  return {y, state[(steps - 1) % 2].to(dtype, false, true), cells[steps - 1].to(dtype, false, true), cells, gates};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_scan_backward(
    const at::Tensor& grad_y_in, const at::Tensor& grad_h_n_in, const at::Tensor& grad_c_n_in, const at::Tensor& x_in,
    const at::Tensor& h0_in, const at::Tensor& c0_in, const at::Tensor& w_ih_in, const at::Tensor& w_hh_in,
    const at::Tensor& y_in, const at::Tensor& cells_in, const at::Tensor& gates_in, bool grad_x,
    const std::optional<at::Tensor>& recurrent_mask, const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& w_hr) {
  FUSED_RNN_EXCLUDE_AUTOCAST;
  check_no_projection(w_hr);
  const auto no_grad_w_hr = at::empty({0}, w_hh_in.options());
  const auto grad_y = grad_y_in.contiguous(), grad_h_n = grad_h_n_in.contiguous();
  const auto grad_c_n = grad_c_n_in.contiguous(), x = x_in.contiguous();
  const auto h0 = h0_in.contiguous(), c0 = c0_in.contiguous(), y = y_in.contiguous();
  const auto w_ih = w_ih_in.contiguous(), w_hh = w_hh_in.contiguous();
  const auto cells = cells_in.contiguous(), gates = gates_in.contiguous();
  check_cuda_layer(x, {{&h0, "h0"}, {&c0, "c0"}, {&grad_h_n, "grad_h_n"}, {&grad_c_n, "grad_c_n"}}, w_ih, w_hh,
                   std::nullopt, 4);
  const int64_t steps = x.size(0), batch = x.size(1), hidden = w_hh.size(1);
  const auto dtype = x.scalar_type();
  for (const auto& [tensor, name] : {std::make_pair(&grad_y, "grad_y"), std::make_pair(&y, "y")}) {
    check_tensor(*tensor, name, c10::DeviceType::CUDA, dtype, &x);
    check_shape(*tensor, name, {steps, batch, hidden});
  }
  // the forward saves cells and gates in float32 whatever the inputs' dtype
  check_tensor(cells, "cells", c10::DeviceType::CUDA, at::kFloat, &x);
  check_shape(cells, "cells", {steps, batch, hidden});
  check_tensor(gates, "gates", c10::DeviceType::CUDA, at::kFloat, &x);
  check_shape(gates, "gates", {steps, batch, 4 * hidden});
  const c10::cuda::CUDAGuard guard(x.device());
  const CudaScanOptions scan_options(x, hidden, recurrent_mask, lengths);
  if (steps == 0 || batch == 0 || hidden == 0) {
    return {grad_x ? at::zeros_like(x) : at::empty({0}, x.options()), grad_h_n.clone(), grad_c_n.clone(),
            at::zeros_like(w_ih), at::zeros_like(w_hh), at::zeros({4 * hidden}, w_hh.options()), no_grad_w_hr};
  }
  const ScanPlan plan = plan_or_fail(x, 4, hidden, true);
  const auto options = x.options().dtype(at::kFloat);
  auto dgates = at::empty({steps, batch, 4 * hidden}, options);
  auto dc = grad_c_n.to(at::kFloat, /*non_blocking=*/false, /*copy=*/true);  // dc_T in, dc_0 out
  auto dh0 = at::empty({batch, hidden}, options);
  const auto grad_h_n_f = f32(grad_h_n), c0_f = f32(c0);
  dispatch_dtype(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    BackwardArgs<scalar_t> args{ptr<scalar_t>(grad_y), ptr<float>(grad_h_n_f), ptr<scalar_t>(y), ptr<float>(c0_f),
                                ptr<float>(cells), ptr<float>(gates), ptr<scalar_t>(w_hh), ptr<float>(dgates),
                                ptr<float>(dc), ptr<float>(dh0), steps, batch, hidden};
    scan_options.fill(args);
    check_cooperative_launch(launch_scan_backward<scalar_t, 4>(args, plan, at::cuda::getCurrentCUDAStream()),
                             "LSTM backward scan");
  });
  auto grads = weight_grads(dgates, f32(x), scan_options.masked(f32(h0)), scan_options.masked(f32(y)),
                            scan_options.lengths, f32(w_ih), f32(w_hh), grad_x);
  return {grads.dx.to(dtype), dh0.to(dtype), dc.to(dtype), grads.dw_ih.to(dtype), grads.dw_hh.to(dtype),
          grads.dbias.to(dtype), no_grad_w_hr};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_step(const at::Tensor& x_in, const at::Tensor& h_in,
                                                         const at::Tensor& c_in, const at::Tensor& w_ih,
                                                         const at::Tensor& w_hh,
                                                         const std::optional<at::Tensor>& bias) {
  FUSED_RNN_EXCLUDE_AUTOCAST;
  const auto x = x_in.contiguous(), h = h_in.contiguous(), c = c_in.contiguous();
  check_step(x, h, w_ih, w_hh, bias, 4, &c);
  const c10::cuda::CUDAGuard guard(x.device());
  auto gates = step_preactivation(x, h, w_ih, w_hh, bias);  // [B, 4H] float32
  auto h_new = at::empty_like(h), c_new = at::empty_like(c);
  dispatch_dtype(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    check_launch(launch_lstm_step<scalar_t>(ptr<float>(gates), ptr<scalar_t>(c), ptr<scalar_t>(c_new),
                                            ptr<scalar_t>(h_new), h.size(0), h.size(1),
                                            at::cuda::getCurrentCUDAStream()),
                 "LSTM step");
  });
  return {h_new, c_new, gates};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_step_backward(
    const at::Tensor& grad_h_new_in, const at::Tensor& grad_c_new_in, const at::Tensor& x_in, const at::Tensor& h_in,
    const at::Tensor& c_in, const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& c_new_in,
    const at::Tensor& gates_in) {
  FUSED_RNN_EXCLUDE_AUTOCAST;
  const auto x = x_in.contiguous(), h = h_in.contiguous(), c = c_in.contiguous();
  const auto grad_h_new = grad_h_new_in.contiguous(), grad_c_new = grad_c_new_in.contiguous();
  const auto c_new = c_new_in.contiguous(), gates = gates_in.contiguous();
  check_step(x, h, w_ih, w_hh, std::nullopt, 4, &c);
  for (const auto& [tensor, name] : {std::make_pair(&grad_h_new, "grad_h_new"),
                                     std::make_pair(&grad_c_new, "grad_c_new"), std::make_pair(&c_new, "c_new")}) {
    check_tensor(*tensor, name, c10::DeviceType::CUDA, x.scalar_type(), &x);
    check_shape(*tensor, name, h.sizes());
  }
  check_tensor(gates, "gates", c10::DeviceType::CUDA, at::kFloat, &x);
  check_shape(gates, "gates", {h.size(0), 4 * h.size(1)});
  const c10::cuda::CUDAGuard guard(x.device());
  auto dgates = at::empty(gates.sizes(), gates.options());
  auto grad_c = at::empty_like(c);
  dispatch_dtype(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    check_launch(launch_lstm_step_backward<scalar_t>(ptr<scalar_t>(grad_h_new), ptr<scalar_t>(grad_c_new),
                                                     ptr<scalar_t>(c), ptr<scalar_t>(c_new), ptr<float>(gates),
                                                     ptr<float>(dgates), ptr<scalar_t>(grad_c), h.size(0), h.size(1),
                                                     at::cuda::getCurrentCUDAStream()),
                 "LSTM step backward");
  });
  auto [dx, dh, dw_ih, dw_hh, dbias] = step_grads(dgates, x, h, w_ih, w_hh);
  return {dx, dh, grad_c, dw_ih, dw_hh, dbias};
}

}  // namespace
}  // namespace cuda
}  // namespace fused_rnn

TORCH_LIBRARY_IMPL(fused_rnn, CUDA, m) {
  m.impl("lstm_scan_forward", &fused_rnn::cuda::lstm_scan_forward);
  m.impl("lstm_scan_backward", &fused_rnn::cuda::lstm_scan_backward);
  m.impl("lstm_step", &fused_rnn::cuda::lstm_step);
  m.impl("lstm_step_backward", &fused_rnn::cuda::lstm_step_backward);
}
