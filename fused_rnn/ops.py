"""Python side of the ``fused_rnn::`` custom ops whose schemas live in ``csrc/ops.cpp``.

These ops are the ``cpp`` and ``cuda`` backends: the CPU kernels (``csrc/cpu``) and the
CUDA kernels (``csrc/cuda``) register implementations of the same schemas. For each op:
a fake (meta) implementation, so that ``torch.compile`` and ``torch.library.opcheck`` can
trace it without running a kernel, and, for the forward ops, the one autograd formula
of that op (``register_autograd``), which calls the matching backward op; under
``create_graph=True`` it differentiates the torch loop instead (``_double_backward.py``).

The ops (T steps, B batch, I inputs, H hidden, G = 1 for the IRNN and 4 for the LSTM;
``bias`` is b_ih + b_hh, [G*H], or None):

    irnn_scan_forward(x, h0, w_ih, w_hh, bias, recurrent_mask=None, lengths=None, hidden_clip=None)
        -> (y [T,B,H], h_n [B,H])
    irnn_scan_backward(grad_y, grad_h_n, x, h0, w_ih, w_hh, y, grad_x=True, recurrent_mask=None, lengths=None,
                       hidden_clip=None) -> (dx, dh0, dw_ih, dw_hh, dbias)
    irnn_step(x [B,I], h, w_ih, w_hh, bias) -> h_new
    irnn_step_backward(grad_h_new, x, h, w_ih, w_hh, h_new) -> (dx, dh, dw_ih, dw_hh, dbias)
    lstm_scan_forward(x, h0, c0, w_ih, w_hh, bias, recurrent_mask=None, lengths=None, w_hr=None)
        -> (y, h_n, c_n, cells [T,B,H], gates [T,B,4H])
    lstm_scan_backward(grad_y, grad_h_n, grad_c_n, x, h0, c0, w_ih, w_hh, y, cells, gates, grad_x=True,
                       recurrent_mask=None, lengths=None, w_hr=None) -> (dx, dh0, dc0, dw_ih, dw_hh, dbias, dw_hr)
    lstm_step(x, h, c, w_ih, w_hh, bias) -> (h_new, c_new, gates [B,4H])
    lstm_step_backward(grad_h_new, grad_c_new, x, h, c, w_ih, w_hh, c_new, gates)
        -> (dx, dh, dc, dw_ih, dw_hh, dbias)

``w_hr`` [P, H] is the LSTM's output projection (``nn.LSTM(proj_size=P)``, CPU kernels
only): h_t = (o * tanh(c_t)) @ w_hr^T, so h0, h_n, y (and grad_y, grad_h_n, the mask)
have P columns, w_hh is [4H, P], and dw_hr is empty without a projection.
``cells`` holds c_1..c_T and ``gates`` the activated gates (i, f, g, o after their
sigmoid/tanh): what the LSTM backward scan needs, saved instead of recomputed; float32
for bfloat16/float16 inputs (the CUDA kernels' state dtype), else the inputs' dtype.
Kernels: CPU (csrc/cpu: float32, float64, and bfloat16/float16 converted to float32 at
the call) and CUDA (csrc/cuda: float32, bfloat16, float16). With ``grad_x=False`` a scan
backward skips dx and returns an empty tensor in its place.
"""

import torch

from ._double_backward import irnn_cell_grads, irnn_layer_grads, lstm_cell_grads, lstm_layer_grads, wants_graph
from ._extension import HAS_C
from ._host import refuse_mask_gradient, state_dtype, zeros_if_none

OP_NAMES = (
    "irnn_scan_forward",
    "irnn_scan_backward",
    "irnn_step",
    "irnn_step_backward",
    "lstm_scan_forward",
    "lstm_scan_backward",
    "lstm_step",
    "lstm_step_backward",
)


# Backward helpers: `saved` is what the forward's setup_context stored.

def irnn_scan_grads(saved, grad_y, grad_h_n, grad_x=True, options=(None, None, None)):
    """`options`: (recurrent_mask, lengths, hidden_clip) of the forward."""
    x, h0, w_ih, w_hh, y = saved
    grad_y = zeros_if_none(grad_y, y)
    grad_h_n = zeros_if_none(grad_h_n, h0)
    dx, *rest = torch.ops.fused_rnn.irnn_scan_backward(grad_y, grad_h_n, x, h0, w_ih, w_hh, y, grad_x, *options)
    return (dx if grad_x else None, *rest)


def irnn_step_grads(saved, grad_h_new):
    x, h, w_ih, w_hh, h_new = saved
    return torch.ops.fused_rnn.irnn_step_backward(zeros_if_none(grad_h_new, h_new), x, h, w_ih, w_hh, h_new)


def lstm_scan_grads(saved, grad_y, grad_h_n, grad_c_n, grad_x=True, options=(None, None)):
    """`saved`: (x, h0, c0, w_ih, w_hh, y, cells, gates, w_hr or None); `options`:
    (recurrent_mask, lengths) of the forward. Returns (dx, dh0, dc0, dw_ih, dw_hh, dbias,
    dw_hr), dx and dw_hr None where not asked for or without a projection."""
    x, h0, c0, w_ih, w_hh, y, cells, gates, w_hr = saved
    dx, *rest, dw_hr = torch.ops.fused_rnn.lstm_scan_backward(
        zeros_if_none(grad_y, y),
        zeros_if_none(grad_h_n, h0),
        zeros_if_none(grad_c_n, c0),
        x, h0, c0, w_ih, w_hh, y, cells, gates, grad_x, *options, w_hr,
    )
    return (dx if grad_x else None, *rest, dw_hr if w_hr is not None else None)


def lstm_step_grads(saved, grad_h_new, grad_c_new):
    x, h, c, w_ih, w_hh, c_new, gates = saved
    return torch.ops.fused_rnn.lstm_step_backward(
        zeros_if_none(grad_h_new, c_new), zeros_if_none(grad_c_new, c_new),
        x, h, c, w_ih, w_hh, c_new, gates,
    )


def _new_like(t):
    # the kernels return fresh contiguous tensors whatever the inputs' strides
    return t.new_empty(t.shape)


def _padded(options, count):
    # the options the op was called with, None for those left at their default
    return tuple(options) + (None,) * (count - len(options))


def _register():
    lib = "fused_rnn::"

    # ---- fake implementations: shapes and dtypes only ----
    @torch.library.register_fake(lib + "irnn_scan_forward")
    def _(x, h0, w_ih, w_hh, bias, recurrent_mask=None, lengths=None, hidden_clip=None):
        return x.new_empty(x.shape[0], x.shape[1], w_hh.shape[1]), _new_like(h0)

    @torch.library.register_fake(lib + "irnn_scan_backward")
    def _(grad_y, grad_h_n, x, h0, w_ih, w_hh, y, grad_x=True, recurrent_mask=None, lengths=None, hidden_clip=None):
        return (_new_like(x) if grad_x else x.new_empty(0), _new_like(h0), _new_like(w_ih),
                _new_like(w_hh), w_hh.new_empty(w_hh.shape[0]))

    @torch.library.register_fake(lib + "irnn_step")
    def _(x, h, w_ih, w_hh, bias):
        return _new_like(h)

    @torch.library.register_fake(lib + "irnn_step_backward")
    def _(grad_h_new, x, h, w_ih, w_hh, h_new):
        return (_new_like(x), _new_like(h), _new_like(w_ih),
                _new_like(w_hh), w_hh.new_empty(w_hh.shape[0]))

    @torch.library.register_fake(lib + "lstm_scan_forward")
    def _(x, h0, c0, w_ih, w_hh, bias, recurrent_mask=None, lengths=None, w_hr=None):
        steps, batch, hidden, width = x.shape[0], x.shape[1], w_hh.shape[0] // 4, w_hh.shape[1]
        return (x.new_empty(steps, batch, width), _new_like(h0), _new_like(c0),
                x.new_empty(steps, batch, hidden, dtype=state_dtype(x)),
                x.new_empty(steps, batch, 4 * hidden, dtype=state_dtype(x)))

    @torch.library.register_fake(lib + "lstm_scan_backward")
    def _(grad_y, grad_h_n, grad_c_n, x, h0, c0, w_ih, w_hh, y, cells, gates, grad_x=True, recurrent_mask=None,
          lengths=None, w_hr=None):
        return (_new_like(x) if grad_x else x.new_empty(0), _new_like(h0), _new_like(c0), _new_like(w_ih),
                _new_like(w_hh), w_hh.new_empty(w_hh.shape[0]),
                w_hh.new_empty(0) if w_hr is None else _new_like(w_hr))

    @torch.library.register_fake(lib + "lstm_step")
    def _(x, h, c, w_ih, w_hh, bias):
        return _new_like(h), _new_like(c), x.new_empty(x.shape[0], w_hh.shape[0], dtype=state_dtype(x))

    @torch.library.register_fake(lib + "lstm_step_backward")
    def _(grad_h_new, grad_c_new, x, h, c, w_ih, w_hh, c_new, gates):
        return (_new_like(x), _new_like(h), _new_like(c), _new_like(w_ih),
                _new_like(w_hh), w_hh.new_empty(w_hh.shape[0]))

    # ---- autograd of the forward ops: each calls its backward op ----
    def irnn_scan_setup(ctx, inputs, output):
        ctx.set_materialize_grads(False)  # unused outputs cost no zero-filled gradients
        x, h0, w_ih, w_hh, bias, *options = inputs
        refuse_mask_gradient(options[0] if options else None)
        ctx.save_for_backward(x, h0, w_ih, w_hh, output[0], bias)
        ctx.has_bias, ctx.options = bias is not None, tuple(options)

    def irnn_scan_backward(ctx, grad_y, grad_h_n):
        *saved, bias = ctx.saved_tensors  # read once (non-reentrant checkpointing)
        if wants_graph():  # create_graph=True: the backward op has no derivative of its own
            grads = irnn_layer_grads((*saved[:4], bias, None), ctx.needs_input_grad[:5] + (False,),
                                     (grad_y, grad_h_n), _padded(ctx.options, 3))
            return grads[:5] + (None,) * len(ctx.options)
        dx, dh0, dw_ih, dw_hh, dbias = irnn_scan_grads(saved, grad_y, grad_h_n,
                                                       ctx.needs_input_grad[0], ctx.options)
        return (dx, dh0, dw_ih, dw_hh, (dbias if ctx.has_bias else None)) + (None,) * len(ctx.options)

    torch.library.register_autograd(lib + "irnn_scan_forward", irnn_scan_backward, setup_context=irnn_scan_setup)

    def irnn_step_setup(ctx, inputs, output):
        ctx.set_materialize_grads(False)  # unused outputs cost no zero-filled gradients
        x, h, w_ih, w_hh, bias = inputs
        ctx.save_for_backward(x, h, w_ih, w_hh, output, bias)
        ctx.has_bias = bias is not None

    def irnn_step_backward(ctx, grad_h_new):
        *saved, bias = ctx.saved_tensors
        if wants_graph():
            return irnn_cell_grads((*saved[:4], bias, None), ctx.needs_input_grad + (False,), grad_h_new)[:5]
        dx, dh, dw_ih, dw_hh, dbias = irnn_step_grads(saved, grad_h_new)
        return dx, dh, dw_ih, dw_hh, (dbias if ctx.has_bias else None)

    torch.library.register_autograd(lib + "irnn_step", irnn_step_backward, setup_context=irnn_step_setup)

    def lstm_scan_setup(ctx, inputs, output):
        ctx.set_materialize_grads(False)  # unused outputs cost no zero-filled gradients
        x, h0, c0, w_ih, w_hh, bias, recurrent_mask, lengths, w_hr = inputs
        refuse_mask_gradient(recurrent_mask)
        y, _, _, cells, gates = output
        ctx.save_for_backward(x, h0, c0, w_ih, w_hh, y, cells, gates, w_hr, bias)
        ctx.mark_non_differentiable(cells, gates)
        ctx.has_bias, ctx.options = bias is not None, (recurrent_mask, lengths)

    def lstm_scan_backward(ctx, grad_y, grad_h_n, grad_c_n, _grad_cells, _grad_gates):
        *saved, bias = ctx.saved_tensors
        if wants_graph():
            x, h0, c0, w_ih, w_hh, *_, w_hr = saved
            needs = ctx.needs_input_grad + (False,) * (9 - len(ctx.needs_input_grad))  # defaults not passed
            *grads, dw_hr = lstm_layer_grads((x, h0, c0, w_ih, w_hh, bias, None, w_hr),
                                             needs[:6] + (False, needs[8]), (grad_y, grad_h_n, grad_c_n), ctx.options)
            return (*grads[:6], None, None, dw_hr)
        # cells and gates are saved activations, not results: their gradients are not propagated
        dx, dh0, dc0, dw_ih, dw_hh, dbias, dw_hr = lstm_scan_grads(saved, grad_y, grad_h_n, grad_c_n,
                                                                   ctx.needs_input_grad[0], ctx.options)
        return dx, dh0, dc0, dw_ih, dw_hh, (dbias if ctx.has_bias else None), None, None, dw_hr

    torch.library.register_autograd(lib + "lstm_scan_forward", lstm_scan_backward, setup_context=lstm_scan_setup)

    def lstm_step_setup(ctx, inputs, output):
        ctx.set_materialize_grads(False)  # unused outputs cost no zero-filled gradients
        x, h, c, w_ih, w_hh, bias = inputs
        _, c_new, gates = output
        ctx.save_for_backward(x, h, c, w_ih, w_hh, c_new, gates, bias)
        ctx.mark_non_differentiable(gates)
        ctx.has_bias = bias is not None

    def lstm_step_backward(ctx, grad_h_new, grad_c_new, _grad_gates):
        *saved, bias = ctx.saved_tensors
        if wants_graph():
            return lstm_cell_grads((*saved[:5], bias, None), ctx.needs_input_grad + (False,),
                                   (grad_h_new, grad_c_new))[:6]
        dx, dh, dc, dw_ih, dw_hh, dbias = lstm_step_grads(saved, grad_h_new, grad_c_new)
        return dx, dh, dc, dw_ih, dw_hh, (dbias if ctx.has_bias else None)

    torch.library.register_autograd(lib + "lstm_step", lstm_step_backward, setup_context=lstm_step_setup)


if HAS_C:
    _register()
