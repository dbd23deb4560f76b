"""The ``"nn"`` backend: the kernels torch.nn's own modules run, behind the functional API.

``torch.nn.RNN(nonlinearity="relu")`` and ``torch.nn.LSTM`` call ATen's ``rnn_relu`` and
``lstm`` ops, which run cuDNN on a GPU and oneDNN (or ATen's own loop) on the CPU; the
cells call ``rnn_relu_cell`` and ``lstm_cell``. This backend calls the same ops on one
layer's weights, so that ``backend="auto"`` can take torch.nn's kernels wherever they
are faster than the package's, and so that nothing the package runs by default is
slower than the module it replaces.

Semantics are fused_rnn's: ``lengths`` run through a packed sequence (rows of length 0
keep their initial state and output zeros, which packing cannot express, so they are
left out of the call), and a sequence of length 0 returns the initial state. The
recurrent mask and the IRNN's ``hidden_clip`` are not torch.nn's, and dispatch never
sends them here (``dispatch.OPTION_SUPPORT``). Autograd is ATen's own; on a GPU,
cuDNN's backward is not differentiable, so a backward under ``create_graph=True`` is
recomputed through the torch loop instead (:class:`_SecondOrderOnGPU`).
"""

from typing import List, Optional, Tuple

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from ._double_backward import irnn_layer_grads, lstm_layer_grads, wants_graph
from ._host import no_step


def _params(w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor], b_hh: Optional[Tensor],
            w_hr: Optional[Tensor] = None) -> Tuple[List[Tensor], bool]:
    """The flat weight list of one layer as ATen's rnn ops take it, and has_biases (a
    missing one of the two biases is zeros)."""
    has_biases = b_ih is not None or b_hh is not None
    params = [w_ih, w_hh]
    if has_biases:
        params += [b_ih if b_ih is not None else torch.zeros_like(b_hh),
                   b_hh if b_hh is not None else torch.zeros_like(b_ih)]
    if w_hr is not None:
        params.append(w_hr)
    return params, has_biases


def _training(*tensors) -> bool:
    # cuDNN keeps what its backward needs only in training mode
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _run(op, x: Tensor, states: Tuple[Tensor, ...], params: List[Tensor], has_biases: bool,
         lengths: Optional[Tensor]) -> Tuple[Tensor, Tuple[Tensor, ...]]:
    """One layer of ATen's `op` (torch.rnn_relu or torch.lstm) on x [T, B, I] with
    states, each [B, width]: (y [T, B, P], final states). With lengths, through a packed
    sequence: y is zero past each row's length and the states are those at its length."""
    steps, batch = x.shape[0], x.shape[1]
    train = _training(x, *states, *params)
    hx = states[0].unsqueeze(0) if len(states) == 1 else (states[0].unsqueeze(0), states[1].unsqueeze(0))
    if lengths is None:
        y, *finals = op(x, hx, params, has_biases, 1, 0.0, train, False, False)
        return y, tuple(f[0] for f in finals)
    lengths = lengths.to("cpu", torch.int64)
    present = torch.nonzero(lengths > 0).flatten()
    if len(present) == 0:  # no step to run: zeros out, the initial states kept
        return no_step(x, states, *params)
    if len(present) < batch:  # packing cannot take a sequence of length 0: it keeps its state
        y_rows, final_rows = _run(op, x[:, present.to(x.device)], tuple(s[present.to(s.device)] for s in states),
                                  params, has_biases, lengths[present])
        index = present.to(x.device)
        y = x.new_zeros(steps, batch, y_rows.shape[2]).index_copy(1, index, y_rows)
        return y, tuple(s.index_copy(0, index, f) for s, f in zip(states, final_rows))
    packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
    order = packed.sorted_indices.to(x.device)
    hx = tuple(s[order].unsqueeze(0) for s in states)
    data, *finals = op(packed.data, packed.batch_sizes, hx[0] if len(hx) == 1 else hx, params, has_biases, 1, 0.0,
                       train, False)
    y, _ = pad_packed_sequence(PackedSequence(data, packed.batch_sizes, packed.sorted_indices,
                                              packed.unsorted_indices), total_length=steps)
    unsort = packed.unsorted_indices.to(x.device)
    return y, tuple(f[0][unsort] for f in finals)


def run_stack(cell: str, x: Tensor, states: Tuple[Tensor, ...], layer_weights: List[tuple], num_layers: int,
              dropout: float, train: bool, bidirectional: bool) -> Tuple[Tensor, Tuple[Tensor, ...]]:
    """A whole stack in one call of ATen's op, as torch.nn.RNN / LSTM.forward make it:
    x [T, B, I]; states each [L*D, B, width]; layer_weights (w_ih, w_hh, b_ih, b_hh,
    w_hr) per layer and direction, in torch.nn's order. Dropout between layers when
    `train`, as there. Returns (y [T, B, D*width], final states each [L*D, B, width])."""
    flat, has_biases = [], False
    for weights in layer_weights:
        params, has_biases = _params(*weights)
        flat += params
    if cell == "irnn":
        y, h_n = torch.rnn_relu(x, states[0], flat, has_biases, num_layers, dropout, train, bidirectional, False)
        return y, (h_n,)
    y, h_n, c_n = torch.lstm(x, states, flat, has_biases, num_layers, dropout, train, bidirectional, False)
    return y, (h_n, c_n)


class _SecondOrderOnGPU(torch.autograd.Function):
    """A layer of this backend on CUDA tensors whose backward may run under
    ``create_graph=True``: the forward records ATen's graph on detached inputs, a
    first-order backward replays it (cuDNN's fused backward), and a create_graph
    backward differentiates the torch loop instead, which cuDNN's backward cannot be."""

    @staticmethod
    def forward(ctx, cell, options, *inputs):
        detached = [None if t is None else t.detach().requires_grad_(t.requires_grad) for t in inputs]
        with torch.enable_grad():
            outputs = (irnn_layer if cell == "irnn" else _lstm_layer_flat)(*detached, **options)
        ctx.cell, ctx.options, ctx.detached, ctx.outputs = cell, options, detached, outputs
        ctx.save_for_backward(*inputs)
        return tuple(o.detach() for o in outputs)

    @staticmethod
    def backward(ctx, *grads):
        inputs = ctx.saved_tensors
        needs = ctx.needs_input_grad[2:]
        if wants_graph():
            lengths = ctx.options.get("lengths")
            if ctx.cell == "irnn":
                result = irnn_layer_grads(inputs, needs, grads, (None, lengths, None))
            else:
                *layer, w_hr = inputs
                result = lstm_layer_grads((*layer, w_hr), needs, grads, (None, lengths))
            return (None, None, *result)
        wanted = [i for i, (t, need) in enumerate(zip(ctx.detached, needs)) if need and t is not None]
        pairs = [(o, g) for o, g in zip(ctx.outputs, grads) if g is not None and o.requires_grad]
        result = [None] * len(inputs)
        if wanted and pairs:
            # retain_graph: the outer graph may be replayed (backward(retain_graph=True))
            got = torch.autograd.grad([o for o, _ in pairs], [ctx.detached[i] for i in wanted],
                                      [g for _, g in pairs], allow_unused=True, retain_graph=True)
            for i, g in zip(wanted, got):
                result[i] = g
        return (None, None, *result)


def _second_order_safe(x: Tensor, *tensors) -> bool:
    """Whether a call needs the wrapper: CUDA tensors (cuDNN), with autograd recording."""
    return x.is_cuda and _training(x, *tensors)


def irnn_layer(x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor] = None,
               b_hh: Optional[Tensor] = None, lengths: Optional[Tensor] = None,
               _wrapped: bool = False) -> Tuple[Tensor, Tensor]:
    """One IRNN layer on torch.nn's kernels: x [T, B, I], h0 [B, H] -> (y [T, B, H], h_T [B, H])."""
    if x.shape[0] == 0:
        y, (h_n,) = no_step(x, (h0,), w_ih, w_hh, b_ih, b_hh)
        return y, h_n
    if not _wrapped and _second_order_safe(x, h0, w_ih, w_hh, b_ih, b_hh):
        return _SecondOrderOnGPU.apply("irnn", {"lengths": lengths, "_wrapped": True}, x, h0, w_ih, w_hh, b_ih, b_hh)
    params, has_biases = _params(w_ih, w_hh, b_ih, b_hh)
    y, (h_n,) = _run(torch.rnn_relu, x, (h0,), params, has_biases, lengths)
    return y, h_n


def _lstm_layer_flat(x, h0, c0, w_ih, w_hh, b_ih=None, b_hh=None, w_hr=None, lengths=None, _wrapped=False):
    y, (h_n, c_n) = lstm_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths, w_hr, _wrapped=_wrapped)
    return y, h_n, c_n


def lstm_layer(x: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor] = None,
               b_hh: Optional[Tensor] = None, lengths: Optional[Tensor] = None, w_hr: Optional[Tensor] = None,
               _wrapped: bool = False) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
    """One LSTM layer on torch.nn's kernels: x [T, B, I], h0 [B, P], c0 [B, H] ->
    (y [T, B, P], (h_T, c_T)); w_hr [P, H] for nn.LSTM(proj_size=P), else None (P = H)."""
    if x.shape[0] == 0:
        return no_step(x, (h0, c0), w_ih, w_hh, b_ih, b_hh, w_hr)
    if not _wrapped and _second_order_safe(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr):
        y, h_n, c_n = _SecondOrderOnGPU.apply("lstm", {"lengths": lengths, "_wrapped": True}, x, h0, c0, w_ih, w_hh,
                                              b_ih, b_hh, w_hr)
        return y, (h_n, c_n)
    params, has_biases = _params(w_ih, w_hh, b_ih, b_hh, w_hr)
    y, (h_n, c_n) = _run(torch.lstm, x, (h0, c0), params, has_biases, lengths)
    return y, (h_n, c_n)


def irnn_step(x: Tensor, h: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor] = None,
              b_hh: Optional[Tensor] = None) -> Tensor:
    """One IRNN step: x [B, I], h [B, H] -> h_new [B, H] (nn.RNNCell's kernel)."""
    return torch.rnn_relu_cell(x, h, w_ih, w_hh, b_ih, b_hh)


def lstm_step(x: Tensor, h: Tensor, c: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor] = None,
              b_hh: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """One LSTM step: x [B, I], h, c [B, H] -> (h_new, c_new) (nn.LSTMCell's kernel)."""
    h_new, c_new = torch.lstm_cell(x, (h, c), w_ih, w_hh, b_ih, b_hh)
    return h_new, c_new
