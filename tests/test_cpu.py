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
    LOW_PRECISION_TOLERANCE,
    SHAPES,
    assert_matches,
    check_cells_against_reference,
    check_layer_against_reference,
    irnn_inputs_off_the_kink,
    make_layer,
    sequence_options,
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


@pytest.mark.parametrize("shape", [(1, 1, 42, 64), (1, 15, 7, 37), (1, 16, 7, 37)],
                         ids=lambda s: "T{}B{}I{}H{}".format(*s))
@pytest.mark.parametrize("path", GEMM_PATHS)
def test_single_steps_match_reference(path, shape, monkeypatch):
    """One step on fewer than 16 rows (the sampling loops: a character at a time) packs
    no weight and splits no hidden units: avx2::few_rows (BLAS on the blas path and in
    float64) multiplies the weights as stored (csrc/cpu/common.h's packs_weights); 16
    rows pack them, as every longer scan does. Both cells on every path, float32 and
    float64, forward and backward, plain, with every option, and with the output
    projection: few_rows' dot products (W as [N, K]: the recurrent product accumulating,
    the input projection with its bias, K = 7 below a vector, N = 9 not a multiple of 4)
    and its scaled rows (W as [K, N]: the backward's dh and dx, N = 37 and 42 past whole
    vectors)."""
    if "cpp" not in fused_rnn.available_backends():
        pytest.skip("the C++ extension is not built")
    from helpers import check_options
    from test_projection import check_projection

    monkeypatch.setenv("FUSED_RNN_CPU_ISA", path)
    assert fused_rnn.build_info()["cpu_gemm"] == path
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for dtype in (torch.float32, torch.float64):
            for cell in ("irnn", "lstm"):
                test_layer_matches_reference(cell, shape, True, dtype, "cpp")
                check_options(cell, shape, dtype, "cpp", ("recurrent_mask", "lengths", "hidden_clip"))
            check_projection((*shape, 9), dtype, "cpp", ("recurrent_mask", "lengths"))
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


# bfloat16 / float16 on the CPU kernels with float32 products (float16 always; bfloat16
# where the CPU has no AVX-512 BF16, or with FUSED_RNN_CPU_BF16=off): float32 state and
# accumulation on inputs converted at the call, against the float64 reference on the
# same rounded inputs. Every product and sum is float32; only the outputs and the saved y (h_{t-1} of the
# weight gradients, relu's sign) are rounded, once per step: errors stay within a few
# units of the dtype's rounding (bf16 2^-8 = 3.9e-3, fp16 2^-11 = 4.9e-4): measured worst
# 3.1e-3 (bf16, dw_hh of the LSTM) at T = 9. The bounds give 3-4x of margin and stay
# far below the O(1) error of a wrong gate or index.
REDUCED_TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 2e-3}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("cell", ["irnn", "lstm"])
def test_reduced_precision_on_cpu_matches_reference(cell, dtype, monkeypatch):
    if "cpp" not in fused_rnn.available_backends("cpu"):
        pytest.skip("the cpp backend is not built")
    monkeypatch.setenv("FUSED_RNN_CPU_BF16", "off")  # float32 products (bf16 products: below)
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


def _reduced_precision_cell_matches_reference(cell, dtype, tolerance):
    """One cell step of `dtype` through the cpp backend against the float64 reference on
    the rounded inputs, forward and every gradient, within `tolerance` relative to the
    largest element. Returns {name: output or gradient}."""
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
    results = {}
    for name, got, expected in [*zip(["h", "c"], outputs, want_out),
                                *((n, t.grad, want[n][0] if n == "dx" else want[n]) for n, t in zip(names, leaves))]:
        assert got.dtype == dtype, name
        scale = max(1.0, float(np.abs(expected).max()))
        error = float(np.abs(got.detach().double().numpy() - expected).max()) / scale
        assert error <= tolerance, f"{cell} {name}: error {error:.2e} > {tolerance:g}"
        results[name] = got.detach()
    return results


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("cell", ["irnn", "lstm"])
def test_reduced_precision_cells_on_cpu_match_reference(cell, dtype, monkeypatch):
    """The cells (one step; the LSTM's backward reads c_t in float32, recomputed from the
    float32 gates since the step returned c_t rounded), forward and every gradient, on
    the rounded inputs' float64 reference, REDUCED_TOLERANCE relative to the largest."""
    if "cpp" not in fused_rnn.available_backends("cpu"):
        pytest.skip("the cpp backend is not built")
    monkeypatch.setenv("FUSED_RNN_CPU_BF16", "off")  # float32 products (bf16 products: below)
    _reduced_precision_cell_matches_reference(cell, dtype, REDUCED_TOLERANCE[dtype])


# ---- bfloat16 products (csrc/cpu/gemm_bf16.h) ----

# The modes this CPU runs: "native" (vdpbf16ps; a bf16 layer's default where the CPU has
# AVX-512 BF16 on the avx512 path) and "emulate" (the same kernel with its dot product
# in AVX2 FMAs), so that every machine with AVX2 tests the kernel and the scans around it.
BF16_MODES = ((["native"] if {"avx512f", "avx512_bf16"} <= _FLAGS and GEMM_PATHS[0] == "avx512" else [])
              + (["emulate"] if {"avx2", "fma"} <= _FLAGS else []))
BF16_NAMES = {"native": "avx512_bf16", "emulate": "emulated"}


def _bf16(array):
    """array rounded to bfloat16 (to nearest even), as float64"""
    return torch.tensor(array).to(torch.bfloat16).double().numpy()


@pytest.mark.parametrize("mode", BF16_MODES)
def test_bf16_kernel_rounds_its_operands_and_sums_in_float32(mode, monkeypatch):
    """The kernel's product alone (fused_rnn._C.cpu_bf16_matmul): c (+)= a @ W' (+ bias)
    against float64 on a and W' rounded to bf16, at M below and above a row tile (8) and a
    row block (64), N with partial 32-column panels, odd K, K across pair blocks (512),
    W' given as W^T and as W, with and without the bias and the accumulated c.

    Bound: each product of two bf16 values is exact in float32, and the K products, the
    bias and c are summed in float32, each addition rounding by at most u = 2^-24
    relative, so |error| <= (K + 2) u (|a| |W'| + |bias| + |c|) per element (Higham,
    Accuracy and Stability of Numerical Algorithms, 2nd ed., section 3.1). The same
    product of the unrounded a (float32 products) is off by about 2^-9 |a| |W'|, far outside
    it: the test also requires that difference, so the products cannot be float32."""
    if "cpp" not in fused_rnn.available_backends():
        pytest.skip("the C++ extension is not built")
    from fused_rnn import _C

    monkeypatch.setenv("FUSED_RNN_CPU_BF16", mode)
    assert fused_rnn.build_info()["cpu_bf16"] == BF16_NAMES[mode]
    rng = np.random.default_rng(0)
    cases = [(1, 1, 1, True, False, False), (7, 33, 5, True, True, False), (8, 32, 512, False, False, True),
             (70, 70, 1031, True, True, True), (9, 100, 600, False, True, False), (65, 31, 2, True, False, True),
             (3, 5, 0, True, True, True), (130, 64, 37, False, False, False)]
    for m, n, k, trans_w, with_bias, accumulate in cases:
        a = rng.normal(size=(m, k)).astype(np.float32)
        w = rng.normal(size=(n, k) if trans_w else (k, n)).astype(np.float32)
        bias = rng.normal(size=n).astype(np.float32) if with_bias else None
        c = rng.normal(size=(m, n)).astype(np.float32) if accumulate else None
        optional = [None if v is None else torch.tensor(v) for v in (bias, c)]
        got = _C.cpu_bf16_matmul(torch.tensor(a), torch.tensor(w), trans_w, *optional).double().numpy()
        w_prime = w.T if trans_w else w
        rest = (0 if bias is None else bias.astype(np.float64)) + (0 if c is None else c.astype(np.float64))
        want = _bf16(a) @ _bf16(w_prime) + rest
        bound = (k + 2) * 2.0 ** -24 * (np.abs(_bf16(a)) @ np.abs(_bf16(w_prime)) + np.abs(rest))
        case = f"M{m} N{n} K{k} trans_w={trans_w} bias={with_bias} c={accumulate}"
        assert got.shape == (m, n), case
        assert np.all(np.abs(got - want) <= bound), f"{case}: error {np.abs(got - want).max():.2e}"
        if k >= 2:
            unrounded = a.astype(np.float64) @ _bf16(w_prime) + rest
            assert np.any(np.abs(got - unrounded) > bound), f"{case}: the products are not bf16"
    # NaNs stay NaNs through the rounding, whatever their payload (one whose low bits
    # would carry into the exponent, or into the sign), in either operand; infinities stay
    # infinite
    nans = np.array([0x7F800001, 0x7FFFFFFF, 0xFFFFFFFF, 0x7FC00000], dtype=np.uint32).view(np.float32)
    a = rng.normal(size=(6, 40)).astype(np.float32)
    a[:4, 7] = nans
    a[4, 3] = np.inf
    w = rng.normal(size=(40, 20)).astype(np.float32)
    got = _C.cpu_bf16_matmul(torch.tensor(a), torch.tensor(w), False).numpy()
    assert np.isnan(got[:4]).all() and np.isinf(got[4]).sum() + np.isnan(got[4]).sum() == 20
    assert np.isfinite(got[5]).all()
    w[5, :4] = nans
    w[6, 4] = -np.inf
    got = _C.cpu_bf16_matmul(torch.tensor(np.abs(a[5:])), torch.tensor(w), False).numpy()
    assert np.isnan(got[:, :4]).all() and (got[:, 4] == -np.inf).all() and np.isfinite(got[:, 5:]).all()


def _bf16_scan_matches_reference(cell, shape, used=(), width=None, seed=3):
    """A bf16 layer (inputs, states, weights) through the cpp backend against the float64
    reference on the rounded values: outputs, final states and every gradient within
    helpers.LOW_PRECISION_TOLERANCE relative to the largest element. That is the Triton
    kernels' bound, whose numerics these are: the operands of every product are rounded
    to bf16 (here also h_{t-1} and the pre-activation gradients, which the float32
    products keep in float32); the IRNN's inputs are drawn off ReLU's jump (helpers).
    `width`: the LSTM's projection P. Returns {name: output or gradient}."""
    steps, batch, inputs, hidden = shape
    mask, lengths = sequence_options(steps, batch, hidden if width is None else width, seed=seed)
    mask = _bf16(mask) if "recurrent_mask" in used else None
    lengths = lengths if "lengths" in used else None
    if width is None:
        x, states, w_ih, w_hh, b_ih, b_hh, up = make_layer(cell, *shape, bias=True, seed=seed)
        w_hr = None
    else:
        from test_projection import make_projected_layer

        arrays, upstream, _, _ = make_projected_layer(*shape, width, seed=seed)
        x, states, w_ih, w_hh, b_ih, b_hh, w_hr = (arrays["x"], [arrays["h0"], arrays["c0"]], arrays["w_ih"],
                                                   arrays["w_hh"], arrays["b_ih"], arrays["b_hh"], arrays["w_hr"])
        up = dict(zip(("y", "h", "c"), upstream))
    if cell == "irnn":
        x = irnn_inputs_off_the_kink(x, (*states, w_ih, w_hh, b_ih, b_hh), torch.bfloat16, seed + 1, mask, lengths)
        assert x is not None, "no inputs off the ReLU kink"
    arrays = [x, *states, w_ih, w_hh, b_ih, b_hh] + ([] if w_hr is None else [w_hr])
    leaves = [torch.tensor(a, dtype=torch.bfloat16, requires_grad=True) for a in arrays]
    rounded = [t.detach().double().numpy() for t in leaves]
    up = {k: _bf16(v) for k, v in up.items()}
    options = dict(recurrent_mask=None if mask is None else torch.tensor(mask, dtype=torch.bfloat16),
                   lengths=None if lengths is None else torch.tensor(lengths))
    if cell == "irnn":
        outputs = fused_rnn.irnn(*leaves, backend="cpp", **options)
        upstream = (up["y"], up["h"])
        *want_out, cache = ref.irnn_forward(*rounded, recurrent_mask=mask, lengths=lengths)
        want = ref.irnn_backward(up["y"], up["h"], cache)
        names = ["dx", "dh0", "dw_ih", "dw_hh", "db_ih", "db_hh"]
    else:
        projection = {} if w_hr is None else {"w_hr": leaves[7]}
        y, (h_n, c_n) = fused_rnn.lstm(leaves[0], (leaves[1], leaves[2]), *leaves[3:7], backend="cpp", **options,
                                       **projection)
        outputs, upstream = (y, h_n, c_n), (up["y"], up["h"], up["c"])
        *want_out, cache = ref.lstm_forward(*rounded[:7], recurrent_mask=mask, lengths=lengths,
                                            w_hr=None if w_hr is None else rounded[7])
        want = ref.lstm_backward(up["y"], up["h"], up["c"], cache)
        names = ["dx", "dh0", "dc0", "dw_ih", "dw_hh", "db_ih", "db_hh", "dw_hr"][:len(leaves)]
    torch.autograd.backward(outputs, [torch.tensor(u, dtype=torch.bfloat16) for u in upstream])
    tolerance = LOW_PRECISION_TOLERANCE[torch.bfloat16]
    results = {}
    for name, got, expected in [*zip(["y", "h_T", "c_T"], outputs, want_out),
                                *((n, t.grad, want[n]) for n, t in zip(names, leaves))]:
        assert got.dtype == torch.bfloat16, name
        scale = max(1.0, float(np.abs(expected).max()))
        error = float(np.abs(got.detach().double().numpy() - expected).max()) / scale
        assert error <= tolerance, f"{cell} {shape} {used}: {name}: error {error:.2e} > {tolerance:g}"
        results[name] = got.detach()
    return results


# (cell, (T, B, I, H), options, projection P): H = 13, 37, 130 leave partial 32-column
# panels; B = 70 spans two row blocks; the LSTM backward's K = 4H = 520 two pair blocks;
# B = 3 with H = 130 splits the LSTM's hidden units across two threads
BF16_SCANS = [("irnn", (9, 5, 4, 13), (), None), ("irnn", (6, 20, 7, 37), ("recurrent_mask", "lengths"), None),
              ("lstm", (9, 5, 4, 13), (), None), ("lstm", (20, 70, 33, 130), (), None),
              ("lstm", (5, 3, 6, 130), (), None), ("lstm", (7, 20, 5, 19), ("recurrent_mask", "lengths"), None),
              ("lstm", (6, 20, 5, 24), ("lengths",), 9)]


@pytest.mark.parametrize("cell, shape, used, width", BF16_SCANS,
                         ids=["{}-T{}B{}I{}H{}".format(c, *s) + "".join("-" + u for u in used) + (f"-P{p}" if p else "")
                              for c, s, used, p in BF16_SCANS])
@pytest.mark.parametrize("mode", BF16_MODES)
def test_bf16_products_match_reference(mode, cell, shape, used, width, monkeypatch):
    """Both cells' scans with bf16 products, forward and backward (the input projection,
    every step's product, dx and the weight gradients), on batch slices and hidden-unit
    slices (two threads), with the mask, the lengths and the projection. The same call
    with FUSED_RNN_CPU_BF16=off (float32 products) gives another value for every output
    and gradient (but dW_hr, a float32 product in both), so no part of the forward or
    the backward keeps float32 products unnoticed: the tolerance alone, which float32
    products meet too, could not tell."""
    if "cpp" not in fused_rnn.available_backends():
        pytest.skip("the C++ extension is not built")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setenv("FUSED_RNN_CPU_BF16", mode)
        assert fused_rnn.build_info()["cpu_bf16"] == BF16_NAMES[mode]
        products = _bf16_scan_matches_reference(cell, shape, used, width)
        monkeypatch.setenv("FUSED_RNN_CPU_BF16", "off")
        float32 = _bf16_scan_matches_reference(cell, shape, used, width)
    finally:
        torch.set_num_threads(threads)
    for name, value in products.items():
        if name != "dw_hr":
            assert not torch.equal(value, float32[name]), f"{name} is the same with float32 products"


@pytest.mark.parametrize("cell", ["irnn", "lstm"])
@pytest.mark.parametrize("mode", BF16_MODES)
def test_bf16_products_in_the_cells_match_reference(mode, cell, monkeypatch):
    """The cells (one step) with bf16 products: LOW_PRECISION_TOLERANCE. h0 is a bf16
    input, so the forward's product rounds nothing that float32 products keep. In the
    LSTM's backward the pre-activation gradients (float32: the gates' derivatives) are
    rounded, which changes dh0 and dx; the IRNN's are the bf16 upstream gradient times
    relu's 0 or 1, exact in bf16, so every output and gradient equals float32 products'."""
    if "cpp" not in fused_rnn.available_backends("cpu"):
        pytest.skip("the cpp backend is not built")
    monkeypatch.setenv("FUSED_RNN_CPU_BF16", mode)
    products = _reduced_precision_cell_matches_reference(cell, torch.bfloat16, LOW_PRECISION_TOLERANCE[torch.bfloat16])
    monkeypatch.setenv("FUSED_RNN_CPU_BF16", "off")
    float32 = _reduced_precision_cell_matches_reference(cell, torch.bfloat16, REDUCED_TOLERANCE[torch.bfloat16])
    for name, value in products.items():
        if cell == "irnn":
            assert torch.equal(value, float32[name]), f"{name} differs from float32 products'"
        elif name in ("dh0", "dx"):
            assert not torch.equal(value, float32[name]), f"{name} is the same with float32 products"


def test_bf16_products_switch_names_its_values(monkeypatch):
    """FUSED_RNN_CPU_BF16 takes native, emulate or off; anything else, or native on a CPU
    without AVX-512 BF16, is an error that says so."""
    if "cpp" not in fused_rnn.available_backends():
        pytest.skip("the C++ extension is not built")
    monkeypatch.setenv("FUSED_RNN_CPU_BF16", "fast")
    with pytest.raises(RuntimeError, match="FUSED_RNN_CPU_BF16 must be native, emulate or off, got 'fast'"):
        fused_rnn.build_info()
    monkeypatch.setenv("FUSED_RNN_CPU_BF16", "off")
    assert fused_rnn.build_info()["cpu_bf16"] == "off"
    monkeypatch.delenv("FUSED_RNN_CPU_BF16")
    assert fused_rnn.build_info()["cpu_bf16"] == ("avx512_bf16" if "native" in BF16_MODES else "off")
    if "native" not in BF16_MODES:
        monkeypatch.setenv("FUSED_RNN_CPU_BF16", "native")
        with pytest.raises(RuntimeError, match="needs a CPU with AVX-512 BF16"):
            fused_rnn.lstm(torch.randn(2, 3, 4, dtype=torch.bfloat16), None, torch.randn(20, 4, dtype=torch.bfloat16),
                           torch.randn(20, 5, dtype=torch.bfloat16), backend="cpp")
