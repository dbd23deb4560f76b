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


def _log(size: int) -> float:
    return math.log(max(size, 1))


def _nearest(entries, batch: int, hidden: int, steps: Optional[int] = None):
    """The value of the entry ((log b, log h, log t or None), value) nearest to the call
    (sizes as logs of at least 1: the table's are precomputed, see _entries), within
    NEAREST in batch and hidden size. The sequence length, for entries that have one and
    a call whose length is known, only adds to the distance: the table's few lengths
    choose between rows and never leave a call without a prediction. Where the length
    is unknown, or entries lie equally near, the lowest of the nearest entries' values:
    a prediction never rests on the more favourable of two shapes the call may be."""
    best, best_distance = None, None
    limit = math.log(NEAREST) + 1e-9  # a row exactly NEAREST away counts (a difference of logs may exceed it by an ulp)
    log_batch, log_hidden = _log(batch), _log(hidden)
    log_steps = None if steps is None else _log(steps)
    for (lb, lh, lt), value in entries:
        db, dh = abs(lb - log_batch), abs(lh - log_hidden)
        if db > limit or dh > limit:
            continue
        distance = db + dh + (abs(lt - log_steps) if lt is not None and log_steps is not None else 0.0)
        if best_distance is None or distance < best_distance - 1e-12:
            best, best_distance = value, distance
        elif abs(distance - best_distance) <= 1e-12:
            best = min(best, value)
    return best


# (backend, device type or GPU class, cell, mode, dtype) -> (the table read, its entries
# for them): dispatch asks on every call, and the table changes only when a test swaps it
# (dispatch._forget_choices() also forgets these, for a test that edits it in place)
_ENTRIES = {}


def _entries(name: str, device: torch.device, cell: str, mode: str, dtype_name: str):
    """[((log b, log h, log t or None), speed-up)] of backend `name` in the table of this
    device, for one cell, mode and dtype."""
    gpu = None if device.type == "cpu" else gpu_class(device)
    table = tables.CPU if device.type == "cpu" else tables.GPU
    key = (name, device.type, gpu, cell, mode, dtype_name)
    cached = _ENTRIES.get(key)
    if cached is not None and cached[0] is table:
        return cached[1]
    if device.type == "cpu":  # keys (cell, mode, dtype, batch, hidden[, steps])
        rows = [(k[3:], v[name]) for k, v in table.items() if k[:3] == (cell, mode, dtype_name) and name in v]
    else:  # keys (GPU, cell, mode, dtype, batch, hidden)
        rows = [(k[4:], v[name]) for k, v in table.items() if k[:4] == (gpu, cell, mode, dtype_name) and name in v]
    entries = [((_log(k[0]), _log(k[1]), _log(k[2]) if len(k) > 2 else None), value) for k, value in rows]
    _ENTRIES[key] = (table, entries)
    return entries


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
        value = _nearest(_entries(name, device, cell, mode, dtype_name), batch, hidden,
                         steps if device.type == "cpu" else None)
        if value is None:
            return None
        values.append(value)
    return min(values)
