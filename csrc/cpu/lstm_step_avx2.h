// The fused LSTM forward step for AVX2/FMA CPUs: one pass per step computes the gates'
// pre-activations [h_{t-1} | x_t] @ [W_hh | W_ih]^T + bias in registers and runs the cell
// on them in the tile's epilogue, writing c_t, h_t and the activated gates once.
//
// The unfused scan makes five passes over the [T, B, 4H] gates per call (the input
// projection writes them, each step reads and rewrites them with its recurrent product,
// the cell reads them and writes the activations back) and runs the input projection
// as a separate GEMM whose K = I is too short for a GEMM kernel's full rate (64 of 100
// GFLOP/s on one Zen 3 core at the lesson's I = 42). Here x_t's part of K simply
// continues the recurrent K loop, and the pre-activations never reach memory.
//
// Layout: W'_cat [K = H + I, 4H] = [W_hh | W_ih]^T (K rows: W_hh's H columns, then
// W_ih's I) in panels of 32 columns holding 8 units x 4 gates: panel p, column g * 8 + j
// is gate g of unit 8 p + j (zero past H), so that each of a tile row's four accumulator
// vectors holds one gate of the same 8 units and the cell needs no shuffle. The tile is 3
// rows x 4 vectors: 12 accumulators, the panel's row of W' (4 vectors, one of them read
// as a memory operand), the broadcast of A.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "../cell_math.h"
#include "gemm_avx2.h"
#include "gemm_common.h"

namespace fused_rnn {
namespace cpu {
namespace avx2 {

constexpr int64_t kLstmUnits = 8;                  // units per panel
constexpr int64_t kLstmPanel = 4 * kLstmUnits;     // columns per panel: the units' four gates
constexpr int64_t kLstmTileRows = 3;
constexpr int64_t kLstmRowBlock = 48;              // rows per block: their A stays in L2 over all panels
constexpr int64_t kLstmDepth = 160;                // most K rows per block: 20 KB of a panel

inline int64_t lstm_panels(int64_t hidden) { return (hidden + kLstmUnits - 1) / kLstmUnits; }
inline int64_t lstm_packed_size(int64_t hidden, int64_t inputs) {
  return lstm_panels(hidden) * kLstmPanel * (hidden + inputs);
}

// Packs panels [p0, p1) of W'_cat from w_hh [4H, H] and w_ih [4H, I] (row-major, gate
// order i, f, g, o), and the bias [4H] (null: zero) into packed_bias [panels * 32].
inline void pack_lstm_step(const float* w_hh, const float* w_ih, const float* bias, int64_t hidden, int64_t inputs,
                           float* packed, float* packed_bias, int64_t p0, int64_t p1) {
  const int64_t depth = hidden + inputs;
  for (int64_t p = p0; p < p1; ++p) {
    float* block = packed + p * depth * kLstmPanel;
    const int64_t unit0 = p * kLstmUnits, units = std::min(kLstmUnits, hidden - unit0);
    for (int64_t gate = 0; gate < 4; ++gate) {  // the gate's columns: its rows of w_hh and w_ih, transposed
      float* columns = block + gate * kLstmUnits;
      transpose_rows(w_hh + (gate * hidden + unit0) * hidden, hidden, units, hidden, columns, kLstmPanel);
      transpose_rows(w_ih + (gate * hidden + unit0) * inputs, inputs, units, inputs, columns + hidden * kLstmPanel,
                     kLstmPanel);
      for (int64_t kk = 0; kk < depth; ++kk) {  // past the last unit (a partial panel): zeros
        for (int64_t u = units; u < kLstmUnits; ++u) columns[kk * kLstmPanel + u] = 0.0f;
      }
      for (int64_t u = 0; u < kLstmUnits; ++u) {
        packed_bias[p * kLstmPanel + gate * kLstmUnits + u] =
            u < units && bias != nullptr ? bias[gate * hidden + unit0 + u] : 0.0f;
      }
    }
  }
}

// Where one step's rows live: rows r of h_prev [., H], x_t [., I], c_prev, c_t, h_t
// [., H] and gates_t [., 4H] (row strides H, I, H, H, H, 4H).
struct LstmStepRows {
  const float* h_prev;
  const float* x_t;
  const float* c_prev;
  float* c_t;
  float* h_t;
  float* gates_t;
};

#if FUSED_RNN_X86_GEMM

#define FUSED_RNN_AVX2 __attribute__((target("avx2,fma")))

// Copies `units` floats (8 but in a panel past the last full one: a fixed-size copy the
// compiler turns into one vector move).
inline void copy_units(float* dst, const float* src, int64_t units) {
  if (units == kLstmUnits) {
    std::memcpy(dst, src, kLstmUnits * sizeof(float));
  } else {
    std::memcpy(dst, src, units * sizeof(float));
  }
}

// The cell on 8 units: pre holds the four gates' pre-activations (gate g at pre[8 g ..]),
// activations out. Kept out of line: one copy, not one per row of each tile height (the
// same speed). The loop vectorises only with -fno-trapping-math (setup.py), which lets
// GCC if-convert the selects of exp and tanh; without it the cell ran in scalar code and
// the step at half speed. Running the cell once per panel over a whole block of rows
// instead of per tile row measured slower (316-379 against 289-296 us per step of 32
// rows at H = 256, I = 42, one Zen 3 core): the gather and scatter of c cost more than
// the overlap gained.
FUSED_RNN_AVX2 __attribute__((noinline)) inline void lstm_cell_8(float* __restrict pre,
                                                                 const float* __restrict c_prev,
                                                                 float* __restrict c, float* __restrict h) {
#pragma omp simd
  for (int64_t j = 0; j < kLstmUnits; ++j) {
    cell::lstm_forward(pre[j], pre[kLstmUnits + j], pre[2 * kLstmUnits + j], pre[3 * kLstmUnits + j], c_prev[j],
                       c[j], h[j]);
  }
}

// The cell on one row's 8 units of a panel (pre as for lstm_cell_8); the activations, c
// and h of the first `units` units are written out.
FUSED_RNN_AVX2 inline void lstm_tile_cell(float* pre, const LstmStepRows& at, int64_t row, int64_t hidden,
                                          int64_t unit0, int64_t units) {
  alignas(32) float c_prev[kLstmUnits] = {}, c[kLstmUnits], h[kLstmUnits];
  copy_units(c_prev, at.c_prev + row * hidden + unit0, units);
  lstm_cell_8(pre, c_prev, c, h);
  copy_units(at.c_t + row * hidden + unit0, c, units);
  copy_units(at.h_t + row * hidden + unit0, h, units);
  float* gates = at.gates_t + row * 4 * hidden + unit0;
  for (int64_t g = 0; g < 4; ++g) copy_units(gates + g * hidden, pre + g * kLstmUnits, units);
}

// Rows [r, r + MR) of one panel over K's block [k0, k1) of the concatenated [h | x]
// columns (panel points at the panel's row k0). The first block starts from zero, the
// others from the partial sums in scratch [MR, 32]; the last adds the bias and runs the
// cell, the others store their partial sums back.
template <int MR>
FUSED_RNN_AVX2 inline void lstm_tile(const LstmStepRows& at, int64_t r, int64_t hidden, int64_t inputs, int64_t k0,
                                     int64_t k1, const float* panel, float* scratch, const float* panel_bias,
                                     int64_t unit0, int64_t units) {
  const bool first = k0 == 0, last = k1 == hidden + inputs;
  const __m256 zero = _mm256_setzero_ps();
  __m256 c00 = zero, c01 = zero, c02 = zero, c03 = zero, c10 = zero, c11 = zero, c12 = zero, c13 = zero;
  __m256 c20 = zero, c21 = zero, c22 = zero, c23 = zero;
  if (!first) {
    c00 = _mm256_load_ps(scratch), c01 = _mm256_load_ps(scratch + 8), c02 = _mm256_load_ps(scratch + 16);
    c03 = _mm256_load_ps(scratch + 24);
    if constexpr (MR > 1) c10 = _mm256_load_ps(scratch + 32), c11 = _mm256_load_ps(scratch + 40),
                          c12 = _mm256_load_ps(scratch + 48), c13 = _mm256_load_ps(scratch + 56);
    if constexpr (MR > 2) c20 = _mm256_load_ps(scratch + 64), c21 = _mm256_load_ps(scratch + 72),
                          c22 = _mm256_load_ps(scratch + 80), c23 = _mm256_load_ps(scratch + 88);
  }
  const float* b = panel;
#define FUSED_RNN_LSTM_ROW(src, acc0, acc1, acc2, acc3)        \
  {                                                            \
    const __m256 av = _mm256_broadcast_ss((src) + kk);         \
    acc0 = _mm256_fmadd_ps(av, b0, acc0);                      \
    acc1 = _mm256_fmadd_ps(av, b1, acc1);                      \
    acc2 = _mm256_fmadd_ps(av, b2, acc2);                      \
    acc3 = _mm256_fmadd_ps(av, _mm256_loadu_ps(b + 24), acc3); \
  }
  // columns [begin, end) of a [., ld] source: rows past MR repeat row r and are never stored
#define FUSED_RNN_LSTM_K_LOOP(a, ld, begin, end)                                                       \
  {                                                                                                    \
    const float* a0 = (a) + r * (ld);                                                                  \
    const float* a1 = (a) + (MR > 1 ? r + 1 : r) * (ld);                                               \
    const float* a2 = (a) + (MR > 2 ? r + 2 : r) * (ld);                                               \
    for (int64_t kk = (begin); kk < (end); ++kk, b += kLstmPanel) {                                    \
      const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8), b2 = _mm256_loadu_ps(b + 16); \
      FUSED_RNN_LSTM_ROW(a0, c00, c01, c02, c03)                                                       \
      if constexpr (MR > 1) FUSED_RNN_LSTM_ROW(a1, c10, c11, c12, c13)                                 \
      if constexpr (MR > 2) FUSED_RNN_LSTM_ROW(a2, c20, c21, c22, c23)                                 \
    }                                                                                                  \
  }
  FUSED_RNN_LSTM_K_LOOP(at.h_prev, hidden, k0, std::min(k1, hidden))
  FUSED_RNN_LSTM_K_LOOP(at.x_t, inputs, std::max(k0, hidden) - hidden, k1 - hidden)
#undef FUSED_RNN_LSTM_K_LOOP
#undef FUSED_RNN_LSTM_ROW
  if (!last) {
    _mm256_store_ps(scratch, c00), _mm256_store_ps(scratch + 8, c01), _mm256_store_ps(scratch + 16, c02);
    _mm256_store_ps(scratch + 24, c03);
    if constexpr (MR > 1) _mm256_store_ps(scratch + 32, c10), _mm256_store_ps(scratch + 40, c11),
                          _mm256_store_ps(scratch + 48, c12), _mm256_store_ps(scratch + 56, c13);
    if constexpr (MR > 2) _mm256_store_ps(scratch + 64, c20), _mm256_store_ps(scratch + 72, c21),
                          _mm256_store_ps(scratch + 80, c22), _mm256_store_ps(scratch + 88, c23);
    return;
  }
  const __m256 bias0 = _mm256_loadu_ps(panel_bias), bias1 = _mm256_loadu_ps(panel_bias + 8);
  const __m256 bias2 = _mm256_loadu_ps(panel_bias + 16), bias3 = _mm256_loadu_ps(panel_bias + 24);
  alignas(32) float pre[kLstmPanel];
#define FUSED_RNN_LSTM_EPILOGUE(i, acc0, acc1, acc2, acc3) \
  if constexpr (MR > i) {                                   \
    _mm256_store_ps(pre, _mm256_add_ps(acc0, bias0));       \
    _mm256_store_ps(pre + 8, _mm256_add_ps(acc1, bias1));   \
    _mm256_store_ps(pre + 16, _mm256_add_ps(acc2, bias2));  \
    _mm256_store_ps(pre + 24, _mm256_add_ps(acc3, bias3));  \
    lstm_tile_cell(pre, at, r + i, hidden, unit0, units);   \
  }
  FUSED_RNN_LSTM_EPILOGUE(0, c00, c01, c02, c03)
  FUSED_RNN_LSTM_EPILOGUE(1, c10, c11, c12, c13)
  FUSED_RNN_LSTM_EPILOGUE(2, c20, c21, c22, c23)
#undef FUSED_RNN_LSTM_EPILOGUE
}

// One step for `rows` rows (all pointers in `at` at the first of them): c_t, h_t and the
// activated gates_t from h_prev, x_t, c_prev and the packed W'_cat and bias.
//
// K = H + I is cut into equal blocks of at most kLstmDepth rows, so that a panel's block
// (at most 20 KB) stays in L1 while all row tiles of a block of rows read it, the
// partial sums waiting in a scratch block between K blocks: with all of K at once (38 KB
// at the lesson's H = 256, I = 42) every tile streamed the panel from L2 and the step ran
// at about 60 of 100 GFLOP/s on one Zen 3 core.
FUSED_RNN_AVX2 inline void lstm_forward_step(int64_t rows, int64_t hidden, int64_t inputs, const float* packed,
                                             const float* packed_bias, const LstmStepRows& at) {
  const int64_t panels = lstm_panels(hidden), depth = hidden + inputs;
  const int64_t blocks = (depth + kLstmDepth - 1) / kLstmDepth, block_depth = (depth + blocks - 1) / blocks;
  alignas(32) float scratch[kLstmRowBlock * kLstmPanel];
  for (int64_t r0 = 0; r0 < rows; r0 += kLstmRowBlock) {
    const int64_t r1 = std::min(rows, r0 + kLstmRowBlock);
    for (int64_t p = 0; p < panels; ++p) {
      const float* panel_bias = packed_bias + p * kLstmPanel;
      const int64_t unit0 = p * kLstmUnits, units = std::min(kLstmUnits, hidden - unit0);
      for (int64_t k0 = 0; k0 < depth; k0 += block_depth) {
        const int64_t k1 = std::min(depth, k0 + block_depth);
        const float* panel = packed + (p * depth + k0) * kLstmPanel;
        int64_t r = r0;
        for (; r + kLstmTileRows <= r1; r += kLstmTileRows) {
          lstm_tile<3>(at, r, hidden, inputs, k0, k1, panel, scratch + (r - r0) * kLstmPanel, panel_bias, unit0,
                       units);
        }
        float* rest = scratch + (r - r0) * kLstmPanel;
        if (r1 - r == 2) lstm_tile<2>(at, r, hidden, inputs, k0, k1, panel, rest, panel_bias, unit0, units);
        if (r1 - r == 1) lstm_tile<1>(at, r, hidden, inputs, k0, k1, panel, rest, panel_bias, unit0, units);
      }
    }
  }
}

#undef FUSED_RNN_AVX2

#else

inline void lstm_forward_step(int64_t, int64_t, int64_t, const float*, const float*, const LstmStepRows&) {}

#endif

}  // namespace avx2
}  // namespace cpu
}  // namespace fused_rnn
