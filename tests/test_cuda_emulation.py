"""The float32 CUDA kernels of csrc/cuda/persistent_scan.cuh, compiled as C++ against the
CPU emulation of the CUDA execution model in tests/cuda_emulation/ (every CUDA thread a
fiber; block, warp and grid barriers) and run against the NumPy reference: the
persistent scans' indexing, their split of the hidden units across blocks, the staged
batch-row passes, the warp reductions and the grid barrier placement, without a GPU.
The plans use small SM counts so that several blocks, partial blocks and several
units per warp all occur at test sizes. On a GPU, test_cuda.py runs the real thing."""

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import rnn_reference as ref
from helpers import assert_matches, make_layer

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "tests" / "cuda_emulation" / "emulator.cpp"

# (T, B, I, H, SMs): one block with fewer units than warps; 3 blocks with a 5-row batch;
# a last block with fewer units than the others; 18 units a block, so warps own 2 or 3
# units each
CASES = [(1, 1, 3, 5, 4), (7, 5, 4, 37, 3), (4, 9, 3, 20, 8), (3, 2, 2, 70, 4)]
# The most rows per pass (persistent_plan.h): the plan's own rule (one pass of 8 rows for
# B = 5, of 16 for B = 9), and a cap of 2 (passes of 2, 2 and 1 rows for B = 5).
ROWS_CAPS = [16, 2]
# random layers per cell and rows cap in the emulated scans' fuzz (4 x 25 = 100 a run)
CASES_PER_RUN = 25


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("g++ is not installed")
    library = tmp_path_factory.mktemp("cuda_emulation") / "emulator.so"
    subprocess.run([compiler, "-std=c++20", "-O1", "-shared", "-fPIC", "-Wall", "-Wno-unknown-pragmas",
                    "-Werror", "-I", str(REPO / "csrc"), str(SOURCE), "-o", str(library)], check=True, timeout=600)
    return _Emulator(ctypes.CDLL(str(library)))


class _Emulator:
    """The emulator's entry points; each returns -1 where the kernel deadlocked (threads
    waiting at a barrier that the others never reach), which fails the test at once."""

    def __init__(self, lib):
        self._lib = lib

    def __getattr__(self, name):
        function = getattr(self._lib, name)
        if not name.startswith("emulate_"):
            return function
        function.restype = ctypes.c_int64

        def checked(*args):
            result = function(*args)
            if result < 0:
                raise AssertionError(f"{name}: the emulated kernel deadlocked at a barrier")
            return result
        return checked


@pytest.fixture(params=ROWS_CAPS, ids=lambda cap: f"rows<={cap}")
def rows_cap(emulator, request):
    emulator.set_rows_cap(ctypes.c_int64(request.param))
    yield request.param
    emulator.set_rows_cap(ctypes.c_int64(16))


def test_the_emulation_catches_a_missing_barrier_and_a_deadlock(emulator):
    """What the emulation is for: with a __syncthreads every thread reads its
    neighbour's store; without it, a read before the neighbour's store shows, for the
    neighbour above and the one below alike, within two launches (the scheduler's order
    alternates); and threads waiting at a barrier that another never reaches fail at
    once instead of hanging."""
    threads = np.arange(64)
    expected = {shift: np.where((threads + shift >= 0) & (threads + shift < 64), threads + shift, threads) + 1.0
                for shift in (1, -1)}
    for shift in (1, -1):
        for _ in range(2):
            out = np.zeros(64, np.float32)
            emulator.emulate_barrier_probe(1, shift, _ptr(out))
            assert np.array_equal(out, expected[shift])
        stale = []
        for _ in range(2):
            out = np.zeros(64, np.float32)
            emulator.emulate_barrier_probe(0, shift, _ptr(out))
            stale.append(not np.array_equal(out, expected[shift]))
        assert any(stale), f"a missing barrier went unseen for shift {shift}"
    with pytest.raises(AssertionError, match="deadlocked"):
        emulator.emulate_deadlock_probe()


def _expected_rows(batch, cap):
    """persistent_plan.h's rule with shared memory to spare: the smallest power of two
    covering the batch, at most the cap."""
    rows = 1
    while rows < min(batch, cap):
        rows *= 2
    return rows


def _f32(array):
    return np.ascontiguousarray(array, dtype=np.float32)


def _ptr(array):
    return None if array is None else array.ctypes.data_as(ctypes.c_void_p)


def _sizes(*values):
    return [ctypes.c_int64(v) for v in values]


NO_OPTIONS = (None, None, ctypes.c_float(0.0), ctypes.c_int(0))


def _options(mask, lengths, clip):
    """The emulator's option arguments (mask float32 [B, H], lengths int64 [B], clip)."""
    return (_ptr(mask), _ptr(lengths), ctypes.c_float(clip or 0.0), ctypes.c_int(clip is not None))


def _check(name, got, want):
    # float32 tolerances of test_cpu (float32 accumulation throughout)
    assert_matches(name, torch.from_numpy(np.asarray(got, dtype=np.float64)), want, torch.float32)


def _weight_grads(dpre, x, h0, y, w_ih):
    """What csrc/cuda/irnn.cu and lstm.cu compute from the scan's dpre with ATen GEMMs (layer_common.h)."""
    h_prev = np.concatenate([h0[None], y[:-1]]).astype(np.float64)
    dpre = dpre.astype(np.float64)
    return {"dx": dpre @ w_ih, "dw_ih": np.einsum("tbg,tbi->gi", dpre, x),
            "dw_hh": np.einsum("tbg,tbh->gh", dpre, h_prev), "db_ih": dpre.sum((0, 1))}


@pytest.mark.parametrize("case", CASES, ids=lambda c: "T{}B{}I{}H{}-{}sm".format(*c))
def test_irnn_scans_match_reference(emulator, case, rows_cap):
    steps, batch, inputs, hidden, sm_count = case
    x, (h0,), w_ih, w_hh, b_ih, b_hh, up = make_layer("irnn", steps, batch, inputs, hidden, bias=True, seed=hidden)
    want_y, want_h, cache = ref.irnn_forward(x, h0, w_ih, w_hh, b_ih, b_hh)
    pre = _f32(x @ w_ih.T + b_ih + b_hh)
    y, state = np.empty((steps, batch, hidden), np.float32), np.empty((2, batch, hidden), np.float32)
    h0_f, w_hh_f = _f32(h0), _f32(w_hh)
    launched = emulator.emulate_scan_forward(ctypes.c_int64(1), _ptr(pre), _ptr(h0_f), None, _ptr(w_hh_f), _ptr(y),
                                             _ptr(state), None, *_sizes(steps, batch, hidden, sm_count), *NO_OPTIONS)
    blocks, rows = divmod(launched, 100)
    assert blocks == -(-hidden // max(8, -(-hidden // sm_count))) or hidden < 8
    assert rows == _expected_rows(batch, rows_cap)
    _check("y", y, want_y)
    _check("h_T", state[(steps - 1) % 2], want_h)
    dpre, grad_h0 = np.empty((steps, batch, hidden), np.float32), np.empty((batch, hidden), np.float32)
    grad_y, grad_h_n = _f32(up["y"]), _f32(up["h"])
    emulator.emulate_scan_backward(ctypes.c_int64(1), _ptr(grad_y), _ptr(grad_h_n), _ptr(y), None, None, None,
                                   _ptr(w_hh_f), _ptr(dpre), None, _ptr(grad_h0),
                                   *_sizes(steps, batch, hidden, sm_count), *NO_OPTIONS)
    want = ref.irnn_backward(up["y"], up["h"], cache)
    _check("dh0", grad_h0, want["dh0"])
    for name, got in _weight_grads(dpre, x, h0, y, w_ih).items():
        _check(name, got, want[name])


@pytest.mark.parametrize("case", CASES, ids=lambda c: "T{}B{}I{}H{}-{}sm".format(*c))
def test_lstm_scans_match_reference(emulator, case, rows_cap):
    steps, batch, inputs, hidden, sm_count = case
    x, (h0, c0), w_ih, w_hh, b_ih, b_hh, up = make_layer("lstm", steps, batch, inputs, hidden, bias=True,
                                                         seed=hidden + 1)
    want_y, want_h, want_c, cache = ref.lstm_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh)
    gates = _f32(x @ w_ih.T + b_ih + b_hh)  # pre-activations in, activations out
    y, state = np.empty((steps, batch, hidden), np.float32), np.empty((2, batch, hidden), np.float32)
    cells = np.empty((steps, batch, hidden), np.float32)
    h0_f, c0_f, w_hh_f = _f32(h0), _f32(c0), _f32(w_hh)
    emulator.emulate_scan_forward(ctypes.c_int64(4), _ptr(gates), _ptr(h0_f), _ptr(c0_f), _ptr(w_hh_f), _ptr(y),
                                  _ptr(state), _ptr(cells), *_sizes(steps, batch, hidden, sm_count), *NO_OPTIONS)
    _check("y", y, want_y)
    _check("h_T", state[(steps - 1) % 2], want_h)
    _check("c_T", cells[-1], want_c)
    dpre, grad_h0 = np.empty((steps, batch, 4 * hidden), np.float32), np.empty((batch, hidden), np.float32)
    grad_y, grad_h_n, grad_c = _f32(up["y"]), _f32(up["h"]), _f32(up["c"]).copy()  # grad_c: dc_T in, dc_0 out
    emulator.emulate_scan_backward(ctypes.c_int64(4), _ptr(grad_y), _ptr(grad_h_n), _ptr(y), _ptr(c0_f),
                                   _ptr(cells), _ptr(gates), _ptr(w_hh_f), _ptr(dpre), _ptr(grad_c), _ptr(grad_h0),
                                   *_sizes(steps, batch, hidden, sm_count), *NO_OPTIONS)
    want = ref.lstm_backward(up["y"], up["h"], up["c"], cache)
    _check("dh0", grad_h0, want["dh0"])
    _check("dc0", grad_c, want["dc0"])
    for name, got in _weight_grads(dpre, x, h0, y, w_ih).items():
        _check(name, got, want[name])


def _run_scans(emulator, cell, steps, batch, inputs, hidden, sm_count, seed, mask=None, lengths=None,
               clip_fraction=None):
    """Both persistent scans of `cell` on a make_layer(seed) layer, with the given options
    (clip: that fraction of the largest activation), against the reference: outputs,
    final states and every gradient (the weight gradients formed from the scan's dpre as
    the CUDA ops form them)."""
    gates = 1 if cell == "irnn" else 4
    x, states, w_ih, w_hh, b_ih, b_hh, up = make_layer(cell, steps, batch, inputs, hidden, bias=True, seed=seed)
    clip = None
    if cell == "irnn":
        if clip_fraction is not None:
            largest = float(ref.irnn_forward(x, states[0], w_ih, w_hh, b_ih, b_hh, mask, lengths)[0].max(initial=1.0))
            clip = clip_fraction * largest
        want_y, want_h, cache = ref.irnn_forward(x, states[0], w_ih, w_hh, b_ih, b_hh, mask, lengths, clip)
        want_out = (want_y, want_h)
    else:
        want_y, want_h, want_c, cache = ref.lstm_forward(x, *states, w_ih, w_hh, b_ih, b_hh, mask, lengths)
        want_out = (want_y, want_h, want_c)
    pre = _f32(x @ w_ih.T + b_ih + b_hh)
    y, state = np.empty((steps, batch, hidden), np.float32), np.empty((2, batch, hidden), np.float32)
    cells = np.empty((steps, batch, hidden), np.float32) if cell == "lstm" else None
    h0_f, w_hh_f = _f32(states[0]), _f32(w_hh)
    c0_f = _f32(states[1]) if cell == "lstm" else None
    options = _options(None if mask is None else _f32(mask), lengths, clip)
    emulator.emulate_scan_forward(ctypes.c_int64(gates), _ptr(pre), _ptr(h0_f), _ptr(c0_f), _ptr(w_hh_f), _ptr(y),
                                  _ptr(state), _ptr(cells), *_sizes(steps, batch, hidden, sm_count), *options)
    got_out = (y, state[(steps - 1) % 2]) + ((cells[-1],) if cell == "lstm" else ())
    for name, got, want in zip(("y", "h_T", "c_T"), got_out, want_out):
        _check(name, got, want)
    dpre, grad_h0 = np.empty((steps, batch, gates * hidden), np.float32), np.empty((batch, hidden), np.float32)
    grad_c = _f32(up["c"]).copy() if cell == "lstm" else None
    emulator.emulate_scan_backward(ctypes.c_int64(gates), _ptr(_f32(up["y"])), _ptr(_f32(up["h"])), _ptr(y),
                                   _ptr(c0_f), _ptr(cells), _ptr(pre if cell == "lstm" else None), _ptr(w_hh_f),
                                   _ptr(dpre), _ptr(grad_c), _ptr(grad_h0), *_sizes(steps, batch, hidden, sm_count),
                                   *options)
    if cell == "irnn":
        want = ref.irnn_backward(up["y"], up["h"], cache)
    else:
        want = ref.lstm_backward(up["y"], up["h"], up["c"], cache)
        _check("dc0", grad_c, want["dc0"])
    _check("dh0", grad_h0, want["dh0"])
    keep = 1.0 if mask is None else mask
    for name, got in _weight_grads(dpre, x, states[0] * keep, y * keep, w_ih).items():
        _check(name, got, want[name])
    return cache, clip


@pytest.mark.parametrize("cell", ["irnn", "lstm"])
def test_scans_with_options_match_reference(emulator, cell, rows_cap):
    """The recurrent mask, per-sequence lengths (0, 1, partial and full) and the IRNN's
    clip in the persistent scans, 3 blocks, a partial batch pass."""
    rng = np.random.default_rng(5)
    mask = (rng.random((5, 21)) > 0.3) / 0.7
    _, clip = _run_scans(emulator, cell, 6, 5, 3, 21, 3, seed=4, mask=_f32(mask).astype(np.float64),
                         lengths=np.array([6, 0, 1, 4, 6], dtype=np.int64), clip_fraction=0.5)
    assert cell == "lstm" or clip is not None


@pytest.mark.parametrize("cell", ["irnn", "lstm"])
def test_random_scans_match_reference(emulator, cell, rows_cap):
    """Differential fuzz of the emulated CUDA scans (with tests/test_fuzz.py's seed):
    CASES_PER_RUN random layers per cell and rows cap (T 1-6, B 1-10, I 1-8, H 1-40, 1-4
    SMs, each option or not; the emulation runs every CUDA thread as a fiber, so the
    sizes stay small). A float32 IRNN case with a pre-activation within 1e-4 of relu's kink
    or of the clip hangs on the last bits and is not counted (as in test_fuzz.py)."""
    from conftest import FUZZ_SEED

    rng = np.random.default_rng([FUZZ_SEED, 11, rows_cap, len(cell)])
    ran = 0
    for _ in range(CASES_PER_RUN):
        steps, batch = int(rng.integers(1, 7)), int(rng.integers(1, 11))
        inputs, hidden, sm_count = int(rng.integers(1, 9)), int(rng.integers(1, 41)), int(rng.integers(1, 5))
        mask = _f32((rng.random((batch, hidden)) > 0.3) / 0.7).astype(np.float64) if rng.random() < 0.4 else None
        lengths = np.array(rng.integers(0, steps + 1, batch), dtype=np.int64) if rng.random() < 0.4 else None
        clip = 0.7 if cell == "irnn" and rng.random() < 0.3 else None
        seed = int(rng.integers(2 ** 31))
        if cell == "irnn":  # a near tie (read from the reference alone) is drawn again
            x, states, w_ih, w_hh, b_ih, b_hh, _ = make_layer(cell, steps, batch, inputs, hidden, True, seed)
            y, _, cache = ref.irnn_forward(x, states[0], w_ih, w_hh, b_ih, b_hh, mask, lengths)
            z, limit = cache.preactivations, None if clip is None else clip * float(y.max(initial=1.0))
            if (np.abs(z) < 1e-4).any() or (limit is not None and (np.abs(z - limit) < 1e-4).any()):
                continue
        description = (f"fuzz seed {FUZZ_SEED}: _run_scans(emulator, {cell!r}, {steps}, {batch}, {inputs}, {hidden}, "
                       f"{sm_count}, seed={seed}, mask={'<drawn>' if mask is not None else None}, "
                       f"lengths={None if lengths is None else lengths.tolist()}, clip_fraction={clip}), rows cap "
                       f"{rows_cap}")
        try:
            _run_scans(emulator, cell, steps, batch, inputs, hidden, sm_count, seed, mask, lengths, clip)
        except AssertionError as failure:
            raise AssertionError(f"{description}: {failure}") from None
        ran += 1
    assert ran >= 0.8 * CASES_PER_RUN


@pytest.mark.parametrize("cell", ["irnn", "lstm"])
def test_step_kernels_match_reference(emulator, cell):
    """The pointwise step kernels after the step's GEMMs, B * H = 70 elements over a
    grid of 2 x 32 threads (the grid-stride loop wraps)."""
    batch, inputs, hidden = 5, 3, 14
    x, states, w_ih, w_hh, b_ih, b_hh, up = make_layer(cell, 1, batch, inputs, hidden, bias=True, seed=2)
    pre = _f32(x[0] @ w_ih.T + b_ih + b_hh + states[0] @ w_hh.T)
    if cell == "irnn":
        _, want_h, cache = ref.irnn_forward(x, states[0], w_ih, w_hh, b_ih, b_hh)
        h_new = np.empty((batch, hidden), np.float32)
        emulator.emulate_irnn_step(_ptr(pre), _ptr(h_new), ctypes.c_int64(h_new.size))
        _check("h", h_new, want_h)
        grad_h_new, dz = _f32(up["h"]), np.empty((batch, hidden), np.float32)
        emulator.emulate_irnn_step_backward(_ptr(grad_h_new), _ptr(h_new), _ptr(dz), ctypes.c_int64(dz.size))
        want = ref.irnn_backward(None, up["h"], cache)
        _check("dh", dz @ w_hh, want["dh0"])
        _check("dw_hh", dz.T @ states[0], want["dw_hh"])
        return
    _, want_h, want_c, cache = ref.lstm_forward(x, *states, w_ih, w_hh, b_ih, b_hh)
    c, h_new, c_new = _f32(states[1]), np.empty((batch, hidden), np.float32), np.empty((batch, hidden), np.float32)
    emulator.emulate_lstm_step(_ptr(pre), _ptr(c), _ptr(c_new), _ptr(h_new), *_sizes(batch, hidden))
    _check("h", h_new, want_h)
    _check("c", c_new, want_c)
    grad_h_new, grad_c_new = _f32(up["h"]), _f32(up["c"])
    dgates, grad_c = np.empty((batch, 4 * hidden), np.float32), np.empty((batch, hidden), np.float32)
    emulator.emulate_lstm_step_backward(_ptr(grad_h_new), _ptr(grad_c_new), _ptr(c), _ptr(c_new), _ptr(pre),
                                        _ptr(dgates), _ptr(grad_c), *_sizes(batch, hidden))
    want = ref.lstm_backward(None, up["h"], up["c"], cache)
    _check("dh", dgates @ w_hh, want["dh0"])
    _check("dc", grad_c, want["dc0"])
    _check("dw_hh", dgates.T @ states[0], want["dw_hh"])
