// What the package's own CPU GEMM kernels (gemm_avx2.h, gemm_avx512.h) share: the
// packed weight layout and the loop nest around their micro-kernels.
//
// Layout: W' [K, N] (C = A @ W') in panels of `panel` columns, panel p holding
// W'[k, panel * p .. panel * p + panel - 1] for k = 0..K-1 contiguously, zero-padded
// past N. Each step of a scan multiplies by the same W', so it is packed once per scan.
#pragma once

#include <algorithm>
#include <cstdint>

// The kernels are x86-64 only, compiled with target attributes (GCC or Clang) so that
// the package still runs on CPUs without them; callers check support at run time.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__CUDACC__)
#define FUSED_RNN_X86_GEMM 1
#else
#define FUSED_RNN_X86_GEMM 0
#endif

#if FUSED_RNN_X86_GEMM
#include <immintrin.h>
#endif

namespace fused_rnn {
namespace cpu {

inline int64_t panels_size(int64_t n, int64_t k, int64_t panel) { return (n + panel - 1) / panel * panel * k; }

// dst[i * dst_stride + r] = src[r * ld + i] for r < rows, i < depth: a block of `rows`
// rows of a row-major matrix, `depth` columns from src on, transposed into `depth` rows of
// a panel. Packing a weight is this transpose (W' = W^T), and a scalar loop writes every
// float to another cache line of the panel: with the own kernels (CPUs with AVX2, which
// the callers check) full 8 x 8 blocks go through registers, which packs the LSTM's
// 1.2 MB weight at the lesson's shape 2.5x faster (210-250 -> 88 us on a Zen 3 core; a
// fixed cost of every scan call).
// T: float, or the bf16 kernel's 32-bit pairs (gemm_bf16.h), moved as they are.
template <typename T>
inline void transpose_rows_scalar(const T* src, int64_t ld, int64_t rows, int64_t depth, T* dst, int64_t dst_stride) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = 0; i < depth; ++i) dst[i * dst_stride + r] = src[r * ld + i];
  }
}

#if FUSED_RNN_X86_GEMM
__attribute__((target("avx2"))) inline void transpose_8x8(const float* src, int64_t ld, float* dst,
                                                          int64_t dst_stride) {
  const __m256 r0 = _mm256_loadu_ps(src), r1 = _mm256_loadu_ps(src + ld);
  const __m256 r2 = _mm256_loadu_ps(src + 2 * ld), r3 = _mm256_loadu_ps(src + 3 * ld);
  const __m256 r4 = _mm256_loadu_ps(src + 4 * ld), r5 = _mm256_loadu_ps(src + 5 * ld);
  const __m256 r6 = _mm256_loadu_ps(src + 6 * ld), r7 = _mm256_loadu_ps(src + 7 * ld);
  // pairs of rows interleaved, then quadruples, then the 128-bit halves exchanged
  const __m256 a0 = _mm256_unpacklo_ps(r0, r1), a1 = _mm256_unpackhi_ps(r0, r1);
  const __m256 a2 = _mm256_unpacklo_ps(r2, r3), a3 = _mm256_unpackhi_ps(r2, r3);
  const __m256 a4 = _mm256_unpacklo_ps(r4, r5), a5 = _mm256_unpackhi_ps(r4, r5);
  const __m256 a6 = _mm256_unpacklo_ps(r6, r7), a7 = _mm256_unpackhi_ps(r6, r7);
  const __m256 b0 = _mm256_shuffle_ps(a0, a2, 0x44), b1 = _mm256_shuffle_ps(a0, a2, 0xEE);
  const __m256 b2 = _mm256_shuffle_ps(a1, a3, 0x44), b3 = _mm256_shuffle_ps(a1, a3, 0xEE);
  const __m256 b4 = _mm256_shuffle_ps(a4, a6, 0x44), b5 = _mm256_shuffle_ps(a4, a6, 0xEE);
  const __m256 b6 = _mm256_shuffle_ps(a5, a7, 0x44), b7 = _mm256_shuffle_ps(a5, a7, 0xEE);
  _mm256_storeu_ps(dst, _mm256_permute2f128_ps(b0, b4, 0x20));
  _mm256_storeu_ps(dst + dst_stride, _mm256_permute2f128_ps(b1, b5, 0x20));
  _mm256_storeu_ps(dst + 2 * dst_stride, _mm256_permute2f128_ps(b2, b6, 0x20));
  _mm256_storeu_ps(dst + 3 * dst_stride, _mm256_permute2f128_ps(b3, b7, 0x20));
  _mm256_storeu_ps(dst + 4 * dst_stride, _mm256_permute2f128_ps(b0, b4, 0x31));
  _mm256_storeu_ps(dst + 5 * dst_stride, _mm256_permute2f128_ps(b1, b5, 0x31));
  _mm256_storeu_ps(dst + 6 * dst_stride, _mm256_permute2f128_ps(b2, b6, 0x31));
  _mm256_storeu_ps(dst + 7 * dst_stride, _mm256_permute2f128_ps(b3, b7, 0x31));
}
#endif

// transpose_rows_scalar's result, full 8 x 8 blocks in AVX2 registers: for the own
// kernels' packing only, which runs where the CPU has AVX2.
// transpose_8x8 moves the 32-bit lanes of T through float registers; its loads and
// stores are intrinsics (which may alias any type).
template <typename T>
inline void transpose_rows(const T* src, int64_t ld, int64_t rows, int64_t depth, T* dst, int64_t dst_stride) {
  static_assert(sizeof(T) == sizeof(float), "transpose_rows moves 32-bit lanes");
  int64_t r = 0;
#if FUSED_RNN_X86_GEMM
  for (; r + 8 <= rows; r += 8) {
    int64_t i = 0;
    for (; i + 8 <= depth; i += 8) {
      transpose_8x8(reinterpret_cast<const float*>(src + r * ld + i), ld,
                    reinterpret_cast<float*>(dst + i * dst_stride + r), dst_stride);
    }
    transpose_rows_scalar(src + r * ld + i, ld, 8, depth - i, dst + i * dst_stride + r, dst_stride);
  }
#endif
  transpose_rows_scalar(src + r * ld, ld, rows - r, depth, dst + r, dst_stride);
}

// Packs W' [K, N]: W' is W^T when W is stored [N, K] (trans_w), else W stored [K, N],
// with row stride ld (K, resp. N, when dense). `out` holds panels_size(n, k, panel)
// floats; panels [p0, p1) only are written (threads split the panels). For the own
// kernels only (a CPU with AVX2).
// T: float, or the bf16 kernel's 32-bit pairs.
template <typename T>
inline void pack_panels(const T* w, bool trans_w, int64_t ld, int64_t n, int64_t k, int64_t panel, T* out,
                        int64_t p0, int64_t p1) {
  for (int64_t p = p0; p < p1; ++p) {
    T* block = out + p * k * panel;
    const int64_t first = p * panel, cols = std::min(panel, n - first);
    if (trans_w) {  // W^T's panel is a block of W's rows, transposed
      transpose_rows(w + first * ld, ld, cols, k, block, panel);
    } else {
      for (int64_t kk = 0; kk < k; ++kk) {
        const T* row = w + kk * ld + first;
        for (int64_t j = 0; j < cols; ++j) block[kk * panel + j] = row[j];
      }
    }
    for (int64_t kk = 0; kk < k; ++kk) {
      for (int64_t j = cols; j < panel; ++j) block[kk * panel + j] = T(0);
    }
  }
}

inline void pack_panels(const float* w, bool trans_w, int64_t n, int64_t k, int64_t panel, float* out) {
  pack_panels(w, trans_w, trans_w ? k : n, n, k, panel, out, 0, (n + panel - 1) / panel);
}

// Calls Kernel::tile<rows>(args...) for 1 <= rows < Kernel::kTileRows (a block's last,
// partial row tile).
template <class Kernel, int kRows = Kernel::kTileRows - 1, typename... Args>
__attribute__((always_inline)) inline void partial_tile(int64_t rows, Args... args) {
  if constexpr (kRows >= 1) {
    if (rows == kRows) {
      Kernel::template tile<kRows>(args...);
      return;
    }
    partial_tile<Kernel, kRows - 1>(rows, args...);
  }
}

// One block of the loop nest below: C[rows, N] (+)= A[rows, depth] @ the packed
// panels' rows [k0, k0 + depth) (`packed` points at row k0 of panel 0; panels are
// k_total rows apart), panel by panel, row tile by row tile. T is what A and the panels
// hold: float, or bf16 pairs (gemm_bf16.h).
template <class Kernel, typename T>
__attribute__((always_inline)) inline void gemm_block(int64_t rows, int64_t n, int64_t k_total, int64_t depth,
                                                      const T* a, int64_t lda, const T* packed, bool accumulate,
                                                      float* c, int64_t ldc, const float* bias) {
  constexpr int64_t kPanel = Kernel::kPanel, kTileRows = Kernel::kTileRows;
  const int64_t panels = (n + kPanel - 1) / kPanel;
  for (int64_t p = 0; p < panels; ++p) {
    const T* panel = packed + p * k_total * kPanel;
    const int64_t col = p * kPanel, cols = std::min(kPanel, n - col);
    float* out = c + col;
    const float* panel_bias = bias != nullptr ? bias + col : nullptr;
    int64_t r = 0;
    for (; r + kTileRows <= rows; r += kTileRows) {
      Kernel::template tile<kTileRows>(depth, a + r * lda, lda, panel, accumulate, out + r * ldc, ldc, cols,
                                       panel_bias);
    }
    partial_tile<Kernel>(rows - r, depth, a + r * lda, lda, panel, accumulate, out + r * ldc, ldc, cols, panel_bias);
  }
}

// Row-major C[M, N] = A[M, K] @ W' (+ C if accumulate) (+ bias [N] on every row when bias
// is not null), W' packed by pack_panels() with Kernel::kPanel; lda and ldc are row
// strides. Kernel::tile<MR>(k, a, lda, panel, accumulate, c, ldc, cols, bias) computes
// MR <= kTileRows rows of one panel (cols <= kPanel of its columns are real).
//
// The loops: K in blocks of Kernel::kDepth, so that a panel's block stays in L1 while
// every row tile of a block of kRowBlock rows reads it (with all of K at once, a panel of
// the backward's K = 4H = 1024 is 96 KB and each tile read it from L2: 70 against 85
// GFLOP/s on one Zen 3 core); then blocks of rows, whose slice of A stays in L2 over
// all panels; then panels; then row tiles (gemm_block). Inlined into each kernel's
// gemm(), which carries the instruction set's target attribute, so that the tiles
// inline into it.
template <class Kernel>
__attribute__((always_inline)) inline void blocked_gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
                                                        const float* packed, bool accumulate, float* c, int64_t ldc,
                                                        const float* bias) {
  // k0 == 0 runs once even when K = 0 (C = bias, or C unchanged when accumulating)
  for (int64_t k0 = 0; k0 == 0 || k0 < k; k0 += Kernel::kDepth) {
    const int64_t depth = std::min(Kernel::kDepth, k - k0);
    for (int64_t r0 = 0; r0 < m; r0 += Kernel::kRowBlock) {
      const int64_t rows = std::min(Kernel::kRowBlock, m - r0);
      gemm_block<Kernel>(rows, n, k, depth, a + r0 * lda + k0, lda, packed + k0 * Kernel::kPanel,
                         accumulate || k0 > 0, c + r0 * ldc, ldc, k0 == 0 ? bias : nullptr);
    }
  }
}

}  // namespace cpu
}  // namespace fused_rnn
