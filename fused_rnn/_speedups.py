"""Predicted speed of each fused backend against torch.nn's kernels, for ``"auto"``.

The numbers are in :mod:`fused_rnn._speedup_tables`, which tools in bench/ write: the
CPU's from the CPU benchmark table (measured on the project's machine, `python
bench/table.py --write-speedups`), the GPU's from the performance model (`python
bench/gpu_model.py --write-speedups`, a model, not a measurement). A call gets the
prediction of the nearest tabulated shape of its cell, mode and dtype, if one lies
within a factor :data:`NEAREST` in both batch and hidden size; otherwise none, and
dispatch keeps torch.nn's kernels. The CPU table also has rows at several sequence
lengths: the nearest to the call's length counts (see :func:`_nearest`).
"""

import math
import os
from typing import Optional, Tuple

import torch

from . import _speedup_tables as tables

# How far (as a factor in batch size and in hidden size) the nearest tabulated shape
# may lie from a call for its prediction to stand for the call's.
NEAREST = 4.0
_GPU_CLASSES = ("H200", "H100", "A100")


def gpu_class(device: torch.device) -> Optional[str]:
    """The tabulated GPU a device is ("A100", "H100", "H200"), or None."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device.index if device.index is not None else torch.cuda.current_device())
    return next((g for g in _GPU_CLASSES if g in name.upper()), None)


def source(device: torch.device) -> str:
    return tables.CPU_SOURCE if device.type == "cpu" else tables.GPU_SOURCE


def _nearest(entries, batch: int, hidden: int, steps: Optional[int] = None):
    """The value of the entry ((b, h) or (b, h, t), value) nearest to the call, within
    NEAREST in batch and hidden size. The sequence length, for entries that have one and
    a call whose length is known, only adds to the distance: the table's few lengths
    choose between rows and never leave a call without a prediction. Where the length
    is unknown, or entries lie equally near, the lowest of the nearest entries' values:
    a prediction never rests on the more favourable of two shapes the call may be."""
    best, best_distance = None, None
    limit = math.log(NEAREST)
    for key, value in entries:
        b, h = key[0], key[1]
        db, dh = abs(math.log(max(b, 1) / max(batch, 1))), abs(math.log(max(h, 1) / max(hidden, 1)))
        dt = abs(math.log(max(key[2], 1) / max(steps, 1))) if len(key) > 2 and steps is not None else 0.0
        if db > limit or dh > limit:
            continue
        distance = db + dh + dt
        if best_distance is None or distance < best_distance - 1e-12:
            best, best_distance = value, distance
        elif abs(distance - best_distance) <= 1e-12:
            best = min(best, value)
    return best


def predicted(name: str, device: torch.device, dtype: torch.dtype, cell: Optional[str], hidden: Optional[int],
              batch: Optional[int], training: Optional[bool], options: Tuple[str, ...] = (),
              steps: Optional[int] = None) -> Optional[float]:
    """Predicted speed of backend `name` on this call relative to torch.nn's kernels
    (above 1: faster), or None without a prediction. With `training` unknown, the lower
    of the inference and training predictions. The Triton backend's is that of the
    design it will run (:func:`triton_design`)."""
    if name == "triton":
        name = "triton-split" if triton_design(device, dtype, cell, hidden, batch, training, options) == "split" \
            else "triton"
    return _predicted(name, device, dtype, cell, hidden, batch, training, steps)


# FUSED_RNN_TRITON_DESIGN=split or tiled forces the Triton backend's design (tests, experiments)
DESIGN_VARIABLE = "FUSED_RNN_TRITON_DESIGN"


def triton_design(device: torch.device, dtype: torch.dtype, cell: Optional[str], hidden: Optional[int],
                  batch: Optional[int], training: Optional[bool], options: Tuple[str, ...] = ()) -> str:
    """Which Triton scans a call runs: "split" (the hidden units across programs,
    fused_rnn/triton/split.py) where the model predicts them faster than the batch-tiled
    ones ("tiled"), which also run every call without a prediction (the interpreter).
    Both designs implement every option the backend takes; the model's figures are for
    plain calls."""
    forced = os.environ.get(DESIGN_VARIABLE, "").strip().lower()
    if forced in ("split", "tiled"):
        return forced
    split = _predicted("triton-split", device, dtype, cell, hidden, batch, training)
    tiled = _predicted("triton", device, dtype, cell, hidden, batch, training)
    return "split" if split is not None and (tiled is None or split > tiled) else "tiled"


def _predicted(name, device, dtype, cell, hidden, batch, training, steps=None) -> Optional[float]:
    if cell is None or hidden is None or batch is None:
        return None
    dtype_name = str(dtype).replace("torch.", "")
    modes = ("training",) if training else ("inference",) if training is False else ("inference", "training")
    values = []
    for mode in modes:
        if device.type == "cpu":
            # keys (cell, mode, dtype, batch, hidden[, steps])
            entries = [(key[3:], v.get(name)) for key, v in tables.CPU.items()
                       if key[:3] == (cell, mode, dtype_name) and name in v]
        else:
            gpu = gpu_class(device)
            entries = [((b, h), v.get(name)) for (g, c, m, d, b, h), v in tables.GPU.items()
                       if (g, c, m, d) == (gpu, cell, mode, dtype_name) and name in v]
        value = _nearest(entries, batch, hidden, steps if device.type == "cpu" else None)
        if value is None:
            return None
        values.append(value)
    return min(values)
