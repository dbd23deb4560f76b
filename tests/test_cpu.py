"""The CPU backends (the cpp kernels and the torch loop) against the NumPy float64
reference (python/rnn_reference.py):
outputs, final states and ALL gradients, for single layers (functional API) and for
stacked, bidirectional, batch_first modules."""

import os

import numpy as np
import pytest
import torch

import fused_rnn
import rnn_reference as ref
from helpers import (
    SHAPES,
    assert_matches,
    check_cells_against_reference,
    check_layer_against_reference,
    make_layer,
    to_torch,
)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}B{}I{}H{}".format(*s))
@pytest.mark.parametrize("cell", ["irnn", "lstm"])
def test_layer_matches_reference(cell, shape, bias, dtype, cpu_backend):
    check_layer_against_reference(cell, shape, bias, dtype, cpu_backend)


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            return set(next(line for line in f if line.startswith("flags")).split())
    except (OSError, StopIteration):
        return None


# The float32 GEMM paths this CPU runs, widest first (csrc/cpu/blas.h): the default path
# runs in every other test; FUSED_RNN_CPU_ISA forces each lower one here.
_FLAGS = _cpu_flags() or set()
GEMM_PATHS = (["avx512"] if "avx512f" in _FLAGS else []) + (["avx2"] if {"avx2", "fma"} <= _FLAGS else []) + ["blas"]


@pytest.mark.parametrize("shape", [(63, 4, 7, 37), (4, 7, 5, 30), (9, 20, 7, 13), (3, 70, 5, 26), (3, 100, 33, 130)],
                         ids=lambda s: "T{}B{}I{}H{}".format(*s))
@pytest.mark.parametrize("cell", ["irnn", "lstm"])
@pytest.mark.parametrize("path", GEMM_PATHS)
def test_every_gemm_path_matches_reference(cell, shape, path, monkeypatch):
    """FUSED_RNN_CPU_ISA=<path> routes the float32 scans' GEMMs (per step, and the
    whole-sequence ones: input projection, weight gradients) through that path: the
    AVX-512 kernel, the AVX2 kernel, or BLAS (the path of CPUs without either). H = 37,
    30, 13, 26 and 130 leave partial 32- and 24-column panels and partial panels of the
    AVX2 LSTM's fused step (8 units; it runs where I <= H / 4: all but H = 13); B = 70 and
    100 give more rows than a block; the last shape's K (LSTM: H + I = 163 in the fused
    forward step, 4H = 520 in the backward step) spans several K blocks."""
    if "cpp" not in fused_rnn.available_backends():
        pytest.skip("the C++ extension is not built")
    monkeypatch.setenv("FUSED_RNN_CPU_ISA", path)
    assert fused_rnn.build_info()["cpu_gemm"] == path
    assert fused_rnn.build_info()["cpu_loops"] == ROW_LOOPS[path]
    test_layer_matches_reference(cell, shape, True, torch.float32, "cpp")


# The pointwise loops each GEMM path runs (csrc/cpu/common.h's row_isa): the path's
# level, at most the CPU's (x86-64-v4 needs AVX-512 F, BW, CD, DQ and VL; x86-64-v3 AVX2,
# FMA, BMI1/2, LZCNT ("abm"), MOVBE, F16C); only gcc >= 12 on x86-64 builds the v3 and
# v4 loops, other compilers the baseline ones.
_V3 = {"avx", "avx2", "fma", "bmi1", "bmi2", "abm", "movbe", "f16c", "xsave"}
_V4 = _V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
_LEVELS = ("baseline", "x86-64-v3", "x86-64-v4")
_COMPILER = fused_rnn.build_info().get("compiler", "").split()
if (len(_COMPILER) > 1 and _COMPILER[0] == "gcc" and int(_COMPILER[1].split(".")[0]) >= 12
        and os.uname().machine == "x86_64"):
    _CPU_LEVEL = 2 if _V4 <= _FLAGS else 1 if _V3 <= _FLAGS else 0
else:
    _CPU_LEVEL = 0
ROW_LOOPS = {path: _LEVELS[min(level, _CPU_LEVEL)] for path, level in (("avx512", 2), ("avx2", 1), ("blas", 0))}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("path", GEMM_PATHS)
def test_every_path_runs_every_row_loop(path, dtype, monkeypatch):
    """Each path's pointwise loops (compiled for x86-64-v4, x86-64-v3 or the baseline)
    against the reference in every place a scan calls them: the ReLU with and without
    the clip, the LSTM cell forward and backward over batch slices, over hidden-unit
    slices (B < 16 and H >= 128: the units split across two threads) and with the
    output projection, and the rows frozen past their lengths."""
    if "cpp" not in fused_rnn.available_backends():
        pytest.skip("the C++ extension is not built")
    from helpers import check_options
    from test_projection import check_projection

    monkeypatch.setenv("FUSED_RNN_CPU_ISA", path)
    assert fused_rnn.build_info()["cpu_loops"] == ROW_LOOPS[path]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for cell in ("irnn", "lstm"):
            check_options(cell, (7, 20, 5, 19), dtype, "cpp", ("recurrent_mask", "lengths", "hidden_clip"))
            test_layer_matches_reference(cell, (5, 3, 6, 130), True, dtype, "cpp")
        check_projection((6, 20, 5, 24, 9), dtype, "cpp", ("lengths",))
    finally:
        torch.set_num_threads(threads)


def test_widest_gemm_is_the_default_and_a_wider_one_cannot_be_forced(monkeypatch):
    """The float32 scans use the widest kernel the CPU has (build_info says which); the
    environment can lower it, not raise it, and an unknown value is an error naming the
    variable and the values it takes."""
    if "cpp" not in fused_rnn.available_backends():
        pytest.skip("the C++ extension is not built")
    if _cpu_flags() is None:
        pytest.skip("no /proc/cpuinfo")
    monkeypatch.delenv("FUSED_RNN_CPU_ISA", raising=False)
    assert fused_rnn.build_info()["cpu_gemm"] == GEMM_PATHS[0]
    monkeypatch.setenv("FUSED_RNN_CPU_ISA", "sse")
    with pytest.raises(RuntimeError, match="FUSED_RNN_CPU_ISA must be avx512, avx2 or blas, got 'sse'"):
        fused_rnn.build_info()
    if GEMM_PATHS[0] != "avx512":
        monkeypatch.setenv("FUSED_RNN_CPU_ISA", "avx512")
        with pytest.raises(RuntimeError, match="cannot run"):
            fused_rnn.irnn(torch.randn(2, 3, 4), None, torch.randn(5, 4), torch.randn(5, 5), backend="cpp")


# ---- stacked, bidirectional, batch_first: a NumPy composition of the reference layers ----

def reference_stack(cell, x, layers, num_directions, up_y, up_h, up_c):
    """Forward and backward of a stacked (bi)directional network built from the reference
    layers. `layers[k][d]` = (w_ih, w_hh, b_ih, b_hh, h0[, c0]); x [T, B, I] (sequence first).
    Returns (y, h_n, c_n, grads) with grads[(k, d)] the per-layer gradient dicts and grads["x"]."""
    forward = ref.irnn_forward if cell == "irnn" else ref.lstm_forward
    backward = ref.irnn_backward if cell == "irnn" else ref.lstm_backward
    caches, layer_inputs, h_n, c_n = {}, [], [], []
    inp = x
    for k, directions in enumerate(layers):
        layer_inputs.append(inp)
        outs = []
        for d, (w_ih, w_hh, b_ih, b_hh, *init) in enumerate(directions):
            seq = inp if d == 0 else inp[::-1]
            result = forward(seq, *init, w_ih, w_hh, b_ih, b_hh)
            y_d, caches[(k, d)] = result[0], result[-1]
            outs.append(y_d if d == 0 else y_d[::-1])
            h_n.append(result[1])
            if cell == "lstm":
                c_n.append(result[2])
        inp = np.concatenate(outs, axis=2)
    hidden = layers[0][0][1].shape[1]
    grads, dy = {}, up_y
    for k in reversed(range(len(layers))):
        dinp = np.zeros_like(layer_inputs[k])
        for d in range(num_directions):
            index = k * num_directions + d
            dy_d = dy[:, :, d * hidden:(d + 1) * hidden]
            dy_d = dy_d if d == 0 else dy_d[::-1]
            args = (dy_d, up_h[index]) + ((up_c[index],) if cell == "lstm" else ())
            g = backward(*args, caches[(k, d)])
            grads[(k, d)] = g
            dinp += g["dx"] if d == 0 else g["dx"][::-1]
        dy = dinp
    grads["x"] = dy
    return inp, np.stack(h_n), (np.stack(c_n) if cell == "lstm" else None), grads


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["seqfirst", "batchfirst"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("cell", ["irnn", "lstm"])
def test_stacked_module_matches_reference(cell, bidirectional, batch_first, dtype, cpu_backend):
    steps, batch, inputs, hidden, num_layers = 9, 3, 5, 7, 2
    num_directions = 2 if bidirectional else 1
    module_class = fused_rnn.IRNN if cell == "irnn" else fused_rnn.LSTM
    torch.manual_seed(0)
    module = module_class(inputs, hidden, num_layers=num_layers, bidirectional=bidirectional,
                          batch_first=batch_first, backend=cpu_backend, dtype=dtype)
    if cell == "irnn":
        with torch.no_grad():  # nonzero input weights and biases, so every gradient is exercised
            for name, p in module.named_parameters():
                if "weight_ih" in name or "bias" in name:
                    p.normal_(0.0, 0.3)
    rng = np.random.default_rng(1)
    x = rng.normal(0.0, 0.5, (steps, batch, inputs))
    h0 = rng.normal(0.0, 0.5, (num_layers * num_directions, batch, hidden))
    c0 = rng.normal(0.0, 0.5, (num_layers * num_directions, batch, hidden))
    up_y = rng.normal(size=(steps, batch, num_directions * hidden))
    up_h = rng.normal(size=h0.shape)
    up_c = rng.normal(size=c0.shape)

    layers = []
    for k in range(num_layers):
        directions = []
        for d in range(num_directions):
            suffix = f"_l{k}" + ("_reverse" if d else "")
            params = [getattr(module, f"{kind}{suffix}").detach().double().numpy()
                      for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
            init = [h0[k * num_directions + d]] + ([c0[k * num_directions + d]] if cell == "lstm" else [])
            directions.append((*params, *init))
        layers.append(directions)
    want_y, want_h, want_c, want = reference_stack(cell, x, layers, num_directions, up_y, up_h, up_c)

    def as_input(a):  # sequence-first NumPy -> the module's layout
        t = torch.tensor(a, dtype=dtype)
        return t.transpose(0, 1) if batch_first else t

    tx = as_input(x).requires_grad_()
    th0 = torch.tensor(h0, dtype=dtype, requires_grad=True)
    tc0 = torch.tensor(c0, dtype=dtype, requires_grad=True)
    if cell == "irnn":
        y, h_n = module(tx, th0)
        outputs, upstream = (y, h_n), (as_input(up_y), torch.tensor(up_h, dtype=dtype))
    else:
        y, (h_n, c_n) = module(tx, (th0, tc0))
        outputs = (y, h_n, c_n)
        upstream = (as_input(up_y), torch.tensor(up_h, dtype=dtype), torch.tensor(up_c, dtype=dtype))
        assert_matches("c_n", c_n, want_c, dtype)
    y_seq_first = y.transpose(0, 1) if batch_first else y
    assert_matches("y", y_seq_first, want_y, dtype)
    assert_matches("h_n", h_n, want_h, dtype)
    torch.autograd.backward(outputs, upstream)
    dx = tx.grad.transpose(0, 1) if batch_first else tx.grad
    assert_matches("dx", dx, want["x"], dtype)
    for k in range(num_layers):
        for d in range(num_directions):
            suffix = f"_l{k}" + ("_reverse" if d else "")
            g = want[(k, d)]
            index = k * num_directions + d
            assert_matches(f"dh0[{index}]", th0.grad[index], g["dh0"], dtype)
            if cell == "lstm":
                assert_matches(f"dc0[{index}]", tc0.grad[index], g["dc0"], dtype)
            for kind, key in (("weight_ih", "dw_ih"), ("weight_hh", "dw_hh"), ("bias_ih", "db_ih"),
                              ("bias_hh", "db_hh")):
                assert_matches(f"{kind}{suffix}.grad", getattr(module, f"{kind}{suffix}").grad, g[key], dtype)


@pytest.mark.parametrize("cell", ["irnn", "lstm"])
def test_cells_match_reference(cell, cpu_backend):
    """The single-step ops (IRNNCell/LSTMCell path) are the T = 1 reference."""
    check_cells_against_reference(cell, cpu_backend, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("cell", ["irnn", "lstm"])
def test_long_sequence_does_not_drift(cell, dtype, cpu_backend):
    """T = 2000: the float32 scan stays within the per-dtype tolerance of the float64
    reference, so errors do not accumulate step over step."""
    steps, batch, inputs, hidden = 2000, 2, 8, 16
    x, states, w_ih, w_hh, b_ih, b_hh, up = make_layer(cell, steps, batch, inputs, hidden, bias=True, seed=7)
    if cell == "irnn":  # the IRNN regime: W_hh = I, small inputs, h grows slowly and stays bounded
        w_hh = np.eye(hidden)
        w_ih *= 0.01
        b_ih[:] = 0.0
        b_hh[:] = -0.001
    tensors = [to_torch(a, dtype) for a in (x, *states, w_ih, w_hh, b_ih, b_hh)]
    if cell == "irnn":
        y, h_n = fused_rnn.irnn(*tensors, backend=cpu_backend)
        want_y, want_h, _ = ref.irnn_forward(x, *states, w_ih, w_hh, b_ih, b_hh)
    else:
        y, (h_n, _) = fused_rnn.lstm(tensors[0], tuple(tensors[1:3]), *tensors[3:], backend=cpu_backend)
        want_y, want_h, _, _ = ref.lstm_forward(x, *states, w_ih, w_hh, b_ih, b_hh)
    assert_matches("y", y, want_y, dtype)
    assert_matches("h_T", h_n, want_h, dtype)


@pytest.mark.parametrize("cell", ["irnn", "lstm"])
@pytest.mark.parametrize("shape", [(4, 96, 8, 64), (5, 3, 6, 160), (5, 1, 6, 150)],
                         ids=["batch-split", "hidden-split", "uneven-hidden-split"])
def test_threaded_kernels_match_reference(cell, shape):
    """The threaded scans: with two threads a batch of >= 32 rows is split across them;
    a small batch of the LSTM splits its hidden units instead (150 = 80 + 70 units)."""
    if "cpp" not in fused_rnn.available_backends("cpu"):
        pytest.skip("the cpp backend is not built")
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for dtype in (torch.float32, torch.float64):
            test_layer_matches_reference(cell, shape, True, dtype, "cpp")
    finally:
        torch.set_num_threads(previous)


# bfloat16 / float16 on the CPU kernels: float32 state and accumulation on inputs
# converted at the call, against the float64 reference on the same rounded inputs.
# Every product and sum is float32; only the outputs and the saved y (h_{t-1} of the
# weight gradients, relu's sign) are rounded, once per step: errors stay within a few
# units of the dtype's rounding (bf16 2^-8 = 3.9e-3, fp16 2^-11 = 4.9e-4): measured worst
# 3.1e-3 (bf16, dw_hh of the LSTM) at T = 9. The bounds give 3-4x of margin and stay
# far below the O(1) error of a wrong gate or index.
REDUCED_TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 2e-3}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("cell", ["irnn", "lstm"])
def test_reduced_precision_on_cpu_matches_reference(cell, dtype):
    if "cpp" not in fused_rnn.available_backends("cpu"):
        pytest.skip("the cpp backend is not built")
    x, states, w_ih, w_hh, b_ih, b_hh, up = make_layer(cell, 9, 5, 4, 13, bias=True, seed=6)
    leaves = [torch.tensor(a, dtype=dtype, requires_grad=True) for a in (x, *states, w_ih, w_hh, b_ih, b_hh)]
    rounded = [t.detach().double().numpy() for t in leaves]
    up = {k: torch.tensor(v, dtype=dtype).double().numpy() for k, v in up.items()}
    if cell == "irnn":
        outputs = fused_rnn.irnn(*leaves, backend="cpp")
        upstream = (up["y"], up["h"])
        *want_out, cache = ref.irnn_forward(*rounded)
        want = ref.irnn_backward(up["y"], up["h"], cache)
        names = ["dx", "dh0", "dw_ih", "dw_hh", "db_ih", "db_hh"]
    else:
        y, (h_n, c_n) = fused_rnn.lstm(leaves[0], (leaves[1], leaves[2]), *leaves[3:], backend="cpp")
        outputs, upstream = (y, h_n, c_n), (up["y"], up["h"], up["c"])
        *want_out, cache = ref.lstm_forward(*rounded)
        want = ref.lstm_backward(up["y"], up["h"], up["c"], cache)
        names = ["dx", "dh0", "dc0", "dw_ih", "dw_hh", "db_ih", "db_hh"]
    torch.autograd.backward(outputs, [torch.tensor(u, dtype=dtype) for u in upstream])
    for name, got, expected in [*zip(["y", "h_T", "c_T"], outputs, want_out),
                                *((n, t.grad, want[n]) for n, t in zip(names, leaves))]:
        assert got.dtype == dtype, name
        scale = max(1.0, float(np.abs(expected).max()))
        error = float(np.abs(got.detach().double().numpy() - expected).max()) / scale
        assert error <= REDUCED_TOLERANCE[dtype], f"{name}: error {error:.2e}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("cell", ["irnn", "lstm"])
def test_reduced_precision_cells_on_cpu_match_reference(cell, dtype):
    """The cells (one step; the LSTM's backward reads c_t in float32, recomputed from the
    float32 gates since the step returned c_t rounded), forward and every gradient, on
    the rounded inputs' float64 reference, REDUCED_TOLERANCE relative to the largest."""
    if "cpp" not in fused_rnn.available_backends("cpu"):
        pytest.skip("the cpp backend is not built")
    x, states, w_ih, w_hh, b_ih, b_hh, up = make_layer(cell, 1, 5, 4, 13, bias=True, seed=8)
    leaves = [torch.tensor(a, dtype=dtype, requires_grad=True) for a in (x[0], *states, w_ih, w_hh, b_ih, b_hh)]
    rounded = [t.detach().double().numpy() for t in leaves]
    up = {k: torch.tensor(v, dtype=dtype).double().numpy() for k, v in up.items()}
    if cell == "irnn":
        outputs = (fused_rnn.irnn_cell(*leaves, backend="cpp"),)
        upstream = (up["h"],)
        _, *want_out, cache = ref.irnn_forward(rounded[0][None], *rounded[1:])
        want = ref.irnn_backward(None, up["h"], cache)
        names = ["dx", "dh0", "dw_ih", "dw_hh", "db_ih", "db_hh"]
    else:
        outputs = fused_rnn.lstm_cell(leaves[0], (leaves[1], leaves[2]), *leaves[3:], backend="cpp")
        upstream = (up["h"], up["c"])
        _, *want_out, cache = ref.lstm_forward(rounded[0][None], *rounded[1:])
        want = ref.lstm_backward(None, up["h"], up["c"], cache)
        names = ["dx", "dh0", "dc0", "dw_ih", "dw_hh", "db_ih", "db_hh"]
    torch.autograd.backward(outputs, [torch.tensor(u, dtype=dtype) for u in upstream])
    for name, got, expected in [*zip(["h", "c"], outputs, want_out),
                                *((n, t.grad, want[n][0] if n == "dx" else want[n]) for n, t in zip(names, leaves))]:
        assert got.dtype == dtype, name
        scale = max(1.0, float(np.abs(expected).max()))
        error = float(np.abs(got.detach().double().numpy() - expected).max()) / scale
        assert error <= REDUCED_TOLERANCE[dtype], f"{name}: error {error:.2e}"
