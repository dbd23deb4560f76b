// Fused LSTM scans on the CPU (gate order i, f, g, o as in torch.nn.LSTM).
//
// Forward:  gates = x W_ih^T + bias for all steps in one GEMM; per step one BLAS call
//           adds h_{t-1} W_hh^T into gates_t in place, then one fused pass per row
//           activates the four gates (kept for the backward), and writes c_t and h_t.
// Backward: carrying dh (from step t+1 through W_hh) and dc, one fused pass per row
//           gives dgates_t and dc_{t-1}; one BLAS call gives dh_{t-1} = dgates_t W_hh.
//           Weight gradients are GEMMs over all of dgates afterwards.
// Each thread runs both scans on its own slice of the batch (see parallel_batch).
#include <omp.h>
#include <torch/library.h>

#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

#include "../cell_math.h"
#include "blas.h"
#include "scan_common.h"

namespace fused_rnn {
namespace cpu {
namespace {

// `count` units of one row of the forward cell: the four gates of unit j are at
// gates[j], gates[stride + j], gates[2 * stride + j], gates[3 * stride + j] (stride = H);
// pre-activations in, activations out.
template <typename scalar_t>
FUSED_RNN_CPU_CLONES void lstm_forward_row(scalar_t* gates, int64_t stride, const scalar_t* c_prev, scalar_t* c,
                                           scalar_t* h, int64_t count) {
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
FUSED_RNN_CPU_CLONES void lstm_backward_row(const scalar_t* dy, const scalar_t* dh_carry, scalar_t* dc,
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
          lstm_forward_row(row, hidden, c_prev + b * hidden + j0, c_data + t * step_elems + b * hidden + j0,
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
          lstm_backward_row(dy_data + t * step_elems + at_unit, dh + at_unit, dc + at_unit,
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

ForwardOutputs lstm_scan_forward(const at::Tensor& x_in, const at::Tensor& h0_in, const at::Tensor& c0_in,
                                 const at::Tensor& w_ih_in, const at::Tensor& w_hh_in,
                                 const std::optional<at::Tensor>& bias,
                                 const std::optional<at::Tensor>& recurrent_mask,
                                 const std::optional<at::Tensor>& lengths) {
  FUSED_RNN_EXCLUDE_AUTOCAST;
  if (reduced_precision(x_in)) {  // cells and gates stay float32 (the saved state)
    check_layer_tensors(x_in, {{&h0_in, "h0"}, {&c0_in, "c0"}}, w_ih_in, w_hh_in, bias, 4, c10::DeviceType::CPU,
                        {at::kBFloat16, at::kHalf});
    auto [y, h_n, c_n, cells, gates] =
        lstm_scan_forward(to_float32(x_in), to_float32(h0_in), to_float32(c0_in), to_float32(w_ih_in),
                          to_float32(w_hh_in), to_float32(bias), to_float32(recurrent_mask), lengths);
    const auto dtype = x_in.scalar_type();
    return {y.to(dtype), h_n.to(dtype), c_n.to(dtype), cells, gates};
  }
  const auto x = x_in.contiguous(), h0 = h0_in.contiguous(), c0 = c0_in.contiguous();
  const auto w_ih = w_ih_in.contiguous(), w_hh = w_hh_in.contiguous();
  check_layer(x, {{&h0, "h0"}, {&c0, "c0"}}, w_ih, w_hh, bias, 4);
  const int64_t steps = x.size(0), batch = x.size(1), hidden = w_hh.size(1);
  const ScanOptions options(x, hidden, recurrent_mask, lengths);
  if (steps == 0) {
    auto empty = x.new_empty({0, batch, hidden});
    return {empty, h0.clone(), c0.clone(), empty.clone(), x.new_empty({0, batch, 4 * hidden})};
  }
  auto gates = input_projection(x, w_ih, bias);  // [T, B, 4H]: pre-activations, then activations in place
  auto y = at::empty({steps, batch, hidden}, x.options());
  auto cells = at::empty({steps, batch, hidden}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lstm_scan_forward", [&] {
    scalar_t* gates_data = gates.data_ptr<scalar_t>();
    scalar_t* y_data = y.data_ptr<scalar_t>();
    scalar_t* c_data = cells.data_ptr<scalar_t>();
    const int64_t step_elems = batch * hidden;
    const int split = options.any() ? 1 : hidden_split_threads(batch, hidden);
    if (split > 1) {
      lstm_forward_hidden_split<scalar_t>(split, steps, batch, hidden, w_hh, h0.const_data_ptr<scalar_t>(),
                                          c0.const_data_ptr<scalar_t>(), gates_data, y_data, c_data);
      return;
    }
    const scalar_t* mask = options.mask_data<scalar_t>();
    const int64_t* lengths_data = options.lengths_data();
    std::vector<scalar_t> masked(mask != nullptr ? step_elems : 0);  // masked h_{t-1} rows, per thread
    parallel_batch(batch, [&](int64_t b0, int64_t b1) {
      const int64_t rows = b1 - b0;
      // gates_t [rows, 4H] += h_prev [rows, H] @ W_hh^T
      const RecurrentGemm<scalar_t> recurrent(w_hh.const_data_ptr<scalar_t>(), true, rows, 4 * hidden, hidden);
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
          lstm_forward_row(gates_t + b * 4 * hidden, hidden, c_prev + b * hidden, c_t + b * hidden, h_t + b * hidden,
                           hidden);
        }
      }
    });
  });
  auto h_n = y[steps - 1].clone();
  options.zero_beyond_lengths(y);
  return {y, h_n, cells[steps - 1].clone(), cells, gates};
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
  const auto plan = plan_backward(x, w_ih, w_hh, grad_x);
  auto dgates = at::empty_like(gates);   // [T, B, 4H]
  auto dh_carry = grad_h_n.clone();      // [B, H]
  auto dc = grad_c_n.clone();            // [B, H]
  auto saved = options.lengths.defined() ? at::empty_like(dh_carry) : at::Tensor();  // rows past their length
  AT_DISPATCH_FLOATING_TYPES(dtype, "lstm_scan_backward", [&] {
    const scalar_t* dy_data = grad_y.const_data_ptr<scalar_t>();
    const scalar_t* c_data = cells.const_data_ptr<scalar_t>();
    const scalar_t* gates_data = gates.const_data_ptr<scalar_t>();
    scalar_t* dgates_data = dgates.data_ptr<scalar_t>();
    scalar_t* dh = dh_carry.data_ptr<scalar_t>();
    scalar_t* dc_data = dc.data_ptr<scalar_t>();
    const int64_t step_elems = batch * hidden;
    const int split = options.any() ? 1 : hidden_split_threads(batch, hidden);
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
          lstm_backward_row(dy_t + b * hidden, dh + b * hidden, dc_data + b * hidden, gates_t + b * 4 * hidden,
                            hidden, c_t + b * hidden, c_prev + b * hidden, dgates_t + b * 4 * hidden, hidden);
        }
        save_inactive(lengths_data, t, dh, saved_data, b0, b1, hidden);
        step_gemm(t, dgates_t + b0 * 4 * hidden, dh + b0 * hidden);
        if (mask != nullptr || lengths_data != nullptr) finish_carry(lengths_data, mask, t, dh, saved_data, b0, b1,
                                                                     hidden);
      }
    });
  });
  auto grads = weight_grads(dgates, x, options.masked(h0), y.defined() ? options.masked(y) : y, w_ih, w_hh,
                            grad_x && !plan.dx_in_step);
  if (plan.dx_in_step) grads.dx = plan.dx;
  return {grads.dx, dh_carry, dc, grads.dw_ih, grads.dw_hh, grads.dbias};
}

BackwardOutputs lstm_scan_backward(const at::Tensor& grad_y, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
                                   const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
                                   const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& y,
                                   const at::Tensor& cells, const at::Tensor& gates, bool grad_x,
                                   const std::optional<at::Tensor>& recurrent_mask,
                                   const std::optional<at::Tensor>& lengths) {
  return lstm_backward_impl(grad_y.contiguous(), grad_h_n.contiguous(), grad_c_n.contiguous(), x.contiguous(),
                            h0.contiguous(), c0.contiguous(), w_ih.contiguous(), w_hh.contiguous(), y.contiguous(),
                            cells.contiguous(), gates.contiguous(), grad_x, recurrent_mask, lengths);
}

// One step is the scan with T = 1, so the step and the scan cannot drift apart.
std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_step(const at::Tensor& x, const at::Tensor& h, const at::Tensor& c,
                                                         const at::Tensor& w_ih, const at::Tensor& w_hh,
                                                         const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2, "fused_rnn: x must be 2-D [B, I], got ", x.sizes());
  auto [y, h_new, c_new, cells, gates] = lstm_scan_forward(x.unsqueeze(0), h, c, w_ih, w_hh, bias, std::nullopt,
                                                           std::nullopt);
  return {h_new, c_new, gates.squeeze(0)};
}

BackwardOutputs lstm_step_backward(const at::Tensor& grad_h_new, const at::Tensor& grad_c_new, const at::Tensor& x,
                                   const at::Tensor& h, const at::Tensor& c, const at::Tensor& w_ih,
                                   const at::Tensor& w_hh, const at::Tensor& c_new, const at::Tensor& gates) {
  TORCH_CHECK(x.dim() == 2, "fused_rnn: x must be 2-D [B, I], got ", x.sizes());
  auto grads = lstm_backward_impl(at::zeros_like(c_new).unsqueeze(0), grad_h_new.contiguous(),
                                  grad_c_new.contiguous(), x.contiguous().unsqueeze(0), h.contiguous(),
                                  c.contiguous(), w_ih.contiguous(), w_hh.contiguous(), at::Tensor(),
                                  c_new.contiguous().unsqueeze(0), gates.contiguous().unsqueeze(0), true);
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
