// The fused_rnn:: ops on CUDA tensors: argument checks, the GEMMs around each scan
// (cuBLAS through ATen, in float32), and the launches of scan_kernels.cu on the
// current stream of the inputs' device.
//
// dtypes: float32, bfloat16, float16 inputs and weights. The input projection, the
// state (h, c), the saved LSTM cells and gates, every accumulation and the
// pre-activation gradients are float32; outputs and gradients are returned in the
// inputs' dtype. The scans keep W_hh on chip (scan_plan.h): a layer whose H does not
// fit, or a device that cannot launch cooperatively, gets an error naming the limit;
// dispatch (fused_rnn/functional.py, through cuda_scan_unsupported below) sends such
// layers to the Triton backend before they get here. The scans take the per-sequence
// options (recurrent mask, lengths, IRNN hidden clip) of fused_rnn.irnn / lstm.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <map>
#include <mutex>
#include <string>
#include <tuple>

#include "../layer_common.h"
#include "scan_kernels.h"

namespace fused_rnn {
namespace cuda {

namespace {

void check_cuda_layer(const at::Tensor& x, std::initializer_list<std::pair<const at::Tensor*, const char*>> states,
                      const at::Tensor& w_ih, const at::Tensor& w_hh, const std::optional<at::Tensor>& bias,
                      int64_t gates) {
  check_layer_tensors(x, states, w_ih, w_hh, bias, gates, c10::DeviceType::CUDA,
                      {at::kFloat, at::kBFloat16, at::kHalf});
}

void check_shape(const at::Tensor& t, const char* name, at::IntArrayRef sizes) {
  TORCH_CHECK(t.sizes() == sizes, "fused_rnn: ", name, " must be ", sizes, ", got ", t.sizes());
}

void check_launch(cudaError_t error, const char* what) {
  if (error == cudaSuccess) return;
  (void)cudaGetLastError();  // clear it, or the next kernel launch check would report it as its own
  TORCH_CHECK(false, "fused_rnn: ", what, " failed: ", cudaGetErrorString(error));
}

// Calls fn with a value of the CUDA element type of `dtype`.
template <typename Fn>
void dispatch_dtype(at::ScalarType dtype, const Fn& fn) {
  switch (dtype) {
    case at::kFloat:
      fn(float{});
      break;
    case at::kBFloat16:
      fn(__nv_bfloat16{});
      break;
    case at::kHalf:
      fn(__half{});
      break;
    default:
      TORCH_CHECK(false, "fused_rnn: the CUDA kernels take float32, bfloat16 or float16, got ", dtype);
  }
}

template <typename scalar_t>
scalar_t* ptr(const at::Tensor& t) {
  return reinterpret_cast<scalar_t*>(t.data_ptr());
}

at::Tensor f32(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

std::optional<at::Tensor> f32(const std::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional<at::Tensor>(f32(*t)) : std::nullopt;
}

// Why a scan of this shape cannot run on `device` (empty: it can): W_hh must fit in the
// shared memory of one block per SM, and the device must launch cooperatively.
std::string scan_unsupported(int device, int64_t gates, at::ScalarType dtype, int64_t hidden, bool backward,
                             ScanPlan* plan_out) {
  const cudaDeviceProp* props = at::cuda::getDeviceProperties(device);
  const int64_t weight_size = c10::elementSize(dtype);
  const ScanPlan plan = plan_scan(gates, weight_size, hidden, backward, props->multiProcessorCount,
                                  static_cast<int64_t>(props->sharedMemPerBlockOptin));
  if (plan_out != nullptr) *plan_out = plan;
  if (!props->cooperativeLaunch) return std::string(props->name) + " cannot launch cooperative kernels";
  if (!plan.fits) {
    return "H = " + std::to_string(hidden) + " needs " + std::to_string(plan.smem_bytes) +
           " bytes of shared memory per block on " + std::to_string(props->multiProcessorCount) +
           " SMs (limit " + std::to_string(props->sharedMemPerBlockOptin) + "); the largest " +
           c10::toString(dtype) + (gates == 1 ? " IRNN" : " LSTM") + " kept on chip on " + props->name +
           " has H = " +
           std::to_string(max_hidden_on_chip(gates, weight_size, props->multiProcessorCount,
                                             static_cast<int64_t>(props->sharedMemPerBlockOptin)));
  }
  bool fits = false;
  cudaError_t error = cudaSuccess;
  c10::cuda::CUDAGuard guard(device);
  dispatch_dtype(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    error = gates == 1 ? check_scan_residency<scalar_t, 1>(plan, backward, &fits)
                       : check_scan_residency<scalar_t, 4>(plan, backward, &fits);
  });
  if (error != cudaSuccess) {
    (void)cudaGetLastError();  // a reason to fall back, not an error for the next launch to find
    return std::string("occupancy query failed: ") + cudaGetErrorString(error);
  }
  if (!fits) return std::to_string(plan.blocks) + " blocks of " + std::to_string(kThreads) + " threads cannot all be resident";
  return "";
}

struct ScanCheck {
  std::string reason;  // empty: the scan can run
  ScanPlan plan;
};

// scan_unsupported, cached per (device, cell, dtype, H, direction): the answer cannot
// change, and the occupancy query costs microseconds on a backend meant for
// latency-bound small batches.
const ScanCheck& checked_scan(int device, int64_t gates, at::ScalarType dtype, int64_t hidden, bool backward) {
  static std::mutex mutex;
  static std::map<std::tuple<int, int64_t, int, int64_t, bool>, ScanCheck> cache;
  const auto key = std::make_tuple(device, gates, static_cast<int>(dtype), hidden, backward);
  std::lock_guard<std::mutex> lock(mutex);
  auto found = cache.find(key);
  if (found == cache.end()) {
    ScanCheck check;
    check.reason = scan_unsupported(device, gates, dtype, hidden, backward, &check.plan);
    found = cache.emplace(key, std::move(check)).first;
  }
  return found->second;  // std::map never moves its elements
}

// The plan of one direction; both directions must fit, so that a forward never
// succeeds only for its backward to fail.
// The per-sequence options as the kernels take them: the mask in float32 on the
// device, the lengths as int64 on the device (checked to lie in [0, T]).
struct CudaScanOptions {
  at::Tensor mask, lengths;
  float clip = 0.0f;
  bool has_clip = false;

  CudaScanOptions(const at::Tensor& x, int64_t hidden, const std::optional<at::Tensor>& recurrent_mask,
                  const std::optional<at::Tensor>& lengths_in, std::optional<double> hidden_clip = std::nullopt) {
    const int64_t steps = x.size(0), batch = x.size(1);
    if (recurrent_mask.has_value()) {
      check_tensor(*recurrent_mask, "recurrent_mask", c10::DeviceType::CUDA, x.scalar_type(), &x);
      TORCH_CHECK(recurrent_mask->dim() == 2 && recurrent_mask->size(0) == batch && recurrent_mask->size(1) == hidden,
                  "fused_rnn: recurrent_mask must be [", batch, ", ", hidden, "], got ", recurrent_mask->sizes());
      mask = recurrent_mask->to(at::kFloat).contiguous();
    }
    if (lengths_in.has_value()) {
      TORCH_CHECK(!at::isFloatingType(lengths_in->scalar_type()) && lengths_in->scalar_type() != at::kBool,
                  "fused_rnn: lengths must hold integers, got ", lengths_in->scalar_type());
      TORCH_CHECK(lengths_in->dim() == 1 && lengths_in->size(0) == batch, "fused_rnn: lengths must be [", batch,
                  "], got ", lengths_in->sizes());
      auto host = lengths_in->to(at::kCPU, at::kLong);
      TORCH_CHECK(batch == 0 || (host.min().item<int64_t>() >= 0 && host.max().item<int64_t>() <= steps),
                  "fused_rnn: lengths must lie in [0, ", steps, "]");
      lengths = lengths_in->to(x.device(), at::kLong).contiguous();
    }
    if (hidden_clip.has_value()) {
      TORCH_CHECK(*hidden_clip > 0, "fused_rnn: hidden_clip must be positive");
      clip = static_cast<float>(*hidden_clip);
      has_clip = true;
    }
  }

  template <typename Args>
  void fill(Args& args) const {
    args.mask = mask.defined() ? mask.const_data_ptr<float>() : nullptr;
    args.lengths = lengths.defined() ? lengths.const_data_ptr<int64_t>() : nullptr;
    args.clip = clip;
    args.has_clip = has_clip;
  }

  // h_{t-1} as the recurrent product reads it (for the weight gradients)
  at::Tensor masked(const at::Tensor& h) const { return mask.defined() ? h * mask : h; }
};

ScanPlan plan_or_fail(const at::Tensor& x, int64_t gates, int64_t hidden, bool backward) {
  for (const bool direction : {false, true}) {
    const ScanCheck& check = checked_scan(x.get_device(), gates, x.scalar_type(), hidden, direction);
    TORCH_CHECK(check.reason.empty(), "fused_rnn: the CUDA ", gates == 1 ? "IRNN" : "LSTM",
                " scan keeps W_hh on chip: ", check.reason, ". Use backend='triton' (backend='auto' does).");
  }
  return checked_scan(x.get_device(), gates, x.scalar_type(), hidden, backward).plan;
}

// ---------------------------------------------------------------------------
// IRNN
// ---------------------------------------------------------------------------
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
    check_launch(launch_scan_forward<scalar_t, 1>(args, plan, at::cuda::getCurrentCUDAStream()), "IRNN scan");
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
    check_launch(launch_scan_backward<scalar_t, 1>(args, plan, at::cuda::getCurrentCUDAStream()),
                 "IRNN backward scan");
  });
  auto grads = weight_grads(dz, f32(x), scan_options.masked(f32(h0)), scan_options.masked(f32(y)), f32(w_ih),
                            f32(w_hh), grad_x);
  return {grads.dx.to(dtype), dh0.to(dtype), grads.dw_ih.to(dtype), grads.dw_hh.to(dtype), grads.dbias.to(dtype)};
}

// A single step: the two GEMMs in float32, then one pointwise kernel. Unlike the scans
// it has no limit on H (nothing is kept on chip across steps).
at::Tensor step_preactivation(const at::Tensor& x, const at::Tensor& h, const at::Tensor& w_ih,
                              const at::Tensor& w_hh, const std::optional<at::Tensor>& bias) {
  auto pre = bias.has_value() ? at::addmm(f32(*bias), f32(x), f32(w_ih).t()) : at::mm(f32(x), f32(w_ih).t());
  return pre.addmm_(f32(h), f32(w_hh).t());  // [B, G*H]
}

void check_step(const at::Tensor& x, const at::Tensor& h, const at::Tensor& w_ih, const at::Tensor& w_hh,
                const std::optional<at::Tensor>& bias, int64_t gates, const at::Tensor* c = nullptr) {
  TORCH_CHECK(x.dim() == 2, "fused_rnn: x must be 2-D [B, I], got ", x.sizes());
  const auto x3 = x.unsqueeze(0);
  if (c == nullptr) {
    check_cuda_layer(x3, {{&h, "h"}}, w_ih, w_hh, bias, gates);
  } else {
    check_cuda_layer(x3, {{&h, "h"}, {c, "c"}}, w_ih, w_hh, bias, gates);
  }
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

// The weight gradients of one step from dpre [B, G*H] (float32), in the inputs' dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> step_grads(const at::Tensor& dpre,
                                                                                  const at::Tensor& x,
                                                                                  const at::Tensor& h,
                                                                                  const at::Tensor& w_ih,
                                                                                  const at::Tensor& w_hh) {
  const auto dtype = x.scalar_type();
  return {at::mm(dpre, f32(w_ih)).to(dtype), at::mm(dpre, f32(w_hh)).to(dtype), at::mm(dpre.t(), f32(x)).to(dtype),
          at::mm(dpre.t(), f32(h)).to(dtype), dpre.sum(0).to(dtype)};
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

// ---------------------------------------------------------------------------
// LSTM
// ---------------------------------------------------------------------------
// The output projection of nn.LSTM(proj_size) runs on the CPU kernels and the torch
// backend; dispatch (fused_rnn.functional.OPTION_SUPPORT) never sends it here.
void check_no_projection(const std::optional<at::Tensor>& w_hr) {
  TORCH_CHECK(!w_hr.has_value(), "fused_rnn: the CUDA LSTM scans have no output projection (w_hr, proj_size > 0); "
              "use backend='torch'");
}

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
    check_launch(launch_scan_forward<scalar_t, 4>(args, plan, at::cuda::getCurrentCUDAStream()), "LSTM scan");
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
    check_launch(launch_scan_backward<scalar_t, 4>(args, plan, at::cuda::getCurrentCUDAStream()),
                 "LSTM backward scan");
  });
  auto grads = weight_grads(dgates, f32(x), scan_options.masked(f32(h0)), scan_options.masked(f32(y)), f32(w_ih),
                            f32(w_hh), grad_x);
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

std::string cuda_scan_unsupported(int device, int64_t gates, at::ScalarType dtype, int64_t hidden) {
  for (const bool backward : {false, true}) {
    const ScanCheck& check = checked_scan(device, gates, dtype, hidden, backward);
    if (!check.reason.empty()) return check.reason;
  }
  return "";
}

}  // namespace cuda
}  // namespace fused_rnn

TORCH_LIBRARY_IMPL(fused_rnn, CUDA, m) {
  m.impl("irnn_scan_forward", &fused_rnn::cuda::irnn_scan_forward);
  m.impl("irnn_scan_backward", &fused_rnn::cuda::irnn_scan_backward);
  m.impl("irnn_step", &fused_rnn::cuda::irnn_step);
  m.impl("irnn_step_backward", &fused_rnn::cuda::irnn_step_backward);
  m.impl("lstm_scan_forward", &fused_rnn::cuda::lstm_scan_forward);
  m.impl("lstm_scan_backward", &fused_rnn::cuda::lstm_scan_backward);
  m.impl("lstm_step", &fused_rnn::cuda::lstm_step);
  m.impl("lstm_step_backward", &fused_rnn::cuda::lstm_step_backward);
}
