"""Differentiable first derivatives of the fused layers, for ``create_graph=True``.

The fused backward kernels return numbers, not a graph: their own derivatives are not
written anywhere. A backward that runs with grad mode on (``create_graph=True``:
gradient penalties, ``gradgradcheck``, meta-learning) would therefore hand back first
derivatives that are detached from the inputs, and every second derivative through
them would be silently zero. Every autograd formula of the package (registered on
the compiled ops in ops.py and on the Triton ops in triton/ops.py) instead sends such a
backward here: the layer is recomputed through the differentiable ``torch`` time loop
(:mod:`fused_rnn.torch_loop`), and its first derivatives are taken with
``create_graph=True``, so that higher derivatives are those of the same formulas
torch.nn differentiates. A first-order backward runs with grad mode off and never
comes here, so its speed is unchanged.
"""

from typing import Callable, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import torch_loop
from ._host import state_dtype, zero_state


def wants_graph() -> bool:
    """Whether the running backward must return differentiable gradients: autograd
    turns grad mode on inside a backward exactly when ``create_graph=True``."""
    return torch.is_grad_enabled()


def recomputed_grads(
    layer: Callable[..., Sequence[Tensor]],
    inputs: Sequence[Optional[Tensor]],
    needs_grad: Sequence[bool],
    grad_outputs: Sequence[Optional[Tensor]],
) -> Tuple[Optional[Tensor], ...]:
    """The gradients of ``layer(*inputs)`` against ``grad_outputs``, as a graph.

    ``layer`` is a differentiable function of ``inputs`` (tensors or None) returning
    one tensor per entry of ``grad_outputs``; an output whose gradient is None (unused
    in the loss) is left out. Returns one gradient per input: None where
    ``needs_grad`` is false or the input is None, zeros where the outputs do not
    depend on it.
    """
    wanted = [i for i, (t, need) in enumerate(zip(inputs, needs_grad)) if need and t is not None and t.requires_grad]
    result: list = [None] * len(inputs)
    if not wanted:
        return tuple(result)
    # bfloat16/float16 layers keep float32 state and accumulation in every kernel; the
    # recomputation does the same, and the casts carry the gradients back
    dtype = state_dtype(next(t for t in inputs if t is not None))
    with torch.enable_grad():
        cast = [None if t is None else (t.to(dtype) if t.is_floating_point() else t) for t in inputs]
        outputs = layer(*cast)
        pairs = [(out, grad) for out, grad in zip(outputs, grad_outputs)
                 if grad is not None and out.requires_grad]
        if pairs:
            grads = torch.autograd.grad(
                [out for out, _ in pairs], [inputs[i] for i in wanted],
                [grad.to(out.dtype) for out, grad in pairs], create_graph=True, allow_unused=True,
            )
        else:
            grads = (None,) * len(wanted)
    for index, grad in zip(wanted, grads):
        result[index] = torch.zeros_like(inputs[index]) if grad is None else grad
    return tuple(result)


def _state(state: Optional[Tensor], x: Tensor, width: int) -> Tensor:
    # an initial state given as None (the Triton ops take it so) is zeros
    return zero_state(x, width) if state is None else state


def irnn_layer_grads(inputs, needs_grad, grad_outputs, options=(None, None, None)):
    """inputs (x, h0, w_ih, w_hh, b_ih, b_hh); grad_outputs (grad_y, grad_h_n); options
    (recurrent_mask, lengths, hidden_clip). One gradient per input."""
    mask, lengths, clip = options
    x, h0, w_ih, w_hh, b_ih, b_hh = inputs
    inputs = (x, _state(h0, x, w_hh.shape[1]), w_ih, w_hh, b_ih, b_hh)

    def layer(x, h0, w_ih, w_hh, b_ih, b_hh):
        return torch_loop.irnn_loop(x, h0, w_ih, w_hh, b_ih, b_hh, mask, lengths, clip)

    return recomputed_grads(layer, inputs, needs_grad, grad_outputs)


def lstm_layer_grads(inputs, needs_grad, grad_outputs, options=(None, None)):
    """inputs (x, h0, c0, w_ih, w_hh, b_ih, b_hh[, w_hr]); grad_outputs (grad_y,
    grad_h_n, grad_c_n); options (recurrent_mask, lengths). One gradient per input."""
    mask, lengths = options
    x, h0, c0, w_ih, w_hh, *rest = inputs
    hidden = w_hh.shape[0] // 4
    h0 = _state(h0, x, w_hh.shape[1])
    inputs = (x, h0, _state(c0, x, hidden), w_ih, w_hh, *rest)

    def layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr=None):
        return torch_loop.lstm_loop(x, h0, c0, w_ih, w_hh, b_ih, b_hh, mask, lengths, w_hr=w_hr)

    return recomputed_grads(layer, inputs, needs_grad, grad_outputs)


def irnn_cell_grads(inputs, needs_grad, grad_h_new):
    """inputs (x, h, w_ih, w_hh, b_ih, b_hh) of one IRNN step."""
    return recomputed_grads(lambda *args: (torch_loop.irnn_step(*args),), inputs, needs_grad, (grad_h_new,))


def lstm_cell_grads(inputs, needs_grad, grad_outputs):
    """inputs (x, h, c, w_ih, w_hh, b_ih, b_hh) of one LSTM step; grad_outputs (grad_h_new, grad_c_new)."""
    return recomputed_grads(torch_loop.lstm_step, inputs, needs_grad, grad_outputs)
