// The packed weight layout of the package's own CPU GEMM kernels (gemm_avx2.h,
// gemm_avx512.h): W' [K, N] (C = A @ W') in panels of `panel` columns, panel p holding
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

// Packs W' [K, N]: W' is W^T when W is stored [N, K] (trans_w), else W stored [K, N].
// `out` holds panels_size(n, k, panel) floats.
inline void pack_panels(const float* w, bool trans_w, int64_t n, int64_t k, int64_t panel, float* out) {
  const int64_t panels = (n + panel - 1) / panel;
  for (int64_t p = 0; p < panels; ++p) {
    float* block = out + p * k * panel;
    const int64_t first = p * panel, cols = std::min(panel, n - first);
    for (int64_t kk = 0; kk < k; ++kk) {
      float* dst = block + kk * panel;
      for (int64_t j = 0; j < cols; ++j) dst[j] = trans_w ? w[(first + j) * k + kk] : w[kk * n + first + j];
      for (int64_t j = cols; j < panel; ++j) dst[j] = 0.0f;
    }
  }
}

// One panel of `cols` <= panel columns of a row-major W' [K, N] with row stride ld
// (w points at its first column): out[kk * panel + j] = w[kk * ld + j], zero past cols.
inline void pack_strided(const float* w, int64_t ld, int64_t cols, int64_t k, int64_t panel, float* out) {
  for (int64_t kk = 0; kk < k; ++kk) {
    float* dst = out + kk * panel;
    const float* src = w + kk * ld;
    for (int64_t j = 0; j < cols; ++j) dst[j] = src[j];
    for (int64_t j = cols; j < panel; ++j) dst[j] = 0.0f;
  }
}

}  // namespace cpu
}  // namespace fused_rnn
