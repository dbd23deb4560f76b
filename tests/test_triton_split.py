"""The hidden-split Triton scans (fused_rnn/triton/split.py). Under the interpreter: the
per-step driver against the NumPy reference, with several unit blocks and batch groups
and partial tiles of both, through the Triton backend's ops with every option, with
every dispatchable config; the persistent driver with one program; the config tuner's
trials. Ahead of time: the kernels' PTX for sm_80 and sm_90, with and without the
options: the grid barrier's release/acquire atomics at GPU scope, the exchanged state
read with ld.global.cg, nothing read through the non-coherent path or an L1-caching
cp.async, no spills. And plan.py's shares of a step."""

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
from helpers import assert_matches, make_layer, run_in_group

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (T, B, I, H, programs): one program with a partial unit tile; three unit blocks with the
# last one partial and a batch of 17 (a full and a partial 16-row tile); 80 units over
# 5 blocks of 16; B = 1; three batch groups of 14 rows over three unit blocks (9
# programs); two unit blocks x three groups of 12 rows
CASES = [(1, 1, 2, 5, None), (5, 17, 4, 37, 3), (3, 4, 3, 80, 5), (9, 1, 5, 33, 2), (4, 40, 3, 37, 9),
         (3, 35, 2, 20, 8)]


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


KERNELS = ("irnn_split_forward", "irnn_split_backward", "lstm_split_forward", "lstm_split_backward")
# Compiles each split kernel (its first dispatchable config at BLOCK_U = 16, and on FMAs
# at BLOCK_U = 8 with the 1-row tile) for sm_80/sm_90 x fp32/bf16, with and without the
# options, with bench/triton_resources.py's signatures, and prints the PTX as JSON; in a
# process of its own, since the tests run the kernels under the interpreter.
COMPILE = f"KERNELS = {KERNELS!r}\n" + """
import itertools, json, sys
sys.path.insert(0, "bench")
import triton_resources
from fused_rnn.triton import _configs

out = {}
for name, capability, dtype, options in itertools.product(KERNELS, (80, 90), ("fp32", "bf16", "fp32-fma"),
                                                          (False, True)):
    variant = dtype.split("-")[0] + ("+options" if options else "")
    if dtype.endswith("fma"):  # the product on FMAs: BLOCK_U = 8, the 1-row batch tile
        block_u, config = 8, next(c for c in _configs.SPLIT[(name, variant, 8)] if c[0] == 1)
    else:
        block_u, config = 16, _configs.SPLIT[(name, variant, 16)][0]
    kernel, _ = triton_resources.compile_kernel((name, dtype.split("-")[0], config, block_u), capability, options)
    out[f"{name} {capability}-{dtype}{'+options' if options else ''}"] = kernel.asm["ptx"]
json.dump(out, sys.stdout)
"""


@pytest.fixture(scope="module")
def split_ptx():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = run_in_group([sys.executable, "-c", COMPILE], timeout=300, env=env,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp32-fma", "fp32+options", "bf16+options", "fp32-fma+options"])
@pytest.mark.parametrize("capability", [80, 90], ids=["sm_80", "sm_90"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_barrier_and_exchange_in_the_ptx(split_ptx, kernel, capability, dtype):
    ptx = split_ptx[f"{kernel} {capability}-{dtype}"]
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
                                capture_output=True, text=True, check=True, timeout=120).stderr
    assert not re.search(r"[1-9]\d* bytes spill", report), report


@pytest.mark.parametrize("cell", ["irnn", "lstm"])
def test_persistent_driver_with_one_program_matches_reference(cell):
    """The persistent kernels' loop (step order, buffer offsets, the peeled first and
    last steps, the barrier's count) under the interpreter: with one program a barrier
    completes on its own arrival, so the interpreter can run it (with more it would wait
    forever: it runs programs one after another)."""
    steps, batch, inputs, hidden = 6, 19, 3, 30  # BLOCK_U = 32 >= H: one program; a partial 16-row tile
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
    with the numbers (the GPU's SM count stubbed to 4); within the SMs, accepted."""
    class Properties:
        multi_processor_count = 4

    monkeypatch.setattr(split, "interpreting", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Properties())
    cuda = torch.device("cuda")
    with pytest.raises(split.TooManyPrograms, match="needs 8 programs, more than the 4 SMs"):
        split.split_plan("irnn_split_forward", 512, 1, torch.float32, False, False, 4, True, cuda)
    assert split.split_plan("irnn_split_forward", 128, 1, torch.float32, False, False, 4, True, cuda).programs <= 4


@pytest.mark.parametrize("gates,weight_bytes,fma", [(1, 4, False), (4, 4, False), (4, 2, False), (1, 4, True),
                                                     (4, 4, True)],
                         ids=["irnn-fp32", "lstm-fp32", "lstm-bf16", "irnn-fp32-fma", "lstm-fp32-fma"])
def test_plans_cover_every_unit_and_row_within_the_budget(gates, weight_bytes, fma):
    """plan.py: every unit and row is owned (and no program is empty), within the
    budget whenever the widest unit block allows; one batch group where the batch fits
    the smallest group (16 rows, on FMAs 8), where the weights are read once per step in
    total; the padded rows hold the group's rows; BLOCK_U below 16 only on FMAs."""
    from fused_rnn.triton.plan import BLOCK_UNITS, MIN_DOT, plan

    tiles = {u: (1, 8, 16, 32) for u in BLOCK_UNITS} if fma else None
    for hidden in (1, 5, 16, 37, 256, 1000, 1024, 2048, 9000):
        for batch in (1, 7, 16, 17, 64, 256, 1000):
            for budget in (1, 3, 16, 132):
                p = plan(hidden, batch, gates, weight_bytes, budget, fma_tiles=tiles)
                assert p.block_u in BLOCK_UNITS and (fma or p.block_u >= MIN_DOT)
                assert p.unit_blocks * p.block_u >= hidden > (p.unit_blocks - 1) * p.block_u
                assert p.groups * p.rows >= batch > (p.groups - 1) * p.rows
                assert p.padded >= p.rows
                if -(-hidden // BLOCK_UNITS[-1]) <= budget:
                    assert p.programs <= budget, (hidden, batch, budget, p)
                if batch <= (8 if fma else 16):
                    assert p.groups == 1


def test_the_plan_spreads_a_large_batch_over_the_gpu():
    """At B = 256 the LSTM's step on 132 SMs uses batch groups, so that more than the
    64 unit blocks of H = 1024 work; at B = 1 the 64 blocks of 16 units, one group."""
    from fused_rnn.triton.plan import plan

    small, large = plan(1024, 1, 4, 2, 132), plan(1024, 256, 4, 2, 132)
    assert (small.block_u, small.unit_blocks, small.groups) == (16, 64, 1)
    assert large.groups > 1 and 64 < large.programs <= 132, large


def test_float32_on_fmas_takes_units_of_8_to_fill_the_gpu():
    """IEEE float32 runs the product on FMAs, where 8 units a program are no slower per
    unit: at H = 1024 and B = 8 the plan takes 128 programs of 8 units instead of 64 of
    16 (which left half of 132 SMs idle), and pads the 8 rows to its 8-row tile, not to
    16; tensor cores (bf16, TF32: no FMA tiles) keep 16, tl.dot's smallest M; a BLOCK_U
    without an FMA tile pads to 16."""
    from fused_rnn.triton.plan import padded_rows, plan

    tiles = {u: (16, 32, 1, 8) for u in (8, 16, 32, 64)}
    fma, dot = plan(1024, 8, 4, 4, 132, fma_tiles=tiles), plan(1024, 8, 4, 4, 132)
    assert (fma.block_u, fma.programs, fma.padded) == (8, 128, 8), fma
    assert (dot.block_u, dot.programs, dot.padded) == (16, 64, 16), dot
    assert plan(1024, 8, 4, 2, 132).block_u == 16
    assert plan(1024, 1, 4, 4, 132, fma_tiles=tiles).padded == 1
    assert plan(1024, 1, 4, 4, 132, fma_tiles={u: (16, 32) for u in tiles}).padded == 16
    assert [padded_rows(r, (1, 8, 16)) for r in (1, 2, 8, 9, 40)] == [1, 8, 8, 16, 40]
    assert [padded_rows(r, (8, 16)) for r in (1, 2, 8, 9, 40)] == [8, 8, 8, 16, 40]
    assert [padded_rows(r) for r in (1, 2, 8, 9, 40)] == [16, 16, 16, 16, 40]


def test_small_groups_take_their_fma_tile_first():
    """The tuner's candidates for a group of rows, the first the one the interpreter
    runs: 1 row the 1-row tile, 2-8 rows the 8-row tile, each followed by the tiles of
    16 rows and more for the tuner to time against it; more rows only the latter; bf16
    (no FMA tiles) all of its own."""
    fp32 = split.configs("lstm_split_forward", torch.float32, False, False, 16)
    bf16 = split.configs("lstm_split_forward", torch.bfloat16, False, False, 16)
    for rows, tile in ((1, 1), (5, 8)):
        chosen = split.for_rows(fp32, rows)
        assert chosen[0].block_b == tile and {c.block_b for c in chosen[1:]} == {c.block_b for c in fp32} - {1, 8}
    assert min(c.block_b for c in split.for_rows(fp32, 9)) >= 16
    assert split.for_rows(bf16, 1) == bf16 and min(c.block_b for c in bf16) >= 16


@pytest.mark.parametrize("cell", ["irnn", "lstm"])
def test_every_dispatchable_config_matches_reference(cell, monkeypatch):
    """Each float32 config the tuner may choose, of the forward and of the backward, at
    each BLOCK_U it is dispatchable at (the others switched off so that the plan takes
    it; the FMA tiles included), against the reference: outputs and every gradient,
    float32 tolerances, at H = 37 (partial unit blocks) and B = 18 over two or three
    groups (partial batch tiles)."""
    from fused_rnn.triton import _configs, plan

    x, states, w_ih, w_hh, b_ih, b_hh, up = make_layer(cell, 3, 18, 5, 37, bias=True, seed=5)
    tensors = [_tensor(a) for a in (x, *states, w_ih, w_hh)]
    bias = _tensor(b_ih + b_hh)
    forward = getattr(ref, f"{cell}_forward")
    *want_out, cache = forward(x, *states, w_ih, w_hh, b_ih, b_hh)
    want = (ref.irnn_backward(up["y"], up["h"], cache) if cell == "irnn"
            else ref.lstm_backward(up["y"], up["h"], up["c"], cache))
    real = split.configs
    tried = 0
    for block_u in plan.BLOCK_UNITS:
        forwards = real(f"{cell}_split_forward", torch.float32, False, False, block_u)
        backwards = real(f"{cell}_split_backward", torch.float32, False, False, block_u)
        # every config of both kernels at this BLOCK_U, the shorter list cycled (a kernel
        # with none here runs its first config at BLOCK_U = 16 instead)
        pairs = [(forwards[k % len(forwards)] if forwards else None,
                  backwards[k % len(backwards)] if backwards else None)
                 for k in range(max(len(forwards), len(backwards)))]
        for config, back in pairs:
            picks = {"forward": (config, block_u) if config else (real(f"{cell}_split_forward", torch.float32,
                                                                        False, False, 16)[0], 16),
                     "backward": (back, block_u) if back else (real(f"{cell}_split_backward", torch.float32,
                                                                    False, False, 16)[0], 16)}
            monkeypatch.setattr(split, "configs", lambda n, d, t, o, u, p=picks:
                                (p[n.rsplit("_", 1)[1]][0],) if u == p[n.rsplit("_", 1)[1]][1] else ())
            programs = 2 * -(-37 // min(picks["forward"][1], picks["backward"][1]))
            if cell == "irnn":
                y, h_n = split.irnn_split_forward(*tensors, bias, programs=programs)
                grads = split.irnn_split_backward(_tensor(up["y"]), _tensor(up["h"]), *tensors, y,
                                                  programs=programs)
                outputs, names = (y, h_n), ("dx", "dh0", "dw_ih", "dw_hh", "db_ih")
            else:
                y, h_n, c_n, cells, gates = split.lstm_split_forward(*tensors, bias, programs=programs)
                grads = split.lstm_split_backward(_tensor(up["y"]), _tensor(up["h"]), _tensor(up["c"]), *tensors, y,
                                                  cells, gates, programs=programs)
                outputs, names = (y, h_n, c_n), ("dx", "dh0", "dc0", "dw_ih", "dw_hh", "db_ih")
            for out_name, got, expected in zip(("y", "h_T", "c_T"), outputs, want_out):
                assert_matches(f"{out_name} {config} U{block_u}", got.cpu(), expected, torch.float32)
            for grad_name, got in zip(names, grads):
                assert_matches(f"{grad_name} {config} U{block_u}", got.cpu(), want[grad_name], torch.float32)
            tried += 1
    assert tried == sum(max(len(_configs.SPLIT.get((f"{cell}_split_{d}", "fp32", u), ()))
                            for d in ("forward", "backward")) for u in plan.BLOCK_UNITS)


def test_the_tuner_restores_what_its_trials_overwrite(monkeypatch):
    """The tuner's trials (timed by a stand-in clock under the interpreter) run each
    config on the real buffers; the LSTM forward activates `gates` in place and the
    backward carries dc in place, so both are restored before each trial and before
    the real run: the results equal the reference. The config kept is the one the
    clock timed fastest."""
    calls = []

    def clock(trial):
        calls.append(trial)
        trial()
        return float(len(calls) % 3)  # some order, not the candidates' own

    monkeypatch.setattr(split, "TUNER", split._Tuner())
    split.TUNER.timer = clock
    x, states, w_ih, w_hh, b_ih, b_hh, up = make_layer("lstm", 4, 17, 3, 20, bias=True, seed=9)
    tensors = [_tensor(a) for a in (x, *states, w_ih, w_hh)]
    *want_out, cache = ref.lstm_forward(x, *states, w_ih, w_hh, b_ih, b_hh)
    want = ref.lstm_backward(up["y"], up["h"], up["c"], cache)
    y, h_n, c_n, cells, gates = split.lstm_split_forward(*tensors, _tensor(b_ih + b_hh), programs=2)
    grads = split.lstm_split_backward(_tensor(up["y"]), _tensor(up["h"]), _tensor(up["c"]), *tensors, y, cells, gates,
                                      programs=2)
    for name, got, expected in zip(("y", "h_T", "c_T"), (y, h_n, c_n), want_out):
        assert_matches(name, got.cpu(), expected, torch.float32)
    for name, got in zip(("dx", "dh0", "dc0", "dw_ih", "dw_hh", "db_ih"), grads):
        assert_matches(name, got.cpu(), want[name], torch.float32)
    chosen_plan = split.split_plan("lstm_split_forward", 20, 17, torch.float32, False, False, 2)
    block_u, rows = chosen_plan.block_u, chosen_plan.rows
    forward = split.for_rows(split.configs("lstm_split_forward", torch.float32, False, False, block_u), rows)
    backward = split.for_rows(split.configs("lstm_split_backward", torch.float32, False, False, block_u), rows)
    assert len(forward) > 1 and len(calls) == len(forward) + len(backward)
    times = [float((i + 1) % 3) for i in range(len(forward))]
    chosen = {k[0]: v for k, v in split.TUNER.chosen.items()}
    assert chosen["lstm_split_forward"] == forward[times.index(min(times))]


@pytest.mark.parametrize("masked", [False, True], ids=["lengths", "mask+lengths"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("cell", ["irnn", "lstm"])
def test_the_exchange_in_the_weights_dtype_changes_no_bit(cell, dtype, masked, monkeypatch):
    """bf16/fp16 weights: the backward exchanges dz / dgates between phases as a copy in
    the weights' dtype, and so does the forward with h unless a mask multiplies it
    first; the product would round its operand to that dtype anyway, so outputs and
    gradients are bitwise those of exchanging the float32 buffers (over two batch
    groups and three unit blocks, with lengths, and with the mask too)."""
    from helpers import sequence_options

    steps, batch, inputs, hidden = 5, 20, 3, 37
    x, states, w_ih, w_hh, b_ih, b_hh, up = make_layer(cell, steps, batch, inputs, hidden, bias=True, seed=4)
    mask, lengths = sequence_options(steps, batch, hidden, seed=3)
    tensors = [_tensor(a, dtype) for a in (x, *states, w_ih, w_hh)]
    options = dict(lengths=torch.tensor(lengths, device=DEVICE))
    if masked:
        options["recurrent_mask"] = _tensor(mask)
    bias = _tensor(b_ih + b_hh, dtype)
    grad_outputs = [_tensor(up[k], dtype) for k in (("y", "h") if cell == "irnn" else ("y", "h", "c"))]
    exchanged = []
    real_forward, real_backward = split._forward_exchange, split._exchange
    monkeypatch.setattr(split, "_forward_exchange", lambda *a: exchanged.append("forward") or real_forward(*a))
    monkeypatch.setattr(split, "_exchange", lambda *a: exchanged.append("backward") or real_backward(*a))
    results = []
    for low in (True, False):
        if not low:
            monkeypatch.setattr(split, "_forward_exchange", lambda w, h, full, masked: full)
            monkeypatch.setattr(split, "_exchange", lambda w, batch, width, full: full)
        if cell == "irnn":
            y, h_n = split.irnn_split_forward(*tensors, bias, **options, programs=6)
            grads = split.irnn_split_backward(*grad_outputs, *tensors, y, **options, programs=6)
            results.append((y, h_n, *grads))
        else:
            y, h_n, c_n, cells, gates = split.lstm_split_forward(*tensors, bias, **options, programs=6)
            grads = split.lstm_split_backward(*grad_outputs, *tensors, y, cells, gates, **options, programs=6)
            results.append((y, h_n, c_n, *grads))
    assert exchanged == ["forward", "backward"]
    assert split.split_plan(f"{cell}_split_backward", hidden, batch, dtype, False, True, 6).groups == 2
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("cell", ["irnn", "lstm"])
def test_a_tuned_call_equals_the_next_call(cell, dtype, monkeypatch):
    """The first call of a key runs the tuner's trials on its own buffers, then the
    chosen config; the next call runs the chosen config alone. Both give the same bits
    only if every buffer a trial overwrites was restored (the gates, dc, and for bf16
    the exchange copy holding h_0, which step 1 overwrites)."""
    monkeypatch.setattr(split, "TUNER", split._Tuner())
    split.TUNER.timer = lambda trial: trial() or 1.0
    x, states, w_ih, w_hh, b_ih, b_hh, up = make_layer(cell, 4, 17, 3, 20, bias=True, seed=11)  # 17: tiles of 16
    tensors = [_tensor(a, dtype) for a in (x, *states, w_ih, w_hh)]
    bias = _tensor(b_ih + b_hh, dtype)
    grad_outputs = [_tensor(up[k], dtype) for k in (("y", "h") if cell == "irnn" else ("y", "h", "c"))]
    results = []
    for _ in range(2):
        if cell == "irnn":
            y, h_n = split.irnn_split_forward(*tensors, bias, programs=2)
            results.append((y, h_n, *split.irnn_split_backward(*grad_outputs, *tensors, y, programs=2)))
        else:
            y, h_n, c_n, cells, gates = split.lstm_split_forward(*tensors, bias, programs=2)
            grads = split.lstm_split_backward(*grad_outputs, *tensors, y, cells, gates, programs=2)
            results.append((y, h_n, c_n, *grads))
    assert len(split.TUNER.chosen) == 2
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cell", ["irnn", "lstm"])
def test_a_long_persistent_scan_is_split_into_launches(cell, monkeypatch):
    """The barrier's int32 arrival count limits a persistent launch to MAX_ARRIVALS
    (phases x programs); beyond it the scan runs in several persistent launches, each
    with a fresh count. With the limit set to 3 arrivals and one program (so under the
    interpreter), the T = 7 scan takes three forward and three backward launches and
    agrees bitwise with the per-step driver."""
    steps, batch, inputs, hidden = 7, 5, 3, 20
    x, states, w_ih, w_hh, b_ih, b_hh, up = make_layer(cell, steps, batch, inputs, hidden, bias=True, seed=6)
    tensors = [_tensor(a) for a in (x, *states, w_ih, w_hh)]
    bias = _tensor(b_ih + b_hh)
    grad_outputs = [_tensor(up[k]) for k in (("y", "h") if cell == "irnn" else ("y", "h", "c"))]
    launches = []
    kernels = dict(split.KERNELS)

    class Counted:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            launches.append(grid)
            return self.kernel[grid]

    results = []
    for persistent in (False, True):
        if persistent:
            monkeypatch.setattr(split, "MAX_ARRIVALS", 3)
            monkeypatch.setattr(split, "KERNELS", {k: Counted(v) for k, v in kernels.items()})
        if cell == "irnn":
            y, h_n = split.irnn_split_forward(*tensors, bias, persistent=persistent, programs=1)
            results.append((y, h_n, *split.irnn_split_backward(*grad_outputs, *tensors, y, persistent=persistent,
                                                               programs=1)))
        else:
            y, h_n, c_n, cells, gates = split.lstm_split_forward(*tensors, bias, persistent=persistent, programs=1)
            grads = split.lstm_split_backward(*grad_outputs, *tensors, y, cells, gates, persistent=persistent,
                                              programs=1)
            results.append((y, h_n, c_n, *grads))
    assert len(launches) == 3 + 3  # forward: 7 steps in windows of 3; backward: 8 phases in windows of 3
    for a, b in zip(*results):
        assert torch.equal(a, b)
