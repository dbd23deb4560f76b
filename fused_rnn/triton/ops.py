"""The Triton scans as ``fused_rnn::`` custom ops: the ``triton`` backend.

``torch.library.triton_op`` registers each launcher (irnn.py, lstm.py) as an op whose
kernels ``torch.compile`` can see through on a GPU (``wrap_triton``); each op has a
fake implementation, and each forward op its one autograd formula. The ops (shapes as
in ``fused_rnn/ops.py``; h0/c0 may be None, meaning zeros, without a zeros tensor):

    triton_irnn_scan_forward(x, h0?, w_ih, w_hh, bias?, allow_tf32, recurrent_mask?, lengths?, hidden_clip?)
        -> (y, h_n)
    triton_irnn_scan_backward(grad_y, grad_h_n, x, h0?, w_ih, w_hh, y, grad_x, allow_tf32, recurrent_mask?,
                              lengths?, hidden_clip?) -> (dx, dh0, dw_ih, dw_hh, dbias)
    triton_lstm_scan_forward(x, h0?, c0?, w_ih, w_hh, bias?, allow_tf32, recurrent_mask?, lengths?)
        -> (y, h_n, c_n, cells, gates)
    triton_lstm_scan_backward(grad_y, grad_h_n, grad_c_n, x, h0?, c0?, w_ih, w_hh, y, cells, gates,
                              grad_x, allow_tf32, recurrent_mask?, lengths?) -> (dx, dh0, dc0, dw_ih, dw_hh, dbias)

With ``grad_x=False`` dx is an empty tensor. Inputs are float32, bfloat16 or float16;
outputs come in the inputs' dtype, except the LSTM's cells and gates (float32 state).
:mod:`fused_rnn.functional` calls them for ``backend="triton"``, and for ``"auto"`` on
CUDA tensors that the CUDA scans do not take.
"""

from typing import Optional, Tuple

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor
from torch.library import triton_op

from .._double_backward import irnn_layer_grads, lstm_layer_grads, wants_graph
from .._host import refuse_mask_gradient, zero_state, zeros_if_none
from .._speedups import triton_design
from . import irnn as _irnn
from . import lstm as _lstm
from . import split as _split


@triton_op("fused_rnn::triton_irnn_scan_forward", mutates_args=())
def triton_irnn_scan_forward(x: Tensor, h0: Optional[Tensor], w_ih: Tensor, w_hh: Tensor, bias: Optional[Tensor],
                             allow_tf32: bool = False, recurrent_mask: Optional[Tensor] = None,
                             lengths: Optional[Tensor] = None,
                             hidden_clip: Optional[float] = None) -> Tuple[Tensor, Tensor]:
    if _design("irnn", x, w_hh, recurrent_mask, lengths, hidden_clip, allow_tf32=allow_tf32) == "split":
        return _split.run(_split.irnn_split_forward, w_hh.shape[1], x, _state(x, h0, w_hh), w_ih, w_hh, bias,
                          allow_tf32, recurrent_mask, lengths, hidden_clip)
    return _irnn.irnn_scan_forward(x, h0, w_ih, w_hh, bias, allow_tf32, recurrent_mask=recurrent_mask,
                                   lengths=lengths, hidden_clip=hidden_clip)


@triton_op("fused_rnn::triton_irnn_scan_backward", mutates_args=())
def triton_irnn_scan_backward(grad_y: Tensor, grad_h_n: Tensor, x: Tensor, h0: Optional[Tensor], w_ih: Tensor,
                              w_hh: Tensor, y: Tensor, grad_x: bool = True, allow_tf32: bool = False,
                              recurrent_mask: Optional[Tensor] = None, lengths: Optional[Tensor] = None,
                              hidden_clip: Optional[float] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    if _design("irnn", x, w_hh, recurrent_mask, lengths, hidden_clip, allow_tf32=allow_tf32) == "split":
        dx, *rest = _split.run(_split.irnn_split_backward, w_hh.shape[1], grad_y, grad_h_n, x, h0, w_ih, w_hh, y,
                               grad_x, allow_tf32, recurrent_mask, lengths, hidden_clip)
    else:
        dx, *rest = _irnn.irnn_scan_backward(grad_y, grad_h_n, x, h0, w_ih, w_hh, y, grad_x, allow_tf32,
                                             recurrent_mask=recurrent_mask, lengths=lengths, hidden_clip=hidden_clip)
    return (dx if dx is not None else x.new_empty(0), *rest)


@triton_op("fused_rnn::triton_lstm_scan_forward", mutates_args=())
def triton_lstm_scan_forward(x: Tensor, h0: Optional[Tensor], c0: Optional[Tensor], w_ih: Tensor, w_hh: Tensor,
                             bias: Optional[Tensor], allow_tf32: bool = False, recurrent_mask: Optional[Tensor] = None,
                             lengths: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    if _design("lstm", x, w_hh, recurrent_mask, lengths, allow_tf32=allow_tf32) == "split":
        return _split.run(_split.lstm_split_forward, w_hh.shape[1], x, h0, c0, w_ih, w_hh, bias, allow_tf32,
                          recurrent_mask, lengths)
    return _lstm.lstm_scan_forward(x, h0, c0, w_ih, w_hh, bias, allow_tf32, recurrent_mask=recurrent_mask,
                                   lengths=lengths)


@triton_op("fused_rnn::triton_lstm_scan_backward", mutates_args=())
def triton_lstm_scan_backward(grad_y: Tensor, grad_h_n: Tensor, grad_c_n: Tensor, x: Tensor, h0: Optional[Tensor],
                              c0: Optional[Tensor], w_ih: Tensor, w_hh: Tensor, y: Tensor, cells: Tensor,
                              gates: Tensor, grad_x: bool = True, allow_tf32: bool = False,
                              recurrent_mask: Optional[Tensor] = None,
                              lengths: Optional[Tensor] = None
                              ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    if _design("lstm", x, w_hh, recurrent_mask, lengths, allow_tf32=allow_tf32) == "split":
        dx, *rest = _split.run(_split.lstm_split_backward, w_hh.shape[1], grad_y, grad_h_n, grad_c_n, x, h0, c0,
                               w_ih, w_hh, y, cells, gates, grad_x, allow_tf32, recurrent_mask, lengths)
    else:
        dx, *rest = _lstm.lstm_scan_backward(grad_y, grad_h_n, grad_c_n, x, h0, c0, w_ih, w_hh, y, cells, gates,
                                             grad_x, allow_tf32, recurrent_mask=recurrent_mask, lengths=lengths)
    return (dx if dx is not None else x.new_empty(0), *rest)


def _design(cell: str, x: Tensor, w_hh: Tensor, *options, allow_tf32: bool = False) -> str:
    """The Triton design of this call ("split" or "tiled", _speedups.triton_design): the
    forward and the backward op of a call ask with the same arguments, so they agree.
    Under torch.compile's tracing and CUDA-graph capture, the batch-tiled scans: they
    launch through wrap_triton, while the split scans launch directly, loop over steps on
    the host and read their barrier's error flag back (a synchronisation)."""
    if _traced(x):
        return "tiled"
    used = tuple(name for name, value in zip(("recurrent_mask", "lengths", "hidden_clip"), options)
                 if value is not None)
    design = triton_design(x.device, x.dtype, cell, w_hh.shape[1], x.shape[1], None, used)
    if design == "split" and _split.missing_configs(cell, w_hh.dtype, allow_tf32, bool(used)) is not None:
        return "tiled"  # no spill-free config of a split kernel for this variant (never so with Triton 3.8)
    return design


def _traced(x: Tensor) -> bool:
    """Whether this op call is being traced (torch.compile, fake or functional tensors)
    or captured into a CUDA graph, rather than run eagerly."""
    if torch.compiler.is_compiling() or isinstance(x, FakeTensor) or torch._is_functional_tensor(x):
        return True
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def _state(x: Tensor, h0: Optional[Tensor], w_hh: Tensor) -> Tensor:
    return h0 if h0 is not None else zero_state(x, w_hh.shape[1])


def _state_like(x: Tensor, w_hh: Tensor) -> Tensor:  # [B, H]
    return x.new_empty(x.shape[1], w_hh.shape[1])


@triton_irnn_scan_forward.register_fake
def _(x, h0, w_ih, w_hh, bias, allow_tf32=False, recurrent_mask=None, lengths=None, hidden_clip=None):
    return x.new_empty(x.shape[0], x.shape[1], w_hh.shape[1]), _state_like(x, w_hh)


@triton_irnn_scan_backward.register_fake
def _(grad_y, grad_h_n, x, h0, w_ih, w_hh, y, grad_x=True, allow_tf32=False, recurrent_mask=None, lengths=None,
      hidden_clip=None):
    # the gradients come back in x's dtype (_host.weight_grads)
    return (torch.empty_like(x) if grad_x else x.new_empty(0), _state_like(x, w_hh), x.new_empty(w_ih.shape),
            x.new_empty(w_hh.shape), x.new_empty(w_hh.shape[0]))


@triton_lstm_scan_forward.register_fake
def _(x, h0, c0, w_ih, w_hh, bias, allow_tf32=False, recurrent_mask=None, lengths=None):
    steps, batch, hidden = x.shape[0], x.shape[1], w_hh.shape[1]
    return (x.new_empty(steps, batch, hidden), _state_like(x, w_hh), _state_like(x, w_hh),
            x.new_empty(steps, batch, hidden, dtype=torch.float32), x.new_empty(steps, batch, 4 * hidden,
                                                                                dtype=torch.float32))


@triton_lstm_scan_backward.register_fake
def _(grad_y, grad_h_n, grad_c_n, x, h0, c0, w_ih, w_hh, y, cells, gates, grad_x=True, allow_tf32=False,
      recurrent_mask=None, lengths=None):
    return (torch.empty_like(x) if grad_x else x.new_empty(0), _state_like(x, w_hh), _state_like(x, w_hh),
            x.new_empty(w_ih.shape), x.new_empty(w_hh.shape), x.new_empty(w_hh.shape[0]))


# ---- autograd, once per forward op: the backward op, or under create_graph=True the
# torch loop differentiated (_double_backward.py) ----

def _irnn_setup(ctx, inputs, output):
    x, h0, w_ih, w_hh, bias, allow_tf32, *options = inputs
    refuse_mask_gradient(options[0] if options else None)
    ctx.save_for_backward(x, h0, w_ih, w_hh, output[0], bias)
    ctx.allow_tf32, ctx.options = allow_tf32, tuple(options)
    ctx.set_materialize_grads(False)  # unused outputs cost no zero-filled gradients


def _irnn_backward(ctx, grad_y, grad_h_n):
    x, h0, w_ih, w_hh, y, bias = ctx.saved_tensors  # read once (non-reentrant checkpointing)
    needs = ctx.needs_input_grad
    if wants_graph():  # create_graph=True: the backward kernels have no derivative of their own
        grads = irnn_layer_grads((x, h0, w_ih, w_hh, bias, None), needs[:5] + (False,), (grad_y, grad_h_n),
                                 ctx.options)
        return grads[:5] + (None,) * (1 + len(ctx.options))
    grad_h_n = zero_state(x, w_hh.shape[1]) if grad_h_n is None else grad_h_n
    dx, dh0, dw_ih, dw_hh, dbias = torch.ops.fused_rnn.triton_irnn_scan_backward(
        zeros_if_none(grad_y, y), grad_h_n, x, h0, w_ih, w_hh, y, needs[0], ctx.allow_tf32, *ctx.options)
    return (dx if needs[0] else None, dh0 if h0 is not None else None, dw_ih, dw_hh,
            dbias if bias is not None else None) + (None,) * (1 + len(ctx.options))


triton_irnn_scan_forward.register_autograd(_irnn_backward, setup_context=_irnn_setup)


def _lstm_setup(ctx, inputs, output):
    x, h0, c0, w_ih, w_hh, bias, allow_tf32, *options = inputs
    refuse_mask_gradient(options[0] if options else None)
    y, _, _, cells, gates = output
    ctx.save_for_backward(x, h0, c0, w_ih, w_hh, y, cells, gates, bias)
    ctx.mark_non_differentiable(cells, gates)
    ctx.allow_tf32, ctx.options = allow_tf32, tuple(options)
    ctx.set_materialize_grads(False)


def _lstm_backward(ctx, grad_y, grad_h_n, grad_c_n, _grad_cells, _grad_gates):
    x, h0, c0, w_ih, w_hh, y, cells, gates, bias = ctx.saved_tensors
    needs = ctx.needs_input_grad
    if wants_graph():
        grads = lstm_layer_grads((x, h0, c0, w_ih, w_hh, bias, None), needs[:6] + (False,),
                                 (grad_y, grad_h_n, grad_c_n), ctx.options)
        return grads[:6] + (None,) * (1 + len(ctx.options))
    if grad_h_n is None or grad_c_n is None:
        state = zero_state(x, w_hh.shape[1])
        grad_h_n, grad_c_n = zeros_if_none(grad_h_n, state), zeros_if_none(grad_c_n, state)
    dx, dh0, dc0, dw_ih, dw_hh, dbias = torch.ops.fused_rnn.triton_lstm_scan_backward(
        zeros_if_none(grad_y, y), grad_h_n, grad_c_n, x, h0, c0, w_ih, w_hh, y, cells, gates, needs[0],
        ctx.allow_tf32, *ctx.options)
    return (dx if needs[0] else None, dh0 if h0 is not None else None, dc0 if c0 is not None else None, dw_ih,
            dw_hh, dbias if bias is not None else None) + (None,) * (1 + len(ctx.options))


triton_lstm_scan_forward.register_autograd(_lstm_backward, setup_context=_lstm_setup)
