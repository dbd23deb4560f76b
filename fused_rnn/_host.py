"""The host-side pieces around a scan, written once for every Python-side backend.

The C++ kernels (CPU and CUDA) share their own in ``csrc/layer_common.h``; these serve
the functional API, the ops' autograd, the Triton launchers and the torch loop:
the combined bias, zero initial states, missing upstream gradients, the input
projection before a scan, the weight-gradient GEMMs after it, and the result of a
call that runs no step.
"""

from typing import Optional, Tuple

import torch
from torch import Tensor


def combined_bias(b_ih: Optional[Tensor], b_hh: Optional[Tensor]) -> Optional[Tensor]:
    """b_ih + b_hh, the one bias the kernels add (either may be None). Built with torch
    ops, so autograd hands each bias its gradient."""
    if b_ih is None:
        return b_hh
    return b_ih if b_hh is None else b_ih + b_hh


def zero_state(x: Tensor, width: int) -> Tensor:
    """[B, width] zeros like x [..., B, I]: the initial state when none is given."""
    return x.new_zeros(x.shape[-2], width)


def zeros_if_none(grad: Optional[Tensor], like: Tensor) -> Tensor:
    """An upstream gradient autograd left out (an unused output) as zeros."""
    return torch.zeros_like(like) if grad is None else grad


def refuse_mask_gradient(recurrent_mask: Optional[Tensor]) -> None:
    """The compiled ops treat a recurrent mask as a constant (recurrent dropout's masks
    are): one that requires grad would get no gradient, silently. Called where their
    autograd records a call; the functional API sends such a call to the torch loop
    (dispatch.MASK_GRADIENT)."""
    if recurrent_mask is not None and recurrent_mask.requires_grad:
        raise ValueError("fused_rnn: the fused kernels do not differentiate recurrent_mask, which requires grad "
                         "here: detach it (a dropout mask is a constant), or call fused_rnn.irnn / fused_rnn.lstm "
                         "with backend='torch' or 'auto', which run the torch loop for it")


def state_dtype(x: Tensor) -> torch.dtype:
    """The dtype of the state the kernels keep (LSTM cells, gates): float32 for
    bfloat16/float16 layers, else the inputs' dtype."""
    return torch.float32 if x.dtype in (torch.bfloat16, torch.float16) else x.dtype


def active_steps(lengths: Optional[Tensor], steps: int, device) -> Optional[Tensor]:
    """[T, B, 1] bool: step t is within sequence b's length (None without lengths)."""
    if lengths is None:
        return None
    return (torch.arange(steps, device=device)[:, None] < lengths.to(device)[None, :])[:, :, None]


def input_projection(x: Tensor, w_ih: Tensor, bias: Optional[Tensor], dtype: Optional[torch.dtype] = None) -> Tensor:
    """[T, B, G*H] = x W_ih^T + bias for every step in one GEMM, computed in `dtype`
    (default: x's; the Triton scans ask for float32, their state dtype)."""
    dtype = x.dtype if dtype is None else dtype
    steps, batch, inputs = x.shape
    x2d = x.reshape(steps * batch, inputs).to(dtype)
    w = w_ih.to(dtype).t()
    pre = torch.addmm(bias.to(dtype), x2d, w) if bias is not None else x2d @ w
    return pre.view(steps, batch, w_ih.shape[0])


def weight_grads(dpre: Tensor, x: Tensor, h0: Optional[Tensor], y: Tensor, w_ih: Tensor, need_dx: bool,
                 keep: Optional[Tensor] = None, lengths: Optional[Tensor] = None
                 ) -> Tuple[Optional[Tensor], Tensor, Tensor, Tensor]:
    """The gradients that are sums over time, as GEMMs over all steps in dpre's dtype,
    returned in x's: dpre [T, B, G*H] = dL/d(pre-activation) -> (dx or None,
    dW_ih = dpre^T x, dW_hh = dpre^T (h_{t-1} * keep), dbias = sum dpre), with
    h_{t-1} = h0 (zeros if None) at t = 0, else y_{t-1}. With `lengths`, the rows past
    a sequence's length (no step ran there, their dpre is zero) have x and h_{t-1}
    zeroed: padding may hold anything, and 0 * NaN is NaN (csrc/layer_common.h does the
    same)."""
    steps, batch, inputs = x.shape
    hidden = y.shape[2]
    dtype = dpre.dtype
    dpre2d = dpre.reshape(steps * batch, dpre.shape[2])
    h_first = (h0 if h0 is not None else y.new_zeros(batch, hidden)).to(dtype)
    h_prev = torch.cat([h_first.unsqueeze(0), y[:-1].to(dtype)])
    if keep is not None:
        h_prev = h_prev * keep.to(dtype)
    operand = x.to(dtype)
    active = active_steps(lengths, steps, x.device)
    if active is not None:
        operand, h_prev = torch.where(active, operand, 0.0), torch.where(active, h_prev, 0.0)
    h_prev = h_prev.reshape(steps * batch, hidden)
    dw_hh = (dpre2d.t() @ h_prev).to(x.dtype)
    dw_ih = (dpre2d.t() @ operand.reshape(steps * batch, inputs)).to(x.dtype)
    dbias = dpre2d.sum(0).to(x.dtype)
    dx = (dpre2d @ w_ih.to(dtype)).view(x.shape).to(x.dtype) if need_dx else None
    return dx, dw_ih, dw_hh, dbias


class _NoStep(torch.autograd.Function):
    """The result of a layer call that runs no step (T = 0, or every row of length 0):
    y of zeros and the initial states, in autograd's graph as the fused kernels' results
    are, so that a backward through them works whatever requires grad: the states'
    gradients reach the initial states, and x and the weights get zeros (as the fused
    backends give them), never an error for a y that does not require grad."""

    @staticmethod
    def forward(ctx, width: int, count: int, x: Tensor, *rest):
        states = rest[:count]
        ctx.set_materialize_grads(False)
        ctx.count = count
        ctx.metas = [None if t is None else (t.shape, t.dtype, t.device) for t in (x, *rest)]
        return (x.new_zeros(x.shape[0], x.shape[1], width), *(s.clone() for s in states))

    @staticmethod
    def backward(ctx, _grad_y, *grad_states):
        grads = []
        for i, (meta, need) in enumerate(zip(ctx.metas, ctx.needs_input_grad[2:])):
            if 1 <= i <= ctx.count and need:  # an initial state: h_n = h0 (c_n = c0)
                grad = grad_states[i - 1]
                grads.append(grad if grad is not None else torch.zeros(meta[0], dtype=meta[1], device=meta[2]))
            else:
                grads.append(torch.zeros(meta[0], dtype=meta[1], device=meta[2]) if need else None)
        return (None, None, *grads)


def no_step(x: Tensor, states: Tuple[Tensor, ...], *weights) -> Tuple[Tensor, Tuple[Tensor, ...]]:
    """(y of zeros [T, B, width of the states' first], the initial states' copies) of a
    call that runs no step; see _NoStep."""
    y, *finals = _NoStep.apply(states[0].shape[1], len(states), x, *states, *weights)
    return y, tuple(finals)
