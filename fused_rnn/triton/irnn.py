"""IRNN forward and backward scans in Triton, one launch per sequence.

Maths (python/rnn_reference.py derives it): pre = x W_ih^T + b (one GEMM, in PyTorch); the scan
z_t = pre_t + h_{t-1} W_hh^T, h_t = relu(z_t); backward, in reverse time,
g = dy_t + dz_{t+1} W_hh (dh_T at t = T), dz_t = g * [h_t > 0], dh_0 = dz_1 W_hh; the
weight gradients are GEMMs after the scan (PyTorch).

Each program owns BLOCK_B batch rows and every hidden unit of them, and runs the whole
time loop. A step is tiled over output columns (BLOCK_N) and the reduction (BLOCK_K):
it reads h_{t-1} in K-tiles from the previous step's output rows, which the program
itself has just written (so they are in L1/L2), and W_hh in K x N tiles, which every
step of every program reads (L2-resident for H up to ~1k at fp32). A barrier between
steps makes the step's stores visible to all the program's warps. Tiling both ways
means any H works, not just what fits in registers.

Offsets are int64 (T * B * H can pass 2^31). Rows and columns are masked, so any B
and H work. float32 inputs use IEEE-precision dot products unless ``allow_tf32``: TF32
rounds h to 10 mantissa bits at every step, an error that the recurrence carries
forward. bfloat16/float16 inputs and weights: the input projection, the state h and
every accumulation are float32; only the recurrent product's operands are rounded to
the weights' dtype (tensor cores); outputs are returned in the inputs' dtype.
"""

from typing import Optional, Tuple

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
    upcast_dots,
)

# The launch configs bench/triton_resources.py compiles for every variant; dispatch
# autotunes over those that never spill (_configs.py, generated from that compile).
# 16-row batch tiles are tl.dot's minimum M and give the most programs. fp32 IEEE dot
# products run on the FMA units, where each thread holds a slice of both operand tiles:
# 32-deep reductions with 4 warps, or 128-wide unit tiles, spilled on sm_80/sm_90 (up
# to 255 registers), and so do some TF32 variants of the larger tiles. 32-row tiles
# halve how often each program reads W_hh from L2 (at H = 1024 fp32 that is 4 MB per
# step per program), at half the programs: for large batches.
CANDIDATES = (
    Config(block_b=16, block_n=64, block_k=16, num_warps=8, num_stages=1),
    Config(block_b=16, block_n=32, block_k=16, num_warps=4, num_stages=1),
    Config(block_b=16, block_n=32, block_k=16, num_warps=8, num_stages=1),
    Config(block_b=16, block_n=64, block_k=16, num_warps=8, num_stages=2),
    Config(block_b=16, block_n=128, block_k=16, num_warps=8, num_stages=1),
    Config(block_b=16, block_n=32, block_k=32, num_warps=4, num_stages=1),
    Config(block_b=32, block_n=64, block_k=16, num_warps=8, num_stages=1),
)


@triton.jit
def _relu(z):
    return tl.where(z < 0.0, 0.0, z)  # NaN < 0 is false: NaN propagates, as in torch.relu


@triton.jit
def _irnn_forward_step(pre_t, prev, w, y_t, rows, row_ok, H, HAS_PREV: tl.constexpr, TF32: tl.constexpr,
                       UPCAST: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       keep, active, clip, HAS_MASK: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_CLIP: tl.constexpr):
    # y_t[rows, :] = relu(pre_t[rows, :] + (prev[rows, :] * keep) @ W^T); prev, pre_t, y_t, keep: [B, H];
    # rows not `active` (past their length) keep prev; h is bounded by `clip`
    row_offsets = rows.to(tl.int64)[:, None] * H                     # [BB, 1]
    for n0 in range(0, H, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        mask = row_ok[:, None] & (cols < H)[None, :]
        acc = tl.load(pre_t + row_offsets + cols[None, :], mask=mask, other=0.0).to(tl.float32)  # [BB, BN]
        if HAS_PREV:
            for k0 in range(0, H, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_mask = row_ok[:, None] & (ks < H)[None, :]
                h = tl.load(prev + row_offsets + ks[None, :], mask=k_mask, other=0.0)   # [BB, BK]
                if HAS_MASK:
                    h = h * tl.load(keep + row_offsets + ks[None, :], mask=k_mask, other=0.0)
                # W^T[k, n] = W[n, k]
                w_tile = tl.load(w + cols[None, :].to(tl.int64) * H + ks[:, None],
                                 mask=(ks < H)[:, None] & (cols < H)[None, :], other=0.0)  # [BK, BN]
                acc += dot_state_weight(h, w_tile, TF32, UPCAST)
        h_new = _relu(acc)
        if HAS_CLIP:
            h_new = tl.where(h_new > clip, clip, h_new)  # not tl.minimum, which would drop a NaN
        if HAS_LENGTHS:
            old = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
            if HAS_PREV:
                old = tl.load(prev + row_offsets + cols[None, :], mask=mask, other=0.0)
            h_new = tl.where(active[:, None], h_new, old)
        tl.store(y_t + row_offsets + cols[None, :], h_new, mask=mask)


@triton.jit(do_not_specialize=SIZE_ARGUMENTS)
def irnn_scan_forward_kernel(pre, h0, w, y, keep, lengths, clip, T, B, H, HAS_H0: tl.constexpr, TF32: tl.constexpr,
                             UPCAST: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             HAS_MASK: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_CLIP: tl.constexpr):
    """pre [T, B, H] (x W_ih^T + b), h0 [B, H] (unused unless HAS_H0), w [H, H] -> y [T, B, H].
    Options: keep [B, H] float32 recurrent mask, lengths [B] int64, clip (each used only
    with its HAS_ flag)."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    step = B.to(tl.int64) * H
    lens = row_lengths(lengths, rows, row_ok, HAS_LENGTHS, BLOCK_B)
    _irnn_forward_step(pre, h0, w, y, rows, row_ok, H, HAS_H0, TF32, UPCAST, BLOCK_B, BLOCK_N, BLOCK_K,
                       keep, lens > 0, clip, HAS_MASK, HAS_LENGTHS, HAS_CLIP)
    tl.debug_barrier()
    for t in range(1, T):
        # step is int64, so t * step is too
        _irnn_forward_step(pre + t * step, y + (t - 1) * step, w, y + t * step, rows, row_ok, H, True, TF32,
                           UPCAST, BLOCK_B, BLOCK_N, BLOCK_K, keep, lens > t, clip, HAS_MASK, HAS_LENGTHS, HAS_CLIP)
        tl.debug_barrier()


@triton.jit
def _irnn_backward_step(dy_t, dh_n, dz_next, w, y_t, dz_t, rows, row_ok, H, FROM_DZ: tl.constexpr,
                        HAS_DY: tl.constexpr, MASK_RELU: tl.constexpr, TF32: tl.constexpr, UPCAST: tl.constexpr,
                        BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        keep, active, next_active, clip, HAS_MASK: tl.constexpr, HAS_LENGTHS: tl.constexpr,
                        HAS_CLIP: tl.constexpr):
    # g = dy_t + ((dz_next @ W) * keep if FROM_DZ and next_active else dh_n);
    # dz_t = g * relu'(y_t) (zero past a row's length) if MASK_RELU else g
    row_offsets = rows.to(tl.int64)[:, None] * H
    for n0 in range(0, H, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        mask = row_ok[:, None] & (cols < H)[None, :]
        if FROM_DZ:
            g = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, H, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                dz = tl.load(dz_next + row_offsets + ks[None, :], mask=row_ok[:, None] & (ks < H)[None, :],
                             other=0.0)                                                # [BB, BK]
                w_tile = tl.load(w + ks[:, None].to(tl.int64) * H + cols[None, :],
                                 mask=(ks < H)[:, None] & (cols < H)[None, :], other=0.0)  # W[k, n]: [BK, BN]
                g += dot_state_weight(dz, w_tile, TF32, UPCAST)
            if HAS_MASK:
                g = g * tl.load(keep + row_offsets + cols[None, :], mask=mask, other=0.0)
            if HAS_LENGTHS:  # the next step is past the row's length: dL/dh_T passes through it
                carried = tl.load(dh_n + row_offsets + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                g = tl.where(next_active[:, None], g, carried)
        else:
            g = tl.load(dh_n + row_offsets + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_DY:
            g += tl.load(dy_t + row_offsets + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if MASK_RELU:
            h = tl.load(y_t + row_offsets + cols[None, :], mask=mask, other=0.0)
            g = tl.where(h <= 0.0, 0.0, g)  # as torch's threshold_backward: NaN h passes the gradient
            if HAS_CLIP:
                g = tl.where(h >= clip, 0.0, g)
            if HAS_LENGTHS:
                g = tl.where(active[:, None], g, 0.0)
        tl.store(dz_t + row_offsets + cols[None, :], g, mask=mask)


@triton.jit(do_not_specialize=SIZE_ARGUMENTS)
def irnn_scan_backward_kernel(dy, dh_n, y, w, dz, dh0, keep, lengths, clip, T, B, H, TF32: tl.constexpr,
                              UPCAST: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCK_K: tl.constexpr, HAS_MASK: tl.constexpr, HAS_LENGTHS: tl.constexpr,
                              HAS_CLIP: tl.constexpr):
    """dy [T, B, H], dh_n [B, H], y [T, B, H] (h_1..h_T), w [H, H] -> dz [T, B, H], dh0 [B, H].
    Options as in irnn_scan_forward_kernel."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    step = B.to(tl.int64) * H
    lens = row_lengths(lengths, rows, row_ok, HAS_LENGTHS, BLOCK_B)
    last = (T - 1) * step
    _irnn_backward_step(dy + last, dh_n, dz, w, y + last, dz + last, rows, row_ok, H, False, True, True, TF32,
                        UPCAST, BLOCK_B, BLOCK_N, BLOCK_K, keep, lens > T - 1, lens > T, clip, HAS_MASK, HAS_LENGTHS,
                        HAS_CLIP)
    tl.debug_barrier()
    for i in range(1, T):
        t = T - 1 - i
        _irnn_backward_step(dy + t * step, dh_n, dz + (t + 1) * step, w, y + t * step, dz + t * step,
                            rows, row_ok, H, True, True, True, TF32, UPCAST, BLOCK_B, BLOCK_N, BLOCK_K,
                            keep, lens > t, lens > t + 1, clip, HAS_MASK, HAS_LENGTHS, HAS_CLIP)
        tl.debug_barrier()
    # dh_0 = (dz_1 @ W_hh) * keep, or dh_T for an empty sequence
    _irnn_backward_step(dy, dh_n, dz, w, y, dh0, rows, row_ok, H, True, False, False, TF32,
                        UPCAST, BLOCK_B, BLOCK_N, BLOCK_K, keep, lens > 0, lens > 0, clip, HAS_MASK, HAS_LENGTHS,
                        HAS_CLIP)


# the forward writes h_t over its input pre_t: autotuning trials must restore it
SCAN_FORWARD = TunedKernel(irnn_scan_forward_kernel, "irnn_scan_forward", restore_value=("pre",))
SCAN_BACKWARD = TunedKernel(irnn_scan_backward_kernel, "irnn_scan_backward")


def irnn_scan_forward(x: Tensor, h0: Optional[Tensor], w_ih: Tensor, w_hh: Tensor, bias: Optional[Tensor],
                      allow_tf32: bool = False, config: Optional[Config] = None,
                      recurrent_mask: Optional[Tensor] = None, lengths: Optional[Tensor] = None,
                      hidden_clip: Optional[float] = None) -> Tuple[Tensor, Tensor]:
    """x [T, B, I], h0 [B, H] or None (zeros), w_ih [H, I], w_hh [H, H], bias [H] or None
    (b_ih + b_hh), all float32, bfloat16 or float16 -> (y [T, B, H], h_T [B, H]) in x's
    dtype. The recurrence runs in float32 whatever the dtype. `config`: launch with
    this config instead of the tuned one (tests). recurrent_mask [B, H], lengths [B],
    hidden_clip: as in fused_rnn.irnn."""
    check_dtype(x)
    steps, batch, _ = x.shape
    hidden = w_hh.shape[0]
    w_hh = w_hh.contiguous()
    states = input_projection(x.contiguous(), w_ih, bias, torch.float32)  # [T, B, H] float32: z_t, then h_t in place
    if steps == 0 or batch == 0:
        h_n = h0.clone() if h0 is not None else x.new_zeros(batch, hidden)
        return states.to(x.dtype), h_n
    h0_arg = h0.float().contiguous() if h0 is not None else w_hh  # a placeholder pointer when there is no h0
    options = ScanOptions.of(x, w_hh, recurrent_mask, lengths, hidden_clip)
    SCAN_FORWARD.launch(batch, w_hh, states, h0_arg, w_hh, states, options.keep, options.lengths, options.clip,
                        steps, batch, hidden, config=config, HAS_H0=h0 is not None, TF32=allow_tf32,
                        UPCAST=upcast_dots(w_hh), **options.flags)
    h_n = states[-1].to(x.dtype, copy=True)
    options.zero_beyond_lengths(states)
    return states.to(x.dtype), h_n


def irnn_scan_backward(grad_y: Tensor, grad_h_n: Tensor, x: Tensor, h0: Optional[Tensor], w_ih: Tensor,
                       w_hh: Tensor, y: Tensor, need_dx: bool = True, allow_tf32: bool = False,
                       config: Optional[Config] = None, recurrent_mask: Optional[Tensor] = None,
                       lengths: Optional[Tensor] = None, hidden_clip: Optional[float] = None):
    """Gradients of irnn_scan_forward: (dx or None, dh0, dw_ih, dw_hh, dbias), in the
    inputs' dtype, computed in float32; the options as given to the forward."""
    check_dtype(x)
    steps, batch, inputs = x.shape
    hidden = w_hh.shape[0]
    if steps == 0 or batch == 0:
        return ((torch.zeros_like(x) if need_dx else None), grad_h_n.clone(), torch.zeros_like(w_ih),
                torch.zeros_like(w_hh), w_hh.new_zeros(hidden))
    dz = torch.empty(steps, batch, hidden, dtype=torch.float32, device=x.device)
    dh0 = torch.empty(batch, hidden, dtype=torch.float32, device=x.device)
    w_hh = w_hh.contiguous()
    if hidden_clip is not None:  # y holds h in x's dtype: compare it with the bound as y stores it
        hidden_clip = float(torch.tensor(hidden_clip, dtype=x.dtype))
    options = ScanOptions.of(x, w_hh, recurrent_mask, lengths, hidden_clip)
    SCAN_BACKWARD.launch(batch, w_hh, grad_y.contiguous(), grad_h_n.contiguous(), y.contiguous(), w_hh, dz, dh0,
                         options.keep, options.lengths, options.clip, steps, batch, hidden, config=config,
                         TF32=allow_tf32, UPCAST=upcast_dots(w_hh), **options.flags)
    dx, dw_ih, dw_hh, dbias = weight_grads(dz, x, h0, y, w_ih, need_dx, recurrent_mask, lengths)
    return dx, dh0.to(x.dtype), dw_ih, dw_hh, dbias
