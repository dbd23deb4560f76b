"""Argument checks shared by every entry point, and the exceptions they raise.

Every error names the argument and what was expected, so that a shape mistake in
training code is found at the call, not as a wrong number three layers later.

The exception classes derive both from the class fused_rnn always raised and from the
class torch.nn raises for the same mistake (``RuntimeError`` for a state or input whose
size does not fit, ``ValueError`` for an input of another dtype than the weights), so
code written against either keeps catching them.
"""

from typing import Dict, Optional

import torch
from torch import Tensor


class InputError(ValueError, RuntimeError):
    """A tensor whose shape, rank or device does not fit the layer. A ``ValueError``
    (fused_rnn's class) and a ``RuntimeError`` (torch.nn's class for these mistakes)."""


class InputTypeError(TypeError, ValueError, RuntimeError):
    """An argument of the wrong type or dtype. A ``TypeError`` (fused_rnn's class), a
    ``ValueError`` (torch.nn's for an input whose dtype differs from the weights') and a
    ``RuntimeError`` (torch.nn's for a state of another dtype)."""


def _describe(t: Tensor) -> str:
    return f"shape {tuple(t.shape)}"


def check_tensors(tensors: Dict[str, Optional[Tensor]]) -> None:
    """Type, dtype and device agreement of the named tensors (None entries are skipped)."""
    reference_name, reference = None, None
    for name, value in tensors.items():
        if value is None:
            continue
        if not isinstance(value, Tensor):
            raise InputTypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if not value.dtype.is_floating_point:
            raise InputTypeError(
                f"{name} must be a floating-point tensor (float32, float64, bfloat16 or float16), "
                f"got {value.dtype}"
            )
        if reference is None:
            reference_name, reference = name, value
            continue
        if value.dtype != reference.dtype:
            raise InputTypeError(
                f"all tensors must share one dtype: {reference_name} is {reference.dtype} "
                f"but {name} is {value.dtype}"
            )
        if value.device != reference.device:
            raise InputError(
                f"all tensors must be on one device: {reference_name} is on {reference.device} "
                f"but {name} is on {value.device}"
            )


def check_shape(name: str, value: Optional[Tensor], expected: tuple, meaning: str) -> None:
    """`expected` holds ints; the message shows `meaning` (e.g. "[B, H] = [4, 37]")."""
    if value is None:
        return
    if tuple(value.shape) != tuple(expected):
        raise InputError(f"{name} must have shape {meaning}, got {_describe(value)}")


def layer_sizes(w_hh: Tensor, gates: int, w_hr: Optional[Tensor] = None):
    """(H, P): the hidden units and the width of h (P = H without a projection), from
    w_hh [G*H, P]."""
    projected = w_hr is not None
    if w_hh.dim() != 2 or (not projected and w_hh.shape[0] != gates * w_hh.shape[1]) or w_hh.shape[0] % gates:
        shape = f"[{gates}*H, P]" if projected else f"[{gates}*H, H]"
        raise InputError(
            f"w_hh must be 2-D {shape}" + (" (gates i, f, g, o stacked)" if gates == 4 else "")
            + f", got {_describe(w_hh)}"
        )
    return w_hh.shape[0] // gates, w_hh.shape[1]


def check_layer_args(
    x: Tensor,
    states: Dict[str, Optional[Tensor]],
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor],
    b_hh: Optional[Tensor],
    gates: int,
    x_rank: int,
    w_hr: Optional[Tensor] = None,
) -> None:
    """Checks one layer's arguments; `x_rank` is 3 for a sequence [T, B, I], 2 for a step [B, I].

    `gates` is 1 for the IRNN and 4 for the LSTM: the weights are [gates*H, I] and
    [gates*H, H], stacked in PyTorch's order, so nn.RNN / nn.LSTM weights load unchanged.
    With a projection w_hr [P, H] (LSTM), w_hh is [4H, P], the state "h*" is [B, P] and
    "c*" stays [B, H].
    """
    if _layer_args_fit(x, states, w_ih, w_hh, b_ih, b_hh, gates, x_rank, w_hr):
        return
    # something does not fit: find it and name it
    check_tensors({"x": x, **states, "w_ih": w_ih, "w_hh": w_hh, "b_ih": b_ih, "b_hh": b_hh, "w_hr": w_hr})
    layout = "[T, B, I]" if x_rank == 3 else "[B, I]"
    if x.dim() != x_rank:
        raise InputError(f"x must be {x_rank}-D {layout}, got {_describe(x)}")
    hidden, width = layer_sizes(w_hh, gates, w_hr)
    batch, inputs = x.shape[-2], x.shape[-1]
    check_shape("w_ih", w_ih, (gates * hidden, inputs), f"[{gates}*H, I] = [{gates * hidden}, {inputs}]")
    for name in ("b_ih", "b_hh"):
        bias = b_ih if name == "b_ih" else b_hh
        check_shape(name, bias, (gates * hidden,), f"[{gates}*H] = [{gates * hidden}]")
    check_shape("w_hr", w_hr, (width, hidden), f"[P, H] = [{width}, {hidden}]")
    for name, state in states.items():
        if name.startswith("c"):
            check_shape(name, state, (batch, hidden), f"[B, H] = [{batch}, {hidden}]")
        else:
            letter = "P" if w_hr is not None else "H"
            check_shape(name, state, (batch, width), f"[B, {letter}] = [{batch}, {width}]")


def _layer_args_fit(x, states, w_ih, w_hh, b_ih, b_hh, gates: int, x_rank: int, w_hr) -> bool:
    """check_layer_args' conditions in one pass that only says whether they all hold;
    False for anything check_layer_args would reject. It runs on every layer call: the
    checks that name a mistake took 20 us of a single step, and a version of this pass
    that built lists of (tensor, shape) pairs and generators over them 20-30 us after a
    step's kernel had run (8-10 us now). Every tensor's dtype is compared with x's by
    identity, so a non-tensor (a NumPy array) fails there, if not at an attribute it
    lacks."""
    try:
        rows, width = w_hh.shape
        shape, dtype = x.shape, x.dtype
        cpu = x.is_cpu
        device = None if cpu else x.device
        hidden = rows // gates
        if len(shape) != x_rank or not dtype.is_floating_point or rows != gates * hidden \
                or (w_hr is None and width != hidden):
            return False
        batch, inputs = shape[-2], shape[-1]
        for tensor, expected in ((w_hh, None), (w_ih, (rows, inputs)), (b_ih, (rows,)), (b_hh, (rows,)),
                                 (w_hr, (width, hidden))):
            if tensor is not None and (tensor.dtype is not dtype or (expected is not None and tensor.shape != expected)
                                       or (tensor.is_cpu if cpu else tensor.device == device) is not True):
                return False
        for name, state in states.items():
            if state is not None and (state.dtype is not dtype
                                      or state.shape != (batch, hidden if name[0] == "c" else width)
                                      or (state.is_cpu if cpu else state.device == device) is not True):
                return False
    except (AttributeError, TypeError, ValueError):  # not a tensor, or w_hh not 2-D
        return False
    return True


def all_like(dtype: torch.dtype, device: torch.device, tensors) -> bool:
    """Whether every tensor of `tensors` that is not None has this dtype and device."""
    if device.type == "cpu":  # is_cpu is cheaper than building a device to compare
        return all(t is None or (t.dtype is dtype and t.is_cpu) for t in tensors)
    return all(t is None or (t.dtype is dtype and t.device == device) for t in tensors)


def check_sequence_options(x: Tensor, width: int, recurrent_mask: Optional[Tensor], lengths: Optional[Tensor],
                           hidden_clip: Optional[float], width_name: str = "H") -> None:
    """The per-sequence options of fused_rnn.irnn / fused_rnn.lstm: recurrent_mask
    [B, width] (width: of h, H or the projection's P, named `width_name`) in x's dtype
    and device; lengths [B] integers in [0, T] (on any device); hidden_clip a positive
    number."""
    steps, batch = x.shape[0], x.shape[1]
    if recurrent_mask is not None:
        check_tensors({"x": x, "recurrent_mask": recurrent_mask})
        check_shape("recurrent_mask", recurrent_mask, (batch, width), f"[B, {width_name}] = [{batch}, {width}]")
    if lengths is not None:
        if not isinstance(lengths, Tensor):
            raise InputTypeError(f"lengths must be a torch.Tensor of integers, got {type(lengths).__name__}")
        if lengths.dtype.is_floating_point or lengths.dtype == torch.bool or lengths.is_complex():
            raise InputTypeError(f"lengths must hold integers, got {lengths.dtype}")
        check_shape("lengths", lengths, (batch,), f"[B] = [{batch}]")
        if lengths.is_meta and not x.is_meta:
            raise InputError("lengths must hold values (on the CPU or x's device), got a tensor on the meta device")
        if torch.compiler.is_compiling() or lengths.is_meta:  # (meta lengths: x on meta too, checked above)
            # traced: no Python branch on the values (torch.compile(fullgraph=True) would break
            # the graph there); the same check runs in the graph instead (meta tensors: shapes
            # only, nothing to check)
            torch._assert_async(((lengths >= 0) & (lengths <= steps)).all(),
                                f"lengths must lie in [0, T] = [0, {steps}]")
        elif batch and (int(lengths.min()) < 0 or int(lengths.max()) > steps):
            raise InputError(f"lengths must lie in [0, T] = [0, {steps}], got {lengths.tolist()}")
    if hidden_clip is not None and (isinstance(hidden_clip, bool) or not (isinstance(hidden_clip, (int, float))
                                                                           and hidden_clip > 0)):
        raise ValueError(f"hidden_clip must be a positive number, got {hidden_clip!r}")
