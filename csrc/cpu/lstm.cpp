// Fused LSTM scans on the CPU (gate order i, f, g, o as in torch.nn.LSTM).
//
// Forward:  gates = x W_ih^T + bias for all steps in one GEMM; per step one BLAS call
//           adds h_{t-1} W_hh^T into gates_t in place, then one fused pass per row
//           activates the four gates (kept for the backward), and writes c_t and h_t.
// Backward: carrying dh (from step t+1 through W_hh) and dc, one fused pass per row
//           gives dgates_t and dc_{t-1}; one BLAS call gives dh_{t-1} = dgates_t W_hh.
//           Weight gradients are GEMMs over all of dgates afterwards.
// Each thread runs both scans on its own slice of the batch (see parallel_batch).
//
// With an output projection (nn.LSTM(proj_size=P), w_hr [P, H]) each step has a second
// GEMM: the forward writes u_t = o * tanh(c_t) [rows, H] and then h_t = u_t W_hr^T
// [rows, P]; the backward first forms g_t = dy_t + dh [rows, P], then du_t = g_t W_hr
// for the cell, and dW_hr = sum_t g_t^T u_t is one GEMM after the scan.
#include <omp.h>
#include <torch/library.h>

#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

#include "../cell_math.h"
#include "blas.h"
#include "common.h"
#include "lstm_step_avx2.h"

namespace fused_rnn {
namespace cpu {
namespace {

// `count` units of one row of the forward cell: the four gates of unit j are at
// gates[j], gates[stride + j], gates[2 * stride + j], gates[3 * stride + j] (stride = H);
// pre-activations in, activations out.
template <typename scalar_t>
FUSED_RNN_INLINE inline void lstm_forward_row_loop(scalar_t* gates, int64_t stride, const scalar_t* c_prev,
                                                   scalar_t* c, scalar_t* h, int64_t count) {
  scalar_t* gi = gates;
  scalar_t* gf = gates + stride;
  scalar_t* gg = gates + 2 * stride;
  scalar_t* go = gates + 3 * stride;
#pragma omp simd
  for (int64_t j = 0; j < count; ++j) {
    cell::lstm_forward(gi[j], gf[j], gg[j], go[j], c_prev[j], c[j], h[j]);
  }
}

// `count` units of one row of the backward cell (gates and dgates laid out as in
// lstm_forward_row). grad_h = dy_t + carried dh; `dc` holds dL/dc_t on entry and
// dL/dc_{t-1} on exit.
template <typename scalar_t>
FUSED_RNN_INLINE inline void lstm_backward_row_loop(const scalar_t* dy, const scalar_t* dh_carry, scalar_t* dc,
                                                    const scalar_t* gates, int64_t stride, const scalar_t* c,
                                                    const scalar_t* c_prev, scalar_t* dgates, int64_t count) {
  const scalar_t* gi = gates;
  const scalar_t* gf = gates + stride;
  const scalar_t* gg = gates + 2 * stride;
  const scalar_t* go = gates + 3 * stride;
  scalar_t* di = dgates;
  scalar_t* df = dgates + stride;
  scalar_t* dg = dgates + 2 * stride;
  scalar_t* dout = dgates + 3 * stride;
#pragma omp simd
  for (int64_t j = 0; j < count; ++j) {
    cell::lstm_backward(dy[j] + dh_carry[j], dc[j], gi[j], gf[j], gg[j], go[j], c[j], c_prev[j], di[j], df[j],
                        dg[j], dout[j], dc[j]);
  }
}

// The row loops, compiled for the scan's instruction set (common.h's with_row_isa).
template <typename scalar_t>
void lstm_forward_row(RowIsa isa, scalar_t* gates, int64_t stride, const scalar_t* c_prev, scalar_t* c, scalar_t* h,
                      int64_t count) {
  with_row_isa(isa, [&]() FUSED_RNN_INLINE { lstm_forward_row_loop(gates, stride, c_prev, c, h, count); });
}

template <typename scalar_t>
void lstm_backward_row(RowIsa isa, const scalar_t* dy, const scalar_t* dh_carry, scalar_t* dc, const scalar_t* gates,
                       int64_t stride, const scalar_t* c, const scalar_t* c_prev, scalar_t* dgates, int64_t count) {
  with_row_isa(isa, [&]() FUSED_RNN_INLINE {
    lstm_backward_row_loop(dy, dh_carry, dc, gates, stride, c, c_prev, dgates, count);
  });
}

// Small batches: the hidden units are split across threads instead of the batch
// (see hidden_split_threads). Slice k owns units [j0, j1): each step it computes the
// four gates of those units, h_{t-1} [B, H] @ W_hh[rows of its units]^T, from a slice
// of W_hh packed once that stays in one core's cache, runs the cell on them, and the
// threads meet at one barrier before the next step reads h_t.
//
// Every slice's weights and buffers are prepared on the calling thread before the
// parallel region: inside it there is no allocation and nothing that can throw (an
// exception escaping an OpenMP region terminates the process), and no ATen call runs
// on a worker thread without the caller's thread-local state.
template <typename scalar_t>
struct UnitSlice {
  int64_t first = 0, units = 0;
  at::Tensor weight;    // the slice of W_hh, laid out for `gemm`
  at::Tensor products;  // the slice's GEMM output
  std::optional<RecurrentGemm<scalar_t>> gemm;
};

// The slices of W_hh for `threads` threads: for the forward (rows_of_units) the rows of
// gates i, f, g, o of each slice's units, [4 * units, H], multiplied transposed; for the
// backward the columns of its units, [4H, units].
template <typename scalar_t>
std::vector<UnitSlice<scalar_t>> unit_slices(int threads, int64_t batch, const at::Tensor& w_hh, bool rows_of_units) {
  const int64_t hidden = w_hh.size(1);
  std::vector<UnitSlice<scalar_t>> slices(threads);
  for (int k = 0; k < threads; ++k) {
    auto& slice = slices[k];
    std::tie(slice.first, slice.units) = unit_range(hidden, threads, k);
    slice.units -= slice.first;
    if (slice.units == 0) continue;
    if (rows_of_units) {
      std::vector<at::Tensor> rows;
      for (int64_t g = 0; g < 4; ++g) rows.push_back(w_hh.narrow(0, g * hidden + slice.first, slice.units));
      slice.weight = at::cat(rows).contiguous();
    } else {
      slice.weight = w_hh.narrow(1, slice.first, slice.units).contiguous();
    }
    const int64_t width = rows_of_units ? 4 * slice.units : slice.units;
    slice.products = at::empty({batch, width}, w_hh.options());
    slice.gemm.emplace(slice.weight.template const_data_ptr<scalar_t>(), rows_of_units, batch, width,
                       rows_of_units ? hidden : 4 * hidden);
  }
  return slices;
}

template <typename scalar_t>
void lstm_forward_hidden_split(int threads, int64_t steps, int64_t batch, int64_t hidden, const at::Tensor& w_hh,
                               const scalar_t* h0, const scalar_t* c0, scalar_t* gates_data, scalar_t* y_data,
                               scalar_t* c_data) {
  const int64_t step_elems = batch * hidden;
  const RowIsa isa = row_isa();
  auto slices = unit_slices<scalar_t>(threads, batch, w_hh, true);
#pragma omp parallel num_threads(threads)
  {
    // OpenMP may grant fewer threads than asked: each thread then serves several slices
    const int team = omp_get_num_threads(), me = omp_get_thread_num();
    for (int64_t t = 0; t < steps; ++t) {
      const scalar_t* h_prev = t == 0 ? h0 : y_data + (t - 1) * step_elems;
      const scalar_t* c_prev = t == 0 ? c0 : c_data + (t - 1) * step_elems;
      scalar_t* gates_t = gates_data + t * 4 * step_elems;
      for (int k = me; k < threads; k += team) {
        auto& slice = slices[k];
        const int64_t j0 = slice.first, units = slice.units;
        if (units == 0) continue;
        scalar_t* product = slice.products.template data_ptr<scalar_t>();
        (*slice.gemm)(h_prev, 0, product);  // [B, 4 * units]
        for (int64_t b = 0; b < batch; ++b) {
          scalar_t* row = gates_t + b * 4 * hidden + j0;
          for (int64_t g = 0; g < 4; ++g) {
            const scalar_t* add = product + (b * 4 + g) * units;
            scalar_t* gate = row + g * hidden;
#pragma omp simd
            for (int64_t j = 0; j < units; ++j) gate[j] += add[j];
          }
          lstm_forward_row(isa, row, hidden, c_prev + b * hidden + j0, c_data + t * step_elems + b * hidden + j0,
                           y_data + t * step_elems + b * hidden + j0, units);
        }
      }
#pragma omp barrier
    }
  }
}

// The backward of the above. Per step, each slice runs the cell backward on its units
// (writing their columns of dgates_t), all threads meet at a barrier, and each slice
// computes its units' columns of dh_{t-1} = dgates_t [B, 4H] @ W_hh[:, its units]. The
// next step's cell backward reads only its own columns of dh and writes dgates_{t-1},
// so one barrier per step suffices.
template <typename scalar_t>
void lstm_backward_hidden_split(int threads, int64_t steps, int64_t batch, int64_t hidden, const at::Tensor& w_hh,
                                const scalar_t* dy_data, const scalar_t* c0, const scalar_t* c_data,
                                const scalar_t* gates_data, scalar_t* dgates_data, scalar_t* dh, scalar_t* dc) {
  const int64_t step_elems = batch * hidden;
  const RowIsa isa = row_isa();
  auto slices = unit_slices<scalar_t>(threads, batch, w_hh, false);
#pragma omp parallel num_threads(threads)
  {
    const int team = omp_get_num_threads(), me = omp_get_thread_num();
    for (int64_t t = steps - 1; t >= 0; --t) {
      const scalar_t* gates_t = gates_data + t * 4 * step_elems;
      scalar_t* dgates_t = dgates_data + t * 4 * step_elems;
      const scalar_t* c_prev = t == 0 ? c0 : c_data + (t - 1) * step_elems;
      for (int k = me; k < threads; k += team) {
        const int64_t j0 = slices[k].first, units = slices[k].units;
        for (int64_t b = 0; b < batch && units > 0; ++b) {
          const int64_t at_unit = b * hidden + j0;
          lstm_backward_row(isa, dy_data + t * step_elems + at_unit, dh + at_unit, dc + at_unit,
                            gates_t + b * 4 * hidden + j0, hidden, c_data + t * step_elems + at_unit, c_prev + at_unit,
                            dgates_t + b * 4 * hidden + j0, units);
        }
      }
#pragma omp barrier
      for (int k = me; k < threads; k += team) {
        auto& slice = slices[k];
        if (slice.units == 0) continue;
        scalar_t* product = slice.products.template data_ptr<scalar_t>();
        (*slice.gemm)(dgates_t, 0, product);  // [B, units]
        for (int64_t b = 0; b < batch; ++b) {
          std::memcpy(dh + b * hidden + slice.first, product + b * slice.units, slice.units * sizeof(scalar_t));
        }
      }
    }
  }
}

using ForwardOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// u = o * tanh(c) for `count` units of one row: the projection's input, as the forward
// cell computed it (the backward recomputes it for dW_hr instead of saving it).
template <typename scalar_t>
FUSED_RNN_INLINE inline void lstm_unit_row_loop(const scalar_t* gate_o, const scalar_t* c, scalar_t* u, int64_t count) {
#pragma omp simd
  for (int64_t j = 0; j < count; ++j) u[j] = gate_o[j] * cell::tanh_(c[j]);
}

template <typename scalar_t>
void lstm_unit_row(RowIsa isa, const scalar_t* gate_o, const scalar_t* c, scalar_t* u, int64_t count) {
  with_row_isa(isa, [&]() FUSED_RNN_INLINE { lstm_unit_row_loop(gate_o, c, u, count); });
}

// The forward scan with the projection, on float32/float64 tensors that are contiguous
// and checked. x [T, B, I], h0 [B, P], c0 [B, H], w_hh [4H, P], w_hr [P, H].
ForwardOutputs lstm_projected_forward(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
                                      const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& w_hr,
                                      const std::optional<at::Tensor>& bias, const ScanOptions& options) {
  const int64_t steps = x.size(0), batch = x.size(1), width = w_hh.size(1), hidden = w_hr.size(1);
  auto gates = input_projection(x, w_ih, bias, sequence_matmul);  // [T, B, 4H]
  auto y = at::empty({steps, batch, width}, x.options());
  auto cells = at::empty({steps, batch, hidden}, x.options());
  const RowIsa isa = row_isa();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lstm_projected_forward", [&] {
    scalar_t* gates_data = gates.data_ptr<scalar_t>();
    scalar_t* y_data = y.data_ptr<scalar_t>();
    scalar_t* c_data = cells.data_ptr<scalar_t>();
    const scalar_t* mask = options.mask_data<scalar_t>();
    const int64_t* lengths_data = options.lengths_data();
    const bool pack = packs_weights(steps, batch);
    const auto packed_hh = pack_recurrent(w_hh.const_data_ptr<scalar_t>(), true, 4 * hidden, width, pack);
    const auto packed_hr = pack_recurrent(w_hr.const_data_ptr<scalar_t>(), true, width, hidden, pack);
    parallel_batch(batch, [&](int64_t b0, int64_t b1) {
      const int64_t rows = b1 - b0;
      // gates_t [rows, 4H] += h_prev [rows, P] @ W_hh^T;  h_t [rows, P] = u_t [rows, H] @ W_hr^T
      const RecurrentGemm<scalar_t> recurrent(w_hh.const_data_ptr<scalar_t>(), true, rows, 4 * hidden, width,
                                              &packed_hh, pack);
      const RecurrentGemm<scalar_t> projection(w_hr.const_data_ptr<scalar_t>(), true, rows, width, hidden,
                                               &packed_hr, pack);
      std::vector<scalar_t> units(rows * hidden), masked(mask != nullptr ? rows * width : 0);
      for (int64_t t = 0; t < steps; ++t) {
        const scalar_t* h_prev = t == 0 ? h0.const_data_ptr<scalar_t>() : y_data + (t - 1) * batch * width;
        const scalar_t* c_prev = t == 0 ? c0.const_data_ptr<scalar_t>() : c_data + (t - 1) * batch * hidden;
        scalar_t* gates_t = gates_data + t * batch * 4 * hidden;
        scalar_t* c_t = c_data + t * batch * hidden;
        scalar_t* h_t = y_data + t * batch * width;
        if (mask != nullptr) {
          mask_rows(h_prev, mask, masked.data(), b0, b1, width);
          recurrent(masked.data(), 1, gates_t + b0 * 4 * hidden);
        } else {
          recurrent(h_prev + b0 * width, 1, gates_t + b0 * 4 * hidden);
        }
        for (int64_t b = b0; b < b1; ++b) {
          scalar_t* u = units.data() + (b - b0) * hidden;
          if (!step_active(lengths_data, t, b)) {  // past its length a row keeps its state
            std::memcpy(c_t + b * hidden, c_prev + b * hidden, hidden * sizeof(scalar_t));
            std::memset(u, 0, hidden * sizeof(scalar_t));
            continue;
          }
          lstm_forward_row(isa, gates_t + b * 4 * hidden, hidden, c_prev + b * hidden, c_t + b * hidden, u, hidden);
        }
        projection(units.data(), 0, h_t + b0 * width);
        for (int64_t b = b0; b < b1; ++b) {
          if (!step_active(lengths_data, t, b)) std::memcpy(h_t + b * width, h_prev + b * width, width * sizeof(scalar_t));
        }
      }
    });
  });
  auto h_n = last_step(y);
  options.zero_beyond_lengths(y);
  return {y, h_n, last_step(cells), cells, gates};
}


// The float32 forward on the AVX2 kernel with the cell in the GEMM's epilogue
// (lstm_step_avx2.h), for scans without a mask, lengths or projection whose batch is
// split across threads, and whose input is narrow next to the hidden state (I <= H / 4):
// the fusion saves the projection's short-K GEMM and the passes over the gates, but its
// 3 x 32 tile with K blocks runs a long K more slowly than the 4 x 24 GEMM tile, so on a
// Zen 3 core it won at the lesson's I = 42, H = 256 (a step of 32 rows in 289 us against
// about 300 unfused; LSTM inference 1.04x against 0.99x nn.LSTM, same run) and lost at
// fastrnns' I = H = 512 (1913 against about 1730 us; inference 0.88x against 1.06x). AVX-512
// CPUs keep the unfused path on their wider kernel until this step has an AVX-512 tile
// (it cannot be tested on the AVX2-only machine this was written on). A bf16 layer's scan with bf16
// products (gemm_bf16.h) takes the unfused path too.
bool fused_forward_applies(const at::Tensor& x, const ScanOptions& options, int64_t batch, int64_t hidden) {
  const int64_t steps = x.size(0);
  return x.scalar_type() == at::kFloat && !options.any() && 4 * x.size(2) <= hidden &&
         hidden_split_threads(steps, batch, hidden) <= 1 && gemm_kernel() == GemmKernel::kAvx2 &&
         current_bf16_products() == Bf16Products::kOff && packs_weights(steps, batch);
}

ForwardOutputs lstm_forward_fused(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
                                  const at::Tensor& w_ih, const at::Tensor& w_hh, const std::optional<at::Tensor>& bias) {
  const int64_t steps = x.size(0), batch = x.size(1), inputs = x.size(2), hidden = w_hh.size(1);
  auto gates = at::empty({steps, batch, 4 * hidden}, x.options());  // activated, for the backward
  auto y = at::empty({steps, batch, hidden}, x.options());
  auto cells = at::empty({steps, batch, hidden}, x.options());
  const auto bias_values = bias.has_value() ? bias->contiguous() : at::Tensor();
  auto packed = at::empty({avx2::lstm_packed_size(hidden, inputs)}, x.options());
  auto packed_bias = at::empty({avx2::lstm_panels(hidden) * avx2::kLstmPanel}, x.options());
  const float* bias_data = bias_values.defined() ? bias_values.const_data_ptr<float>() : nullptr;
  at::parallel_for(0, avx2::lstm_panels(hidden), 1, [&](int64_t p0, int64_t p1) {
    avx2::pack_lstm_step(w_hh.const_data_ptr<float>(), w_ih.const_data_ptr<float>(), bias_data, hidden, inputs,
                         packed.data_ptr<float>(), packed_bias.data_ptr<float>(), p0, p1);
  });
  const float* w_data = packed.const_data_ptr<float>();
  const float* b_data = packed_bias.const_data_ptr<float>();
  const float* x_data = x.const_data_ptr<float>();
  float* gates_data = gates.data_ptr<float>();
  float* y_data = y.data_ptr<float>();
  float* c_data = cells.data_ptr<float>();
  const int64_t step_elems = batch * hidden;
  parallel_batch(batch, [&](int64_t b0, int64_t b1) {
    for (int64_t t = 0; t < steps; ++t) {
      const float* h_prev = t == 0 ? h0.const_data_ptr<float>() : y_data + (t - 1) * step_elems;
      const float* c_prev = t == 0 ? c0.const_data_ptr<float>() : c_data + (t - 1) * step_elems;
      const avx2::LstmStepRows at{h_prev + b0 * hidden,
                                  x_data + (t * batch + b0) * inputs,
                                  c_prev + b0 * hidden,
                                  c_data + t * step_elems + b0 * hidden,
                                  y_data + t * step_elems + b0 * hidden,
                                  gates_data + (t * batch + b0) * 4 * hidden};
      avx2::lstm_forward_step(b1 - b0, hidden, inputs, w_data, b_data, at);
    }
  });
  return {y, last_step(y), last_step(cells), cells, gates};
}

ForwardOutputs lstm_scan_forward(const at::Tensor& x_in, const at::Tensor& h0_in, const at::Tensor& c0_in,
                                 const at::Tensor& w_ih_in, const at::Tensor& w_hh_in,
                                 const std::optional<at::Tensor>& bias,
                                 const std::optional<at::Tensor>& recurrent_mask,
                                 const std::optional<at::Tensor>& lengths,
                                 const std::optional<at::Tensor>& w_hr_in) {
  FUSED_RNN_EXCLUDE_AUTOCAST;
  if (reduced_precision(x_in)) {  // cells and gates stay float32 (the saved state)
    const Bf16Scope bf16_products(x_in.scalar_type() == at::kBFloat16);
    check_lstm_tensors(x_in, h0_in, c0_in, w_ih_in, w_hh_in, w_hr_in, bias, {at::kBFloat16, at::kHalf});
    auto [y, h_n, c_n, cells, gates] =
        lstm_scan_forward(to_float32(x_in), to_float32(h0_in), to_float32(c0_in), to_float32(w_ih_in),
                          to_float32(w_hh_in), to_float32(bias), to_float32(recurrent_mask), lengths,
                          to_float32(w_hr_in));
    const auto dtype = x_in.scalar_type();
    return {y.to(dtype), h_n.to(dtype), c_n.to(dtype), cells, gates};
  }
  const auto x = x_in.contiguous(), h0 = h0_in.contiguous(), c0 = c0_in.contiguous();
  const auto w_ih = w_ih_in.contiguous(), w_hh = w_hh_in.contiguous();
  const auto w_hr = w_hr_in.has_value() ? w_hr_in->contiguous() : at::Tensor();
  check_lstm_tensors(x, h0, c0, w_ih, w_hh, w_hr_in, bias, {at::kFloat, at::kDouble});
  const int64_t steps = x.size(0), batch = x.size(1), hidden = w_hh.size(0) / 4, width = w_hh.size(1);
  const ScanOptions options(x, width, recurrent_mask, lengths);
  if (steps == 0) {
    return {x.new_empty({0, batch, width}), h0.clone(), c0.clone(), x.new_empty({0, batch, hidden}),
            x.new_empty({0, batch, 4 * hidden})};
  }
  if (w_hr.defined()) return lstm_projected_forward(x, h0, c0, w_ih, w_hh, w_hr, bias, options);
  if (fused_forward_applies(x, options, batch, hidden)) return lstm_forward_fused(x, h0, c0, w_ih, w_hh, bias);
  // [T, B, 4H]: pre-activations, then activations in place
  auto gates = input_projection(x, w_ih, bias, sequence_matmul);
  auto y = at::empty({steps, batch, hidden}, x.options());
  auto cells = at::empty({steps, batch, hidden}, x.options());
  const RowIsa isa = row_isa();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lstm_scan_forward", [&] {
    scalar_t* gates_data = gates.data_ptr<scalar_t>();
    scalar_t* y_data = y.data_ptr<scalar_t>();
    scalar_t* c_data = cells.data_ptr<scalar_t>();
    const int64_t step_elems = batch * hidden;
    const int split = options.any() ? 1 : hidden_split_threads(steps, batch, hidden);
    if (split > 1) {
      lstm_forward_hidden_split<scalar_t>(split, steps, batch, hidden, w_hh, h0.const_data_ptr<scalar_t>(),
                                          c0.const_data_ptr<scalar_t>(), gates_data, y_data, c_data);
      return;
    }
    const scalar_t* mask = options.mask_data<scalar_t>();
    const int64_t* lengths_data = options.lengths_data();
    std::vector<scalar_t> masked(mask != nullptr ? step_elems : 0);  // masked h_{t-1} rows, per thread
    const bool pack = packs_weights(steps, batch);
    const auto packed = pack_recurrent(w_hh.const_data_ptr<scalar_t>(), true, 4 * hidden, hidden, pack);
    parallel_batch(batch, [&](int64_t b0, int64_t b1) {
      const int64_t rows = b1 - b0;
      // gates_t [rows, 4H] += h_prev [rows, H] @ W_hh^T
      const RecurrentGemm<scalar_t> recurrent(w_hh.const_data_ptr<scalar_t>(), true, rows, 4 * hidden, hidden,
                                              &packed, pack);
      for (int64_t t = 0; t < steps; ++t) {
        const scalar_t* h_prev = t == 0 ? h0.const_data_ptr<scalar_t>() : y_data + (t - 1) * step_elems;
        const scalar_t* c_prev = t == 0 ? c0.const_data_ptr<scalar_t>() : c_data + (t - 1) * step_elems;
        scalar_t* gates_t = gates_data + t * 4 * step_elems;
        scalar_t* c_t = c_data + t * step_elems;
        scalar_t* h_t = y_data + t * step_elems;
        if (mask != nullptr) {
          mask_rows(h_prev, mask, masked.data() + b0 * hidden, b0, b1, hidden);
          recurrent(masked.data() + b0 * hidden, 1, gates_t + b0 * 4 * hidden);
        } else {
          recurrent(h_prev + b0 * hidden, 1, gates_t + b0 * 4 * hidden);
        }
        for (int64_t b = b0; b < b1; ++b) {
          if (!step_active(lengths_data, t, b)) {  // past its length a row keeps its state
            std::memcpy(c_t + b * hidden, c_prev + b * hidden, hidden * sizeof(scalar_t));
            std::memcpy(h_t + b * hidden, h_prev + b * hidden, hidden * sizeof(scalar_t));
            continue;
          }
          lstm_forward_row(isa, gates_t + b * 4 * hidden, hidden, c_prev + b * hidden, c_t + b * hidden, h_t + b * hidden,
                           hidden);
        }
      }
    });
  });
  auto h_n = last_step(y);
  options.zero_beyond_lengths(y);
  return {y, h_n, last_step(cells), cells, gates};
}

using BackwardOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// `y` may be undefined when T = 1 (it is only read as h_1..h_{T-1}).
BackwardOutputs lstm_backward_impl(const at::Tensor& grad_y, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
                                   const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
                                   const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& y,
                                   const at::Tensor& cells, const at::Tensor& gates, bool grad_x,
                                   const std::optional<at::Tensor>& recurrent_mask = std::nullopt,
                                   const std::optional<at::Tensor>& lengths = std::nullopt) {
  FUSED_RNN_EXCLUDE_AUTOCAST;
  if (reduced_precision(x)) {
    const Bf16Scope bf16_products(x.scalar_type() == at::kBFloat16);
    auto [dx, dh0, dc0, dw_ih, dw_hh, dbias] = lstm_backward_impl(
        to_float32(grad_y), to_float32(grad_h_n), to_float32(grad_c_n), to_float32(x), to_float32(h0),
        to_float32(c0), to_float32(w_ih), to_float32(w_hh), to_float32(y), cells, gates, grad_x,
        to_float32(recurrent_mask), lengths);
    const auto dtype = x.scalar_type();
    return {dx.to(dtype), dh0.to(dtype), dc0.to(dtype), dw_ih.to(dtype), dw_hh.to(dtype), dbias.to(dtype)};
  }
  check_layer(x, {{&h0, "h0"}, {&c0, "c0"}, {&grad_h_n, "grad_h_n"}, {&grad_c_n, "grad_c_n"}}, w_ih, w_hh,
              std::nullopt, 4);
  const int64_t steps = x.size(0), batch = x.size(1), hidden = w_hh.size(1);
  const ScanOptions options(x, hidden, recurrent_mask, lengths);
  const auto dtype = x.scalar_type();
  // y (h_1..h_T) is read only as h_{t-1} for t >= 1, so it may be undefined when T = 1
  const bool check_y = y.defined() || steps != 1;
  for (const auto& [tensor, name, width] : {std::make_tuple(&grad_y, "grad_y", hidden),
                                            std::make_tuple(check_y ? &y : &grad_y, check_y ? "y" : "grad_y", hidden),
                                            std::make_tuple(&cells, "cells", hidden),
                                            std::make_tuple(&gates, "gates", 4 * hidden)}) {
    check_cpu_float(*tensor, name, dtype);
    TORCH_CHECK(tensor->dim() == 3 && tensor->size(0) == steps && tensor->size(1) == batch &&
                    tensor->size(2) == width,
                "fused_rnn: ", name, " must be [", steps, ", ", batch, ", ", width, "], got ", tensor->sizes());
  }
  if (steps == 0) {
    return {grad_x ? at::zeros_like(x) : at::empty({0}, x.options()), grad_h_n.clone(), grad_c_n.clone(),
            at::zeros_like(w_ih), at::zeros_like(w_hh),
            at::zeros({4 * hidden}, w_hh.options())};
  }
  const int split = options.any() ? 1 : hidden_split_threads(steps, batch, hidden);
  const auto plan = plan_backward(x, w_ih, w_hh, grad_x, split <= 1);
  auto dgates = at::empty_like(gates);   // [T, B, 4H]
  auto dh_carry = grad_h_n.clone();      // [B, H]
  auto dc = grad_c_n.clone();            // [B, H]
  auto saved = options.lengths.defined() ? at::empty_like(dh_carry) : at::Tensor();  // rows past their length
  const RowIsa isa = row_isa();
  AT_DISPATCH_FLOATING_TYPES(dtype, "lstm_scan_backward", [&] {
    const scalar_t* dy_data = grad_y.const_data_ptr<scalar_t>();
    const scalar_t* c_data = cells.const_data_ptr<scalar_t>();
    const scalar_t* gates_data = gates.const_data_ptr<scalar_t>();
    scalar_t* dgates_data = dgates.data_ptr<scalar_t>();
    scalar_t* dh = dh_carry.data_ptr<scalar_t>();
    scalar_t* dc_data = dc.data_ptr<scalar_t>();
    const int64_t step_elems = batch * hidden;
    if (split > 1) {
      lstm_backward_hidden_split<scalar_t>(split, steps, batch, hidden, w_hh, dy_data, c0.const_data_ptr<scalar_t>(),
                                           c_data, gates_data, dgates_data, dh, dc_data);
      return;
    }
    const scalar_t* mask = options.mask_data<scalar_t>();
    const int64_t* lengths_data = options.lengths_data();
    scalar_t* saved_data = saved.defined() ? saved.data_ptr<scalar_t>() : nullptr;
    parallel_batch(batch, [&](int64_t b0, int64_t b1) {
      const int64_t rows = b1 - b0;
      // dh [rows, H] = dgates_t [rows, 4H] @ W_hh [4H, H]
      BackwardStepGemm<scalar_t> step_gemm(plan, hidden, b0, rows);
      for (int64_t t = steps - 1; t >= 0; --t) {
        const scalar_t* c_prev = t == 0 ? c0.const_data_ptr<scalar_t>() : c_data + (t - 1) * step_elems;
        const scalar_t* dy_t = dy_data + t * step_elems;
        const scalar_t* c_t = c_data + t * step_elems;
        const scalar_t* gates_t = gates_data + t * 4 * step_elems;
        scalar_t* dgates_t = dgates_data + t * 4 * step_elems;
        for (int64_t b = b0; b < b1; ++b) {
          if (!step_active(lengths_data, t, b)) {  // no step past a row's length: dh and dc pass through
            std::memset(dgates_t + b * 4 * hidden, 0, 4 * hidden * sizeof(scalar_t));
            continue;
          }
          lstm_backward_row(isa, dy_t + b * hidden, dh + b * hidden, dc_data + b * hidden, gates_t + b * 4 * hidden,
                            hidden, c_t + b * hidden, c_prev + b * hidden, dgates_t + b * 4 * hidden, hidden);
        }
        save_inactive(lengths_data, t, dh, saved_data, b0, b1, hidden);
        step_gemm(t, dgates_t + b0 * 4 * hidden, dh + b0 * hidden);
        if (mask != nullptr || lengths_data != nullptr) finish_carry(lengths_data, mask, t, dh, saved_data, b0, b1,
                                                                     hidden);
      }
    });
  });
  auto grads = weight_grads(dgates, x, options.masked(h0), y.defined() ? options.masked(y) : y, options.lengths,
                            w_ih, w_hh, grad_x && !plan.dx_in_step, sequence_matmul, transposed);
  if (plan.dx_in_step) grads.dx = plan.dx;
  return {grads.dx, dh_carry, dc, grads.dw_ih, grads.dw_hh, grads.dbias};
}

using ProjectedBackwardOutputs =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The backward scan with the projection, on contiguous float32/float64 tensors: grad_y
// [T, B, P], grad_h_n [B, P], grad_c_n [B, H], y [T, B, P], cells [T, B, H], gates
// [T, B, 4H] (activated). Per step and row: g = dy_t + dh (dL/dh_t, P columns), du =
// g W_hr (H columns) enters the cell backward as its dL/dh, dh_{t-1} = dgates_t W_hh;
// afterwards dW_hr = sum_t g_t^T u_t with u_t = o * tanh(c_t) recomputed per row.
ProjectedBackwardOutputs lstm_projected_backward(const at::Tensor& grad_y, const at::Tensor& grad_h_n,
                                                 const at::Tensor& grad_c_n, const at::Tensor& x, const at::Tensor& h0,
                                                 const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                                                 const at::Tensor& w_hr, const at::Tensor& y, const at::Tensor& cells,
                                                 const at::Tensor& gates, bool grad_x, const ScanOptions& options) {
  const int64_t steps = x.size(0), batch = x.size(1), width = w_hh.size(1), hidden = w_hr.size(1);
  if (steps == 0) {
    return {grad_x ? at::zeros_like(x) : at::empty({0}, x.options()), grad_h_n.clone(), grad_c_n.clone(),
            at::zeros_like(w_ih), at::zeros_like(w_hh), at::zeros({4 * hidden}, w_hh.options()), at::zeros_like(w_hr)};
  }
  const auto plan = plan_backward(x, w_ih, w_hh, grad_x);
  auto dgates = at::empty_like(gates);                         // [T, B, 4H]
  auto grad_h = at::empty({steps, batch, width}, x.options());  // [T, B, P]: g_t, 0 past a row's length
  auto units = at::empty({steps, batch, hidden}, x.options());  // [T, B, H]: u_t, 0 past a row's length
  auto dh_carry = grad_h_n.clone();                            // [B, P]
  auto dc = grad_c_n.clone();                                  // [B, H]
  auto saved = options.lengths.defined() ? at::empty_like(dh_carry) : at::Tensor();
  const RowIsa isa = row_isa();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lstm_projected_backward", [&] {
    const scalar_t* dy_data = grad_y.const_data_ptr<scalar_t>();
    const scalar_t* c_data = cells.const_data_ptr<scalar_t>();
    const scalar_t* gates_data = gates.const_data_ptr<scalar_t>();
    scalar_t* dgates_data = dgates.data_ptr<scalar_t>();
    scalar_t* g_data = grad_h.data_ptr<scalar_t>();
    scalar_t* u_data = units.data_ptr<scalar_t>();
    scalar_t* dh = dh_carry.data_ptr<scalar_t>();
    scalar_t* dc_data = dc.data_ptr<scalar_t>();
    const scalar_t* mask = options.mask_data<scalar_t>();
    const int64_t* lengths_data = options.lengths_data();
    scalar_t* saved_data = saved.defined() ? saved.data_ptr<scalar_t>() : nullptr;
    const auto packed_hr = pack_recurrent(w_hr.const_data_ptr<scalar_t>(), false, hidden, width, plan.pack);
    parallel_batch(batch, [&](int64_t b0, int64_t b1) {
      const int64_t rows = b1 - b0;
      BackwardStepGemm<scalar_t> step_gemm(plan, width, b0, rows);  // dh [rows, P] = dgates_t @ W_hh
      // du [rows, H] = g_t [rows, P] @ W_hr
      const RecurrentGemm<scalar_t> unproject(w_hr.const_data_ptr<scalar_t>(), false, rows, hidden, width,
                                              &packed_hr, plan.pack);
      std::vector<scalar_t> du(rows * hidden), no_carry(hidden, scalar_t(0));
      for (int64_t t = steps - 1; t >= 0; --t) {
        const scalar_t* c_prev = t == 0 ? c0.const_data_ptr<scalar_t>() : c_data + (t - 1) * batch * hidden;
        const scalar_t* c_t = c_data + t * batch * hidden;
        const scalar_t* gates_t = gates_data + t * batch * 4 * hidden;
        scalar_t* dgates_t = dgates_data + t * batch * 4 * hidden;
        scalar_t* g_t = g_data + t * batch * width;
        scalar_t* u_t = u_data + t * batch * hidden;
        for (int64_t b = b0; b < b1; ++b) {
          scalar_t* g = g_t + b * width;
          if (!step_active(lengths_data, t, b)) {  // no step past a row's length: dh and dc pass through
            std::memset(g, 0, width * sizeof(scalar_t));
            continue;
          }
          const scalar_t* dy = dy_data + (t * batch + b) * width;
          const scalar_t* carry = dh + b * width;
          for (int64_t j = 0; j < width; ++j) g[j] = dy[j] + carry[j];
        }
        unproject(g_t + b0 * width, 0, du.data());
        for (int64_t b = b0; b < b1; ++b) {
          scalar_t* u = u_t + b * hidden;
          if (!step_active(lengths_data, t, b)) {
            std::memset(dgates_t + b * 4 * hidden, 0, 4 * hidden * sizeof(scalar_t));
            std::memset(u, 0, hidden * sizeof(scalar_t));
            continue;
          }
          const scalar_t* row_gates = gates_t + b * 4 * hidden;
          lstm_unit_row(isa, row_gates + 3 * hidden, c_t + b * hidden, u, hidden);
          lstm_backward_row(isa, du.data() + (b - b0) * hidden, no_carry.data(), dc_data + b * hidden, row_gates, hidden,
                            c_t + b * hidden, c_prev + b * hidden, dgates_t + b * 4 * hidden, hidden);
        }
        save_inactive(lengths_data, t, dh, saved_data, b0, b1, width);
        step_gemm(t, dgates_t + b0 * 4 * hidden, dh + b0 * width);
        if (mask != nullptr || lengths_data != nullptr) finish_carry(lengths_data, mask, t, dh, saved_data, b0, b1,
                                                                     width);
      }
    });
  });
  auto grads = weight_grads(dgates, x, options.masked(h0), options.masked(y), options.lengths, w_ih, w_hh,
                            grad_x && !plan.dx_in_step, sequence_matmul, transposed);
  if (plan.dx_in_step) grads.dx = plan.dx;
  auto dw_hr = at::mm(grad_h.view({steps * batch, width}).t(), units.view({steps * batch, hidden}));  // [P, H]
  return {grads.dx, dh_carry, dc, grads.dw_ih, grads.dw_hh, grads.dbias, dw_hr};
}

ProjectedBackwardOutputs lstm_scan_backward(const at::Tensor& grad_y_in, const at::Tensor& grad_h_n_in,
                                            const at::Tensor& grad_c_n_in, const at::Tensor& x_in,
                                            const at::Tensor& h0_in, const at::Tensor& c0_in,
                                            const at::Tensor& w_ih_in, const at::Tensor& w_hh_in,
                                            const at::Tensor& y_in, const at::Tensor& cells_in,
                                            const at::Tensor& gates_in, bool grad_x,
                                            const std::optional<at::Tensor>& recurrent_mask,
                                            const std::optional<at::Tensor>& lengths,
                                            const std::optional<at::Tensor>& w_hr_in) {
  if (!w_hr_in.has_value()) {
    auto [dx, dh0, dc0, dw_ih, dw_hh, dbias] = lstm_backward_impl(
        grad_y_in.contiguous(), grad_h_n_in.contiguous(), grad_c_n_in.contiguous(), x_in.contiguous(),
        h0_in.contiguous(), c0_in.contiguous(), w_ih_in.contiguous(), w_hh_in.contiguous(), y_in.contiguous(),
        cells_in.contiguous(), gates_in.contiguous(), grad_x, recurrent_mask, lengths);
    return {dx, dh0, dc0, dw_ih, dw_hh, dbias, at::empty({0}, w_hh_in.options())};
  }
  FUSED_RNN_EXCLUDE_AUTOCAST;
  if (reduced_precision(x_in)) {
    const Bf16Scope bf16_products(x_in.scalar_type() == at::kBFloat16);
    auto grads = lstm_scan_backward(to_float32(grad_y_in), to_float32(grad_h_n_in), to_float32(grad_c_n_in),
                                    to_float32(x_in), to_float32(h0_in), to_float32(c0_in), to_float32(w_ih_in),
                                    to_float32(w_hh_in), to_float32(y_in), cells_in, gates_in, grad_x,
                                    to_float32(recurrent_mask), lengths, to_float32(w_hr_in));
    const auto dtype = x_in.scalar_type();
    auto& [dx, dh0, dc0, dw_ih, dw_hh, dbias, dw_hr] = grads;
    return {dx.to(dtype), dh0.to(dtype), dc0.to(dtype), dw_ih.to(dtype), dw_hh.to(dtype), dbias.to(dtype),
            dw_hr.to(dtype)};
  }
  const auto grad_y = grad_y_in.contiguous(), grad_h_n = grad_h_n_in.contiguous(), grad_c_n = grad_c_n_in.contiguous();
  const auto x = x_in.contiguous(), h0 = h0_in.contiguous(), c0 = c0_in.contiguous(), y = y_in.contiguous();
  const auto w_ih = w_ih_in.contiguous(), w_hh = w_hh_in.contiguous(), w_hr = w_hr_in->contiguous();
  const auto cells = cells_in.contiguous(), gates = gates_in.contiguous();
  check_lstm_tensors(x, h0, c0, w_ih, w_hh, w_hr, std::nullopt, {at::kFloat, at::kDouble});
  const int64_t steps = x.size(0), batch = x.size(1), width = w_hh.size(1), hidden = w_hr.size(1);
  const auto dtype = x.scalar_type();
  for (const auto& [tensor, name, columns] : {std::make_tuple(&grad_y, "grad_y", width),
                                              std::make_tuple(&y, "y", width),
                                              std::make_tuple(&cells, "cells", hidden),
                                              std::make_tuple(&gates, "gates", 4 * hidden)}) {
    check_cpu_float(*tensor, name, dtype);
    TORCH_CHECK(tensor->dim() == 3 && tensor->size(0) == steps && tensor->size(1) == batch &&
                    tensor->size(2) == columns,
                "fused_rnn: ", name, " must be [", steps, ", ", batch, ", ", columns, "], got ", tensor->sizes());
  }
  for (const auto& [tensor, name, columns] : {std::make_tuple(&grad_h_n, "grad_h_n", width),
                                              std::make_tuple(&grad_c_n, "grad_c_n", hidden)}) {
    check_cpu_float(*tensor, name, dtype);
    TORCH_CHECK(tensor->dim() == 2 && tensor->size(0) == batch && tensor->size(1) == columns, "fused_rnn: ", name,
                " must be [", batch, ", ", columns, "], got ", tensor->sizes());
  }
  const ScanOptions options(x, width, recurrent_mask, lengths);
  return lstm_projected_backward(grad_y, grad_h_n, grad_c_n, x, h0, c0, w_ih, w_hh, w_hr, y, cells, gates, grad_x,
                                 options);
}

// One step is the scan with T = 1, so the step and the scan cannot drift apart.
std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_step(const at::Tensor& x, const at::Tensor& h, const at::Tensor& c,
                                                         const at::Tensor& w_ih, const at::Tensor& w_hh,
                                                         const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2, "fused_rnn: x must be 2-D [B, I], got ", x.sizes());
  auto [y, h_new, c_new, cells, gates] = lstm_scan_forward(x.unsqueeze(0), h, c, w_ih, w_hh, bias, std::nullopt,
                                                           std::nullopt, std::nullopt);
  return {h_new, c_new, gates.squeeze(0)};
}

BackwardOutputs lstm_step_backward(const at::Tensor& grad_h_new, const at::Tensor& grad_c_new, const at::Tensor& x,
                                   const at::Tensor& h, const at::Tensor& c, const at::Tensor& w_ih,
                                   const at::Tensor& w_hh, const at::Tensor& c_new, const at::Tensor& gates) {
  TORCH_CHECK(x.dim() == 2, "fused_rnn: x must be 2-D [B, I], got ", x.sizes());
  // the scan's backward reads c_t in float32, as its forward kept it (cells); a bf16/fp16
  // step returned c_new rounded to x's dtype, so c_t = f * c + i * g is recomputed here
  // in float32 from the activated gates (float32) and c, as the forward computed it (up
  // to the compiler contracting the kernel's expression into an FMA: an ulp of float32)
  at::Tensor cells = c_new;
  if (reduced_precision(x)) {
    TORCH_CHECK(gates.dim() == 2 && gates.size(1) % 4 == 0, "fused_rnn: gates must be [B, 4H], got ", gates.sizes());
    const int64_t hidden = gates.size(1) / 4;
    const auto g = gates.to(at::kFloat);
    cells = g.narrow(1, hidden, hidden) * c.to(at::kFloat) + g.narrow(1, 0, hidden) * g.narrow(1, 2 * hidden, hidden);
  }
  auto grads = lstm_backward_impl(at::zeros_like(c_new).unsqueeze(0), grad_h_new.contiguous(),
                                  grad_c_new.contiguous(), x.contiguous().unsqueeze(0), h.contiguous(),
                                  c.contiguous(), w_ih.contiguous(), w_hh.contiguous(), at::Tensor(),
                                  cells.contiguous().unsqueeze(0), gates.contiguous().unsqueeze(0), true);
  std::get<0>(grads) = std::get<0>(grads).squeeze(0);
  return grads;
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_rnn, CPU, m) {
  m.impl("lstm_scan_forward", &lstm_scan_forward);
  m.impl("lstm_scan_backward", &lstm_scan_backward);
  m.impl("lstm_step", &lstm_step);
  m.impl("lstm_step_backward", &lstm_step_backward);
}

}  // namespace cpu
}  // namespace fused_rnn
