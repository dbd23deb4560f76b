"""The functional API: check the arguments, choose a backend, call its op.

:func:`irnn`, :func:`lstm` (one layer over a sequence) and :func:`irnn_cell`,
:func:`lstm_cell` (one step) take the tensors of one layer, sequence first. Each call
validates its arguments (``_validation.py``), asks :mod:`fused_rnn.dispatch` which
backend runs them, and calls that backend's op: a ``fused_rnn::`` custom op whose
autograd is registered on the op itself (``ops.py`` for the C++ kernels, ``triton/ops.py``
for the Triton ones), or the differentiable torch loop (``torch_loop.py``).

:class:`IRNNFunction`, :class:`LSTMFunction`, :class:`IRNNCellFunction` and
:class:`LSTMCellFunction` are the documented entry points to the compiled kernels'
ops with the two biases as torch.nn keeps them, without argument checks or dispatch.

Empty inputs: T = 0 gives ``y`` of shape [0, B, H] and the initial state as the final
state; B = 0 gives empty outputs. Non-contiguous inputs are accepted (copied to
contiguous memory before a kernel sees them). NaN and Inf propagate like in the
PyTorch ops.
"""

import warnings
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _measure, nn_backend, torch_loop
from . import ops as _compiled_ops  # noqa: F401  (registers the compiled ops' fakes and autograd)
from ._host import combined_bias, zero_state
from ._validation import InputTypeError, check_layer_args, check_sequence_options

# available_backends and select_backend stay importable from here, where they lived
from .dispatch import (  # noqa: F401
    MASK_GRADIENT,
    WIDE_PROJECTION,
    auto_choice,
    available_backends,
    select_backend,
)


class IRNNFunction:
    """The compiled IRNN scan as one differentiable call (the ``fused_rnn::irnn_scan_forward``
    op, CPU or CUDA by the tensors' device).

    ``IRNNFunction.apply(x, h0, w_ih, w_hh, b_ih, b_hh[, recurrent_mask, lengths,
    hidden_clip]) -> (y, h_T)`` with x [T, B, I], h0 [B, H], w_ih [H, I], w_hh [H, H],
    b_ih, b_hh [H] or None; y [T, B, H], h_T [B, H]. float32 or float64 (bfloat16/float16
    with float32 state). Most code should call :func:`irnn`, which checks the arguments
    and picks the backend.
    """

    @staticmethod
    def apply(x, h0, w_ih, w_hh, b_ih=None, b_hh=None, recurrent_mask=None, lengths=None, hidden_clip=None):
        return torch.ops.fused_rnn.irnn_scan_forward(x, h0, w_ih, w_hh, combined_bias(b_ih, b_hh), recurrent_mask,
                                                     lengths, hidden_clip)


class LSTMFunction:
    """The compiled LSTM scan as one differentiable call (``fused_rnn::lstm_scan_forward``).

    ``LSTMFunction.apply(x, h0, c0, w_ih, w_hh, b_ih, b_hh[, recurrent_mask, lengths[,
    w_hr]]) -> (y, h_T, c_T, cells, gates)`` with x [T, B, I], h0 [B, P], c0 [B, H],
    w_ih [4H, I], w_hh [4H, P], b_ih, b_hh [4H] or None (gate order i, f, g, o as in
    torch.nn.LSTM), and the projection w_hr [P, H] or None (then P = H); y [T, B, P];
    cells and gates are the saved state, not differentiable. Most code should call
    :func:`lstm`.
    """

    @staticmethod
    def apply(x, h0, c0, w_ih, w_hh, b_ih=None, b_hh=None, recurrent_mask=None, lengths=None, w_hr=None):
        return torch.ops.fused_rnn.lstm_scan_forward(x, h0, c0, w_ih, w_hh, combined_bias(b_ih, b_hh),
                                                     recurrent_mask, lengths, w_hr)


class IRNNCellFunction:
    """One compiled IRNN step: ``apply(x [B, I], h [B, H], w_ih, w_hh, b_ih, b_hh) -> h_new``."""

    @staticmethod
    def apply(x, h, w_ih, w_hh, b_ih=None, b_hh=None):
        return torch.ops.fused_rnn.irnn_step(x, h, w_ih, w_hh, combined_bias(b_ih, b_hh))


class LSTMCellFunction:
    """One compiled LSTM step: ``apply(x, h, c, w_ih, w_hh, b_ih, b_hh) -> (h_new, c_new, gates)``."""

    @staticmethod
    def apply(x, h, c, w_ih, w_hh, b_ih=None, b_hh=None):
        return torch.ops.fused_rnn.lstm_step(x, h, c, w_ih, w_hh, combined_bias(b_ih, b_hh))


def _contiguous(*tensors):
    """For the Triton launchers, which index dense tensors; the C++ ops (CPU and CUDA)
    make their inputs contiguous themselves, in C++, or read them through ATen ops that
    take strides (tests/test_functional.py's non-contiguous test runs the CPU ops)."""
    return [None if t is None else t.contiguous() for t in tensors]


def _triton_ops():
    from .triton import ops as triton_ops  # registers the Triton ops on first use (imports triton)
    return triton_ops


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype of torch.autocast when it is on for `device_type`, else None."""
    try:
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    except RuntimeError:  # a device type without autocast (meta tensors: shapes only)
        return None


def _autocast(x: Tensor, *tensors):
    """Under torch.autocast on x's device, the float32 tensors in the autocast dtype
    (bfloat16 or float16): the kernels then run that mixed precision, float32 state and
    accumulation, as they do for such inputs. Gradients flow back to the float32
    originals through the casts. Unchanged outside autocast."""
    if not isinstance(x, Tensor):  # check_layer_args names the mistake
        return (x, *tensors)
    # is_cpu before x.device, which builds a device object: this runs on every layer call
    dtype = autocast_dtype("cpu" if x.is_cpu else x.device.type)
    if dtype is None:
        return (x, *tensors)
    return tuple(t.to(dtype) if isinstance(t, Tensor) and t.dtype == torch.float32 else t for t in (x, *tensors))


def _options_in_use(**options) -> Tuple[str, ...]:
    """The names of the options given, and dispatch.MASK_GRADIENT for a recurrent mask
    autograd must differentiate (dispatch then takes the one backend that does)."""
    used = tuple(name for name, value in options.items() if value is not None)
    mask = options.get("recurrent_mask")
    if mask is not None and mask.requires_grad and torch.is_grad_enabled():
        used += (MASK_GRADIENT,)
    return used


def irnn(
    x: Tensor,
    h0: Optional[Tensor],
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor] = None,
    b_hh: Optional[Tensor] = None,
    backend: str = "auto",
    *,
    recurrent_mask: Optional[Tensor] = None,
    lengths: Optional[Tensor] = None,
    hidden_clip: Optional[float] = None,
) -> Tuple[Tensor, Tensor]:
    """One IRNN layer: ``h_t = relu(x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh)``.

    x [T, B, I]; h0 [B, H] or None (zeros); w_ih [H, I]; w_hh [H, H]; b_ih, b_hh [H] or None.
    Returns (y [T, B, H], h_T [B, H]). Differentiable in every tensor argument.

    Options: ``recurrent_mask`` [B, H] multiplies h_{t-1} in the recurrent product at
    every step (variational recurrent dropout: 0 or 1/(1-p), one mask per sequence);
    ``lengths`` [B] integers: sequence b stops after lengths[b] steps (its state is then
    frozen, so h_T is the state at its length, and y is zero beyond it);
    ``hidden_clip`` c: ``h_t = min(relu(z_t), c)``. The fused kernels take the mask as a
    constant: a mask that requires grad runs on the torch loop, which differentiates it
    (naming a fused backend for it raises). Padding past a sequence's length reaches no
    output and no gradient.
    """
    x, h0, w_ih, w_hh, b_ih, b_hh, recurrent_mask = _autocast(x, h0, w_ih, w_hh, b_ih, b_hh, recurrent_mask)
    check_layer_args(x, {"h0": h0}, w_ih, w_hh, b_ih, b_hh, gates=1, x_rank=3)
    options = ()
    if recurrent_mask is not None or lengths is not None or hidden_clip is not None:
        check_sequence_options(x, w_hh.shape[1], recurrent_mask, lengths, hidden_clip)
        options = _options_in_use(recurrent_mask=recurrent_mask, lengths=lengths, hidden_clip=hidden_clip)
    tensors = (x, h0, w_ih, w_hh, b_ih, b_hh)

    def run(name):
        return _irnn_on(name, *tensors, recurrent_mask, lengths, hidden_clip)

    return _run_with_fallback("irnn", backend, tensors, w_hh.shape[1], options, run)


def _irnn_on(name, x, h0, w_ih, w_hh, b_ih, b_hh, recurrent_mask, lengths, hidden_clip):
    """One IRNN layer on backend `name` (arguments checked)."""
    hidden = w_hh.shape[1]
    if name == "triton":  # takes h0=None as zeros without a zeros tensor
        _triton_ops()
        return _call_op(torch.ops.fused_rnn.triton_irnn_scan_forward,
                        *_contiguous(x, h0, w_ih, w_hh, combined_bias(b_ih, b_hh)), False, recurrent_mask, lengths,
                        hidden_clip)
    h0 = zero_state(x, hidden) if h0 is None else h0
    if name == "torch":
        return torch_loop.irnn_loop(x, h0, w_ih, w_hh, b_ih, b_hh, recurrent_mask, lengths, hidden_clip)
    if name == "nn":
        return nn_backend.irnn_layer(x, h0, w_ih, w_hh, b_ih, b_hh, lengths)
    return _call_op(torch.ops.fused_rnn.irnn_scan_forward, x, h0, w_ih, w_hh, combined_bias(b_ih, b_hh),
                    recurrent_mask, lengths, hidden_clip)


def lstm(
    x: Tensor,
    state: Optional[Tuple[Tensor, Tensor]],
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor] = None,
    b_hh: Optional[Tensor] = None,
    backend: str = "auto",
    *,
    recurrent_mask: Optional[Tensor] = None,
    lengths: Optional[Tensor] = None,
    w_hr: Optional[Tensor] = None,
) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
    """One LSTM layer in torch.nn.LSTM's gate order (i, f, g, o).

    x [T, B, I]; state (h0, c0) with each [B, H], or None (zeros); w_ih [4H, I];
    w_hh [4H, H]; b_ih, b_hh [4H] or None. Returns (y [T, B, H], (h_T, c_T)).
    ``recurrent_mask`` and ``lengths`` as in :func:`irnn` (the mask applies to h, not c;
    beyond its length a sequence keeps both h and c).

    ``w_hr`` [P, H]: the output projection of ``nn.LSTM(proj_size=P)``,
    ``h_t = (o_t * tanh(c_t)) @ w_hr^T``; then h0, h_T and the mask are [B, P], w_hh is
    [4H, P] and y is [T, B, P], while c0 and c_T stay [B, H]. P >= H, which nn.LSTM
    refuses, runs on the CPU kernels and the torch loop, never on torch.nn's.
    """
    h0, c0 = _unpack_state(state)
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, recurrent_mask, w_hr = _autocast(x, h0, c0, w_ih, w_hh, b_ih, b_hh,
                                                                        recurrent_mask, w_hr)
    check_layer_args(x, {"h0": h0, "c0": c0}, w_ih, w_hh, b_ih, b_hh, gates=4, x_rank=3, w_hr=w_hr)
    options = ()
    if recurrent_mask is not None or lengths is not None or w_hr is not None:
        check_sequence_options(x, w_hh.shape[1], recurrent_mask, lengths, None, "H" if w_hr is None else "P")
        options = _options_in_use(recurrent_mask=recurrent_mask, lengths=lengths, proj_size=w_hr)
        if w_hr is not None and w_hr.shape[0] >= w_hr.shape[1]:
            options += (WIDE_PROJECTION,)
    tensors = (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)

    def run(name):
        y, (h_n, c_n) = _lstm_on(name, *tensors, recurrent_mask, lengths)
        return y, h_n, c_n

    y, h_n, c_n = _run_with_fallback("lstm", backend, tensors, w_hh.shape[0] // 4, options, run)
    return y, (h_n, c_n)


def _lstm_on(name, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, recurrent_mask, lengths):
    """One LSTM layer on backend `name` (arguments checked)."""
    hidden = w_hh.shape[0] // 4
    if name == "triton":  # takes h0/c0=None as zeros without zeros tensors
        _triton_ops()
        y, h_n, c_n, _, _ = _call_op(torch.ops.fused_rnn.triton_lstm_scan_forward,
                                     *_contiguous(x, h0, c0, w_ih, w_hh, combined_bias(b_ih, b_hh)), False,
                                     recurrent_mask, lengths)
        return y, (h_n, c_n)
    h0 = zero_state(x, w_hh.shape[1]) if h0 is None else h0
    c0 = zero_state(x, hidden) if c0 is None else c0
    if name == "torch":
        y, h_n, c_n = torch_loop.lstm_loop(x, h0, c0, w_ih, w_hh, b_ih, b_hh, recurrent_mask, lengths, w_hr=w_hr)
        return y, (h_n, c_n)
    if name == "nn":
        return nn_backend.lstm_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths, w_hr)
    y, h_n, c_n, _, _ = _call_op(torch.ops.fused_rnn.lstm_scan_forward, x, h0, c0, w_ih, w_hh,
                                 combined_bias(b_ih, b_hh), recurrent_mask, lengths, w_hr)
    return y, (h_n, c_n)


def _records_grad(tensors) -> bool:
    """Whether a backward may follow: autograd records and some input requires grad."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# csrc/cuda/common.cuh kCooperativeRefused: the device would not run a cooperative grid
COOPERATIVE_REFUSED = "fused_rnn: cooperative launch refused"


def _run_with_fallback(cell, backend, tensors, hidden, options, run):
    """run(the backend for this call); when "auto" chose the persistent CUDA scans and
    the device refused their cooperative launch at run time (MPS limiting the SMs,
    another cooperative kernel holding them), the call runs on the next backend, with a
    warning; nothing is cached, so a later call tries the scans again."""
    name = _backend_for(cell, backend, tensors, hidden, options, run)
    try:
        return run(name)
    except RuntimeError as error:
        if backend != "auto" or name != "cuda" or COOPERATIVE_REFUSED not in str(error):
            raise
        refusal = str(error)
    x = tensors[0]
    choice = select_backend(x.device, x.dtype, "auto", cell=cell, hidden=hidden, batch=x.shape[1],
                            options=options, training=_records_grad(tensors), steps=x.shape[0])
    fallback = next(n for n in ("nn", "triton", "torch") if n in choice.eligible)
    warnings.warn(f"{refusal}; this call runs on backend {fallback!r} instead", RuntimeWarning,
                  stacklevel=3)
    return run(fallback)


def _backend_for(cell, backend, tensors, hidden, options, run) -> str:
    """The backend of a layer call: select_backend's choice, or with measured dispatch on
    and this kind of call not measured yet, the fastest eligible backend timed on it."""
    x = tensors[0]
    training = _records_grad(tensors)
    if backend != "auto":
        return select_backend(x.device, x.dtype, backend, cell=cell, hidden=hidden, batch=x.shape[1],
                              options=options, training=training, steps=x.shape[0]).name
    measured = _measure.measured_dispatch_enabled()
    choice = auto_choice(x.device, x.dtype, cell, hidden, x.shape[1], options, training, x.shape[0], measured)
    if not measured or choice.basis.startswith("measured") or len(choice.eligible) < 2:
        return choice.name
    differentiable = [t for t in tensors if t is not None and t.requires_grad]

    def timed_run(name):
        if not training:
            with torch.no_grad():
                return run(name)
        outputs = run(name)
        loss = sum(o.float().sum() for o in outputs)
        return (*outputs, *torch.autograd.grad(loss, differentiable, allow_unused=True))

    return _measure.measure(x.device, x.dtype, cell, hidden, x.shape[1], options, training, choice.eligible,
                            timed_run, steps=x.shape[0])


def _call_op(op, *args):
    """torch.ops.fused_rnn.<op>(*args). When autograd records nothing (no_grad, or no
    argument that requires grad) the call goes straight to the kernel: the autograd
    kernel torch.library registers for the op is Python, and would only hand the call
    on (about 15 us of a single step's 60-100 on the CPU). torch.compile traces the op
    as it is."""
    if torch.compiler.is_compiling() or (torch.is_grad_enabled()
                                         and any(isinstance(a, Tensor) and a.requires_grad for a in args)):
        return op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def irnn_cell(x, h, w_ih, w_hh, b_ih=None, b_hh=None, backend="auto") -> Tensor:
    """One IRNN step: x [B, I], h [B, H] or None -> h_new [B, H] (weights as in :func:`irnn`)."""
    # under autocast, bfloat16/float16 in and out as nn.RNNCell's (the compiled op, which autocast
    # passes by, returned float32); see lstm_cell for the LSTM's
    x, h, w_ih, w_hh, b_ih, b_hh = _autocast(x, h, w_ih, w_hh, b_ih, b_hh)
    check_layer_args(x, {"h": h}, w_ih, w_hh, b_ih, b_hh, gates=1, x_rank=2)
    h = zero_state(x, w_hh.shape[1]) if h is None else h
    name = _cell_backend(select_backend(x.device, x.dtype, backend, cell="irnn").name, w_hh)
    if name == "triton":  # one step is the scan with T = 1
        return irnn(x.unsqueeze(0), h, w_ih, w_hh, b_ih, b_hh, backend=name)[1]
    if name == "torch":
        return torch_loop.irnn_step(x, h, w_ih, w_hh, b_ih, b_hh)
    if name == "nn":
        return nn_backend.irnn_step(x, h, w_ih, w_hh, b_ih, b_hh)
    return _call_op(torch.ops.fused_rnn.irnn_step, x, h, w_ih, w_hh, combined_bias(b_ih, b_hh))


def lstm_cell(x, state, w_ih, w_hh, b_ih=None, b_hh=None, backend="auto") -> Tuple[Tensor, Tensor]:
    """One LSTM step: x [B, I], state (h, c) each [B, H] or None -> (h_new, c_new)."""
    h, c = _unpack_state(state)
    if isinstance(x, Tensor) and not x.is_cpu:
        # CUDA's autocast lists lstm_cell among its lower-precision ops: nn.LSTMCell's h and c come
        # out in the autocast dtype there, as the layers'; CPU autocast's list does not, and
        # nn.LSTMCell returns float32 (so does every backend here, casting nothing on the CPU)
        x, h, c, w_ih, w_hh, b_ih, b_hh = _autocast(x, h, c, w_ih, w_hh, b_ih, b_hh)
    check_layer_args(x, {"h": h, "c": c}, w_ih, w_hh, b_ih, b_hh, gates=4, x_rank=2)
    hidden = w_hh.shape[1]
    h = zero_state(x, hidden) if h is None else h
    c = zero_state(x, hidden) if c is None else c
    name = _cell_backend(select_backend(x.device, x.dtype, backend, cell="lstm").name, w_hh)
    if name == "triton":  # one step is the scan with T = 1
        return lstm(x.unsqueeze(0), (h, c), w_ih, w_hh, b_ih, b_hh, backend=name)[1]
    if name == "torch":
        return torch_loop.lstm_step(x, h, c, w_ih, w_hh, b_ih, b_hh)
    if name == "nn":
        return nn_backend.lstm_step(x, h, c, w_ih, w_hh, b_ih, b_hh)
    h_new, c_new, _ = _call_op(torch.ops.fused_rnn.lstm_step, x, h, c, w_ih, w_hh, combined_bias(b_ih, b_hh))
    return h_new, c_new


def _cell_backend(name: str, w_hh: Tensor) -> str:
    # a cell of hidden_size 0 (torch.nn.RNNCell allows it) has nothing for a kernel to do
    return "torch" if w_hh.shape[1] == 0 else name


def _unpack_state(state):
    if state is None:
        return None, None
    if not isinstance(state, (tuple, list)) or len(state) != 2:
        raise InputTypeError(f"state must be a tuple (h, c) of two tensors or None, got {type(state).__name__}")
    return state[0], state[1]
