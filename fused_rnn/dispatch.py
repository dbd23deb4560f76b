"""Which backends can run a call, and which one ``backend="auto"`` takes.

Backends, fastest first:

- ``"cpp"``: the fused C++ CPU kernels of ``fused_rnn._C`` (float32, float64; bfloat16
  and float16 with float32 state and accumulation; CPU tensors).
- ``"cuda"``: the persistent CUDA scans of ``fused_rnn._C`` (float32, bfloat16, float16
  with float32 state; CUDA tensors), for layers whose W_hh fits in the GPU's shared
  memory and batches of at most ``CUDA_SCAN_MAX_BATCH`` rows (csrc/cuda/persistent_plan.h).
- ``"triton"``: the Triton scans of ``fused_rnn.triton`` (float32, bfloat16 and float16
  with float32 state and accumulation; CUDA tensors, or CPU tensors under the Triton
  interpreter, ``TRITON_INTERPRET=1``, when asked for by name).
- ``"torch"``: a plain time loop over PyTorch ops (any dtype and device; always there).

``"auto"`` takes the first backend that can run the tensors' device, dtype, shape and
options, falling back to ``"torch"`` rather than failing; :func:`select_backend` says
which one and why the faster ones were skipped. The tables below are the one place
dispatch reads.
"""

from typing import Dict, List, NamedTuple, Optional, Tuple

import torch

from ._extension import _C, HAS_C, IMPORT_ERROR, REBUILD_HINT

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
    from .triton import interpreting
    return interpreting()


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
