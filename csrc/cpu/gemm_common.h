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

namespace fused_rnn {
namespace cpu {

inline int64_t panels_size(int64_t n, int64_t k, int64_t panel) { return (n + panel - 1) / panel * panel * k; }

// Packs W' [K, N]: W' is W^T when W is stored [N, K] (trans_w), else W stored [K, N],
// with row stride ld (K, resp. N, when dense). `out` holds panels_size(n, k, panel)
// floats; panels [p0, p1) only are written (threads split the panels).
inline void pack_panels(const float* w, bool trans_w, int64_t ld, int64_t n, int64_t k, int64_t panel, float* out,
                        int64_t p0, int64_t p1) {
  for (int64_t p = p0; p < p1; ++p) {
    float* block = out + p * k * panel;
    const int64_t first = p * panel, cols = std::min(panel, n - first);
    if (trans_w) {
      // W^T's panel is a block of W's rows: read each row once, contiguously
      for (int64_t j = 0; j < cols; ++j) {
        const float* row = w + (first + j) * ld;
        for (int64_t kk = 0; kk < k; ++kk) block[kk * panel + j] = row[kk];
      }
    } else {
      for (int64_t kk = 0; kk < k; ++kk) {
        const float* row = w + kk * ld + first;
        for (int64_t j = 0; j < cols; ++j) block[kk * panel + j] = row[j];
      }
    }
    for (int64_t kk = 0; kk < k; ++kk) {
      for (int64_t j = cols; j < panel; ++j) block[kk * panel + j] = 0.0f;
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

// Row-major C[M, N] = A[M, K] @ W' (+ C if accumulate) (+ bias [N] on every row when bias
// is not null), W' packed by pack_panels() with Kernel::kPanel; lda and ldc are row
// strides. Kernel::tile<MR>(k, a, lda, panel, accumulate, c, ldc, cols, bias) computes
// MR <= kTileRows rows of one panel (cols <= kPanel of its columns are real).
//
// The loops: K in blocks of Kernel::kDepth, so that a panel's block stays in L1 while
// every row tile of a block of kRowBlock rows reads it (with all of K at once, a panel of
// the backward's K = 4H = 1024 is 96 KB and each tile read it from L2: 70 against 85
// GFLOP/s on one Zen 3 core); then blocks of rows, whose slice of A stays in L2 over
// all panels; then panels; then row tiles. Inlined into each kernel's gemm(), which
// carries the instruction set's target attribute, so that the tiles inline into it.
template <class Kernel>
__attribute__((always_inline)) inline void blocked_gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
                                                        const float* packed, bool accumulate, float* c, int64_t ldc,
                                                        const float* bias) {
  constexpr int64_t kPanel = Kernel::kPanel, kTileRows = Kernel::kTileRows;
  const int64_t panels = (n + kPanel - 1) / kPanel;
  // k0 == 0 runs once even when K = 0 (C = bias, or C unchanged when accumulating)
  for (int64_t k0 = 0; k0 == 0 || k0 < k; k0 += Kernel::kDepth) {
    const int64_t depth = std::min(Kernel::kDepth, k - k0);
    const bool add = accumulate || k0 > 0;
    const float* block_bias = k0 == 0 ? bias : nullptr;
    for (int64_t r0 = 0; r0 < m; r0 += Kernel::kRowBlock) {
      const int64_t r1 = std::min(m, r0 + Kernel::kRowBlock);
      for (int64_t p = 0; p < panels; ++p) {
        const float* panel = packed + (p * k + k0) * kPanel;
        const int64_t col = p * kPanel, cols = std::min(kPanel, n - col);
        const float* a_block = a + k0;
        float* out = c + col;
        const float* panel_bias = block_bias != nullptr ? block_bias + col : nullptr;
        int64_t r = r0;
        for (; r + kTileRows <= r1; r += kTileRows) {
          Kernel::template tile<kTileRows>(depth, a_block + r * lda, lda, panel, add, out + r * ldc, ldc, cols,
                                           panel_bias);
        }
        partial_tile<Kernel>(r1 - r, depth, a_block + r * lda, lda, panel, add, out + r * ldc, ldc, cols,
                             panel_bias);
      }
    }
  }
}

}  // namespace cpu
}  // namespace fused_rnn
