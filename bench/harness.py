"""The benchmark harness: fused_rnn's backends against torch.nn.RNN(nonlinearity="relu")
/ torch.nn.LSTM, on the CPU or a GPU, in one method.

For every cell (IRNN, LSTM), mode (inference: forward under ``torch.no_grad``;
training: forward and backward of ``y.sum()``), dtype and configuration, each contender
runs the same single layer with the same weights:

- ``nn``: ``torch.nn.RNN(nonlinearity="relu")`` or ``torch.nn.LSTM`` (oneDNN / ATen on
  the CPU, cuDNN on a GPU), the baseline;
- a fused_rnn backend (``cpp``, ``cuda``, ``triton``, ``nn``, ``torch``) or ``auto``:
  :func:`fused_rnn.irnn` / :func:`fused_rnn.lstm` with that ``backend``, where dispatch
  lets it take the case (``auto`` shows what a user gets by default);
- ``module`` (CPU): the drop-in module, ``fused_rnn.IRNN`` / ``LSTM`` with backend
  ``cpp``, on the baseline's own parameters (a module's ``auto`` reads its ratio).

Every contender's outputs, final states and gradients are checked against the
baseline before anything is timed. Timing is made for a shared, noisy machine: after a
warm-up the contenders of one case take turns, round after round, and the tables report
medians; a speed-up is the median over rounds of the ratio of the baseline's time to
the contender's time measured in the same round. On a GPU each timed block is measured
with CUDA events.

Commands: ``python bench/table.py`` (the CPU table), ``python bench/gpu_bench.py`` (the
GPU table), ``python bench/feature_costs.py``, the pytest-benchmark suites in bench/,
and ``fused-rnn bench`` (the CPU table, from a source checkout).
"""

import argparse
import contextlib
import copy
import datetime
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

import fused_rnn

CELLS = ("irnn", "lstm")
MODES = ("inference", "training")
BASELINE = "torch.nn"  # the nn.RNN / nn.LSTM module itself (the "nn" backend is a contender)
# the CPU table's contenders: "nn" is the functional API's route to torch.nn's kernels, and
# "module" the drop-in module (fused_rnn.IRNN / LSTM, backend "cpp") on the baseline's own
# parameters, whose per-layer path adds Python to a fused call (auto's choice for modules)
MODULE = "module"
FUSED_BACKENDS = ("cpp", "auto", "nn", "torch", MODULE)
GPU_BACKENDS = ("cuda", "triton", "auto")
CONTENDER_LABELS = {BASELINE: "nn.RNN / nn.LSTM", "cpp": "cpp", "torch": "torch loop", "cuda": "cuda",
                    "triton": "triton", "nn": "nn backend", "auto": "auto", MODULE: "cpp module"}
BASELINE_MODULE_NAMES = {"irnn": 'nn.RNN(nonlinearity="relu")', "lstm": "nn.LSTM"}
DTYPE = torch.float32
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SEED = 0


def tolerance(dtype: torch.dtype, steps: int) -> float:
    """Accepted difference from the baseline, as max|got - want| / max|want| per tensor
    (scaled by the tensor's largest entry, because weight gradients are sums over T*B
    terms whose small entries come from cancellation).

    float32: each contender does the same arithmetic in another order (blocked GEMMs,
    bias added once or twice), so results differ by rounding only: eps = 6e-8, and a
    100-step recurrence with GEMMs over up to 512 terms gives ~sqrt(K*T) * eps ~ 1e-5 at
    worst; measured on the CPU table's shapes: at most 3.3e-6 (IRNN, T=100, B=1), so 1e-4
    is a 30x margin there. Over 1024 steps (the GPU table) the same growth stays near
    1e-5 (measured on cuDNN against the fused scans with TF32 off), and 1e-3 keeps that
    margin. bfloat16: cuDNN rounds its state to bf16 at every step while the fused
    kernels keep it in float32, so the two differ by a few bf16 units (2^-8 = 4e-3
    each): 5e-2. On the CPU the bf16 contenders are checked against float64
    (:func:`reference_problem`), within 5e-2 or torch.nn's own bf16 error, whichever is
    larger (the fused kernels measured at most 1.3e-2 there). A wrong gate order, index
    or missing term errs by O(1) in every case.
    """
    if dtype == torch.bfloat16:
        return 5e-2
    return 1e-4 if steps <= 128 else 1e-3

# IRNN weights. W_hh = identity + noise keeps the recurrence near the identity as in Le
# et al. (2015), the noise breaking the symmetry between units. The noise's spectral
# radius is about std * sqrt(H), so an std of 0.01 / sqrt(H) keeps every eigenvalue
# within ~0.01 of 1 and activations bounded over 100 steps (1.01^100 < 3; measured
# max|h| <= 11 on these shapes, while an std of 0.01 grows h to 1e6 by T=100). Longer
# sequences (the GPU table's 1024 steps) scale the identity by 0.9, a contracting
# recurrence that stays finite however long it runs.
IRNN_RECURRENT_NOISE = 0.01
LONG_SEQUENCE = 128
LONG_SEQUENCE_IDENTITY_SCALE = 0.9
IRNN_INPUT_STD = 0.01
# Initial states, small and random so that the dh0 / dc0 paths are exercised too.
INITIAL_STATE_STD = 0.1


class BenchConfig(NamedTuple):
    name: str
    T: int  # sequence length
    B: int  # batch size
    I: int  # input size
    H: int  # hidden size
    about: str


CONFIGS = (  # the CPU table's
    BenchConfig("lesson", 64, 64, 42, 256, "the char-level lesson's model (42-dim embeddings, 256 units)"),
    BenchConfig("small-batch", 100, 1, 42, 256, "one sequence at a time, as in generation"),
    BenchConfig("fastrnns", 100, 64, 512, 512, "the defaults of PyTorch's benchmarks/fastrnns"),
    BenchConfig("short", 8, 64, 42, 256, "the lesson's stateful model, trained on sequences of 8"),
    BenchConfig("3char", 3, 64, 42, 256, "the lesson's three-character model: a call's fixed costs against 3 steps"),
    BenchConfig("generate", 1, 1, 42, 256, "one character at a time, as the stateful models' sampling calls the layer"),
)
CONFIGS_BY_NAME = {config.name: config for config in CONFIGS}


@dataclass(frozen=True)
class TimingPlan:
    warmup_calls: int  # untimed calls of each contender before the first round
    rounds: int  # rounds in which every contender is timed once, in turn
    min_round_seconds: float  # each contender repeats its call within a round until this long


# 15 rounds keep the median stable against a few rounds slowed by other work on the
# machine; 0.1 s per timed block averages out scheduler jitter of a few milliseconds.
FULL_PLAN = TimingPlan(warmup_calls=3, rounds=15, min_round_seconds=0.1)
QUICK_PLAN = TimingPlan(warmup_calls=1, rounds=5, min_round_seconds=0.02)


# ---------------------------------------------------------------------------
# Problems: inputs and weights


@dataclass
class Problem:
    """One layer's inputs and weights; every contender runs on these same tensors.

    module: the baseline nn.RNN / nn.LSTM, whose parameters are the weights all
    contenders use; x [T, B, I]; state (h0,) or (h0, c0), each [B, H]; all on `device`
    in `dtype`. Every tensor requires grad, so training mode differentiates with
    respect to all of them.
    """

    cell: str
    config: BenchConfig
    module: nn.RNNBase
    x: Tensor
    state: Tuple[Tensor, ...]
    _fused_module: Optional[nn.Module] = field(default=None, init=False, repr=False)

    def fused_module(self) -> nn.Module:
        """fused_rnn's drop-in module for this cell (backend "cpp") holding the baseline's
        own parameters, so that its gradients are theirs (built on first use)."""
        if self._fused_module is None:
            c = self.config
            kind = fused_rnn.IRNN if self.cell == "irnn" else fused_rnn.LSTM
            fused = kind(c.I, c.H, backend="cpp", device=self.device, dtype=self.dtype)
            for name, parameter in self.module.named_parameters():
                setattr(fused, name, parameter)
            self._fused_module = fused
        return self._fused_module

    @property
    def device(self) -> torch.device:
        return self.x.device

    @property
    def dtype(self) -> torch.dtype:
        return self.x.dtype

    @property
    def weights(self) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        m = self.module
        return m.weight_ih_l0, m.weight_hh_l0, m.bias_ih_l0, m.bias_hh_l0

    @property
    def differentiable_inputs(self) -> Tuple[Tensor, ...]:
        return (self.x, *self.state, *self.weights)

    @property
    def output_names(self) -> Tuple[str, ...]:
        return ("y", "h_n") if self.cell == "irnn" else ("y", "h_n", "c_n")

    @property
    def gradient_names(self) -> Tuple[str, ...]:
        states = ("dh0",) if self.cell == "irnn" else ("dh0", "dc0")
        return ("dx", *states, "dw_ih", "dw_hh", "db_ih", "db_hh")


def make_problem(cell: str, config: BenchConfig, seed: int = SEED, device="cpu",
                 dtype: torch.dtype = DTYPE) -> Problem:
    """Inputs and weights for `cell` at `config`, the same for the same seed, drawn in
    float32 on the CPU and then moved to `device` and `dtype`."""
    if cell not in CELLS:
        raise ValueError(f"cell must be one of {CELLS}, got {cell!r}")
    T, B, I, H = config.T, config.B, config.I, config.H
    # fork_rng: a fixed seed here must not reset the caller's random stream
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if cell == "irnn":
            module = nn.RNN(I, H, nonlinearity="relu", dtype=DTYPE)
            identity = 1.0 if T <= LONG_SEQUENCE else LONG_SEQUENCE_IDENTITY_SCALE
            with torch.no_grad():
                module.weight_hh_l0.copy_(identity * torch.eye(H)
                                          + IRNN_RECURRENT_NOISE / math.sqrt(H) * torch.randn(H, H))
                module.weight_ih_l0.normal_(0.0, IRNN_INPUT_STD)
                module.bias_ih_l0.zero_()
                module.bias_hh_l0.zero_()
            num_states = 1
        else:
            # nn.LSTM's own initialisation: uniform(-1/sqrt(H), 1/sqrt(H))
            module = nn.LSTM(I, H, dtype=DTYPE)
            num_states = 2
        x = torch.randn(T, B, I, dtype=DTYPE)
        state = tuple(INITIAL_STATE_STD * torch.randn(B, H, dtype=DTYPE) for _ in range(num_states))
    module = module.to(device=device, dtype=dtype)
    x = x.to(device=device, dtype=dtype).requires_grad_()
    state = tuple(s.to(device=device, dtype=dtype).requires_grad_() for s in state)
    return Problem(cell, config, module, x, state)


# ---------------------------------------------------------------------------
# Contenders


def run_layer(problem: Problem, contender: str) -> Tuple[Tensor, ...]:
    """Runs `contender` on `problem`: (y [T, B, H], h_n [B, H]) or (y, h_n, c_n)."""
    if contender in (BASELINE, MODULE):
        # the modules take and return states as [num_layers, B, H]
        module = problem.module if contender == BASELINE else problem.fused_module()
        states = tuple(s.unsqueeze(0) for s in problem.state)
        if problem.cell == "irnn":
            y, h_n = module(problem.x, states[0])
            return y, h_n.squeeze(0)
        y, (h_n, c_n) = module(problem.x, states)
        return y, h_n.squeeze(0), c_n.squeeze(0)
    if problem.cell == "irnn":
        return fused_rnn.irnn(problem.x, problem.state[0], *problem.weights, backend=contender)
    y, (h_n, c_n) = fused_rnn.lstm(problem.x, problem.state, *problem.weights, backend=contender)
    return y, h_n, c_n


def training_step(problem: Problem, contender: str) -> Tuple[Tensor, ...]:
    """Forward and backward of the loss y.sum(): the outputs, then the gradients of
    every differentiable input (order of :attr:`Problem.differentiable_inputs`)."""
    outputs = run_layer(problem, contender)
    # autograd.grad rather than backward(): no .grad accumulating from call to call
    grads = torch.autograd.grad(outputs[0].sum(), problem.differentiable_inputs)
    return (*outputs, *grads)


def make_step(problem: Problem, contender: str, mode: str) -> Callable[[], object]:
    """The zero-argument callable that the timers call for one (contender, mode)."""
    if mode == "inference":
        def inference_step():
            with torch.no_grad():
                return run_layer(problem, contender)
        return inference_step
    if mode == "training":
        return lambda: training_step(problem, contender)
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def unavailable_reason(contender: str, problem: Optional[Problem] = None, device="cpu",
                       dtype: torch.dtype = DTYPE) -> Optional[str]:
    """Why `contender` cannot run `problem` (or, without one, tensors of `device` and
    `dtype`) on this install, or None if it can: dispatch's own answer."""
    if contender == BASELINE:
        return None
    if problem is not None:
        device, dtype = problem.device, problem.dtype
    if contender == MODULE:  # the module's kernels are the "cpp" backend's
        contender = "cpp"
    try:
        if problem is None:
            fused_rnn.select_backend(device, dtype, contender)
        else:
            c = problem.config
            fused_rnn.select_backend(device, dtype, contender, cell=problem.cell, hidden=c.H, batch=c.B)
    except ValueError as error:
        return str(error)
    return None


# ---------------------------------------------------------------------------
# Correctness


class CorrectnessError(AssertionError):
    """A contender's results differ from the baseline's by more than rounding."""


def max_scaled_error(got: Tensor, want: Tensor) -> float:
    """max|got - want| / max|want| (the error relative to the tensor's scale)."""
    if got.shape != want.shape:
        raise CorrectnessError(f"shape {tuple(got.shape)} != {tuple(want.shape)}")
    got, want = got.detach().float(), want.detach().float()
    scale = want.abs().max().item() if want.numel() else 0.0
    difference = (got - want).abs().max().item() if want.numel() else 0.0
    return difference / scale if scale > 0 else difference


def reference_problem(problem: Problem) -> Problem:
    """The problem whose baseline results a contender is checked against: `problem`
    itself, or on the CPU in bfloat16 its float64 copy (the same rounded values). There
    nn.RNN / nn.LSTM compute in bf16 (state and products rounded at every step), which
    is no yardstick: at the lesson's shape in IRNN training nn.RNN's dh0 is 0.66 of scale
    from the float64 result, the fused kernels' (float32 state) 1.3e-2."""
    if not (problem.device.type == "cpu" and problem.dtype == torch.bfloat16):
        return problem
    module = copy.deepcopy(problem.module).double()
    return Problem(problem.cell, problem.config, module, problem.x.detach().double().requires_grad_(),
                   tuple(s.detach().double().requires_grad_() for s in problem.state))


def check_against_baseline(problem: Problem, contender: str, mode: str,
                           tolerance_: Optional[float] = None) -> Dict[str, float]:
    """Compares `contender` with nn.RNN / nn.LSTM on `problem` (in float64 on the CPU in
    bfloat16: :func:`reference_problem`): outputs and final states (under no_grad in
    inference mode), and every gradient in training mode. Returns the scaled error of
    each tensor; raises CorrectnessError if one exceeds the tolerance (default:
    :func:`tolerance` of the problem's dtype and length)."""
    limit = tolerance(problem.dtype, problem.config.T) if tolerance_ is None else tolerance_
    reference = reference_problem(problem)
    if mode == "inference":
        with torch.no_grad():
            got, want = run_layer(problem, contender), run_layer(reference, BASELINE)
        names = problem.output_names
    else:
        got, want = training_step(problem, contender), training_step(reference, BASELINE)
        names = problem.output_names + problem.gradient_names
    if not len(got) == len(want) == len(names):
        raise CorrectnessError(f"{describe_case(problem, mode)}: {contender} returned {len(got)} tensors, "
                               f"{BASELINE_MODULE_NAMES[problem.cell]} {len(want)}, expected {len(names)}")
    errors = {}
    for name, got_tensor, want_tensor in zip(names, got, want):
        try:
            errors[name] = max_scaled_error(got_tensor, want_tensor)
        except CorrectnessError as error:
            raise CorrectnessError(f"{describe_case(problem, mode)}, {contender}: {name}: {error}") from None
    limits = dict.fromkeys(names, limit)
    if reference is not problem:  # a contender may also be as far from float64 as torch.nn's own bf16 result
        with torch.no_grad() if mode == "inference" else contextlib.nullcontext():
            own = run_layer(problem, BASELINE) if mode == "inference" else training_step(problem, BASELINE)
        limits = {name: max(limit, max_scaled_error(o, w)) for name, o, w in zip(names, own, want)}
    too_far = {name: error for name, error in errors.items() if not error <= limits[name]}
    if too_far:
        listed = ", ".join(f"{name} {error:.2e}" for name, error in too_far.items())
        raise CorrectnessError(
            f"{describe_case(problem, mode)}: {contender} differs from "
            f"{'float64 ' if reference is not problem else ''}{BASELINE_MODULE_NAMES[problem.cell]} "
            f"by more than {limit:.0e} of scale: {listed}"
        )
    return errors


def describe_case(problem: Problem, mode: str) -> str:
    c = problem.config
    dtype = str(problem.dtype).replace("torch.", "")
    return f"{problem.cell} {mode} {dtype} {c.name} (T={c.T}, B={c.B}, I={c.I}, H={c.H})"


# ---------------------------------------------------------------------------
# Timing


def _time_calls(step: Callable[[], object], calls: int, device="cpu") -> float:
    """Seconds per call of `calls` back-to-back calls, the garbage collector paused; on
    a GPU between two CUDA events, the queue drained before and after."""
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        if torch.device(device).type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            for _ in range(calls):
                step()
            end.record()
            torch.cuda.synchronize(device)
            return start.elapsed_time(end) / 1e3 / calls
        start = time.perf_counter()
        for _ in range(calls):
            step()
        return (time.perf_counter() - start) / calls
    finally:
        if gc_was_enabled:
            gc.enable()


def time_interleaved(steps: Dict[str, Callable[[], object]], plan: TimingPlan,
                     device="cpu") -> Dict[str, List[float]]:
    """Seconds per call of each step, one entry per round.

    Warm-up calls first (allocator, thread pool, caches, compilation, autotuning), which
    also measure how many calls one round needs to last plan.min_round_seconds. Then
    every round times each step once, the order rotating so that no step always follows
    the same other one.
    """
    names = list(steps)
    calls_per_round = {}
    for name in names:
        warmup_seconds = [_time_calls(steps[name], 1, device) for _ in range(max(1, plan.warmup_calls))]
        calls_per_round[name] = max(1, math.ceil(plan.min_round_seconds / min(warmup_seconds)))
    seconds = {name: [] for name in names}
    for round_index in range(plan.rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            seconds[name].append(_time_calls(steps[name], calls_per_round[name], device))
        gc.collect()
    return seconds


# ---------------------------------------------------------------------------
# One case and the whole run


@dataclass
class CaseResult:
    """Timings of every contender for one (cell, mode, dtype, configuration)."""

    cell: str
    mode: str
    config: BenchConfig
    dtype: str
    seconds_per_call: Dict[str, List[float]]  # contender -> one entry per round
    errors: Dict[str, Dict[str, float]]  # contender -> tensor name -> scaled error vs baseline
    unavailable: Dict[str, str] = field(default_factory=dict)  # contender -> why it did not run

    def median_ms(self, contender: str) -> Optional[float]:
        rounds = self.seconds_per_call.get(contender)
        return 1e3 * statistics.median(rounds) if rounds else None

    def speedup(self, contender: str) -> Optional[float]:
        """Median over rounds of baseline time / contender time (> 1: contender faster)."""
        baseline, other = self.seconds_per_call.get(BASELINE), self.seconds_per_call.get(contender)
        if not baseline or not other:
            return None
        return statistics.median(b / o for b, o in zip(baseline, other))

    def to_json(self) -> dict:
        contenders = {}
        for name, rounds in self.seconds_per_call.items():
            ms = sorted(1e3 * s for s in rounds)
            contenders[name] = {
                "median_ms": self.median_ms(name),
                "min_ms": ms[0],
                "max_ms": ms[-1],
                "rounds_ms": [1e3 * s for s in rounds],
                "speedup_vs_nn": self.speedup(name),
                "max_scaled_error_vs_nn": self.errors.get(name),
            }
        return {
            "cell": self.cell,
            "mode": self.mode,
            "dtype": self.dtype,
            "config": self.config._asdict(),
            "contenders": contenders,
            "unavailable": self.unavailable,
        }


def run_case(cell: str, mode: str, config: BenchConfig, backends: Sequence[str], plan: TimingPlan,
             device="cpu", dtype: torch.dtype = DTYPE) -> CaseResult:
    """Checks, then times, nn.RNN / nn.LSTM and each of `backends` that dispatch lets
    take the case."""
    problem = make_problem(cell, config, device=device, dtype=dtype)
    unavailable = {name: reason for name in backends if (reason := unavailable_reason(name, problem)) is not None}
    runnable = [name for name in backends if name not in unavailable]
    errors = {name: check_against_baseline(problem, name, mode) for name in runnable}
    steps = {name: make_step(problem, name, mode) for name in [BASELINE, *runnable]}
    return CaseResult(cell, mode, config, str(dtype).replace("torch.", ""), time_interleaved(steps, plan, device),
                      errors, unavailable)


def describe_machine(device="cpu") -> Dict[str, object]:
    """What the timings were measured on; the table's header."""
    try:
        usable_cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable_cpus = os.cpu_count()
    info = fused_rnn.build_info()
    machine = {
        "cpu_model": cpu_model_name(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable_cpus,
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "fused_rnn_version": fused_rnn.__version__,
        "fused_rnn_compiler": info.get("compiler"),
        "cpu_gemm": info.get("cpu_gemm"),
        "cpu_bf16": info.get("cpu_bf16"),
        "python_version": platform.python_version(),
        "os": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": str(device),
    }
    if torch.device(device).type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        machine["gpu"] = f"{properties.name}, {properties.multi_processor_count} SMs"
    return machine


def cpu_model_name() -> str:
    """The CPU's model name from /proc/cpuinfo, else what the platform module says."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def layer_gflop(cell: str, mode: str, config: BenchConfig) -> float:
    """The arithmetic of one call, GFLOP: 2 T B G H (I + H) for the forward's products
    (G = 1 for the IRNN, 4 for the LSTM; the cell's pointwise maths not counted), three
    times that in training (the backward's per-step products [W_hh | W_ih] and the
    weight-gradient GEMM do as much again each)."""
    gates = 1 if cell == "irnn" else 4
    forward = 2.0 * config.T * config.B * gates * config.H * (config.I + config.H) / 1e9
    return forward * (3 if mode == "training" else 1)


def measure_sgemm_gflops(size: int = 2048, repeats: int = 5) -> float:
    """This machine's float32 GEMM rate through torch.mm (size^3, best of `repeats`, on
    torch's threads): the reference the CPU table's GFLOP/s columns are read against."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2.0 * size ** 3 / best / 1e9


@dataclass
class BenchReport:
    machine: Dict[str, object]
    plan: TimingPlan
    backends: Tuple[str, ...]
    results: List[CaseResult]
    command: str

    def to_json(self) -> dict:
        return {
            "machine": self.machine,
            "plan": vars(self.plan),
            "backends": list(self.backends),
            "command": self.command,
            "results": [result.to_json() for result in self.results],
        }


def run_benchmarks(cells: Sequence[str] = CELLS, modes: Sequence[str] = MODES,
                   configs: Sequence[BenchConfig] = CONFIGS, backends: Sequence[str] = FUSED_BACKENDS,
                   plan: TimingPlan = FULL_PLAN, command: str = "", progress=None, device="cpu",
                   dtypes: Sequence[torch.dtype] = (DTYPE,)) -> BenchReport:
    """Runs every (dtype, cell, configuration, mode) case on `device`; `progress`, if
    given, is called with a line before each case."""
    machine = describe_machine(device)
    if torch.device(device).type == "cpu":
        machine["sgemm_gflops"] = measure_sgemm_gflops()
    results = []
    for dtype in dtypes:
        for cell in cells:
            for config in configs:
                for mode in modes:
                    if progress is not None:
                        progress(f"{cell} {mode} {str(dtype).replace('torch.', '')} {config.name} "
                                 f"(T={config.T}, B={config.B}, I={config.I}, H={config.H})")
                    results.append(run_case(cell, mode, config, backends, plan, device, dtype))
    return BenchReport(machine, plan, tuple(backends), results, command)


# ---------------------------------------------------------------------------
# Markdown


def _format_ms(ms: Optional[float]) -> str:
    if ms is None:
        return "unavailable"
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def _format_speedup(ratio: Optional[float]) -> str:
    return "unavailable" if ratio is None else f"{ratio:.2f}x"


def _format_error(errors: Optional[Dict[str, float]]) -> str:
    return "-" if not errors else f"{max(errors.values()):.1e}"


def format_markdown(report: BenchReport) -> str:
    """The table of median times and speed-ups, headed by the machine and the method."""
    m = report.machine
    plan = report.plan
    on_gpu = "gpu" in m
    title = f"GPU benchmark ({m['gpu']})" if on_gpu else "CPU benchmark"
    dtypes = list(dict.fromkeys(result.dtype for result in report.results))
    lines = [
        f"## {title}: fused_rnn vs torch.nn.RNN / torch.nn.LSTM",
        "",
        f"- CPU: {m['cpu_model']}, {m['usable_cpus']} usable of {m['logical_cpus']} logical cores; "
        f"torch.get_num_threads() = {m['torch_threads']}",
        f"- torch {m['torch_version']}, fused_rnn {m['fused_rnn_version']} ({m['fused_rnn_compiler']}), "
        f"Python {m['python_version']}, {m['os']}",
        f"- date: {m['date']}",
    ]
    if report.command:
        lines.append(f"- command: `{report.command}`")
    lines += [
        f"- {', '.join(dtypes)}, one layer. inference = forward under torch.no_grad(); training = forward + "
        "backward of y.sum() (gradients of x, initial state(s) and all weights)"
        + ("; TF32 off on both sides (cuDNN is the baseline)." if on_gpu else "."),
        f"- times: median ms per call over {plan.rounds} rounds after {plan.warmup_calls} warm-up call(s); "
        "in each round every contender is timed in turn, repeating its call for at least "
        f"{1e3 * plan.min_round_seconds:.0f} ms" + (" (CUDA events)" if on_gpu else "") + ". speed-up = median "
        "over rounds of (nn time / contender time) in the same round; above 1x means faster than nn.RNN / nn.LSTM.",
        "- before timing, every contender's outputs, final states and gradients matched "
        "nn.RNN / nn.LSTM within the harness's tolerance (bench/harness.py) of each tensor's largest entry; "
        "`-`: dispatch does not send that case to that backend.",
    ]
    gflops = not on_gpu and "sgemm_gflops" in m and "cpp" in report.backends
    if gflops:
        lines.append(
            "- GFLOP/s: the products' arithmetic per call (2 T B G H (I + H), G = 1 IRNN / 4 LSTM, three times "
            "that in training) over the median time; the cell's pointwise maths is not counted. This machine's "
            f"float32 GEMM rate in the same run, torch.mm of 2048 x 2048 matrices: {m['sgemm_gflops']:.0f} GFLOP/s "
            "(MKL, which runs its AVX2 code on AMD CPUs; oneDNN's LSTM and the package's AVX-512 kernel go "
            "past it on cores with full-width AVX-512). The package's float32 GEMM kernel on this CPU: "
            f"{m.get('cpu_gemm') or 'unknown'} (fused_rnn.build_info()['cpu_gemm'])"
            + (f"; a bfloat16 layer's products: {m.get('cpu_bf16')} (['cpu_bf16'])."
               if "bfloat16" in dtypes and m.get("cpu_bf16") else "."))
    lines.append("")
    header = ["cell", "mode"] + (["dtype"] if len(dtypes) > 1 else []) + ["T", "B", "I", "H",
                                                                           f"{CONTENDER_LABELS[BASELINE]} ms"]
    header += [f"{CONTENDER_LABELS[name]} ms" for name in report.backends]
    header += [f"{CONTENDER_LABELS[name]} speed-up vs nn" for name in report.backends]
    if gflops:
        header += [f"{CONTENDER_LABELS[BASELINE]} GFLOP/s", f"{CONTENDER_LABELS['cpp']} GFLOP/s"]
    if on_gpu:
        header.append("max error")
    lines.append("| " + " | ".join(header) + " |")
    text_columns = 3 if len(dtypes) > 1 else 2
    lines.append("|" + "|".join(["---"] * text_columns + ["---:"] * (len(header) - text_columns)) + "|")
    for result in report.results:
        c = result.config
        row = [result.cell, result.mode] + ([result.dtype] if len(dtypes) > 1 else [])
        row += [str(c.T), str(c.B), str(c.I), str(c.H), _format_ms(result.median_ms(BASELINE))]
        row += [_format_ms(result.median_ms(name)) if name not in result.unavailable or not on_gpu else "-"
                for name in report.backends]
        row += [_format_speedup(result.speedup(name)) if name not in result.unavailable or not on_gpu else "-"
                for name in report.backends]
        if gflops:
            work = layer_gflop(result.cell, result.mode, c)
            row += [f"{1e3 * work / ms:.0f}" if ms else "unavailable"
                    for ms in (result.median_ms(BASELINE), result.median_ms("cpp"))]
        if on_gpu:
            row.append(_format_error({k: v for errors in result.errors.values() for k, v in errors.items()}))
        lines.append("| " + " | ".join(row) + " |")
    if not on_gpu:
        reasons = {}
        for result in report.results:
            reasons.update(result.unavailable)
        if reasons:
            lines.append("")
            lines += [f"- {CONTENDER_LABELS[name]} unavailable: {reason}" for name, reason in reasons.items()]
    lines.append("")
    configs = dict.fromkeys(result.config for result in report.results if result.config.about)
    if configs:
        lines.append("Configurations: " + "; ".join(f"T={c.T} B={c.B} I={c.I} H={c.H}: {c.about}"
                                                    for c in configs) + ".")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# Command line


def _choices(text: str, allowed: Sequence[str]) -> List[str]:
    chosen = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [item for item in chosen if item not in allowed]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"choose from {', '.join(allowed)} (comma-separated), got {text!r}")
    return chosen


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The CPU benchmark's options (bench/table.py, `fused-rnn bench`)."""
    parser.add_argument("--quick", action="store_true",
                        help=f"fewer, shorter rounds ({QUICK_PLAN.rounds} instead of {FULL_PLAN.rounds})")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write every timing as JSON to PATH")
    parser.add_argument("--backends", type=lambda s: _choices(s, FUSED_BACKENDS),
                        default=list(FUSED_BACKENDS),
                        help="fused_rnn backends to time against nn.RNN / nn.LSTM, and \"module\": the drop-in "
                             f"module on the cpp backend (default: {','.join(FUSED_BACKENDS)})")
    parser.add_argument("--cells", type=lambda s: _choices(s, CELLS), default=list(CELLS),
                        help="default: irnn,lstm")
    parser.add_argument("--modes", type=lambda s: _choices(s, MODES), default=list(MODES),
                        help="default: inference,training")
    parser.add_argument("--configs", type=lambda s: _choices(s, list(CONFIGS_BY_NAME)),
                        default=list(CONFIGS_BY_NAME),
                        help="default: " + ",".join(CONFIGS_BY_NAME))
    parser.add_argument("--dtypes", type=lambda s: _choices(s, list(DTYPES)), default=["float32"],
                        help="default: float32; bfloat16 times the bf16 layers (bf16 products where the CPU has "
                             "AVX-512 BF16: build_info()['cpu_bf16'])")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads(THREADS) first (default: torch's)")


def write_json(report: BenchReport, path: Optional[Path]) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report.to_json(), indent=2) + "\n", encoding="utf-8")


def progress_line(line: str) -> None:
    print(f"timing {line}", file=sys.stderr, flush=True)


def report_from_args(args: argparse.Namespace, command: str) -> BenchReport:
    """Runs the CPU benchmark that `args` (from :func:`add_arguments`) describe; progress
    on stderr."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    report = run_benchmarks(
        cells=args.cells,
        modes=args.modes,
        configs=[CONFIGS_BY_NAME[name] for name in args.configs],
        backends=args.backends,
        plan=QUICK_PLAN if args.quick else FULL_PLAN,
        command=command,
        progress=progress_line,
        dtypes=[DTYPES[name] for name in getattr(args, "dtypes", ["float32"])],
    )
    write_json(report, args.json)
    return report
