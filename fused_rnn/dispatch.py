"""Which backends can run a call, and which one ``backend="auto"`` takes.

Backends:

- ``"cpp"``: the fused C++ CPU kernels of ``fused_rnn._C`` (float32, float64; bfloat16
  and float16 with float32 state and accumulation; CPU tensors).
- ``"cuda"``: the persistent CUDA scans of ``fused_rnn._C`` (float32, bfloat16, float16
  with float32 state; CUDA tensors), for layers whose W_hh fits in the GPU's shared
  memory (csrc/cuda/persistent_plan.h); ``"auto"`` takes them where the model predicts
  them clearly faster than cuDNN (small batches).
- ``"triton"``: the Triton scans of ``fused_rnn.triton`` (float32, bfloat16 and float16
  with float32 state and accumulation; CUDA tensors, or CPU tensors under the Triton
  interpreter, ``TRITON_INTERPRET=1``, when asked for by name).
- ``"nn"``: the kernels torch.nn's own modules run (cuDNN on a GPU, oneDNN/ATen on the
  CPU; any dtype), for calls without the options torch.nn does not have
  (:mod:`fused_rnn.nn_backend`).
- ``"torch"``: a plain time loop over PyTorch ops (any dtype and device; always there).

``"auto"`` never makes a call slower than torch.nn would run it. It takes torch.nn's
kernels unless one of the package's is expected to be clearly faster on this call:

1. measured, when measured dispatch is on (:func:`fused_rnn.set_measured_dispatch`):
   the first call of each kind times every eligible backend on the user's device and
   the winner is cached on disk (:mod:`fused_rnn._measure`);
2. otherwise predicted, from :data:`fused_rnn._speedups` (CPU: the benchmark table
   measured on the project's machine; GPU: the performance model of bench/gpu_model.py):
   a fused backend is taken when it is predicted at least :data:`CLEAR_WIN` times as
   fast as torch.nn's kernels, or, where the CPU table measured the functional API's
   route to those kernels slower than torch.nn's module (a single step of one row, whose
   argument checks and dispatch weigh more than the step), CLEAR_WIN times as fast as
   that route (a module reaches them in one call for its whole stack, as fast as
   torch.nn's module: its bar stays CLEAR_WIN);
3. and a call with an option torch.nn does not have (the recurrent mask,
   ``hidden_clip``) goes to the first fused backend that takes it, else the torch loop.

:func:`select_backend` says which backend it chose, on what basis, and why each other
one was not taken.
"""

from typing import Dict, List, NamedTuple, Optional, Tuple

import torch

from . import _measure, _speedup_tables, _speedups
from ._extension import _C, HAS_C, IMPORT_ERROR, REBUILD_HINT

_ALL_FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# Which dtypes and device types each backend's kernels take ("torch" takes everything).
_KERNEL_SUPPORT = {
    # bfloat16/float16: float32 state and accumulation, inputs converted at the call
    "cpp": {"device_types": ("cpu",), "dtypes": _ALL_FLOATS},
    "cuda": {"device_types": ("cuda",), "dtypes": (torch.float32, torch.bfloat16, torch.float16)},
    "triton": {"device_types": ("cuda",), "dtypes": (torch.float32, torch.bfloat16, torch.float16)},
    "nn": {"device_types": ("cpu", "cuda"), "dtypes": _ALL_FLOATS},
}
BACKENDS = ("cpp", "cuda", "triton", "nn", "torch")
FUSED = ("cpp", "cuda", "triton")  # the package's own kernels
# The options each backend takes ("torch" takes them all): the per-sequence options,
# which every fused kernel implements, and the LSTM's output projection
# (nn.LSTM(proj_size=P), the w_hr argument), which the CPU kernels and torch.nn do.
# torch.nn has lengths (through packing) and the projection, not the recurrent mask or
# the clip. Dispatch checks this table before using a backend.
# Two more describe a call rather than name an argument: a recurrent mask that requires
# grad (only the torch loop differentiates the mask; the kernels treat it as a constant,
# as recurrent dropout's masks are) and a projection at least as wide as the cell (P >=
# H, which the CPU kernels and the loop run; nn.LSTM refuses it, and ATen's kernels,
# which infer the projection from h's width, fail at P = H with an error that names no
# argument: torch.nn's are kept to the P < H they are made for).
_OPTIONS = ("recurrent_mask", "lengths", "hidden_clip")
MASK_GRADIENT = "recurrent_mask's gradient"
WIDE_PROJECTION = "proj_size >= hidden_size"
OPTION_SUPPORT = {"cpp": _OPTIONS + ("proj_size", WIDE_PROJECTION), "cuda": _OPTIONS, "triton": _OPTIONS,
                  "nn": ("lengths", "proj_size")}
_GATES = {"irnn": 1, "lstm": 4}
# How much faster a fused backend must be predicted to run than torch.nn's kernels for
# "auto" to take it without a measurement: predictions are a model's (GPU) or another
# machine's measurements (CPU), and a 30% margin keeps their error from making a call
# slower than torch.nn would run it.
CLEAR_WIN = 1.3
# How much slower than torch.nn's module the functional API's route to torch.nn's kernels
# (the CPU table's "nn" column) must be measured before auto holds a fused kernel to
# CLEAR_WIN times the route's speed instead of the module's: the route runs the same
# kernels, so a measured 0.95-1.0x is the noise of a shared machine; 0.9 and below is
# the route's own cost (its argument checks and dispatch at a single step of one row).
SLOW_ROUTE = 0.9


def _triton_missing() -> Optional[str]:
    """Why the Triton backend cannot run here (None if it can); imports triton lazily."""
    from .triton import HAS_TRITON, TRITON_IMPORT_ERROR
    return None if HAS_TRITON else f"triton is not importable ({TRITON_IMPORT_ERROR})"


def _interpreting_triton() -> bool:
    from .triton import interpreting
    return interpreting()


def available_backends(device="cpu") -> List[str]:
    """Backends this install can run on `device` ("cpu", "cuda", a torch.device): the
    fused ones first, then torch.nn's kernels ("nn") and the torch loop."""
    device_type = torch.device(device).type
    names = [
        name for name, support in _KERNEL_SUPPORT.items()
        if device_type in support["device_types"] and _missing_requirement(name) is None
    ]
    return names + ["torch"]


def _missing_requirement(name: str) -> Optional[str]:
    if name == "nn":
        return None
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
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    index = device.index if device.index is not None else torch.cuda.current_device()
    reason = _C.cuda_scan_unsupported(index, _GATES[cell], str(dtype).replace("torch.", ""), hidden)
    return reason or None


class BackendChoice(NamedTuple):
    name: str
    skipped: Dict[str, str]  # each other backend -> why it was not taken
    basis: str = ""  # how the choice was made: "requested", "measured", "predicted", ...
    eligible: Tuple[str, ...] = ()  # every backend that could run the call (with "auto")


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
    if name == "nn" and "lengths" in options and torch.compiler.is_compiling():
        return ("under torch.compile torch.nn's kernels would take lengths through packing, whose sizes depend on "
                "the values (a graph break)")
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
                   options: Tuple[str, ...] = (), training: Optional[bool] = None,
                   steps: Optional[int] = None) -> BackendChoice:
    """The backend that runs tensors of `device` and `dtype` (raises ValueError if an
    explicitly requested backend cannot). `cell` ("irnn" or "lstm"), when given, also
    checks that the backend's kernels for that cell have a launch config for the dtype;
    with `hidden` (and `batch`) it checks the shape limits of a whole-sequence scan (the
    CUDA scans keep W_hh on chip) and lets ``"auto"`` use the predicted speed of each
    backend on that shape; `training` (whether a backward follows; default: unknown)
    picks the training or the inference prediction, and `steps` (the sequence length,
    default: unknown) the nearest tabulated sequence length where the CPU table has
    several. `options` names the options in use
    ("recurrent_mask", "lengths", "hidden_clip", "proj_size"), which not every backend
    implements. The result's ``basis`` says how the choice was made and ``skipped`` why
    each other backend was not taken. The answer is a layer call's of the functional API
    (:func:`fused_rnn.irnn`, :func:`fused_rnn.lstm`); a module whose whole stack would
    run on torch.nn's kernels compares a fused kernel with torch.nn's module itself
    (:data:`SLOW_ROUTE`)."""
    device = torch.device(device)
    if backend != "auto":
        reason = _requested_reason(backend, device, dtype, cell, hidden, batch, tuple(options))
        if reason is not None:
            raise ValueError(f"backend={backend!r} cannot run these inputs: {reason}")
        return BackendChoice(backend, {}, "requested")
    choice = auto_choice(device, dtype, cell, hidden, batch, tuple(options), training, steps)
    return choice._replace(skipped=dict(choice.skipped))  # the caller's own copy of what it may change


def auto_choice(device: torch.device, dtype: torch.dtype, cell: Optional[str], hidden: Optional[int],
                batch: Optional[int], options: Tuple[str, ...], training: Optional[bool], steps: Optional[int],
                measured: Optional[bool] = None, layer_route: bool = True) -> BackendChoice:
    """select_backend(backend="auto") for the layer calls: `options` a tuple, and the
    choice handed out is the memo's own (the caller reads it, never changes it).
    `measured`: whether measured dispatch is on, when the caller has read it already.
    `layer_route`: whether torch.nn's kernels would be reached through a layer call of
    the functional API (whose speed the CPU table measures), or, False, through a
    module's one call for its whole stack (as fast as torch.nn's own module)."""
    if measured is None:
        measured = _measure.measured_dispatch_enabled()
    if device.type != "cpu" or measured or torch.compiler.is_compiling():
        return _select_auto(device, dtype, cell, hidden, batch, options, training, steps, layer_route)
    key = (dtype, cell, hidden, batch, options, training, steps, layer_route)
    known = _CPU_CHOICES.get(key)  # the memo's hit inline: this runs on every layer call
    if known is not None and known[0] == _cpu_context():
        return known[1]
    return _memoised(key, lambda: _select_auto(device, dtype, cell, hidden, batch, options, training, steps,
                                               layer_route))


def _requested_reason(backend: str, device: torch.device, dtype: torch.dtype, cell: Optional[str],
                      hidden: Optional[int], batch: Optional[int], options: Tuple[str, ...]) -> Optional[str]:
    """Why a backend the caller named cannot run this call (None if it can), memoised
    with auto's choices for CPU calls (a module with backend="cpp" asks on every layer
    call; 12 us of a single step). Triton, whose answer on the CPU depends on the
    interpreter's environment variable, is never memoised."""
    if device.type != "cpu" or backend == "triton" or torch.compiler.is_compiling():
        return _unsupported_reason(backend, device, dtype, explicit=True, cell=cell, hidden=hidden, batch=batch,
                                   options=options)
    return _memoised(("requested", backend, dtype, cell, hidden, batch, options), lambda: _unsupported_reason(
        backend, device, dtype, explicit=True, cell=cell, hidden=hidden, batch=batch, options=options))


# auto's choice for each kind of CPU call: dispatch runs on every layer call, and its
# 20-40 us were a visible part of a small call (a module handing a T = 1, B = 1 call to
# torch.nn's kernels took 0.74x nn.LSTM's time). A choice depends on the call's
# description and on the module-level state _cpu_context() returns (compared by
# identity, or equal content: the tables and functions a test may swap); the support tables
# (OPTION_SUPPORT, _KERNEL_SUPPORT) are constants, and a test that edits them in place
# calls _forget_choices() (tests/conftest.py does around every test). Measured dispatch,
# whose choices change as it measures, and tracing under torch.compile are never
# memoised.
_CPU_CHOICES: Dict[tuple, tuple] = {}


def _memoised(key: tuple, compute):
    """_CPU_CHOICES[key], computed by compute() when missing or made in another context."""
    known = _CPU_CHOICES.get(key)
    if known is None or known[0] != _cpu_context():  # identical, or tables of equal content
        if len(_CPU_CHOICES) >= 4096:
            _CPU_CHOICES.clear()
        known = _CPU_CHOICES[key] = (_cpu_context(), compute())
    return known[1]


def _cpu_context() -> tuple:
    return _speedup_tables.CPU, _missing_requirement, _speedups.predicted, _speedups.NEAREST, CLEAR_WIN


def _forget_choices() -> None:
    """Drops the memoised choices of auto and the speed-up tables' index."""
    _CPU_CHOICES.clear()
    _speedups._ENTRIES.clear()


def _select_auto(device: torch.device, dtype: torch.dtype, cell: Optional[str], hidden: Optional[int],
                 batch: Optional[int], options: Tuple[str, ...], training: Optional[bool],
                 steps: Optional[int], layer_route: bool = True) -> BackendChoice:
    """select_backend(backend="auto") without the memo (`layer_route`: see auto_choice)."""
    skipped, eligible = {}, []
    for name in BACKENDS:
        reason = _unsupported_reason(name, device, dtype, cell=cell, hidden=hidden, batch=batch, options=options)
        if reason is None:
            eligible.append(name)
        else:
            skipped[name] = reason
    fused = [name for name in eligible if name in FUSED]
    predicted = {name: _speedups.predicted(name, device, dtype, cell, hidden, batch, training, options, steps)
                 for name in fused}
    # a module's per-layer path to the CPU kernel (its checks, the states' select and stack
    # around each layer call), measured in the CPU table's "module" column where it has one
    via_module = None if layer_route or "cpp" not in predicted else _speedups.predicted(
        "module", device, dtype, cell, hidden, batch, training, options, steps)
    if via_module is not None:
        predicted["cpp"] = via_module
    if "nn" not in eligible:  # an option torch.nn does not have: the fastest fused kernel, else the loop
        known = {name: x for name, x in predicted.items() if x is not None}
        name = max(known, key=known.get) if known else (fused[0] if fused else "torch")
        skipped.update({n: f"{name} is predicted faster" if n in known else f"{name} comes first"
                        for n in eligible if n != name})
        return BackendChoice(name, skipped, f"torch.nn's kernels cannot: {skipped['nn']}", tuple(eligible))
    measured = _measure.cached_choice(device, dtype, cell, hidden, batch, options, training, eligible, steps)
    if measured is not None:
        name, timings = measured
        skipped.update({n: f"measured slower on this device ({timings})" for n in eligible if n != name})
        return BackendChoice(name, skipped, f"measured on this device ({timings})", tuple(eligible))
    # the bar: CLEAR_WIN times the speed of auto's own route to torch.nn's kernels (a
    # layer call of the functional API, its Python included, measured in the CPU table's
    # "nn" column) where that is at most SLOW_ROUTE: at a single step of one row the
    # route costs more than the kernel gains, and a fused kernel clearly faster than it
    # is the faster way to run the call. A module's route, one call for its whole stack,
    # is as fast as torch.nn's module: the bar stays CLEAR_WIN there. The route's row
    # must be the call's own (steps and mode known), never the lower of two rows.
    route = _speedups.predicted("nn", device, dtype, cell, hidden, batch, training, options, steps) \
        if layer_route and steps is not None and training is not None else None
    bar = CLEAR_WIN * route if route is not None and route <= SLOW_ROUTE else CLEAR_WIN
    clear = {name: x for name, x in predicted.items() if x is not None and x >= bar}
    best = max(clear, key=clear.get) if clear else "nn"
    for name in eligible:
        if name == best:
            continue
        x = predicted.get(name)
        if name not in FUSED:
            skipped[name] = f"{best} is predicted faster" if best != "nn" else "torch.nn's kernels are taken"
        elif x is None:
            skipped[name] = "no prediction for this device, dtype and shape: torch.nn's kernels are kept"
        elif x < bar:
            skipped[name] = f"predicted {x:.2f}x torch.nn, below the {bar:.3g}x a prediction must show" + (
                f" ({CLEAR_WIN}x the {route:.2f}x of torch.nn's kernels through this package)" if bar < CLEAR_WIN
                else "")
        else:
            skipped[name] = f"predicted {x:.2f}x torch.nn, less than {best}"
    if best == "nn":
        return BackendChoice("nn", skipped, "torch.nn's kernels: no fused backend predicted clearly faster",
                             tuple(eligible))
    lowered = f", above the {bar:.3g}x bar ({CLEAR_WIN}x the {route:.2f}x of torch.nn's kernels through a layer " \
        "call)" if bar < CLEAR_WIN else ""
    path = " through a module" if best == "cpp" and via_module is not None else ""
    return BackendChoice(best, skipped, f"predicted {predicted[best]:.2f}x torch.nn's kernels{path}{lowered} "
                                        f"({_speedups.source(device)})", tuple(eligible))
