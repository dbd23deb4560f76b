// An AVX2/FMA float32 GEMM for the CPU scans: the per-step recurrent product and, on
// CPUs without AVX-512, the whole-sequence products (input projection, weight
// gradients, dx).
//
// Every step of a scan multiplies a small block of rows (a thread's batch slice,
// typically 16-64 rows) by the same weight matrix (W_hh^T, or [W_hh | W_ih] in the
// backward). MKL's sgemm reaches about 70 GFLOP/s on one core of the AMD EPYC this
// project benchmarks on for such shapes ([32, 256] @ [256, 1024]); its generic x86
// path and per-call setup are tuned for large matrices. This kernel packs the weight
// once per scan and runs close to the core's FMA peak (84-88 of 100 GFLOP/s on one Zen 3
// core at that shape; docs/cpu.md).
//
// Layout: the weight W' [K, N] (C = A @ W') is packed into panels of kPanel = 24
// columns (gemm_common.h). The micro-kernel computes a tile of up to kTileRows = 4 rows x
// 24 columns: 12 accumulator registers, 3 for the panel's row of W', 1 for the
// broadcast of A; 16 ymm registers in all, so nothing spills. The loops around it
// (blocks of K, of rows, panels) are gemm_common.h's blocked_gemm.
#pragma once

#include <cstdint>

#include "gemm_common.h"

#if FUSED_RNN_X86_GEMM
#include <immintrin.h>
#endif

namespace fused_rnn {
namespace cpu {
namespace avx2 {

#if FUSED_RNN_X86_GEMM

inline bool supported() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}

#define FUSED_RNN_AVX2 __attribute__((target("avx2,fma")))

struct Kernel {
  static constexpr int64_t kPanel = 24;     // columns per packed panel: three 8-float vectors
  static constexpr int64_t kTileRows = 4;   // rows per micro-tile (4 x 3 accumulators)
  static constexpr int64_t kRowBlock = 64;  // rows per block: its slice of A stays in L2 over all panels
  static constexpr int64_t kDepth = 256;    // K per block: a panel's block (24 KB) stays in L1

  // C[rows, cols] (+)= A[rows, K] @ panel (+ bias[cols] on every row when bias is not
  // null), rows = MR <= 4, cols <= 24. The accumulators are named variables, not an
  // array: GCC kept an array of __m256 in memory, storing it on every iteration of the
  // K loop (a third of the speed).
  template <int MR>
  FUSED_RNN_AVX2 static void tile(int64_t k, const float* a, int64_t lda, const float* panel, bool accumulate,
                                  float* c, int64_t ldc, int64_t cols, const float* bias) {
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
#define FUSED_RNN_TILE_ROW(row, acc0, acc1, acc2)      \
  {                                                    \
    const __m256 av = _mm256_broadcast_ss((row) + kk); \
    acc0 = _mm256_fmadd_ps(av, b0, acc0);              \
    acc1 = _mm256_fmadd_ps(av, b1, acc1);              \
    acc2 = _mm256_fmadd_ps(av, b2, acc2);              \
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
      __m256 bias_v[3] = {zero, zero, zero};
      if (bias != nullptr) bias_v[0] = _mm256_loadu_ps(bias), bias_v[1] = _mm256_loadu_ps(bias + 8),
                           bias_v[2] = _mm256_loadu_ps(bias + 16);
      for (int i = 0; i < MR; ++i) {
        float* row = c + i * ldc;
        for (int v = 0; v < 3; ++v) {
          const __m256 base = accumulate ? _mm256_add_ps(_mm256_loadu_ps(row + 8 * v), bias_v[v]) : bias_v[v];
          _mm256_storeu_ps(row + 8 * v, _mm256_add_ps(base, acc[i][v]));
        }
      }
      return;
    }
    alignas(32) float part[kPanel];
    for (int i = 0; i < MR; ++i) {
      for (int v = 0; v < 3; ++v) _mm256_store_ps(part + 8 * v, acc[i][v]);
      float* row = c + i * ldc;
      for (int64_t j = 0; j < cols; ++j) {
        float base = accumulate ? row[j] : 0.0f;
        if (bias != nullptr) base += bias[j];
        row[j] = base + part[j];
      }
    }
  }
};

// Row-major C[M, N] = A[M, K] @ W' (beta = 0) or C += A @ W' (beta = 1), plus bias [N] on
// every row when bias is not null; W' packed by pack_panels() with Kernel::kPanel. lda
// and ldc are row strides.
FUSED_RNN_AVX2 inline void gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* packed,
                                float beta, float* c, int64_t ldc, const float* bias = nullptr) {
  blocked_gemm<Kernel>(m, n, k, a, lda, packed, beta != 0.0f, c, ldc, bias);
}

#undef FUSED_RNN_AVX2

#else  // no AVX2 build: callers fall back to BLAS

struct Kernel {
  static constexpr int64_t kPanel = 24;
};
inline bool supported() { return false; }
inline void gemm(int64_t, int64_t, int64_t, const float*, int64_t, const float*, float, float*, int64_t,
                 const float* = nullptr) {}

#endif

}  // namespace avx2
}  // namespace cpu
}  // namespace fused_rnn
