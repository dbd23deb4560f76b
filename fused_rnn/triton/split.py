"""Hidden-split Triton scans (issue 14, in progress): the IRNN and the LSTM, every option.

The batch-tiled scans of irnn.py / lstm.py give each program BLOCK_B batch rows and all
H units: at small batch one SM runs the whole recurrence and re-reads all of W_hh every
step. Here the hidden units are split across programs instead: program p owns units
[p * BLOCK_U, (p + 1) * BLOCK_U) for every batch row, so the GPU reads W_hh once per
step in total, spread over all SMs. The product puts the program's W_hh rows on the M
side of ``tl.dot`` and the batch on the N side (padded to BLOCK_B >= 16), so bf16/fp16
weights run on the tensor cores even at B = 1; float32 stays IEEE unless TF32.

One step body, two drivers:

- per step (:func:`irnn_split_forward` with ``persistent=False``): one launch per time
  step, the host looping over t. The launch boundary orders the steps. This is what
  the Triton interpreter runs (it executes a grid's programs one after another, so a
  grid barrier there would wait forever) and what dispatch will use where residency of
  every program cannot be guaranteed;
- persistent (``persistent=True``): all T steps in one launch, the programs meeting at
  a grid barrier after each step: an arrival counter incremented with release
  semantics at GPU scope, polled with acquire semantics, and the exchanged state read
  with the L2-only cache modifier (``.cg``), never the non-coherent read-only path. The
  poll is bounded: a barrier that does not complete within SPIN_LIMIT polls sets an
  error flag and the kernel exits, and the host raises (dispatch will fall back to the
  next backend) instead of hanging. It needs every program resident at once: P at most
  the number of SMs (one program per SM; :func:`run` chooses P so, and the scans refuse
  a persistent launch of more programs than SMs).

The state is float32 [2, B, H] (ping-pong between steps), whatever the inputs' dtype;
y is stored in the inputs' dtype. Offsets are int64.
"""

import warnings
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._host import input_projection, weight_grads
from . import interpreting
from .common import SIZE_ARGUMENTS, ScanOptions, check_dtype, sigmoid, state_operand, tanh, upcast_dots

# Software pipelining (num_stages >= 2) turns the state's ld.global.cg into an L1-caching
# cp.async.ca in Triton 3.8 (tests/test_triton_split.py reads the PTX): the persistent
# kernel is compiled unpipelined until the K loop loads W_hh and the state separately.
NUM_STAGES = 1
# 8 warps, and a register limit of 128 a thread (one program per SM: occupancy is no
# concern): left to itself ptxas held the LSTM forward with options to 80 registers
# and spilled (tests/test_triton_split.py checks every persistent kernel for spills).
NUM_WARPS = 8
MAX_REGISTERS = 128

# A barrier poll costs ~1 us of L2 round trip: 2^26 polls is about a minute, far beyond
# any healthy step, short of a hang. Under the interpreter (one program: its own arrival
# completes the barrier) a barrier that waits at all is a bug: it fails at once.
SPIN_LIMIT = 1 << 26


def _spin_limit() -> int:
    return 1 if interpreting() else SPIN_LIMIT


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


@triton.jit
def _product(w, unit_stride, k_stride, src, units, unit_ok, rows, row_ok, K, keep, HAS_MASK: tl.constexpr,
             TF32: tl.constexpr, UPCAST: tl.constexpr, CACHE: tl.constexpr, BLOCK_U: tl.constexpr,
             BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc[u, b] = sum_k w[u * unit_stride + k * k_stride] * src[b * K + k] (* keep[b * K
    + k] with HAS_MASK) over k < K, [BLOCK_U, BLOCK_B] float32: the forward reads W_hh's
    rows (unit_stride H, k_stride 1), the backward its columns (1, H). src is the state
    the other programs wrote in the last step, read with the CACHE modifier."""
    acc = tl.zeros((BLOCK_U, BLOCK_B), dtype=tl.float32)
    w_units = units.to(tl.int64)[:, None] * unit_stride
    src_rows = rows.to(tl.int64)[None, :] * K
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        tile = tl.load(w + w_units + ks.to(tl.int64)[None, :] * k_stride, mask=unit_ok[:, None] & k_ok[None, :],
                       other=0.0)
        state = tl.load(src + src_rows + ks[:, None], mask=k_ok[:, None] & row_ok[None, :], other=0.0,
                        cache_modifier=CACHE)
        if HAS_MASK:
            state = state * tl.load(keep + src_rows + ks[:, None], mask=k_ok[:, None] & row_ok[None, :], other=0.0)
        acc += dot_weight_state(tile, state, TF32, UPCAST)
    return acc


@triton.jit
def _irnn_split_step(pre_t, prev, nxt, w_hh, y_t, pid, B, H, t, keep, lengths, clip, HAS_PREV: tl.constexpr,
                     HAS_MASK: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_CLIP: tl.constexpr,
                     TF32: tl.constexpr, UPCAST: tl.constexpr, CACHE: tl.constexpr, BLOCK_U: tl.constexpr,
                     BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    # nxt[b, u] = relu(pre_t[b, u] + sum_k W[u, k] (prev * keep)[b, k]) (at most clip) and y_t[b, u]
    # = the same in y's dtype, for this program's units u and every batch row b; pre_t, y_t, prev,
    # nxt: [B, H]. A row past its length (t >= lengths[b]) keeps prev and outputs 0.
    units = pid * BLOCK_U + tl.arange(0, BLOCK_U)
    unit_ok = units < H
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        row_ok = rows < B
        offsets = rows.to(tl.int64)[None, :] * H + units[:, None]  # [BU, BB]: element (u, b) of a [B, H] buffer
        both_ok = unit_ok[:, None] & row_ok[None, :]
        z = tl.load(pre_t + offsets, mask=both_ok, other=0.0)
        if HAS_PREV:
            z += _product(w_hh, H, 1, prev, units, unit_ok, rows, row_ok, H, keep, HAS_MASK, TF32, UPCAST, CACHE,
                          BLOCK_U, BLOCK_B, BLOCK_K)
        h_new = tl.where(z < 0.0, 0.0, z)  # NaN < 0 is false: NaN propagates, as in torch.relu
        if HAS_CLIP:
            h_new = tl.where(h_new > clip, clip, h_new)
        out = h_new
        if HAS_LENGTHS:
            active = (t < tl.load(lengths + rows, mask=row_ok, other=0))[None, :]
            kept = tl.zeros((BLOCK_U, BLOCK_B), dtype=tl.float32)
            if HAS_PREV:
                kept = tl.load(prev + offsets, mask=both_ok, other=0.0, cache_modifier=CACHE)
            h_new = tl.where(active, h_new, kept)
            out = tl.where(active, out, 0.0)
        tl.store(nxt + offsets, h_new, mask=both_ok)
        tl.store(y_t + offsets, out.to(y_t.dtype.element_ty), mask=both_ok)


@triton.jit
def _through(dh_n, d_next, w_hh, offsets, both_ok, units, unit_ok, rows, row_ok, H, K, t, keep, lengths,
             HAS_NEXT: tl.constexpr, HAS_MASK: tl.constexpr, HAS_LENGTHS: tl.constexpr, TF32: tl.constexpr,
             UPCAST: tl.constexpr, CACHE: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_B: tl.constexpr,
             BLOCK_K: tl.constexpr):
    """[BLOCK_U, BLOCK_B]: the gradient reaching h_t through h_{t+1} (both cells'
    backward): (sum_k d_next[b, k] W[k, u]) * keep[b, u] (d_next [B, K], K = G*H), or
    dh_n where there is no next step or it lies past the row's length."""
    dh_last = tl.load(dh_n + offsets, mask=both_ok, other=0.0).to(tl.float32)
    if HAS_NEXT:
        through = _product(w_hh, 1, H, d_next, units, unit_ok, rows, row_ok, K, keep, False, TF32, UPCAST, CACHE,
                           BLOCK_U, BLOCK_B, BLOCK_K)
        if HAS_MASK:
            through = through * tl.load(keep + offsets, mask=both_ok, other=0.0)
        if HAS_LENGTHS:
            through = tl.where((t + 1 < tl.load(lengths + rows, mask=row_ok, other=0))[None, :], through, dh_last)
        return through
    else:
        return dh_last


@triton.jit
def _irnn_split_backward_step(dy_t, dh_n, dz_next, w_hh, y_t, out, pid, B, H, t, keep, lengths, clip,
                              HAS_NEXT: tl.constexpr, FINAL: tl.constexpr, HAS_MASK: tl.constexpr,
                              HAS_LENGTHS: tl.constexpr, HAS_CLIP: tl.constexpr, TF32: tl.constexpr,
                              UPCAST: tl.constexpr, CACHE: tl.constexpr, BLOCK_U: tl.constexpr,
                              BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    # Step t (t = -1 with FINAL): the gradient reaching h_t through h_{t+1} is
    # through[b, u] = (sum_k dz_next[b, k] W[k, u]) * keep[b, u], or dh_n[b, u] without HAS_NEXT or where
    # step t + 1 lies past the row's length (dL/dh_T passes the frozen steps unchanged);
    # out = dz_t = (dy_t + through) * relu'(h_t) (zero past the row's length), or with FINAL
    # out = dh_0 = through
    units = pid * BLOCK_U + tl.arange(0, BLOCK_U)
    unit_ok = units < H
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        row_ok = rows < B
        offsets = rows.to(tl.int64)[None, :] * H + units[:, None]
        both_ok = unit_ok[:, None] & row_ok[None, :]
        through = _through(dh_n, dz_next, w_hh, offsets, both_ok, units, unit_ok, rows, row_ok, H, H, t, keep,
                           lengths, HAS_NEXT, HAS_MASK, HAS_LENGTHS, TF32, UPCAST, CACHE, BLOCK_U, BLOCK_B, BLOCK_K)
        if FINAL:
            tl.store(out + offsets, through, mask=both_ok)
        else:
            g = tl.load(dy_t + offsets, mask=both_ok, other=0.0).to(tl.float32) + through
            # relu' from the sign of h_t as y stores it (the inputs' dtype), as the other scans;
            # clipped, from h strictly inside (0, clip) (clip as y's dtype rounds it)
            h = tl.load(y_t + offsets, mask=both_ok, other=0.0).to(tl.float32)
            passes = h > 0.0
            if HAS_CLIP:
                passes = passes & (h < clip)
            dz = tl.where(passes, g, 0.0)
            if HAS_LENGTHS:
                dz = tl.where((t < tl.load(lengths + rows, mask=row_ok, other=0))[None, :], dz, 0.0)
            tl.store(out + offsets, dz, mask=both_ok)


@triton.jit(do_not_specialize=("B", "H", "t"))
def irnn_split_step_kernel(pre_t, prev, nxt, w_hh, y_t, B, H, t, keep, lengths, clip, HAS_PREV: tl.constexpr,
                           HAS_MASK: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_CLIP: tl.constexpr,
                           TF32: tl.constexpr, UPCAST: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_B: tl.constexpr,
                           BLOCK_K: tl.constexpr):
    """One step, one launch (the per-step driver)."""
    _irnn_split_step(pre_t, prev, nxt, w_hh, y_t, tl.program_id(0), B, H, t, keep, lengths, clip, HAS_PREV, HAS_MASK,
                     HAS_LENGTHS, HAS_CLIP, TF32, UPCAST, "", BLOCK_U, BLOCK_B, BLOCK_K)


@triton.jit(do_not_specialize=("B", "H", "t"))
def irnn_split_backward_step_kernel(dy_t, dh_n, dz_next, w_hh, y_t, out, B, H, t, keep, lengths, clip,
                                    HAS_NEXT: tl.constexpr, FINAL: tl.constexpr, HAS_MASK: tl.constexpr,
                                    HAS_LENGTHS: tl.constexpr, HAS_CLIP: tl.constexpr, TF32: tl.constexpr,
                                    UPCAST: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_B: tl.constexpr,
                                    BLOCK_K: tl.constexpr):
    """One backward step, one launch (the per-step driver)."""
    _irnn_split_backward_step(dy_t, dh_n, dz_next, w_hh, y_t, out, tl.program_id(0), B, H, t, keep, lengths, clip,
                              HAS_NEXT, FINAL, HAS_MASK, HAS_LENGTHS, HAS_CLIP, TF32, UPCAST, "", BLOCK_U, BLOCK_B,
                              BLOCK_K)


@triton.jit
def _grid_barrier(counter, target, error, SPIN: tl.constexpr):
    """Waits until `target` arrivals have been counted (this program's included), at
    most SPIN polls; returns whether the barrier completed (else sets *error)."""
    tl.debug_barrier()  # every warp of the program has stored its part of the step
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


@triton.jit(do_not_specialize=SIZE_ARGUMENTS)
def irnn_split_persistent_kernel(pre, h0, state, w_hh, y, counter, error, T, B, H, keep, lengths, clip,
                                 HAS_MASK: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_CLIP: tl.constexpr,
                                 TF32: tl.constexpr, UPCAST: tl.constexpr, BLOCK_U: tl.constexpr,
                                 BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, SPIN: tl.constexpr):
    """All T steps in one launch (the persistent driver): state [2, B, H] float32."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    BH = B.to(tl.int64) * H
    ok = True
    t = 0
    while (t < T) & ok:
        t64 = t.to(tl.int64)
        prev = state + ((t64 + 1) % 2) * BH
        if t == 0:
            prev = h0
        _irnn_split_step(pre + t64 * BH, prev, state + (t64 % 2) * BH, w_hh, y + t64 * BH, pid, B, H, t, keep,
                         lengths, clip, True, HAS_MASK, HAS_LENGTHS, HAS_CLIP, TF32, UPCAST, ".cg", BLOCK_U,
                         BLOCK_B, BLOCK_K)
        ok = _grid_barrier(counter, (t + 1) * programs, error, SPIN)
        t += 1


@triton.jit(do_not_specialize=SIZE_ARGUMENTS)
def irnn_split_persistent_backward_kernel(dy, dh_n, y, w_hh, dz, dh0, counter, error, T, B, H, keep, lengths, clip,
                                          HAS_MASK: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_CLIP: tl.constexpr,
                                          TF32: tl.constexpr, UPCAST: tl.constexpr, BLOCK_U: tl.constexpr,
                                          BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, SPIN: tl.constexpr):
    """The backward's T steps and the dh_0 pass in one launch: dz [T, B, H] float32."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    BH = B.to(tl.int64) * H
    last = (T - 1).to(tl.int64)
    _irnn_split_backward_step(dy + last * BH, dh_n, dz, w_hh, y + last * BH, dz + last * BH, pid, B, H, T - 1, keep,
                              lengths, clip, False, False, HAS_MASK, HAS_LENGTHS, HAS_CLIP, TF32, UPCAST, ".cg",
                              BLOCK_U, BLOCK_B, BLOCK_K)
    ok = _grid_barrier(counter, programs, error, SPIN)
    i = 1
    while (i < T) & ok:
        t = T - 1 - i
        t64 = t.to(tl.int64)
        _irnn_split_backward_step(dy + t64 * BH, dh_n, dz + (t64 + 1) * BH, w_hh, y + t64 * BH, dz + t64 * BH, pid, B,
                                  H, t, keep, lengths, clip, True, False, HAS_MASK, HAS_LENGTHS, HAS_CLIP, TF32,
                                  UPCAST, ".cg", BLOCK_U, BLOCK_B, BLOCK_K)
        ok = _grid_barrier(counter, (i + 1) * programs, error, SPIN)
        i += 1
    if ok:
        _irnn_split_backward_step(dy, dh_n, dz, w_hh, y, dh0, pid, B, H, -1, keep, lengths, clip, True, True, HAS_MASK,
                                  HAS_LENGTHS, HAS_CLIP, TF32, UPCAST, ".cg", BLOCK_U, BLOCK_B, BLOCK_K)


def run(function, hidden: int, *args, **kwargs):
    """function(*args, persistent=..., programs=..., **kwargs) for a layer of `hidden`
    units on the device of args[0]: on a GPU at most one program per SM and the
    persistent driver, unless more programs than SMs are needed; if its grid barrier
    does not complete (another kernel holding SMs), the call runs again with the
    per-step driver, with a warning. Under the interpreter, the per-step driver."""
    device = args[0].device
    if device.type != "cuda" or interpreting():
        return function(*args, persistent=False, **kwargs)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    if _block_sizes(hidden, sms)[1] > sms:
        return function(*args, persistent=False, programs=sms, **kwargs)
    try:
        return function(*args, persistent=True, programs=sms, **kwargs)
    except BarrierTimeout as error:
        warnings.warn(f"{error}; running the step-by-step driver instead", RuntimeWarning, stacklevel=2)
        return function(*args, persistent=False, programs=sms, **kwargs)


class BarrierTimeout(RuntimeError):
    """A persistent scan's grid barrier did not complete within SPIN_LIMIT polls."""


def _check_barrier(error: Tensor) -> None:
    if int(error.item()):
        raise BarrierTimeout("fused_rnn: the hidden-split Triton scan's grid barrier did not complete "
                             "(programs not all resident)")


def _block_sizes(hidden: int, programs: Optional[int], persistent: bool = False,
                 device: Optional[torch.device] = None) -> Tuple[int, int]:
    """(BLOCK_U, number of programs): the units split over about `programs` programs,
    in tiles of 16 (tl.dot's minimum), at most 64 units a program. A persistent launch
    on a GPU of more programs than SMs is refused: they might not all be resident, and
    the barrier would wait for programs that cannot start."""
    programs = programs or max(1, triton.cdiv(hidden, 16))
    block_u = min(64, max(16, triton.next_power_of_2(triton.cdiv(hidden, programs))))
    grid = triton.cdiv(hidden, block_u)
    if persistent and device is not None and device.type == "cuda" and not interpreting():
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        if grid > sms:
            raise ValueError(f"a persistent hidden-split scan of H = {hidden} needs {grid} programs, more than the "
                             f"{sms} SMs that can hold them at once; pass programs <= {sms} or persistent=False")
    return block_u, grid


def irnn_split_forward(x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, bias: Optional[Tensor],
                       allow_tf32: bool = False, recurrent_mask: Optional[Tensor] = None,
                       lengths: Optional[Tensor] = None, hidden_clip: Optional[float] = None, persistent: bool = False,
                       programs: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """y [T, B, H] (x's dtype) and h_T [B, H] of the IRNN on x [T, B, I], h0 [B, H];
    recurrent_mask [B, H], lengths [B], hidden_clip as in fused_rnn.irnn.
    `programs`: about how many programs share the units (default: one per 16 units);
    `persistent`: one launch with grid barriers (a GPU with every program resident)."""
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
    block_u, grid = _block_sizes(hidden, programs, persistent, x.device)
    meta = dict(TF32=allow_tf32, UPCAST=upcast_dots(w), BLOCK_U=block_u, BLOCK_B=16, BLOCK_K=16,
                num_warps=NUM_WARPS, maxnreg=MAX_REGISTERS)
    options = ScanOptions.of(x, w, recurrent_mask, lengths, hidden_clip)
    opts = (options.keep, options.lengths, options.clip)
    if persistent:
        counter = torch.zeros(1, device=x.device, dtype=torch.int32)
        error = torch.zeros(1, device=x.device, dtype=torch.int32)
        irnn_split_persistent_kernel[(grid,)](pre, h_start, state, w, y, counter, error, steps, batch, hidden, *opts,
                                              SPIN=_spin_limit(), num_stages=NUM_STAGES, **options.flags, **meta)
        _check_barrier(error)
    else:
        for t in range(steps):
            prev = h_start if t == 0 else state[(t - 1) % 2]
            irnn_split_step_kernel[(grid,)](pre[t], prev, state[t % 2], w, y[t], batch, hidden, t, *opts,
                                            HAS_PREV=True, **options.flags, **meta)
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
    block_u, grid = _block_sizes(hidden, programs, persistent, x.device)
    meta = dict(TF32=allow_tf32, UPCAST=upcast_dots(w), BLOCK_U=block_u, BLOCK_B=16, BLOCK_K=16,
                num_warps=NUM_WARPS, maxnreg=MAX_REGISTERS)
    if hidden_clip is not None:  # y holds h in x's dtype: compare it with the bound as y stores it
        hidden_clip = float(torch.tensor(hidden_clip, dtype=x.dtype))
    options = ScanOptions.of(x, w, recurrent_mask, lengths, hidden_clip)
    opts = (options.keep, options.lengths, options.clip)
    if persistent:
        counter = torch.zeros(1, device=x.device, dtype=torch.int32)
        error = torch.zeros(1, device=x.device, dtype=torch.int32)
        irnn_split_persistent_backward_kernel[(grid,)](dy, dh_n, y, w, dz, dh0, counter, error, steps, batch, hidden,
                                                       *opts, SPIN=_spin_limit(), num_stages=NUM_STAGES,
                                                       **options.flags, **meta)
        _check_barrier(error)
    else:
        for t in reversed(range(steps)):
            last = t == steps - 1
            irnn_split_backward_step_kernel[(grid,)](dy[t], dh_n, dz[min(t + 1, steps - 1)], w, y[t], dz[t], batch,
                                                     hidden, t, *opts, HAS_NEXT=not last, FINAL=False,
                                                     **options.flags, **meta)
        irnn_split_backward_step_kernel[(grid,)](dy[0], dh_n, dz[0], w, y[0], dh0, batch, hidden, -1, *opts,
                                                 HAS_NEXT=True, FINAL=True, **options.flags, **meta)
    dx, dw_ih, dw_hh, dbias = weight_grads(dz, x, h0, y, w_ih, need_dx, recurrent_mask)
    return dx, dh0.to(x.dtype), dw_ih, dw_hh, dbias


# ---- the LSTM: a program owns its units' four gate rows (i, f, g, o) ----

@triton.jit
def _lstm_split_step(gates_t, h_prev, c_prev, w_hh, h_t, c_t, y_t, pid, B, H, t, keep, lengths,
                     HAS_PREV: tl.constexpr, HAS_MASK: tl.constexpr, HAS_LENGTHS: tl.constexpr, TF32: tl.constexpr,
                     UPCAST: tl.constexpr, CACHE: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_B: tl.constexpr,
                     BLOCK_K: tl.constexpr):
    # gates_t [B, 4H]: x W_ih^T + b in, the activated gates out; h_prev, c_prev [B, H] float32
    # (unread without HAS_PREV: zeros); h_t, c_t [B, H] float32 and y_t [B, H] out. The mask
    # multiplies h_prev in the product; a row past its length keeps h and c and outputs 0.
    units = pid * BLOCK_U + tl.arange(0, BLOCK_U)
    unit_ok = units < H
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        row_ok = rows < B
        both_ok = unit_ok[:, None] & row_ok[None, :]
        offsets = rows.to(tl.int64)[None, :] * H + units[:, None]
        g_offsets = rows.to(tl.int64)[None, :] * (4 * H) + units[:, None]
        gi = tl.load(gates_t + g_offsets, mask=both_ok, other=0.0)
        gf = tl.load(gates_t + g_offsets + H, mask=both_ok, other=0.0)
        gg = tl.load(gates_t + g_offsets + 2 * H, mask=both_ok, other=0.0)
        go = tl.load(gates_t + g_offsets + 3 * H, mask=both_ok, other=0.0)
        c = tl.zeros((BLOCK_U, BLOCK_B), dtype=tl.float32)
        if HAS_PREV:
            HH = H.to(tl.int64) * H
            gi += _product(w_hh, H, 1, h_prev, units, unit_ok, rows, row_ok, H, keep, HAS_MASK, TF32, UPCAST,
                           CACHE, BLOCK_U, BLOCK_B, BLOCK_K)
            gf += _product(w_hh + HH, H, 1, h_prev, units, unit_ok, rows, row_ok, H, keep, HAS_MASK, TF32, UPCAST,
                           CACHE, BLOCK_U, BLOCK_B, BLOCK_K)
            gg += _product(w_hh + 2 * HH, H, 1, h_prev, units, unit_ok, rows, row_ok, H, keep, HAS_MASK, TF32,
                           UPCAST, CACHE, BLOCK_U, BLOCK_B, BLOCK_K)
            go += _product(w_hh + 3 * HH, H, 1, h_prev, units, unit_ok, rows, row_ok, H, keep, HAS_MASK, TF32,
                           UPCAST, CACHE, BLOCK_U, BLOCK_B, BLOCK_K)
            c = tl.load(c_prev + offsets, mask=both_ok, other=0.0)
        i, f, g, o = sigmoid(gi), sigmoid(gf), tanh(gg), sigmoid(go)
        c_new = f * c + i * g
        h = o * tanh(c_new)
        out = h
        if HAS_LENGTHS:
            active = (t < tl.load(lengths + rows, mask=row_ok, other=0))[None, :]
            h_kept = tl.zeros((BLOCK_U, BLOCK_B), dtype=tl.float32)
            if HAS_PREV:
                h_kept = tl.load(h_prev + offsets, mask=both_ok, other=0.0, cache_modifier=CACHE)
            h = tl.where(active, h, h_kept)
            c_new = tl.where(active, c_new, c)
            out = tl.where(active, out, 0.0)
        tl.store(gates_t + g_offsets, i, mask=both_ok)
        tl.store(gates_t + g_offsets + H, f, mask=both_ok)
        tl.store(gates_t + g_offsets + 2 * H, g, mask=both_ok)
        tl.store(gates_t + g_offsets + 3 * H, o, mask=both_ok)
        tl.store(c_t + offsets, c_new, mask=both_ok)
        tl.store(h_t + offsets, h, mask=both_ok)
        tl.store(y_t + offsets, out.to(y_t.dtype.element_ty), mask=both_ok)


@triton.jit(do_not_specialize=("B", "H", "t"))
def lstm_split_step_kernel(gates_t, h_prev, c_prev, w_hh, h_t, c_t, y_t, B, H, t, keep, lengths,
                           HAS_PREV: tl.constexpr, HAS_MASK: tl.constexpr, HAS_LENGTHS: tl.constexpr,
                           TF32: tl.constexpr, UPCAST: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_B: tl.constexpr,
                           BLOCK_K: tl.constexpr):
    _lstm_split_step(gates_t, h_prev, c_prev, w_hh, h_t, c_t, y_t, tl.program_id(0), B, H, t, keep, lengths, HAS_PREV,
                     HAS_MASK, HAS_LENGTHS, TF32, UPCAST, "", BLOCK_U, BLOCK_B, BLOCK_K)


@triton.jit
def _lstm_split_backward_step(dy_t, dh_n, dgates_next, w_hh, gates_t, c_t, c_prev, dc, out, pid, B, H, t, keep,
                              lengths, HAS_NEXT: tl.constexpr, FINAL: tl.constexpr, HAS_MASK: tl.constexpr,
                              HAS_LENGTHS: tl.constexpr,
                              TF32: tl.constexpr, UPCAST: tl.constexpr, CACHE: tl.constexpr, BLOCK_U: tl.constexpr,
                              BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    # c_prev: c_{t-1}, or c_0 (zeros when none was given) at t = 0
    # dh = dy_t + sum_j dgates_next[b, j] W[j, u] (dh_n without HAS_NEXT); with FINAL, out = dh_0 = that sum;
    # else out = dgates_t [B, 4H] from the cell's backward, and dc [B, H] (this program's units only) carries
    # dL/dc from step t + 1 to step t
    units = pid * BLOCK_U + tl.arange(0, BLOCK_U)
    unit_ok = units < H
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        row_ok = rows < B
        both_ok = unit_ok[:, None] & row_ok[None, :]
        offsets = rows.to(tl.int64)[None, :] * H + units[:, None]
        g_offsets = rows.to(tl.int64)[None, :] * (4 * H) + units[:, None]
        through = _through(dh_n, dgates_next, w_hh, offsets, both_ok, units, unit_ok, rows, row_ok, H, 4 * H, t,
                           keep, lengths, HAS_NEXT, HAS_MASK, HAS_LENGTHS, TF32, UPCAST, CACHE, BLOCK_U, BLOCK_B,
                           BLOCK_K)
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


@triton.jit(do_not_specialize=("B", "H", "t"))
def lstm_split_backward_step_kernel(dy_t, dh_n, dgates_next, w_hh, gates_t, c_t, c_prev, dc, out, B, H, t, keep,
                                    lengths, HAS_NEXT: tl.constexpr, FINAL: tl.constexpr, HAS_MASK: tl.constexpr,
                                    HAS_LENGTHS: tl.constexpr, TF32: tl.constexpr, UPCAST: tl.constexpr,
                                    BLOCK_U: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    _lstm_split_backward_step(dy_t, dh_n, dgates_next, w_hh, gates_t, c_t, c_prev, dc, out, tl.program_id(0), B, H, t,
                              keep, lengths, HAS_NEXT, FINAL, HAS_MASK, HAS_LENGTHS, TF32, UPCAST, "", BLOCK_U,
                              BLOCK_B, BLOCK_K)


@triton.jit(do_not_specialize=SIZE_ARGUMENTS)
def lstm_split_persistent_kernel(gates, h0, c0, w_hh, states, cells, y, counter, error, T, B, H, keep, lengths,
                                 HAS_STATE: tl.constexpr, HAS_MASK: tl.constexpr, HAS_LENGTHS: tl.constexpr,
                                 TF32: tl.constexpr, UPCAST: tl.constexpr, BLOCK_U: tl.constexpr,
                                 BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, SPIN: tl.constexpr):
    """All T steps in one launch: states, cells [T, B, H] float32 (h_t is read back by
    every program at step t + 1)."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    BH = B.to(tl.int64) * H
    _lstm_split_step(gates, h0, c0, w_hh, states, cells, y, pid, B, H, 0, keep, lengths, HAS_STATE, HAS_MASK,
                     HAS_LENGTHS, TF32, UPCAST, ".cg", BLOCK_U, BLOCK_B, BLOCK_K)
    ok = _grid_barrier(counter, programs, error, SPIN)
    t = 1
    while (t < T) & ok:
        t64 = t.to(tl.int64)
        _lstm_split_step(gates + t64 * 4 * BH, states + (t64 - 1) * BH, cells + (t64 - 1) * BH, w_hh,
                         states + t64 * BH, cells + t64 * BH, y + t64 * BH, pid, B, H, t, keep, lengths, True,
                         HAS_MASK, HAS_LENGTHS, TF32, UPCAST, ".cg", BLOCK_U, BLOCK_B, BLOCK_K)
        ok = _grid_barrier(counter, (t + 1) * programs, error, SPIN)
        t += 1


@triton.jit(do_not_specialize=SIZE_ARGUMENTS)
def lstm_split_persistent_backward_kernel(dy, dh_n, dgates, w_hh, gates, cells, c0, dc, dh0, counter, error, T, B,
                                          H, keep, lengths, HAS_MASK: tl.constexpr, HAS_LENGTHS: tl.constexpr,
                                          TF32: tl.constexpr, UPCAST: tl.constexpr, BLOCK_U: tl.constexpr,
                                          BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, SPIN: tl.constexpr):
    """The backward's T steps and the dh_0 pass in one launch: dgates [T, B, 4H]; c0
    [B, H] float32 (zeros when none was given)."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    BH = B.to(tl.int64) * H
    last = (T - 1).to(tl.int64)
    c_before = cells + (last - 1) * BH
    if last == 0:
        c_before = c0
    _lstm_split_backward_step(dy + last * BH, dh_n, dgates, w_hh, gates + last * 4 * BH, cells + last * BH, c_before,
                              dc, dgates + last * 4 * BH, pid, B, H, T - 1, keep, lengths, False, False, HAS_MASK,
                              HAS_LENGTHS, TF32, UPCAST, ".cg", BLOCK_U, BLOCK_B, BLOCK_K)
    ok = _grid_barrier(counter, programs, error, SPIN)
    i = 1
    while (i < T) & ok:
        t = T - 1 - i
        t64 = t.to(tl.int64)
        c_before = cells + (t64 - 1) * BH
        if t == 0:
            c_before = c0
        _lstm_split_backward_step(dy + t64 * BH, dh_n, dgates + (t64 + 1) * 4 * BH, w_hh, gates + t64 * 4 * BH,
                                  cells + t64 * BH, c_before, dc, dgates + t64 * 4 * BH, pid, B, H, t, keep, lengths,
                                  True, False, HAS_MASK, HAS_LENGTHS, TF32, UPCAST, ".cg", BLOCK_U, BLOCK_B, BLOCK_K)
        ok = _grid_barrier(counter, (i + 1) * programs, error, SPIN)
        i += 1
    if ok:
        _lstm_split_backward_step(dy, dh_n, dgates, w_hh, gates, cells, c0, dc, dh0, pid, B, H, -1, keep, lengths, True,
                                  True, HAS_MASK, HAS_LENGTHS, TF32, UPCAST, ".cg", BLOCK_U, BLOCK_B, BLOCK_K)


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
    block_u, grid = _block_sizes(hidden, programs, persistent, x.device)
    meta = dict(TF32=allow_tf32, UPCAST=upcast_dots(w), BLOCK_U=block_u, BLOCK_B=16, BLOCK_K=16,
                num_warps=NUM_WARPS, maxnreg=MAX_REGISTERS)
    options = ScanOptions.of(x, w, recurrent_mask, lengths)
    flags = dict(HAS_MASK=options.flags["HAS_MASK"], HAS_LENGTHS=options.flags["HAS_LENGTHS"])
    if persistent:
        counter = torch.zeros(1, device=x.device, dtype=torch.int32)
        error = torch.zeros(1, device=x.device, dtype=torch.int32)
        lstm_split_persistent_kernel[(grid,)](gates, h_start, c_start, w, states, cells, y, counter, error, steps,
                                              batch, hidden, options.keep, options.lengths, HAS_STATE=has_state,
                                              SPIN=_spin_limit(), num_stages=NUM_STAGES, **flags, **meta)
        _check_barrier(error)
    else:
        for t in range(steps):
            h_prev, c_prev = (h_start, c_start) if t == 0 else (states[t - 1], cells[t - 1])
            lstm_split_step_kernel[(grid,)](gates[t], h_prev, c_prev, w, states[t], cells[t], y[t], batch, hidden, t,
                                            options.keep, options.lengths, HAS_PREV=t > 0 or has_state, **flags,
                                            **meta)
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
    block_u, grid = _block_sizes(hidden, programs, persistent, x.device)
    meta = dict(TF32=allow_tf32, UPCAST=upcast_dots(w), BLOCK_U=block_u, BLOCK_B=16, BLOCK_K=16,
                num_warps=NUM_WARPS, maxnreg=MAX_REGISTERS)
    options = ScanOptions.of(x, w, recurrent_mask, lengths)
    flags = dict(HAS_MASK=options.flags["HAS_MASK"], HAS_LENGTHS=options.flags["HAS_LENGTHS"])
    opts = (options.keep, options.lengths)
    if persistent:
        counter = torch.zeros(1, device=x.device, dtype=torch.int32)
        error = torch.zeros(1, device=x.device, dtype=torch.int32)
        lstm_split_persistent_backward_kernel[(grid,)](dy, dh_n, dgates, w, gates, cells,
                                                       c_start, dc, dh0, counter, error, steps, batch, hidden, *opts,
                                                       SPIN=_spin_limit(), num_stages=NUM_STAGES, **flags, **meta)
        _check_barrier(error)
    else:
        for t in reversed(range(steps)):
            c_prev = cells[t - 1] if t > 0 else c_start
            lstm_split_backward_step_kernel[(grid,)](dy[t], dh_n, dgates[min(t + 1, steps - 1)], w, gates[t],
                                                     cells[t], c_prev, dc, dgates[t], batch, hidden, t, *opts,
                                                     HAS_NEXT=t < steps - 1, FINAL=False, **flags, **meta)
        lstm_split_backward_step_kernel[(grid,)](dy[0], dh_n, dgates[0], w, gates[0], cells[0], c_start, dc, dh0,
                                                 batch, hidden, -1, *opts, HAS_NEXT=True, FINAL=True, **flags, **meta)
    dx, dw_ih, dw_hh, dbias = weight_grads(dgates, x, h0, y, w_ih, need_dx, recurrent_mask)
    return dx, dh0.to(x.dtype), dc.to(x.dtype), dw_ih, dw_hh, dbias
