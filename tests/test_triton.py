"""The Triton kernels (fused_rnn/triton) against the NumPy reference, under the Triton
interpreter on CPU tensors when there is no GPU (tests/conftest.py sets
TRITON_INTERPRET=1), and their ahead-of-time compilation for sm_80 / sm_90."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fused_rnn
import rnn_reference as ref
from helpers import LOW_PRECISION_TOLERANCE, SHAPES, assert_matches, irnn_inputs_off_the_kink, make_layer, run_in_group

triton_irnn = pytest.importorskip("fused_rnn.triton.irnn", reason="triton is not installed")
from fused_rnn.triton import lstm as triton_lstm  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and the Triton interpreter is off", allow_module_level=True)


# The GPU backends that the backend-level tests below run: Triton everywhere (under the
# interpreter without a GPU), and the CUDA scans of csrc/cuda on a GPU.
GPU_BACKENDS = ["triton"] + (["cuda"] if DEVICE == "cuda" and "cuda" in fused_rnn.available_backends("cuda") else [])


def _tensor(array):
    return None if array is None else torch.tensor(array, dtype=torch.float32, device=DEVICE)


@pytest.mark.parametrize("with_h0", [True, False], ids=["h0", "zero_h0"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}B{}I{}H{}".format(*s))
def test_irnn_scan_matches_reference(shape, bias, with_h0):
    """Forward (y, h_T) and every gradient of the Triton IRNN scans, float32 (tolerances
    of test_cpu: IEEE-precision dot products, fp32 accumulation)."""
    x, (h0,), w_ih, w_hh, b_ih, b_hh, up = make_layer("irnn", *shape, bias=bias, seed=sum(shape))
    if not with_h0:
        h0 = 0.0 * h0
    combined = None if not bias else _tensor(b_ih + b_hh)
    tx, th0, tw_ih, tw_hh = _tensor(x), _tensor(h0) if with_h0 else None, _tensor(w_ih), _tensor(w_hh)
    y, h_n = triton_irnn.irnn_scan_forward(tx, th0, tw_ih, tw_hh, combined)
    want_y, want_h, cache = ref.irnn_forward(x, h0, w_ih, w_hh, b_ih, b_hh)
    assert_matches("y", y.cpu(), want_y, torch.float32)
    assert_matches("h_T", h_n.cpu(), want_h, torch.float32)
    dx, dh0, dw_ih, dw_hh, dbias = triton_irnn.irnn_scan_backward(_tensor(up["y"]), _tensor(up["h"]), tx, th0,
                                                                  tw_ih, tw_hh, y)
    want = ref.irnn_backward(up["y"], up["h"], cache)
    for name, got in (("dx", dx), ("dh0", dh0), ("dw_ih", dw_ih), ("dw_hh", dw_hh)):
        assert_matches(name, got.cpu(), want[name], torch.float32)
    if bias:
        assert_matches("db", dbias.cpu(), want["db_ih"], torch.float32)


@pytest.mark.parametrize("bias, with_state", [(True, True), (False, False)], ids=["bias-state", "nobias-zero"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}B{}I{}H{}".format(*s))
def test_lstm_scan_matches_reference(shape, bias, with_state):
    """Forward (y, h_T, c_T) and every gradient of the Triton LSTM scans, float32,
    against the NumPy reference (tolerances of test_cpu)."""
    x, (h0, c0), w_ih, w_hh, b_ih, b_hh, up = make_layer("lstm", *shape, bias=bias, seed=sum(shape))
    if not with_state:
        h0, c0 = 0.0 * h0, 0.0 * c0
    combined = None if not bias else _tensor(b_ih + b_hh)
    tx, tw_ih, tw_hh = _tensor(x), _tensor(w_ih), _tensor(w_hh)
    th0, tc0 = (_tensor(h0), _tensor(c0)) if with_state else (None, None)
    y, h_n, c_n, cells, gates = triton_lstm.lstm_scan_forward(tx, th0, tc0, tw_ih, tw_hh, combined)
    want_y, want_h, want_c, cache = ref.lstm_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh)
    for name, got, want in (("y", y, want_y), ("h_T", h_n, want_h), ("c_T", c_n, want_c)):
        assert_matches(name, got.cpu(), want, torch.float32)
    grads = triton_lstm.lstm_scan_backward(_tensor(up["y"]), _tensor(up["h"]), _tensor(up["c"]), tx, th0, tc0,
                                           tw_ih, tw_hh, y, cells, gates)
    want = ref.lstm_backward(up["y"], up["h"], up["c"], cache)
    for name, got in zip(("dx", "dh0", "dc0", "dw_ih", "dw_hh"), grads):
        assert_matches(name, got.cpu(), want[name], torch.float32)
    if bias:
        assert_matches("db", grads[5].cpu(), want["db_ih"], torch.float32)


def test_lstm_scan_empty_inputs():
    w_ih, w_hh = torch.randn(24, 3, device=DEVICE), torch.randn(24, 6, device=DEVICE)
    for steps, batch in ((0, 4), (3, 0)):
        x = torch.randn(steps, batch, 3, device=DEVICE)
        h0, c0 = torch.randn(batch, 6, device=DEVICE), torch.randn(batch, 6, device=DEVICE)
        y, h_n, c_n, cells, gates = triton_lstm.lstm_scan_forward(x, h0, c0, w_ih, w_hh, None)
        assert y.shape == (steps, batch, 6) and h_n.shape == c_n.shape == (batch, 6)
        if steps == 0:
            assert torch.equal(h_n, h0) and torch.equal(c_n, c0)
        grads = triton_lstm.lstm_scan_backward(torch.zeros_like(y), torch.ones(batch, 6, device=DEVICE),
                                               torch.ones(batch, 6, device=DEVICE), x, h0, c0, w_ih, w_hh, y,
                                               cells, gates)
        assert grads[0].shape == x.shape and grads[4].shape == w_hh.shape


def test_irnn_scan_empty_inputs():
    w_ih, w_hh = torch.randn(6, 3, device=DEVICE), torch.eye(6, device=DEVICE)
    for steps, batch in ((0, 4), (3, 0)):
        x = torch.randn(steps, batch, 3, device=DEVICE)
        h0 = torch.randn(batch, 6, device=DEVICE)
        y, h_n = triton_irnn.irnn_scan_forward(x, h0, w_ih, w_hh, None)
        assert y.shape == (steps, batch, 6) and h_n.shape == (batch, 6)
        if steps == 0:
            assert torch.equal(h_n, h0)
        grads = triton_irnn.irnn_scan_backward(torch.zeros_like(y), torch.ones(batch, 6, device=DEVICE), x, h0,
                                               w_ih, w_hh, y)
        assert grads[0].shape == x.shape and grads[3].shape == w_hh.shape


def test_irnn_nan_propagates():
    x = torch.randn(4, 2, 3, device=DEVICE)
    x[1, 0, 0] = float("nan")
    y, _ = triton_irnn.irnn_scan_forward(x, None, torch.randn(5, 3, device=DEVICE), torch.eye(5, device=DEVICE),
                                         None)
    assert torch.isnan(y[1:, 0]).all() and not torch.isnan(y[:, 1]).any()


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "fp16"])
def test_nan_propagates_in_every_dtype(dtype, backend):
    x = torch.randn(4, 2, 3, device=DEVICE, dtype=dtype)
    x[1, 0, 0] = float("nan")
    w_ih = torch.randn(20, 3, device=DEVICE, dtype=dtype)
    w_hh = torch.randn(20, 5, device=DEVICE, dtype=dtype) * 0.3
    y, _ = fused_rnn.lstm(x, None, w_ih, w_hh, backend=backend)
    assert torch.isnan(y[1:, 0]).all() and not torch.isnan(y[:, 1]).any()
    y, _ = fused_rnn.irnn(x, None, w_ih[:5], torch.eye(5, device=DEVICE, dtype=dtype), backend=backend)
    assert torch.isnan(y[1:, 0]).all() and not torch.isnan(y[:, 1]).any()


def test_irnn_rejects_other_dtypes():
    x = torch.randn(2, 2, 3, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="float32"):
        triton_irnn.irnn_scan_forward(x, None, torch.randn(4, 3, dtype=torch.float64, device=DEVICE),
                                      torch.eye(4, dtype=torch.float64, device=DEVICE), None)


# about 1500 compiles: 3-6 minutes on 2 cores with Triton's cache (~/.triton) warm, 20-25 cold
@pytest.mark.slow
@pytest.mark.timeout(3000)
@pytest.mark.skipif(shutil.which("ptxas") is None and not Path("/usr/local/cuda/bin/ptxas").is_file(),
                    reason="ptxas (CUDA toolkit) not found")
def test_kernels_compile_for_sm80_sm90_without_spills(tmp_path):
    """Every Triton kernel, variant (fp32, TF32, bf16, fp16) and candidate config (and
    for the hidden-split kernels every BLOCK_U) compiles ahead of time for sm_80 and
    sm_90 (bench/triton_resources.py, which the docs/triton.md's table comes from);
    dispatch tunes only over the configs with no register spills, shared memory within
    the per-block limit and no non-coherent loads of what earlier steps stored (nor,
    for the split kernels, L1-caching asynchronous copies), and every candidate left
    out of dispatch does fail one of these. T, B and H are run-time arguments (never
    specialized, which the script checks), so one binary serves H = 64 ... 1024 and
    beyond."""
    import triton

    from fused_rnn.triton import _configs
    from fused_rnn.triton.common import OPTIONS_SUFFIX, VARIANTS

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "resources.json"
    result = run_in_group([sys.executable, str(REPO / "bench" / "triton_resources.py"), "--json", str(out)],
                          timeout=2700, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = json.loads(out.read_text())["rows"]
    ok = {}
    for r in rows:
        key = (r["kernel"], r["variant"], tuple(r["config_tuple"])) + ((r["block_u"],) if r["block_u"] else ())
        ok.setdefault(key, set()).add(r["arch"] if r["ok"] else "failed on " + r["arch"])
    kernels = {"irnn": triton_irnn, "lstm": triton_lstm}
    for name in [f"{cell}_scan_{d}" for cell in kernels for d in ("forward", "backward")]:
        candidates = kernels[name[:4]].CANDIDATES
        for kernel_variant in [v + suffix for v in VARIANTS for suffix in ("", OPTIONS_SUFFIX)]:
            dispatch = _configs.DISPATCH[(name, kernel_variant)]
            assert dispatch, f"{name} [{kernel_variant}] has no config"
            for config in candidates:
                archs = ok[(name, kernel_variant, tuple(config))]
                if tuple(config) in dispatch:
                    assert archs == {"sm_80", "sm_90"}, (name, kernel_variant, config, archs)
                elif triton.__version__ == _configs.TRITON_VERSION:
                    assert any(a.startswith("failed") for a in archs), (name, kernel_variant, config)
    # the hidden-split kernels: per BLOCK_U, and each kernel and variant has some BLOCK_U
    from fused_rnn.triton import plan, split
    for name in split.KERNELS:
        for kernel_variant in [v + suffix for v in VARIANTS for suffix in ("", OPTIONS_SUFFIX)]:
            assert any(_configs.SPLIT.get((name, kernel_variant, u)) for u in plan.BLOCK_UNITS), (name, kernel_variant)
            for block_u in plan.BLOCK_UNITS:
                dispatch = _configs.SPLIT.get((name, kernel_variant, block_u), ())
                for config in split.CANDIDATES:
                    if not split.runs_on(kernel_variant, config, block_u):  # not compiled, never dispatched
                        assert tuple(config) not in dispatch, (name, kernel_variant, config, block_u)
                        continue
                    archs = ok[(name, kernel_variant, tuple(config), block_u)]
                    if tuple(config) in dispatch:
                        assert archs == {"sm_80", "sm_90"}, (name, kernel_variant, config, block_u, archs)
                    elif triton.__version__ == _configs.TRITON_VERSION:
                        assert any(a.startswith("failed") for a in archs), (name, kernel_variant, config, block_u)


def _configs_of(kernel):
    from fused_rnn.triton import _configs
    from fused_rnn.triton.common import Config
    return [Config(*c) for c in _configs.DISPATCH[(kernel.name, "fp32")]]


@pytest.mark.parametrize("cell", ["irnn", "lstm"])
def test_every_dispatch_config_matches_reference(cell):
    """Each float32 launch config dispatch may tune to gives the reference's outputs and
    gradients, at a shape with a partial second batch tile (B = 18 against 16-row
    tiles) and H not a multiple of any tile (37)."""
    module = triton_irnn if cell == "irnn" else triton_lstm
    forward_configs, backward_configs = _configs_of(module.SCAN_FORWARD), _configs_of(module.SCAN_BACKWARD)
    x, states, w_ih, w_hh, b_ih, b_hh, up = make_layer(cell, 3, 18, 5, 37, bias=True, seed=5)
    tx, tw_ih, tw_hh, bias = _tensor(x), _tensor(w_ih), _tensor(w_hh), _tensor(b_ih + b_hh)
    tstates = [_tensor(s) for s in states]
    names = ("dx", "dh0", "dw_ih", "dw_hh") if cell == "irnn" else ("dx", "dh0", "dc0", "dw_ih", "dw_hh")
    if cell == "irnn":
        *want_out, cache = ref.irnn_forward(x, *states, w_ih, w_hh, b_ih, b_hh)
        want_grads = ref.irnn_backward(up["y"], up["h"], cache)
        upstream = [_tensor(up["y"]), _tensor(up["h"])]
    else:
        *want_out, cache = ref.lstm_forward(x, *states, w_ih, w_hh, b_ih, b_hh)
        want_grads = ref.lstm_backward(up["y"], up["h"], up["c"], cache)
        upstream = [_tensor(up["y"]), _tensor(up["h"]), _tensor(up["c"])]
    for index in range(max(len(forward_configs), len(backward_configs))):
        forward = forward_configs[index % len(forward_configs)]
        backward = backward_configs[index % len(backward_configs)]
        if cell == "irnn":
            out = module.irnn_scan_forward(tx, *tstates, tw_ih, tw_hh, bias, config=forward)
            grads = module.irnn_scan_backward(*upstream, tx, *tstates, tw_ih, tw_hh, out[0], config=backward)
        else:
            out = module.lstm_scan_forward(tx, *tstates, tw_ih, tw_hh, bias, config=forward)
            grads = module.lstm_scan_backward(*upstream, tx, *tstates, tw_ih, tw_hh, *out[:1], *out[3:],
                                              config=backward)
        for name, got, want in zip(("y", "h_T", "c_T"), out, want_out):
            assert_matches(f"{name} with {forward}", got.cpu(), want, torch.float32)
        for name, got in zip(names, grads):
            assert_matches(f"{name} with {backward}", got.cpu(), want_grads[name], torch.float32)


@pytest.mark.parametrize("cell", ["irnn", "lstm"])
def test_autotuning_restores_what_the_kernels_update_in_place(cell, monkeypatch):
    """The autotuner's trials run each config on the real buffers; the forward scans
    write activations over their input and the LSTM backward carries dc in place, so
    every trial must start from restored buffers (restore_value) or the launch after
    tuning computes from garbage. Each trial here runs its config twice and the last
    config wins, under the interpreter (a stand-in timing function)."""
    module = triton_irnn if cell == "irnn" else triton_lstm
    trials = []

    def last_config_wins(kernel_call, quantiles):
        kernel_call()
        kernel_call()
        trials.append(1)
        return [1.0 / len(trials)] * len(quantiles)

    for kernel in (module.SCAN_FORWARD, module.SCAN_BACKWARD):
        monkeypatch.setattr(kernel, "do_bench", last_config_wins)
    x, states, w_ih, w_hh, b_ih, b_hh, up = make_layer(cell, 4, 18, 3, 21, bias=True, seed=9)
    tx, tw_ih, tw_hh, bias = _tensor(x), _tensor(w_ih), _tensor(w_hh), _tensor(b_ih + b_hh)
    tstates = [_tensor(s) for s in states]
    if cell == "irnn":
        *want_out, cache = ref.irnn_forward(x, *states, w_ih, w_hh, b_ih, b_hh)
        want_grads = ref.irnn_backward(up["y"], up["h"], cache)
        out = module.irnn_scan_forward(tx, *tstates, tw_ih, tw_hh, bias)
        grads = module.irnn_scan_backward(_tensor(up["y"]), _tensor(up["h"]), tx, *tstates, tw_ih, tw_hh, out[0])
        names = ("dx", "dh0", "dw_ih", "dw_hh")
    else:
        *want_out, cache = ref.lstm_forward(x, *states, w_ih, w_hh, b_ih, b_hh)
        want_grads = ref.lstm_backward(up["y"], up["h"], up["c"], cache)
        out = module.lstm_scan_forward(tx, *tstates, tw_ih, tw_hh, bias)
        grads = module.lstm_scan_backward(_tensor(up["y"]), _tensor(up["h"]), _tensor(up["c"]), tx, *tstates, tw_ih,
                                          tw_hh, out[0], *out[3:])
        names = ("dx", "dh0", "dc0", "dw_ih", "dw_hh")
    tuned = [k for k in (module.SCAN_FORWARD, module.SCAN_BACKWARD) if len(_configs_of(k)) > 1]
    assert tuned and len(trials) == sum(len(_configs_of(k)) for k in tuned)  # one config: nothing to tune
    for kernel in tuned:
        tuner = kernel.autotuner("fp32")
        assert tuner.keys == ["H"]  # never B or T: no re-tuning per batch size
        assert tuner.best_config.kwargs == _configs_of(kernel)[-1].constexprs()
    for name, got, want in zip(("y", "h_T", "c_T"), out, want_out):
        assert_matches(name, got.cpu(), want, torch.float32)
    for name, got in zip(names, grads):
        assert_matches(name, got.cpu(), want_grads[name], torch.float32)


def test_dispatch_falls_back_when_no_config_compiles(monkeypatch):
    """A variant whose kernels have no spill-free config is not dispatched to Triton:
    "auto" falls back with the reason, an explicit request says why it cannot run."""
    from fused_rnn.triton import _configs
    dispatch = dict(_configs.DISPATCH)
    dispatch[("lstm_scan_backward", "bf16")] = ()
    dispatch[("lstm_scan_backward", "bf16+options")] = ()
    monkeypatch.setattr(_configs, "DISPATCH", dispatch)
    # a batch above the CUDA scans' limit, and the recurrent mask (which torch.nn's kernels
    # have not), so that Triton would be next in line
    mask = ("recurrent_mask",)
    choice = fused_rnn.select_backend("cuda", torch.bfloat16, cell="lstm", hidden=32, batch=100, options=mask)
    assert choice.name == "torch" and "lstm backward scan" in choice.skipped["triton"]
    choice = fused_rnn.select_backend("cuda", torch.bfloat16, cell="irnn", hidden=32, batch=100, options=mask)
    assert choice.name == "triton"
    with pytest.raises(ValueError, match="no launch config of the Triton lstm backward scan"):
        fused_rnn.lstm(torch.randn(2, 3, 4, dtype=torch.bfloat16, device=DEVICE), None,
                       torch.randn(8, 4, dtype=torch.bfloat16, device=DEVICE),
                       torch.randn(8, 2, dtype=torch.bfloat16, device=DEVICE), backend="triton")


# ---- the Triton backend through the public API (ops, autograd, modules, dispatch) ----


BACKEND_SHAPES = [(1, 1, 3, 5), (7, 5, 4, 9), (5, 18, 6, 20)]


@pytest.mark.parametrize("cell", ["irnn", "lstm"])
@pytest.mark.parametrize("shape", BACKEND_SHAPES, ids=lambda s: "T{}B{}I{}H{}".format(*s))
def test_functional_triton_backend_matches_reference(cell, shape):
    """fused_rnn.irnn / fused_rnn.lstm with backend="triton": outputs, final states and
    all gradients through the triton ops and their registered autograd."""
    x, states, w_ih, w_hh, b_ih, b_hh, up = make_layer(cell, *shape, bias=True, seed=7)
    tx, tw_ih, tw_hh, tb_ih, tb_hh = (torch.tensor(a, dtype=torch.float32, device=DEVICE, requires_grad=True)
                                      for a in (x, w_ih, w_hh, b_ih, b_hh))
    tstates = [torch.tensor(s, dtype=torch.float32, device=DEVICE, requires_grad=True) for s in states]
    if cell == "irnn":
        y, h_n = fused_rnn.irnn(tx, tstates[0], tw_ih, tw_hh, tb_ih, tb_hh, backend="triton")
        outputs, upstream = (y, h_n), (up["y"], up["h"])
        want_y, want_h, cache = ref.irnn_forward(x, states[0], w_ih, w_hh, b_ih, b_hh)
        want_out, want_grads = (want_y, want_h), ref.irnn_backward(up["y"], up["h"], cache)
        named = {"dx": tx, "dh0": tstates[0]}
    else:
        y, (h_n, c_n) = fused_rnn.lstm(tx, tuple(tstates), tw_ih, tw_hh, tb_ih, tb_hh, backend="triton")
        outputs, upstream = (y, h_n, c_n), (up["y"], up["h"], up["c"])
        want_y, want_h, want_c, cache = ref.lstm_forward(x, *states, w_ih, w_hh, b_ih, b_hh)
        want_out, want_grads = (want_y, want_h, want_c), ref.lstm_backward(up["y"], up["h"], up["c"], cache)
        named = {"dx": tx, "dh0": tstates[0], "dc0": tstates[1]}
    for index, (got, want) in enumerate(zip(outputs, want_out)):
        assert_matches(f"output {index}", got.detach().cpu(), want, torch.float32)
    torch.autograd.backward(outputs, [torch.tensor(u, dtype=torch.float32, device=DEVICE) for u in upstream])
    named.update({"dw_ih": tw_ih, "dw_hh": tw_hh, "db_ih": tb_ih, "db_hh": tb_hh})
    for name, tensor in named.items():
        assert_matches(name, tensor.grad.cpu(), want_grads[name], torch.float32)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("cell", ["irnn", "lstm"])
def test_modules_on_triton_match_torch_nn(cell, backend):
    """Stacked, bidirectional, batch_first modules on the GPU backends against
    torch.nn.RNN / nn.LSTM with the same state_dict."""
    torch.manual_seed(0)
    kwargs = dict(num_layers=2, bidirectional=True, batch_first=True)
    if cell == "irnn":
        reference = torch.nn.RNN(4, 8, nonlinearity="relu", **kwargs).to(DEVICE)
        fused = fused_rnn.IRNN(4, 8, backend=backend, **kwargs).to(DEVICE)
    else:
        reference = torch.nn.LSTM(4, 8, **kwargs).to(DEVICE)
        fused = fused_rnn.LSTM(4, 8, backend=backend, **kwargs).to(DEVICE)
    fused.load_state_dict(reference.state_dict())
    x = torch.randn(3, 6, 4, device=DEVICE)
    outputs = []
    for module in (reference, fused):
        inp = x.clone().requires_grad_()
        y, _ = module(inp)
        (y * torch.arange(y.numel(), device=DEVICE).view_as(y).sin()).sum().backward()
        outputs.append((y.detach(), inp.grad, {n: p.grad for n, p in module.named_parameters()}))
    # float32: different summation orders over a 2-layer, 6-step recurrence
    torch.testing.assert_close(outputs[1][0], outputs[0][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(outputs[1][1], outputs[0][1], rtol=1e-4, atol=1e-5)
    for name, grad in outputs[0][2].items():
        torch.testing.assert_close(outputs[1][2][name], grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("cell", ["irnn", "lstm"])
def test_gradient_penalty_on_gpu_backends_matches_torch_nn(cell, backend):
    """create_graph=True through the GPU backends: a gradient penalty's gradients
    equal torch.nn's (the backward recomputes through the torch loop for the graph)."""
    torch.manual_seed(0)
    if cell == "irnn":
        reference = torch.nn.RNN(3, 5, nonlinearity="relu").to(DEVICE)
        fused = fused_rnn.IRNN(3, 5, backend=backend).to(DEVICE)
    else:
        reference = torch.nn.LSTM(3, 5).to(DEVICE)
        fused = fused_rnn.LSTM(3, 5, backend=backend).to(DEVICE)
    fused.load_state_dict(reference.state_dict())
    x = torch.randn(4, 2, 3, device=DEVICE)
    results = []
    for module in (reference, fused):
        inp = x.clone().requires_grad_()
        with torch.backends.cudnn.flags(enabled=False):  # cuDNN's RNN backward is not differentiable
            y, _ = module(inp)
            (g,) = torch.autograd.grad(y, inp, torch.ones_like(y), create_graph=True)
            loss = y.pow(2).mean() + 10 * g.pow(2).sum()
            results.append(torch.autograd.grad(loss, [inp, *module.parameters()]))
    # float32, a 4-step recurrence differentiated twice: summation order only
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_cells_on_triton():
    torch.manual_seed(0)
    x, h, c = (torch.randn(3, n, device=DEVICE) for n in (4, 5, 5))
    w_ih, w_hh = torch.randn(20, 4, device=DEVICE), torch.randn(20, 5, device=DEVICE)
    b = torch.randn(20, device=DEVICE)
    # float32, one step with K <= 5: only the summation order differs from the torch loop
    got = fused_rnn.lstm_cell(x, (h, c), w_ih, w_hh, b, b, backend="triton")
    want = fused_rnn.lstm_cell(x, (h, c), w_ih, w_hh, b, b, backend="torch")
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    got = fused_rnn.irnn_cell(x, h, w_ih[:5], w_hh[:5], b[:5], None, backend="triton")
    torch.testing.assert_close(got, fused_rnn.irnn_cell(x, h, w_ih[:5], w_hh[:5], b[:5], None, backend="torch"),
                               rtol=1e-5, atol=1e-6)


def test_dispatch_of_the_triton_backend():
    if DEVICE == "cpu":
        # the interpreter serves explicit requests only: "auto" never picks it on CPU
        assert fused_rnn.select_backend("cpu", torch.float32).name != "triton"
        assert "triton" not in fused_rnn.available_backends("cpu")
    choice = fused_rnn.select_backend("cuda", torch.float64)
    assert choice.name == "nn" and "float32" in choice.skipped["triton"]
    with pytest.raises(ValueError, match="backend='triton' cannot run these inputs"):
        fused_rnn.select_backend(DEVICE, torch.float64, "triton")


def _opcheck(op, args):
    # Under the interpreter the kernels are not JITFunctions, so wrap_triton cannot
    # intercept them when AOTAutograd traces with fake tensors: that one check needs a
    # GPU (where it runs with the rest). The schema, fake and autograd checks run here.
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    if DEVICE == "cuda":
        utils += ("test_aot_dispatch_dynamic",)
    torch.library.opcheck(op, args, test_utils=utils)


def test_triton_ops_opcheck():
    """torch.library.opcheck (schema, fake tensors, autograd registration) on the ops."""
    torch.manual_seed(0)
    x, h0, c0 = (torch.randn(*shape, device=DEVICE) for shape in ((3, 2, 4), (2, 5), (2, 5)))
    w_ih, w_hh = torch.randn(5, 4, device=DEVICE), torch.randn(5, 5, device=DEVICE) * 0.3
    bias = torch.randn(5, device=DEVICE)
    y, _ = torch.ops.fused_rnn.triton_irnn_scan_forward(x, h0, w_ih, w_hh, bias)
    _opcheck(torch.ops.fused_rnn.triton_irnn_scan_forward, (x, h0, w_ih, w_hh, bias))
    _opcheck(torch.ops.fused_rnn.triton_irnn_scan_forward, (x, None, w_ih, w_hh, None))
    _opcheck(torch.ops.fused_rnn.triton_irnn_scan_backward,
                          (torch.randn_like(y), torch.randn_like(h0), x, h0, w_ih, w_hh, y, True))
    w_ih4, w_hh4 = torch.randn(20, 4, device=DEVICE), torch.randn(20, 5, device=DEVICE) * 0.3
    bias4 = torch.randn(20, device=DEVICE)
    out = torch.ops.fused_rnn.triton_lstm_scan_forward(x, h0, c0, w_ih4, w_hh4, bias4)
    _opcheck(torch.ops.fused_rnn.triton_lstm_scan_forward, (x, h0, c0, w_ih4, w_hh4, bias4))
    _opcheck(torch.ops.fused_rnn.triton_lstm_scan_backward,
                          (torch.randn_like(out[0]), torch.randn_like(h0), torch.randn_like(c0), x, h0, c0, w_ih4,
                           w_hh4, out[0], out[3], out[4], False))


def test_gpu_benchmark_script_runs(tmp_path):
    """bench/gpu_bench.py, the one-command GPU benchmark: a dry run of its tiny cases on
    CPU under the interpreter (correctness check included), and a clean exit without a GPU."""
    script = str(REPO / "bench" / "gpu_bench.py")
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = tmp_path / "gpu.md"
    result = subprocess.run([sys.executable, script, "--device", "cpu", "--quick", "--rounds", "1", "--calls", "1",
                             "--out", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line for line in out.read_text().splitlines() if line.startswith("| irnn") or line.startswith("| lstm")]
    assert len(rows) == 8   # 2 dtypes x 2 cells x 2 modes
    if not torch.cuda.is_available():
        result = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0 and "no CUDA device" in result.stderr


# ---- bfloat16 / float16 inputs, float32 state and accumulation ----

LOW_PRECISION_CASES = ([("irnn", s) for s in SHAPES if s[0] <= 9] + [("lstm", s) for s in SHAPES])


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("cell, shape", LOW_PRECISION_CASES, ids=lambda c: c if isinstance(c, str) else
                         "T{}B{}I{}H{}".format(*c))
def test_low_precision_matches_reference(cell, shape, dtype, backend):
    x, states, w_ih, w_hh, b_ih, b_hh, up = make_layer(cell, *shape, bias=True, seed=3)
    if cell == "irnn":
        x = irnn_inputs_off_the_kink(x, (*states, w_ih, w_hh, b_ih, b_hh), dtype, seed=4)
        assert x is not None, "no inputs off the ReLU kink"
    leaves = [torch.tensor(a, dtype=dtype, device=DEVICE, requires_grad=True)
              for a in (x, *states, w_ih, w_hh, b_ih, b_hh)]
    rounded = [t.detach().double().cpu().numpy() for t in leaves]
    up = {k: torch.tensor(v, dtype=dtype).double().numpy() for k, v in up.items()}
    if cell == "irnn":
        y, h_n = fused_rnn.irnn(*leaves, backend=backend)
        outputs, upstream = (y, h_n), (up["y"], up["h"])
        *want_out, cache = ref.irnn_forward(*rounded)
        want = ref.irnn_backward(up["y"], up["h"], cache)
        names = ["dx", "dh0", "dw_ih", "dw_hh", "db_ih", "db_hh"]
    else:
        y, (h_n, c_n) = fused_rnn.lstm(leaves[0], (leaves[1], leaves[2]), *leaves[3:], backend=backend)
        outputs, upstream = (y, h_n, c_n), (up["y"], up["h"], up["c"])
        *want_out, cache = ref.lstm_forward(*rounded)
        want = ref.lstm_backward(up["y"], up["h"], up["c"], cache)
        names = ["dx", "dh0", "dc0", "dw_ih", "dw_hh", "db_ih", "db_hh"]
    assert all(o.dtype == dtype for o in outputs)
    torch.autograd.backward(outputs, [torch.tensor(u, dtype=dtype, device=DEVICE) for u in upstream])
    tolerance = LOW_PRECISION_TOLERANCE[dtype]
    for name, got, expected in [*zip(["y", "h_T", "c_T"], outputs, want_out),
                                *((n, t.grad, want[n]) for n, t in zip(names, leaves))]:
        assert got.dtype == dtype, name
        scale = max(1.0, float(np.abs(expected).max()))
        error = float(np.abs(got.detach().double().cpu().numpy() - expected).max()) / scale
        assert error <= tolerance, f"{name}: error {error:.2e} > {tolerance:g}"
