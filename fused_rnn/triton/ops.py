"""The Triton scans as ``fused_rnn::`` custom ops and autograd Functions.

``torch.library.triton_op`` registers each launcher (irnn.py, lstm.py) as an op whose
kernels ``torch.compile`` can see through on a GPU (``wrap_triton``); each op has a
fake implementation. The ops (shapes as in ``fused_rnn/ops.py``; h0/c0 may be None,
meaning zeros, without a zeros tensor):

    triton_irnn_scan_forward(x, h0?, w_ih, w_hh, bias?, allow_tf32, recurrent_mask?, lengths?, hidden_clip?)
        -> (y, h_n)
    triton_irnn_scan_backward(grad_y, grad_h_n, x, h0?, w_ih, w_hh, y, grad_x, allow_tf32, recurrent_mask?,
                              lengths?, hidden_clip?) -> (dx, dh0, dw_ih, dw_hh, dbias)
    triton_lstm_scan_forward(x, h0?, c0?, w_ih, w_hh, bias?, allow_tf32, recurrent_mask?, lengths?)
        -> (y, h_n, c_n, cells, gates)
    triton_lstm_scan_backward(grad_y, grad_h_n, grad_c_n, x, h0?, c0?, w_ih, w_hh, y, cells, gates,
                              grad_x, allow_tf32, recurrent_mask?, lengths?) -> (dx, dh0, dc0, dw_ih, dw_hh, dbias)

With ``grad_x=False`` dx is an empty tensor. Inputs are float32, bfloat16 or float16;
outputs come in the inputs' dtype, except the LSTM's cells and gates (float32 state). Selected by ``backend="triton"`` (and by
``"auto"`` for CUDA tensors that the CUDA scans do not take) through :mod:`fused_rnn.functional`.
"""

from typing import Optional, Tuple

import torch
from torch import Tensor
from torch.library import triton_op

from .._double_backward import irnn_layer_grads, lstm_layer_grads, wants_graph
from ..functional import _combined_bias, _split_bias_grad
from ..ops import _zeros_if_none
from . import irnn as _irnn
from . import lstm as _lstm


@triton_op("fused_rnn::triton_irnn_scan_forward", mutates_args=())
def triton_irnn_scan_forward(x: Tensor, h0: Optional[Tensor], w_ih: Tensor, w_hh: Tensor, bias: Optional[Tensor],
                             allow_tf32: bool = False, recurrent_mask: Optional[Tensor] = None,
                             lengths: Optional[Tensor] = None,
                             hidden_clip: Optional[float] = None) -> Tuple[Tensor, Tensor]:
    return _irnn.irnn_scan_forward(x, h0, w_ih, w_hh, bias, allow_tf32, recurrent_mask=recurrent_mask,
                                   lengths=lengths, hidden_clip=hidden_clip)


@triton_op("fused_rnn::triton_irnn_scan_backward", mutates_args=())
def triton_irnn_scan_backward(grad_y: Tensor, grad_h_n: Tensor, x: Tensor, h0: Optional[Tensor], w_ih: Tensor,
                              w_hh: Tensor, y: Tensor, grad_x: bool = True, allow_tf32: bool = False,
                              recurrent_mask: Optional[Tensor] = None, lengths: Optional[Tensor] = None,
                              hidden_clip: Optional[float] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    dx, *rest = _irnn.irnn_scan_backward(grad_y, grad_h_n, x, h0, w_ih, w_hh, y, grad_x, allow_tf32,
                                         recurrent_mask=recurrent_mask, lengths=lengths, hidden_clip=hidden_clip)
    return (dx if dx is not None else x.new_empty(0), *rest)


@triton_op("fused_rnn::triton_lstm_scan_forward", mutates_args=())
def triton_lstm_scan_forward(x: Tensor, h0: Optional[Tensor], c0: Optional[Tensor], w_ih: Tensor, w_hh: Tensor,
                             bias: Optional[Tensor], allow_tf32: bool = False, recurrent_mask: Optional[Tensor] = None,
                             lengths: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _lstm.lstm_scan_forward(x, h0, c0, w_ih, w_hh, bias, allow_tf32, recurrent_mask=recurrent_mask,
                                   lengths=lengths)


@triton_op("fused_rnn::triton_lstm_scan_backward", mutates_args=())
def triton_lstm_scan_backward(grad_y: Tensor, grad_h_n: Tensor, grad_c_n: Tensor, x: Tensor, h0: Optional[Tensor],
                              c0: Optional[Tensor], w_ih: Tensor, w_hh: Tensor, y: Tensor, cells: Tensor,
                              gates: Tensor, grad_x: bool = True, allow_tf32: bool = False,
                              recurrent_mask: Optional[Tensor] = None,
                              lengths: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    dx, *rest = _lstm.lstm_scan_backward(grad_y, grad_h_n, grad_c_n, x, h0, c0, w_ih, w_hh, y, cells, gates,
                                         grad_x, allow_tf32, recurrent_mask=recurrent_mask, lengths=lengths)
    return (dx if dx is not None else x.new_empty(0), *rest)


def _state_like(x: Tensor, w_hh: Tensor) -> Tensor:  # [B, H]
    return x.new_empty(x.shape[1], w_hh.shape[1])


@triton_irnn_scan_forward.register_fake
def _(x, h0, w_ih, w_hh, bias, allow_tf32=False, recurrent_mask=None, lengths=None, hidden_clip=None):
    return x.new_empty(x.shape[0], x.shape[1], w_hh.shape[1]), _state_like(x, w_hh)


@triton_irnn_scan_backward.register_fake
def _(grad_y, grad_h_n, x, h0, w_ih, w_hh, y, grad_x=True, allow_tf32=False, recurrent_mask=None, lengths=None,
      hidden_clip=None):
    # the gradients come back in x's dtype (common.weight_grads)
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


class TritonIRNNFunction(torch.autograd.Function):
    """``apply(x, h0 or None, w_ih, w_hh, b_ih, b_hh, allow_tf32, recurrent_mask, lengths,
    hidden_clip) -> (y, h_T)`` on the Triton scans (arguments as
    :class:`fused_rnn.IRNNFunction`; the options may be None)."""

    @staticmethod
    def forward(x, h0, w_ih, w_hh, b_ih, b_hh, allow_tf32, recurrent_mask=None, lengths=None, hidden_clip=None):
        return torch.ops.fused_rnn.triton_irnn_scan_forward(x, h0, w_ih, w_hh, _combined_bias(b_ih, b_hh),
                                                            allow_tf32, recurrent_mask, lengths, hidden_clip)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, h0, w_ih, w_hh, b_ih, b_hh, allow_tf32, *options = inputs
        ctx.save_for_backward(x, h0, w_ih, w_hh, output[0], b_ih, b_hh)
        ctx.allow_tf32 = allow_tf32
        ctx.given_options, ctx.options = len(options), tuple(options) + (None,) * (3 - len(options))
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_y, grad_h_n):
        x, h0, w_ih, w_hh, y, b_ih, b_hh = ctx.saved_tensors
        if wants_graph():  # create_graph=True: the backward kernels have no derivative of their own
            grads = irnn_layer_grads((x, h0, w_ih, w_hh, b_ih, b_hh), ctx.needs_input_grad, (grad_y, grad_h_n),
                                     ctx.options)
            return grads + (None,) * (1 + ctx.given_options)
        grad_x = ctx.needs_input_grad[0]
        state = x.new_zeros(x.shape[1], w_hh.shape[1])
        dx, dh0, dw_ih, dw_hh, dbias = torch.ops.fused_rnn.triton_irnn_scan_backward(
            _zeros_if_none(grad_y, y), _zeros_if_none(grad_h_n, state), x, h0, w_ih, w_hh, y, grad_x,
            ctx.allow_tf32, *ctx.options)
        return (dx if grad_x else None, dh0 if h0 is not None else None, dw_ih, dw_hh,
                *_split_bias_grad(dbias, b_ih, b_hh), None) + (None,) * ctx.given_options


class TritonLSTMFunction(torch.autograd.Function):
    """``apply(x, h0, c0, w_ih, w_hh, b_ih, b_hh, allow_tf32, recurrent_mask, lengths) ->
    (y, h_T, c_T, cells, gates)`` on the Triton scans (h0, c0 may be None: zeros)."""

    @staticmethod
    def forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, allow_tf32, recurrent_mask=None, lengths=None):
        return torch.ops.fused_rnn.triton_lstm_scan_forward(x, h0, c0, w_ih, w_hh, _combined_bias(b_ih, b_hh),
                                                            allow_tf32, recurrent_mask, lengths)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, h0, c0, w_ih, w_hh, b_ih, b_hh, allow_tf32, *options = inputs
        ctx.given_options, ctx.options = len(options), tuple(options) + (None,) * (2 - len(options))
        y, _, _, cells, gates = output
        ctx.save_for_backward(x, h0, c0, w_ih, w_hh, y, cells, gates, b_ih, b_hh)
        ctx.mark_non_differentiable(cells, gates)
        ctx.allow_tf32 = allow_tf32
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_y, grad_h_n, grad_c_n, _grad_cells, _grad_gates):
        x, h0, c0, w_ih, w_hh, y, cells, gates, b_ih, b_hh = ctx.saved_tensors
        if wants_graph():  # create_graph=True: the backward kernels have no derivative of their own
            grads = lstm_layer_grads((x, h0, c0, w_ih, w_hh, b_ih, b_hh), ctx.needs_input_grad,
                                     (grad_y, grad_h_n, grad_c_n), ctx.options)
            return grads + (None,) * (1 + ctx.given_options)
        grad_x = ctx.needs_input_grad[0]
        state = x.new_zeros(x.shape[1], w_hh.shape[1])
        dx, dh0, dc0, dw_ih, dw_hh, dbias = torch.ops.fused_rnn.triton_lstm_scan_backward(
            _zeros_if_none(grad_y, y), _zeros_if_none(grad_h_n, state), _zeros_if_none(grad_c_n, state), x, h0, c0,
            w_ih, w_hh, y, cells, gates, grad_x, ctx.allow_tf32, *ctx.options)
        return (dx if grad_x else None, dh0 if h0 is not None else None, dc0 if c0 is not None else None, dw_ih,
                dw_hh, *_split_bias_grad(dbias, b_ih, b_hh), None) + (None,) * ctx.given_options
