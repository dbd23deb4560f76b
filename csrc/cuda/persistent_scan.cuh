// Persistent CUDA scans for the IRNN and the LSTM, and the pointwise step kernels.
//
// Why persistent, and why a cooperative grid. At small batch sizes a step of a
// recurrence is a GEMV-like product, h_{t-1} [B, H] times W_hh^T: cuDNN (and a
// batch-tiled kernel) reads all of W_hh from L2/HBM at every step and launches at
// least one kernel per step, so a long sequence is bound by per-step latency, not by
// arithmetic. Here W_hh is read once: the hidden units are split across the GPU's SMs
// (one block per SM) and each block keeps the weights of its units in shared memory
// for the whole sequence. The blocks then only exchange the new state every step.
// Two ways to exchange it were considered:
//   - a thread-block cluster (sm_90) sharing h through distributed shared memory:
//     cheap cluster barriers, but a cluster holds at most 8 (16 non-portable) blocks,
//     so 8 x 227 KB of weights: an fp32 LSTM of H ~ 340. Too small for the H = 512 to
//     1024 this backend is for, and sm_80 has no clusters;
//   - a cooperative launch with a grid-wide barrier (cooperative_groups grid.sync()),
//     every block resident at once: all SMs' shared memory (132 x 227 KB on an H100,
//     108 x 163 KB on an A100) holds the weights, on sm_80 and sm_90 alike. A grid
//     barrier costs a few microseconds, about what one cuDNN step costs at B <= 64.
// This file takes the second. h_t goes through global memory (L2) between steps,
// read with ld.global.cg so that no SM serves a stale copy from its L1.
//
// Work in a block: warp w owns units w, w + 8, ...; per step the block stages ROWS
// batch rows of the previous state into shared memory (ROWS from the plan, a template
// parameter: persistent_plan.h says how it is chosen), each warp forms the dot products
// of its units with those rows (lanes split the reduction, then a butterfly sum), and
// lane r applies the cell maths (csrc/cell_math.h) to row r. Before each grid barrier
// every lane asks L2 for what its cell maths read after it (the next step's input
// projection, or in the backward its output gradient, gates and cells): those buffers
// do not depend on the other blocks, so their HBM latency overlaps the barrier's wait
// instead of following it. State, inputs
// projections, accumulation and gradients are float32; only W_hh stays in the
// weights' dtype (bf16/fp16 halve its shared memory). Offsets into [T, B, *] buffers are
// int64: T * B * G * H passes 2^31 at T = 1024, B = 64, H = 8192.
//
// This header holds the device code only. persistent_scan.cu launches it on a GPU; the
// tests also compile it as plain C++ against a CPU emulation of the CUDA execution
// model (tests/cuda_emulation/, FUSED_RNN_EMULATE_CUDA: blocks and threads as host
// threads, barriers, warp shuffles, the grid barrier), which runs the float32 kernels
// against the NumPy reference on a machine without a GPU.
#pragma once

#if !defined(FUSED_RNN_EMULATE_CUDA)
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#include <type_traits>

#include "../cell_math.h"
#include "persistent_scan.h"

namespace fused_rnn {
namespace cuda {
namespace kernels {

namespace cg = cooperative_groups;

__device__ __forceinline__ float to_float(float v) { return v; }

template <typename scalar_t>
__device__ __forceinline__ scalar_t from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }

#if !defined(FUSED_RNN_EMULATE_CUDA)
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

// The block's dynamic shared memory (the emulation gives each block its own).
__device__ __forceinline__ unsigned char* dynamic_shared_memory() {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  return shared_bytes;
}
#endif

// Sum over the warp; every lane gets the total.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Stages `rows` rows of `width` floats, row b0 onwards of `src` ([*, width], written by
// other blocks before the last grid barrier), into `stage` [rows, width], times the
// same rows of `mask` ([*, width], may be null).
__device__ __forceinline__ void stage_rows(float* stage, const float* src, int64_t b0, int rows, int64_t width,
                                           const float* mask = nullptr) {
  const float* first = src + b0 * width;
  const int64_t count = rows * width;
  for (int64_t i = threadIdx.x; i < count; i += kThreads) {
    const float value = __ldcg(first + i);
    stage[i] = mask == nullptr ? value : value * mask[b0 * width + i];
  }
}

__device__ __forceinline__ bool step_active(const int64_t* lengths, int64_t t, int64_t b) {
  return lengths == nullptr || t < lengths[b];
}

// A hint that `address` will be read soon: fetched into L2, nothing waits for it. (The
// emulation reads the byte, so that an address out of bounds shows up there.)
__device__ __forceinline__ void prefetch_l2(const void* address) {
#if defined(FUSED_RNN_EMULATE_CUDA)
  (void)*static_cast<const volatile unsigned char*>(address);
#else
  asm volatile("prefetch.global.L2 [%0];" ::"l"(address));
#endif
}

// acc[q][r] = sum_k stage[r][k] * weights[q][k] for the ROWS staged rows and G weight
// rows of `length` (row q at weights + q * q_stride), summed over the warp.
template <int G, int ROWS, typename scalar_t>
__device__ __forceinline__ void warp_dots(float (&acc)[G][ROWS], const float* stage, const scalar_t* weights,
                                          int64_t q_stride, int64_t length, int lane) {
#pragma unroll
  for (int q = 0; q < G; ++q)
#pragma unroll
    for (int r = 0; r < ROWS; ++r) acc[q][r] = 0.0f;
  for (int64_t k = lane; k < length; k += 32) {
    float s[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) s[r] = stage[r * length + k];  // rows past the batch hold stale values, unused
#pragma unroll
    for (int q = 0; q < G; ++q) {
      const float w = to_float(weights[q * q_stride + k]);
#pragma unroll
      for (int r = 0; r < ROWS; ++r) acc[q][r] = fmaf(w, s[r], acc[q][r]);
    }
  }
#pragma unroll
  for (int q = 0; q < G; ++q)
#pragma unroll
    for (int r = 0; r < ROWS; ++r) acc[q][r] = warp_sum(acc[q][r]);
}

// mine[q] = acc[q][lane] (lanes past ROWS get row 0's, unused): the accumulators stay in
// registers, indexed by constants only, and the cell maths after it exist once, not once
// per row.
template <int G, int ROWS>
__device__ __forceinline__ void pick_lane(float (&mine)[G], const float (&acc)[G][ROWS], int lane) {
#pragma unroll
  for (int q = 0; q < G; ++q) {
    mine[q] = acc[q][0];
#pragma unroll
    for (int r = 1; r < ROWS; ++r)
      if (r == lane) mine[q] = acc[q][r];
  }
}

// Calls fn(b, unit) for every (batch row, hidden unit) whose cell maths this lane does:
// rows b0 + lane of each pass, for the warp's units.
template <int ROWS, typename Fn>
__device__ __forceinline__ void for_each_own_cell(int64_t batch, int64_t u0, int64_t my_units, int warp, int lane,
                                                  const Fn& fn) {
  if (lane >= ROWS) return;
  for (int64_t b = lane; b < batch; b += ROWS)
    for (int64_t u = warp; u < my_units; u += kWarps) fn(b, u0 + u);
}

// ---------------------------------------------------------------------------
// Forward: h_t = cell(pre_t + h_{t-1} W_hh^T). Shared memory: the W_hh rows of this
// block's units, [G][units][H] in scalar_t, then ROWS staged rows of h_{t-1}.
// ---------------------------------------------------------------------------
template <typename scalar_t, int G, int ROWS>
__global__ void __launch_bounds__(kThreads, 1) scan_forward_kernel(ForwardArgs<scalar_t> a, ScanPlan plan) {
  unsigned char* smem = dynamic_shared_memory();
  const int64_t H = a.hidden, B = a.batch, units = plan.units;
  const int64_t u0 = blockIdx.x * units;
  const int64_t my_units = H - u0 < units ? H - u0 : units;
  scalar_t* w_s = reinterpret_cast<scalar_t*>(smem);                 // [G][units][H]
  float* h_s = reinterpret_cast<float*>(smem + plan.weight_bytes);   // [ROWS][H]
  for (int64_t i = threadIdx.x; i < G * my_units * H; i += kThreads) {
    const int64_t q = i / (my_units * H), u = (i / H) % my_units, k = i % H;
    w_s[(q * units + u) * H + k] = a.w_hh[(q * H + u0 + u) * H + k];
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  cg::grid_group grid = cg::this_grid();
  for (int64_t t = 0; t < a.steps; ++t) {
    const float* h_prev = t == 0 ? a.h0 : a.state + ((t - 1) % 2) * B * H;
    float* h_next = a.state + (t % 2) * B * H;
    for (int64_t b0 = 0; b0 < B; b0 += ROWS) {
      const int rows = B - b0 < ROWS ? static_cast<int>(B - b0) : ROWS;
      __syncthreads();  // the last pass (or the weight load) is done with h_s
      stage_rows(h_s, h_prev, b0, rows, H, a.mask);
      __syncthreads();
      for (int64_t u = warp; u < my_units; u += kWarps) {
        float acc[G][ROWS];
        warp_dots<G, ROWS>(acc, h_s, w_s + u * H, units * H, H, lane);
        const int64_t unit = u0 + u;
        float mine[G];  // lane r finishes row b0 + r, with its totals out of the unrolled acc
        pick_lane(mine, acc, lane);
        do {  // (a break ends this lane's row)
          if (lane >= rows) break;
          const int64_t b = b0 + lane;
          const int64_t row = t * B + b;  // int64: the [T, B, *] offsets below pass 2^31
          if (!step_active(a.lengths, t, b)) {  // past its length the row keeps its state; y is zero
            h_next[b * H + unit] = __ldcg(h_prev + b * H + unit);
            if constexpr (G != 1) a.cells[row * H + unit] = t == 0 ? a.c0[b * H + unit] : a.cells[(row - B) * H + unit];
            a.y[row * H + unit] = from_float<scalar_t>(0.0f);
            break;
          }
          float h;
          if constexpr (G == 1) {
            const float z = a.pre[row * H + unit] + mine[0];
            h = a.has_clip ? cell::relu_clipped(z, a.clip) : cell::relu(z);
          } else {
            float* gates = a.pre + row * (G * H) + unit;
            float gi = gates[0] + mine[0], gf = gates[H] + mine[1];
            float gg = gates[2 * H] + mine[2], go = gates[3 * H] + mine[3];
            const float c_prev = t == 0 ? a.c0[b * H + unit] : a.cells[(row - B) * H + unit];
            float c;
            cell::lstm_forward(gi, gf, gg, go, c_prev, c, h);
            gates[0] = gi;
            gates[H] = gf;
            gates[2 * H] = gg;
            gates[3 * H] = go;
            a.cells[row * H + unit] = c;
          }
          h_next[b * H + unit] = h;
          a.y[row * H + unit] = from_float<scalar_t>(h);
        } while (false);
      }
    }
    if (t + 1 < a.steps) {  // the next step's input projection, while the barrier waits
      const float* next = a.pre + (t + 1) * B * (G * H);
      for_each_own_cell<ROWS>(B, u0, my_units, warp, lane, [&](int64_t b, int64_t unit) {
#pragma unroll
        for (int q = 0; q < G; ++q) prefetch_l2(next + b * (G * H) + q * H + unit);
      });
    }
    grid.sync();  // h_t complete (and visible) everywhere before any block reads it
  }
}

// ---------------------------------------------------------------------------
// Backward, in reverse time, then one more pass for dh_0:
//   dh = dy_t + (dpre_{t+1} W_hh, or dh_T at t = T-1)
//   IRNN: dpre_t = dh * [h_t > 0];  LSTM: dpre_t, dc from cell::lstm_backward
//   dh_0 = dpre_0 W_hh  (dc_0 is what grad_c holds at the end)
// Shared memory: W_hh's columns of this block's units, [units][G*H] in scalar_t, then
// ROWS staged rows of dpre_{t+1} ([G*H] floats each).
// ---------------------------------------------------------------------------
template <typename scalar_t, int G, int ROWS>
__global__ void __launch_bounds__(kThreads, 1) scan_backward_kernel(BackwardArgs<scalar_t> a, ScanPlan plan) {
  unsigned char* smem = dynamic_shared_memory();
  const int64_t H = a.hidden, B = a.batch, GH = G * a.hidden, units = plan.units;
  const int64_t u0 = blockIdx.x * units;
  const int64_t my_units = H - u0 < units ? H - u0 : units;
  scalar_t* wt_s = reinterpret_cast<scalar_t*>(smem);                // [units][G*H]: W_hh[j, u0 + u]
  float* d_s = reinterpret_cast<float*>(smem + plan.weight_bytes);   // [ROWS][G*H]
  for (int64_t i = threadIdx.x; i < GH * my_units; i += kThreads) {
    const int64_t j = i / my_units, u = i % my_units;  // consecutive threads read neighbouring columns
    wt_s[u * GH + j] = a.w_hh[j * H + u0 + u];
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  cg::grid_group grid = cg::this_grid();
  for (int64_t s = 0; s <= a.steps; ++s) {
    const int64_t t = a.steps - 1 - s;  // -1: the dh_0 pass
    const bool recurrent = s > 0;       // dpre_{t+1} exists
    for (int64_t b0 = 0; b0 < B; b0 += ROWS) {
      const int rows = B - b0 < ROWS ? static_cast<int>(B - b0) : ROWS;
      __syncthreads();
      if (recurrent) stage_rows(d_s, a.dpre + (t + 1) * B * GH, b0, rows, GH);
      __syncthreads();
      for (int64_t u = warp; u < my_units; u += kWarps) {
        float acc[1][ROWS] = {};
        if (recurrent) warp_dots<1, ROWS>(acc, d_s, wt_s + u * GH, 0, GH, lane);
        const int64_t unit = u0 + u;
        float mine[1];  // lane r finishes row b0 + r, with its totals out of the unrolled acc
        pick_lane(mine, acc, lane);
        do {  // (a break ends this lane's row)
          if (lane >= rows) break;
          const int64_t b = b0 + lane;
          // dL/dh_t through h_{t+1}: (dpre_{t+1} W_hh) * mask, or dL/dh_T passed through the
          // steps past the row's length
          const float through_next = recurrent && step_active(a.lengths, t + 1, b)
                                         ? mine[0] * (a.mask == nullptr ? 1.0f : a.mask[b * H + unit])
                                         : a.grad_h_n[b * H + unit];
          if (t < 0) {
            a.grad_h0[b * H + unit] = through_next;
            break;
          }
          const int64_t row = t * B + b;
          if (!step_active(a.lengths, t, b)) {  // no step here: zero dpre, dL/dc passes through
            for (int q = 0; q < G; ++q) a.dpre[row * GH + q * H + unit] = 0.0f;
            break;
          }
          const float dh = to_float(a.grad_y[row * H + unit]) + through_next;
          if constexpr (G == 1) {
            // relu' from the sign of h_t as stored in y (the inputs' dtype), as the Triton
            // scan: a positive h below float16's smallest subnormal (6e-8) reads as 0
            // y holds h in scalar_t: compare with the bound as y stores it (a clip that bf16
            // cannot represent rounds, and the clipped h with it)
            const float h = to_float(a.y[row * H + unit]);
            a.dpre[row * H + unit] = a.has_clip ? cell::relu_clipped_backward(dh, h, to_float(from_float<scalar_t>(a.clip)))
                                                : cell::relu_backward(dh, h);
          } else {
            const float* gates = a.gates + row * GH + unit;
            const float c_prev = t == 0 ? a.c0[b * H + unit] : a.cells[(row - B) * H + unit];
            float* dpre = a.dpre + row * GH + unit;
            float dc_prev;
            cell::lstm_backward(dh, a.grad_c[b * H + unit], gates[0], gates[H], gates[2 * H], gates[3 * H],
                                a.cells[row * H + unit], c_prev, dpre[0], dpre[H], dpre[2 * H], dpre[3 * H],
                                dc_prev);
            a.grad_c[b * H + unit] = dc_prev;
          }
        } while (false);
      }
    }
    if (t >= 1) {  // what step t - 1's cell maths read, while the barrier waits
      const int64_t next = (t - 1) * B;
      for_each_own_cell<ROWS>(B, u0, my_units, warp, lane, [&](int64_t b, int64_t unit) {
        prefetch_l2(a.grad_y + (next + b) * H + unit);
        if constexpr (G == 1) {
          prefetch_l2(a.y + (next + b) * H + unit);
        } else {
#pragma unroll
          for (int q = 0; q < G; ++q) prefetch_l2(a.gates + (next + b) * GH + q * H + unit);
          prefetch_l2(a.cells + (next + b) * H + unit);
          if (t >= 2) prefetch_l2(a.cells + (next - B + b) * H + unit);
        }
      });
    }
    grid.sync();  // dpre_t complete everywhere before the next step stages it
  }
}

// Calls fn(std::integral_constant<int, ROWS>{}) for the plan's rows (persistent_plan.h).
template <typename Fn>
inline auto with_rows(int64_t rows, const Fn& fn) {
  switch (rows) {
    case 16:
      return fn(std::integral_constant<int, 16>{});
    case 8:
      return fn(std::integral_constant<int, 8>{});
    case 4:
      return fn(std::integral_constant<int, 4>{});
    case 2:
      return fn(std::integral_constant<int, 2>{});
    default:
      return fn(std::integral_constant<int, 1>{});
  }
}
static_assert(kMaxRows == 16, "with_rows instantiates the kernels for 1, 2, 4, 8 and 16 rows");

// ---- step kernels: elementwise over B*H (grid-stride loops) ----

constexpr int kStepThreads = 256;

inline unsigned step_blocks(int64_t n) {
  const int64_t blocks = (n + kStepThreads - 1) / kStepThreads;
  return static_cast<unsigned>(blocks < 65535 ? (blocks > 0 ? blocks : 1) : 65535);
}

template <typename scalar_t>
__global__ void irnn_step_kernel(const float* z, scalar_t* h_new, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    h_new[i] = from_float<scalar_t>(cell::relu(z[i]));
}

template <typename scalar_t>
__global__ void irnn_step_backward_kernel(const scalar_t* grad_h_new, const scalar_t* h_new, float* dz, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    dz[i] = cell::relu_backward(to_float(grad_h_new[i]), to_float(h_new[i]));
}

template <typename scalar_t>
__global__ void lstm_step_kernel(float* gates, const scalar_t* c, scalar_t* c_new, scalar_t* h_new, int64_t batch,
                                 int64_t hidden) {
  const int64_t n = batch * hidden;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = i / hidden, unit = i % hidden;
    float* g = gates + b * 4 * hidden + unit;
    float gi = g[0], gf = g[hidden], gg = g[2 * hidden], go = g[3 * hidden], cell_value, h;
    cell::lstm_forward(gi, gf, gg, go, to_float(c[i]), cell_value, h);
    g[0] = gi;
    g[hidden] = gf;
    g[2 * hidden] = gg;
    g[3 * hidden] = go;
    c_new[i] = from_float<scalar_t>(cell_value);
    h_new[i] = from_float<scalar_t>(h);
  }
}

template <typename scalar_t>
__global__ void lstm_step_backward_kernel(const scalar_t* grad_h_new, const scalar_t* grad_c_new, const scalar_t* c,
                                          const scalar_t* c_new, const float* gates, float* dgates, scalar_t* grad_c,
                                          int64_t batch, int64_t hidden) {
  const int64_t n = batch * hidden;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = i / hidden, unit = i % hidden;
    const float* g = gates + b * 4 * hidden + unit;
    float* d = dgates + b * 4 * hidden + unit;
    float dc_prev;
    cell::lstm_backward(to_float(grad_h_new[i]), to_float(grad_c_new[i]), g[0], g[hidden], g[2 * hidden],
                        g[3 * hidden], to_float(c_new[i]), to_float(c[i]), d[0], d[hidden], d[2 * hidden],
                        d[3 * hidden], dc_prev);
    grad_c[i] = from_float<scalar_t>(dc_prev);
  }
}

}  // namespace kernels
}  // namespace cuda
}  // namespace fused_rnn
