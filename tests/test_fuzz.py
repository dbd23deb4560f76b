"""Differential fuzz: random layers through every backend this machine runs, against the
NumPy reference (the functional layers, with every option) and against torch.nn
(modules: layers, directions, batch_first, PackedSequence).

Each run draws a new seed, printed in the report's summary (conftest.py); to replay one,
set FUSED_RNN_FUZZ_SEED. FUSED_RNN_FUZZ_CASES scales the case counts (default 1: 500
cases per CPU backend and dtype (cpp, torch and torch.nn's kernels, "nn", which has
lengths but neither the mask nor the clip), 100 float32 and 100 bf16/fp16 cases for the
Triton interpreter, 400 module cases). A failing case is shrunk (smaller sizes, fewer
options, while it still fails) and printed as a test to paste into a test file.

Sizes: T in [0, 300] (1 often), B in [0, 70], I and H in [1, 300], drawn log-uniformly
so that small layers (and odd sizes and primes) dominate, within a budget of reference
arithmetic per case. Tolerances, per element |got - want| <= atol * max(1, max|want|) +
rtol * |want| (helpers.TOLERANCES): float64 1e-9 (rounding of 1e-16 over at most 300
steps of 600-term sums stays below 1e-12); float32 1e-4 (sqrt(K * T) * 6e-8 <= 1.8e-5
for K, T <= 300: a 5x margin). In float32 an IRNN pre-activation within 1e-4 of 0 (or
of the clip) makes relu's derivative depend on the last bit: such cases are drawn again
(a property of the case, read from the reference alone). bfloat16 on the CPU: the LSTM
at T <= 16 only, relative to the largest element, 1e-2 with float32 products
(tests/test_cpu.py's REDUCED_TOLERANCE: errors of a few bf16 roundings), and
helpers.LOW_PRECISION_TOLERANCE with bf16 products (AVX-512 BF16, or emulated); the CPU's bf16 IRNN's error grows
with T and the recurrence's gain (docs/triton.md) and has no fixed bound. The Triton
kernels in bf16/fp16, at T <= 8: helpers.LOW_PRECISION_TOLERANCE, with the IRNN's
inputs drawn off ReLU's (and the clip's) jumps by helpers.irnn_inputs_off_the_kink.
"""

import dataclasses
import itertools
import math
import os
import zlib
from typing import List, Optional

import numpy as np
import pytest
import torch

import fused_rnn
import rnn_reference as ref
from conftest import FUZZ_SEED
from helpers import LOW_PRECISION_TOLERANCE, TOLERANCES, irnn_inputs_off_the_kink, make_layer

SCALE = float(os.environ.get("FUSED_RNN_FUZZ_CASES", "1"))
CPU = fused_rnn.available_backends("cpu")
REDUCED_TOLERANCE = 1e-2  # bf16, relative to the largest element (test_cpu.py)


@dataclasses.dataclass
class Case:
    cell: str
    T: int
    B: int
    I: int
    H: int
    backend: str
    dtype: str = "float64"
    bias: bool = True
    state: bool = True
    mask: bool = False
    lengths: Optional[List[int]] = None
    clip: bool = False
    strided: bool = False
    seed: int = 0
    design: str = ""  # the Triton backend's design, forced ("split" / "tiled"), if any


def _log_uniform(rng, low, high):
    """An integer in [low, high], small ones more often (log-uniform)."""
    return min(high, max(low, int(math.exp(rng.uniform(math.log(low), math.log(high + 1))))))


def draw_case(rng, cell, backend, dtype, small=False) -> Case:
    """A random layer within the budget of its backend and dtype."""
    while True:
        if small:  # the Triton interpreter runs every program of every step in Python
            steps = int(rng.choice([0, 1, 1, rng.integers(2, 9)]))
            batch, inputs, hidden = int(rng.integers(0, 20)), int(rng.integers(1, 24)), int(rng.integers(1, 48))
        else:
            pick = rng.random()
            steps = 0 if pick < 0.05 else 1 if pick < 0.2 else _log_uniform(rng, 1, 300)
            pick = rng.random()
            batch = 0 if pick < 0.05 else 1 if pick < 0.15 else _log_uniform(rng, 1, 70)
            inputs, hidden = _log_uniform(rng, 1, 300), _log_uniform(rng, 1, 300)
        if dtype == "bfloat16":
            steps = min(steps, 16)
        gates = 1 if cell == "irnn" else 4
        work = steps * batch * gates * hidden * (hidden + inputs)
        if work > (2e7 if dtype == "float64" else 8e6):
            continue
        if cell == "irnn" and dtype == "float32" and steps * batch * hidden > 3000:
            continue  # keeps the chance of a near-tie pre-activation (drawn again) low
        lengths = None
        if rng.random() < 0.4 and batch:
            lengths = [int(v) for v in rng.integers(0, steps + 1, batch)]
            lengths[0] = steps  # a full one, and often a 0
        case = Case(cell, steps, batch, inputs, hidden, backend, dtype, bias=bool(rng.random() < 0.8),
                    state=bool(rng.random() < 0.7), mask=bool(rng.random() < 0.3), lengths=lengths,
                    clip=cell == "irnn" and bool(rng.random() < 0.3), strided=bool(rng.random() < 0.3),
                    seed=int(rng.integers(2 ** 31)))
        if backend == "nn":  # torch.nn's kernels have lengths, not the recurrent mask or the clip
            case.mask = case.clip = False
        return case


def _clip(case, x, states, w_ih, w_hh, b_ih, b_hh, mask, lengths):
    """The case's hidden_clip: below the largest activation, so that some are clipped."""
    if not case.clip:
        return None
    return 0.7 * float(np.max(ref.irnn_forward(x, states[0], w_ih, w_hh, b_ih, b_hh, mask, lengths)[0], initial=1.0))


def _reference(case, x, states, w_ih, w_hh, b_ih, b_hh, mask, lengths, clip, up):
    if case.cell == "irnn":
        y, h, cache = ref.irnn_forward(x, states[0], w_ih, w_hh, b_ih, b_hh, mask, lengths, clip)
        return (y, h), ref.irnn_backward(up["y"], up["h"], cache), cache
    y, h, c, cache = ref.lstm_forward(x, *states, w_ih, w_hh, b_ih, b_hh, mask, lengths)
    return (y, h, c), ref.lstm_backward(up["y"], up["h"], up["c"], cache), cache


def _near_tie(case, cache, clip) -> bool:
    """A float32 IRNN case whose relu (or clip) decision at some element hangs on the
    last bits: its reference pre-activations within 1e-4 of 0 or of the clip."""
    if case.cell != "irnn" or case.dtype != "float32" or not case.T or not case.B:
        return False
    z = np.asarray(cache.preactivations)
    return bool((np.abs(z) < 1e-4).any() or (clip is not None and (np.abs(z - clip) < 1e-4).any()))


def _exploding(outputs, gradients) -> bool:
    """A recurrence that grows without bound (a perturbed identity W_hh with a gain above
    1, at H = 1 most often): past 1e4 (outputs) or 1e8 (gradients) float32 overflows or
    loses the scale the tolerances assume, so such a case is drawn again."""
    largest = max((float(np.abs(a).max(initial=0.0)) for a in outputs), default=0.0)
    steepest = max((float(np.abs(g).max(initial=0.0)) for g in gradients.values() if g is not None), default=0.0)
    return not (largest <= 1e4 and steepest <= 1e8)


def _matches(name, got, want, case, failures):
    got = got.detach().double().cpu().numpy()
    want = np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        failures.append(f"{name}: shape {got.shape} != {want.shape}")
        return
    scale = max(1.0, float(np.abs(want).max(initial=0.0)))
    err = np.abs(got - want)
    dtype = getattr(torch, case.dtype)
    if dtype in LOW_PRECISION_TOLERANCE:
        # the CPU's bf16 LSTM (T <= 16) with float32 products: REDUCED_TOLERANCE; with bf16
        # products (csrc/cpu/gemm_bf16.h) and the Triton kernels' bf16 and fp16 (T <= 8):
        # helpers.LOW_PRECISION_TOLERANCE
        float32_products = case.backend == "cpp" and fused_rnn.build_info()["cpu_bf16"] == "off"
        bound = (REDUCED_TOLERANCE if float32_products else LOW_PRECISION_TOLERANCE[dtype]) * scale
    else:
        atol, rtol = TOLERANCES[dtype]
        bound = atol * scale + rtol * np.abs(want)
    if not np.all(err <= bound) or np.isnan(got).any() != np.isnan(want).any():
        failures.append(f"{name}: max error {err.max(initial=0.0):.3e} (scale {scale:.3g})")


def run_case(case: Case) -> Optional[str]:
    """None if the backend agrees with the reference on every output and gradient, else
    what differs; "skip" for a float32 near-tie case."""
    dtype = getattr(torch, case.dtype)
    x, states, w_ih, w_hh, b_ih, b_hh, up = make_layer(case.cell, case.T, case.B, case.I, case.H, case.bias,
                                                      case.seed)
    rng = np.random.default_rng(case.seed + 1)
    mask = None
    if case.mask:  # the reference gets the mask the backend gets, rounded to its dtype
        mask = torch.tensor((rng.random((case.B, case.H)) > 0.3) / 0.7, dtype=dtype).double().numpy()
    lengths = np.array(case.lengths, dtype=np.int64) if case.lengths is not None else None
    if not case.state:
        states = [np.zeros_like(s) for s in states]
    raw_x, raw_states, raw_weights = x, states, (w_ih, w_hh, b_ih, b_hh)
    leaves = [torch.tensor(a, dtype=dtype) if a is not None else None for a in (x, *states, w_ih, w_hh, b_ih, b_hh)]
    if dtype != torch.float64:  # the reference runs on the values the backend gets
        x, *states, w_ih, w_hh = [t.double().numpy() for t in leaves[:len(states) + 3]]
        b_ih, b_hh = [None if t is None else t.double().numpy() for t in leaves[len(states) + 3:]]
        up = {k: torch.tensor(v, dtype=dtype).double().numpy() for k, v in up.items()}
    clip = _clip(case, x, states, w_ih, w_hh, b_ih, b_hh, mask, lengths)
    if case.cell == "irnn" and dtype in LOW_PRECISION_TOLERANCE:
        # the same x before rounding, moved off ReLU's (and the clip's) jumps
        x = irnn_inputs_off_the_kink(raw_x, (raw_states[0], *raw_weights), dtype, case.seed + 2, mask, lengths, clip)
        if x is None:
            return "skip"
        leaves[0] = torch.tensor(x, dtype=dtype)
        x = leaves[0].double().numpy()
    want_out, want, cache = _reference(case, x, states, w_ih, w_hh, b_ih, b_hh, mask, lengths, clip, up)
    if _near_tie(case, cache, clip) or _exploding(want_out, want):
        return "skip"
    if case.strided:  # non-contiguous inputs: a transposed copy's transpose, and every other row of a wider x
        leaves = [None if t is None else (t.t().contiguous().t() if t.dim() == 2 else t) for t in leaves]
        wide = torch.zeros(case.T, case.B, 2 * case.I, dtype=dtype)
        wide[:, :, ::2] = leaves[0]
        leaves[0] = wide[:, :, ::2]
    for t in leaves:
        if t is not None:
            t.requires_grad_(True)
    options = dict(recurrent_mask=None if mask is None else torch.tensor(mask, dtype=dtype),
                   lengths=None if lengths is None else torch.tensor(lengths))
    state_leaves = leaves[1:2] if case.cell == "irnn" else leaves[1:3]
    given = tuple(state_leaves) if case.state else None
    environment = {"FUSED_RNN_TRITON_DESIGN": case.design} if case.design else {}
    saved = {k: os.environ.get(k) for k in environment}
    os.environ.update(environment)
    try:
        if case.cell == "irnn":
            outputs = fused_rnn.irnn(leaves[0], given[0] if given else None, *leaves[-4:], backend=case.backend,
                                     hidden_clip=clip, **options)
            names = ["dx", "dh0", "dw_ih", "dw_hh", "db_ih", "db_hh"]
            upstream = (up["y"], up["h"])
        else:
            y, (h, c) = fused_rnn.lstm(leaves[0], given, *leaves[-4:], backend=case.backend, **options)
            outputs, upstream = (y, h, c), (up["y"], up["h"], up["c"])
            names = ["dx", "dh0", "dc0", "dw_ih", "dw_hh", "db_ih", "db_hh"]
        failures = []
        for name, got, expected in zip(("y", "h_T", "c_T"), outputs, want_out):
            _matches(name, got, expected, case, failures)
        # (an output that depends on no input, as y of an empty sequence, has no graph: its
        # gradients are zero, which the reference's must then be)
        pairs = [(o, torch.tensor(u, dtype=dtype)) for o, u in zip(outputs, upstream) if o.requires_grad]
        if pairs:
            torch.autograd.backward(*zip(*pairs))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    tensors = [leaves[0], *state_leaves, *leaves[-4:]]
    for name, tensor in zip(names, tensors):
        if tensor is None or (name in ("dh0", "dc0") and not case.state):
            continue
        grad = tensor.grad if tensor.grad is not None else torch.zeros_like(tensor)
        _matches(name, grad, want[name], case, failures)
    return "; ".join(failures) or None


def _failing(case: Case) -> bool:
    try:
        result = run_case(case)
    except Exception:  # a crash is a failure too
        return True
    return result is not None and result != "skip"


def shrink(case: Case) -> Case:
    """A smaller case that still fails: sizes halved toward 1, options switched off."""
    changed = True
    while changed:
        changed = False
        candidates = []
        for field in ("T", "B", "I", "H"):
            value = getattr(case, field)
            floor = 0 if field in ("T", "B") else 1
            for smaller in sorted({floor, value // 2, value - 1}):
                if floor <= smaller < value:
                    lengths = case.lengths
                    if lengths is not None and field in ("T", "B"):
                        steps = smaller if field == "T" else case.T
                        rows = smaller if field == "B" else case.B
                        lengths = [min(v, steps) for v in lengths[:rows]] or None
                    candidates.append(dataclasses.replace(case, **{field: smaller}, lengths=lengths))
        for flag in ("mask", "clip", "strided", "bias", "state"):
            if getattr(case, flag) != (flag in ("bias", "state")):
                candidates.append(dataclasses.replace(case, **{flag: flag in ("bias", "state")}))
        if case.lengths is not None:
            candidates.append(dataclasses.replace(case, lengths=None))
        for candidate in candidates:
            if _failing(candidate):
                case, changed = candidate, True
                break
    return case


def _report(case: Case, problem: str) -> str:
    small = shrink(case)
    return (f"{problem}\nfuzz seed {FUZZ_SEED}; shrunk to a failing case, to paste into a test file:\n\n"
            f"def test_fuzz_regression():\n    from test_fuzz import Case, run_case\n"
            f"    assert run_case({small!r}) is None\n")


def _cases(cell, backend, dtype, small=False, designs=("",)):
    """The random layers of one (cell, backend, dtype), endlessly, the same for the same
    FUZZ_SEED (designs alternate)."""
    rng = np.random.default_rng([FUZZ_SEED, zlib.crc32(f"{cell} {backend} {dtype}".encode())])
    for k in itertools.count():
        yield dataclasses.replace(draw_case(rng, cell, backend, dtype, small), design=designs[k % len(designs)])


def _fuzz(count, cell, backend, dtype, small=False, designs=("",)):
    """Runs `count` (times FUSED_RNN_FUZZ_CASES) random layers against the reference. A
    case drawn ill-conditioned (run_case's "skip": a float32 near-tie, an exploding
    recurrence, inputs that cannot be moved off ReLU's jumps) is replaced by the next
    draw, so every run checks as many layers; more than one such case per layer to run
    would mean the generator is broken."""
    needed = max(1, int(count * SCALE))
    ran = skipped = 0
    for case in _cases(cell, backend, dtype, small, designs):
        if ran == needed or skipped > needed:
            break
        try:
            problem = run_case(case)
        except Exception as error:
            problem = f"raised {type(error).__name__}: {error}"
        if problem == "skip":
            skipped += 1
            continue
        ran += 1
        assert problem is None, _report(case, f"{case}: {problem}")
    assert ran == needed, f"only {ran} of {needed} cases ran ({skipped} ill-conditioned ones drawn)"


FUNCTIONAL = [(b, d) for b in ("cpp", "torch", "nn") if b in CPU for d in ("float64", "float32")] + \
    ([("cpp", "bfloat16")] if "cpp" in CPU else [])


@pytest.mark.timeout(900)
@pytest.mark.parametrize("backend, dtype", FUNCTIONAL, ids=[f"{b}-{d}" for b, d in FUNCTIONAL])
def test_functional_layers_match_the_reference(backend, dtype):
    """500 random layers per backend and dtype (split between the cells; bf16: LSTM
    only), every option, outputs, final states and every gradient."""
    cells = ("lstm",) if dtype == "bfloat16" else ("irnn", "lstm")
    for cell in cells:
        _fuzz(500 // len(cells), cell, backend, dtype)


@pytest.mark.timeout(900)
def test_cpu_bf16_products_match_the_reference(monkeypatch):
    """100 random bf16 LSTM layers through the cpp backend with bf16 products, emulated
    (FUSED_RNN_CPU_BF16=emulate: the AVX-512 BF16 kernel's arithmetic on AVX2, which
    every CPU this runs on has; a CPU with AVX-512 BF16 runs them natively in
    test_functional_layers_match_the_reference), every option: LOW_PRECISION_TOLERANCE."""
    if "cpp" not in CPU:
        pytest.skip("the cpp backend is not built")
    monkeypatch.setenv("FUSED_RNN_CPU_BF16", "emulate")
    try:
        fused_rnn.build_info()
    except RuntimeError as error:  # no AVX2
        pytest.skip(str(error))
    _fuzz(100, "lstm", "cpp", "bfloat16")


@pytest.mark.timeout(900)
@pytest.mark.parametrize("cell", ["irnn", "lstm"])
def test_triton_interpreted_matches_the_reference(cell):
    """50 small random layers per cell (100 in all) through the Triton backend under the
    interpreter, alternating its batch-tiled and hidden-split designs, float32."""
    pytest.importorskip("triton", reason="Triton is not installed")
    if torch.cuda.is_available():
        pytest.skip("with a GPU the Triton kernels run natively, not interpreted: tests/test_gpu.py")
    _fuzz(50, cell, "triton", "float32", small=True, designs=("tiled", "split"))


@pytest.mark.timeout(900)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("cell", ["irnn", "lstm"])
def test_triton_interpreted_low_precision_matches_the_reference(cell, dtype):
    """25 small random layers per cell and dtype (100 in all) through the Triton backend
    under the interpreter in bf16 / fp16, both designs, against the float64 reference of
    the rounded inputs (the IRNN's inputs drawn off ReLU's jumps: helpers)."""
    pytest.importorskip("triton", reason="Triton is not installed")
    if torch.cuda.is_available():
        pytest.skip("with a GPU the Triton kernels run natively, not interpreted: tests/test_gpu.py")
    _fuzz(25, cell, "triton", dtype, small=True, designs=("tiled", "split"))


def _module_pair(rng, kind, backend):
    layers, bidirectional = int(rng.integers(1, 4)), bool(rng.random() < 0.5)
    inputs, hidden = _log_uniform(rng, 1, 40), _log_uniform(rng, 1, 40)
    bias, batch_first = bool(rng.random() < 0.8), bool(rng.random() < 0.5)
    kwargs = dict(num_layers=layers, bidirectional=bidirectional, bias=bias, batch_first=batch_first,
                  dtype=torch.float64)
    if kind == "irnn":
        ours = fused_rnn.IRNN(inputs, hidden, backend=backend, **kwargs)
        theirs = torch.nn.RNN(inputs, hidden, nonlinearity="relu", **kwargs)
    else:
        ours = fused_rnn.LSTM(inputs, hidden, backend=backend, **kwargs)
        theirs = torch.nn.LSTM(inputs, hidden, **kwargs)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs, inputs, hidden, layers * (2 if bidirectional else 1), batch_first


MODULE_BACKENDS = [b for b in ("cpp", "torch") if b in CPU]


@pytest.mark.timeout(900)
@pytest.mark.parametrize("backend", MODULE_BACKENDS)
@pytest.mark.parametrize("kind", ["irnn", "lstm"])
def test_modules_with_packed_sequences_match_torch_nn(kind, backend):
    """100 random stacks per cell and backend (layers 1-3, one or two directions, bias,
    batch_first, given or absent states) on a PackedSequence of random lengths (1 to T:
    packing takes no empty sequence) against torch.nn.RNN / LSTM with the same weights:
    the packed output, the final states and every parameter's gradient, float64."""
    rng = np.random.default_rng([FUZZ_SEED, zlib.crc32(f"module {kind} {backend}".encode())])
    atol, rtol = TOLERANCES[torch.float64]
    for k in range(max(1, int(100 * SCALE))):
        ours, theirs, inputs, hidden, stacked, batch_first = _module_pair(rng, kind, backend)
        steps, batch = int(rng.integers(1, 30)), int(rng.integers(1, 12))
        lengths = torch.tensor(rng.integers(1, steps + 1, batch))
        lengths[0] = steps
        x = torch.tensor(rng.normal(0, 0.5, (batch, steps, inputs) if batch_first else (steps, batch, inputs)))
        packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=False)
        state = None
        if rng.random() < 0.6:
            h0 = torch.tensor(rng.normal(0, 0.5, (stacked, batch, hidden)))
            state = h0 if kind == "irnn" else (h0, torch.tensor(rng.normal(0, 0.5, (stacked, batch, hidden))))
        results = []
        for module in (ours, theirs):
            module.zero_grad()
            y, final = module(packed, state)
            finals = (final,) if kind == "irnn" else final
            (y.data.square().sum() + sum(f.sum() for f in finals)).backward()
            results.append([y.data.detach(), *[f.detach() for f in finals]] +
                           [p.grad.clone() for p in module.parameters()])
        description = (f"fuzz seed {FUZZ_SEED}, module case {k}: {kind} {backend} layers/directions {stacked}, "
                       f"I {inputs}, H {hidden}, T {steps}, B {batch}, batch_first {batch_first}, "
                       f"lengths {lengths.tolist()}, state {state is not None}")
        for a, b in zip(*results):
            scale = max(1.0, float(b.abs().max()) if b.numel() else 1.0)
            assert ((a - b).abs() <= atol * scale + rtol * b.abs()).all(), description
