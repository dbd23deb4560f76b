"""The Triton kernels (fused_rnn/triton) against the NumPy reference, under the Triton
interpreter on CPU tensors when there is no GPU (tests/conftest.py sets
TRITON_INTERPRET=1), and their ahead-of-time compilation for sm_80 / sm_90."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_backends import SHAPES, assert_matches, make_layer, to_torch
import rnn_reference as ref

triton_irnn = pytest.importorskip("fused_rnn.triton.irnn", reason="triton is not installed")
from fused_rnn.triton import lstm as triton_lstm  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and the Triton interpreter is off", allow_module_level=True)


def _tensor(array):
    return None if array is None else torch.tensor(array, dtype=torch.float32, device=DEVICE)


@pytest.mark.parametrize("with_h0", [True, False], ids=["h0", "zero_h0"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}B{}I{}H{}".format(*s))
def test_irnn_scan_matches_reference(shape, bias, with_h0):
    """Forward (y, h_T) and every gradient of the Triton IRNN scans, float32 (tolerances
    of test_backends: IEEE-precision dot products, fp32 accumulation)."""
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
    against the NumPy reference (tolerances of test_backends)."""
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


def test_irnn_rejects_other_dtypes():
    x = torch.randn(2, 2, 3, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="float32"):
        triton_irnn.irnn_scan_forward(x, None, torch.randn(4, 3, dtype=torch.float64, device=DEVICE),
                                      torch.eye(4, dtype=torch.float64, device=DEVICE), None)


@pytest.mark.skipif(shutil.which("ptxas") is None and not Path("/usr/local/cuda/bin/ptxas").is_file(),
                    reason="ptxas (CUDA toolkit) not found")
def test_kernels_compile_for_sm80_sm90_without_spills(tmp_path):
    """Every Triton kernel and config that dispatch launches compiles ahead of time for
    sm_80 and sm_90, H in {64, ..., 1024}, with no register spills and shared memory
    within the per-block limit (bench/triton_resources.py, which the README's table
    comes from; it exits non-zero otherwise)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "resources.json"
    result = subprocess.run([sys.executable, str(REPO / "bench" / "triton_resources.py"), "--json", str(out)],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = json.loads(out.read_text())
    seen = {(r["kernel"], r["arch"], r["hidden"]) for r in rows}
    for kernel in [f"{cell}_scan_{direction}{variant}" for cell in ("irnn", "lstm")
                   for direction in ("forward", "backward") for variant in ("", "[tf32]")]:
        for arch in ("sm_80", "sm_90"):
            for hidden in (64, 128, 256, 512, 1024):
                assert (kernel, arch, hidden) in seen
    assert all(r["spill_bytes"] == 0 and r["shared_bytes"] <= r["shared_limit"] for r in rows)
