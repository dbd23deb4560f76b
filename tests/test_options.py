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
    (dict(hidden_clip=True), "hidden_clip must be a positive number"),  # a bool is no number here
    (dict(lengths=torch.tensor([1, 2], device="meta")), "lengths must hold values"),
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
@pytest.mark.parametrize("case", ["T0", "all-lengths-0", "T0-weights-only"])
@pytest.mark.parametrize("cell", ["irnn", "lstm", "lstm-proj"])
def test_a_call_that_runs_no_step_stays_in_the_graph(cell, case, backend):
    """T = 0, or every row of length 0: y is zeros and the final states are the initial
    ones, and on every backend the results are in autograd's graph as a stepped call's
    are: a backward through y alone works (torch.nn's route and the loop once returned a
    y that did not require grad, so that y.sum().backward() raised), the states'
    gradients reach h0 (and c0), and x and the weights get zeros, also where only the
    weights (the projection's among them) require grad."""
    if cell == "lstm-proj" and backend == "triton":
        pytest.skip("the Triton kernels have no projection")
    dtype = torch.float32 if backend == "triton" else torch.float64
    gates = 1 if cell == "irnn" else 4
    steps, batch, inputs, hidden = (3 if case == "all-lengths-0" else 0), 2, 3, 4
    width = 2 if cell == "lstm-proj" else hidden  # h's: P with the projection
    lengths = torch.zeros(batch, dtype=torch.long) if case == "all-lengths-0" else None
    states_grad = case != "T0-weights-only"
    torch.manual_seed(0)
    x = torch.randn(steps, batch, inputs, dtype=dtype, requires_grad=states_grad)
    states = [torch.randn(batch, w, dtype=dtype, requires_grad=states_grad)
              for w in ((width,) if cell == "irnn" else (width, hidden))]
    weights = [torch.randn(gates * hidden, inputs, dtype=dtype, requires_grad=True),
               torch.randn(gates * hidden, width, dtype=dtype, requires_grad=True),
               torch.randn(gates * hidden, dtype=dtype, requires_grad=True)]
    w_hr = torch.randn(width, hidden, dtype=dtype, requires_grad=True) if cell == "lstm-proj" else None
    if cell == "irnn":
        y, h_n = fused_rnn.irnn(x, states[0], *weights, None, backend=backend, lengths=lengths)
        finals = (h_n,)
    else:
        y, finals = fused_rnn.lstm(x, tuple(states), *weights, None, backend=backend, lengths=lengths, w_hr=w_hr)
    assert y.shape == (steps, batch, width) and not y.any()
    for final, state in zip(finals, states):
        assert torch.equal(final, state) and final is not state
    assert y.requires_grad and all(f.requires_grad for f in finals)
    leaves = [t for t in (x, *states, *weights, w_hr) if t is not None and t.requires_grad]
    y.sum().backward(retain_graph=True)  # y alone
    for t in leaves:
        assert t.grad is None or not t.grad.any()
    seeds = [torch.randn_like(f) for f in finals]
    grads = dict(zip(map(id, leaves), torch.autograd.grad([*finals], leaves, seeds, allow_unused=True)))
    for state, seed in zip(states, seeds):
        if state.requires_grad:
            assert torch.equal(grads[id(state)], seed)  # h_n = h0: the identity
    for t in (x, *weights, w_hr):
        if t is not None and t.requires_grad:
            assert grads[id(t)] is None or not grads[id(t)].any()


@pytest.mark.parametrize("backend", NO_STEP_BACKENDS)
@pytest.mark.parametrize("dtype", ["f64", "bf16"])
@pytest.mark.parametrize("batch", [3, 40], ids=["B3", "B40"])
@pytest.mark.parametrize("cell", ["irnn", "lstm", "lstm-proj"])
def test_padding_never_reaches_a_gradient(cell, batch, dtype, backend):
    """What lies past a sequence's length (x's padding, and the initial state of a row
    of length 0, which no step uses) changes no output and no gradient: NaN and inf
    there give the results of zeros there, bit for bit. (The weight-gradient products
    ran over every row, so that 0 * NaN made dW_ih NaN on the fused kernels and the
    loop; torch.nn's packing never saw the padding.) B = 3 (15 rows) takes the CPU
    kernels' small-rows weight gradients, B = 40 their stacked GEMM and the backward's
    dx inside the step; the projection's backward has its own weight gradient."""
    if cell == "lstm-proj" and backend == "triton":
        pytest.skip("the Triton kernels have no projection")
    dtype = {"f64": torch.float32 if backend == "triton" else torch.float64, "bf16": torch.bfloat16}[dtype]
    gates = 1 if cell == "irnn" else 4
    steps, inputs, hidden = 5, 3, 4
    width = 2 if cell == "lstm-proj" else hidden
    torch.manual_seed(0)
    lengths = torch.randint(0, steps + 1, (batch,))
    lengths[:3] = torch.tensor([steps, 2, 0])
    padding = (torch.arange(steps)[:, None] >= lengths[None, :])[:, :, None]  # [T, B, 1]
    clean_x = torch.randn(steps, batch, inputs).masked_fill(padding, 0.0).to(dtype)
    clean_states = [torch.randn(batch, w).to(dtype) for w in ((width,) if cell == "irnn" else (width, hidden))]
    dirty_x = clean_x.masked_fill(padding, float("nan"))
    dirty_x[3:, 1, 1] = float("inf")  # row 1's padding: inf too
    dirty_states = [s.clone() for s in clean_states]
    empty = lengths == 0
    for s in dirty_states:
        s[empty] = float("nan")  # rows of length 0: h_n = h0 there, and nothing else sees it
    weights = [torch.randn(gates * hidden, inputs), 0.5 * torch.randn(gates * hidden, width),
               torch.randn(gates * hidden)] + ([0.5 * torch.randn(width, hidden)] if cell == "lstm-proj" else [])
    weights = [w.to(dtype) for w in weights]
    results = []
    for x, states in ((clean_x, clean_states), (dirty_x, dirty_states)):
        leaves = [t.clone().requires_grad_() for t in (x, *states, *weights)]
        x_, *rest = leaves
        if cell == "irnn":
            y, h_n = fused_rnn.irnn(x_, rest[0], *rest[1:], None, backend=backend, lengths=lengths)
            outputs = (y, h_n)
        else:
            w_hr = rest[5] if cell == "lstm-proj" else None
            y, (h_n, c_n) = fused_rnn.lstm(x_, tuple(rest[:2]), *rest[2:5], None, backend=backend, lengths=lengths,
                                           w_hr=w_hr)
            outputs = (y, h_n, c_n)
        torch.manual_seed(1)
        seeds = [torch.randn_like(o) for o in outputs]
        grads = torch.autograd.grad(outputs, leaves, seeds)
        results.append(([o.detach() for o in outputs], grads))
    (clean_out, clean_grads), (dirty_out, dirty_grads) = results
    assert torch.equal(clean_out[0], dirty_out[0])
    for clean, dirty in zip(clean_out[1:], dirty_out[1:]):  # the final states but the length-0 rows'
        assert torch.equal(clean[~empty], dirty[~empty]) and dirty[empty].isnan().all()
    for clean, dirty in zip(clean_grads, dirty_grads):
        assert torch.equal(clean, dirty)


@pytest.mark.parametrize("cell", ["irnn", "lstm"])
def test_a_mask_that_requires_grad_gets_its_gradient_or_an_error(cell):
    """The fused kernels treat recurrent_mask as a constant (dropout masks are): a mask
    that requires grad once got no gradient from them, silently. auto now takes the
    torch loop, which differentiates it; a fused backend named for it, or its op called
    directly, raises a ValueError that names the mask."""
    gates = 1 if cell == "irnn" else 4
    torch.manual_seed(0)
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    w_ih, w_hh = torch.randn(gates * 5, 3, dtype=torch.float64), 0.5 * torch.randn(gates * 5, 5, dtype=torch.float64)
    layer = fused_rnn.irnn if cell == "irnn" else fused_rnn.lstm
    mask = torch.full((2, 5), 1.5, dtype=torch.float64, requires_grad=True)
    grads = {}
    for backend in ("auto", "torch"):
        y = layer(x, None, w_ih, w_hh, backend=backend, recurrent_mask=mask)[0]
        grads[backend], = torch.autograd.grad(y.sum(), mask)
    assert torch.equal(grads["auto"], grads["torch"]) and grads["auto"].abs().sum() > 0
    choice = fused_rnn.select_backend("cpu", torch.float64, cell=cell,
                                      options=("recurrent_mask", fused_rnn.dispatch.MASK_GRADIENT))
    assert choice.name == "torch"
    for backend in [b for b in NO_STEP_BACKENDS if b in ("cpp", "nn")]:  # (nn: no mask at all)
        assert "recurrent_mask" in choice.skipped[backend]
    for backend in [b for b in NO_STEP_BACKENDS if b not in ("torch", "nn")]:
        dtype = torch.float32 if backend == "triton" else torch.float64
        with pytest.raises(ValueError, match="recurrent_mask's gradient"):
            layer(x.to(dtype), None, w_ih.to(dtype), w_hh.to(dtype), backend=backend,
                  recurrent_mask=mask.detach().to(dtype).requires_grad_())
    with torch.no_grad():  # nothing to differentiate: every backend takes the mask
        for backend in [b for b in NO_STEP_BACKENDS if b not in ("nn", "triton")]:
            layer(x, None, w_ih, w_hh, backend=backend, recurrent_mask=mask)
    if "cpp" in NO_STEP_BACKENDS:
        if cell == "irnn":
            call = lambda: torch.ops.fused_rnn.irnn_scan_forward(x, torch.zeros(2, 5, dtype=torch.float64), w_ih,  # noqa: E731
                                                                  w_hh, None, mask)
        else:
            zeros = torch.zeros(2, 5, dtype=torch.float64)
            call = lambda: torch.ops.fused_rnn.lstm_scan_forward(x, zeros, zeros, w_ih, w_hh, None, mask)  # noqa: E731
        with pytest.raises(ValueError, match="do not differentiate recurrent_mask"):
            call()
    if "triton" in NO_STEP_BACKENDS:  # its op, called directly (dispatch refuses before it)
        f32 = [t.float() for t in (x, w_ih, w_hh)]
        mask32 = mask.detach().float().requires_grad_()
        if cell == "irnn":
            call = lambda: torch.ops.fused_rnn.triton_irnn_scan_forward(f32[0], None, f32[1], f32[2], None,  # noqa: E731
                                                                         False, mask32)
        else:
            call = lambda: torch.ops.fused_rnn.triton_lstm_scan_forward(f32[0], None, None, f32[1], f32[2],  # noqa: E731
                                                                         None, False, mask32)
        with pytest.raises(ValueError, match="do not differentiate recurrent_mask"):
            call()
