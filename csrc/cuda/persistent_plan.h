// How the persistent CUDA scans (persistent_scan.cu) split a layer across thread blocks,
// and how much shared memory each block needs: plain host/device arithmetic, with no
// CUDA or torch include, so that the kernels, their launcher and the CPU-only build
// (fused_rnn._C.cuda_scan_plan, used by dispatch and the tests) all size the same
// buffers from the same constants.
//
// Each block owns `units` consecutive hidden units and keeps, for the whole sequence,
// the rows of W_hh that produce them (forward: the G gate rows of each unit, [G, units,
// H]; backward: the columns of W_hh for those units, [units, G*H]) in shared memory, in
// the weights' dtype. A step stages kRows batch rows of the exchanged state (forward:
// h_{t-1}, H floats a row; backward: dL/d(pre-activation) of step t+1, G*H floats a row)
// in float32 next to them.
#pragma once

#include <cstdint>

namespace fused_rnn {
namespace cuda {

// 8 warps per block: each warp owns whole units, so a block needs at least this many
// units to keep its warps busy (plan_scan gives it that many when H allows).
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Batch rows staged per pass: every weight read from shared memory is reused for
// kRows rows, and each thread holds G * kRows accumulators (16 for the LSTM).
constexpr int kRows = 4;

constexpr int64_t align16(int64_t bytes) { return (bytes + 15) / 16 * 16; }

struct ScanPlan {
  int64_t units = 0;         // hidden units per block
  int64_t blocks = 0;        // blocks in the cooperative grid (<= SMs: one block per SM)
  int64_t weight_bytes = 0;  // the W_hh slice, at the start of shared memory
  int64_t stage_bytes = 0;   // kRows staged rows of float32, after the (16-byte aligned) slice
  int64_t smem_bytes = 0;    // dynamic shared memory per block
  bool fits = false;         // smem_bytes <= the per-block limit
};

// gates: 1 (IRNN) or 4 (LSTM); weight_size: bytes per weight (4, or 2 for bf16/fp16).
// The forward and the backward need the same slice and differ in the staged rows.
inline ScanPlan plan_scan(int64_t gates, int64_t weight_size, int64_t hidden, bool backward, int64_t sm_count,
                          int64_t smem_per_block) {
  ScanPlan plan;
  if (hidden <= 0 || sm_count <= 0) return plan;
  const int64_t spread = (hidden + sm_count - 1) / sm_count;
  plan.units = spread > kWarps ? spread : (hidden < kWarps ? hidden : kWarps);
  plan.blocks = (hidden + plan.units - 1) / plan.units;
  plan.weight_bytes = align16(gates * plan.units * hidden * weight_size);
  plan.stage_bytes = kRows * (backward ? gates : 1) * hidden * static_cast<int64_t>(sizeof(float));
  plan.smem_bytes = plan.weight_bytes + plan.stage_bytes;
  plan.fits = plan.smem_bytes <= smem_per_block && plan.blocks <= sm_count;
  return plan;
}

// The largest H such that the forward and the backward scan of every H' <= H fit on a
// device with `sm_count` SMs and `smem_per_block` bytes of shared memory per block
// (0 if not even H = 1 does).
inline int64_t max_hidden_on_chip(int64_t gates, int64_t weight_size, int64_t sm_count, int64_t smem_per_block) {
  int64_t hidden = 0;
  while (plan_scan(gates, weight_size, hidden + 1, false, sm_count, smem_per_block).fits &&
         plan_scan(gates, weight_size, hidden + 1, true, sm_count, smem_per_block).fits) {
    ++hidden;
  }
  return hidden;
}

}  // namespace cuda
}  // namespace fused_rnn
