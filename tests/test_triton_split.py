"""The hidden-split Triton scans (fused_rnn/triton/split.py; issue 14, in progress). Under
the interpreter: the per-step driver against the NumPy reference, with several programs
and partial unit and batch tiles, through the Triton backend's ops with every option;
the persistent driver with one program. Ahead of time: the persistent kernels' PTX for
sm_80 and sm_90, with and without the options: the grid barrier's release/acquire
atomics at GPU scope, the exchanged state read with ld.global.cg, nothing read through
the non-coherent path or an L1-caching cp.async, no spills."""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch

import rnn_reference as ref
from fused_rnn.triton import split
from helpers import assert_matches, make_layer

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (T, B, I, H, programs): one program with a partial unit tile; three programs with the
# last one partial and a batch of 17 (a full and a partial 16-row tile); 80 units over
# 5 programs of 16; B = 1
CASES = [(1, 1, 2, 5, None), (5, 17, 4, 37, 3), (3, 4, 3, 80, 5), (9, 1, 5, 33, 2)]


def _tensor(array, dtype=torch.float32):
    return torch.tensor(array, dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "T{}B{}I{}H{}-P{}".format(*c))
def test_irnn_forward_per_step_matches_reference(case):
    """float32: test_cpu's float32 tolerances (float32 accumulation throughout)."""
    steps, batch, inputs, hidden, programs = case
    x, (h0,), w_ih, w_hh, b_ih, b_hh, _ = make_layer("irnn", steps, batch, inputs, hidden, bias=True, seed=hidden)
    want_y, want_h, _ = ref.irnn_forward(x, h0, w_ih, w_hh, b_ih, b_hh)
    y, h_n = split.irnn_split_forward(_tensor(x), _tensor(h0), _tensor(w_ih), _tensor(w_hh), _tensor(b_ih + b_hh),
                                      programs=programs)
    assert_matches("y", y.cpu(), want_y, torch.float32)
    assert_matches("h_T", h_n.cpu(), want_h, torch.float32)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "T{}B{}I{}H{}-P{}".format(*c))
def test_irnn_backward_per_step_matches_reference(case):
    """Every gradient, float32, test_cpu's float32 tolerances."""
    steps, batch, inputs, hidden, programs = case
    x, (h0,), w_ih, w_hh, b_ih, b_hh, up = make_layer("irnn", steps, batch, inputs, hidden, bias=True, seed=hidden)
    *_, cache = ref.irnn_forward(x, h0, w_ih, w_hh, b_ih, b_hh)
    want = ref.irnn_backward(up["y"], up["h"], cache)
    tx, th0, tw_ih, tw_hh = _tensor(x), _tensor(h0), _tensor(w_ih), _tensor(w_hh)
    y, _ = split.irnn_split_forward(tx, th0, tw_ih, tw_hh, _tensor(b_ih + b_hh), programs=programs)
    dx, dh0, dw_ih, dw_hh, dbias = split.irnn_split_backward(_tensor(up["y"]), _tensor(up["h"]), tx, th0, tw_ih,
                                                             tw_hh, y, programs=programs)
    for name, got in (("dx", dx), ("dh0", dh0), ("dw_ih", dw_ih), ("dw_hh", dw_hh), ("db_ih", dbias)):
        assert_matches(name, got.cpu(), want[name], torch.float32)


@pytest.mark.parametrize("with_state", [True, False], ids=["state", "zero-state"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "T{}B{}I{}H{}-P{}".format(*c))
def test_lstm_per_step_matches_reference(case, with_state):
    """Outputs, final states and every gradient, float32, test_cpu's float32 tolerances."""
    steps, batch, inputs, hidden, programs = case
    x, (h0, c0), w_ih, w_hh, b_ih, b_hh, up = make_layer("lstm", steps, batch, inputs, hidden, bias=True,
                                                         seed=hidden + 1)
    if not with_state:
        h0, c0 = np.zeros_like(h0), np.zeros_like(c0)
    want_y, want_h, want_c, cache = ref.lstm_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh)
    want = ref.lstm_backward(up["y"], up["h"], up["c"], cache)
    tx, tw_ih, tw_hh = _tensor(x), _tensor(w_ih), _tensor(w_hh)
    th0, tc0 = (_tensor(h0), _tensor(c0)) if with_state else (None, None)
    y, h_n, c_n, cells, gates = split.lstm_split_forward(tx, th0, tc0, tw_ih, tw_hh, _tensor(b_ih + b_hh),
                                                         programs=programs)
    for name, got, expected in (("y", y, want_y), ("h_T", h_n, want_h), ("c_T", c_n, want_c)):
        assert_matches(name, got.cpu(), expected, torch.float32)
    dx, dh0, dc0, dw_ih, dw_hh, dbias = split.lstm_split_backward(
        _tensor(up["y"]), _tensor(up["h"]), _tensor(up["c"]), tx, th0, tc0, tw_ih, tw_hh, y, cells, gates,
        programs=programs)
    for name, got in (("dx", dx), ("dh0", dh0), ("dc0", dc0), ("dw_ih", dw_ih), ("dw_hh", dw_hh),
                      ("db_ih", dbias)):
        assert_matches(name, got.cpu(), want[name], torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_irnn_forward_low_precision_matches_reference(dtype):
    """bf16/fp16 inputs and weights, float32 state: against the float64 reference of
    the same rounded inputs, within test_triton.py's LOW_PRECISION_TOLERANCE (the
    recurrent product's operands rounded to the dtype at every step, <= 9 steps)."""
    from test_triton import LOW_PRECISION_TOLERANCE

    x, (h0,), w_ih, w_hh, b_ih, b_hh, _ = make_layer("irnn", 7, 5, 4, 37, bias=True, seed=3)
    leaves = [_tensor(a, dtype) for a in (x, h0, w_ih, w_hh, b_ih, b_hh)]
    rounded = [t.double().cpu().numpy() for t in leaves]
    want_y, want_h, _ = ref.irnn_forward(*rounded)
    y, h_n = split.irnn_split_forward(leaves[0], leaves[1], leaves[2], leaves[3],
                                      (leaves[4].float() + leaves[5].float()), programs=3)
    assert y.dtype == dtype and h_n.dtype == dtype
    for name, got, want in (("y", y, want_y), ("h_T", h_n, want_h)):
        scale = max(1.0, float(np.abs(want).max()))
        error = float(np.abs(got.double().cpu().numpy() - want).max()) / scale
        assert error <= LOW_PRECISION_TOLERANCE[dtype], f"{name}: {error:.2e}"


PERSISTENT = ("irnn_split_persistent_kernel", "irnn_split_persistent_backward_kernel",
              "lstm_split_persistent_kernel", "lstm_split_persistent_backward_kernel")
# Compiles the persistent kernels for sm_80/sm_90 x fp32/bf16 and prints the PTX as JSON;
# in a process of its own, since the tests run the kernels under the interpreter.
COMPILE = f"KERNELS = {PERSISTENT!r}\n" + """
import itertools, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fused_rnn.triton import split

out = {}
for name, capability, dtype, options in itertools.product(KERNELS, (80, 90), ("fp32", "bf16"), (False, True)):
    fn = getattr(split, name)
    constexprs = dict(TF32=False, UPCAST=False, BLOCK_U=16, BLOCK_B=16, BLOCK_K=16, SPIN=split.SPIN_LIMIT)
    constexprs.update({flag: options for flag in ("HAS_MASK", "HAS_LENGTHS", "HAS_CLIP") if flag in fn.arg_names})
    if "HAS_STATE" in fn.arg_names:
        constexprs["HAS_STATE"] = True
    io = "*" + dtype
    types = dict(pre="*fp32", h0="*fp32", c0="*fp32", state="*fp32", states="*fp32", cells="*fp32",
                 gates="*fp32", dgates="*fp32", dc="*fp32", w_hh=io, y=io, dy=io, dh_n=io, dz="*fp32",
                 dh0="*fp32", counter="*i32", error="*i32", T="i32", B="i32", H="i32", keep="*fp32",
                 lengths="*i64", clip="fp32")
    signature = {p.name: "constexpr" if p.name in constexprs else types[p.name] for p in fn.params}
    kernel = triton.compile(ASTSource(fn, signature, constexprs=constexprs), target=GPUTarget("cuda", capability, 32),
                            options={"num_warps": split.NUM_WARPS, "num_stages": split.NUM_STAGES,
                                     "maxnreg": split.MAX_REGISTERS})
    out[f"{name} {capability}-{dtype}{'+options' if options else ''}"] = kernel.asm["ptx"]
json.dump(out, sys.stdout)
"""


@pytest.fixture(scope="module")
def persistent_ptx():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", COMPILE], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp32+options", "bf16+options"])
@pytest.mark.parametrize("capability", [80, 90], ids=["sm_80", "sm_90"])
@pytest.mark.parametrize("kernel", PERSISTENT, ids=["irnn-forward", "irnn-backward", "lstm-forward",
                                                     "lstm-backward"])
def test_persistent_barrier_and_exchange_in_the_ptx(persistent_ptx, kernel, capability, dtype):
    ptx = persistent_ptx[f"{kernel} {capability}-{dtype}"]
    assert re.search(r"atom\.global\.gpu\.release\.add", ptx), "the barrier's arrival must release at GPU scope"
    assert re.search(r"ld\.global\.gpu\.acquire", ptx), "the barrier's poll must acquire at GPU scope"
    assert re.search(r"ld\.global\.cg\.", ptx), "the exchanged state must be read L2-only"
    assert not re.search(r"ld\.global\.nc", ptx), "nothing may be read through the non-coherent path"
    assert not re.search(r"cp\.async\.ca", ptx), "no L1-caching asynchronous copy (Triton's pipeliner makes one)"
    if dtype.startswith("bf16"):
        assert re.search(r"\bmma\.", ptx), "bf16 products on the tensor cores"
    ptxas = shutil.which("ptxas") or "/usr/local/cuda/bin/ptxas"
    if not os.path.exists(ptxas):
        pytest.skip("ptxas is not installed: registers and spills unchecked")
    with tempfile.TemporaryDirectory() as folder:
        source = os.path.join(folder, "kernel.ptx")
        with open(source, "w") as handle:
            handle.write(ptx)
        arch = re.search(r"\.target\s+(sm_\w+)", ptx).group(1)  # sm_90a on Hopper
        report = subprocess.run([ptxas, "-v", f"-arch={arch}", source, "-o", os.devnull],
                                capture_output=True, text=True, check=True).stderr
    assert not re.search(r"[1-9]\d* bytes spill", report), report


@pytest.mark.parametrize("cell", ["irnn", "lstm"])
def test_persistent_driver_with_one_program_matches_reference(cell):
    """The persistent kernels' loop (step order, buffer offsets, the peeled first and
    last steps, the barrier's count) under the interpreter: with one program a barrier
    completes on its own arrival, so the interpreter can run it (with more it would wait
    forever: it runs programs one after another)."""
    steps, batch, inputs, hidden = 6, 19, 3, 40  # BLOCK_U = 64 >= H: one program; a partial 16-row tile
    x, states, w_ih, w_hh, b_ih, b_hh, up = make_layer(cell, steps, batch, inputs, hidden, bias=True, seed=8)
    tensors = [_tensor(a) for a in (x, *states, w_ih, w_hh)]
    bias = _tensor(b_ih + b_hh)
    if cell == "irnn":
        *want_out, cache = ref.irnn_forward(x, *states, w_ih, w_hh, b_ih, b_hh)
        want = ref.irnn_backward(up["y"], up["h"], cache)
        y, h_n = split.irnn_split_forward(*tensors, bias, persistent=True, programs=1)
        grads = split.irnn_split_backward(_tensor(up["y"]), _tensor(up["h"]), *tensors, y, persistent=True,
                                          programs=1)
        outputs, names = (y, h_n), ("dx", "dh0", "dw_ih", "dw_hh", "db_ih")
    else:
        *want_out, cache = ref.lstm_forward(x, *states, w_ih, w_hh, b_ih, b_hh)
        want = ref.lstm_backward(up["y"], up["h"], up["c"], cache)
        y, h_n, c_n, cells, gates = split.lstm_split_forward(*tensors, bias, persistent=True, programs=1)
        grads = split.lstm_split_backward(_tensor(up["y"]), _tensor(up["h"]), _tensor(up["c"]), *tensors, y, cells,
                                          gates, persistent=True, programs=1)
        outputs, names = (y, h_n, c_n), ("dx", "dh0", "dc0", "dw_ih", "dw_hh", "db_ih")
    for name, got, expected in zip(("y", "h_T", "c_T"), outputs, want_out):
        assert_matches(name, got.cpu(), expected, torch.float32)
    for name, got in zip(names, grads):
        assert_matches(name, got.cpu(), want[name], torch.float32)


@pytest.mark.parametrize("shape", [(1, 1, 3, 5), (6, 17, 4, 37), (3, 2, 2, 70)],
                         ids=lambda s: "T{}B{}I{}H{}".format(*s))
@pytest.mark.parametrize("cell", ["irnn", "lstm"])
def test_triton_backend_on_the_split_design(cell, shape, monkeypatch):
    """backend="triton" with the split design forced (on a GPU the model picks it per
    call): the ops, their autograd and fakes around the split scans, against the
    reference (outputs, final states, every gradient), plain and with each option and
    all of them (lengths of 0, 1, partial and full; the IRNN's clip reached)."""
    from fused_rnn import _speedups
    from helpers import check_layer_against_reference, check_options

    monkeypatch.setenv(_speedups.DESIGN_VARIABLE, "split")
    assert _speedups.triton_design(torch.device(DEVICE), torch.float32, cell, shape[3], shape[1], None) == "split"
    calls = []
    real = split.run
    monkeypatch.setattr(split, "run", lambda *a, **k: calls.append(a[0].__name__) or real(*a, **k))
    check_layer_against_reference(cell, shape, True, torch.float32, "triton", device=DEVICE)
    option_sets = [("recurrent_mask",), ("lengths",), ("recurrent_mask", "lengths")]
    if cell == "irnn":
        option_sets += [("hidden_clip",), ("recurrent_mask", "lengths", "hidden_clip")]
    for used in option_sets:
        check_options(cell, shape, torch.float32, "triton", used, device=DEVICE)
    assert calls.count(f"{cell}_split_forward") == 1 + len(option_sets)
    assert calls.count(f"{cell}_split_backward") == 1 + len(option_sets)


@pytest.mark.parametrize("cell", ["irnn", "lstm"])
def test_persistent_driver_with_options_and_one_program(cell):
    """The persistent kernels with every option (one program, under the interpreter),
    against the per-step driver, whose options the test above checks against the
    reference: the two drivers run the same step body, so they must agree bitwise."""
    from helpers import sequence_options

    steps, batch, inputs, hidden = 7, 18, 3, 30
    x, states, w_ih, w_hh, b_ih, b_hh, up = make_layer(cell, steps, batch, inputs, hidden, bias=True, seed=5)
    mask, lengths = sequence_options(steps, batch, hidden, seed=2)
    lengths[1], lengths[2] = 0, 1
    tensors = [_tensor(a) for a in (x, *states, w_ih, w_hh)]
    options = dict(recurrent_mask=_tensor(mask), lengths=torch.tensor(lengths, device=DEVICE))
    if cell == "irnn":
        options["hidden_clip"] = 0.8
    bias = _tensor(b_ih + b_hh)
    results = []
    for persistent in (False, True):
        if cell == "irnn":
            y, h_n = split.irnn_split_forward(*tensors, bias, **options, persistent=persistent, programs=1)
            grads = split.irnn_split_backward(_tensor(up["y"]), _tensor(up["h"]), *tensors, y, **options,
                                              persistent=persistent, programs=1)
            results.append((y, h_n, *grads))
        else:
            y, h_n, c_n, cells, gates = split.lstm_split_forward(*tensors, bias, **options, persistent=persistent,
                                                                 programs=1)
            grads = split.lstm_split_backward(_tensor(up["y"]), _tensor(up["h"]), _tensor(up["c"]), *tensors, y,
                                              cells, gates, **options, persistent=persistent, programs=1)
            results.append((y, h_n, c_n, *grads))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_the_model_picks_the_triton_design():
    """Without a GPU the model has no prediction: the batch-tiled scans. With one (the
    tables of bench/gpu_model.py, a model), the split scans where predicted faster."""
    from fused_rnn import _speedups

    assert _speedups.triton_design(torch.device("cpu"), torch.float32, "lstm", 1024, 8, None) == "tiled"
    ratios = {k: v for k, v in _speedups.tables.GPU.items() if k[0] == "H100"}
    split_wins = [k for k, v in ratios.items() if v.get("triton-split", 0) > v.get("triton", 0)]
    assert ("H100", "lstm", "training", "bfloat16", 8, 1024) in split_wins


def test_traced_calls_take_the_tiled_design(monkeypatch):
    """Under torch.compile's tracing (fake tensors) the Triton ops run the batch-tiled
    scans, which launch through wrap_triton; the split scans launch directly and read
    their barrier's flag back, which a trace cannot."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fused_rnn import _speedups
    from fused_rnn.triton import ops

    monkeypatch.setenv(_speedups.DESIGN_VARIABLE, "split")
    x, w_hh = torch.randn(3, 2, 4), torch.randn(5, 5)
    assert ops._design("irnn", x, w_hh, None, None, None) == "split"
    with FakeTensorMode() as mode:
        fake_x, fake_w = mode.from_tensor(x), mode.from_tensor(w_hh)
        assert ops._design("irnn", fake_x, fake_w, None, None, None) == "tiled"


def test_a_persistent_launch_of_more_programs_than_sms_is_refused(monkeypatch):
    """Programs that cannot all be resident would leave the barrier waiting: refused
    with the numbers (the GPU's SM count stubbed to 4)."""
    class Properties:
        multi_processor_count = 4

    monkeypatch.setattr(split, "interpreting", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Properties())
    with pytest.raises(ValueError, match="needs 8 programs, more than the 4 SMs"):
        split._block_sizes(128, None, persistent=True, device=torch.device("cuda"))
    assert split._block_sizes(128, 4, persistent=True, device=torch.device("cuda")) == (32, 4)
