// The per-step recurrent GEMM of the CPU scans, called straight into BLAS.
//
// A scan makes T small GEMMs; through the ATen dispatcher each costs a few
// microseconds of overhead plus tensor-view allocations, which at B = 1 is as much as
// the GEMM itself. PyTorch's CPU builds export the Fortran BLAS symbols of the BLAS
// they link (MKL on x86-64), so the scans call sgemm_/dgemm_ on raw pointers. The
// symbols are declared weak: on a torch build that does not export them the
// pointers are null and the GEMM goes through at::mm_out instead, slower but
// identical in result semantics.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "gemm_avx2.h"

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc) __attribute__((weak));

// MKL's packed GEMM (float only): the right-hand matrix is converted once into MKL's
// internal blocked layout and reused by every step. Enum values are CBLAS's.
size_t cblas_sgemm_pack_get_size(int identifier, int m, int n, int k) __attribute__((weak));
void cblas_sgemm_pack(int layout, int identifier, int trans, int m, int n, int k, float alpha, const float* src,
                      int ld, float* dest) __attribute__((weak));
void cblas_sgemm_compute(int layout, int transa, int transb, int m, int n, int k, const float* a, int lda,
                         const float* b, int ldb, float beta, float* c, int ldc) __attribute__((weak));
}

namespace fused_rnn {
namespace cpu {

inline bool has_direct_blas() { return sgemm_ != nullptr && dgemm_ != nullptr; }

// Row-major C[M, N] = A' @ B' + beta * C, where A' is A [M, K] (or A^T when A is
// stored [K, M] and trans_a) and likewise B' [K, N]; lda/ldb/ldc are row strides.
// beta is 0 (overwrite) or 1 (accumulate).
template <typename scalar_t>
void gemm_row_major(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
                    const scalar_t* a, int64_t lda, const scalar_t* b, int64_t ldb,
                    scalar_t beta, scalar_t* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (has_direct_blas() && m < INT32_MAX && n < INT32_MAX && k < INT32_MAX && lda < INT32_MAX &&
      ldb < INT32_MAX && ldc < INT32_MAX) {
    // Column-major BLAS sees each row-major matrix transposed: C^T = B'^T A'^T.
    const char ta = trans_a ? 'T' : 'N';
    const char tb = trans_b ? 'T' : 'N';
    const int M = static_cast<int>(n), N = static_cast<int>(m), K = static_cast<int>(k);
    const int LDA = static_cast<int>(ldb < 1 ? 1 : ldb), LDB = static_cast<int>(lda < 1 ? 1 : lda);
    const int LDC = static_cast<int>(ldc);
    const scalar_t one = 1;
    if constexpr (std::is_same_v<scalar_t, float>) {
      sgemm_(&tb, &ta, &M, &N, &K, &one, b, &LDA, a, &LDB, &beta, c, &LDC);
    } else {
      dgemm_(&tb, &ta, &M, &N, &K, &one, b, &LDA, a, &LDB, &beta, c, &LDC);
    }
    return;
  }
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value);
  auto a_t = trans_a ? at::from_blob(const_cast<scalar_t*>(a), {k, m}, {lda, 1}, options).t()
                     : at::from_blob(const_cast<scalar_t*>(a), {m, k}, {lda, 1}, options);
  auto b_t = trans_b ? at::from_blob(const_cast<scalar_t*>(b), {n, k}, {ldb, 1}, options).t()
                     : at::from_blob(const_cast<scalar_t*>(b), {k, n}, {ldb, 1}, options);
  auto c_t = at::from_blob(c, {m, n}, {ldc, 1}, options);
  if (beta == scalar_t(0)) {
    at::mm_out(c_t, a_t, b_t);
  } else {
    c_t.addmm_(a_t, b_t);
  }
}

// The recurrent product of a scan, C[M, N] (+)= A[M, K] @ W' with the same weight W'
// at every step: W' is W^T when W is stored [N, K] (trans_w), else W stored [K, N].
//
// W' is packed once per scan and reused by every step. float32 on a CPU with AVX2 and
// FMA uses this package's own kernel (gemm_avx2.h), 1.1-1.3x MKL's sgemm at a thread's
// per-step shapes. Otherwise, where MKL's packed API is exported (float32 on x86-64
// torch builds), MKL packs W' (an sgemm call would repack it every step, a tenth of
// the step's time at B = 64, H = 256); float64 and other builds call BLAS per step.
// FUSED_RNN_CPU_GEMM=blas in the environment skips the own kernel (read when a scan
// starts), to compare the two or to rule the kernel out when chasing a problem.
inline bool own_gemm_enabled() {
  static const bool cpu_ok = avx2::supported();
  const char* choice = std::getenv("FUSED_RNN_CPU_GEMM");
  return cpu_ok && (choice == nullptr || std::strcmp(choice, "blas") != 0);
}

template <typename scalar_t>
class RecurrentGemm {
 public:
  RecurrentGemm(const scalar_t* w, bool trans_w, int64_t m, int64_t n, int64_t k)
      : w_(w), trans_w_(trans_w), m_(m), n_(n), k_(k) {
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (m == 0 || n == 0) return;
      if (own_gemm_enabled()) {
        packed_ = at::empty({avx2::packed_size(n, k)}, at::TensorOptions().dtype(at::kFloat));
        avx2::pack(w, trans_w, n, k, packed_.data_ptr<float>());
        own_ = true;
        return;
      }
      const bool fits = m < INT32_MAX && n < INT32_MAX && k < INT32_MAX;
      if (fits && k > 0 && cblas_sgemm_pack_get_size != nullptr && cblas_sgemm_pack != nullptr &&
          cblas_sgemm_compute != nullptr) {
        const size_t bytes = cblas_sgemm_pack_get_size(kBMatrix, int(m), int(n), int(k));
        packed_ = at::empty({static_cast<int64_t>((bytes + sizeof(float) - 1) / sizeof(float))},
                            at::TensorOptions().dtype(at::kFloat));
        const int ld = static_cast<int>(trans_w ? k : n);
        cblas_sgemm_pack(kRowMajor, kBMatrix, trans_w ? kTrans : kNoTrans, int(m), int(n), int(k), 1.0f, w, ld,
                         packed_.data_ptr<float>());
      }
    }
  }

  // c [M, N] = a [M, K] @ W' + beta * c, rows contiguous (lda = K, ldc = N)
  void operator()(const scalar_t* a, scalar_t beta, scalar_t* c) const {
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (own_) {
        avx2::gemm(m_, n_, k_, a, k_, packed_.const_data_ptr<float>(), beta, c, n_);
        return;
      }
      if (packed_.defined()) {
        cblas_sgemm_compute(kRowMajor, kNoTrans, kPacked, int(m_), int(n_), int(k_), a, int(k_),
                            packed_.const_data_ptr<float>(), int(trans_w_ ? k_ : n_), beta, c, int(n_));
        return;
      }
    }
    gemm_row_major<scalar_t>(false, trans_w_, m_, n_, k_, a, k_, w_, trans_w_ ? k_ : n_, beta, c, n_);
  }

 private:
  static constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112, kPacked = 151, kBMatrix = 162;
  const scalar_t* w_;
  bool trans_w_;
  int64_t m_, n_, k_;
  bool own_ = false;   // packed_ holds avx2::pack's layout
  at::Tensor packed_;  // or MKL's, when defined and !own_
};

}  // namespace cpu
}  // namespace fused_rnn
