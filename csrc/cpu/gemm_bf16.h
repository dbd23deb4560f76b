// A bfloat16 GEMM for the CPU scans of bfloat16 layers (and of float32 layers under
// torch.autocast("cpu", torch.bfloat16), which hands the kernels bfloat16 tensors): on
// CPUs with AVX-512 BF16, vdpbf16ps multiplies pairs of bf16 values into float32
// accumulators, 32 products per zmm instruction against the float32 FMA's 16.
//
// What is rounded: both operands, to bf16, to nearest even, as they enter the product.
// A weight is bf16 already (the layer's own dtype: packing it is exact); the other
// operand is h_{t-1} in the forward, the pre-activation gradients in the backward, x in
// the input projection, and for the weight gradients the pre-activation gradients and
// [x_t | h_{t-1} | 1] (so dbias is a float32 sum of rounded gradients). The products of
// two bf16 values are exact in float32 and they are summed in float32; the state, the
// cells and everything outside the products stay float32 (common.h). This is the rounding of a bf16 GEMM on a GPU's tensor cores, and
// it is the only difference from the float32 path the same layer takes on a CPU
// without AVX-512 BF16 (which converts and computes in float32 throughout).
//
// Layout: W' [K, N] (C = A @ W') as bf16 pairs, K rounded up to even: lane j of pair
// row kp holds W'[2 kp, j] in its low 16 bits and W'[2 kp + 1, j] in its high 16 bits,
// the operand order of vdpbf16ps. The pair rows are packed into panels of kPanel = 32
// lanes (two zmm vectors) with gemm_common.h's pack_panels. A is converted to pairs likewise, one block of rows and
// K at a time, into a buffer on the stack (no allocation inside a scan's threads).
//
// The micro-kernel (8 rows x 32 columns, as the float32 AVX-512 kernel's) is written
// once with GCC vector types, which compile to zmm instructions inside the AVX-512
// wrapper below. Its dot product is a policy: NativeDot is the vdpbf16ps instruction;
// EmulatedDot computes the same sums with float32 multiplies and adds (each product is
// exact, so it rounds as the instruction does, denormals aside) and runs anywhere with
// AVX2. The emulation is for the tests only (FUSED_RNN_CPU_BF16=emulate): it runs the
// kernel's packing, tiling, tails and the scans around it on machines without AVX-512
// BF16, at a fraction of the float32 path's speed.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "gemm_common.h"

namespace fused_rnn {
namespace cpu {
namespace bf16 {

// bf16 of x, rounded to nearest even; a NaN stays a (quiet) NaN
__attribute__((always_inline)) inline uint32_t round_bf16(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return (bits >> 16) | 0x40u;
  return (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
}

// out[r * ld_out + kp] = the bf16 pair (x[r, 2 kp], x[r, 2 kp + 1]) for r < rows and
// columns [c0, c1) of x (c0 even; a missing odd column is 0): a block of rows of a
// row-major float32 matrix x with row stride ldx, as pairs.
__attribute__((always_inline)) inline void to_pairs(const float* x, int64_t ldx, int64_t rows, int64_t c0, int64_t c1,
                                                    uint32_t* out, int64_t ld_out) {
  const int64_t pairs = (c1 - c0) / 2;
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * ldx + c0;
    uint32_t* dst = out + r * ld_out;
    for (int64_t kp = 0; kp < pairs; ++kp) dst[kp] = round_bf16(row[2 * kp]) | round_bf16(row[2 * kp + 1]) << 16;
    if ((c1 - c0) % 2 != 0) dst[pairs] = round_bf16(row[2 * pairs]);
  }
}

#if FUSED_RNN_X86_GEMM

inline bool native_supported() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bf16");
  return ok;
}

inline bool emulation_supported() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}

typedef float Floats __attribute__((vector_size(64)));
typedef uint32_t Pairs __attribute__((vector_size(64)));

// unaligned loads; by reference, since a 64-byte vector returned by value is an ABI
// question (-Wpsabi) outside the AVX-512 wrapper these are inlined into
__attribute__((always_inline)) inline void load(Floats& v, const float* p) { std::memcpy(&v, p, sizeof v); }
__attribute__((always_inline)) inline void load(Pairs& v, const uint32_t* p) { std::memcpy(&v, p, sizeof v); }

struct NativeDot {
  // acc[i] += a.lo[i] b.lo[i] + a.hi[i] b.hi[i] (the bf16 halves of each 32-bit lane). Inline
  // assembly rather than the intrinsic: the intrinsic cannot be inlined into the kernel
  // template, which has no target attribute of its own (it takes its wrapper's).
  __attribute__((always_inline)) static void dot(Floats& acc, const Pairs& a, const Pairs& b) {
    asm("vdpbf16ps %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
  }
};

struct EmulatedDot {
  // vdpbf16ps's sum: the odd (high) halves' product, then the even ones'
  __attribute__((always_inline)) static void dot(Floats& acc, const Pairs& a, const Pairs& b) {
    const Pairs high = Pairs{} + 0xffff0000u;
    acc += reinterpret_cast<Floats>(a & high) * reinterpret_cast<Floats>(b & high);
    acc += reinterpret_cast<Floats>(a << 16) * reinterpret_cast<Floats>(b << 16);
  }
};

template <class Dot>
struct Kernel {
  static constexpr int64_t kPanel = 32;     // columns per packed panel: two 16-lane vectors
  static constexpr int64_t kTileRows = 8;   // rows per micro-tile (8 x 2 accumulators)
  static constexpr int64_t kRowBlock = 32;  // rows per block of A converted at once (32 KB on the stack)
  static constexpr int64_t kDepth = 256;    // pairs (512 of K) per block: a panel's block is 32 KB

  // C[rows, cols] (+)= A[rows, 2k] @ panel for rows = MR <= 8, cols <= 32 (+ bias[cols] on
  // every row when bias is not null); a and panel hold k pairs per row.
  template <int MR>
  __attribute__((always_inline)) static void tile(int64_t k, const uint32_t* a, int64_t lda, const uint32_t* panel,
                                                  bool accumulate, float* c, int64_t ldc, int64_t cols,
                                                  const float* bias) {
    Floats c00{}, c01{}, c10{}, c11{}, c20{}, c21{}, c30{}, c31{};
    Floats c40{}, c41{}, c50{}, c51{}, c60{}, c61{}, c70{}, c71{};
    // rows past MR point at row 0 and are never read
    const uint32_t* a0 = a;
    const uint32_t* a1 = a + (MR > 1 ? lda : 0);
    const uint32_t* a2 = a + (MR > 2 ? 2 * lda : 0);
    const uint32_t* a3 = a + (MR > 3 ? 3 * lda : 0);
    const uint32_t* a4 = a + (MR > 4 ? 4 * lda : 0);
    const uint32_t* a5 = a + (MR > 5 ? 5 * lda : 0);
    const uint32_t* a6 = a + (MR > 6 ? 6 * lda : 0);
    const uint32_t* a7 = a + (MR > 7 ? 7 * lda : 0);
    const uint32_t* b = panel;
#define FUSED_RNN_BF16_ROW(row, acc0, acc1) \
  {                                         \
    const Pairs av = Pairs{} + (row)[kk];   \
    Dot::dot(acc0, av, b0);                 \
    Dot::dot(acc1, av, b1);                 \
  }
    for (int64_t kk = 0; kk < k; ++kk, b += kPanel) {
      Pairs b0, b1;
      load(b0, b), load(b1, b + 16);
      FUSED_RNN_BF16_ROW(a0, c00, c01)
      if constexpr (MR > 1) FUSED_RNN_BF16_ROW(a1, c10, c11)
      if constexpr (MR > 2) FUSED_RNN_BF16_ROW(a2, c20, c21)
      if constexpr (MR > 3) FUSED_RNN_BF16_ROW(a3, c30, c31)
      if constexpr (MR > 4) FUSED_RNN_BF16_ROW(a4, c40, c41)
      if constexpr (MR > 5) FUSED_RNN_BF16_ROW(a5, c50, c51)
      if constexpr (MR > 6) FUSED_RNN_BF16_ROW(a6, c60, c61)
      if constexpr (MR > 7) FUSED_RNN_BF16_ROW(a7, c70, c71)
    }
#undef FUSED_RNN_BF16_ROW
    const bool full = cols == kPanel;
    Floats bias0{}, bias1{};
    if (bias != nullptr && full) load(bias0, bias), load(bias1, bias + 16);
#define FUSED_RNN_BF16_STORE(i, acc0, acc1)                                           \
  if constexpr (MR > i) {                                                               \
    float* row = c + i * ldc;                                                           \
    if (full) {                                                                         \
      Floats s0 = acc0 + bias0, s1 = acc1 + bias1;                                      \
      if (accumulate) {                                                                 \
        Floats r0, r1;                                                                  \
        load(r0, row), load(r1, row + 16);                                              \
        s0 += r0, s1 += r1;                                                             \
      }                                                                                 \
      std::memcpy(row, &s0, sizeof s0);                                                 \
      std::memcpy(row + 16, &s1, sizeof s1);                                            \
    } else {                                                                            \
      float part[kPanel];                                                               \
      std::memcpy(part, &acc0, sizeof acc0);                                            \
      std::memcpy(part + 16, &acc1, sizeof acc1);                                       \
      for (int64_t j = 0; j < cols; ++j) {                                              \
        float base = accumulate ? row[j] : 0.0f;                                        \
        if (bias != nullptr) base += bias[j];                                           \
        row[j] = base + part[j];                                                        \
      }                                                                                 \
    }                                                                                   \
  }
    FUSED_RNN_BF16_STORE(0, c00, c01)
    FUSED_RNN_BF16_STORE(1, c10, c11)
    FUSED_RNN_BF16_STORE(2, c20, c21)
    FUSED_RNN_BF16_STORE(3, c30, c31)
    FUSED_RNN_BF16_STORE(4, c40, c41)
    FUSED_RNN_BF16_STORE(5, c50, c51)
    FUSED_RNN_BF16_STORE(6, c60, c61)
    FUSED_RNN_BF16_STORE(7, c70, c71)
#undef FUSED_RNN_BF16_STORE
  }
};

// C[M, N] = A[M, K] @ W' (+ C when accumulate) (+ bias [N] on every row), A float32 with
// row stride lda, W' packed as pairs by PackedWeight (blas.h): K in blocks of kDepth
// pairs, rows in blocks of kRowBlock, each block of A rounded to pairs on the stack (32
// KB: well within a worker thread's stack, 2 MB or more under libgomp and glibc) and
// multiplied by every panel (gemm_common.h's gemm_block).
template <class Dot>
__attribute__((always_inline)) inline void blocked_gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
                                                        const uint32_t* packed, bool accumulate, float* c,
                                                        int64_t ldc, const float* bias) {
  using K = Kernel<Dot>;
  const int64_t pairs = (k + 1) / 2;
  alignas(64) uint32_t block[K::kRowBlock * K::kDepth];
  for (int64_t p0 = 0; p0 == 0 || p0 < pairs; p0 += K::kDepth) {
    const int64_t depth = std::min(K::kDepth, pairs - p0);
    for (int64_t r0 = 0; r0 < m; r0 += K::kRowBlock) {
      const int64_t rows = std::min(K::kRowBlock, m - r0);
      to_pairs(a + r0 * lda, lda, rows, 2 * p0, std::min(k, 2 * (p0 + depth)), block, depth);
      gemm_block<K>(rows, n, pairs, depth, block, depth, packed + p0 * K::kPanel, accumulate || p0 > 0,
                    c + r0 * ldc, ldc, p0 == 0 ? bias : nullptr);
    }
  }
}

__attribute__((target("avx512f,avx512bf16"))) inline void gemm_native(int64_t m, int64_t n, int64_t k, const float* a,
                                                                      int64_t lda, const uint32_t* packed,
                                                                      float beta, float* c, int64_t ldc,
                                                                      const float* bias = nullptr) {
  blocked_gemm<NativeDot>(m, n, k, a, lda, packed, beta != 0.0f, c, ldc, bias);
}

__attribute__((target("avx2,fma"))) inline void gemm_emulated(int64_t m, int64_t n, int64_t k, const float* a,
                                                              int64_t lda, const uint32_t* packed, float beta,
                                                              float* c, int64_t ldc, const float* bias = nullptr) {
  blocked_gemm<EmulatedDot>(m, n, k, a, lda, packed, beta != 0.0f, c, ldc, bias);
}

#else  // not x86-64 with GCC/Clang: no bf16 kernel (the scans compute in float32)

inline bool native_supported() { return false; }
inline bool emulation_supported() { return false; }
inline void gemm_native(int64_t, int64_t, int64_t, const float*, int64_t, const uint32_t*, float, float*, int64_t,
                        const float* = nullptr) {}
inline void gemm_emulated(int64_t, int64_t, int64_t, const float*, int64_t, const uint32_t*, float, float*, int64_t,
                          const float* = nullptr) {}

#endif

constexpr int64_t kPanel = 32;

}  // namespace bf16
}  // namespace cpu
}  // namespace fused_rnn
