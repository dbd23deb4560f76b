"""Functional entry points, the public autograd Functions, and backend dispatch.

Backends:

- ``"cpp"``: the fused C++ CPU kernels of ``fused_rnn._C`` (float32, float64; bfloat16 and
  float16 with float32 state and accumulation; CPU tensors).
- ``"cuda"``: the persistent CUDA scans of ``fused_rnn._C`` (float32, bfloat16, float16
  with float32 state; CUDA tensors), for layers whose W_hh fits in the GPU's shared
  memory and batches of at most ``CUDA_SCAN_MAX_BATCH`` rows (csrc/cuda/scan_plan.h).
- ``"triton"``: the Triton scans of ``fused_rnn.triton`` (float32, bfloat16 and float16
  with float32 state and accumulation; CUDA tensors, or CPU
  tensors under the Triton interpreter, ``TRITON_INTERPRET=1``, when asked for by name).
- ``"torch"``: a plain time loop over PyTorch ops (any dtype and device; always there).
- ``"auto"`` (default): the fastest backend that can take the tensors' device and
  dtype, falling back to ``"torch"`` rather than failing. :func:`select_backend`
  says which one it picks and why the faster ones were skipped.

Empty inputs: T = 0 gives ``y`` of shape [0, B, H] and the initial state as the final
state; B = 0 gives empty outputs. Non-contiguous inputs are accepted (copied to
contiguous memory before a kernel sees them). NaN and Inf propagate like in the
PyTorch ops.
"""

import os
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from . import ops as _ops
from . import torch_loop
from ._double_backward import (irnn_cell_grads, irnn_layer_grads, lstm_cell_grads, lstm_layer_grads,
                               wants_graph)
from ._extension import _C, HAS_C, IMPORT_ERROR, REBUILD_HINT
from ._validation import InputTypeError, check_layer_args, check_sequence_options

# Which dtypes and device types each compiled backend's kernels take.
_KERNEL_SUPPORT = {
    # bfloat16/float16: float32 state and accumulation, inputs converted at the call
    "cpp": {"device_types": ("cpu",), "dtypes": (torch.float32, torch.float64, torch.bfloat16, torch.float16)},
    "cuda": {"device_types": ("cuda",), "dtypes": (torch.float32, torch.bfloat16, torch.float16)},
    "triton": {"device_types": ("cuda",), "dtypes": (torch.float32, torch.bfloat16, torch.float16)},
}
BACKENDS = ("cpp", "cuda", "triton", "torch")
# The options each compiled backend takes ("torch" takes them all): the per-sequence
# options, which every kernel implements, and the LSTM's output projection
# (nn.LSTM(proj_size=P), the w_hr argument), which only the CPU kernels do. Dispatch
# checks this table before using a backend.
_OPTIONS = ("recurrent_mask", "lengths", "hidden_clip")
OPTION_SUPPORT = {"cpp": _OPTIONS + ("proj_size",), "cuda": _OPTIONS, "triton": _OPTIONS}
_GATES = {"irnn": 1, "lstm": 4}


def _triton_missing() -> Optional[str]:
    """Why the Triton backend cannot run here (None if it can); imports triton lazily."""
    from .triton import HAS_TRITON, TRITON_IMPORT_ERROR
    return None if HAS_TRITON else f"triton is not importable ({TRITON_IMPORT_ERROR})"


def _interpreting_triton() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def available_backends(device="cpu") -> List[str]:
    """Backends this install can run on `device` ("cpu", "cuda", a torch.device), fastest first."""
    device_type = torch.device(device).type
    names = [
        name for name, support in _KERNEL_SUPPORT.items()
        if device_type in support["device_types"] and _missing_requirement(name) is None
    ]
    return names + ["torch"]


def _missing_requirement(name: str) -> Optional[str]:
    if name == "triton":
        return _triton_missing()
    if not HAS_C:
        return f"fused_rnn._C is not available ({IMPORT_ERROR}); {REBUILD_HINT}"
    if name == "cuda" and not hasattr(_C, "cuda_scan_unsupported"):
        return f"fused_rnn._C was built without CUDA (a CPU-only torch, or no nvcc at build time); {REBUILD_HINT}"
    return None


def _cuda_scan_reason(device: torch.device, dtype: torch.dtype, cell: str, hidden: int,
                      batch: Optional[int]) -> Optional[str]:
    """Why the persistent CUDA scan cannot take this layer (None if it can)."""
    if batch is not None and batch > _C.CUDA_SCAN_MAX_BATCH:
        return (f"batch {batch} > {_C.CUDA_SCAN_MAX_BATCH}: the persistent CUDA scan is for small batches; a "
                f"batch-tiled kernel reuses W_hh over more rows")
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    index = device.index if device.index is not None else torch.cuda.current_device()
    reason = _C.cuda_scan_unsupported(index, _GATES[cell], str(dtype).replace("torch.", ""), hidden)
    return reason or None


class BackendChoice(NamedTuple):
    name: str
    skipped: Dict[str, str]  # faster backend -> why it could not take these tensors


def _unsupported_reason(name: str, device: torch.device, dtype: torch.dtype, explicit: bool = False,
                        cell: Optional[str] = None, hidden: Optional[int] = None,
                        batch: Optional[int] = None, options: Tuple[str, ...] = ()) -> Optional[str]:
    if name == "torch":
        return None
    if name not in _KERNEL_SUPPORT:
        return f"unknown backend {name!r}; expected one of {('auto',) + BACKENDS}"
    support = _KERNEL_SUPPORT[name]
    # the Triton interpreter runs the kernels on CPU tensors: for tests, never for "auto"
    interpreted = name == "triton" and explicit and device.type == "cpu" and _interpreting_triton()
    if device.type not in support["device_types"] and not interpreted:
        return f"backend {name!r} runs on {'/'.join(support['device_types'])} tensors, got {device.type}"
    missing = _missing_requirement(name)
    if missing is not None:
        return missing
    if dtype not in support["dtypes"]:
        names = ", ".join(str(d).replace("torch.", "") for d in support["dtypes"])
        return f"backend {name!r} takes {names}, got {str(dtype).replace('torch.', '')}"
    missing_options = [o for o in options if o not in OPTION_SUPPORT[name]]
    if missing_options:
        return f"backend {name!r} does not implement {', '.join(missing_options)}"
    if hidden == 0 and name in ("cuda", "triton"):
        return "hidden_size 0: an empty layer, which the torch loop returns without launching a kernel"
    if name == "triton" and cell is not None:
        from .triton.common import missing_configs
        return missing_configs(cell, dtype, options=bool(options))
    if name == "cuda" and cell is not None and hidden is not None:
        return _cuda_scan_reason(device, dtype, cell, hidden, batch)
    return None


def select_backend(device, dtype: torch.dtype, backend: str = "auto", cell: Optional[str] = None,
                   hidden: Optional[int] = None, batch: Optional[int] = None,
                   options: Tuple[str, ...] = ()) -> BackendChoice:
    """The backend that runs tensors of `device` and `dtype` (raises ValueError if an
    explicitly requested backend cannot). `cell` ("irnn" or "lstm"), when given, also
    checks that the backend's kernels for that cell have a launch config for the dtype;
    with `hidden` (and `batch`) it checks the shape limits of a whole-sequence scan (the
    CUDA scans keep W_hh on chip). `options` names the per-sequence options in use
    ("recurrent_mask", "lengths", "hidden_clip"), which not every backend implements."""
    device = torch.device(device)
    if backend != "auto":
        reason = _unsupported_reason(backend, device, dtype, explicit=True, cell=cell, hidden=hidden, batch=batch,
                                     options=options)
        if reason is not None:
            raise ValueError(f"backend={backend!r} cannot run these inputs: {reason}")
        return BackendChoice(backend, {})
    skipped = {}
    for name in BACKENDS:
        reason = _unsupported_reason(name, device, dtype, cell=cell, hidden=hidden, batch=batch, options=options)
        if reason is None:
            return BackendChoice(name, skipped)
        skipped[name] = reason
    raise AssertionError("the torch backend takes every input")  # unreachable


def _contiguous(*tensors):
    return tuple(None if t is None else t.contiguous() for t in tensors)


def _combined_bias(b_ih: Optional[Tensor], b_hh: Optional[Tensor]) -> Optional[Tensor]:
    if b_ih is None:
        return b_hh
    return b_ih if b_hh is None else b_ih + b_hh


def _split_bias_grad(dbias: Tensor, b_ih, b_hh):
    # b_ih and b_hh get equal gradients; separate tensors, so that an in-place change
    # of one .grad (clipping, say) never reaches the other
    grad_b_ih = dbias if b_ih is not None else None
    grad_b_hh = None if b_hh is None else (dbias.clone() if b_ih is not None else dbias)
    return grad_b_ih, grad_b_hh


class IRNNFunction(torch.autograd.Function):
    """Fused IRNN layer over a whole sequence on the compiled kernels.

    ``IRNNFunction.apply(x, h0, w_ih, w_hh, b_ih, b_hh[, recurrent_mask, lengths,
    hidden_clip]) -> (y, h_T)`` with x [T, B, I],
    h0 [B, H], w_ih [H, I], w_hh [H, H], b_ih, b_hh [H] or None; y [T, B, H], h_T [B, H].
    All tensors contiguous, one dtype (float32/float64) and device. Most code should call
    :func:`irnn`, which checks arguments and picks the backend.
    """

    @staticmethod
    def forward(x, h0, w_ih, w_hh, b_ih, b_hh, recurrent_mask=None, lengths=None, hidden_clip=None):
        return torch.ops.fused_rnn.irnn_scan_forward(x, h0, w_ih, w_hh, _combined_bias(b_ih, b_hh), recurrent_mask,
                                                     lengths, hidden_clip)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, h0, w_ih, w_hh, b_ih, b_hh, *options = inputs
        # the biases too (read only by a create_graph backward): saved, so that an in-place
        # change of one after the forward is an error rather than a silent recomputation
        ctx.save_for_backward(x, h0, w_ih, w_hh, output[0], b_ih, b_hh)
        ctx.given_options = len(options)  # apply() may be called without the options
        ctx.options = tuple(options) + (None,) * (3 - len(options))
        ctx.set_materialize_grads(False)  # unused outputs cost no zero-filled gradients

    @staticmethod
    def backward(ctx, grad_y, grad_h_n):
        # saved tensors are read once per backward (non-reentrant checkpointing allows no more)
        x, h0, w_ih, w_hh, y, b_ih, b_hh = ctx.saved_tensors
        if wants_graph():  # create_graph=True: the backward ops have no derivative of their own
            grads = irnn_layer_grads((x, h0, w_ih, w_hh, b_ih, b_hh), ctx.needs_input_grad, (grad_y, grad_h_n),
                                     ctx.options)
            return grads + (None,) * ctx.given_options
        dx, dh0, dw_ih, dw_hh, dbias = _ops.irnn_scan_grads((x, h0, w_ih, w_hh, y), grad_y, grad_h_n,
                                                            ctx.needs_input_grad[0], ctx.options)
        return (dx, dh0, dw_ih, dw_hh, *_split_bias_grad(dbias, b_ih, b_hh)) + (None,) * ctx.given_options


class LSTMFunction(torch.autograd.Function):
    """Fused LSTM layer over a whole sequence on the compiled kernels.

    ``LSTMFunction.apply(x, h0, c0, w_ih, w_hh, b_ih, b_hh[, recurrent_mask, lengths[,
    w_hr]]) -> (y, h_T, c_T, cells, gates)`` with x [T, B, I], h0 [B, P], c0 [B, H],
    w_ih [4H, I], w_hh [4H, P], b_ih, b_hh [4H] or None (gate order i, f, g, o as in
    torch.nn.LSTM), and the projection w_hr [P, H] or None (then P = H); y [T, B, P].
    Most code should call :func:`lstm`.
    """

    @staticmethod
    def forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, recurrent_mask=None, lengths=None, w_hr=None):
        return torch.ops.fused_rnn.lstm_scan_forward(x, h0, c0, w_ih, w_hh, _combined_bias(b_ih, b_hh),
                                                     recurrent_mask, lengths, w_hr)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, h0, c0, w_ih, w_hh, b_ih, b_hh, *options = inputs
        ctx.given_options = len(options)  # apply() may be called without the options
        options = tuple(options) + (None,) * (3 - len(options))
        ctx.options, w_hr = options[:2], options[2]
        y, _, _, cells, gates = output
        ctx.save_for_backward(x, h0, c0, w_ih, w_hh, y, cells, gates, w_hr, b_ih, b_hh)
        ctx.mark_non_differentiable(cells, gates)
        ctx.set_materialize_grads(False)  # unused outputs cost no zero-filled gradients

    @staticmethod
    def backward(ctx, grad_y, grad_h_n, grad_c_n, _grad_cells, _grad_gates):
        *saved, b_ih, b_hh = ctx.saved_tensors  # read once (non-reentrant checkpointing)
        x, h0, c0, w_ih, w_hh, y, cells, gates, w_hr = saved
        if wants_graph():  # create_graph=True: the backward ops have no derivative of their own
            *grads, dw_hr = lstm_layer_grads((x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr),
                                             ctx.needs_input_grad[:7] + (ctx.needs_input_grad[9:] or (False,)),
                                             (grad_y, grad_h_n, grad_c_n), ctx.options)
        else:
            dx, dh0, dc0, dw_ih, dw_hh, dbias, dw_hr = _ops.lstm_scan_grads(
                saved, grad_y, grad_h_n, grad_c_n, ctx.needs_input_grad[0], ctx.options)
            grads = (dx, dh0, dc0, dw_ih, dw_hh, *_split_bias_grad(dbias, b_ih, b_hh))
        # one gradient per argument given to apply(): none for the mask and lengths
        return (*grads, None, None, dw_hr)[:7 + ctx.given_options]


class IRNNCellFunction(torch.autograd.Function):
    """One fused IRNN step: ``apply(x [B, I], h [B, H], w_ih, w_hh, b_ih, b_hh) -> h_new``."""

    @staticmethod
    def forward(x, h, w_ih, w_hh, b_ih, b_hh):
        return torch.ops.fused_rnn.irnn_step(x, h, w_ih, w_hh, _combined_bias(b_ih, b_hh))

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, h, w_ih, w_hh, b_ih, b_hh = inputs
        ctx.save_for_backward(x, h, w_ih, w_hh, output, b_ih, b_hh)
        ctx.set_materialize_grads(False)  # unused outputs cost no zero-filled gradients

    @staticmethod
    def backward(ctx, grad_h_new):
        x, h, w_ih, w_hh, h_new, b_ih, b_hh = ctx.saved_tensors
        if wants_graph():  # create_graph=True: the backward ops have no derivative of their own
            return irnn_cell_grads((x, h, w_ih, w_hh, b_ih, b_hh), ctx.needs_input_grad, grad_h_new)
        dx, dh, dw_ih, dw_hh, dbias = _ops.irnn_step_grads((x, h, w_ih, w_hh, h_new), grad_h_new)
        return (dx, dh, dw_ih, dw_hh, *_split_bias_grad(dbias, b_ih, b_hh))


class LSTMCellFunction(torch.autograd.Function):
    """One fused LSTM step: ``apply(x, h, c, w_ih, w_hh, b_ih, b_hh) -> (h_new, c_new, gates)``."""

    @staticmethod
    def forward(x, h, c, w_ih, w_hh, b_ih, b_hh):
        return torch.ops.fused_rnn.lstm_step(x, h, c, w_ih, w_hh, _combined_bias(b_ih, b_hh))

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, h, c, w_ih, w_hh, b_ih, b_hh = inputs
        _, c_new, gates = output
        ctx.save_for_backward(x, h, c, w_ih, w_hh, c_new, gates, b_ih, b_hh)
        ctx.mark_non_differentiable(gates)
        ctx.set_materialize_grads(False)  # unused outputs cost no zero-filled gradients

    @staticmethod
    def backward(ctx, grad_h_new, grad_c_new, _grad_gates):
        *saved, b_ih, b_hh = ctx.saved_tensors
        if wants_graph():  # create_graph=True: the backward ops have no derivative of their own
            return lstm_cell_grads((*saved[:5], b_ih, b_hh), ctx.needs_input_grad, (grad_h_new, grad_c_new))
        dx, dh, dc, dw_ih, dw_hh, dbias = _ops.lstm_step_grads(saved, grad_h_new, grad_c_new)
        return (dx, dh, dc, dw_ih, dw_hh, *_split_bias_grad(dbias, b_ih, b_hh))


def _zero_state(x: Tensor, hidden: int) -> Tensor:
    return x.new_zeros(x.shape[-2], hidden)


def _autocast(x: Tensor, *tensors):
    """Under torch.autocast on x's device, the float32 tensors in the autocast dtype
    (bfloat16 or float16): the kernels then run that mixed precision, float32 state and
    accumulation, as they do for such inputs. Gradients flow back to the float32
    originals through the casts. Unchanged outside autocast."""
    device_type = x.device.type
    try:
        enabled = torch.is_autocast_enabled(device_type)
        dtype = torch.get_autocast_dtype(device_type)
    except TypeError:  # torch < 2.4: per-device functions
        enabled = torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()
        dtype = torch.get_autocast_cpu_dtype() if device_type == "cpu" else torch.get_autocast_gpu_dtype()
    except RuntimeError:  # a device type without autocast (meta tensors: shapes only)
        enabled = False
    if not enabled:
        return (x, *tensors)
    return tuple(t.to(dtype) if isinstance(t, Tensor) and t.dtype == torch.float32 else t for t in (x, *tensors))


def _options_in_use(**options) -> Tuple[str, ...]:
    return tuple(name for name, value in options.items() if value is not None)


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
    ``hidden_clip`` c: ``h_t = min(relu(z_t), c)``.
    """
    x, h0, w_ih, w_hh, b_ih, b_hh, recurrent_mask = _autocast(x, h0, w_ih, w_hh, b_ih, b_hh, recurrent_mask)
    check_layer_args(x, {"h0": h0}, w_ih, w_hh, b_ih, b_hh, gates=1, x_rank=3)
    check_sequence_options(x, w_hh.shape[1], recurrent_mask, lengths, hidden_clip)
    options = _options_in_use(recurrent_mask=recurrent_mask, lengths=lengths, hidden_clip=hidden_clip)
    name = select_backend(x.device, x.dtype, backend, cell="irnn", hidden=w_hh.shape[1], batch=x.shape[1],
                          options=options).name
    if name == "triton":  # takes h0=None as zeros without a zeros tensor
        from .triton.ops import TritonIRNNFunction
        return TritonIRNNFunction.apply(*_contiguous(x, h0, w_ih, w_hh, b_ih, b_hh), False, recurrent_mask, lengths,
                                        hidden_clip)
    if h0 is None:
        h0 = _zero_state(x, w_hh.shape[1])
    if name == "torch":
        return torch_loop.irnn_loop(x, h0, w_ih, w_hh, b_ih, b_hh, recurrent_mask, lengths, hidden_clip)
    return IRNNFunction.apply(*_contiguous(x, h0, w_ih, w_hh, b_ih, b_hh, recurrent_mask), lengths, hidden_clip)


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
    [4H, P] and y is [T, B, P], while c0 and c_T stay [B, H].
    """
    h0, c0 = _unpack_state(state)
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, recurrent_mask, w_hr = _autocast(x, h0, c0, w_ih, w_hh, b_ih, b_hh,
                                                                        recurrent_mask, w_hr)
    check_layer_args(x, {"h0": h0, "c0": c0}, w_ih, w_hh, b_ih, b_hh, gates=4, x_rank=3, w_hr=w_hr)
    check_sequence_options(x, w_hh.shape[1], recurrent_mask, lengths, None, "H" if w_hr is None else "P")
    options = _options_in_use(recurrent_mask=recurrent_mask, lengths=lengths, proj_size=w_hr)
    hidden = w_hh.shape[0] // 4
    name = select_backend(x.device, x.dtype, backend, cell="lstm", hidden=hidden, batch=x.shape[1],
                          options=options).name
    if name == "triton":  # takes h0/c0=None as zeros without zeros tensors
        from .triton.ops import TritonLSTMFunction
        y, h_n, c_n, _, _ = TritonLSTMFunction.apply(*_contiguous(x, h0, c0, w_ih, w_hh, b_ih, b_hh), False,
                                                     recurrent_mask, lengths)
        return y, (h_n, c_n)
    h0 = _zero_state(x, w_hh.shape[1]) if h0 is None else h0
    c0 = _zero_state(x, hidden) if c0 is None else c0
    if name == "torch":
        y, h_n, c_n = torch_loop.lstm_loop(x, h0, c0, w_ih, w_hh, b_ih, b_hh, recurrent_mask, lengths, w_hr=w_hr)
    else:
        y, h_n, c_n, _, _ = LSTMFunction.apply(*_contiguous(x, h0, c0, w_ih, w_hh, b_ih, b_hh, recurrent_mask),
                                               lengths, *_contiguous(w_hr))
    return y, (h_n, c_n)


def irnn_cell(x, h, w_ih, w_hh, b_ih=None, b_hh=None, backend="auto") -> Tensor:
    """One IRNN step: x [B, I], h [B, H] or None -> h_new [B, H] (weights as in :func:`irnn`)."""
    check_layer_args(x, {"h": h}, w_ih, w_hh, b_ih, b_hh, gates=1, x_rank=2)
    h = _zero_state(x, w_hh.shape[1]) if h is None else h
    name = _cell_backend(select_backend(x.device, x.dtype, backend, cell="irnn").name, w_hh)
    if name == "triton":  # one step is the scan with T = 1
        return irnn(x.unsqueeze(0), h, w_ih, w_hh, b_ih, b_hh, backend=name)[1]
    if name == "torch":
        return torch_loop.irnn_step(x, h, w_ih, w_hh, b_ih, b_hh)
    return IRNNCellFunction.apply(*_contiguous(x, h, w_ih, w_hh, b_ih, b_hh))


def lstm_cell(x, state, w_ih, w_hh, b_ih=None, b_hh=None, backend="auto") -> Tuple[Tensor, Tensor]:
    """One LSTM step: x [B, I], state (h, c) each [B, H] or None -> (h_new, c_new)."""
    h, c = _unpack_state(state)
    check_layer_args(x, {"h": h, "c": c}, w_ih, w_hh, b_ih, b_hh, gates=4, x_rank=2)
    hidden = w_hh.shape[1]
    h = _zero_state(x, hidden) if h is None else h
    c = _zero_state(x, hidden) if c is None else c
    name = _cell_backend(select_backend(x.device, x.dtype, backend, cell="lstm").name, w_hh)
    if name == "triton":  # one step is the scan with T = 1
        return lstm(x.unsqueeze(0), (h, c), w_ih, w_hh, b_ih, b_hh, backend=name)[1]
    if name == "torch":
        return torch_loop.lstm_step(x, h, c, w_ih, w_hh, b_ih, b_hh)
    h_new, c_new, _ = LSTMCellFunction.apply(*_contiguous(x, h, c, w_ih, w_hh, b_ih, b_hh))
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
