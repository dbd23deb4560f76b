"""The ``"torch"`` backend: a plain time loop over PyTorch ops.

It is the reference every fused kernel is measured against inside the package (the
NumPy oracle in ``python/`` is the independent one), it is always available, and it
runs any dtype and device PyTorch supports. Autograd differentiates it directly.
"""

from typing import Optional, Tuple

import torch
from torch import Tensor

from ._host import active_steps, combined_bias, input_projection, no_step


def _recurrent_input(h: Tensor, mask: Optional[Tensor], active_t: Optional[Tensor]) -> Tensor:
    # a row past its length runs no step: its state must not reach the product (nor, in
    # the backward, W_hh's gradient, where 0 * NaN would be NaN)
    h = h if active_t is None else torch.where(active_t, h, 0.0)
    return h if mask is None else h * mask


def _unpadded(x: Tensor, active: Optional[Tensor]) -> Tensor:
    """x with the padding past each sequence's length zeroed: it may hold anything, and
    no value of it may reach the products or their gradients (0 * NaN is NaN)."""
    return x if active is None else torch.where(active, x, 0.0)


def _advance(new: Tensor, old: Tensor, active_t: Optional[Tensor]) -> Tensor:
    # beyond a sequence's length its state stays what it was
    return new if active_t is None else torch.where(active_t, new, old)


def _output(h: Tensor, active_t: Optional[Tensor]) -> Tensor:
    return h if active_t is None else torch.where(active_t, h, 0.0)


def irnn_loop(x, h0, w_ih, w_hh, b_ih=None, b_hh=None, recurrent_mask=None, lengths=None,
              hidden_clip=None) -> Tuple[Tensor, Tensor]:
    """IRNN layer, x [T, B, I], h0 [B, H] -> (y [T, B, H], h_T [B, H]). Options as in
    :func:`fused_rnn.irnn`: recurrent_mask [B, H] multiplies h_{t-1} in the recurrent
    product; lengths [B] stops each sequence (state frozen, y zero) after its length;
    h_t = min(relu(z_t), hidden_clip)."""
    active = active_steps(lengths, x.shape[0], x.device)
    # [T, B, G*H]: one GEMM for every step
    pre = input_projection(_unpadded(x, active), w_ih, combined_bias(b_ih, b_hh))
    h = h0
    outputs = []
    for t, pre_t in enumerate(pre):
        active_t = None if active is None else active[t]
        h_new = torch.relu(torch.addmm(pre_t, _recurrent_input(h, recurrent_mask, active_t), w_hh.t()))
        if hidden_clip is not None:
            h_new = torch.clamp(h_new, max=hidden_clip)
        h = _advance(h_new, h, active_t)
        outputs.append(_output(h, active_t))
    if not outputs:
        y, (h_n,) = no_step(x, (h0,), w_ih, w_hh, b_ih, b_hh)
        return y, h_n
    return torch.stack(outputs), h


def lstm_cell_update(gates: Tensor, c: Tensor) -> Tuple[Tensor, Tensor]:
    """From pre-activation gates [B, 4H] (order i, f, g, o) and c [B, H] to (h, c)."""
    i, f, g, o = gates.chunk(4, dim=1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    return h, c


def lstm_loop(x, h0, c0, w_ih, w_hh, b_ih=None, b_hh=None, recurrent_mask=None,
              lengths=None, w_hr=None) -> Tuple[Tensor, Tensor, Tensor]:
    """LSTM layer, x [T, B, I], h0, c0 [B, H] -> (y [T, B, H], h_T, c_T); options as in
    :func:`irnn_loop` (the mask applies to h only).

    With a projection w_hr [P, H] (``nn.LSTM(proj_size=P)``): h_t = (o * tanh(c_t)) @ w_hr^T,
    so h0, y and h_T are [., B, P], w_hh is [4H, P] and the mask [B, P]; c stays [B, H]."""
    active = active_steps(lengths, x.shape[0], x.device)
    # [T, B, G*H]: one GEMM for every step
    pre = input_projection(_unpadded(x, active), w_ih, combined_bias(b_ih, b_hh))
    h, c = h0, c0
    outputs = []
    for t, pre_t in enumerate(pre):
        active_t = None if active is None else active[t]
        # c too: a length-0 row's c0 must not reach the cell's backward either
        gates = torch.addmm(pre_t, _recurrent_input(h, recurrent_mask, active_t), w_hh.t())
        c_in = c if active_t is None else torch.where(active_t, c, 0.0)
        h_new, c_new = lstm_cell_update(gates, c_in)
        if w_hr is not None:
            h_new = h_new @ w_hr.t()
        h, c = _advance(h_new, h, active_t), _advance(c_new, c, active_t)
        outputs.append(_output(h, active_t))
    if not outputs:
        y, (h_n, c_n) = no_step(x, (h0, c0), w_ih, w_hh, b_ih, b_hh, w_hr)
        return y, h_n, c_n
    return torch.stack(outputs), h, c


def irnn_step(x, h, w_ih, w_hh, b_ih=None, b_hh=None) -> Tensor:
    """One IRNN step, x [B, I], h [B, H] -> h_new [B, H]."""
    return irnn_loop(x.unsqueeze(0), h, w_ih, w_hh, b_ih, b_hh)[1]


def lstm_step(x, h, c, w_ih, w_hh, b_ih=None, b_hh=None) -> Tuple[Tensor, Tensor]:
    """One LSTM step, x [B, I], h, c [B, H] -> (h_new, c_new)."""
    _, h, c = lstm_loop(x.unsqueeze(0), h, c, w_ih, w_hh, b_ih, b_hh)
    return h, c
