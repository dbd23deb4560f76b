// How the persistent CUDA scans (persistent_scan.cu) split a layer across thread blocks,
// and how much shared memory each block needs: plain host/device arithmetic, with no
// CUDA or torch include, so that the kernels, their launcher and the CPU-only build
// (fused_rnn._C.cuda_scan_plan, used by dispatch and the tests) all size the same
// buffers from the same constants.
//
// Each block owns `units` consecutive hidden units and keeps, for the whole sequence,
// the rows of W_hh that produce them (forward: the G gate rows of each unit, [G, units,
// H]; backward: the columns of W_hh for those units, [units, G*H]) in shared memory, in
// the weights' dtype. A step stages the exchanged state in passes of `rows` batch rows
// (forward: h_{t-1}, H floats a row; backward: dL/d(pre-activation) of step t+1, G*H
// floats a row) in float32 next to them.
#pragma once

#include <cstdint>

namespace fused_rnn {
namespace cuda {

// 8 warps per block: each warp owns whole units, so a block needs at least this many
// units to keep its warps busy (plan_scan gives it that many when H allows).
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Batch rows staged per pass: a power of two up to kMaxRows (kernels are instantiated for
// each). Every weight read from shared memory is reused for `rows` batch rows, and each
// thread holds G * rows accumulators (64 for the LSTM at 16 rows). The passes of a step
// run one after another, each with two block barriers and a dependent L2 read of its
// staged rows (about 0.7 us), so fewer passes save time, while rows past the batch in
// the last pass are wasted arithmetic. plan_scan picks the rows that minimise the step
// time of bench/gpu_model.py's model of the kernel, counted in instruction issues of a
// warp scheduler (step_issues); a test checks the choice against the model's own
// timing of every candidate on each GPU it knows (tests/test_dispatch.py).
constexpr int kMaxRows = 16;
// 0.7 us of fixed cost per pass at ~1.7 GHz with two warps per scheduler (one constant
// for every GPU: the model's A100, H100 and H200 clocks lie within 20% of it)
constexpr double kPassIssues = 600.0;
// staging a byte from L2 at one SM's share of its bandwidth (~45 GB/s), in issues
constexpr double kIssuesPerStagedByte = 0.019;

// The model's time of one step with `rows` rows per pass, in issue slots.
inline double step_issues(int64_t gates, int64_t hidden, int64_t units, bool backward, int64_t batch, int64_t rows) {
  const double per_warp = static_cast<double>((units + kWarps - 1) / kWarps);
  const double k_iterations = static_cast<double>(hidden) / 32.0;
  const double dots = backward ? gates * k_iterations * (1 + 2 * rows) + rows * 10.0
                               : k_iterations * (gates + rows + gates * rows) + gates * rows * 10.0;
  const double staged = static_cast<double>(rows * (backward ? gates : 1) * hidden * 4);
  const double pass = per_warp * (dots + 60.0) * 2.0 + kPassIssues + kIssuesPerStagedByte * staged;
  return static_cast<double>((batch + rows - 1) / rows) * pass;
}

constexpr int64_t align16(int64_t bytes) { return (bytes + 15) / 16 * 16; }

struct ScanPlan {
  int64_t units = 0;         // hidden units per block
  int64_t blocks = 0;        // blocks in the cooperative grid (<= SMs: one block per SM)
  int64_t rows = 1;          // batch rows staged per pass (1, 2, 4, 8 or 16)
  int64_t weight_bytes = 0;  // the W_hh slice, at the start of shared memory
  int64_t stage_bytes = 0;   // `rows` staged rows of float32, after the (16-byte aligned) slice
  int64_t smem_bytes = 0;    // dynamic shared memory per block
  bool fits = false;         // smem_bytes <= the per-block limit
};

// gates: 1 (IRNN) or 4 (LSTM); weight_size: bytes per weight (4, or 2 for bf16/fp16).
// The forward and the backward need the same slice and differ in the staged rows. A
// plan that fits at batch 1 fits at every batch (one row per pass at worst).
inline ScanPlan plan_scan(int64_t gates, int64_t weight_size, int64_t hidden, bool backward, int64_t sm_count,
                          int64_t smem_per_block, int64_t batch = 1) {
  ScanPlan plan;
  if (hidden <= 0 || sm_count <= 0) return plan;
  const int64_t spread = (hidden + sm_count - 1) / sm_count;
  plan.units = spread > kWarps ? spread : (hidden < kWarps ? hidden : kWarps);
  plan.blocks = (hidden + plan.units - 1) / plan.units;
  plan.weight_bytes = align16(gates * plan.units * hidden * weight_size);
  const int64_t row_bytes = (backward ? gates : 1) * hidden * static_cast<int64_t>(sizeof(float));
  plan.rows = 1;
  double best = step_issues(gates, hidden, plan.units, backward, batch, 1);
  for (int64_t rows = 2; rows <= kMaxRows && plan.weight_bytes + rows * row_bytes <= smem_per_block; rows *= 2) {
    const double issues = step_issues(gates, hidden, plan.units, backward, batch, rows);
    if (issues < best) best = issues, plan.rows = rows;
  }
  plan.stage_bytes = plan.rows * row_bytes;
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
