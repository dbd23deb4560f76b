// Pointwise maths of the IRNN and LSTM cells, forward and backward: the one
// definition shared by the C++ CPU kernels (csrc/cpu) and the CUDA kernels
// (csrc/cuda). Every function is a scalar function of scalars, so a CPU loop over
// a row auto-vectorises and a CUDA thread calls it per element.
//
// Conventions (PyTorch's): LSTM gate order i, f, g, o; the ReLU derivative is
// [h > 0], 0 at exactly 0 (and 1 where h is NaN, as PyTorch); NaN propagates through
// every forward function.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define FUSED_RNN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FUSED_RNN_HOST_DEVICE inline
#endif

namespace fused_rnn {
namespace cell {

// ---------------------------------------------------------------------------
// exp in float32 without a libm call, so that CPU loops over it vectorise (GCC
// will not vectorise expf without -ffast-math, which would break NaN handling).
// exp(x) = 2^n * exp(r), n = round(x / ln 2), |r| <= ln(2)/2; exp(r) by a degree-6
// Taylor polynomial, whose truncation error r^7/7! < 2e-7 relative on that interval.
// Measured against float64 on sampled floats in [-88, 88]: exp within 3.0 ulp, sigmoid
// within 3.5 ulp, tanh within 4 ulp (worst just above the 0.3 switch below).
// ---------------------------------------------------------------------------
FUSED_RNN_HOST_DEVICE float exp_float(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  // below kMin the result would be subnormal (flushed to 0 here); above kMax this
  // returns inf, a little early (float overflows at 88.72), which keeps 2^n a normal
  // float; the callers, sigmoid and tanh, are then exactly 0 or +-1 either way
  constexpr float kMax = 88.0f;
  constexpr float kMin = -87.3365447504019f;
  // comparisons written so that NaN passes through unchanged
  const float xc = x > kMax ? kMax : (x < kMin ? kMin : x);
  constexpr float kLog2e = 1.44269504088896341f;
  // adding and subtracting 1.5 * 2^23 rounds to the nearest integer in plain SSE2
  constexpr float kRound = 12582912.0f;
  const float n_or_nan = (xc * kLog2e + kRound) - kRound;
  const float n = n_or_nan == n_or_nan ? n_or_nan : 0.0f;  // NaN -> 0 before the int cast; p stays NaN
  // ln 2 split into a part exact in float and a remainder (Cody-Waite reduction)
  const float r = (xc - n * 0.693145751953125f) - n * 1.42860682030941723212e-6f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  // 2^n from its IEEE-754 bit pattern; n is in [-126, 128) after the clamp above
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  const float result = p * scale;
  return x > kMax ? INFINITY : (x < kMin ? 0.0f : result);
#endif
}

FUSED_RNN_HOST_DEVICE float exp_(float x) { return exp_float(x); }
FUSED_RNN_HOST_DEVICE double exp_(double x) { return ::exp(x); }

template <typename T>
FUSED_RNN_HOST_DEVICE T sigmoid(T x) {
  return T(1) / (T(1) + exp_(-x));
}

// tanh(x) = sign(x) * (1 - 2 / (exp(2|x|) + 1)); below |x| = 0.3 that form loses
// relative precision to cancellation, so an odd Taylor polynomial serves there
// (truncation error < 1e-9 relative at |x| = 0.3).
FUSED_RNN_HOST_DEVICE float tanh_(float x) {
#if defined(__CUDA_ARCH__)
  return tanhf(x);
#else
  const float a = x < 0.0f ? -x : x;
  const float large = 1.0f - 2.0f / (exp_float(2.0f * a) + 1.0f);
  const float x2 = x * x;
  float p = -1382.0f / 155925.0f;
  p = p * x2 + 62.0f / 2835.0f;
  p = p * x2 - 17.0f / 315.0f;
  p = p * x2 + 2.0f / 15.0f;
  p = p * x2 - 1.0f / 3.0f;
  const float small = x + x * x2 * p;
  const float signed_large = x < 0.0f ? -large : large;
  // NaN fails `a < 0.3f` and reaches signed_large, which is NaN
  return a < 0.3f ? small : signed_large;
#endif
}
FUSED_RNN_HOST_DEVICE double tanh_(double x) { return ::tanh(x); }

// ---------------------------------------------------------------------------
// IRNN: h = relu(z); dz = dh * [h > 0]
// ---------------------------------------------------------------------------
template <typename T>
FUSED_RNN_HOST_DEVICE T relu(T z) {
  return z < T(0) ? T(0) : z;  // NaN < 0 is false: NaN propagates
}

template <typename T>
FUSED_RNN_HOST_DEVICE T relu_backward(T grad_h, T h) {
  return h <= T(0) ? T(0) : grad_h;  // as PyTorch's threshold_backward: NaN h passes the gradient
}

// The bounded ReLU of hidden_clip: h = min(relu(z), clip); dz = dh * [0 < h < clip]
// (h == clip means z >= clip, where the bound holds h constant). NaN propagates.
template <typename T>
FUSED_RNN_HOST_DEVICE T relu_clipped(T z, T clip) {
  return z < T(0) ? T(0) : (z > clip ? clip : z);
}

template <typename T>
FUSED_RNN_HOST_DEVICE T relu_clipped_backward(T grad_h, T h, T clip) {
  return (h <= T(0) || h >= clip) ? T(0) : grad_h;
}

// ---------------------------------------------------------------------------
// LSTM, one element of one row:
//   i = sigmoid(a_i), f = sigmoid(a_f), g = tanh(a_g), o = sigmoid(a_o)
//   c = f * c_prev + i * g,  h = o * tanh(c)
// The forward keeps the activated gates (i, f, g, o) for the backward.
// ---------------------------------------------------------------------------
template <typename T>
FUSED_RNN_HOST_DEVICE void lstm_forward(
    T& gate_i, T& gate_f, T& gate_g, T& gate_o,  // in: pre-activations; out: activations
    T c_prev, T& c, T& h) {
  gate_i = sigmoid(gate_i);
  gate_f = sigmoid(gate_f);
  gate_g = tanh_(gate_g);
  gate_o = sigmoid(gate_o);
  c = gate_f * c_prev + gate_i * gate_g;
  h = gate_o * tanh_(c);
}

// Given dL/dh and dL/dc flowing into this step (dc already holds the part from
// step t+1), the gradients w.r.t. the four pre-activations and dL/dc_prev.
template <typename T>
FUSED_RNN_HOST_DEVICE void lstm_backward(
    T grad_h, T grad_c, T gate_i, T gate_f, T gate_g, T gate_o, T c, T c_prev,
    T& grad_a_i, T& grad_a_f, T& grad_a_g, T& grad_a_o, T& grad_c_prev) {
  const T tanh_c = tanh_(c);
  const T dc = grad_c + grad_h * gate_o * (T(1) - tanh_c * tanh_c);
  grad_a_o = grad_h * tanh_c * gate_o * (T(1) - gate_o);
  grad_a_i = dc * gate_g * gate_i * (T(1) - gate_i);
  grad_a_f = dc * c_prev * gate_f * (T(1) - gate_f);
  grad_a_g = dc * gate_i * (T(1) - gate_g * gate_g);
  grad_c_prev = dc * gate_f;
}

}  // namespace cell
}  // namespace fused_rnn
