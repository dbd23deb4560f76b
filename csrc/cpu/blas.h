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
#include <ATen/Parallel.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "gemm_avx2.h"
#include "gemm_avx512.h"
#include "gemm_bf16.h"
#include "../layer_common.h"

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
// W' is packed once per scan and reused by every step. float32 uses this package's own
// kernel for the widest instruction set the CPU has: AVX-512 (gemm_avx512.h), else
// AVX2 and FMA (gemm_avx2.h, 1.1-1.3x MKL's sgemm at a thread's per-step shapes), with
// one packed W' shared by the scan's threads (PackedWeight).
// Otherwise, where MKL's packed API is exported (float32 on x86-64 torch builds), MKL
// packs W' (an sgemm call would repack it every step, a tenth of the step's time at
// B = 64, H = 256); float64 and other builds call BLAS per step.
// FUSED_RNN_CPU_ISA=avx2 or =blas in the environment forces a lower path (read when a
// scan starts), to compare them or to rule a kernel out when chasing a problem; the
// tests run every path the machine has.
enum class GemmKernel { kBlas, kAvx2, kAvx512 };

inline const char* gemm_kernel_name(GemmKernel kernel) {
  return kernel == GemmKernel::kAvx512 ? "avx512" : kernel == GemmKernel::kAvx2 ? "avx2" : "blas";
}

// The widest kernel this CPU runs, lowered by FUSED_RNN_CPU_ISA.
inline GemmKernel gemm_kernel() {
  static const GemmKernel best = avx512::supported() ? GemmKernel::kAvx512
                                 : avx2::supported() ? GemmKernel::kAvx2
                                                     : GemmKernel::kBlas;
  const char* choice = std::getenv("FUSED_RNN_CPU_ISA");
  if (choice == nullptr || *choice == '\0') return best;
  for (const GemmKernel kernel : {GemmKernel::kBlas, GemmKernel::kAvx2, GemmKernel::kAvx512}) {
    if (std::strcmp(choice, gemm_kernel_name(kernel)) != 0) continue;
    TORCH_CHECK(kernel <= best, "fused_rnn: FUSED_RNN_CPU_ISA=", choice, " asks for a kernel this CPU cannot run; ",
                "it runs ", gemm_kernel_name(best), " and the paths below it");
    return kernel;
  }
  TORCH_CHECK(false, "fused_rnn: FUSED_RNN_CPU_ISA must be avx512, avx2 or blas, got '", choice, "'");
}

// bfloat16 layers: the scans' float32 GEMMs take bf16 products (gemm_bf16.h) where
// the CPU has AVX-512 BF16 and runs the avx512 path (kNative), else none (kOff: the
// scans compute in float32, as for float16). FUSED_RNN_CPU_BF16=off turns the native
// products off (to compare), =native requires them, and =emulate runs the same kernel
// with the dot product emulated in AVX2 FMAs (kEmulated: for the tests, on CPUs
// without AVX-512 BF16).
enum class Bf16Products { kOff, kEmulated, kNative };

inline const char* bf16_products_name(Bf16Products mode) {
  return mode == Bf16Products::kNative ? "avx512_bf16" : mode == Bf16Products::kEmulated ? "emulated" : "off";
}

inline Bf16Products bf16_products() {
  const bool native = bf16::native_supported() && gemm_kernel() == GemmKernel::kAvx512;
  const char* choice = std::getenv("FUSED_RNN_CPU_BF16");
  if (choice == nullptr || *choice == '\0') return native ? Bf16Products::kNative : Bf16Products::kOff;
  if (std::strcmp(choice, "off") == 0) return Bf16Products::kOff;
  if (std::strcmp(choice, "native") == 0) {
    TORCH_CHECK(native, "fused_rnn: FUSED_RNN_CPU_BF16=native needs a CPU with AVX-512 BF16 on the avx512 path; ",
                "this one runs ", gemm_kernel_name(gemm_kernel()),
                bf16::native_supported() ? "" : " and has no AVX-512 BF16");
    return Bf16Products::kNative;
  }
  if (std::strcmp(choice, "emulate") == 0) {
    TORCH_CHECK(bf16::emulation_supported(), "fused_rnn: FUSED_RNN_CPU_BF16=emulate needs a CPU with AVX2 and FMA");
    return Bf16Products::kEmulated;
  }
  TORCH_CHECK(false, "fused_rnn: FUSED_RNN_CPU_BF16 must be native, emulate or off, got '", choice, "'");
}

// The bf16 products of the calling thread's current call (kOff outside a bf16 call).
// Everything that packs a weight runs on the calling thread before a scan's threads
// start, so they read it here and the packed weights carry it into the threads. (A
// RecurrentGemm built inside a parallel region without a shared packed weight would
// read kOff there and multiply in float32; none is: pack_recurrent's result is defined
// whenever bf16 products are on.)
inline Bf16Products& current_bf16_products() {
  thread_local Bf16Products mode = Bf16Products::kOff;
  return mode;
}

// Within its lifetime the float32 GEMMs of the calling thread take bf16 products (when
// `bf16_inputs` and bf16_products() has them): set by the ops on bfloat16 tensors, around
// their float32 scan.
class Bf16Scope {
 public:
  explicit Bf16Scope(bool bf16_inputs) : previous_(current_bf16_products()) {
    current_bf16_products() = bf16_inputs ? bf16_products() : Bf16Products::kOff;
  }
  ~Bf16Scope() { current_bf16_products() = previous_; }
  Bf16Scope(const Bf16Scope&) = delete;
  Bf16Scope& operator=(const Bf16Scope&) = delete;

 private:
  Bf16Products previous_;
};

// W' [K, N] packed once for one of the package's own kernels (gemm_common.h's layout;
// bf16 pairs for the bf16 kernel, gemm_bf16.h): W' is W^T when W is stored [N, K]
// (trans_w), else W stored [K, N], with row stride ld. Called outside a parallel region,
// the panels are packed by all threads; the packed weight is read-only afterwards, so
// the threads of a scan share one.
class PackedWeight {
 public:
  PackedWeight() = default;
  PackedWeight(GemmKernel kernel, Bf16Products bf16, const float* w, bool trans_w, int64_t ld, int64_t n, int64_t k)
      : kernel_(kernel), bf16_(bf16), n_(n), k_(k) {
    if (bf16 != Bf16Products::kOff) {
      pack_pairs(w, trans_w, ld);
      return;
    }
    TORCH_CHECK(kernel != GemmKernel::kBlas, "fused_rnn: internal error: PackedWeight for BLAS");
    const int64_t panel = kernel == GemmKernel::kAvx512 ? avx512::Kernel::kPanel : avx2::Kernel::kPanel;
    data_ = at::empty({panels_size(n, k, panel)}, at::TensorOptions().dtype(at::kFloat));
    float* out = data_.data_ptr<float>();
    at::parallel_for(0, (n + panel - 1) / panel, 1, [&](int64_t p0, int64_t p1) {
      pack_panels(w, trans_w, ld, n, k, panel, out, p0, p1);
    });
  }

  bool defined() const { return data_.defined(); }
  GemmKernel kernel() const { return kernel_; }

  // c [M, N] = a [M, K] @ W' (+ c when beta = 1) (+ bias [N] on every row); lda and ldc
  // are row strides.
  void multiply(int64_t m, const float* a, int64_t lda, float beta, float* c, int64_t ldc,
                const float* bias = nullptr) const {
    if (bf16_ != Bf16Products::kOff) {
      const auto* pairs = static_cast<const uint32_t*>(data_.const_data_ptr());
      if (bf16_ == Bf16Products::kNative) {
        bf16::gemm_native(m, n_, k_, a, lda, pairs, beta, c, ldc, bias);
      } else {
        bf16::gemm_emulated(m, n_, k_, a, lda, pairs, beta, c, ldc, bias);
      }
      return;
    }
    const float* packed = data_.const_data_ptr<float>();
    if (kernel_ == GemmKernel::kAvx512) {
      avx512::gemm(m, n_, k_, a, lda, packed, beta, c, ldc, bias);
    } else {
      avx2::gemm(m, n_, k_, a, lda, packed, beta, c, ldc, bias);
    }
  }

 private:
  // W' as bf16 pairs (gemm_bf16.h): the pair rows [K/2, N] (W^T's, from W's rows when
  // trans_w) are built first, then packed into panels as 32-bit lanes.
  void pack_pairs(const float* w, bool trans_w, int64_t ld) {
    const int64_t pairs = (k_ + 1) / 2, panel = bf16::kPanel;
    const auto int32 = at::TensorOptions().dtype(at::kInt);
    auto rows = at::empty({n_ * pairs}, int32);  // [N, K/2] when trans_w, else [K/2, N]
    auto* pair_data = static_cast<uint32_t*>(rows.data_ptr());
    if (trans_w) {
      at::parallel_for(0, n_, 16, [&](int64_t r0, int64_t r1) {
        bf16::to_pairs(w + r0 * ld, ld, r1 - r0, 0, k_, pair_data + r0 * pairs, pairs);
      });
    } else {
      at::parallel_for(0, pairs, 16, [&](int64_t p0, int64_t p1) {
        for (int64_t kp = p0; kp < p1; ++kp) {
          const float* even = w + 2 * kp * ld;
          const float* odd = 2 * kp + 1 < k_ ? even + ld : nullptr;
          uint32_t* dst = pair_data + kp * n_;
          for (int64_t j = 0; j < n_; ++j) {
            dst[j] = bf16::round_bf16(even[j]) | (odd != nullptr ? bf16::round_bf16(odd[j]) << 16 : 0u);
          }
        }
      });
    }
    data_ = at::empty({panels_size(n_, pairs, panel)}, int32);
    auto* out = static_cast<uint32_t*>(data_.data_ptr());
    at::parallel_for(0, (n_ + panel - 1) / panel, 1, [&](int64_t p0, int64_t p1) {
      pack_panels<uint32_t>(pair_data, trans_w, trans_w ? pairs : n_, n_, pairs, panel, out, p0, p1);
    });
  }

  GemmKernel kernel_ = GemmKernel::kBlas;
  Bf16Products bf16_ = Bf16Products::kOff;
  int64_t n_ = 0, k_ = 0;
  at::Tensor data_;
};

// The recurrent weight of a scan packed for the own kernel, on the calling thread before
// the scan's threads start (undefined for float64 and for the BLAS path).
// `pack` false (common.h's packs_weights: a scan of one step on a few rows): nothing.
template <typename scalar_t>
PackedWeight pack_recurrent(const scalar_t* w, bool trans_w, int64_t n, int64_t k, bool pack = true) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (!pack) return {};
    const GemmKernel kernel = gemm_kernel();
    const Bf16Products bf16 = current_bf16_products();
    if ((kernel != GemmKernel::kBlas || bf16 != Bf16Products::kOff) && n > 0) {
      return PackedWeight(kernel, bf16, w, trans_w, trans_w ? k : n, n, k);
    }
  }
  return {};
}

template <typename scalar_t>
class RecurrentGemm {
 public:
  // `shared`: W' already packed by pack_recurrent (the scans' threads share it); without
  // it the own kernels pack W' here (the hidden-split slices, each its own part of W).
  // `pack` false: nothing is packed and every product multiplies W' as stored (a scan of
  // one step on a few rows, common.h's packs_weights): avx2::few_rows, or BLAS.
  RecurrentGemm(const scalar_t* w, bool trans_w, int64_t m, int64_t n, int64_t k,
                const PackedWeight* shared = nullptr, bool pack = true)
      : w_(w), trans_w_(trans_w), m_(m), n_(n), k_(k) {
    if constexpr (std::is_same_v<scalar_t, float>) {
      // unpacked: avx2::few_rows on the own kernels' paths (a CPU with AVX2), else BLAS
      few_rows_ = !pack && gemm_kernel() != GemmKernel::kBlas;
      if (m == 0 || n == 0 || !pack) return;
      if (shared != nullptr && shared->defined()) {
        packed_ = shared;
        return;
      }
      const GemmKernel kernel = gemm_kernel();
      const Bf16Products bf16 = current_bf16_products();
      if (kernel != GemmKernel::kBlas || bf16 != Bf16Products::kOff) {
        own_ = PackedWeight(kernel, bf16, w, trans_w, trans_w ? k : n, n, k);
        packed_ = &own_;
        return;
      }
      const bool fits = m < INT32_MAX && n < INT32_MAX && k < INT32_MAX;
      if (fits && k > 0 && cblas_sgemm_pack_get_size != nullptr && cblas_sgemm_pack != nullptr &&
          cblas_sgemm_compute != nullptr) {
        const size_t bytes = cblas_sgemm_pack_get_size(kBMatrix, int(m), int(n), int(k));
        mkl_packed_ = at::empty({static_cast<int64_t>((bytes + sizeof(float) - 1) / sizeof(float))},
                                at::TensorOptions().dtype(at::kFloat));
        const int ld = static_cast<int>(trans_w ? k : n);
        cblas_sgemm_pack(kRowMajor, kBMatrix, trans_w ? kTrans : kNoTrans, int(m), int(n), int(k), 1.0f, w, ld,
                         mkl_packed_.data_ptr<float>());
      }
    }
  }
  RecurrentGemm(const RecurrentGemm&) = delete;
  RecurrentGemm& operator=(const RecurrentGemm&) = delete;

  // c [M, N] = a [M, K] @ W' + beta * c, rows contiguous (lda = K, ldc = N)
  void operator()(const scalar_t* a, scalar_t beta, scalar_t* c) const {
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (few_rows_) {
        avx2::few_rows(trans_w_, m_, n_, k_, a, k_, w_, trans_w_ ? k_ : n_, beta, c, n_);
        return;
      }
      if (packed_ != nullptr) {
        packed_->multiply(m_, a, k_, beta, c, n_);
        return;
      }
      if (mkl_packed_.defined()) {
        cblas_sgemm_compute(kRowMajor, kNoTrans, kPacked, int(m_), int(n_), int(k_), a, int(k_),
                            mkl_packed_.const_data_ptr<float>(), int(trans_w_ ? k_ : n_), beta, c, int(n_));
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
  bool few_rows_ = false;                 // unpacked on the own kernels' paths: avx2::few_rows
  const PackedWeight* packed_ = nullptr;  // the own kernel's W' (shared, or own_)
  PackedWeight own_;
  at::Tensor mkl_packed_;                 // MKL's packed W' on the BLAS path
};

// a [M, K] @ b [K, N] (+ bias [N] on every row) for the whole-sequence GEMMs of the
// scans (the input projection, the weight gradients, dx): float32 on the own kernel, b
// packed once (its panels in parallel) and the rows of a split across threads; float64
// and the BLAS path through ATen (MKL, which runs its AVX2 code on AMD CPUs: half the
// AVX-512 kernel's rate on a core with full-width AVX-512).
//
// On AVX2 the own kernel only takes the input projection, whose b is a weight (W_ih^T,
// small to pack): its rate there is MKL's (one Zen 3 core: 64 against 64 GFLOP/s at the
// lesson's shape, 83 against 82 for the weight gradients), and packing the weight
// gradients' b, an activation-sized [T B, 4H] matrix (16 MB at the lesson's shape), lost
// to MKL's internal packing: LSTM training 1.25x nn.LSTM against 1.39x with MKL (same
// run, 2 threads).
//
// Below kMinPackedRows rows (a single step of a few rows: the sampling loops) packing b
// costs more than the product, which avx2::few_rows does on b as stored on the avx2 and
// avx512 paths (BLAS on the blas path).
constexpr int64_t kMinPackedRows = 16;

inline at::Tensor sequence_matmul(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& bias) {
  const int64_t m = a.size(0), k = a.size(1), n = b.size(1);
  const GemmKernel kernel = a.scalar_type() == at::kFloat ? gemm_kernel() : GemmKernel::kBlas;
  // b is W' [K, N]: a transposed view of a row-major [N, K] matrix (a weight), or row-major
  const bool trans_w = b.stride(0) == 1 && b.stride(1) >= k && k > 1;
  // bf16 products (a bf16 layer's call) take every one of them, as on the avx512 path
  const Bf16Products bf16 = a.scalar_type() == at::kFloat ? current_bf16_products() : Bf16Products::kOff;
  // a few rows: unpacked, on the own kernels' paths (avx2::few_rows)
  const bool few = m < kMinPackedRows && kernel != GemmKernel::kBlas && bf16 == Bf16Products::kOff;
  const bool own_kernel = kernel == GemmKernel::kAvx512 || (kernel == GemmKernel::kAvx2 && trans_w);
  const bool own = few || own_kernel || bf16 != Bf16Products::kOff;
  if (!own || m == 0 || n == 0) return aten_matmul(a, b, bias);
  const auto w = trans_w || (b.stride(1) == 1 && b.stride(0) >= n) ? b : b.contiguous();
  const int64_t ldw = trans_w ? w.stride(1) : w.stride(0);
  const auto lhs = a.stride(1) == 1 ? a : a.contiguous();
  const int64_t lda = lhs.stride(0);
  const auto bias_values = bias.has_value() ? bias->contiguous() : at::Tensor();
  auto out = at::empty({m, n}, a.options());
  const float* a_data = lhs.const_data_ptr<float>();
  const float* bias_data = bias_values.defined() ? bias_values.const_data_ptr<float>() : nullptr;
  float* c = out.data_ptr<float>();
  if (few) {
    avx2::few_rows(trans_w, m, n, k, a_data, lda, w.const_data_ptr<float>(), ldw, 0.0f, c, n, bias_data);
    return out;
  }
  const PackedWeight packed(kernel, bf16, w.const_data_ptr<float>(), trans_w, ldw, n, k);
  at::parallel_for(0, m, 64, [&](int64_t r0, int64_t r1) {
    packed.multiply(r1 - r0, a_data + r0 * lda, lda, 0.0f, c + r0 * n, n, bias_data);
  });
  return out;
}

// a^T, contiguous, for the weight gradients (layer_common.h's weight_grads), whose blocks
// of the stacked GEMM's [I + H + 1, G*H] result (16 rows or more) become dW_ih and dW_hh. ATen copies a
// transpose element by element: 620 us for the LSTM's 256 x 1024 block of dW_hh at the
// lesson's shape on a Zen 3 core, a twentieth of a training call at T = 8. On the own
// kernels' paths (a CPU with AVX2) float32 goes through 8 x 8 register transposes
// (gemm_common.h), the threads splitting the columns.
inline at::Tensor transposed(const at::Tensor& a) {
  if (a.scalar_type() != at::kFloat || a.dim() != 2 || a.stride(1) != 1 || gemm_kernel() == GemmKernel::kBlas) {
    return a.t().contiguous();
  }
  const int64_t rows = a.size(0), cols = a.size(1), ld = a.stride(0);
  auto out = at::empty({cols, rows}, a.options());
  const float* src = a.const_data_ptr<float>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, cols, 64, [&](int64_t i0, int64_t i1) {
    transpose_rows(src + i0, ld, rows, i1 - i0, dst + i0 * rows, rows);
  });
  return out;
}

}  // namespace cpu
}  // namespace fused_rnn
