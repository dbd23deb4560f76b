// The IRNN's fused_rnn:: ops on CUDA tensors: the persistent scans (persistent_scan.cuh)
// with the GEMMs around them (cuBLAS through ATen, in float32), and the single step,
// launched on the current stream of the inputs' device. The scans take the
// per-sequence options (recurrent mask, lengths, hidden clip) of fused_rnn.irnn.
#include <torch/library.h>

#include "common.cuh"

namespace fused_rnn {
namespace cuda {
namespace {

std::tuple<at::Tensor, at::Tensor> irnn_scan_forward(const at::Tensor& x_in, const at::Tensor& h0_in,
                                                      const at::Tensor& w_ih_in, const at::Tensor& w_hh_in,
                                                      const std::optional<at::Tensor>& bias,
                                                      const std::optional<at::Tensor>& recurrent_mask,
                                                      const std::optional<at::Tensor>& lengths,
                                                      std::optional<double> hidden_clip) {
  FUSED_RNN_EXCLUDE_AUTOCAST;
  const auto x = x_in.contiguous(), h0 = h0_in.contiguous();
  const auto w_ih = w_ih_in.contiguous(), w_hh = w_hh_in.contiguous();
  check_cuda_layer(x, {{&h0, "h0"}}, w_ih, w_hh, bias, 1);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t steps = x.size(0), batch = x.size(1), hidden = w_hh.size(1);
  const CudaScanOptions scan_options(x, hidden, recurrent_mask, lengths, hidden_clip);
  if (steps == 0 || batch == 0 || hidden == 0) return {x.new_zeros({steps, batch, hidden}), h0.clone()};
  const ScanPlan plan = plan_or_fail(x, 1, hidden, false);
  auto pre = input_projection(f32(x), f32(w_ih), f32(bias));  // [T, B, H] float32
  auto y = at::empty({steps, batch, hidden}, x.options());
  auto state = at::empty({2, batch, hidden}, pre.options());
  const auto h0_f = f32(h0);
  dispatch_dtype(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    ForwardArgs<scalar_t> args{ptr<float>(pre), ptr<float>(h0_f), nullptr, ptr<scalar_t>(w_hh), ptr<scalar_t>(y),
                               ptr<float>(state), nullptr, steps, batch, hidden};
    scan_options.fill(args);
    check_cooperative_launch(launch_scan_forward<scalar_t, 1>(args, plan, at::cuda::getCurrentCUDAStream()),
                             "IRNN scan");
  });
  return {y, state[(steps - 1) % 2].to(x.scalar_type(), /*non_blocking=*/false, /*copy=*/true)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> irnn_scan_backward(
    const at::Tensor& grad_y_in, const at::Tensor& grad_h_n_in, const at::Tensor& x_in, const at::Tensor& h0_in,
    const at::Tensor& w_ih_in, const at::Tensor& w_hh_in, const at::Tensor& y_in, bool grad_x,
    const std::optional<at::Tensor>& recurrent_mask, const std::optional<at::Tensor>& lengths,
    std::optional<double> hidden_clip) {
  FUSED_RNN_EXCLUDE_AUTOCAST;
  const auto grad_y = grad_y_in.contiguous(), grad_h_n = grad_h_n_in.contiguous();
  const auto x = x_in.contiguous(), h0 = h0_in.contiguous(), y = y_in.contiguous();
  const auto w_ih = w_ih_in.contiguous(), w_hh = w_hh_in.contiguous();
  check_cuda_layer(x, {{&h0, "h0"}, {&grad_h_n, "grad_h_n"}}, w_ih, w_hh, std::nullopt, 1);
  const int64_t steps = x.size(0), batch = x.size(1), hidden = w_hh.size(1);
  for (const auto& [tensor, name] : {std::make_pair(&grad_y, "grad_y"), std::make_pair(&y, "y")}) {
    check_tensor(*tensor, name, c10::DeviceType::CUDA, x.scalar_type(), &x);
    check_shape(*tensor, name, {steps, batch, hidden});
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const auto dtype = x.scalar_type();
  const CudaScanOptions scan_options(x, hidden, recurrent_mask, lengths, hidden_clip);
  if (steps == 0 || batch == 0 || hidden == 0) {
    return {grad_x ? at::zeros_like(x) : at::empty({0}, x.options()), grad_h_n.clone(), at::zeros_like(w_ih),
            at::zeros_like(w_hh), at::zeros({hidden}, w_hh.options())};
  }
  const ScanPlan plan = plan_or_fail(x, 1, hidden, true);
  const auto options = x.options().dtype(at::kFloat);
  auto dz = at::empty({steps, batch, hidden}, options);
  auto dh0 = at::empty({batch, hidden}, options);
  const auto grad_h_n_f = f32(grad_h_n);
  dispatch_dtype(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    BackwardArgs<scalar_t> args{ptr<scalar_t>(grad_y), ptr<float>(grad_h_n_f), ptr<scalar_t>(y), nullptr, nullptr,
                                nullptr, ptr<scalar_t>(w_hh), ptr<float>(dz), nullptr, ptr<float>(dh0),
                                steps, batch, hidden};
    scan_options.fill(args);
    check_cooperative_launch(launch_scan_backward<scalar_t, 1>(args, plan, at::cuda::getCurrentCUDAStream()),
                             "IRNN backward scan");
  });
  auto grads = weight_grads(dz, f32(x), scan_options.masked(f32(h0)), scan_options.masked(f32(y)),
                            scan_options.lengths, f32(w_ih), f32(w_hh), grad_x);
  return {grads.dx.to(dtype), dh0.to(dtype), grads.dw_ih.to(dtype), grads.dw_hh.to(dtype), grads.dbias.to(dtype)};
}

at::Tensor irnn_step(const at::Tensor& x_in, const at::Tensor& h_in, const at::Tensor& w_ih, const at::Tensor& w_hh,
                     const std::optional<at::Tensor>& bias) {
  FUSED_RNN_EXCLUDE_AUTOCAST;
  const auto x = x_in.contiguous(), h = h_in.contiguous();
  check_step(x, h, w_ih, w_hh, bias, 1);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto z = step_preactivation(x, h, w_ih, w_hh, bias);
  auto h_new = at::empty_like(h);
  dispatch_dtype(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    check_launch(launch_irnn_step<scalar_t>(ptr<float>(z), ptr<scalar_t>(h_new), h_new.numel(),
                                            at::cuda::getCurrentCUDAStream()),
                 "IRNN step");
  });
  return h_new;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> irnn_step_backward(
    const at::Tensor& grad_h_new_in, const at::Tensor& x_in, const at::Tensor& h_in, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const at::Tensor& h_new_in) {
  FUSED_RNN_EXCLUDE_AUTOCAST;
  const auto x = x_in.contiguous(), h = h_in.contiguous();
  const auto grad_h_new = grad_h_new_in.contiguous(), h_new = h_new_in.contiguous();
  check_step(x, h, w_ih, w_hh, std::nullopt, 1);
  for (const auto& [tensor, name] : {std::make_pair(&grad_h_new, "grad_h_new"), std::make_pair(&h_new, "h_new")}) {
    check_tensor(*tensor, name, c10::DeviceType::CUDA, x.scalar_type(), &x);
    check_shape(*tensor, name, h.sizes());
  }
  const c10::cuda::CUDAGuard guard(x.device());
  auto dz = at::empty(h.sizes(), h.options().dtype(at::kFloat));
  dispatch_dtype(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    check_launch(launch_irnn_step_backward<scalar_t>(ptr<scalar_t>(grad_h_new), ptr<scalar_t>(h_new),
                                                     ptr<float>(dz), dz.numel(), at::cuda::getCurrentCUDAStream()),
                 "IRNN step backward");
  });
  return step_grads(dz, x, h, w_ih, w_hh);
}

}  // namespace
}  // namespace cuda
}  // namespace fused_rnn

TORCH_LIBRARY_IMPL(fused_rnn, CUDA, m) {
  m.impl("irnn_scan_forward", &fused_rnn::cuda::irnn_scan_forward);
  m.impl("irnn_scan_backward", &fused_rnn::cuda::irnn_scan_backward);
  m.impl("irnn_step", &fused_rnn::cuda::irnn_step);
  m.impl("irnn_step_backward", &fused_rnn::cuda::irnn_step_backward);
}
