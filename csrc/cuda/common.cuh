// What the CUDA ops of both cells (irnn.cu, lstm.cu) share on the ATen side: argument
// checks, dtype dispatch, whether and how a persistent scan fits the device (cached per
// device and shape), the per-sequence options as kernel arguments, and the GEMMs of a
// single step.
//
// dtypes: float32, bfloat16, float16 inputs and weights. The input projection, the
// state (h, c), the saved LSTM cells and gates, every accumulation and the
// pre-activation gradients are float32; outputs and gradients are returned in the
// inputs' dtype. The scans keep W_hh on chip (persistent_plan.h): a layer whose H does
// not fit, or a device that cannot launch cooperatively, gets an error naming the
// limit; dispatch (fused_rnn/dispatch.py, through cuda_scan_unsupported in device.cu)
// sends such layers to the Triton backend before they get here.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <torch/version.h>

#include <limits>
#include <map>
#include <mutex>
#include <string>
#include <tuple>

#include "../layer_common.h"
#include "persistent_scan.h"

namespace fused_rnn {
namespace cuda {

inline void check_cuda_layer(const at::Tensor& x,
                             std::initializer_list<std::pair<const at::Tensor*, const char*>> states,
                             const at::Tensor& w_ih, const at::Tensor& w_hh, const std::optional<at::Tensor>& bias,
                             int64_t gates) {
  check_layer_tensors(x, states, w_ih, w_hh, bias, gates, c10::DeviceType::CUDA,
                      {at::kFloat, at::kBFloat16, at::kHalf});
}

inline void check_shape(const at::Tensor& t, const char* name, at::IntArrayRef sizes) {
  TORCH_CHECK(t.sizes() == sizes, "fused_rnn: ", name, " must be ", sizes, ", got ", t.sizes());
}

inline void check_launch(cudaError_t error, const char* what) {
  if (error == cudaSuccess) return;
  (void)cudaGetLastError();  // clear it, or the next kernel launch check would report it as its own
  TORCH_CHECK(false, "fused_rnn: ", what, " failed: ", cudaGetErrorString(error));
}

// A cooperative launch the device refused at run time (MPS limiting the SMs, another
// cooperative kernel holding them, a smaller MIG slice): nothing ran, and the caller
// (fused_rnn/functional.py) runs the call on the next backend instead. The message's
// start is what it looks for.
constexpr const char* kCooperativeRefused = "fused_rnn: cooperative launch refused";

inline void check_cooperative_launch(cudaError_t error, const char* what) {
  if (error == cudaSuccess) return;
  (void)cudaGetLastError();
  TORCH_CHECK(false, kCooperativeRefused, " (", what, "): ", cudaGetErrorString(error));
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

inline at::Tensor f32(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

inline std::optional<at::Tensor> f32(const std::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional<at::Tensor>(f32(*t)) : std::nullopt;
}

constexpr const char* kOccupancyQueryFailed = "occupancy query failed: ";

// Why a scan of this shape cannot run on `device` (empty: it can): W_hh must fit in the
// shared memory of one block per SM, and the device must launch cooperatively.
inline std::string scan_unsupported(int device, int64_t gates, at::ScalarType dtype, int64_t hidden, bool backward,
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
    return std::string(kOccupancyQueryFailed) + cudaGetErrorString(error);
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
// latency-bound small batches; a failed query is transient and is asked again next
// time. (An inline function: one cache for the whole extension.)
inline ScanCheck checked_scan(int device, int64_t gates, at::ScalarType dtype, int64_t hidden, bool backward) {
  static std::mutex mutex;
  static std::map<std::tuple<int, int64_t, int, int64_t, bool>, ScanCheck> cache;
  const auto key = std::make_tuple(device, gates, static_cast<int>(dtype), hidden, backward);
  std::lock_guard<std::mutex> lock(mutex);
  auto found = cache.find(key);
  if (found != cache.end()) return found->second;
  ScanCheck check;
  check.reason = scan_unsupported(device, gates, dtype, hidden, backward, &check.plan);
  if (check.reason.rfind(kOccupancyQueryFailed, 0) != 0) cache.emplace(key, check);
  return check;
}

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

// The plan of one direction; both directions must fit, so that a forward never
// succeeds only for its backward to fail.
inline ScanPlan plan_or_fail(const at::Tensor& x, int64_t gates, int64_t hidden, bool backward) {
  for (const bool direction : {false, true}) {
    const ScanCheck check = checked_scan(x.get_device(), gates, x.scalar_type(), hidden, direction);
    TORCH_CHECK(check.reason.empty(), "fused_rnn: the CUDA ", gates == 1 ? "IRNN" : "LSTM",
                " scan keeps W_hh on chip: ", check.reason, ". Use backend='triton' (backend='auto' does).");
  }
  // the rows per pass for this batch (a plan that fits at batch 1 fits at every batch)
  const cudaDeviceProp* props = at::cuda::getDeviceProperties(x.get_device());
  const ScanPlan plan = plan_scan(gates, c10::elementSize(x.scalar_type()), hidden, backward,
                                  props->multiProcessorCount, static_cast<int64_t>(props->sharedMemPerBlockOptin),
                                  x.size(1));
  TORCH_INTERNAL_ASSERT(plan.fits, "fused_rnn: a scan plan that fits at batch 1 must fit at every batch");
  return plan;
}

// Products with 16-bit operands in float32, without a float32 copy of the operand that
// is already 16-bit (the weights of a single step: a step op called once per generated
// character would otherwise convert all of W_ih and W_hh every call). cuBLAS multiplies
// bf16/fp16 operands exactly and accumulates in float32 (out_dtype, torch >= 2.8), so
//   mm_f32(a16, b16) is the float32 product of the same values, and
//   mm_f32_split(a32, b16) splits the float32 operand into hi + lo, its rounding to b's
//   dtype and the rounding of the remainder: 16 (bf16) or 22 (fp16) of its 24 bits, two
//   16-bit products, relative error ~2^-17 / 2^-23, far below the result's own rounding
//   to the inputs' dtype. For fp16 the float32 operand is first scaled by a power of two
//   (exact) that puts its largest magnitude at 2^14, inside fp16's range.
// With an older torch, both fall back to float32 copies.
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)
#define FUSED_RNN_MM_OUT_DTYPE 1
#endif

inline at::Tensor mm_f32(const at::Tensor& a, const at::Tensor& b) {
#if defined(FUSED_RNN_MM_OUT_DTYPE)
  if (a.scalar_type() != at::kFloat && a.scalar_type() == b.scalar_type()) return at::mm(a, b, at::kFloat);
#endif
  return at::mm(f32(a), f32(b));
}

inline at::Tensor mm_f32_split(const at::Tensor& a, const at::Tensor& b) {
  const auto dtype = b.scalar_type();
#if defined(FUSED_RNN_MM_OUT_DTYPE)
  if (dtype == at::kBFloat16 || dtype == at::kHalf) {
    at::Tensor scaled = a, unscale;
    if (dtype == at::kHalf) {
      const auto exponent = at::floor(at::log2(a.abs().amax().clamp_min(std::numeric_limits<float>::min())));
      scaled = a * at::exp2(14.0 - exponent);
      unscale = at::exp2(exponent - 14.0);
    }
    const auto hi = scaled.to(dtype);
    const auto lo = (scaled - hi.to(at::kFloat)).to(dtype);
    auto out = at::mm(hi, b, at::kFloat).add_(at::mm(lo, b, at::kFloat));
    return unscale.defined() ? out.mul_(unscale) : out;
  }
#endif
  return at::mm(a, f32(b));
}

// A single step: the two GEMMs with float32 results, then one pointwise kernel. Unlike
// the scans it has no limit on H (nothing is kept on chip across steps).
inline at::Tensor step_preactivation(const at::Tensor& x, const at::Tensor& h, const at::Tensor& w_ih,
                                     const at::Tensor& w_hh, const std::optional<at::Tensor>& bias) {
  auto pre = mm_f32(x, w_ih.t()).add_(mm_f32(h, w_hh.t()));  // [B, G*H]
  return bias.has_value() ? pre.add_(*bias) : pre;
}

inline void check_step(const at::Tensor& x, const at::Tensor& h, const at::Tensor& w_ih, const at::Tensor& w_hh,
                const std::optional<at::Tensor>& bias, int64_t gates, const at::Tensor* c = nullptr) {
  TORCH_CHECK(x.dim() == 2, "fused_rnn: x must be 2-D [B, I], got ", x.sizes());
  const auto x3 = x.unsqueeze(0);
  if (c == nullptr) {
    check_cuda_layer(x3, {{&h, "h"}}, w_ih, w_hh, bias, gates);
  } else {
    check_cuda_layer(x3, {{&h, "h"}, {c, "c"}}, w_ih, w_hh, bias, gates);
  }
}

// The gradients of one step from dpre [B, G*H] (float32), in the inputs' dtype.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> step_grads(const at::Tensor& dpre,
                                                                                         const at::Tensor& x,
                                                                                         const at::Tensor& h,
                                                                                         const at::Tensor& w_ih,
                                                                                         const at::Tensor& w_hh) {
  const auto dtype = x.scalar_type();
  return {mm_f32_split(dpre, w_ih).to(dtype), mm_f32_split(dpre, w_hh).to(dtype),
          mm_f32_split(dpre.t(), x).to(dtype), mm_f32_split(dpre.t(), h).to(dtype), dpre.sum(0).to(dtype)};
}

// The output projection of nn.LSTM(proj_size) runs on the CPU kernels and the torch
// backend; dispatch (fused_rnn/dispatch.py OPTION_SUPPORT) never sends it here.
inline void check_no_projection(const std::optional<at::Tensor>& w_hr) {
  TORCH_CHECK(!w_hr.has_value(), "fused_rnn: the CUDA LSTM scans have no output projection (w_hr, proj_size > 0); "
              "use backend='torch'");
}

}  // namespace cuda
}  // namespace fused_rnn
