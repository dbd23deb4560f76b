// An AVX-512 float32 GEMM for the per-step recurrent product of the CPU scans: the
// AVX2 kernel's job (gemm_avx2.h) on CPUs with AVX-512F.
//
// On a core with full-width 512-bit FMA units (AMD Zen 5, Intel server cores) a zmm FMA
// does twice the work of a ymm one at the same rate, so the AVX2 kernel reaches at most
// half the core's float32 peak there; on Zen 4, which splits each zmm operation into two
// 256-bit halves, the peak is the same and the gain is fewer instructions per FMA. MKL,
// which torch's CPU builds link, runs its AVX2 code on AMD CPUs, so neither helps: this
// kernel is the scans' only path to the full rate on those CPUs.
//
// Layout: W' [K, N] (C = A @ W') is packed into panels of kPanel = 32 columns (two zmm
// vectors; gemm_common.h). The micro-kernel computes a tile of up to kTileRows = 8 rows x
// 32 columns: 16 accumulator registers, 2 for the panel's row of W' and the broadcasts
// of A, well within the 32 zmm registers. A partial panel (N not a multiple of 32) is
// zero-padded in the packed weight and its columns are written with masked stores, so
// no column is computed twice and nothing is written past N. The loops around the tile
// (blocks of K, of rows, panels) are gemm_common.h's blocked_gemm.
#pragma once

#include <algorithm>
#include <cstdint>

#include "gemm_common.h"

#if FUSED_RNN_X86_GEMM
#include <immintrin.h>
#endif

namespace fused_rnn {
namespace cpu {
namespace avx512 {

#if FUSED_RNN_X86_GEMM

inline bool supported() {
  static const bool ok = __builtin_cpu_supports("avx512f");
  return ok;
}

#define FUSED_RNN_AVX512 __attribute__((target("avx512f")))

struct Kernel {
  static constexpr int64_t kPanel = 32;     // columns per packed panel: two 16-float vectors
  static constexpr int64_t kTileRows = 8;   // rows per micro-tile (8 x 2 accumulators)
  static constexpr int64_t kRowBlock = 64;  // rows per block: its slice of A stays in L2 over all panels
  static constexpr int64_t kDepth = 256;    // K per block: a panel's block (32 KB) stays in L1/L2

  // C[rows, cols] (+)= A[rows, K] @ panel for rows = MR <= 8, cols <= 32, plus bias[cols] on
  // every row when bias is not null. As in the AVX2 kernel the accumulators are named
  // variables: GCC keeps an array of vectors in memory.
  template <int MR>
  FUSED_RNN_AVX512 static void tile(int64_t k, const float* a, int64_t lda, const float* panel, bool accumulate,
                                    float* c, int64_t ldc, int64_t cols, const float* bias) {
    // lo/hi mask the panel's two 16-column halves (all ones for a full panel)
    const __mmask16 lo = cols >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << cols) - 1);
    const __mmask16 hi = cols >= 32 ? __mmask16(0xFFFF) : cols > 16 ? __mmask16((1u << (cols - 16)) - 1) : 0;
    const __m512 zero = _mm512_setzero_ps();
    __m512 c00 = zero, c01 = zero, c10 = zero, c11 = zero, c20 = zero, c21 = zero, c30 = zero, c31 = zero;
    __m512 c40 = zero, c41 = zero, c50 = zero, c51 = zero, c60 = zero, c61 = zero, c70 = zero, c71 = zero;
    // rows past MR point at row 0 and are never read
    const float* a0 = a;
    const float* a1 = a + (MR > 1 ? lda : 0);
    const float* a2 = a + (MR > 2 ? 2 * lda : 0);
    const float* a3 = a + (MR > 3 ? 3 * lda : 0);
    const float* a4 = a + (MR > 4 ? 4 * lda : 0);
    const float* a5 = a + (MR > 5 ? 5 * lda : 0);
    const float* a6 = a + (MR > 6 ? 6 * lda : 0);
    const float* a7 = a + (MR > 7 ? 7 * lda : 0);
    const float* b = panel;
#define FUSED_RNN_TILE_ROW(row, acc0, acc1)          \
    {                                                  \
      const __m512 av = _mm512_set1_ps((row)[kk]);     \
      acc0 = _mm512_fmadd_ps(av, b0, acc0);            \
      acc1 = _mm512_fmadd_ps(av, b1, acc1);            \
    }
    for (int64_t kk = 0; kk < k; ++kk, b += kPanel) {
      const __m512 b0 = _mm512_loadu_ps(b), b1 = _mm512_loadu_ps(b + 16);
      FUSED_RNN_TILE_ROW(a0, c00, c01)
      if constexpr (MR > 1) FUSED_RNN_TILE_ROW(a1, c10, c11)
      if constexpr (MR > 2) FUSED_RNN_TILE_ROW(a2, c20, c21)
      if constexpr (MR > 3) FUSED_RNN_TILE_ROW(a3, c30, c31)
      if constexpr (MR > 4) FUSED_RNN_TILE_ROW(a4, c40, c41)
      if constexpr (MR > 5) FUSED_RNN_TILE_ROW(a5, c50, c51)
      if constexpr (MR > 6) FUSED_RNN_TILE_ROW(a6, c60, c61)
      if constexpr (MR > 7) FUSED_RNN_TILE_ROW(a7, c70, c71)
    }
#undef FUSED_RNN_TILE_ROW
    // full panels with plain loads and stores (AMD's masked stores are much slower)
    const bool full = lo == __mmask16(0xFFFF) && hi == __mmask16(0xFFFF);
    if (bias != nullptr) {
      const __m512 bias0 = _mm512_maskz_loadu_ps(lo, bias), bias1 = _mm512_maskz_loadu_ps(hi, bias + 16);
      c00 = _mm512_add_ps(c00, bias0), c01 = _mm512_add_ps(c01, bias1), c10 = _mm512_add_ps(c10, bias0);
      c11 = _mm512_add_ps(c11, bias1), c20 = _mm512_add_ps(c20, bias0), c21 = _mm512_add_ps(c21, bias1);
      c30 = _mm512_add_ps(c30, bias0), c31 = _mm512_add_ps(c31, bias1), c40 = _mm512_add_ps(c40, bias0);
      c41 = _mm512_add_ps(c41, bias1), c50 = _mm512_add_ps(c50, bias0), c51 = _mm512_add_ps(c51, bias1);
      c60 = _mm512_add_ps(c60, bias0), c61 = _mm512_add_ps(c61, bias1), c70 = _mm512_add_ps(c70, bias0);
      c71 = _mm512_add_ps(c71, bias1);
    }
#define FUSED_RNN_TILE_STORE(i, acc0, acc1)                                                              \
    if constexpr (MR > i) {                                                                                \
      float* row = c + i * ldc;                                                                            \
      if (full) {                                                                                          \
        _mm512_storeu_ps(row, accumulate ? _mm512_add_ps(_mm512_loadu_ps(row), acc0) : acc0);              \
        _mm512_storeu_ps(row + 16, accumulate ? _mm512_add_ps(_mm512_loadu_ps(row + 16), acc1) : acc1);    \
      } else {                                                                                             \
        const __m512 s0 = accumulate ? _mm512_add_ps(_mm512_maskz_loadu_ps(lo, row), acc0) : acc0;         \
        const __m512 s1 = accumulate ? _mm512_add_ps(_mm512_maskz_loadu_ps(hi, row + 16), acc1) : acc1;    \
        _mm512_mask_storeu_ps(row, lo, s0);                                                                \
        _mm512_mask_storeu_ps(row + 16, hi, s1);                                                           \
      }                                                                                                    \
    }
    FUSED_RNN_TILE_STORE(0, c00, c01)
    FUSED_RNN_TILE_STORE(1, c10, c11)
    FUSED_RNN_TILE_STORE(2, c20, c21)
    FUSED_RNN_TILE_STORE(3, c30, c31)
    FUSED_RNN_TILE_STORE(4, c40, c41)
    FUSED_RNN_TILE_STORE(5, c50, c51)
    FUSED_RNN_TILE_STORE(6, c60, c61)
    FUSED_RNN_TILE_STORE(7, c70, c71)
#undef FUSED_RNN_TILE_STORE
  }
};

// Row-major C[M, N] = A[M, K] @ W' (beta = 0) or C += A @ W' (beta = 1), plus bias [N] on
// every row when bias is not null; W' packed by pack_panels() with Kernel::kPanel. lda
// and ldc are row strides.
FUSED_RNN_AVX512 inline void gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* packed,
                                  float beta, float* c, int64_t ldc, const float* bias = nullptr) {
  blocked_gemm<Kernel>(m, n, k, a, lda, packed, beta != 0.0f, c, ldc, bias);
}

#undef FUSED_RNN_AVX512

#else  // not x86-64 with GCC/Clang: callers use the AVX2 kernel's fallback (BLAS)

struct Kernel {
  static constexpr int64_t kPanel = 32;
};
inline bool supported() { return false; }
inline void gemm(int64_t, int64_t, int64_t, const float*, int64_t, const float*, float, float*, int64_t,
                 const float* = nullptr) {}

#endif

}  // namespace avx512
}  // namespace cpu
}  // namespace fused_rnn
