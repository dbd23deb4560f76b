"""The ``"torch"`` backend: a plain time loop over PyTorch ops.

It is the reference every fused kernel is measured against inside the package (the
NumPy oracle in ``python/`` is the independent one), it is always available, and it
runs any dtype and device PyTorch supports. Autograd differentiates it directly.
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


def _input_projection(x: Tensor, w_ih: Tensor, b_ih: Optional[Tensor], b_hh: Optional[Tensor]) -> Tensor:
    # [T, B, G*H]: one GEMM for every time step
    pre = F.linear(x, w_ih, b_ih)
    if b_hh is not None:
        pre = pre + b_hh
    return pre


def irnn_loop(x, h0, w_ih, w_hh, b_ih=None, b_hh=None) -> Tuple[Tensor, Tensor]:
    """IRNN layer, x [T, B, I], h0 [B, H] -> (y [T, B, H], h_T [B, H])."""
    pre = _input_projection(x, w_ih, b_ih, b_hh)
    h = h0
    outputs = []
    for pre_t in pre:
        h = torch.relu(torch.addmm(pre_t, h, w_hh.t()))
        outputs.append(h)
    if not outputs:
        return pre.new_empty(0, x.shape[1], w_hh.shape[1]), h0.clone()
    return torch.stack(outputs), h


def lstm_cell_update(gates: Tensor, c: Tensor) -> Tuple[Tensor, Tensor]:
    """From pre-activation gates [B, 4H] (order i, f, g, o) and c [B, H] to (h, c)."""
    i, f, g, o = gates.chunk(4, dim=1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    return h, c


def lstm_loop(x, h0, c0, w_ih, w_hh, b_ih=None, b_hh=None) -> Tuple[Tensor, Tensor, Tensor]:
    """LSTM layer, x [T, B, I], h0, c0 [B, H] -> (y [T, B, H], h_T, c_T)."""
    pre = _input_projection(x, w_ih, b_ih, b_hh)
    h, c = h0, c0
    outputs = []
    for pre_t in pre:
        h, c = lstm_cell_update(torch.addmm(pre_t, h, w_hh.t()), c)
        outputs.append(h)
    if not outputs:
        return pre.new_empty(0, x.shape[1], w_hh.shape[1]), h0.clone(), c0.clone()
    return torch.stack(outputs), h, c


def irnn_step(x, h, w_ih, w_hh, b_ih=None, b_hh=None) -> Tensor:
    """One IRNN step, x [B, I], h [B, H] -> h_new [B, H]."""
    return irnn_loop(x.unsqueeze(0), h, w_ih, w_hh, b_ih, b_hh)[1]


def lstm_step(x, h, c, w_ih, w_hh, b_ih=None, b_hh=None) -> Tuple[Tensor, Tensor]:
    """One LSTM step, x [B, I], h, c [B, H] -> (h_new, c_new)."""
    _, h, c = lstm_loop(x.unsqueeze(0), h, c, w_ih, w_hh, b_ih, b_hh)
    return h, c
