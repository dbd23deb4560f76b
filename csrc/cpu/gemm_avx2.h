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

FUSED_RNN_AVX2 inline float horizontal_sum(__m256 v) {
  const __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 pairs = _mm_add_ps(half, _mm_movehl_ps(half, half));
  return _mm_cvtss_f32(_mm_add_ss(pairs, _mm_movehdup_ps(pairs)));
}

// Row-major C[M, N] = A[M, K] @ W' (beta = 0) or C += A @ W' (any other beta, as gemm),
// plus bias [N] on every row when bias is not null, for a few rows of A on W as stored, unpacked: the
// products of a single step of fewer than 16 rows (blas.h), which read W once. With
// trans_w, W is [N, K] (W' = W^T) and each output is a dot product of a row of A and a
// row of W, four rows of W at a time (four independent sums; the four rows stay in L1
// over the rows of A); else W is [K, N] and row k of W, scaled by a[r, k], is added to
// every row r of C in turn. ldw is W's row stride. MKL's sgemm runs its generic GEMV
// code on AMD CPUs: 42-47 us for the LSTM's 1024 x 256 W_hh at one row on a Zen 3 core,
// against 21 us for this loop.
FUSED_RNN_AVX2 inline void few_rows(bool trans_w, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
                                    const float* w, int64_t ldw, float beta, float* c, int64_t ldc,
                                    const float* bias = nullptr) {
  if (trans_w) {
    for (int64_t j = 0; j < n; j += 4) {
      const int64_t rows = n - j < 4 ? n - j : 4;
      // rows of W past the last point at the block's first and are never stored
      const float* w0 = w + j * ldw;
      const float* w1 = rows > 1 ? w0 + ldw : w0;
      const float* w2 = rows > 2 ? w0 + 2 * ldw : w0;
      const float* w3 = rows > 3 ? w0 + 3 * ldw : w0;
      for (int64_t r = 0; r < m; ++r) {
        const float* x = a + r * lda;
        __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
        int64_t p = 0;
        for (; p + 8 <= k; p += 8) {
          const __m256 xv = _mm256_loadu_ps(x + p);
          s0 = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + p), xv, s0);
          s1 = _mm256_fmadd_ps(_mm256_loadu_ps(w1 + p), xv, s1);
          s2 = _mm256_fmadd_ps(_mm256_loadu_ps(w2 + p), xv, s2);
          s3 = _mm256_fmadd_ps(_mm256_loadu_ps(w3 + p), xv, s3);
        }
        float dot[4] = {horizontal_sum(s0), horizontal_sum(s1), horizontal_sum(s2), horizontal_sum(s3)};
        for (; p < k; ++p) {
          dot[0] += w0[p] * x[p];
          dot[1] += w1[p] * x[p];
          dot[2] += w2[p] * x[p];
          dot[3] += w3[p] * x[p];
        }
        float* out = c + r * ldc + j;
        for (int64_t i = 0; i < rows; ++i) {
          float base = beta != 0.0f ? out[i] : 0.0f;
          if (bias != nullptr) base += bias[j + i];
          out[i] = base + dot[i];
        }
      }
    }
    return;
  }
  for (int64_t r = 0; r < m; ++r) {
    float* out = c + r * ldc;
    for (int64_t j = 0; j < n; ++j) {
      const float base = beta != 0.0f ? out[j] : 0.0f;
      out[j] = bias != nullptr ? base + bias[j] : base;
    }
  }
  for (int64_t p = 0; p < k; ++p) {
    const float* row = w + p * ldw;
    for (int64_t r = 0; r < m; ++r) {
      const float scale = a[r * lda + p];
      const __m256 s = _mm256_set1_ps(scale);
      float* out = c + r * ldc;
      int64_t j = 0;
      for (; j + 8 <= n; j += 8) {
        _mm256_storeu_ps(out + j, _mm256_fmadd_ps(s, _mm256_loadu_ps(row + j), _mm256_loadu_ps(out + j)));
      }
      for (; j < n; ++j) out[j] += scale * row[j];
    }
  }
}

#undef FUSED_RNN_AVX2

#else  // no AVX2 build: callers fall back to BLAS

struct Kernel {
  static constexpr int64_t kPanel = 24;
};
inline bool supported() { return false; }
inline void gemm(int64_t, int64_t, int64_t, const float*, int64_t, const float*, float, float*, int64_t,
                 const float* = nullptr) {}
inline void few_rows(bool, int64_t, int64_t, int64_t, const float*, int64_t, const float*, int64_t, float, float*,
                     int64_t, const float* = nullptr) {}

#endif

}  // namespace avx2
}  // namespace cpu
}  // namespace fused_rnn
