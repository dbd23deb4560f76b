"""IRNN and LSTM in plain NumPy, float64, with backpropagation through time by hand.

This is the independent oracle of ``fused_rnn``: every backend (C++, Triton, CUDA, the
torch time loop) is checked against it, and it is itself checked against
``torch.nn.RNN(nonlinearity="relu")`` and ``torch.nn.LSTM``. It never imports torch,
so an error in torch cannot hide in both sides of a comparison. It is also the last
model of the char-RNN lesson: a recurrent network written from scratch with its
gradients derived on paper.

Shapes and notation
-------------------
T time steps, B sequences in the batch, I input features, H hidden units, G gates
(G = 1 for the IRNN, G = 4 for the LSTM).

    x     [T, B, I]      inputs, sequence first
    h0    [B, H]         initial hidden state (c0 [B, H] too for the LSTM)
    w_ih  [G*H, I]       input-to-hidden weights
    w_hh  [G*H, H]       hidden-to-hidden weights
    b_ih  [G*H]          biases, either may be None
    b_hh  [G*H]

Row vectors are used throughout, as in PyTorch: ``h_t @ w_hh.T`` rather than
``W h_t``. Everything is converted to float64 first.

IRNN forward
------------
An IRNN (Le, Jaitly & Hinton 2015) is a ReLU RNN whose recurrent matrix starts near
the identity. One layer computes, for t = 1..T,

    z_t = x_t @ w_ih.T + b_ih + h_{t-1} @ w_hh.T + b_hh      [B, H]
    h_t = relu(z_t)

and returns y = (h_1, ..., h_T) and h_T. The input term does not depend on h, so it
is computed for all time steps with one matrix product before the loop; only the
recurrent term has to wait for the previous step.

IRNN backward
-------------
Let L be any scalar whose gradients with respect to the outputs are given:
dy_t = dL/dh_t through y, and dh_T = dL/dh_T through the final state. The hidden state
h_t influences L directly (through y_t, and through h_T when t = T) and indirectly
through h_{t+1}. So, walking backward in time with g holding dL/dh_t:

    g     = dh_T                       before the loop
    g    += dy_t                       direct use of h_t
    dz_t  = g * [z_t > 0]              relu'(z) = 1 where z > 0, else 0 (0 at z = 0, like PyTorch)
    g     = dz_t @ w_hh                dL/dh_{t-1}, since z_t depends on h_{t-1} through w_hh

and after the loop dh0 = g. Every parameter is used once per step, so its gradient is
a sum over steps, and those sums are single matrix products once all dz_t are known:

    dw_hh = sum_t dz_t.T @ h_{t-1}     [H, H]
    dw_ih = sum_t dz_t.T @ x_t         [H, I]
    db_ih = db_hh = sum_{t,b} dz_t     [H]
    dx_t  = dz_t @ w_ih                [B, I]

LSTM forward
------------
Gates in PyTorch's order (i, f, g, o), so that ``nn.LSTM`` weights load unchanged:

    a_t = x_t @ w_ih.T + b_ih + h_{t-1} @ w_hh.T + b_hh     [B, 4H], split into
          a_i, a_f, a_g, a_o                                 [B, H] each
    i = sigmoid(a_i)   input gate       f = sigmoid(a_f)   forget gate
    g = tanh(a_g)      candidate cell   o = sigmoid(a_o)   output gate
    c_t = f * c_{t-1} + i * g
    h_t = o * tanh(c_t)

LSTM backward
-------------
Two quantities flow backward in time: dh = dL/dh_t and dc = dL/dc_t. At step t, with
dh already including dy_t, and writing k = tanh(c_t):

    do    = dh * k
    dc   += dh * o * (1 - k**2)        h_t depends on c_t through tanh
    di    = dc * g
    dg    = dc * i
    df    = dc * c_{t-1}
    dc    = dc * f                     dL/dc_{t-1}

and through the activations (sigmoid' = s (1 - s), tanh' = 1 - tanh**2):

    da_i = di * i (1 - i)     da_f = df * f (1 - f)
    da_g = dg * (1 - g**2)    da_o = do * o (1 - o)

    da_t = [da_i, da_f, da_g, da_o]    [B, 4H]
    dh   = da_t @ w_hh                 dL/dh_{t-1}, to which dy_{t-1} is added next step

The parameter and input gradients are the same matrix products as for the IRNN with
da_t in place of dz_t.

LSTM with a projection
----------------------
``nn.LSTM(proj_size=P)`` (Sak, Senior & Beaufays 2014, "Long Short-Term Memory Recurrent
Neural Network Architectures for Large Scale Acoustic Modeling") multiplies the cell's
output by w_hr [P, H] before it becomes the state that is returned and fed back:

    u_t = o * tanh(c_t)                [B, H]
    h_t = u_t @ w_hr.T                 [B, P]

so h_0, h_t, y_t and the recurrent mask have P columns and w_hh is [4H, P], while c_t
keeps H. Backward, dh (P columns, dy_t included) first goes back through the
projection, and w_hr collects its own sum:

    du_t   = dh @ w_hr                 [B, H], in place of dh in the cell backward above
    dw_hr  = sum_t dh_t.T @ u_t        [P, H]

Options (both cells unless said otherwise)
------------------------------------------
recurrent_mask m [B, H] (variational recurrent dropout, Gal & Ghahramani 2016): the
recurrent product reads h_{t-1} * m instead of h_{t-1}, the same mask at every step, so
    z_t = ... + (h_{t-1} * m) @ w_hh.T,   dL/dh_{t-1} = (dz_t @ w_hh) * m,
    dw_hh = sum_t dz_t.T @ (h_{t-1} * m).
The mask holds 0 and 1 / (1 - p); the cell state of the LSTM is not masked.

lengths [B]: sequence b has lengths[b] steps. At t >= lengths[b] its state stops
changing (h_t = h_{t-1}, c_t = c_{t-1}) and y_t is 0, so the final state is the state
at its length. Backward, those steps pass dL/dh (and dL/dc) through unchanged, ignore
dy_t, and contribute nothing to the parameter gradients.

hidden_clip c (IRNN): h_t = min(relu(z_t), c), whose derivative is 1 where 0 < z_t < c
and 0 elsewhere: a bound on the activations of long stateful ReLU recurrences.
"""

from dataclasses import dataclass

import numpy as np


def _as_float64(array):
    return None if array is None else np.asarray(array, dtype=np.float64)


def _sigmoid(a):
    # tanh form: equal to 1 / (1 + exp(-a)) and never overflows for large |a|
    return 0.5 * (1.0 + np.tanh(0.5 * a))


def _as_rows(array):
    """[T, B, N] -> [T*B, N]: every (step, sequence) pair as one row of a matrix.

    Products of 2-D matrices go to BLAS; NumPy's stacked 3-D @ 2-D product may not."""
    return array.reshape(-1, array.shape[-1])


def _input_projection(x, w_ih, b_ih, b_hh):
    """x @ w_ih.T + b_ih + b_hh for every time step at once: [T, B, I] -> [T, B, G*H]."""
    projection = (_as_rows(x) @ w_ih.T).reshape(*x.shape[:2], w_ih.shape[0])
    if b_ih is not None:
        projection = projection + b_ih
    if b_hh is not None:
        projection = projection + b_hh
    return projection


def _parameter_gradients(d_preactivation, x, h_previous, w_ih, has_b_ih, has_b_hh):
    """Gradients of the inputs and parameters from dL/d(pre-activation) of every step.

    d_preactivation [T, B, G*H], x [T, B, I], h_previous [T, B, H] (h_0 .. h_{T-1}).
    """
    # a sum over t and b of outer products is one matrix product once (t, b) is one axis
    d_rows = _as_rows(d_preactivation)  # [T*B, G*H]
    dw_ih = d_rows.T @ _as_rows(x)  # [G*H, I]
    dw_hh = d_rows.T @ _as_rows(h_previous)  # [G*H, H]
    dx = (d_rows @ w_ih).reshape(x.shape)  # [T, B, I]
    # both biases are added to the same sum, so they share one gradient
    d_bias = d_preactivation.sum(axis=(0, 1))  # [G*H]
    return {
        "dx": dx,
        "dw_ih": dw_ih,
        "dw_hh": dw_hh,
        "db_ih": d_bias.copy() if has_b_ih else None,
        "db_hh": d_bias.copy() if has_b_hh else None,
    }


def _upstream_or_zeros(gradient, shape):
    return np.zeros(shape) if gradient is None else _as_float64(gradient)


# --------------------------------------------------------------------------- IRNN


@dataclass
class IRNNCache:
    """What the IRNN backward needs from its forward."""

    x: np.ndarray  # [T, B, I]
    w_ih: np.ndarray  # [H, I]
    w_hh: np.ndarray  # [H, H]
    hidden_states: np.ndarray  # [T + 1, B, H]: h_0, h_1, ..., h_T
    preactivations: np.ndarray  # [T, B, H]: z_1, ..., z_T
    has_b_ih: bool
    has_b_hh: bool
    recurrent_mask: np.ndarray = None  # [B, H]: h_{t-1} * mask feeds the recurrent product
    active: np.ndarray = None  # [T, B, 1]: 1 where t < lengths[b]
    hidden_clip: float = None


def _recurrent_input(h, mask):
    return h if mask is None else h * mask


def _active_steps(lengths, steps, batch):
    """[T, B, 1]: 1.0 where step t is within sequence b's length (all ones without lengths)."""
    if lengths is None:
        return np.ones((steps, batch, 1))
    lengths = np.asarray(lengths)
    if lengths.shape != (batch,) or (lengths < 0).any() or (lengths > steps).any():
        raise ValueError(f"lengths must be [{batch}] integers in [0, {steps}], got {lengths!r}")
    return (np.arange(steps)[:, None] < lengths[None, :]).astype(np.float64)[:, :, None]


def irnn_forward(x, h0, w_ih, w_hh, b_ih=None, b_hh=None, recurrent_mask=None, lengths=None, hidden_clip=None):
    """One IRNN layer: h_t = relu(x_t @ w_ih.T + b_ih + h_{t-1} @ w_hh.T + b_hh).

    x [T, B, I], h0 [B, H], w_ih [H, I], w_hh [H, H], b_ih and b_hh [H] or None;
    recurrent_mask [B, H], lengths [B], hidden_clip (a float) or None (see the module
    docstring). Returns (y [T, B, H], h_T [B, H], cache); with T = 0, y is [0, B, H]
    and h_T = h0.
    """
    x, h0, w_ih, w_hh, b_ih, b_hh, mask = map(_as_float64, (x, h0, w_ih, w_hh, b_ih, b_hh, recurrent_mask))
    steps, batch, _ = x.shape
    hidden = w_hh.shape[1]
    active = _active_steps(lengths, steps, batch)  # [T, B, 1]

    input_terms = _input_projection(x, w_ih, b_ih, b_hh)  # [T, B, H]
    hidden_states = np.empty((steps + 1, batch, hidden))  # [T + 1, B, H]
    preactivations = np.empty((steps, batch, hidden))  # [T, B, H]
    hidden_states[0] = h0
    for t in range(steps):
        preactivations[t] = input_terms[t] + _recurrent_input(hidden_states[t], mask) @ w_hh.T
        h = np.maximum(preactivations[t], 0.0)
        if hidden_clip is not None:
            h = np.minimum(h, hidden_clip)
        hidden_states[t + 1] = np.where(active[t] > 0, h, hidden_states[t])

    cache = IRNNCache(x, w_ih, w_hh, hidden_states, preactivations, b_ih is not None, b_hh is not None, mask,
                      active, hidden_clip)
    return hidden_states[1:] * active, hidden_states[steps].copy(), cache


def irnn_backward(dy, dh_T, cache):
    """Backpropagation through time for :func:`irnn_forward`.

    dy [T, B, H] = dL/dy and dh_T [B, H] = dL/dh_T, either may be None (zeros).
    Returns a dict of dx [T, B, I], dh0 [B, H], dw_ih [H, I], dw_hh [H, H], and
    db_ih, db_hh [H] (None where that bias was None).
    """
    steps, batch, hidden = cache.preactivations.shape
    dy = _upstream_or_zeros(dy, (steps, batch, hidden))  # [T, B, H]
    d_hidden = _upstream_or_zeros(dh_T, (batch, hidden)).copy()  # [B, H], dL/dh_t

    active = cache.active if cache.active is not None else np.ones((steps, batch, 1))
    d_preactivations = np.empty((steps, batch, hidden))  # [T, B, H]
    for t in reversed(range(steps)):
        z = cache.preactivations[t]
        d_hidden = d_hidden + dy[t] * active[t]
        slope = z > 0.0
        if cache.hidden_clip is not None:
            slope = slope & (z < cache.hidden_clip)
        d_preactivations[t] = d_hidden * slope * active[t]
        d_recurrent = _recurrent_input(d_preactivations[t] @ cache.w_hh, cache.recurrent_mask)
        # beyond a sequence's length h_t = h_{t-1}: dL/dh passes through unchanged
        d_hidden = np.where(active[t] > 0, d_recurrent, d_hidden)

    grads = _parameter_gradients(d_preactivations, cache.x,
                                 _recurrent_input(cache.hidden_states[:-1], cache.recurrent_mask), cache.w_ih,
                                 cache.has_b_ih, cache.has_b_hh)
    grads["dh0"] = d_hidden
    return grads


# --------------------------------------------------------------------------- LSTM


@dataclass
class LSTMCache:
    """What the LSTM backward needs from its forward."""

    x: np.ndarray  # [T, B, I]
    w_ih: np.ndarray  # [4H, I]
    w_hh: np.ndarray  # [4H, H]
    hidden_states: np.ndarray  # [T + 1, B, H]: h_0, ..., h_T
    cell_states: np.ndarray  # [T + 1, B, H]: c_0, ..., c_T
    activated_gates: np.ndarray  # [T, B, 4H]: i, f, g, o after their sigmoid / tanh
    has_b_ih: bool
    has_b_hh: bool
    recurrent_mask: np.ndarray = None  # [B, P]
    active: np.ndarray = None  # [T, B, 1]
    w_hr: np.ndarray = None  # [P, H], the projection (None: h_t = u_t, P = H)


def lstm_forward(x, h0, c0, w_ih, w_hh, b_ih=None, b_hh=None, recurrent_mask=None, lengths=None, w_hr=None):
    """One LSTM layer, gate order (i, f, g, o) as in torch.nn.LSTM.

    x [T, B, I], h0 [B, P] and c0 [B, H], w_ih [4H, I], w_hh [4H, P], b_ih and b_hh [4H]
    or None; recurrent_mask [B, P] and lengths [B] or None; w_hr [P, H], the projection
    of nn.LSTM(proj_size=P), or None (then P = H); see the module docstring.
    Returns (y [T, B, P], h_T [B, P], c_T [B, H], cache); with T = 0, y is [0, B, P]
    and (h_T, c_T) = (h0, c0).
    """
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, mask, w_hr = map(
        _as_float64, (x, h0, c0, w_ih, w_hh, b_ih, b_hh, recurrent_mask, w_hr))
    steps, batch, _ = x.shape
    hidden, width = w_hh.shape[0] // 4, w_hh.shape[1]
    active = _active_steps(lengths, steps, batch)  # [T, B, 1]

    input_terms = _input_projection(x, w_ih, b_ih, b_hh)  # [T, B, 4H]
    hidden_states = np.empty((steps + 1, batch, width))  # [T + 1, B, P]
    cell_states = np.empty((steps + 1, batch, hidden))  # [T + 1, B, H]
    activated_gates = np.empty((steps, batch, 4 * hidden))  # [T, B, 4H]
    hidden_states[0] = h0
    cell_states[0] = c0
    for t in range(steps):
        gate_preactivations = input_terms[t] + _recurrent_input(hidden_states[t], mask) @ w_hh.T  # [B, 4H]
        a_i, a_f, a_g, a_o = np.split(gate_preactivations, 4, axis=1)
        i, f, g, o = _sigmoid(a_i), _sigmoid(a_f), np.tanh(a_g), _sigmoid(a_o)
        activated_gates[t] = np.concatenate([i, f, g, o], axis=1)
        c = f * cell_states[t] + i * g
        h = o * np.tanh(c)
        if w_hr is not None:
            h = h @ w_hr.T
        cell_states[t + 1] = np.where(active[t] > 0, c, cell_states[t])
        hidden_states[t + 1] = np.where(active[t] > 0, h, hidden_states[t])

    cache = LSTMCache(
        x, w_ih, w_hh, hidden_states, cell_states, activated_gates, b_ih is not None, b_hh is not None, mask, active,
        w_hr,
    )
    return hidden_states[1:] * active, hidden_states[steps].copy(), cell_states[steps].copy(), cache


def lstm_backward(dy, dh_T, dc_T, cache):
    """Backpropagation through time for :func:`lstm_forward`.

    dy [T, B, P], dh_T [B, P], dc_T [B, H]: gradients of the loss with respect to the
    outputs, any of them may be None (zeros). Returns a dict of dx [T, B, I],
    dh0 [B, P], dc0 [B, H], dw_ih [4H, I], dw_hh [4H, P], db_ih, db_hh [4H] (None where
    that bias was None), and dw_hr [P, H] (None without a projection).
    """
    steps, batch, width = cache.hidden_states.shape[0] - 1, *cache.hidden_states.shape[1:]
    hidden = cache.cell_states.shape[2]
    dy = _upstream_or_zeros(dy, (steps, batch, width))  # [T, B, P]
    d_hidden = _upstream_or_zeros(dh_T, (batch, width)).copy()  # [B, P], dL/dh_t
    d_cell = _upstream_or_zeros(dc_T, (batch, hidden)).copy()  # [B, H], dL/dc_t

    active = cache.active if cache.active is not None else np.ones((steps, batch, 1))
    d_gate_preactivations = np.empty((steps, batch, 4 * hidden))  # [T, B, 4H]
    d_w_hr = None if cache.w_hr is None else np.zeros_like(cache.w_hr)  # [P, H]
    for t in reversed(range(steps)):
        d_hidden_in = d_hidden + dy[t] * active[t]  # dL/dh_t, [B, P]
        i, f, g, o = np.split(cache.activated_gates[t], 4, axis=1)
        tanh_cell = np.tanh(cache.cell_states[t + 1])
        if cache.w_hr is not None:
            # h_t = u_t @ w_hr.T with u_t = o * tanh(c_t); steps past a length add nothing
            d_w_hr += (d_hidden_in * active[t]).T @ (o * tanh_cell)
            d_hidden_in = d_hidden_in @ cache.w_hr  # dL/du_t, [B, H]

        d_o = d_hidden_in * tanh_cell
        d_cell_in = d_cell + d_hidden_in * o * (1.0 - tanh_cell**2)
        d_i = d_cell_in * g
        d_g = d_cell_in * i
        d_f = d_cell_in * cache.cell_states[t]

        d_gate_preactivations[t] = active[t] * np.concatenate(
            [d_i * i * (1.0 - i), d_f * f * (1.0 - f), d_g * (1.0 - g**2), d_o * o * (1.0 - o)],
            axis=1,
        )
        # beyond a sequence's length the state is carried: dL/dh and dL/dc pass unchanged
        d_hidden = np.where(active[t] > 0,
                            _recurrent_input(d_gate_preactivations[t] @ cache.w_hh, cache.recurrent_mask), d_hidden)
        d_cell = np.where(active[t] > 0, d_cell_in * f, d_cell)

    grads = _parameter_gradients(d_gate_preactivations, cache.x,
                                 _recurrent_input(cache.hidden_states[:-1], cache.recurrent_mask), cache.w_ih,
                                 cache.has_b_ih, cache.has_b_hh)
    grads["dh0"] = d_hidden
    grads["dc0"] = d_cell
    grads["dw_hr"] = d_w_hr
    return grads
