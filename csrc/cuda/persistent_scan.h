// Host interface of the persistent CUDA scans and the step kernels (persistent_scan.cu),
// and the argument structs of the kernels (persistent_scan.cuh):
// raw pointers and sizes only, so that persistent_scan.cu compiles without torch (which
// is how bench/cuda_resources.py compiles it for ptxas -v) and irnn.cu / lstm.cu, the ATen
// side, launches them.
//
// Layouts (T steps, B batch, H hidden, G = 1 for the IRNN, 4 for the LSTM with gates
// i, f, g, o), all contiguous. scalar_t is float, __nv_bfloat16 or __half; every state,
// pre-activation and gradient buffer named *_f32 is float32.
#pragma once

#include <cstdint>

#include "persistent_plan.h"

#if !defined(FUSED_RNN_EMULATE_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace fused_rnn {
namespace cuda {

template <typename scalar_t>
struct ForwardArgs {
  float* pre;               // [T, B, G*H] x W_ih^T + bias in; LSTM: the activated gates out
  const float* h0;          // [B, H]
  const float* c0;          // [B, H] (LSTM)
  const scalar_t* w_hh;     // [G*H, H]
  scalar_t* y;              // [T, B, H]
  float* state;             // [2, B, H]: h_t, exchanged between blocks (h_T ends in state[(T-1) % 2])
  float* cells;             // [T, B, H] c_1..c_T (LSTM)
  int64_t steps, batch, hidden;
  // options (fused_rnn.irnn / lstm), null / false when off:
  const float* mask = nullptr;       // [B, H] recurrent dropout mask on h_{t-1}
  const int64_t* lengths = nullptr;  // [B]: rows stop after their length (state frozen, y zero)
  float clip = 0.0f;                 // IRNN: h = min(relu(z), clip) when has_clip
  bool has_clip = false;
};

template <typename scalar_t>
struct BackwardArgs {
  const scalar_t* grad_y;   // [T, B, H]
  const float* grad_h_n;    // [B, H]
  const scalar_t* y;        // [T, B, H] (IRNN: h_t, whose sign gives relu')
  const float* c0;          // [B, H] (LSTM)
  const float* cells;       // [T, B, H] (LSTM)
  const float* gates;       // [T, B, 4H] activated (LSTM)
  const scalar_t* w_hh;     // [G*H, H]
  float* dpre;              // [T, B, G*H] out: dL/d(pre-activation)
  float* grad_c;            // [B, H] (LSTM): dL/dc_T in, dL/dc_0 out
  float* grad_h0;           // [B, H] out
  int64_t steps, batch, hidden;
  const float* mask = nullptr;       // options as in ForwardArgs
  const int64_t* lengths = nullptr;
  float clip = 0.0f;
  bool has_clip = false;
};

#if !defined(FUSED_RNN_EMULATE_CUDA)
// Launch one persistent scan on `stream` with `plan` (from plan_scan for this device):
// a cooperative launch of plan.blocks blocks of kThreads threads. Returns the CUDA
// error of the launch (cudaErrorCooperativeLaunchTooLarge if the blocks cannot all be
// resident at once).
template <typename scalar_t, int G>
cudaError_t launch_scan_forward(const ForwardArgs<scalar_t>& args, const ScanPlan& plan, cudaStream_t stream);
template <typename scalar_t, int G>
cudaError_t launch_scan_backward(const BackwardArgs<scalar_t>& args, const ScanPlan& plan, cudaStream_t stream);
// Whether `plan` can be launched cooperatively on the current device: every block
// resident at once with its shared memory (sets the kernel's shared-memory limit).
template <typename scalar_t, int G>
cudaError_t check_scan_residency(const ScanPlan& plan, bool backward, bool* fits);

// One step's pointwise part, after the GEMMs (n = B*H elements):
// IRNN: h_new = relu(z).
template <typename scalar_t>
cudaError_t launch_irnn_step(const float* z, scalar_t* h_new, int64_t n, cudaStream_t stream);
// IRNN backward: dz = grad_h_new * [h_new > 0].
template <typename scalar_t>
cudaError_t launch_irnn_step_backward(const scalar_t* grad_h_new, const scalar_t* h_new, float* dz, int64_t n,
                                      cudaStream_t stream);
// LSTM: gates [B, 4H] pre-activations in, activations out; c [B, H] -> c_new, h_new.
template <typename scalar_t>
cudaError_t launch_lstm_step(float* gates, const scalar_t* c, scalar_t* c_new, scalar_t* h_new, int64_t batch,
                             int64_t hidden, cudaStream_t stream);
// LSTM backward: dgates [B, 4H] and grad_c [B, H] = dL/dc from grad_h_new, grad_c_new.
template <typename scalar_t>
cudaError_t launch_lstm_step_backward(const scalar_t* grad_h_new, const scalar_t* grad_c_new, const scalar_t* c,
                                      const scalar_t* c_new, const float* gates, float* dgates, scalar_t* grad_c,
                                      int64_t batch, int64_t hidden, cudaStream_t stream);
#endif

}  // namespace cuda
}  // namespace fused_rnn
