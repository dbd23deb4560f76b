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

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc) __attribute__((weak));
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

}  // namespace cpu
}  // namespace fused_rnn
