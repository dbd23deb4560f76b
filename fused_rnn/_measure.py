"""Measured dispatch: ``backend="auto"`` timed on the user's own device, cached on disk.

Off by default, like ``torch.backends.cudnn.benchmark``: turn it on with
:func:`set_measured_dispatch` or ``FUSED_RNN_MEASURED_DISPATCH=1`` in the environment
the process starts with. Then the first call
of each kind (cell, dtype, training or inference, batch bucket, hidden size, options)
runs every eligible backend on the call's own tensors, checks that their results agree,
times them (a few milliseconds each) and keeps the fastest; later calls of that kind,
in this process or any later one, take the cached winner.

The cache is one JSON file per environment, under ``FUSED_RNN_CACHE_DIR`` (default
``$XDG_CACHE_HOME/fused_rnn`` or ``~/.cache/fused_rnn``): the file's name is a hash of
the device (its name and multiprocessor count, or the CPU model and thread count), the
driver, torch, Triton and fused_rnn versions, so a change of any of them starts a new
cache and never reuses an old answer. Writes take an exclusive lock, merge with what
other processes wrote meanwhile, and replace the file atomically.
:func:`clear_dispatch_cache` deletes every cache file.
"""

import contextlib
import hashlib
import json
import math
import os
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from ._version import __version__

ENVIRONMENT_VARIABLE = "FUSED_RNN_MEASURED_DISPATCH"
CACHE_DIR_VARIABLE = "FUSED_RNN_CACHE_DIR"
# Each backend is timed until this long has passed (after one untimed call, which
# compiles, autotunes and allocates), at most MAX_CALLS times: a few milliseconds.
TIMED_SECONDS = 0.005
MAX_CALLS = 10
# Agreement required between backends before their times count, per dtype, as
# max|a - b| / max(1, max|b|) over outputs (and gradients in training): float32 and
# float64 backends sum the same products in other orders; bf16/fp16 differ by a few
# units of their precision (2^-8, 2^-11) over the sequence.
AGREEMENT = {torch.float64: 1e-8, torch.float32: 1e-3, torch.bfloat16: 6e-2, torch.float16: 1e-2}

def _environment_says() -> bool:
    return os.environ.get(ENVIRONMENT_VARIABLE, "") not in ("", "0")


# Whether measured dispatch is on: set_measured_dispatch's value, or the environment's as
# the process started (read once: every layer call asks, and os.environ.get of a variable
# that is not set raises and catches a KeyError inside, 2-6 us of a single step).
_enabled: bool = _environment_says()
_memory: Dict[str, Dict[str, dict]] = {}  # cache file -> its choices, as last read or written


def set_measured_dispatch(enabled: Optional[bool] = True) -> None:
    """Turn measured dispatch on or off for this process; None: as the environment
    variable FUSED_RNN_MEASURED_DISPATCH says now (it is otherwise read at import)."""
    global _enabled
    _enabled = _environment_says() if enabled is None else bool(enabled)


def measured_dispatch_enabled() -> bool:
    return _enabled


def cache_dir() -> Path:
    if os.environ.get(CACHE_DIR_VARIABLE):
        return Path(os.environ[CACHE_DIR_VARIABLE])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fused_rnn"


def clear_dispatch_cache() -> int:
    """Deletes every measured-dispatch cache file; returns how many."""
    _memory.clear()
    removed = 0
    for path in cache_dir().glob("dispatch-*.json"):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed += 1
    return removed


def environment(device: torch.device) -> Dict[str, str]:
    """What a measurement depends on besides the call: the device and the software."""
    env = {"torch": torch.__version__, "fused_rnn": __version__, "device_type": device.type}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = "none"
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        properties = torch.cuda.get_device_properties(index)
        env.update(device=properties.name, sms=str(properties.multi_processor_count),
                   cuda=str(torch.version.cuda), driver=_driver_version())
    else:
        env.update(device=_cpu_model(), threads=str(torch.get_num_threads()))
    return env


def _driver_version() -> str:
    try:
        return str(torch._C._cuda_getDriverVersion())
    except (AttributeError, RuntimeError):
        return "unknown"


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cache_file(device: torch.device) -> Path:
    env = environment(device)
    digest = hashlib.sha256(json.dumps(env, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / f"dispatch-{digest}.json"


def batch_bucket(batch: int) -> int:
    """Calls whose batches round to the same power of two share a measurement."""
    return 1 if batch <= 1 else 2 ** round(math.log2(batch))


def call_key(dtype: torch.dtype, cell: str, hidden: int, batch: int, options: Sequence[str],
             training: Optional[bool], steps: Optional[int] = None) -> str:
    """The kind of call a measurement stands for; sequence lengths that round to the same
    power of two share one (the fused kernels' ratio to torch.nn's depends on T)."""
    mode = "training" if training else "inference"
    length = "" if steps is None else f"T{batch_bucket(steps)}|"
    return f"{cell}|{str(dtype).replace('torch.', '')}|{mode}|B{batch_bucket(batch)}|H{hidden}|{length}" + \
        "+".join(sorted(options))


def _read(path: Path) -> Dict[str, dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data.get("choices", {}) if isinstance(data, dict) else {}


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "a") as lock:
        try:
            import fcntl
        except ImportError:  # not on a POSIX system: writes are still atomic, merges may lose a race
            yield
            return
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _store(path: Path, key: str, entry: dict, device: torch.device) -> None:
    with _locked(path):
        choices = _read(path)  # what other processes wrote since
        choices[key] = entry
        payload = {"environment": environment(device), "choices": choices}
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as out:
                json.dump(payload, out, indent=1, sort_keys=True)
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
            raise
    _memory[str(path)] = choices


def cached_choice(device: torch.device, dtype: torch.dtype, cell: Optional[str], hidden: Optional[int],
                  batch: Optional[int], options: Sequence[str], training: Optional[bool],
                  eligible: Sequence[str], steps: Optional[int] = None) -> Optional[Tuple[str, str]]:
    """(backend, its timings as text) measured for a call of this kind on this device,
    if measured dispatch is on and it was measured; else None."""
    if not measured_dispatch_enabled() or cell is None or hidden is None or batch is None:
        return None
    path = cache_file(device)
    choices = _memory.get(str(path))
    if choices is None:
        choices = _memory[str(path)] = _read(path)
    key = call_key(dtype, cell, hidden, batch, options, training, steps)
    if key not in choices:  # another process may have measured it since this one read the file
        choices = _memory[str(path)] = _read(path)
    entry = choices.get(key)
    if entry is None or entry.get("backend") not in eligible:
        return None
    return entry["backend"], entry.get("timings", "")


def _agreement(results: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> float:
    worst = 0.0
    for got, want in zip(results, reference):
        if got is None or want is None or want.numel() == 0:
            continue
        scale = max(1.0, float(want.detach().abs().max()))
        worst = max(worst, float((got.detach().double() - want.detach().double()).abs().max()) / scale)
    return worst


def _seconds(step: Callable[[], object], device: torch.device) -> float:
    step()  # compiles, autotunes, allocates
    times = []
    began = time.perf_counter()
    while len(times) < MAX_CALLS and (not times or time.perf_counter() - began < TIMED_SECONDS):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(device: torch.device, dtype: torch.dtype, cell: str, hidden: int, batch: int,
            options: Sequence[str], training: bool, candidates: Sequence[str],
            run: Callable[[str], Sequence[torch.Tensor]], steps: Optional[int] = None) -> str:
    """Times `run(backend)` (the call on that backend; in training it also returns the
    gradients) for every candidate whose results agree with the first candidate's,
    caches and returns the fastest."""
    reference, agreeing, disagreeing = None, [], {}
    for name in candidates:
        try:
            results = run(name)
        except Exception as error:  # noqa: BLE001 - a backend that cannot run the call is left out
            disagreeing[name] = f"failed: {type(error).__name__}: {error}"
            continue
        if reference is None:
            reference = results
        else:
            error = _agreement(results, reference)
            if not error <= AGREEMENT.get(dtype, 1e-3):
                disagreeing[name] = f"differs from {agreeing[0]} by {error:.1e}"
                continue
        agreeing.append(name)
    if disagreeing:
        warnings.warn(f"fused_rnn measured dispatch left out {disagreeing}", RuntimeWarning, stacklevel=3)
    seconds = {name: _seconds(lambda name=name: run(name), device) for name in agreeing}
    winner = min(seconds, key=seconds.get)
    timings = ", ".join(f"{name} {1e3 * s:.3g} ms" for name, s in sorted(seconds.items(), key=lambda item: item[1]))
    _store(cache_file(device), call_key(dtype, cell, hidden, batch, options, training, steps),
           {"backend": winner, "timings": timings}, device)
    return winner
