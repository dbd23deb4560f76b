"""Hidden-split Triton scans: the IRNN and the LSTM, every option (issue 14).

The batch-tiled scans of irnn.py / lstm.py give each program BLOCK_B batch rows and all
H units: at small batch one SM runs the whole recurrence and re-reads all of W_hh every
step. Here the hidden units are split across programs instead, on a grid of (unit
blocks, batch groups) that plan.py chooses: program (p, q) owns units [p * BLOCK_U,
(p + 1) * BLOCK_U) with all their gates, for the batch rows of group q. At small batch
there is one group, and the GPU reads W_hh once per step in total, spread over all SMs;
at large batch more groups spread the arithmetic. The product puts the program's W_hh
rows on the M side of ``tl.dot`` and the batch on the N side (padded to BLOCK_B >= 16),
so bf16/fp16 weights run on the tensor cores even at B = 1; float32 stays IEEE unless
TF32. IEEE float32, which runs on the CUDA cores' FMAs either way, may also take tiles
below tl.dot's 16 (8 units, a batch tile of 1 or 8 rows): the product is then written
as FMAs (_accumulate), so that H = 1024 spreads over 128 programs and B = 1 is not
padded to 16 rows. The LSTM's four gate products share one pass over K and one read of
the state.

The K loop is pipelined by hand: the W_hh tiles and the state tile of chunk k + 1 are
loaded before the product of chunk k, so their L2 latency overlaps the arithmetic.
Triton's own software pipelining (num_stages >= 2) would turn the state's ld.global.cg
into an L1-caching cp.async.ca (Triton 3.8), so the kernels compile with num_stages=1.

One kernel per cell and direction, two drivers. Each kernel runs the phases [first,
stop) of the scan (forward: the time steps; backward: t = T - 1 down to 0, then the
dh_0 pass), meeting at a grid barrier between phases:

- per step (``persistent=False``): one launch per phase, the host looping; the launch
  boundary orders the phases and no barrier runs. This is what the Triton interpreter
  runs (it executes a grid's programs one after another, so a barrier there would wait
  forever) and what dispatch uses where every program cannot be resident at once;
- persistent (``persistent=True``): every phase in one launch. The grid barrier is an
  arrival counter incremented with release semantics at GPU scope and polled with
  acquire semantics; the exchanged state is read with the L2-only cache modifier
  (``.cg``), never the non-coherent read-only path. The poll is bounded: a barrier that
  does not complete within SPIN_LIMIT polls sets an error flag and the kernel exits;
  the host raises BarrierTimeout (:func:`run` falls back to the per-step driver)
  instead of hanging. It needs every program resident: at most one per SM (the scans
  refuse a persistent launch of more programs than SMs).

The state is float32 (ping-pong [2, B, H] for the IRNN, [T, B, H] for the LSTM), whatever
the inputs' dtype; y is stored in the inputs' dtype. Offsets are int64.
"""

import warnings
from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._host import input_projection, weight_grads
from . import interpreting
from .common import ScanOptions, _round_to_bfloat16, check_dtype, sigmoid, state_operand, tanh, upcast_dots, variant
from .plan import BLOCK_UNITS, MIN_DOT, Plan, fma_tile, on_fma, on_fma_variant, plan

# The launch sizes Triton must never specialize (a 1 would become a constant): the
# sizes, the rows per group and the window of phases.
SIZES = ("T", "B", "H", "R", "first", "stop")
# Triton's pipeliner would make the state's ld.global.cg an L1-caching cp.async.ca (see
# above; tests/test_triton_split.py reads the PTX): the K loop is pipelined by hand.
NUM_STAGES = 1

# A barrier poll costs ~1 us of L2 round trip: 2^26 polls is about a minute, far beyond
# any healthy step, short of a hang. Under the interpreter (one program: its own arrival
# completes the barrier) a barrier that waits at all is a bug: it fails at once.
SPIN_LIMIT = 1 << 26
# The barrier counts arrivals in an int32: a persistent launch runs at most this many
# (phases x programs); a longer scan is split into several launches.
MAX_ARRIVALS = 2 ** 31 - 1


def _spin_limit() -> int:
    return 1 if interpreting() else SPIN_LIMIT


# ---- the recurrent product ----

@triton.jit
def dot_weight_state(weight, state, TF32: tl.constexpr, UPCAST: tl.constexpr):
    """weight [M, K] (the weights' dtype) @ state [K, N] (float32), accumulated in
    float32, with common.dot_state_weight's rounding rules (the state is rounded to the
    weights' dtype for bf16/fp16; UPCAST does the rounded product in float32, for the
    interpreter)."""
    operand = state_operand(state, weight, UPCAST)
    if weight.dtype == tl.float32:
        if TF32:
            return tl.dot(weight, operand, input_precision="tf32")
        else:
            return tl.dot(weight, operand, input_precision="ieee")
    elif UPCAST:
        return tl.dot(weight.to(tl.float32), operand, input_precision="ieee")
    else:
        return tl.dot(weight, operand)


_MIN_DOT = tl.constexpr(MIN_DOT)


@triton.jit
def _fma(BLOCK_U: tl.constexpr, BLOCK_B: tl.constexpr):
    """Whether the product runs on float32 FMAs instead of tl.dot (plan.on_fma): below
    tl.dot's smallest M or N (BLOCK_U = 8, or a batch tile of 1 or 8 rows for a small
    group), with no padding of the tile to 16. An IEEE float32 tl.dot runs on the CUDA
    cores anyway."""
    return BLOCK_U < _MIN_DOT or BLOCK_B < _MIN_DOT


@triton.jit
def _accumulator(BLOCK_U: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr):
    """The product's float32 accumulator: [BLOCK_U, BLOCK_B], or on FMAs [BLOCK_U,
    BLOCK_K, BLOCK_B], each element a partial sum over every BLOCK_K-th k, so that the
    K loop only multiplies and adds and the reduction over k runs once (_total)."""
    if _fma(BLOCK_U, BLOCK_B):
        return tl.zeros((BLOCK_U, BLOCK_K, BLOCK_B), dtype=tl.float32)
    else:
        return tl.zeros((BLOCK_U, BLOCK_B), dtype=tl.float32)


@triton.jit
def _accumulate(acc, weight, state, TF32: tl.constexpr, UPCAST: tl.constexpr, BLOCK_U: tl.constexpr,
                BLOCK_B: tl.constexpr):
    """acc + weight [BLOCK_U, BLOCK_K] @ state [BLOCK_K, BLOCK_B] (see _accumulator)."""
    if _fma(BLOCK_U, BLOCK_B):
        tl.static_assert(not TF32, "TF32 runs on tl.dot: no config of its has a tile below 16")
        operand = state_operand(state, weight, UPCAST).to(tl.float32)
        return acc + weight.to(tl.float32)[:, :, None] * operand[None, :, :]
    else:
        return acc + dot_weight_state(weight, state, TF32, UPCAST)


@triton.jit
def _total(acc, BLOCK_U: tl.constexpr, BLOCK_B: tl.constexpr):
    """The product [BLOCK_U, BLOCK_B] from its accumulator."""
    if _fma(BLOCK_U, BLOCK_B):
        return tl.sum(acc, axis=1)
    else:
        return acc


@triton.jit
def _weight_tile(w, w_rows, w_ok, k0, K, k_stride, BLOCK_K: tl.constexpr):
    """[M, BLOCK_K]: w[w_rows[m] + k * k_stride] for k in [k0, k0 + BLOCK_K), 0 past K."""
    ks = k0 + tl.arange(0, BLOCK_K)
    return tl.load(w + w_rows[:, None] + ks.to(tl.int64)[None, :] * k_stride,
                   mask=w_ok[:, None] & (ks < K)[None, :], other=0.0)


@triton.jit
def _state_tile(src, src_rows, row_ok, k0, K, keep, HAS_MASK: tl.constexpr, BLOCK_K: tl.constexpr):
    """[BLOCK_K, BLOCK_B] float32: src[src_rows[b] + k] (* keep[...] with HAS_MASK), 0
    past K: the state the other programs wrote in the last phase (float32, or the
    backward's exchange copy in the weights' dtype), read L2-only (.cg)."""
    ks = k0 + tl.arange(0, BLOCK_K)
    ok = (ks < K)[:, None] & row_ok[None, :]
    state = tl.load(src + src_rows[None, :] + ks[:, None], mask=ok, other=0.0, cache_modifier=".cg").to(tl.float32)
    if HAS_MASK:
        state = state * tl.load(keep + src_rows[None, :] + ks[:, None], mask=ok, other=0.0)
    return state


@triton.jit
def _product(w, unit_stride, k_stride, src, unit0, H, rows, row_ok, K, keep, HAS_MASK: tl.constexpr,
             TF32: tl.constexpr, UPCAST: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_B: tl.constexpr,
             BLOCK_K: tl.constexpr):
    """[BLOCK_U, BLOCK_B] float32: acc[u, b] = sum_k w[u * unit_stride + k * k_stride] *
    src[b * K + k] over k < K for the units u = unit0 + [0, BLOCK_U): the forward reads
    W_hh's rows (unit_stride H, k_stride 1), the backward its columns (1, H)."""
    units = unit0 + tl.arange(0, BLOCK_U)
    w_rows, w_ok = units.to(tl.int64) * unit_stride, units < H
    src_rows = rows.to(tl.int64) * K
    tile = _weight_tile(w, w_rows, w_ok, 0, K, k_stride, BLOCK_K)
    state = _state_tile(src, src_rows, row_ok, 0, K, keep, HAS_MASK, BLOCK_K)
    acc = _accumulator(BLOCK_U, BLOCK_K, BLOCK_B)
    for k0 in range(BLOCK_K, K + BLOCK_K, BLOCK_K):  # chunk k0 - BLOCK_K, chunk k0 in flight
        next_tile = _weight_tile(w, w_rows, w_ok, k0, K, k_stride, BLOCK_K)
        next_state = _state_tile(src, src_rows, row_ok, k0, K, keep, HAS_MASK, BLOCK_K)
        acc = _accumulate(acc, tile, state, TF32, UPCAST, BLOCK_U, BLOCK_B)
        tile, state = next_tile, next_state
    return _total(acc, BLOCK_U, BLOCK_B)


@triton.jit
def _gate_products(w, src, unit0, H, rows, row_ok, keep, HAS_MASK: tl.constexpr, TF32: tl.constexpr,
                   UPCAST: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """The LSTM's four recurrent products (gates i, f, g, o: W_hh rows q * H + u) for the
    units unit0 + [0, BLOCK_U), [BLOCK_U, BLOCK_B] float32 each, in one pass over K that
    reads each state tile once."""
    units = unit0 + tl.arange(0, BLOCK_U)
    w_rows, w_ok = units.to(tl.int64) * H, units < H
    gate = H.to(tl.int64) * H
    src_rows = rows.to(tl.int64) * H
    t_i = _weight_tile(w, w_rows, w_ok, 0, H, 1, BLOCK_K)
    t_f = _weight_tile(w + gate, w_rows, w_ok, 0, H, 1, BLOCK_K)
    t_g = _weight_tile(w + 2 * gate, w_rows, w_ok, 0, H, 1, BLOCK_K)
    t_o = _weight_tile(w + 3 * gate, w_rows, w_ok, 0, H, 1, BLOCK_K)
    state = _state_tile(src, src_rows, row_ok, 0, H, keep, HAS_MASK, BLOCK_K)
    a_i = _accumulator(BLOCK_U, BLOCK_K, BLOCK_B)
    a_f = _accumulator(BLOCK_U, BLOCK_K, BLOCK_B)
    a_g = _accumulator(BLOCK_U, BLOCK_K, BLOCK_B)
    a_o = _accumulator(BLOCK_U, BLOCK_K, BLOCK_B)
    for k0 in range(BLOCK_K, H + BLOCK_K, BLOCK_K):
        n_i = _weight_tile(w, w_rows, w_ok, k0, H, 1, BLOCK_K)
        n_f = _weight_tile(w + gate, w_rows, w_ok, k0, H, 1, BLOCK_K)
        n_g = _weight_tile(w + 2 * gate, w_rows, w_ok, k0, H, 1, BLOCK_K)
        n_o = _weight_tile(w + 3 * gate, w_rows, w_ok, k0, H, 1, BLOCK_K)
        n_state = _state_tile(src, src_rows, row_ok, k0, H, keep, HAS_MASK, BLOCK_K)
        a_i = _accumulate(a_i, t_i, state, TF32, UPCAST, BLOCK_U, BLOCK_B)
        a_f = _accumulate(a_f, t_f, state, TF32, UPCAST, BLOCK_U, BLOCK_B)
        a_g = _accumulate(a_g, t_g, state, TF32, UPCAST, BLOCK_U, BLOCK_B)
        a_o = _accumulate(a_o, t_o, state, TF32, UPCAST, BLOCK_U, BLOCK_B)
        t_i, t_f, t_g, t_o, state = n_i, n_f, n_g, n_o, n_state
    return (_total(a_i, BLOCK_U, BLOCK_B), _total(a_f, BLOCK_U, BLOCK_B), _total(a_g, BLOCK_U, BLOCK_B),
            _total(a_o, BLOCK_U, BLOCK_B))


@triton.jit
def _exchanged(x, low, UPCAST: tl.constexpr):
    """float32 x as the backward's exchange copy (`low`'s dtype) holds it: rounded to
    nearest-even, as state_operand rounds the product's operand (under UPCAST on the
    bits: the interpreter's own conversion to bfloat16 does not round to nearest-even)."""
    if UPCAST and low.dtype.element_ty == tl.bfloat16:
        x = _round_to_bfloat16(x)
    return x.to(low.dtype.element_ty)


@triton.jit
def _pick(FIRST: tl.constexpr, first, second):
    """first if FIRST else second, for values of different types (pointers to the
    exchange copy or to the float32 buffer)."""
    if FIRST:
        return first
    else:
        return second


@triton.jit
def _share(B, R, BLOCK_U: tl.constexpr):
    """This program's first unit and its batch rows [row0, row1) (group R rows)."""
    row0 = tl.program_id(1) * R
    return tl.program_id(0) * BLOCK_U, row0, tl.minimum(row0 + R, B)


@triton.jit
def _grid_barrier(counter, target, error, SPIN: tl.constexpr):
    """Waits until `target` arrivals have been counted (this program's included), at
    most SPIN polls; returns whether the barrier completed (else sets *error)."""
    tl.debug_barrier()  # every warp of the program has stored its part of the phase
    tl.atomic_add(counter, 1, sem="release", scope="gpu")
    arrived = tl.atomic_add(counter, 0, sem="acquire", scope="gpu")
    polls = 0
    while (arrived < target) & (polls < SPIN):
        arrived = tl.atomic_add(counter, 0, sem="acquire", scope="gpu")
        polls += 1
    done = arrived >= target
    if not done:
        tl.atomic_xchg(error, 1, sem="relaxed", scope="gpu")
    tl.debug_barrier()
    return done


@triton.jit
def _phase_end(counter, error, phase, first, stop, SPIN: tl.constexpr):
    """After `phase` of the window [first, stop): the grid barrier, unless it was the
    window's last phase (nothing in this launch waits for it). Returns whether to go on."""
    ok = True
    if phase + 1 < stop:
        programs = tl.num_programs(0) * tl.num_programs(1)
        ok = _grid_barrier(counter, (phase + 1 - first) * programs, error, SPIN)
    return ok


# ---- the IRNN ----

@triton.jit
def _irnn_split_step(pre_t, prev, low_prev, nxt, low_next, w_hh, y_t, unit0, row0, row1, H, t, keep, lengths, clip,
                     LOW: tl.constexpr, HAS_MASK: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_CLIP: tl.constexpr,
                     TF32: tl.constexpr, UPCAST: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_B: tl.constexpr,
                     BLOCK_K: tl.constexpr):
    # nxt[b, u] = relu(pre_t[b, u] + sum_k W[u, k] (prev * keep)[b, k]) (at most clip) and y_t[b, u]
    # = the same in y's dtype, for this program's units u and rows b; pre_t, y_t, prev, nxt: [B, H].
    # A row past its length (t >= lengths[b]) keeps prev and outputs 0. With LOW (bf16/fp16 weights,
    # no mask) the product multiplies low_prev, h_{t-1} in the weights' dtype, and h_t goes to
    # low_next too (see _exchanged: the same bits at half the traffic).
    units = unit0 + tl.arange(0, BLOCK_U)
    unit_ok = units < H
    for b0 in range(row0, row1, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        row_ok = rows < row1
        offsets = rows.to(tl.int64)[None, :] * H + units[:, None]  # [BU, BB]: element (u, b) of a [B, H] buffer
        both_ok = unit_ok[:, None] & row_ok[None, :]
        z = tl.load(pre_t + offsets, mask=both_ok, other=0.0)
        z += _product(w_hh, H, 1, _pick(LOW, low_prev, prev), unit0, H, rows, row_ok, H, keep, HAS_MASK, TF32,
                      UPCAST, BLOCK_U, BLOCK_B, BLOCK_K)
        h_new = tl.where(z < 0.0, 0.0, z)  # NaN < 0 is false: NaN propagates, as in torch.relu
        if HAS_CLIP:
            h_new = tl.where(h_new > clip, clip, h_new)
        out = h_new
        if HAS_LENGTHS:
            active = (t < tl.load(lengths + rows, mask=row_ok, other=0))[None, :]
            kept = tl.load(prev + offsets, mask=both_ok, other=0.0, cache_modifier=".cg")
            h_new = tl.where(active, h_new, kept)
            out = tl.where(active, out, 0.0)
        tl.store(nxt + offsets, h_new, mask=both_ok)
        if LOW:
            tl.store(low_next + offsets, _exchanged(h_new, low_next, UPCAST), mask=both_ok)
        tl.store(y_t + offsets, out.to(y_t.dtype.element_ty), mask=both_ok)


@triton.jit(do_not_specialize=SIZES)
def irnn_split_kernel(pre, h0, state, w_hh, y, low, counter, error, T, B, H, R, first, stop, keep, lengths, clip,
                      LOW: tl.constexpr, HAS_MASK: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_CLIP: tl.constexpr,
                      TF32: tl.constexpr, UPCAST: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_B: tl.constexpr,
                      BLOCK_K: tl.constexpr, SPIN: tl.constexpr):
    """The forward's steps [first, stop): pre, y [T, B, H]; state [2, B, H] float32; with
    LOW, low [2, B, H] in the weights' dtype, step t writing low[t % 2] (the host puts
    h_0 in low[1])."""
    unit0, row0, row1 = _share(B, R, BLOCK_U)
    BH = B.to(tl.int64) * H
    ok = True
    t = first
    while (t < stop) & ok:
        t64 = t.to(tl.int64)
        prev = state + ((t64 + 1) % 2) * BH
        if t == 0:
            prev = h0
        _irnn_split_step(pre + t64 * BH, prev, low + ((t64 + 1) % 2) * BH, state + (t64 % 2) * BH, low + (t64 % 2) * BH,
                         w_hh, y + t64 * BH, unit0, row0, row1, H, t, keep, lengths, clip, LOW, HAS_MASK, HAS_LENGTHS,
                         HAS_CLIP, TF32, UPCAST, BLOCK_U, BLOCK_B, BLOCK_K)
        ok = _phase_end(counter, error, t, first, stop, SPIN)
        t += 1


@triton.jit
def _through(dh_n, d_next, w_hh, offsets, both_ok, unit0, unit_ok, rows, row_ok, H, K, t, keep, lengths,
             HAS_NEXT: tl.constexpr, HAS_MASK: tl.constexpr, HAS_LENGTHS: tl.constexpr, TF32: tl.constexpr,
             UPCAST: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """[BLOCK_U, BLOCK_B]: the gradient reaching h_t through h_{t+1} (both cells'
    backward): (sum_k d_next[b, k] W[k, u]) * keep[b, u] (d_next [B, K], K = G*H), or
    dh_n where there is no next step or it lies past the row's length."""
    dh_last = tl.load(dh_n + offsets, mask=both_ok, other=0.0).to(tl.float32)
    if HAS_NEXT:
        through = _product(w_hh, 1, H, d_next, unit0, H, rows, row_ok, K, keep, False, TF32, UPCAST, BLOCK_U,
                           BLOCK_B, BLOCK_K)
        if HAS_MASK:
            through = through * tl.load(keep + offsets, mask=both_ok, other=0.0)
        if HAS_LENGTHS:
            through = tl.where((t + 1 < tl.load(lengths + rows, mask=row_ok, other=0))[None, :], through, dh_last)
        return through
    else:
        return dh_last


@triton.jit
def _irnn_split_backward_step(dy_t, dh_n, dz_next, w_hh, y_t, out, low_out, unit0, row0, row1, H, t, keep, lengths,
                              clip, HAS_NEXT: tl.constexpr, FINAL: tl.constexpr, LOW: tl.constexpr,
                              HAS_MASK: tl.constexpr,
                              HAS_LENGTHS: tl.constexpr, HAS_CLIP: tl.constexpr, TF32: tl.constexpr,
                              UPCAST: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_B: tl.constexpr,
                              BLOCK_K: tl.constexpr):
    # Step t (t = -1 with FINAL): the gradient reaching h_t through h_{t+1} is
    # through[b, u] = (sum_k dz_next[b, k] W[k, u]) * keep[b, u], or dh_n[b, u] without HAS_NEXT or where
    # step t + 1 lies past the row's length (dL/dh_T passes the frozen steps unchanged);
    # out = dz_t = (dy_t + through) * relu'(h_t) (zero past the row's length), or with FINAL
    # out = dh_0 = through; with LOW, dz_t also goes to low_out in the weights' dtype, the copy
    # the next phase's product reads (it rounds its operand to that dtype anyway: the same bits,
    # half the exchange)
    units = unit0 + tl.arange(0, BLOCK_U)
    unit_ok = units < H
    for b0 in range(row0, row1, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        row_ok = rows < row1
        offsets = rows.to(tl.int64)[None, :] * H + units[:, None]
        both_ok = unit_ok[:, None] & row_ok[None, :]
        through = _through(dh_n, dz_next, w_hh, offsets, both_ok, unit0, unit_ok, rows, row_ok, H, H, t, keep,
                           lengths, HAS_NEXT, HAS_MASK, HAS_LENGTHS, TF32, UPCAST, BLOCK_U, BLOCK_B, BLOCK_K)
        if FINAL:
            tl.store(out + offsets, through, mask=both_ok)
        else:
            g = tl.load(dy_t + offsets, mask=both_ok, other=0.0).to(tl.float32) + through
            # relu' from the sign of h_t as y stores it (the inputs' dtype), as the other scans;
            # clipped, from h strictly inside (0, clip), clip rounded as the forward's store
            # rounded it (the interpreter's conversion truncates, a GPU's rounds to nearest)
            h = tl.load(y_t + offsets, mask=both_ok, other=0.0).to(tl.float32)
            passes = h > 0.0
            if HAS_CLIP:
                passes = passes & (h < (tl.zeros_like(h) + clip).to(y_t.dtype.element_ty).to(tl.float32))
            dz = tl.where(passes, g, 0.0)
            if HAS_LENGTHS:
                dz = tl.where((t < tl.load(lengths + rows, mask=row_ok, other=0))[None, :], dz, 0.0)
            tl.store(out + offsets, dz, mask=both_ok)
            if LOW:
                tl.store(low_out + offsets, _exchanged(dz, low_out, UPCAST), mask=both_ok)


@triton.jit(do_not_specialize=SIZES)
def irnn_split_backward_kernel(dy, dh_n, y, w_hh, dz, dh0, low, counter, error, T, B, H, R, first, stop, keep,
                               lengths, clip, LOW: tl.constexpr, HAS_MASK: tl.constexpr, HAS_LENGTHS: tl.constexpr,
                               HAS_CLIP: tl.constexpr, TF32: tl.constexpr, UPCAST: tl.constexpr,
                               BLOCK_U: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
                               SPIN: tl.constexpr):
    """The backward's phases [first, stop): phase i < T is step t = T - 1 - i, phase T
    the dh_0 pass; dz [T, B, H] float32; with LOW (bf16/fp16 weights), low [2, B, H] in
    the weights' dtype: phase i writes low[i % 2], which phase i + 1 multiplies."""
    unit0, row0, row1 = _share(B, R, BLOCK_U)
    BH = B.to(tl.int64) * H
    ok = True
    i = first
    if i == 0:  # step T - 1: no next step
        last = (T - 1).to(tl.int64)
        _irnn_split_backward_step(dy + last * BH, dh_n, dz, w_hh, y + last * BH, dz + last * BH, low, unit0, row0,
                                  row1, H, T - 1, keep, lengths, clip, False, False, LOW, HAS_MASK, HAS_LENGTHS,
                                  HAS_CLIP, TF32, UPCAST, BLOCK_U, BLOCK_B, BLOCK_K)
        ok = _phase_end(counter, error, 0, first, stop, SPIN)
        i = 1
    while (i < stop) & (i < T) & ok:
        t64 = (T - 1 - i).to(tl.int64)
        d_next = _pick(LOW, low + ((i + 1) % 2) * BH, dz + (t64 + 1) * BH)
        _irnn_split_backward_step(dy + t64 * BH, dh_n, d_next, w_hh, y + t64 * BH, dz + t64 * BH, low + (i % 2) * BH,
                                  unit0, row0, row1, H, T - 1 - i, keep, lengths, clip, True, False, LOW, HAS_MASK,
                                  HAS_LENGTHS, HAS_CLIP, TF32, UPCAST, BLOCK_U, BLOCK_B, BLOCK_K)
        ok = _phase_end(counter, error, i, first, stop, SPIN)
        i += 1
    if ok & (stop > T):  # the dh_0 pass
        d_next = _pick(LOW, low + ((T + 1) % 2) * BH, dz)
        _irnn_split_backward_step(dy, dh_n, d_next, w_hh, y, dh0, low, unit0, row0, row1, H, -1, keep, lengths, clip,
                                  True, True, LOW, HAS_MASK, HAS_LENGTHS, HAS_CLIP, TF32, UPCAST, BLOCK_U, BLOCK_B,
                                  BLOCK_K)


# ---- the LSTM: a program owns its units' four gate rows (i, f, g, o) ----

@triton.jit
def _lstm_split_step(gates_t, h_prev, low_prev, c_prev, w_hh, h_t, low_next, c_t, y_t, unit0, row0, row1, H, t, keep,
                     lengths, HAS_PREV: tl.constexpr, LOW: tl.constexpr, HAS_MASK: tl.constexpr,
                     HAS_LENGTHS: tl.constexpr, TF32: tl.constexpr, UPCAST: tl.constexpr, BLOCK_U: tl.constexpr,
                     BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    # gates_t [B, 4H]: x W_ih^T + b in, the activated gates out; h_prev, c_prev [B, H] float32
    # (unread without HAS_PREV: zeros); h_t, c_t [B, H] float32 and y_t [B, H] out. The mask
    # multiplies h_prev in the product; a row past its length keeps h and c and outputs 0. With
    # LOW, the product multiplies low_prev and h_t also goes to low_next (as the IRNN's step).
    units = unit0 + tl.arange(0, BLOCK_U)
    unit_ok = units < H
    for b0 in range(row0, row1, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        row_ok = rows < row1
        both_ok = unit_ok[:, None] & row_ok[None, :]
        offsets = rows.to(tl.int64)[None, :] * H + units[:, None]
        g_offsets = rows.to(tl.int64)[None, :] * (4 * H) + units[:, None]
        gi = tl.load(gates_t + g_offsets, mask=both_ok, other=0.0)
        gf = tl.load(gates_t + g_offsets + H, mask=both_ok, other=0.0)
        gg = tl.load(gates_t + g_offsets + 2 * H, mask=both_ok, other=0.0)
        go = tl.load(gates_t + g_offsets + 3 * H, mask=both_ok, other=0.0)
        c = tl.zeros((BLOCK_U, BLOCK_B), dtype=tl.float32)
        if HAS_PREV:
            p_i, p_f, p_g, p_o = _gate_products(w_hh, _pick(LOW, low_prev, h_prev), unit0, H, rows, row_ok, keep,
                                                HAS_MASK, TF32, UPCAST, BLOCK_U, BLOCK_B, BLOCK_K)
            gi, gf, gg, go = gi + p_i, gf + p_f, gg + p_g, go + p_o
            c = tl.load(c_prev + offsets, mask=both_ok, other=0.0)
        i, f, g, o = sigmoid(gi), sigmoid(gf), tanh(gg), sigmoid(go)
        c_new = f * c + i * g
        h = o * tanh(c_new)
        out = h
        if HAS_LENGTHS:
            active = (t < tl.load(lengths + rows, mask=row_ok, other=0))[None, :]
            h_kept = tl.zeros((BLOCK_U, BLOCK_B), dtype=tl.float32)
            if HAS_PREV:
                h_kept = tl.load(h_prev + offsets, mask=both_ok, other=0.0, cache_modifier=".cg")
            h = tl.where(active, h, h_kept)
            c_new = tl.where(active, c_new, c)
            out = tl.where(active, out, 0.0)
        tl.store(gates_t + g_offsets, i, mask=both_ok)
        tl.store(gates_t + g_offsets + H, f, mask=both_ok)
        tl.store(gates_t + g_offsets + 2 * H, g, mask=both_ok)
        tl.store(gates_t + g_offsets + 3 * H, o, mask=both_ok)
        tl.store(c_t + offsets, c_new, mask=both_ok)
        tl.store(h_t + offsets, h, mask=both_ok)
        if LOW:
            tl.store(low_next + offsets, _exchanged(h, low_next, UPCAST), mask=both_ok)
        tl.store(y_t + offsets, out.to(y_t.dtype.element_ty), mask=both_ok)


@triton.jit(do_not_specialize=SIZES)
def lstm_split_kernel(gates, h0, c0, w_hh, states, cells, y, low, counter, error, T, B, H, R, first, stop, keep,
                      lengths, HAS_STATE: tl.constexpr, LOW: tl.constexpr, HAS_MASK: tl.constexpr,
                      HAS_LENGTHS: tl.constexpr, TF32: tl.constexpr, UPCAST: tl.constexpr, BLOCK_U: tl.constexpr,
                      BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, SPIN: tl.constexpr):
    """The forward's steps [first, stop): gates [T, B, 4H] float32 (activated in place),
    states, cells [T, B, H] float32 (h_t is read back by every program at step t + 1, or
    with LOW its copy in low [2, B, H], as in irnn_split_kernel)."""
    unit0, row0, row1 = _share(B, R, BLOCK_U)
    BH = B.to(tl.int64) * H
    ok = True
    t = first
    if t == 0:
        _lstm_split_step(gates, h0, low + BH, c0, w_hh, states, low, cells, y, unit0, row0, row1, H, 0, keep, lengths,
                         HAS_STATE, LOW, HAS_MASK, HAS_LENGTHS, TF32, UPCAST, BLOCK_U, BLOCK_B, BLOCK_K)
        ok = _phase_end(counter, error, 0, first, stop, SPIN)
        t = 1
    while (t < stop) & ok:
        t64 = t.to(tl.int64)
        _lstm_split_step(gates + t64 * 4 * BH, states + (t64 - 1) * BH, low + ((t64 + 1) % 2) * BH,
                         cells + (t64 - 1) * BH, w_hh, states + t64 * BH, low + (t64 % 2) * BH, cells + t64 * BH,
                         y + t64 * BH, unit0, row0, row1, H, t, keep, lengths, True, LOW, HAS_MASK, HAS_LENGTHS, TF32,
                         UPCAST, BLOCK_U, BLOCK_B, BLOCK_K)
        ok = _phase_end(counter, error, t, first, stop, SPIN)
        t += 1


@triton.jit
def _lstm_split_backward_step(dy_t, dh_n, dgates_next, w_hh, gates_t, c_t, c_prev, dc, out, low_out, unit0, row0,
                              row1, H, t, keep, lengths, HAS_NEXT: tl.constexpr, FINAL: tl.constexpr,
                              LOW: tl.constexpr, HAS_MASK: tl.constexpr,
                              HAS_LENGTHS: tl.constexpr, TF32: tl.constexpr, UPCAST: tl.constexpr,
                              BLOCK_U: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    # c_prev: c_{t-1}, or c_0 (zeros when none was given) at t = 0
    # dh = dy_t + sum_j dgates_next[b, j] W[j, u] (dh_n without HAS_NEXT); with FINAL, out = dh_0 = that sum;
    # else out = dgates_t [B, 4H] from the cell's backward, and dc [B, H] (this program's units and rows
    # only) carries dL/dc from step t + 1 to step t; with LOW, dgates_t also goes to low_out [B, 4H] in the
    # weights' dtype (as in the IRNN's backward step)
    units = unit0 + tl.arange(0, BLOCK_U)
    unit_ok = units < H
    for b0 in range(row0, row1, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        row_ok = rows < row1
        both_ok = unit_ok[:, None] & row_ok[None, :]
        offsets = rows.to(tl.int64)[None, :] * H + units[:, None]
        g_offsets = rows.to(tl.int64)[None, :] * (4 * H) + units[:, None]
        through = _through(dh_n, dgates_next, w_hh, offsets, both_ok, unit0, unit_ok, rows, row_ok, H, 4 * H, t,
                           keep, lengths, HAS_NEXT, HAS_MASK, HAS_LENGTHS, TF32, UPCAST, BLOCK_U, BLOCK_B, BLOCK_K)
        if FINAL:
            tl.store(out + offsets, through, mask=both_ok)
        else:
            dh = tl.load(dy_t + offsets, mask=both_ok, other=0.0).to(tl.float32) + through
            i = tl.load(gates_t + g_offsets, mask=both_ok, other=0.0)
            f = tl.load(gates_t + g_offsets + H, mask=both_ok, other=0.0)
            g = tl.load(gates_t + g_offsets + 2 * H, mask=both_ok, other=0.0)
            o = tl.load(gates_t + g_offsets + 3 * H, mask=both_ok, other=0.0)
            c = tl.load(c_t + offsets, mask=both_ok, other=0.0)
            c_before = tl.load(c_prev + offsets, mask=both_ok, other=0.0)
            tanh_c = tanh(c)
            dc_in = tl.load(dc + offsets, mask=both_ok, other=0.0)
            d_c = dc_in + dh * o * (1.0 - tanh_c * tanh_c)
            di, df = d_c * g * i * (1.0 - i), d_c * c_before * f * (1.0 - f)
            dg, do = d_c * i * (1.0 - g * g), dh * tanh_c * o * (1.0 - o)
            dc_out = d_c * f
            if HAS_LENGTHS:  # past the row's length: no step, dL/dc passes through unchanged
                active = (t < tl.load(lengths + rows, mask=row_ok, other=0))[None, :]
                di, df = tl.where(active, di, 0.0), tl.where(active, df, 0.0)
                dg, do = tl.where(active, dg, 0.0), tl.where(active, do, 0.0)
                dc_out = tl.where(active, dc_out, dc_in)
            tl.store(out + g_offsets, di, mask=both_ok)
            tl.store(out + g_offsets + H, df, mask=both_ok)
            tl.store(out + g_offsets + 2 * H, dg, mask=both_ok)
            tl.store(out + g_offsets + 3 * H, do, mask=both_ok)
            tl.store(dc + offsets, dc_out, mask=both_ok)
            if LOW:
                tl.store(low_out + g_offsets, _exchanged(di, low_out, UPCAST), mask=both_ok)
                tl.store(low_out + g_offsets + H, _exchanged(df, low_out, UPCAST), mask=both_ok)
                tl.store(low_out + g_offsets + 2 * H, _exchanged(dg, low_out, UPCAST), mask=both_ok)
                tl.store(low_out + g_offsets + 3 * H, _exchanged(do, low_out, UPCAST), mask=both_ok)


@triton.jit(do_not_specialize=SIZES)
def lstm_split_backward_kernel(dy, dh_n, dgates, w_hh, gates, cells, c0, dc, dh0, low, counter, error, T, B, H, R,
                               first, stop, keep, lengths, LOW: tl.constexpr, HAS_MASK: tl.constexpr,
                               HAS_LENGTHS: tl.constexpr, TF32: tl.constexpr, UPCAST: tl.constexpr,
                               BLOCK_U: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
                               SPIN: tl.constexpr):
    """The backward's phases [first, stop) (as irnn_split_backward_kernel's): dgates [T,
    B, 4H]; c0 [B, H] float32 (zeros when none was given); low [2, B, 4H] with LOW."""
    unit0, row0, row1 = _share(B, R, BLOCK_U)
    BH = B.to(tl.int64) * H
    ok = True
    i = first
    if i == 0:  # step T - 1: no next step
        last = (T - 1).to(tl.int64)
        c_before = cells + (last - 1) * BH
        if last == 0:
            c_before = c0
        _lstm_split_backward_step(dy + last * BH, dh_n, dgates, w_hh, gates + last * 4 * BH, cells + last * BH,
                                  c_before, dc, dgates + last * 4 * BH, low, unit0, row0, row1, H, T - 1, keep,
                                  lengths, False, False, LOW, HAS_MASK, HAS_LENGTHS, TF32, UPCAST, BLOCK_U, BLOCK_B,
                                  BLOCK_K)
        ok = _phase_end(counter, error, 0, first, stop, SPIN)
        i = 1
    while (i < stop) & (i < T) & ok:
        t64 = (T - 1 - i).to(tl.int64)
        c_before = cells + (t64 - 1) * BH
        if t64 == 0:
            c_before = c0
        d_next = _pick(LOW, low + ((i + 1) % 2) * 4 * BH, dgates + (t64 + 1) * 4 * BH)
        _lstm_split_backward_step(dy + t64 * BH, dh_n, d_next, w_hh, gates + t64 * 4 * BH, cells + t64 * BH, c_before,
                                  dc, dgates + t64 * 4 * BH, low + (i % 2) * 4 * BH, unit0, row0, row1, H, T - 1 - i,
                                  keep, lengths, True, False, LOW, HAS_MASK, HAS_LENGTHS, TF32, UPCAST, BLOCK_U,
                                  BLOCK_B, BLOCK_K)
        ok = _phase_end(counter, error, i, first, stop, SPIN)
        i += 1
    if ok & (stop > T):  # the dh_0 pass
        d_next = _pick(LOW, low + ((T + 1) % 2) * 4 * BH, dgates)
        _lstm_split_backward_step(dy, dh_n, d_next, w_hh, gates, cells, c0, dc, dh0, low, unit0, row0, row1, H, -1,
                                  keep, lengths, True, True, LOW, HAS_MASK, HAS_LENGTHS, TF32, UPCAST, BLOCK_U,
                                  BLOCK_B, BLOCK_K)


# ---- the host side ----

class SplitConfig(NamedTuple):
    """A launch configuration of the split kernels: batch rows per tile, K chunk, warps.
    (The units per program, BLOCK_U, come from the plan.) One program per SM, so its
    register limit is the SM's register file over its threads."""
    block_b: int
    block_k: int
    num_warps: int

    def constexprs(self):
        return dict(BLOCK_B=self.block_b, BLOCK_K=self.block_k)

    @property
    def max_registers(self) -> int:
        return min(255, 65536 // (32 * self.num_warps))

    def __str__(self):
        return f"{self.block_b}x{self.block_k}/w{self.num_warps}"


# The candidates bench/triton_resources.py compiles (at every BLOCK_U of plan.py, sm_80
# and sm_90, with and without the options; the FMA tiles for IEEE float32 only,
# runs_on); those that never spill go to _configs.SPLIT, which dispatch tunes over. The
# first of for_rows(...) runs under the interpreter.
CANDIDATES = (
    SplitConfig(16, 32, 8),
    SplitConfig(16, 64, 8),
    SplitConfig(32, 32, 8),
    SplitConfig(16, 16, 8),
    # float32 FMAs only (runs_on): the tiles of plan.FMA_TILES, for groups of 1 row and of 2-8
    SplitConfig(1, 32, 8),
    SplitConfig(8, 32, 8),
)


def runs_on(kernel_variant: str, config: SplitConfig, block_u: int) -> bool:
    """Whether `config` at BLOCK_U = block_u is a candidate for `kernel_variant`
    (common.variant): tiles below tl.dot's 16 (BLOCK_U = 8, BLOCK_B = 1 or 8) run the
    product on float32 FMAs, a candidate for IEEE float32 only (plan.on_fma_variant)."""
    return not on_fma(block_u, config.block_b) or on_fma_variant(kernel_variant)


KERNELS = {"irnn_split_forward": irnn_split_kernel, "irnn_split_backward": irnn_split_backward_kernel,
           "lstm_split_forward": lstm_split_kernel, "lstm_split_backward": lstm_split_backward_kernel}


class BarrierTimeout(RuntimeError):
    """A persistent scan's grid barrier did not complete within SPIN_LIMIT polls."""


class TooManyPrograms(ValueError):
    """A persistent launch would need more programs than the GPU has SMs."""


def run(function, hidden: int, *args, **kwargs):
    """function(*args, persistent=..., programs=..., **kwargs) on the device of args[0]:
    on a GPU, a budget of one program per SM and the persistent driver, unless the plan
    needs more programs than SMs; if its grid barrier does not complete (another kernel
    holding SMs), the call runs again with the per-step driver, with a warning. Under
    the interpreter, the per-step driver. (`hidden` is W_hh's H, for the callers' sake.)"""
    device = args[0].device
    if device.type != "cuda" or interpreting():
        return function(*args, persistent=False, **kwargs)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    try:
        return function(*args, persistent=True, programs=sms, **kwargs)
    except TooManyPrograms:
        return function(*args, persistent=False, programs=sms, **kwargs)
    except BarrierTimeout as error:
        warnings.warn(f"{error}; running the step-by-step driver instead", RuntimeWarning, stacklevel=2)
        return function(*args, persistent=False, programs=sms, **kwargs)


def split_plan(name: str, hidden: int, batch: int, dtype: torch.dtype, allow_tf32: bool, options: bool,
               programs: Optional[int], persistent: bool = False, device: Optional[torch.device] = None) -> Plan:
    """plan.plan() of kernel `name` within a budget of `programs` (default: one per 16
    units), over the BLOCK_U values it has spill-free configs for. A persistent launch
    on a GPU of more programs than SMs is refused: they might not all be resident, and
    the barrier would wait for programs that cannot start."""
    budget = programs or max(1, triton.cdiv(hidden, 16))
    available = {u: configs(name, dtype, allow_tf32, options, u) for u in BLOCK_UNITS}
    block_units = tuple(u for u in BLOCK_UNITS if available[u])
    if not block_units:  # dispatch checks first (missing_configs)
        raise RuntimeError(f"{name} has no spill-free launch config for {dtype} weights")
    tiles = ({u: [c.block_b for c in available[u]] for u in block_units}
             if on_fma_variant(variant(dtype, allow_tf32, options)) else None)
    chosen = plan(hidden, batch, 4 if name.startswith("lstm") else 1, dtype.itemsize, budget, block_units,
                  backward=name.endswith("backward"), fma_tiles=tiles)
    if persistent and device is not None and device.type == "cuda" and not interpreting():
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        if chosen.programs > sms:
            raise TooManyPrograms(f"a persistent hidden-split scan of H = {hidden} needs {chosen.programs} programs, "
                             f"more than the {sms} SMs that can hold them at once; pass programs <= {sms} or "
                             f"persistent=False")
    return chosen


def configs(name: str, dtype: torch.dtype, allow_tf32: bool, options: bool, block_u: int) -> Tuple[SplitConfig, ...]:
    """The dispatchable configs of kernel `name` (a KERNELS key) at BLOCK_U = block_u:
    _configs.SPLIT's, the candidates that compile spill-free (bench/triton_resources.py)."""
    from ._configs import SPLIT
    return tuple(SplitConfig(*c) for c in SPLIT.get((name, variant(dtype, allow_tf32, options), block_u), ()))


def for_rows(candidates: Tuple[SplitConfig, ...], rows: int) -> Tuple[SplitConfig, ...]:
    """The candidates for groups of `rows` rows, the first one what the interpreter
    runs: a group that fits an FMA tile (plan.fma_tile; float32 has them) takes the
    configs of that tile first, then those of tl.dot's 16 rows or more, for the tuner
    to time against them; a larger group only the latter (all, if there are none)."""
    tile = fma_tile(rows, [c.block_b for c in candidates])
    dot = tuple(c for c in candidates if c.block_b >= MIN_DOT)
    if tile is None:
        return dot or candidates
    return tuple(c for c in candidates if c.block_b == tile) + dot


def missing_configs(cell: str, dtype: torch.dtype, allow_tf32: bool = False, options: bool = False) -> Optional[str]:
    """Why the split scans of `cell` cannot run `dtype` weights (None if they can): a
    kernel without a spill-free config at any BLOCK_U."""
    lacking = [d for d in ("forward", "backward")
               if not any(configs(f"{cell}_split_{d}", dtype, allow_tf32, options, u) for u in BLOCK_UNITS)]
    if not lacking:
        return None
    return (f"no launch config of the hidden-split {cell} {' and '.join(lacking)} scan compiles without register "
            f"spills for {variant(dtype, allow_tf32, options)} (see bench/triton_resources.py)")


class _Tuner:
    """The config of each (kernel, variant, H, BLOCK_U, candidates (an FMA tile's or
    tl.dot's), driver), timed on its first call on a GPU over the dispatchable ones (the key leaves out T and of the
    batch only whether a group fits an FMA tile (float32, at most 8 rows): a step costs
    the same whatever the batch's tail or the sequence's length, and re-tuning at every
    batch size would stall training for a benchmark each time). Buffers the kernel
    updates in place are restored before each trial and before the real run. `timer`
    replaces the CUDA-event timing (the tests run the trials under the interpreter)."""

    def __init__(self):
        self.chosen = {}
        self.timer = None

    def pick(self, key, candidates, launch, restore):
        if key in self.chosen:
            return self.chosen[key]
        if len(candidates) == 1 or (interpreting() and self.timer is None):
            return candidates[0]
        saved = [t.clone() for t in restore]
        timer = self.timer or _cuda_time
        times = []
        for config in candidates:
            def trial(config=config):
                for t, s in zip(restore, saved):
                    t.copy_(s)
                launch(config)
            times.append(timer(trial))
        for t, s in zip(restore, saved):
            t.copy_(s)
        self.chosen[key] = candidates[min(range(len(times)), key=times.__getitem__)]
        return self.chosen[key]


def _cuda_time(trial) -> float:
    trial()  # compiles
    best = float("inf")
    for _ in range(2):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        trial()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end))
    return best


TUNER = _Tuner()


def _check_barrier(error: Tensor) -> None:
    if int(error.item()):
        raise BarrierTimeout("fused_rnn: the hidden-split Triton scan's grid barrier did not complete "
                             "(programs not all resident)")


def _forward_exchange(w: Tensor, h_start: Tensor, full: Tensor, masked: bool) -> Tensor:
    """The forward's exchange buffer: for bf16/fp16 weights without a recurrent mask a
    [2, B, H] ping-pong in their dtype holding h_0 in [1] (rounded to nearest-even, as
    the product would); otherwise (float32, or a mask, which multiplies h in float32
    before the rounding) the float32 state buffer itself."""
    if w.dtype == torch.float32 or masked:
        return full
    low = torch.empty(2, *h_start.shape, dtype=w.dtype, device=w.device)
    low[1] = h_start
    return low


def _exchange(w: Tensor, batch: int, width: int, full: Tensor) -> Tensor:
    """The backward's exchange buffer: for bf16/fp16 weights a [2, B, width] ping-pong
    in their dtype (the product rounds its operand to it anyway, so the same bits at
    half the L2 traffic of float32); for float32 weights the float32 buffer itself."""
    if w.dtype == torch.float32:
        return full
    return torch.empty(2, batch, width, dtype=w.dtype, device=w.device)


def _with_options(flags) -> bool:
    return any(flags.get(f) for f in ("HAS_MASK", "HAS_LENGTHS", "HAS_CLIP"))


def _scan(name: str, phases: int, sizes, chosen: Plan, persistent: bool, tensors, options, flags,
          allow_tf32: bool, weight: Tensor, restore=()) -> None:
    """Runs kernel KERNELS[name] over `phases` phases: one launch of all (persistent) or
    one launch per phase; tensors/options: its arguments before the counter and after
    the sizes; restore: the buffers it updates in place (for the tuner's trials)."""
    kernel = KERNELS[name]
    every = configs(name, weight.dtype, allow_tf32, _with_options(flags), chosen.block_u)
    candidates = for_rows(every, chosen.rows)
    grid = (chosen.unit_blocks, chosen.groups)
    counter = torch.zeros(1, device=weight.device, dtype=torch.int32)
    error = torch.zeros(1, device=weight.device, dtype=torch.int32)
    if persistent:  # the barrier's int32 count reaches phases x programs: launches of at most MAX_ARRIVALS
        span = max(1, MAX_ARRIVALS // chosen.programs)
        windows = [(p, min(p + span, phases)) for p in range(0, phases, span)]
    else:
        windows = [(p, p + 1) for p in range(phases)]

    def launch(config: SplitConfig) -> None:
        """One run of the scan with `config`; raises BarrierTimeout if a barrier timed out."""
        error.zero_()
        for first, stop in windows:
            if persistent:
                counter.zero_()
            kernel[grid](*tensors, counter, error, *sizes, chosen.rows, first, stop, *options, **flags,
                         TF32=allow_tf32, UPCAST=upcast_dots(weight), BLOCK_U=chosen.block_u, SPIN=_spin_limit(),
                         **config.constexprs(), num_warps=config.num_warps, num_stages=NUM_STAGES,
                         maxnreg=config.max_registers)
        if persistent:
            _check_barrier(error)  # a timed-out trial ends the tuning too: run() falls back at once

    # the candidates stand for the group's tile class (an FMA tile or tl.dot's): they are what is timed
    key = (name, weight.dtype, allow_tf32, _with_options(flags), flags.get("LOW", False), sizes[2], chosen.block_u,
           candidates, persistent, weight.device)
    launch(TUNER.pick(key, candidates, launch, restore))


def irnn_split_forward(x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, bias: Optional[Tensor],
                       allow_tf32: bool = False, recurrent_mask: Optional[Tensor] = None,
                       lengths: Optional[Tensor] = None, hidden_clip: Optional[float] = None, persistent: bool = False,
                       programs: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """y [T, B, H] (x's dtype) and h_T [B, H] of the IRNN on x [T, B, I], h0 [B, H];
    recurrent_mask [B, H], lengths [B], hidden_clip as in fused_rnn.irnn.
    `programs`: the budget of programs (default: one per 16 units; plan.py shares the
    units and rows among them); `persistent`: one launch with grid barriers (a GPU
    with every program resident)."""
    check_dtype(x)
    steps, batch = x.shape[0], x.shape[1]
    hidden = w_hh.shape[1]
    pre = input_projection(x, w_ih, bias, torch.float32).contiguous()  # [T, B, H]
    w = w_hh.contiguous()
    y = torch.empty(steps, batch, hidden, device=x.device, dtype=x.dtype)
    state = torch.empty(2, batch, hidden, device=x.device, dtype=torch.float32)
    h_start = h0.float().contiguous()
    if steps == 0 or batch == 0 or hidden == 0:
        return y, h0.clone()
    options = ScanOptions.of(x, w, recurrent_mask, lengths, hidden_clip)
    chosen = split_plan("irnn_split_forward", hidden, batch, w.dtype, allow_tf32, _with_options(options.flags),
                        programs, persistent, w.device)
    low = _forward_exchange(w, h_start, state, options.flags["HAS_MASK"])
    _scan("irnn_split_forward", steps, (steps, batch, hidden), chosen, persistent, (pre, h_start, state, w, y, low),
          (options.keep, options.lengths, options.clip), dict(options.flags, LOW=low is not state), allow_tf32, w,
          restore=(low,) if low is not state else ())  # low[1] holds h_0 until step 1 overwrites it
    return y, state[(steps - 1) % 2].to(x.dtype, copy=True)


def irnn_split_backward(grad_y: Tensor, grad_h_n: Tensor, x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor,
                        y: Tensor, need_dx: bool = True, allow_tf32: bool = False,
                        recurrent_mask: Optional[Tensor] = None, lengths: Optional[Tensor] = None,
                        hidden_clip: Optional[float] = None, persistent: bool = False,
                        programs: Optional[int] = None):
    """Gradients of irnn_split_forward: (dx or None, dh0, dw_ih, dw_hh, dbias) in the
    inputs' dtype, computed in float32 (the weight gradients are GEMMs after the scan);
    the options as given to the forward."""
    check_dtype(x)
    steps, batch = x.shape[0], x.shape[1]
    hidden = w_hh.shape[1]
    if steps == 0 or batch == 0 or hidden == 0:
        return ((torch.zeros_like(x) if need_dx else None), grad_h_n.clone(), torch.zeros_like(w_ih),
                torch.zeros_like(w_hh), w_hh.new_zeros(hidden))
    dz = torch.empty(steps, batch, hidden, dtype=torch.float32, device=x.device)
    dh0 = torch.empty(batch, hidden, dtype=torch.float32, device=x.device)
    w, dy, dh_n, y = w_hh.contiguous(), grad_y.contiguous(), grad_h_n.contiguous(), y.contiguous()
    options = ScanOptions.of(x, w, recurrent_mask, lengths, hidden_clip)
    chosen = split_plan("irnn_split_backward", hidden, batch, w.dtype, allow_tf32, _with_options(options.flags),
                        programs, persistent, w.device)
    low = _exchange(w, batch, hidden, dz)
    _scan("irnn_split_backward", steps + 1, (steps, batch, hidden), chosen, persistent,
          (dy, dh_n, y, w, dz, dh0, low), (options.keep, options.lengths, options.clip),
          dict(options.flags, LOW=low is not dz), allow_tf32, w)
    dx, dw_ih, dw_hh, dbias = weight_grads(dz, x, h0, y, w_ih, need_dx, recurrent_mask, lengths)
    return dx, dh0.to(x.dtype), dw_ih, dw_hh, dbias


def lstm_split_forward(x: Tensor, h0: Optional[Tensor], c0: Optional[Tensor], w_ih: Tensor, w_hh: Tensor,
                       bias: Optional[Tensor], allow_tf32: bool = False, recurrent_mask: Optional[Tensor] = None,
                       lengths: Optional[Tensor] = None, persistent: bool = False, programs: Optional[int] = None):
    """As lstm.lstm_scan_forward (y, h_T, c_T in x's dtype; cells [T, B, H] and the
    activated gates [T, B, 4H] in float32), with the hidden units split across
    programs; the options as in fused_rnn.lstm; `persistent` and `programs` as in
    irnn_split_forward."""
    check_dtype(x)
    steps, batch = x.shape[0], x.shape[1]
    hidden = w_hh.shape[1]
    w = w_hh.contiguous()
    gates = input_projection(x.contiguous(), w_ih, bias, torch.float32).contiguous()
    states = torch.empty(steps, batch, hidden, dtype=torch.float32, device=x.device)
    cells = torch.empty_like(states)
    y = torch.empty(steps, batch, hidden, dtype=x.dtype, device=x.device)
    has_state = h0 is not None or c0 is not None
    h_start = (h0 if h0 is not None else x.new_zeros(batch, hidden)).float().contiguous()
    c_start = (c0 if c0 is not None else x.new_zeros(batch, hidden)).float().contiguous()
    if steps == 0 or batch == 0 or hidden == 0:
        return y, h_start.to(x.dtype, copy=True), c_start.to(x.dtype, copy=True), cells, gates
    options = ScanOptions.of(x, w, recurrent_mask, lengths)
    flags = dict(HAS_STATE=has_state, HAS_MASK=options.flags["HAS_MASK"], HAS_LENGTHS=options.flags["HAS_LENGTHS"])
    chosen = split_plan("lstm_split_forward", hidden, batch, w.dtype, allow_tf32, _with_options(flags), programs,
                        persistent, w.device)
    low = _forward_exchange(w, h_start, states, options.flags["HAS_MASK"])
    _scan("lstm_split_forward", steps, (steps, batch, hidden), chosen, persistent,
          (gates, h_start, c_start, w, states, cells, y, low), (options.keep, options.lengths),
          dict(flags, LOW=low is not states), allow_tf32, w, restore=(gates, low) if low is not states else (gates,))
    # copies: an op's outputs may not alias one another (cells is returned whole)
    return y, states[-1].to(x.dtype, copy=True), cells[-1].to(x.dtype, copy=True), cells, gates


def lstm_split_backward(grad_y: Tensor, grad_h_n: Tensor, grad_c_n: Tensor, x: Tensor, h0: Optional[Tensor],
                        c0: Optional[Tensor], w_ih: Tensor, w_hh: Tensor, y: Tensor, cells: Tensor, gates: Tensor,
                        need_dx: bool = True, allow_tf32: bool = False, recurrent_mask: Optional[Tensor] = None,
                        lengths: Optional[Tensor] = None, persistent: bool = False, programs: Optional[int] = None):
    """Gradients of lstm_split_forward: (dx or None, dh0, dc0, dw_ih, dw_hh, dbias); the
    options as given to the forward."""
    check_dtype(x)
    steps, batch = x.shape[0], x.shape[1]
    hidden = w_hh.shape[1]
    if steps == 0 or batch == 0 or hidden == 0:
        return ((torch.zeros_like(x) if need_dx else None), grad_h_n.clone(), grad_c_n.clone(),
                torch.zeros_like(w_ih), torch.zeros_like(w_hh), w_hh.new_zeros(4 * hidden))
    dgates = torch.empty(steps, batch, 4 * hidden, dtype=torch.float32, device=x.device)
    dc = grad_c_n.to(torch.float32, copy=True).contiguous()  # dc_T in, dc_0 out
    dh0 = torch.empty(batch, hidden, dtype=torch.float32, device=x.device)
    w, dy, dh_n = w_hh.contiguous(), grad_y.contiguous(), grad_h_n.contiguous()
    gates, cells = gates.contiguous(), cells.contiguous()
    c_start = (c0 if c0 is not None else x.new_zeros(batch, hidden)).float().contiguous()
    options = ScanOptions.of(x, w, recurrent_mask, lengths)
    flags = dict(HAS_MASK=options.flags["HAS_MASK"], HAS_LENGTHS=options.flags["HAS_LENGTHS"])
    chosen = split_plan("lstm_split_backward", hidden, batch, w.dtype, allow_tf32, _with_options(flags), programs,
                        persistent, w.device)
    low = _exchange(w, batch, 4 * hidden, dgates)
    _scan("lstm_split_backward", steps + 1, (steps, batch, hidden), chosen, persistent,
          (dy, dh_n, dgates, w, gates, cells, c_start, dc, dh0, low), (options.keep, options.lengths),
          dict(flags, LOW=low is not dgates), allow_tf32, w, restore=(dc,))
    dx, dw_ih, dw_hh, dbias = weight_grads(dgates, x, h0, y, w_ih, need_dx, recurrent_mask, lengths)
    return dx, dh0.to(x.dtype), dc.to(x.dtype), dw_ih, dw_hh, dbias
