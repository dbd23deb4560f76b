// Helpers shared by the IRNN and LSTM CPU scans: argument checks, the input
// projection, the post-scan weight-gradient GEMMs, and row-parallel loops.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstring>
#include <optional>

#include "../layer_common.h"
#include "blas.h"

namespace fused_rnn {
namespace cpu {

// The pointwise row loops (the cells, the ReLUs) are compiled three times on x86-64:
// for AVX-512 (x86-64-v4), AVX2+FMA (x86-64-v3) and the baseline (SSE2). A scan picks
// one when it starts, with the GEMM kernel (blas.h's gemm_kernel(), which
// FUSED_RNN_CPU_ISA lowers): the avx512 path runs the v4 loops, avx2 the v3 loops, and
// blas the baseline ones, so each path is the whole of what a CPU of that kind runs and
// the tests run every path this CPU has. A loop is an always-inline function called
// through with_row_isa(isa, [&]() FUSED_RNN_INLINE { ... }): the lambda is inlined into
// a wrapper compiled for that instruction set, and the loop with it.
// "arch=x86-64-v3/v4" needs GCC 12; an "arch=haswell" target would also set Haswell
// tuning, which stops GCC inlining the cell maths, and the loop then does not
// vectorise. Other compilers get the baseline loops only.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && !defined(__CUDACC__)
#define FUSED_RNN_ROW_ISAS 1
#define FUSED_RNN_TARGET_V4 __attribute__((target("arch=x86-64-v4")))
#define FUSED_RNN_TARGET_V3 __attribute__((target("arch=x86-64-v3")))
#else
#define FUSED_RNN_ROW_ISAS 0
#define FUSED_RNN_TARGET_V4
#define FUSED_RNN_TARGET_V3
#endif
#define FUSED_RNN_INLINE __attribute__((always_inline))

enum class RowIsa { kBaseline, kX86_64_v3, kX86_64_v4 };

inline const char* row_isa_name(RowIsa isa) {
  return isa == RowIsa::kX86_64_v4 ? "x86-64-v4" : isa == RowIsa::kX86_64_v3 ? "x86-64-v3" : "baseline";
}

// The row loops of the GEMM path `kernel` (read once when a scan starts), at most the
// level the CPU has: the GEMM kernels need AVX512F (resp. AVX2 and FMA) only, while
// x86-64-v4 code may also use AVX512 VL, DQ and BW (which Knights Landing lacks) and
// x86-64-v3 code BMI, LZCNT, MOVBE and F16C (which a virtual machine may hide).
inline RowIsa row_isa(GemmKernel kernel = gemm_kernel()) {
#if FUSED_RNN_ROW_ISAS
  static const bool v4 = __builtin_cpu_supports("x86-64-v4"), v3 = __builtin_cpu_supports("x86-64-v3");
  if (kernel == GemmKernel::kAvx512 && v4) return RowIsa::kX86_64_v4;
  if (kernel != GemmKernel::kBlas && v3) return RowIsa::kX86_64_v3;
#endif
  (void)kernel;
  return RowIsa::kBaseline;
}

// noinline: each instruction set's build of a loop stays a function of its own (the
// tests read them in the disassembly)
template <typename Loop>
FUSED_RNN_TARGET_V4 __attribute__((noinline)) void run_x86_64_v4(const Loop& loop) {
  loop();
}

template <typename Loop>
FUSED_RNN_TARGET_V3 __attribute__((noinline)) void run_x86_64_v3(const Loop& loop) {
  loop();
}

template <typename Loop>
__attribute__((noinline)) void run_baseline(const Loop& loop) {
  loop();
}

// loop() compiled for `isa` (loop: an always-inline lambda, see above).
template <typename Loop>
inline void with_row_isa(RowIsa isa, const Loop& loop) {
  switch (isa) {
    case RowIsa::kX86_64_v4: return run_x86_64_v4(loop);
    case RowIsa::kX86_64_v3: return run_x86_64_v3(loop);
    default: return run_baseline(loop);
  }
}

// Batch rows are independent in a recurrence, so the scans split the batch, not each
// step: every thread runs the whole sequence on its own slice of rows with a
// single-threaded GEMM per step (BLAS runs single-threaded inside an OpenMP region),
// and no thread waits on another until the scan ends. A per-step split instead pays
// a fork/join twice per step and makes each small GEMM smaller still.
// Below this many rows per slice a step's GEMM degenerates towards a GEMV that is
// bound by reading W_hh, and one slice with BLAS's own threading is faster.
constexpr int64_t kMinRowsPerThread = 16;

// Below kMinRowsPerThread rows the batch is not split; for the LSTM, whose W_hh (4H x H,
// 1 MB at H = 256) outgrows one core's L2 cache, the hidden units are split across
// threads instead, each keeping its slice of W_hh in its own cache, at the price of a
// barrier per step (lstm.cpp). A slice has at least kMinUnitsPerThread units, a
// multiple of kUnitAlign so that each thread's rows start on a SIMD-width boundary.
constexpr int64_t kMinUnitsPerThread = 64;
constexpr int64_t kUnitAlign = 8;

// Whether a scan of `steps` steps on `batch` rows packs its recurrent weights for the
// own kernel (or MKL). One step on fewer than kMinPackedRows rows (the sampling
// loops: one character at a time) multiplies each weight once, nearly a GEMV bound by
// reading it: packing would read it and write it once more, and the hidden split would
// copy W_hh's slices, for no step to reuse. Such a scan multiplies the weights as stored
// (avx2::few_rows on the own kernels' paths, BLAS on the blas path). bf16 products
// (blas.h) always pack: their kernel multiplies pairs.
inline bool packs_weights(int64_t steps, int64_t batch) {
  return steps > 1 || batch >= kMinPackedRows || current_bf16_products() != Bf16Products::kOff;
}

// How many threads split the hidden units of a scan (<= 1: do not split).
inline int hidden_split_threads(int64_t steps, int64_t batch, int64_t hidden) {
  if (batch >= kMinRowsPerThread || at::in_parallel_region() || !packs_weights(steps, batch)) return 1;
  return static_cast<int>(std::min<int64_t>(at::get_num_threads(), hidden / kMinUnitsPerThread));
}

// Units [first, last) of thread k among n.
inline std::pair<int64_t, int64_t> unit_range(int64_t hidden, int n, int k) {
  const int64_t per_thread = ((hidden + n - 1) / n + kUnitAlign - 1) / kUnitAlign * kUnitAlign;
  const int64_t first = std::min<int64_t>(hidden, k * per_thread);
  return {first, std::min<int64_t>(hidden, first + per_thread)};
}

// Calls fn(row_begin, row_end) over slices of the batch, one per thread, each of at
// least kMinRowsPerThread rows (a single slice below 2 * kMinRowsPerThread rows).
template <typename Fn>
void parallel_batch(int64_t batch, const Fn& fn) {
  const int64_t slices = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), batch / kMinRowsPerThread));
  at::parallel_for(0, batch, (batch + slices - 1) / slices, fn);
}


// bfloat16 / float16 layers on the CPU: the kernels run in float32 (state, products and
// accumulation), on inputs and weights converted once at the call; outputs and
// gradients come back in the inputs' dtype, the LSTM's saved cells and gates in float32
// (as on CUDA). There is no native bf16 dot product here yet (AVX-512 BF16's vdpbf16ps,
// which this machine's CPUs have, is issue 15's next step): the conversion costs one
// pass over each tensor.
// seq[T - 1] of a contiguous [T, B, W] sequence (T > 0) as a fresh [B, W] tensor: one
// memcpy instead of ATen's select and clone, whose dispatch is a few us of a single step.
inline at::Tensor last_step(const at::Tensor& seq) {
  TORCH_INTERNAL_ASSERT(seq.dim() == 3 && seq.size(0) > 0 && seq.is_contiguous());
  auto out = at::empty({seq.size(1), seq.size(2)}, seq.options());
  const size_t bytes = static_cast<size_t>(out.numel()) * seq.element_size();
  if (bytes == 0) return out;  // B = 0 or W = 0: no data pointer to copy from
  std::memcpy(out.data_ptr(), static_cast<const char*>(seq.const_data_ptr()) + (seq.size(0) - 1) * bytes, bytes);
  return out;
}

inline bool reduced_precision(const at::Tensor& x) {
  return x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf;
}

// t in float32 if it is bfloat16/float16 (an undefined tensor stays undefined).
inline at::Tensor to_float32(const at::Tensor& t) {
  return t.defined() && (t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf) ? t.to(at::kFloat) : t;
}

inline std::optional<at::Tensor> to_float32(const std::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional<at::Tensor>(to_float32(*t)) : std::nullopt;
}

// The CPU kernels take float32 and float64 CPU tensors (csrc/layer_common.h checks).
inline void check_cpu_float(const at::Tensor& t, const char* name, at::ScalarType dtype) {
  check_tensor(t, name, c10::DeviceType::CPU, dtype);
}

inline void check_layer(const at::Tensor& x, std::initializer_list<std::pair<const at::Tensor*, const char*>> states,
                        const at::Tensor& w_ih, const at::Tensor& w_hh, const std::optional<at::Tensor>& bias,
                        int64_t gates) {
  check_layer_tensors(x, states, w_ih, w_hh, bias, gates, c10::DeviceType::CPU, {at::kFloat, at::kDouble});
}

// The LSTM scans' tensors. With an output projection w_hr [P, H] (nn.LSTM(proj_size=P)),
// h0 and w_hh's columns have P entries (w_hh [4H, P]) while c0 keeps H.
inline void check_lstm_tensors(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
                               const at::Tensor& w_ih, const at::Tensor& w_hh, const std::optional<at::Tensor>& w_hr,
                               const std::optional<at::Tensor>& bias, std::initializer_list<at::ScalarType> dtypes) {
  if (!w_hr.has_value()) {
    check_layer_tensors(x, {{&h0, "h0"}, {&c0, "c0"}}, w_ih, w_hh, bias, 4, c10::DeviceType::CPU, dtypes);
    return;
  }
  TORCH_CHECK(w_hr->dim() == 2, "fused_rnn: w_hr must be 2-D [P, H], got ", w_hr->sizes());
  const int64_t width = w_hr->size(0), hidden = w_hr->size(1);
  TORCH_CHECK(w_hh.dim() == 2 && w_hh.size(0) == 4 * hidden && w_hh.size(1) == width, "fused_rnn: w_hh must be [4H, P] = [",
              4 * hidden, ", ", width, "] for w_hr ", w_hr->sizes(), ", got ", w_hh.sizes());
  // everything else as for an LSTM of H units whose h has P columns (a stride-0 stand-in
  // for such a w_hh: shape, dtype and device, no memory)
  check_layer_tensors(x, {{&c0, "c0"}}, w_ih, at::empty({1}, w_hh.options()).expand({4 * hidden, hidden}), bias, 4,
                      c10::DeviceType::CPU, dtypes);
  TORCH_CHECK(h0.dim() == 2 && h0.size(0) == x.size(1) && h0.size(1) == width, "fused_rnn: h0 must be [", x.size(1),
              ", ", width, "] (P columns), got ", h0.sizes());
  for (const auto& [tensor, name] : {std::make_pair(&h0, "h0"), std::make_pair(&w_hh, "w_hh"),
                                     std::make_pair(&*w_hr, "w_hr")}) {
    check_tensor(*tensor, name, c10::DeviceType::CPU, x.scalar_type(), &x);
  }
}

// The per-sequence options of a scan, resolved for the kernels: the recurrent mask
// [B, H] in the inputs' dtype and the lengths [B] as int64 on the CPU (null when not
// given). With either, the scans take the batch-split path (the hidden-split path of
// the small-batch LSTM would need one more barrier per step for the masked state).
struct ScanOptions {
  at::Tensor mask, lengths;

  ScanOptions(const at::Tensor& x, int64_t hidden, const std::optional<at::Tensor>& recurrent_mask,
              const std::optional<at::Tensor>& lengths_in) {
    const int64_t steps = x.size(0), batch = x.size(1);
    if (recurrent_mask.has_value()) {
      mask = recurrent_mask->contiguous();
      check_cpu_float(mask, "recurrent_mask", x.scalar_type());
      TORCH_CHECK(mask.dim() == 2 && mask.size(0) == batch && mask.size(1) == hidden,
                  "fused_rnn: recurrent_mask must be [", batch, ", ", hidden, "], got ", mask.sizes());
    }
    if (lengths_in.has_value()) {
      TORCH_CHECK(!at::isFloatingType(lengths_in->scalar_type()) && lengths_in->scalar_type() != at::kBool,
                  "fused_rnn: lengths must hold integers, got ", lengths_in->scalar_type());
      lengths = lengths_in->to(at::kCPU, at::kLong).contiguous();
      TORCH_CHECK(lengths.dim() == 1 && lengths.size(0) == batch, "fused_rnn: lengths must be [", batch, "], got ",
                  lengths.sizes());
      if (batch > 0) {
        TORCH_CHECK(lengths.min().item<int64_t>() >= 0 && lengths.max().item<int64_t>() <= steps,
                    "fused_rnn: lengths must lie in [0, ", steps, "]");
      }
    }
  }

  bool any() const { return mask.defined() || lengths.defined(); }
  template <typename scalar_t>
  const scalar_t* mask_data() const {
    return mask.defined() ? mask.const_data_ptr<scalar_t>() : nullptr;
  }
  const int64_t* lengths_data() const { return lengths.defined() ? lengths.const_data_ptr<int64_t>() : nullptr; }

  // y [T, B, H] is zero beyond each sequence's length (the scans keep the frozen state
  // there while they run, since y doubles as their state): one memset per such row.
  void zero_beyond_lengths(at::Tensor& y) const {
    if (!lengths.defined()) return;
    const int64_t steps = y.size(0), batch = y.size(1), row_bytes = y.size(2) * y.element_size();
    auto* base = static_cast<char*>(y.data_ptr());
    const int64_t* length = lengths_data();
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t t = length[b]; t < steps; ++t) std::memset(base + (t * batch + b) * row_bytes, 0, row_bytes);
    }
  }

  // h_{t-1} as the recurrent product reads it: times the mask (weight gradients too).
  at::Tensor masked(const at::Tensor& h) const { return mask.defined() ? h * mask : h; }
};

inline bool step_active(const int64_t* lengths, int64_t t, int64_t b) { return lengths == nullptr || t < lengths[b]; }

// rows [b0, b1) of h_prev [B, H] times mask [B, H] into out [b1 - b0, H].
template <typename scalar_t>
void mask_rows(const scalar_t* h_prev, const scalar_t* mask, scalar_t* out, int64_t b0, int64_t b1, int64_t hidden) {
  const scalar_t* h = h_prev + b0 * hidden;
  const scalar_t* m = mask + b0 * hidden;
  const int64_t count = (b1 - b0) * hidden;
#pragma omp simd
  for (int64_t j = 0; j < count; ++j) out[j] = h[j] * m[j];
}

// A backward step's carried dL/dh for rows [b0, b1) after dh = dpre_t W_hh was written
// into `dh`: active rows times the mask; rows past their length get back the value
// they had before (`saved`, [B, H], filled by save_inactive), which passes through.
template <typename scalar_t>
void save_inactive(const int64_t* lengths, int64_t t, const scalar_t* dh, scalar_t* saved, int64_t b0, int64_t b1,
                   int64_t hidden) {
  for (int64_t b = b0; b < b1 && lengths != nullptr; ++b) {
    if (!step_active(lengths, t, b)) std::memcpy(saved + b * hidden, dh + b * hidden, hidden * sizeof(scalar_t));
  }
}

template <typename scalar_t>
void finish_carry(const int64_t* lengths, const scalar_t* mask, int64_t t, scalar_t* dh, const scalar_t* saved,
                  int64_t b0, int64_t b1, int64_t hidden) {
  for (int64_t b = b0; b < b1; ++b) {
    scalar_t* row = dh + b * hidden;
    if (!step_active(lengths, t, b)) {
      std::memcpy(row, saved + b * hidden, hidden * sizeof(scalar_t));
    } else if (mask != nullptr) {
      const scalar_t* m = mask + b * hidden;
#pragma omp simd
      for (int64_t j = 0; j < hidden; ++j) row[j] *= m[j];
    }
  }
}

// How a backward scan forms dh_{t-1} = dpre_t W_hh, and dx, chosen per call.
//
// Small batches compute dx = dpre W_ih after the scan (W_ih read once). Larger batches
// fold it into each step: dpre_t [W_hh | W_ih] gives [dh_{t-1} | dx_t] in one GEMM, in
// place of a skinny whole-sequence GEMM (N = I) after the scan; measured at T = 64,
// B = 64, I = 42, H = 256 on one thread (min of 25): LSTM backward 83 ms against 86 ms.
// (Folding x into the forward steps the same way, [x_t | h_{t-1}] [W_ih | W_hh]^T, was
// measured too and lost: 43.6 ms against 41.2 ms, so the forward projects x up front.)
struct BackwardPlan {
  bool dx_in_step;
  bool pack;  // packs_weights: the step GEMMs multiply a packed `weight`
  at::Tensor weight;  // [G*H, H + I] = [W_hh | W_ih] when dx_in_step, else W_hh
  at::Tensor dx;      // [T, B, I], filled by the steps when dx_in_step
  PackedWeight packed;  // float32: `weight` packed for the own kernel, shared by the threads
};

// step_gemm: the scan uses BackwardStepGemm (false: the LSTM's hidden-split scan, which
// packs its own slices of W_hh, so nothing is packed here).
inline BackwardPlan plan_backward(const at::Tensor& x, const at::Tensor& w_ih, const at::Tensor& w_hh,
                                  bool grad_x, bool step_gemm = true) {
  BackwardPlan plan;
  plan.dx_in_step = grad_x && x.size(1) >= kMinRowsPerThread;
  plan.pack = packs_weights(x.size(0), x.size(1));
  plan.weight = plan.dx_in_step ? at::cat({w_hh, w_ih}, 1).contiguous() : w_hh;
  if (plan.dx_in_step) plan.dx = at::empty_like(x);
  if (step_gemm && plan.pack && x.scalar_type() == at::kFloat) {  // W' = weight [G*H, H (+ I)] as stored
    plan.packed = pack_recurrent(plan.weight.const_data_ptr<float>(), false, plan.weight.size(1), plan.weight.size(0));
  }
  return plan;
}

// One thread's per-step GEMM of a backward scan over its batch rows [b0, b0 + rows).
template <typename scalar_t>
class BackwardStepGemm {
 public:
  BackwardStepGemm(const BackwardPlan& plan, int64_t hidden, int64_t b0, int64_t rows)
      : dx_in_step_(plan.dx_in_step),
        hidden_(hidden),
        width_(plan.weight.size(1)),
        rows_(rows),
        gemm_(plan.weight.const_data_ptr<scalar_t>(), false, rows, plan.weight.size(1), plan.weight.size(0),
              &plan.packed, plan.pack) {
    if (dx_in_step_) {
      inputs_ = width_ - hidden;
      dx_ = plan.dx.data_ptr<scalar_t>() + b0 * inputs_;
      dx_step_ = plan.dx.size(1) * inputs_;
      row_buffer_ = at::empty({rows, width_}, plan.weight.options());
    }
  }

  // dh_prev [rows, H] = dpre_t [rows, G*H] @ W_hh (and dx_t rows = dpre_t @ W_ih)
  void operator()(int64_t t, const scalar_t* dpre_t, scalar_t* dh_prev) {
    if (!dx_in_step_) {
      gemm_(dpre_t, 0, dh_prev);
      return;
    }
    scalar_t* buffer = row_buffer_.data_ptr<scalar_t>();
    gemm_(dpre_t, 0, buffer);
    scalar_t* dx_t = dx_ + t * dx_step_;
    for (int64_t r = 0; r < rows_; ++r) {
      std::memcpy(dh_prev + r * hidden_, buffer + r * width_, hidden_ * sizeof(scalar_t));
      std::memcpy(dx_t + r * inputs_, buffer + r * width_ + hidden_, inputs_ * sizeof(scalar_t));
    }
  }

 private:
  bool dx_in_step_;
  int64_t hidden_, width_, rows_, inputs_ = 0;
  RecurrentGemm<scalar_t> gemm_;
  scalar_t* dx_ = nullptr;
  int64_t dx_step_ = 0;
  at::Tensor row_buffer_;
};

}  // namespace cpu
}  // namespace fused_rnn
