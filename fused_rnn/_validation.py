"""Argument checks shared by every entry point.

Every error names the argument and what was expected, so that a shape mistake in
training code is found at the call, not as a wrong number three layers later.
"""

from typing import Dict, Optional

import torch
from torch import Tensor


def _describe(t: Tensor) -> str:
    return f"shape {tuple(t.shape)}"


def check_tensors(tensors: Dict[str, Optional[Tensor]]) -> None:
    """Type, dtype and device agreement of the named tensors (None entries are skipped)."""
    reference_name, reference = None, None
    for name, value in tensors.items():
        if value is None:
            continue
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if not value.dtype.is_floating_point:
            raise TypeError(
                f"{name} must be a floating-point tensor (float32, float64, bfloat16 or float16), "
                f"got {value.dtype}"
            )
        if reference is None:
            reference_name, reference = name, value
            continue
        if value.dtype != reference.dtype:
            raise TypeError(
                f"all tensors must share one dtype: {reference_name} is {reference.dtype} "
                f"but {name} is {value.dtype}"
            )
        if value.device != reference.device:
            raise ValueError(
                f"all tensors must be on one device: {reference_name} is on {reference.device} "
                f"but {name} is on {value.device}"
            )


def check_shape(name: str, value: Optional[Tensor], expected: tuple, meaning: str) -> None:
    """`expected` holds ints; the message shows `meaning` (e.g. "[B, H] = [4, 37]")."""
    if value is None:
        return
    if tuple(value.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {meaning}, got {_describe(value)}")


def check_layer_args(
    x: Tensor,
    states: Dict[str, Optional[Tensor]],
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor],
    b_hh: Optional[Tensor],
    gates: int,
    x_rank: int,
) -> None:
    """Checks one layer's arguments; `x_rank` is 3 for a sequence [T, B, I], 2 for a step [B, I].

    `gates` is 1 for the IRNN and 4 for the LSTM: the weights are [gates*H, I] and
    [gates*H, H], stacked in PyTorch's order, so nn.RNN / nn.LSTM weights load unchanged.
    """
    check_tensors({"x": x, **states, "w_ih": w_ih, "w_hh": w_hh, "b_ih": b_ih, "b_hh": b_hh})
    layout = "[T, B, I]" if x_rank == 3 else "[B, I]"
    if x.dim() != x_rank:
        raise ValueError(f"x must be {x_rank}-D {layout}, got {_describe(x)}")
    if w_hh.dim() != 2 or w_hh.shape[0] != gates * w_hh.shape[1]:
        raise ValueError(
            f"w_hh must be 2-D [{gates}*H, H]" + (" (gates i, f, g, o stacked)" if gates == 4 else "")
            + f", got {_describe(w_hh)}"
        )
    hidden = w_hh.shape[1]
    batch, inputs = x.shape[-2], x.shape[-1]
    check_shape("w_ih", w_ih, (gates * hidden, inputs), f"[{gates}*H, I] = [{gates * hidden}, {inputs}]")
    for name in ("b_ih", "b_hh"):
        bias = b_ih if name == "b_ih" else b_hh
        check_shape(name, bias, (gates * hidden,), f"[{gates}*H] = [{gates * hidden}]")
    for name, state in states.items():
        check_shape(name, state, (batch, hidden), f"[B, H] = [{batch}, {hidden}]")


def check_sequence_options(x: Tensor, hidden: int, recurrent_mask: Optional[Tensor], lengths: Optional[Tensor],
                           hidden_clip: Optional[float]) -> None:
    """The per-sequence options of fused_rnn.irnn / fused_rnn.lstm: recurrent_mask
    [B, H] in x's dtype and device; lengths [B] integers in [0, T] (on any device);
    hidden_clip a positive number."""
    steps, batch = x.shape[0], x.shape[1]
    if recurrent_mask is not None:
        check_tensors({"x": x, "recurrent_mask": recurrent_mask})
        check_shape("recurrent_mask", recurrent_mask, (batch, hidden), f"[B, H] = [{batch}, {hidden}]")
    if lengths is not None:
        if not isinstance(lengths, Tensor):
            raise TypeError(f"lengths must be a torch.Tensor of integers, got {type(lengths).__name__}")
        if lengths.dtype.is_floating_point or lengths.dtype == torch.bool or lengths.is_complex():
            raise TypeError(f"lengths must hold integers, got {lengths.dtype}")
        check_shape("lengths", lengths, (batch,), f"[B] = [{batch}]")
        if batch and (int(lengths.min()) < 0 or int(lengths.max()) > steps):
            raise ValueError(f"lengths must lie in [0, T] = [0, {steps}], got {lengths.tolist()}")
    if hidden_clip is not None and not (isinstance(hidden_clip, (int, float)) and hidden_clip > 0):
        raise ValueError(f"hidden_clip must be a positive number, got {hidden_clip!r}")
