// An AVX2/FMA float32 GEMM for the per-step recurrent product of the CPU scans.
//
// Every step of a scan multiplies a small block of rows (a thread's batch slice,
// typically 16-64 rows) by the same weight matrix (W_hh^T, or [W_hh | W_ih] in the
// backward). MKL's sgemm reaches about 70 GFLOP/s on one core of the AMD EPYC this
// project benchmarks on for such shapes ([32, 256] @ [256, 1024]); its generic x86
// path and per-call setup are tuned for large matrices. This kernel packs the weight
// once per scan and runs close to the core's FMA peak (about 90 of 93 GFLOP/s measured
// on the same shapes), measured on an earlier machine of the project (AVX2 only); on the
// current one (AVX-512) oneDNN's LSTM primitive is faster still (docs/cpu.md).
//
// Layout: the weight W' [K, N] (C = A @ W') is packed into panels of kPanel = 24
// columns (gemm_pack.h). The micro-kernel computes a tile of up to kTileRows = 4 rows x
// 24 columns: 12 accumulator registers, 3 for the panel's row of W', 1 for the
// broadcast of A; 16 ymm registers in all, so nothing spills. The loops run panel by
// panel so that a panel (24 K floats) stays in L1/L2 while every row tile of the
// block uses it.
#pragma once

#include <algorithm>
#include <cstdint>

#include "gemm_pack.h"

#if FUSED_RNN_X86_GEMM
#include <immintrin.h>
#endif

namespace fused_rnn {
namespace cpu {
namespace avx2 {

constexpr int64_t kPanel = 24;    // columns per packed panel: three 8-float vectors
constexpr int64_t kTileRows = 4;  // rows per micro-tile (4 x 3 accumulators)
constexpr int64_t kRowBlock = 64; // rows per block: its slice of A stays in L2 over all panels

#if FUSED_RNN_X86_GEMM

inline bool supported() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}

#define FUSED_RNN_AVX2 __attribute__((target("avx2,fma")))

// C[rows, cols] (+)= A[rows, K] @ panel, rows = MR <= 4, cols <= 24. The accumulators
// are named variables, not an array: GCC kept an array of __m256 in memory, storing
// it on every iteration of the K loop (a third of the speed).
template <int MR>
FUSED_RNN_AVX2 inline void tile(int64_t k, const float* a, int64_t lda, const float* panel, bool accumulate, float* c,
                                int64_t ldc, int64_t cols) {
  const __m256 zero = _mm256_setzero_ps();
  __m256 c00 = zero, c01 = zero, c02 = zero, c10 = zero, c11 = zero, c12 = zero;
  __m256 c20 = zero, c21 = zero, c22 = zero, c30 = zero, c31 = zero, c32 = zero;
  // rows past MR point at row 0 and are never read
  const float* a0 = a;
  const float* a1 = a + (MR > 1 ? lda : 0);
  const float* a2 = a + (MR > 2 ? 2 * lda : 0);
  const float* a3 = a + (MR > 3 ? 3 * lda : 0);
  const float* b = panel;
  // one row of the tile: broadcast A[row, kk], three FMAs against the panel's row kk
#define FUSED_RNN_TILE_ROW(row, acc0, acc1, acc2)         \
  {                                                       \
    const __m256 av = _mm256_broadcast_ss((row) + kk);    \
    acc0 = _mm256_fmadd_ps(av, b0, acc0);                 \
    acc1 = _mm256_fmadd_ps(av, b1, acc1);                 \
    acc2 = _mm256_fmadd_ps(av, b2, acc2);                 \
  }
  for (int64_t kk = 0; kk < k; ++kk, b += kPanel) {
    // unaligned loads: as fast as aligned ones on aligned data, and no crash if an
    // allocator hands out less than 32-byte alignment
    const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8), b2 = _mm256_loadu_ps(b + 16);
    FUSED_RNN_TILE_ROW(a0, c00, c01, c02)
    if constexpr (MR > 1) FUSED_RNN_TILE_ROW(a1, c10, c11, c12)
    if constexpr (MR > 2) FUSED_RNN_TILE_ROW(a2, c20, c21, c22)
    if constexpr (MR > 3) FUSED_RNN_TILE_ROW(a3, c30, c31, c32)
  }
#undef FUSED_RNN_TILE_ROW
  const __m256 acc[4][3] = {{c00, c01, c02}, {c10, c11, c12}, {c20, c21, c22}, {c30, c31, c32}};
  if (cols == kPanel) {
    for (int i = 0; i < MR; ++i) {
      float* row = c + i * ldc;
      for (int v = 0; v < 3; ++v) {
        const __m256 sum = accumulate ? _mm256_add_ps(_mm256_loadu_ps(row + 8 * v), acc[i][v]) : acc[i][v];
        _mm256_storeu_ps(row + 8 * v, sum);
      }
    }
    return;
  }
  alignas(32) float part[kPanel];
  for (int i = 0; i < MR; ++i) {
    for (int v = 0; v < 3; ++v) _mm256_store_ps(part + 8 * v, acc[i][v]);
    float* row = c + i * ldc;
    for (int64_t j = 0; j < cols; ++j) row[j] = accumulate ? row[j] + part[j] : part[j];
  }
}

// Row-major C[M, N] = A[M, K] @ W' (beta = 0) or C += A @ W' (beta = 1), W' packed by
// pack_panels() with kPanel. lda and ldc are row strides.
FUSED_RNN_AVX2 inline void gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* packed,
                                float beta, float* c, int64_t ldc) {
  const bool accumulate = beta != 0.0f;
  const int64_t panels = (n + kPanel - 1) / kPanel;
  for (int64_t r0 = 0; r0 < m; r0 += kRowBlock) {
    const int64_t r1 = std::min(m, r0 + kRowBlock);
    for (int64_t p = 0; p < panels; ++p) {
      const float* panel = packed + p * k * kPanel;
      const int64_t col = p * kPanel, cols = std::min(kPanel, n - col);
      int64_t r = r0;
      for (; r + 4 <= r1; r += 4) tile<4>(k, a + r * lda, lda, panel, accumulate, c + r * ldc + col, ldc, cols);
      switch (r1 - r) {
        case 3: tile<3>(k, a + r * lda, lda, panel, accumulate, c + r * ldc + col, ldc, cols); break;
        case 2: tile<2>(k, a + r * lda, lda, panel, accumulate, c + r * ldc + col, ldc, cols); break;
        case 1: tile<1>(k, a + r * lda, lda, panel, accumulate, c + r * ldc + col, ldc, cols); break;
        default: break;
      }
    }
  }
}

#undef FUSED_RNN_AVX2

#else  // no AVX2 build: callers fall back to BLAS

inline bool supported() { return false; }
inline void gemm(int64_t, int64_t, int64_t, const float*, int64_t, const float*, float, float*, int64_t) {}

#endif

}  // namespace avx2
}  // namespace cpu
}  // namespace fused_rnn
