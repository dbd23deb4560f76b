"""LSTM forward and backward scans in Triton, one launch per sequence.

The layout of irnn.py (a program owns BLOCK_B batch rows and all their units, runs
the time loop, tiles each step over units and the reduction), with PyTorch's gate
order i, f, g, o. A tile of units computes the four gates of those units together,
so the cell update needs nothing from other tiles:
    gates_t = pre_t + h_{t-1} W_hh^T,  i, f, o = sigmoid, g = tanh,
    c_t = f c_{t-1} + i g,  h_t = o tanh(c_t).
The forward writes the activated gates over the input projection and keeps c_t for
the backward, which runs in reverse time:
    dh = dy_t + dgates_{t+1} W_hh (dh_T at t = T),  dc += dh o (1 - tanh^2 c_t),
    da_i = dc g i (1 - i), da_f = dc c_{t-1} f (1 - f), da_g = dc i (1 - g^2),
    da_o = dh tanh(c_t) o (1 - o),  dc <- dc f,
and ends with dh_0 = dgates_1 W_hh, dc_0 = dc. dc is carried in a [B, H] buffer that
only the program owning its rows touches. The weight gradients are GEMMs after the
scan (PyTorch). dtypes as in irnn.py: h, c, gates and every accumulation in float32.
"""

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._host import input_projection, weight_grads
from .common import (
    SIZE_ARGUMENTS,
    Config,
    ScanOptions,
    TunedKernel,
    check_dtype,
    dot_state_weight,
    row_lengths,
    sigmoid,
    tanh,
    upcast_dots,
)

# The launch configs bench/triton_resources.py compiles for every variant; dispatch
# autotunes over those that never spill (_configs.py, generated from that compile).
# Four gate accumulators and four W tiles per step need narrower unit tiles than the
# IRNN's: 32- or 64-wide unit tiles and 32-deep reductions spill in most variants, and
# whether 4 or 8 warps fit depends on the dtype (8 warps spill the fp32 backward, 4
# warps the bf16/fp16 forward on sm_80).
CANDIDATES = (
    Config(block_b=16, block_n=16, block_k=16, num_warps=4, num_stages=1),
    Config(block_b=16, block_n=16, block_k=16, num_warps=8, num_stages=1),
    Config(block_b=16, block_n=16, block_k=16, num_warps=8, num_stages=2),
    Config(block_b=16, block_n=32, block_k=16, num_warps=8, num_stages=1),
    Config(block_b=16, block_n=32, block_k=16, num_warps=4, num_stages=1),
    Config(block_b=16, block_n=16, block_k=32, num_warps=8, num_stages=1),
    Config(block_b=32, block_n=16, block_k=16, num_warps=8, num_stages=1),
)


@triton.jit
def _lstm_forward_step(gates_t, h_prev, c_prev, w, y_t, c_t, rows, row_ok, H, HAS_PREV: tl.constexpr,
                       TF32: tl.constexpr, UPCAST: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, keep, active, HAS_MASK: tl.constexpr, HAS_LENGTHS: tl.constexpr):
    # gates_t [B, 4H]: pre-activations in, activations out; h_prev, c_prev, y_t, c_t [B, H];
    # the recurrent product reads h_prev * keep; rows not `active` keep h_prev and c_prev
    rows64 = rows.to(tl.int64)[:, None]
    for n0 in range(0, H, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < H
        mask = row_ok[:, None] & col_ok[None, :]
        g_row = gates_t + rows64 * (4 * H) + cols[None, :]
        a_i = tl.load(g_row, mask=mask, other=0.0).to(tl.float32)
        a_f = tl.load(g_row + H, mask=mask, other=0.0).to(tl.float32)
        a_g = tl.load(g_row + 2 * H, mask=mask, other=0.0).to(tl.float32)
        a_o = tl.load(g_row + 3 * H, mask=mask, other=0.0).to(tl.float32)
        c_before = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
        if HAS_PREV:
            for k0 in range(0, H, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_ok = ks < H
                h = tl.load(h_prev + rows64 * H + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                if HAS_MASK:
                    h = h * tl.load(keep + rows64 * H + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                # W^T[k, n] of gate q = W[q H + n, k]
                w_t = w + cols[None, :].to(tl.int64) * H + ks[:, None]
                w_mask = k_ok[:, None] & col_ok[None, :]
                a_i += dot_state_weight(h, tl.load(w_t, mask=w_mask, other=0.0), TF32, UPCAST)
                gate = H.to(tl.int64) * H  # one gate's block of W_hh; 3 H^2 passes int32 at H ~ 27k
                a_f += dot_state_weight(h, tl.load(w_t + gate, mask=w_mask, other=0.0), TF32, UPCAST)
                a_g += dot_state_weight(h, tl.load(w_t + 2 * gate, mask=w_mask, other=0.0), TF32, UPCAST)
                a_o += dot_state_weight(h, tl.load(w_t + 3 * gate, mask=w_mask, other=0.0), TF32, UPCAST)
            c_before = tl.load(c_prev + rows64 * H + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        i = sigmoid(a_i)
        f = sigmoid(a_f)
        g = tanh(a_g)
        o = sigmoid(a_o)
        c = f * c_before + i * g
        h_new = o * tanh(c)
        if HAS_LENGTHS:
            h_before = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
            if HAS_PREV:
                h_before = tl.load(h_prev + rows64 * H + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            c = tl.where(active[:, None], c, c_before)
            h_new = tl.where(active[:, None], h_new, h_before)
        tl.store(g_row, i, mask=mask)
        tl.store(g_row + H, f, mask=mask)
        tl.store(g_row + 2 * H, g, mask=mask)
        tl.store(g_row + 3 * H, o, mask=mask)
        tl.store(c_t + rows64 * H + cols[None, :], c, mask=mask)
        tl.store(y_t + rows64 * H + cols[None, :], h_new, mask=mask)


@triton.jit(do_not_specialize=SIZE_ARGUMENTS)
def lstm_scan_forward_kernel(gates, h0, c0, w, y, cells, keep, lengths, T, B, H, HAS_STATE: tl.constexpr,
                             TF32: tl.constexpr, UPCAST: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_K: tl.constexpr, HAS_MASK: tl.constexpr, HAS_LENGTHS: tl.constexpr):
    """gates [T, B, 4H] (x W_ih^T + b in, activated gates out), h0, c0 [B, H] (unused
    unless HAS_STATE), w [4H, H] -> y, cells [T, B, H]. Options: keep [B, H] float32
    recurrent mask, lengths [B] int64 (each used only with its HAS_ flag)."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    step = B.to(tl.int64) * H
    lens = row_lengths(lengths, rows, row_ok, HAS_LENGTHS, BLOCK_B)
    _lstm_forward_step(gates, h0, c0, w, y, cells, rows, row_ok, H, HAS_STATE, TF32, UPCAST, BLOCK_B, BLOCK_N, BLOCK_K,
                       keep, lens > 0, HAS_MASK, HAS_LENGTHS)
    tl.debug_barrier()
    for t in range(1, T):
        # step is int64, so t * step is too
        _lstm_forward_step(gates + 4 * t * step, y + (t - 1) * step, cells + (t - 1) * step, w, y + t * step,
                           cells + t * step, rows, row_ok, H, True, TF32, UPCAST, BLOCK_B, BLOCK_N, BLOCK_K,
                           keep, lens > t, HAS_MASK, HAS_LENGTHS)
        tl.debug_barrier()


@triton.jit
def _recurrent_grad(dgates_next, w, rows64, row_ok, cols, col_ok, H, TF32: tl.constexpr, UPCAST: tl.constexpr,
                    BLOCK_B: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # (dgates_next [B, 4H] @ W [4H, H])[rows, cols], the reduction running over 4H
    acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, 4 * H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < 4 * H
        dg = tl.load(dgates_next + rows64 * (4 * H) + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_tile = tl.load(w + ks[:, None].to(tl.int64) * H + cols[None, :], mask=k_ok[:, None] & col_ok[None, :],
                         other=0.0)
        acc += dot_state_weight(dg, w_tile, TF32, UPCAST)
    return acc


@triton.jit
def _lstm_backward_step(dy_t, dh_n, dgates_next, w, gates_t, c_t, c_prev, dc, dgates_t, rows, row_ok, H,
                        from_dgates, HAS_PREV: tl.constexpr, TF32: tl.constexpr, UPCAST: tl.constexpr,
                        BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        keep, active, next_active, HAS_MASK: tl.constexpr, HAS_LENGTHS: tl.constexpr):
    # from_dgates (run time): dh comes from the next step's dgates (times keep), else from
    # dh_n (t = T, or the next step is past the row's length); rows not `active` pass dc
    # through and get zero dgates
    rows64 = rows.to(tl.int64)[:, None]
    for n0 in range(0, H, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < H
        mask = row_ok[:, None] & col_ok[None, :]
        unit = rows64 * H + cols[None, :]
        if from_dgates:
            dh = _recurrent_grad(dgates_next, w, rows64, row_ok, cols, col_ok, H, TF32, UPCAST, BLOCK_B, BLOCK_N,
                                 BLOCK_K)
            if HAS_MASK:
                dh = dh * tl.load(keep + unit, mask=mask, other=0.0)
            if HAS_LENGTHS:
                dh = tl.where(next_active[:, None], dh, tl.load(dh_n + unit, mask=mask, other=0.0).to(tl.float32))
        else:
            dh = tl.load(dh_n + unit, mask=mask, other=0.0).to(tl.float32)
        dh += tl.load(dy_t + unit, mask=mask, other=0.0).to(tl.float32)
        g_row = gates_t + rows64 * (4 * H) + cols[None, :]
        i = tl.load(g_row, mask=mask, other=0.0)
        f = tl.load(g_row + H, mask=mask, other=0.0)
        g = tl.load(g_row + 2 * H, mask=mask, other=0.0)
        o = tl.load(g_row + 3 * H, mask=mask, other=0.0)
        tc = tanh(tl.load(c_t + unit, mask=mask, other=0.0))
        c_before = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
        if HAS_PREV:
            c_before = tl.load(c_prev + unit, mask=mask, other=0.0)
        dc_in = tl.load(dc + unit, mask=mask, other=0.0)
        d_c = dc_in + dh * o * (1.0 - tc * tc)
        da_i = d_c * g * i * (1.0 - i)
        da_f = d_c * c_before * f * (1.0 - f)
        da_g = d_c * i * (1.0 - g * g)
        da_o = dh * tc * o * (1.0 - o)
        dc_out = d_c * f
        if HAS_LENGTHS:
            live = active[:, None]
            da_i = tl.where(live, da_i, 0.0)
            da_f = tl.where(live, da_f, 0.0)
            da_g = tl.where(live, da_g, 0.0)
            da_o = tl.where(live, da_o, 0.0)
            dc_out = tl.where(live, dc_out, dc_in)
        dg_row = dgates_t + rows64 * (4 * H) + cols[None, :]
        tl.store(dg_row, da_i, mask=mask)
        tl.store(dg_row + H, da_f, mask=mask)
        tl.store(dg_row + 2 * H, da_g, mask=mask)
        tl.store(dg_row + 3 * H, da_o, mask=mask)
        tl.store(dc + unit, dc_out, mask=mask)


@triton.jit(do_not_specialize=SIZE_ARGUMENTS)
def lstm_scan_backward_kernel(dy, dh_n, c0, cells, gates, w, dgates, dc, dh0, keep, lengths, T, B, H,
                              HAS_C0: tl.constexpr, TF32: tl.constexpr, UPCAST: tl.constexpr, BLOCK_B: tl.constexpr,
                              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_MASK: tl.constexpr,
                              HAS_LENGTHS: tl.constexpr):
    """dy [T, B, H], dh_n [B, H], c0 [B, H] (unused unless HAS_C0), cells [T, B, H],
    gates [T, B, 4H] (activated), w [4H, H]; dc [B, H]: dc_T in, dc_0 out ->
    dgates [T, B, 4H], dh0 [B, H]."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    step = B.to(tl.int64) * H
    lens = row_lengths(lengths, rows, row_ok, HAS_LENGTHS, BLOCK_B)
    for i in range(0, T - 1):  # t = T-1 .. 1
        t = T - 1 - i
        _lstm_backward_step(dy + t * step, dh_n, dgates + 4 * (t + 1) * step, w, gates + 4 * t * step,
                            cells + t * step, cells + (t - 1) * step, dc, dgates + 4 * t * step, rows, row_ok, H,
                            i > 0, True, TF32, UPCAST, BLOCK_B, BLOCK_N, BLOCK_K, keep, lens > t, lens > t + 1,
                            HAS_MASK, HAS_LENGTHS)
        tl.debug_barrier()
    _lstm_backward_step(dy, dh_n, dgates + 4 * step, w, gates, cells, c0, dc, dgates, rows, row_ok, H, T > 1,
                        HAS_C0, TF32, UPCAST, BLOCK_B, BLOCK_N, BLOCK_K, keep, lens > 0, lens > 1, HAS_MASK,
                        HAS_LENGTHS)
    tl.debug_barrier()
    # dh_0 = (dgates_1 @ W_hh) * keep, or dh_T for an empty sequence
    rows64 = rows.to(tl.int64)[:, None]
    for n0 in range(0, H, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < H
        mask = row_ok[:, None] & col_ok[None, :]
        dh = _recurrent_grad(dgates, w, rows64, row_ok, cols, col_ok, H, TF32, UPCAST, BLOCK_B, BLOCK_N, BLOCK_K)
        if HAS_MASK:
            dh = dh * tl.load(keep + rows64 * H + cols[None, :], mask=mask, other=0.0)
        if HAS_LENGTHS:
            carried = tl.load(dh_n + rows64 * H + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            dh = tl.where((lens > 0)[:, None], dh, carried)
        tl.store(dh0 + rows64 * H + cols[None, :], dh, mask=mask)


# the forward writes the activated gates over their pre-activations, and the backward
# carries dc in place (dc_T in, dc_0 out): autotuning trials must restore both
SCAN_FORWARD = TunedKernel(lstm_scan_forward_kernel, "lstm_scan_forward", restore_value=("gates",))
SCAN_BACKWARD = TunedKernel(lstm_scan_backward_kernel, "lstm_scan_backward", restore_value=("dc",))


def lstm_scan_forward(x: Tensor, h0: Optional[Tensor], c0: Optional[Tensor], w_ih: Tensor, w_hh: Tensor,
                      bias: Optional[Tensor], allow_tf32: bool = False, config: Optional[Config] = None,
                      recurrent_mask: Optional[Tensor] = None, lengths: Optional[Tensor] = None):
    """x [T, B, I], h0 and c0 [B, H] or None (zeros), w_ih [4H, I], w_hh [4H, H], bias [4H]
    or None (b_ih + b_hh), all float32, bfloat16 or float16 -> (y [T, B, H], h_T, c_T
    [B, H] in x's dtype; cells [T, B, H] and gates [T, B, 4H], the activated gates, in
    float32: what the backward reads). The recurrence runs in float32. `config`: launch
    with this config instead of the tuned one (tests). recurrent_mask [B, H] and
    lengths [B]: as in fused_rnn.lstm."""
    check_dtype(x)
    steps, batch, _ = x.shape
    hidden = w_hh.shape[1]
    w_hh = w_hh.contiguous()
    gates = input_projection(x.contiguous(), w_ih, bias, torch.float32)  # float32: pre-activations, then activations
    states = torch.empty(steps, batch, hidden, dtype=torch.float32, device=x.device)  # h_t in float32
    cells = torch.empty_like(states)
    has_state = h0 is not None or c0 is not None
    h0_t = (h0 if h0 is not None else x.new_zeros(batch, hidden)).float().contiguous() if has_state else None
    c0_t = (c0 if c0 is not None else x.new_zeros(batch, hidden)).float().contiguous() if has_state else None
    if steps == 0 or batch == 0:
        zeros = x.new_zeros(batch, hidden)
        h_n = h0_t.to(x.dtype, copy=True) if has_state else zeros
        c_n = c0_t.to(x.dtype, copy=True) if has_state else zeros.clone()
        return states.to(x.dtype), h_n, c_n, cells, gates
    options = ScanOptions.of(x, w_hh, recurrent_mask, lengths)
    SCAN_FORWARD.launch(batch, w_hh, gates, h0_t if has_state else w_hh, c0_t if has_state else w_hh, w_hh, states,
                        cells, options.keep, options.lengths, steps, batch, hidden, config=config,
                        HAS_STATE=has_state, TF32=allow_tf32, UPCAST=upcast_dots(w_hh),
                        HAS_MASK=options.flags["HAS_MASK"],
                        HAS_LENGTHS=options.flags["HAS_LENGTHS"])
    h_n = states[-1].to(x.dtype, copy=True)
    options.zero_beyond_lengths(states)
    return states.to(x.dtype), h_n, cells[-1].to(x.dtype, copy=True), cells, gates


def lstm_scan_backward(grad_y: Tensor, grad_h_n: Tensor, grad_c_n: Tensor, x: Tensor, h0: Optional[Tensor],
                       c0: Optional[Tensor], w_ih: Tensor, w_hh: Tensor, y: Tensor, cells: Tensor, gates: Tensor,
                       need_dx: bool = True, allow_tf32: bool = False, config: Optional[Config] = None,
                       recurrent_mask: Optional[Tensor] = None, lengths: Optional[Tensor] = None):
    """Gradients of lstm_scan_forward: (dx or None, dh0, dc0, dw_ih, dw_hh, dbias), in
    the inputs' dtype, computed in float32; the options as given to the forward."""
    check_dtype(x)
    steps, batch, inputs = x.shape
    hidden = w_hh.shape[1]
    if steps == 0 or batch == 0:
        return ((torch.zeros_like(x) if need_dx else None), grad_h_n.clone(), grad_c_n.clone(),
                torch.zeros_like(w_ih), torch.zeros_like(w_hh), w_hh.new_zeros(4 * hidden))
    dgates = torch.empty(steps, batch, 4 * hidden, dtype=torch.float32, device=x.device)
    dc = grad_c_n.to(torch.float32, copy=True).contiguous()  # dc_T in, dc_0 out
    dh0 = torch.empty(batch, hidden, dtype=torch.float32, device=x.device)
    w_hh = w_hh.contiguous()
    options = ScanOptions.of(x, w_hh, recurrent_mask, lengths)
    SCAN_BACKWARD.launch(batch, w_hh, grad_y.contiguous(), grad_h_n.contiguous(),
                         c0.float().contiguous() if c0 is not None else w_hh, cells.contiguous(), gates.contiguous(),
                         w_hh, dgates, dc, dh0, options.keep, options.lengths, steps, batch, hidden, config=config,
                         HAS_C0=c0 is not None, TF32=allow_tf32, UPCAST=upcast_dots(w_hh),
                         HAS_MASK=options.flags["HAS_MASK"], HAS_LENGTHS=options.flags["HAS_LENGTHS"])
    dx, dw_ih, dw_hh, dbias = weight_grads(dgates, x, h0, y, w_ih, need_dx, recurrent_mask, lengths)
    return dx, dh0.to(x.dtype), dc.to(x.dtype), dw_ih, dw_hh, dbias
