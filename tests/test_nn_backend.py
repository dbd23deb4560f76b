"""The "nn" backend: torch.nn's own kernels behind the functional API. On the CPU it
runs the very kernels nn.RNN / nn.LSTM run, so it must match them exactly."""

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fused_rnn
from fused_rnn import nn_backend


def _layer(kind, bias=True, proj_size=0, dtype=torch.float64):
    torch.manual_seed(0)
    if kind == "irnn":
        return nn.RNN(3, 5, nonlinearity="relu", bias=bias, dtype=dtype)
    return nn.LSTM(3, 5, bias=bias, proj_size=proj_size, dtype=dtype)


def _weights(module):
    return [getattr(module, f"{n}_l0", None) for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]


def _run_functional(kind, module, x, state, **kwargs):
    w_ih, w_hh, b_ih, b_hh = _weights(module)
    if kind == "irnn":
        y, h = fused_rnn.irnn(x, state[0], w_ih, w_hh, b_ih, b_hh, backend="nn", **kwargs)
        return y, h
    y, (h, c) = fused_rnn.lstm(x, state, w_ih, w_hh, b_ih, b_hh, backend="nn",
                               w_hr=getattr(module, "weight_hr_l0", None), **kwargs)
    return y, h, c


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", ["irnn", "irnn-nobias", "lstm", "lstm-nobias", "lstm-proj"])
def test_matches_torch_nn_exactly(case, dtype):
    """Outputs, final states and every gradient, bit for bit: the same kernels."""
    kind = case.split("-")[0]
    module = _layer(kind, bias="nobias" not in case, proj_size=2 if "proj" in case else 0, dtype=dtype)
    width = 2 if "proj" in case else 5
    x = torch.randn(6, 4, 3, dtype=dtype, requires_grad=True)
    state = [torch.randn(4, width, dtype=dtype, requires_grad=True)] + \
        ([torch.randn(4, 5, dtype=dtype, requires_grad=True)] if kind == "lstm" else [])
    got = _run_functional(kind, module, x, state)
    hx = state[0][None] if kind == "irnn" else tuple(s[None] for s in state)
    y, final = module(x, hx)
    want = (y, final[0]) if kind == "irnn" else (y, final[0][0], final[1][0])
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    params = [p for p in module.parameters()]
    grads_got = torch.autograd.grad(sum((o * torch.arange(o.numel(), dtype=dtype).view_as(o).cos()).sum()
                                        for o in got), [x, *state, *params])
    grads_want = torch.autograd.grad(sum((o * torch.arange(o.numel(), dtype=dtype).view_as(o).cos()).sum()
                                         for o in want), [x, *state, *params])
    for a, b in zip(grads_got, grads_want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["irnn", "lstm"])
def test_lengths_through_packing_zero_lengths_included(kind):
    """lengths= runs through a packed sequence (as nn.RNN on a PackedSequence); a row of
    length 0, which packing cannot hold, keeps its state and outputs zeros."""
    module = _layer(kind)
    x = torch.randn(5, 4, 3, dtype=torch.float64, requires_grad=True)
    state = [torch.randn(4, 5, dtype=torch.float64) for _ in range(1 if kind == "irnn" else 2)]
    lengths = torch.tensor([5, 0, 2, 3])
    got = _run_functional(kind, module, x, state, lengths=lengths)
    w_ih, w_hh, b_ih, b_hh = _weights(module)
    if kind == "irnn":
        want = fused_rnn.irnn(x, state[0], w_ih, w_hh, b_ih, b_hh, backend="torch", lengths=lengths)
    else:
        y, (h, c) = fused_rnn.lstm(x, tuple(state), w_ih, w_hh, b_ih, b_hh, backend="torch", lengths=lengths)
        want = (y, h, c)
    for a, b in zip(got, want):
        # float64, the same products in another order
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert not got[0][:, 1].any() and torch.equal(got[1][1], state[0][1])
    # and the packed path is nn's own: against the module on the same PackedSequence
    rows = torch.tensor([0, 2, 3])
    packed = pack_padded_sequence(x[:, rows], lengths[rows], enforce_sorted=False)
    hx = state[0][rows][None] if kind == "irnn" else tuple(s[rows][None] for s in state)
    y, _ = module(packed, hx)
    padded, _ = pad_packed_sequence(y, total_length=5)
    assert torch.equal(got[0][:, rows], padded)


def test_empty_sequence_returns_the_initial_state():
    module = _layer("lstm")
    state = (torch.randn(2, 5, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64))
    y, h, c = _run_functional("lstm", module, torch.empty(0, 2, 3, dtype=torch.float64), state)
    assert y.shape == (0, 2, 5) and torch.equal(h, state[0]) and torch.equal(c, state[1])


@pytest.mark.parametrize("kind", ["irnn", "lstm"])
def test_cells_match_torch_nn_exactly(kind):
    torch.manual_seed(0)
    cell = nn.RNNCell(3, 5, nonlinearity="relu", dtype=torch.float64) if kind == "irnn" else \
        nn.LSTMCell(3, 5, dtype=torch.float64)
    x, h = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    weights = (cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
    if kind == "irnn":
        assert torch.equal(fused_rnn.irnn_cell(x, h, *weights, backend="nn"), cell(x, h))
    else:
        c = torch.randn(4, 5, dtype=torch.float64)
        for a, b in zip(fused_rnn.lstm_cell(x, (h, c), *weights, backend="nn"), cell(x, (h, c))):
            assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["irnn", "lstm"])
def test_the_gpu_wrapper_gives_first_and_second_derivatives(kind, monkeypatch):
    """On CUDA tensors the backend records ATen's graph inside an autograd Function, so
    that a create_graph backward (which cuDNN's backward cannot do) recomputes through
    the torch loop. The wrapper is device-independent: run it here on the CPU."""
    monkeypatch.setattr(nn_backend, "_second_order_safe", lambda x, *tensors: nn_backend._training(x, *tensors))
    module = _layer(kind)
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    state = [torch.randn(2, 5, dtype=torch.float64, requires_grad=True) for _ in range(1 if kind == "irnn" else 2)]
    params = [p for p in module.parameters()]

    def layer(x, *rest):
        states, weights = rest[:len(state)], rest[len(state):]
        w_ih, w_hh, b_ih, b_hh = weights
        if kind == "irnn":
            return fused_rnn.irnn(x, states[0], w_ih, w_hh, b_ih, b_hh, backend="nn",
                                  lengths=torch.tensor([4, 3]))
        y, (h, c) = fused_rnn.lstm(x, tuple(states), w_ih, w_hh, b_ih, b_hh, backend="nn",
                                   lengths=torch.tensor([4, 3]))
        return y, h, c

    inputs = (x, *state, *params)
    assert torch.autograd.gradcheck(layer, inputs)
    assert torch.autograd.gradgradcheck(layer, inputs)


@pytest.mark.parametrize("kind", ["irnn", "lstm"])
def test_a_module_on_nn_runs_the_whole_stack_in_one_call_as_torch_nn(kind, monkeypatch):
    """A module call that every layer would send to the nn backend runs the whole stack
    in one call of torch.nn's kernels (as torch.nn's module does, without the Python of
    a call per layer): bitwise torch.nn's outputs and gradients, between-layer dropout
    (same seed) included; options only ours have take the per-layer path."""
    calls = []
    real = nn_backend.run_stack
    monkeypatch.setattr(nn_backend, "run_stack", lambda *a, **k: calls.append(1) or real(*a, **k))
    kwargs = dict(num_layers=2, dropout=0.3, bidirectional=True, dtype=torch.float64)
    if kind == "irnn":
        ours, theirs = fused_rnn.IRNN(3, 5, backend="nn", **kwargs), nn.RNN(3, 5, nonlinearity="relu", **kwargs)
    else:
        ours, theirs = fused_rnn.LSTM(3, 5, backend="nn", proj_size=2, **kwargs), nn.LSTM(3, 5, proj_size=2, **kwargs)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(7, 4, 3, dtype=torch.float64, requires_grad=True)
    results = []
    for module in (ours, theirs):
        torch.manual_seed(1)
        y, state = module(x)
        states = state if isinstance(state, tuple) else (state,)
        grads = torch.autograd.grad(y.sum() + sum(s.sum() for s in states), [x, *module.parameters()])
        results.append((y, *states, *grads))
    assert calls == [1]
    for a, b in zip(*results):
        assert torch.equal(a, b)
    with torch.no_grad():
        ours(x, lengths=torch.tensor([7, 3, 0, 1]))
        ours.recurrent_dropout, ours.backend = 0.5, "auto"  # a mask: a fused backend, layer by layer
        ours(x)
    assert calls == [1]
