"""The per-sequence options of fused_rnn.irnn / fused_rnn.lstm (recurrent_mask,
lengths, hidden_clip): argument checks, dispatch to the backends that implement them,
and every backend that does against the NumPy reference (outputs, final states and
all gradients)."""

import os

import pytest
import torch

import fused_rnn
from helpers import check_options

# every backend that runs CPU tensors here and implements the options: the Triton
# kernels too, under the interpreter (tests/conftest.py sets it without a GPU)
OPTION_BACKENDS = [name for name in fused_rnn.available_backends("cpu")
                   if {"recurrent_mask", "lengths", "hidden_clip"} <= set(
                       fused_rnn.dispatch.OPTION_SUPPORT.get(name, ("recurrent_mask", "lengths", "hidden_clip")))]
if os.environ.get("TRITON_INTERPRET") == "1":
    OPTION_BACKENDS.append("triton")
SHAPES = [(1, 1, 3, 5), (9, 5, 4, 7), (20, 18, 6, 13)]  # (T, B, I, H)
COMBINATIONS = [("recurrent_mask",), ("lengths",), ("hidden_clip",), ("recurrent_mask", "lengths", "hidden_clip")]


@pytest.mark.parametrize("used", COMBINATIONS, ids="+".join)
@pytest.mark.parametrize("backend", OPTION_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}B{}I{}H{}".format(*s))
@pytest.mark.parametrize("cell", ["irnn", "lstm"])
def test_options_match_reference(cell, shape, dtype, backend, used):
    """Tolerances of test_cpu: the options add one multiply or select per element."""
    if used == ("hidden_clip",) and cell == "lstm":
        pytest.skip("hidden_clip is the IRNN's")
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernels take float32, bfloat16 and float16")
    check_options(cell, shape, dtype, backend, used)


def test_options_on_threads_match_reference():
    """Two threads, each scanning its own slice of a 40-row batch (mask rows, frozen
    rows and carried gradients per slice)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for cell in ("irnn", "lstm"):
            for backend in OPTION_BACKENDS:
                if backend != "triton":  # the interpreter runs no threads
                    check_options(cell, (7, 40, 5, 24), torch.float64, backend, COMBINATIONS[-1])
    finally:
        torch.set_num_threads(threads)


def test_dispatch_takes_a_backend_that_implements_the_options(monkeypatch):
    """Every kernel implements the options today; a backend that did not would be
    skipped with the reason (OPTION_SUPPORT is the one table dispatch reads)."""
    if "cpp" not in fused_rnn.available_backends("cpu"):
        pytest.skip("the cpp backend is not built")
    x, w_ih, w_hh = torch.randn(3, 2, 4), torch.randn(5, 4), torch.eye(5)
    choice = fused_rnn.select_backend("cpu", torch.float32, cell="irnn", options=("hidden_clip",))
    assert choice.name == "cpp" and "does not implement hidden_clip" in choice.skipped["nn"]
    y, _ = fused_rnn.irnn(x, None, w_ih, w_hh, hidden_clip=0.1)
    assert y.max() == torch.tensor(0.1, dtype=y.dtype)  # the clip is reached and never exceeded
    monkeypatch.setitem(fused_rnn.dispatch.OPTION_SUPPORT, "cpp", ("recurrent_mask",))
    choice = fused_rnn.select_backend("cpu", torch.float32, cell="irnn", options=("recurrent_mask", "hidden_clip"))
    assert choice.name == "torch" and "does not implement hidden_clip" in choice.skipped["cpp"]
    with pytest.raises(ValueError, match="does not implement hidden_clip"):
        fused_rnn.irnn(x, None, w_ih, w_hh, hidden_clip=0.1, backend="cpp")


@pytest.mark.parametrize("bad, message", [
    (dict(recurrent_mask=torch.ones(2, 4)), r"recurrent_mask must have shape \[B, H\] = \[2, 5\]"),
    (dict(recurrent_mask=torch.ones(2, 5, dtype=torch.float64)), "one dtype"),
    (dict(lengths=torch.tensor([1.0, 2.0])), "lengths must hold integers"),
    (dict(lengths=torch.tensor([1, 2, 3])), r"lengths must have shape \[B\] = \[2\]"),
    (dict(lengths=torch.tensor([1, 4])), r"lengths must lie in \[0, T\] = \[0, 3\]"),
    (dict(lengths=[1, 2]), "lengths must be a torch.Tensor"),
    (dict(hidden_clip=0.0), "hidden_clip must be a positive number"),
])
def test_bad_options_name_the_argument(bad, message):
    with pytest.raises((ValueError, TypeError), match=message):
        fused_rnn.irnn(torch.randn(3, 2, 4), None, torch.randn(5, 4), torch.eye(5), **bad)


def test_feature_cost_benchmark_runs(tmp_path):
    """bench/feature_costs.py (docs/cpu.md's feature-cost table) in its quick mode: its
    correctness check of lengths= against packed nn.LSTM included."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "feature_costs.py"
    out = tmp_path / "features.json"
    result = subprocess.run([sys.executable, str(script), "--quick", "--json", str(out)], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    if "cpp" in fused_rnn.available_backends("cpu"):
        assert {r["option"] for r in report["options"]} == {"recurrent_mask", "lengths", "hidden_clip"}
        assert len(report["variable_lengths"]) == 2


@pytest.mark.parametrize("cell", ["irnn", "lstm"])
def test_gradcheck_with_options(cell):
    """float64 gradcheck of the fused CPU scans with every option on, tiny shapes."""
    if "cpp" not in fused_rnn.available_backends("cpu"):
        pytest.skip("the cpp backend is not built")
    torch.manual_seed(0)
    steps, batch, inputs, hidden = 4, 3, 2, 3
    gates = 1 if cell == "irnn" else 4
    x = torch.randn(steps, batch, inputs, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(batch, hidden, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(batch, hidden, dtype=torch.float64, requires_grad=True)
    w_ih = (0.5 * torch.randn(gates * hidden, inputs, dtype=torch.float64)).requires_grad_()
    w_hh = (0.5 * torch.randn(gates * hidden, hidden, dtype=torch.float64)).requires_grad_()
    b = (0.1 * torch.randn(gates * hidden, dtype=torch.float64)).requires_grad_()
    mask = ((torch.rand(batch, hidden) > 0.3) / 0.7).to(torch.float64)
    lengths = torch.tensor([4, 0, 2])
    if cell == "irnn":
        def layer(x, h0, w_ih, w_hh, b):
            return fused_rnn.irnn(x, h0, w_ih, w_hh, b, None, backend="cpp", recurrent_mask=mask, lengths=lengths,
                                  hidden_clip=1.0)
        inputs_ = (x, h0, w_ih, w_hh, b)
    else:
        def layer(x, h0, c0, w_ih, w_hh, b):
            y, (h, c) = fused_rnn.lstm(x, (h0, c0), w_ih, w_hh, b, None, backend="cpp", recurrent_mask=mask,
                                       lengths=lengths)
            return y, h, c
        inputs_ = (x, h0, c0, w_ih, w_hh, b)
    assert torch.autograd.gradcheck(layer, inputs_)


NO_STEP_BACKENDS = fused_rnn.available_backends("cpu") + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1"
                                                          else [])


@pytest.mark.parametrize("backend", NO_STEP_BACKENDS)
@pytest.mark.parametrize("case", ["T0", "all-lengths-0"])
@pytest.mark.parametrize("cell", ["irnn", "lstm"])
def test_a_call_that_runs_no_step_stays_in_the_graph(cell, case, backend):
    """T = 0, or every row of length 0: y is zeros and the final states are the initial
    ones, and on every backend the results are in autograd's graph as a stepped call's
    are: a backward through y alone works (torch.nn's route and the loop once returned a
    y that did not require grad, so that y.sum().backward() raised), the states'
    gradients reach h0 (and c0), and x and the weights get zeros."""
    dtype = torch.float32 if backend == "triton" else torch.float64
    gates = 1 if cell == "irnn" else 4
    steps, batch, inputs, hidden = (0 if case == "T0" else 3), 2, 3, 4
    lengths = torch.zeros(batch, dtype=torch.long) if case != "T0" else None
    torch.manual_seed(0)
    x = torch.randn(steps, batch, inputs, dtype=dtype, requires_grad=True)
    states = [torch.randn(batch, hidden, dtype=dtype, requires_grad=True) for _ in range(1 if cell == "irnn" else 2)]
    weights = [torch.randn(gates * hidden, inputs, dtype=dtype, requires_grad=True),
               torch.randn(gates * hidden, hidden, dtype=dtype, requires_grad=True),
               torch.randn(gates * hidden, dtype=dtype, requires_grad=True)]
    if cell == "irnn":
        y, h_n = fused_rnn.irnn(x, states[0], *weights, None, backend=backend, lengths=lengths)
        finals = (h_n,)
    else:
        y, finals = fused_rnn.lstm(x, tuple(states), *weights, None, backend=backend, lengths=lengths)
    assert y.shape == (steps, batch, hidden) and not y.any()
    for final, state in zip(finals, states):
        assert torch.equal(final, state) and final is not state
    assert y.requires_grad and all(f.requires_grad for f in finals)
    y.sum().backward(retain_graph=True)  # y alone
    for t in (x, *weights):
        assert t.grad is None or not t.grad.any()
    seeds = [torch.randn_like(f) for f in finals]
    grads = torch.autograd.grad([*finals], [x, *states, *weights], seeds, allow_unused=True)
    for got, seed in zip(grads[1:1 + len(states)], seeds):
        assert torch.equal(got, seed)  # h_n = h0: the identity
    for got in (grads[0], *grads[1 + len(states):]):
        assert got is None or not got.any()
