"""fused_rnn.IRNN / LSTM / IRNNCell / LSTMCell against torch.nn.RNN(relu) / LSTM / cells.

Each comparison loads one state_dict into both modules and checks outputs, final
states, and the gradients of every parameter, of the input and of the initial states.

Tolerances:
- float64: rtol 1e-10, atol 1e-12. Values and cotangents are O(1); float64 eps is
  2.2e-16, and the longest chain here (T=63 steps, reductions over <= 2*37 terms,
  then sums over T*B for weight gradients) accumulates well under 1e-13 of rounding
  difference between summation orders, so 1e-10 leaves a 1000x margin while any
  formula error shows up at 1e-3 or larger.
- float32: rtol 1e-5, atol 1e-5. eps is 1.2e-7; the same reductions over ~100 terms
  give up to ~1e-6 relative difference, and cancellation in gradient sums makes the
  absolute error of O(1) quantities the relevant bound near zero.
"""

import pytest
import torch
from torch import nn

import fused_rnn
from fused_rnn.dispatch import select_backend

BACKENDS = fused_rnn.available_backends("cpu")
TOLERANCES = {
    torch.float64: {"rtol": 1e-10, "atol": 1e-12},
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
}

# name -> options; defaults T=5, B=3, I=4, H=6, one layer, one direction
LAYER_CASES = {
    "base": {},
    "two_layers": {"num_layers": 2},
    "bidirectional": {"bidirectional": True},
    "two_layers_bidirectional": {"num_layers": 2, "bidirectional": True},
    "batch_first": {"num_layers": 2, "batch_first": True},
    "batch_first_bidirectional": {"batch_first": True, "bidirectional": True},
    "no_bias": {"num_layers": 2, "bias": False},
    "no_bias_bidirectional": {"bias": False, "bidirectional": True},
    "one_step": {"T": 1, "num_layers": 2},
    "batch_of_one": {"B": 1, "bidirectional": True},
    "odd_sizes": {"T": 63, "H": 37, "I": 5, "B": 2},
}


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    # Tiny tensors gain nothing from intra-op threads, and on a loaded 2-core machine
    # OpenMP barriers made one nn.LSTM forward+backward (T=63, H=37) take 2.5 s
    # instead of 0.01 s with a single thread.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _cotangent(shape, dtype, seed):
    # the same fixed random weights for the reference and for fused_rnn
    return torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def _make_pair(kind, backend, input_size, hidden_size, dtype=torch.float64, **options):
    """(fused_rnn module, torch.nn module) holding the same weights (nn's default init)."""
    torch.manual_seed(0)
    if kind == "irnn":
        reference = nn.RNN(input_size, hidden_size, nonlinearity="relu", dtype=dtype, **options)
        ours = fused_rnn.IRNN(input_size, hidden_size, backend=backend, dtype=dtype, **options)
    else:
        reference = nn.LSTM(input_size, hidden_size, dtype=dtype, **options)
        ours = fused_rnn.LSTM(input_size, hidden_size, backend=backend, dtype=dtype, **options)
    ours.load_state_dict(reference.state_dict())
    return ours, reference


def _run(module, x, hx):
    """Forward, then backward of a fixed random projection of output and final states.

    Returns {name: tensor} of the outputs and of every gradient.
    """
    x = x.detach().clone().requires_grad_()
    initial = None if hx is None else tuple(s.detach().clone().requires_grad_() for s in hx)
    # a torch.compile'd module wraps the original one
    original = getattr(module, "_orig_mod", module)
    original.zero_grad(set_to_none=True)
    if initial is None:
        output, final = module(x)
    elif isinstance(original, (nn.LSTM, fused_rnn.LSTM)):
        output, final = module(x, initial)
    else:
        output, final = module(x, initial[0])
    finals = final if isinstance(final, tuple) else (final,)
    loss = (output * _cotangent(output.shape, output.dtype, 1)).sum()
    for index, state in enumerate(finals):
        loss = loss + (state * _cotangent(state.shape, state.dtype, 2 + index)).sum()
    loss.backward()
    results = {"output": output.detach(), "grad_input": x.grad}
    for index, state in enumerate(finals):
        results[f"final_state_{index}"] = state.detach()
    for index, state in enumerate(initial or ()):
        results[f"grad_initial_state_{index}"] = state.grad
    for name, parameter in original.named_parameters():
        results[f"grad_{name}"] = parameter.grad
    return results


def _run_cell(module, x, hx):
    """Like _run for a cell, whose output is h' (IRNN) or (h', c') (LSTM)."""
    x = x.detach().clone().requires_grad_()
    initial = None if hx is None else tuple(s.detach().clone().requires_grad_() for s in hx)
    module.zero_grad(set_to_none=True)
    if isinstance(module, (nn.LSTMCell, fused_rnn.LSTMCell)):
        outputs = module(x, initial)
    else:
        outputs = (module(x, None if initial is None else initial[0]),)
    loss = sum((out * _cotangent(out.shape, out.dtype, 1 + i)).sum() for i, out in enumerate(outputs))
    loss.backward()
    results = {f"output_{i}": out.detach() for i, out in enumerate(outputs)}
    results["grad_input"] = x.grad
    for index, state in enumerate(initial or ()):
        results[f"grad_initial_state_{index}"] = state.grad
    for name, parameter in module.named_parameters():
        results[f"grad_{name}"] = parameter.grad
    return results


def _assert_same(ours, reference, dtype):
    assert ours.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(
            ours[name], reference[name], **TOLERANCES[dtype], msg=lambda message, name=name: f"{name}: {message}"
        )


def _inputs(kind, T, B, I, H, num_layers, bidirectional, batch_first, with_hx, dtype, batched=True):
    generator = torch.Generator().manual_seed(7)
    shape = ((B, T, I) if batch_first else (T, B, I)) if batched else (T, I)
    x = torch.randn(shape, dtype=dtype, generator=generator)
    if not with_hx:
        return x, None
    state_shape = (num_layers * (2 if bidirectional else 1),) + ((B, H) if batched else (H,))
    count = 2 if kind == "lstm" else 1
    return x, tuple(torch.randn(state_shape, dtype=dtype, generator=generator) for _ in range(count))


def _compare_layer(kind, backend, dtype=torch.float64, with_hx=True, batched=True, train=True, **case):
    sizes = {"T": 5, "B": 3, "I": 4, "H": 6}
    sizes.update({k: case.pop(k) for k in list(case) if k in sizes})
    ours, reference = _make_pair(kind, backend, sizes["I"], sizes["H"], dtype=dtype, **case)
    ours.train(train)
    reference.train(train)
    x, hx = _inputs(kind, **sizes, num_layers=case.get("num_layers", 1),
                    bidirectional=case.get("bidirectional", False),
                    batch_first=case.get("batch_first", False), with_hx=with_hx, dtype=dtype, batched=batched)
    _assert_same(_run(ours, x, hx), _run(reference, x, hx), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_hx", [True, False], ids=["hx", "no_hx"])
@pytest.mark.parametrize("case", list(LAYER_CASES))
@pytest.mark.parametrize("kind", ["irnn", "lstm"])
def test_layer_matches_torch_nn(kind, case, with_hx, backend):
    _compare_layer(kind, backend, with_hx=with_hx, **LAYER_CASES[case])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("with_hx", [True, False], ids=["hx", "no_hx"])
@pytest.mark.parametrize("kind", ["irnn", "lstm"])
def test_layer_unbatched_matches_torch_nn(kind, with_hx, batch_first, backend):
    _compare_layer(kind, backend, with_hx=with_hx, batched=False, num_layers=2, bidirectional=True,
                   batch_first=batch_first)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["irnn", "lstm"])
def test_layer_float32_matches_torch_nn(kind, backend):
    _compare_layer(kind, backend, dtype=torch.float32, num_layers=2, bidirectional=True, T=9, H=16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_irnn_own_init_loads_into_torch_nn(backend):
    # the other direction: fused_rnn's identity init, loaded into nn.RNN
    ours = fused_rnn.IRNN(4, 6, num_layers=2, bidirectional=True, backend=backend, ih_std=0.5,
                          dtype=torch.float64)
    reference = nn.RNN(4, 6, num_layers=2, bidirectional=True, nonlinearity="relu", dtype=torch.float64)
    reference.load_state_dict(ours.state_dict())
    x, hx = _inputs("irnn", 5, 3, 4, 6, 2, True, False, True, torch.float64)
    _assert_same(_run(ours, x, hx), _run(reference, x, hx), torch.float64)


@pytest.mark.parametrize("kind", ["irnn", "lstm"])
@pytest.mark.parametrize("options", [{}, {"num_layers": 2, "bidirectional": True, "bias": False}])
def test_state_dict_keys_match_torch_nn(kind, options):
    ours, reference = _make_pair(kind, "auto", 4, 6, **options)
    assert list(ours.state_dict()) == list(reference.state_dict())
    assert [[tuple(p.shape) for p in w] for w in ours.all_weights] == \
        [[tuple(p.shape) for p in w] for w in reference.all_weights]


# dropout


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["irnn", "lstm"])
def test_dropout_eval_mode_matches_torch_nn(kind, backend):
    _compare_layer(kind, backend, train=False, num_layers=3, dropout=0.5, bidirectional=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["irnn", "lstm"])
def test_dropout_zero_train_mode_matches_torch_nn(kind, backend):
    _compare_layer(kind, backend, train=True, num_layers=2, dropout=0.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["irnn", "lstm"])
def test_dropout_train_mode_drops_between_layers_only(kind, backend):
    ours, _ = _make_pair(kind, backend, 4, 6, num_layers=2, dropout=0.5)
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    ours.eval()
    eval_output, eval_state = ours(x)
    ours.train()
    torch.manual_seed(123)
    train_output, train_state = ours(x)
    assert not torch.allclose(train_output, eval_output)
    # layer 0's final state is computed before any dropout
    eval_h = eval_state[0] if kind == "lstm" else eval_state
    train_h = train_state[0] if kind == "lstm" else train_state
    torch.testing.assert_close(train_h[0], eval_h[0], rtol=0, atol=0)
    # the same seed draws the same mask
    torch.manual_seed(123)
    torch.testing.assert_close(ours(x)[0], train_output, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["irnn", "lstm"])
def test_dropout_with_one_layer_warns_and_is_not_applied(kind):
    with pytest.warns(UserWarning, match="dropout"):
        ours, _ = _make_pair(kind, "auto", 4, 6, dropout=0.5)
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    train_output = ours.train()(x)[0]
    torch.testing.assert_close(train_output, ours.eval()(x)[0], rtol=0, atol=0)


# initialisation


def test_irnn_default_init_is_identity_and_small_normal():
    rnn = fused_rnn.IRNN(200, 300, num_layers=2, bidirectional=True)
    for layer in range(2):
        for suffix in ("", "_reverse"):
            weight_hh = getattr(rnn, f"weight_hh_l{layer}{suffix}")
            assert torch.equal(weight_hh, torch.eye(300))
            assert torch.count_nonzero(getattr(rnn, f"bias_ih_l{layer}{suffix}")) == 0
            assert torch.count_nonzero(getattr(rnn, f"bias_hh_l{layer}{suffix}")) == 0
    weight_ih = rnn.weight_ih_l0.detach()
    # 60000 samples: the std estimate is within ~0.3% (1 sigma), the mean within 4e-6
    assert abs(weight_ih.std().item() - 0.001) < 5e-5
    assert abs(weight_ih.mean().item()) < 2e-5


def test_irnn_hh_scale():
    rnn = fused_rnn.IRNN(3, 5, hh_scale=0.01, dtype=torch.float64)
    assert torch.equal(rnn.weight_hh_l0, 0.01 * torch.eye(5, dtype=torch.float64))
    cell = fused_rnn.IRNNCell(3, 5, hh_scale=0.01, dtype=torch.float64)
    assert torch.equal(cell.weight_hh, 0.01 * torch.eye(5, dtype=torch.float64))


def test_irnn_ih_std():
    rnn = fused_rnn.IRNN(200, 300, ih_std=0.1)
    assert abs(rnn.weight_ih_l0.std().item() - 0.1) < 5e-3


@pytest.mark.parametrize("make", [
    lambda: fused_rnn.IRNN(20, 30, hh_init="pytorch", ih_init="pytorch"),
    lambda: fused_rnn.IRNNCell(20, 30, hh_init="pytorch", ih_init="pytorch"),
    lambda: fused_rnn.LSTM(20, 30, num_layers=2),
    lambda: fused_rnn.LSTMCell(20, 30),
], ids=["irnn", "irnn_cell", "lstm", "lstm_cell"])
def test_pytorch_init_is_uniform_within_bound(make):
    module = make()
    bound = 1 / 30 ** 0.5
    for name, parameter in module.named_parameters():
        assert parameter.abs().max() <= bound, name
        # uniform(-b, b) has std b/sqrt(3); loose enough for the 30-element biases
        assert 0.4 * bound < parameter.std() < 0.8 * bound, name


def test_irnn_mixed_init_biases_follow_their_weight():
    rnn = fused_rnn.IRNN(20, 30, hh_init="identity", ih_init="pytorch")
    assert torch.equal(rnn.weight_hh_l0, torch.eye(30))
    assert torch.count_nonzero(rnn.bias_hh_l0) == 0
    assert torch.count_nonzero(rnn.bias_ih_l0) == 30


def test_irnn_cell_default_init():
    cell = fused_rnn.IRNNCell(200, 300)
    assert torch.equal(cell.weight_hh, torch.eye(300))
    assert torch.count_nonzero(cell.bias_ih) == 0 and torch.count_nonzero(cell.bias_hh) == 0
    assert abs(cell.weight_ih.std().item() - 0.001) < 5e-5


def test_reset_parameters_restores_init():
    rnn = fused_rnn.IRNN(3, 5)
    with torch.no_grad():
        rnn.weight_hh_l0.fill_(2.0)
    rnn.reset_parameters()
    assert torch.equal(rnn.weight_hh_l0, torch.eye(5))


def test_init_follows_device_and_dtype():
    rnn = fused_rnn.IRNN(3, 5, device="cpu", dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in rnn.parameters())
    assert torch.equal(rnn.weight_hh_l0, torch.eye(5, dtype=torch.float64))


# cells


CELL_CASES = {
    "batched": {"batched": True, "bias": True},
    "no_bias": {"batched": True, "bias": False},
    "unbatched": {"batched": False, "bias": True},
    "batch_of_one_odd_hidden": {"batched": True, "bias": True, "B": 1, "H": 37},
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_hx", [True, False], ids=["hx", "no_hx"])
@pytest.mark.parametrize("case", list(CELL_CASES))
@pytest.mark.parametrize("kind", ["irnn", "lstm"])
def test_cell_matches_torch_nn(kind, case, with_hx, backend):
    options = dict(CELL_CASES[case])
    batched, bias = options.pop("batched"), options.pop("bias")
    B, I, H = options.get("B", 3), 4, options.get("H", 6)
    dtype = torch.float64
    torch.manual_seed(0)
    if kind == "irnn":
        reference = nn.RNNCell(I, H, bias=bias, nonlinearity="relu", dtype=dtype)
        ours = fused_rnn.IRNNCell(I, H, bias=bias, backend=backend, dtype=dtype)
    else:
        reference = nn.LSTMCell(I, H, bias=bias, dtype=dtype)
        ours = fused_rnn.LSTMCell(I, H, bias=bias, backend=backend, dtype=dtype)
    ours.load_state_dict(reference.state_dict())
    assert list(ours.state_dict()) == list(reference.state_dict())
    generator = torch.Generator().manual_seed(7)
    x = torch.randn((B, I) if batched else (I,), dtype=dtype, generator=generator)
    hx = None
    if with_hx:
        state_shape = (B, H) if batched else (H,)
        hx = tuple(torch.randn(state_shape, dtype=dtype, generator=generator)
                   for _ in range(2 if kind == "lstm" else 1))
    _assert_same(_run_cell(ours, x, hx), _run_cell(reference, x, hx), dtype)


def test_cell_without_bias_has_none_biases():
    cell = fused_rnn.IRNNCell(3, 4, bias=False)
    assert cell.bias_ih is None and cell.bias_hh is None
    assert list(cell.state_dict()) == ["weight_ih", "weight_hh"]


# backend attribute, extra_repr


@pytest.mark.parametrize("backend", BACKENDS + ["auto"])
@pytest.mark.parametrize("kind", ["irnn", "lstm"])
def test_final_state_is_never_the_initial_state_itself(kind, backend):
    """Writing into h_n never changes the caller's hx (T = 0 and every length 0 return
    the initial state's values), and h_n.detach_() works, as on nn.LSTM's (truncated
    backpropagation through time calls it; a view would refuse it)."""
    module = (fused_rnn.IRNN if kind == "irnn" else fused_rnn.LSTM)(3, 4, backend=backend, dtype=torch.float64)
    loop = (fused_rnn.IRNN if kind == "irnn" else fused_rnn.LSTM)(3, 4, backend="torch", dtype=torch.float64)
    loop.load_state_dict(module.state_dict())
    for steps, lengths in ((0, None), (1, None), (2, None), (2, torch.tensor([0, 0])), (2, torch.tensor([2, 0]))):
        hx = tuple(torch.randn(1, 2, 4, dtype=torch.float64) for _ in range(1 if kind == "irnn" else 2))
        kept = tuple(h.clone() for h in hx)
        x = torch.randn(steps, 2, 3, dtype=torch.float64)
        with torch.no_grad():
            y, finals = module(x, hx[0] if kind == "irnn" else hx, lengths=lengths)
            torch.testing.assert_close((y, finals), loop(x, hx[0] if kind == "irnn" else hx, lengths=lengths),
                                       **TOLERANCES[torch.float64])
        for final in (finals,) if kind == "irnn" else finals:
            final.add_(1.0)
            final.detach_()
        for h, before in zip(hx, kept):
            assert torch.equal(h, before), (steps, lengths)


@pytest.mark.parametrize("batch_first", [False, True], ids=["TBI", "BTI"])
@pytest.mark.parametrize("kind", ["irnn", "lstm"])
def test_the_output_can_be_changed_in_place(kind, batch_first, cpu_backend):
    """While autograd records (parameters that require grad, no torch.no_grad), the
    output may be changed in place, as nn.RNN's and nn.LSTM's: the CPU IRNN returned its
    projection buffer as a view, which autograd refused (y.mul_, y += x, an in-place
    dropout) even with no backward to follow. (A backward through it afterwards is
    autograd's business: the fused kernels saved y, and autograd says it was changed,
    as for torch.relu's output.)"""
    torch.manual_seed(0)
    module = (fused_rnn.IRNN if kind == "irnn" else fused_rnn.LSTM)(3, 4, batch_first=batch_first,
                                                                    backend=cpu_backend)
    x = torch.randn(5, 2, 3)
    y, _ = module(x)
    assert y.requires_grad
    want = y.detach() * 0.5
    y.mul_(0.5)  # raised "Output 0 of GeneratedBackwardFor_... is a view and is being modified inplace"
    torch.testing.assert_close(y.detach(), want, rtol=0, atol=0)


def test_backend_can_be_changed_after_construction():
    rnn = fused_rnn.LSTM(4, 6, num_layers=2, bidirectional=True, dtype=torch.float64)
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    results = {}
    for backend in BACKENDS + ["auto"]:
        rnn.backend = backend
        results[backend] = rnn(x)[0]
    for output in results.values():
        torch.testing.assert_close(output, results["auto"], **TOLERANCES[torch.float64])


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="backend"):
        fused_rnn.IRNN(3, 4, backend="cuda-magic")
    with pytest.raises(ValueError, match="backend"):
        fused_rnn.LSTMCell(3, 4, backend="cuda-magic")
    rnn = fused_rnn.IRNN(3, 4)
    rnn.backend = "cuda-magic"
    with pytest.raises(ValueError, match="backend"):
        rnn(torch.randn(2, 1, 3))


def test_extra_repr():
    resolved = select_backend("cpu", torch.float32, "auto").name
    assert repr(fused_rnn.IRNN(42, 256, num_layers=2, batch_first=True)) == \
        f"IRNN(42, 256, num_layers=2, batch_first=True, backend=auto ({resolved} on cpu))"
    assert repr(fused_rnn.LSTM(3, 4, bidirectional=True, bias=False, backend="torch")) == \
        "LSTM(3, 4, bias=False, bidirectional=True, backend=torch)"
    assert repr(fused_rnn.IRNN(3, 4, 2, dropout=0.25, hh_scale=0.01, ih_std=0.01, backend="torch")) == \
        "IRNN(3, 4, num_layers=2, dropout=0.25, hh_scale=0.01, ih_std=0.01, backend=torch)"
    assert repr(fused_rnn.IRNN(3, 4, hh_init="pytorch", ih_init="pytorch", backend="torch")) == \
        "IRNN(3, 4, hh_init=pytorch, ih_init=pytorch, backend=torch)"
    assert repr(fused_rnn.IRNNCell(3, 4, hh_scale=0.01)) == \
        f"IRNNCell(3, 4, hh_scale=0.01, backend=auto ({resolved} on cpu))"
    assert repr(fused_rnn.LSTMCell(3, 4, bias=False, backend="torch")) == \
        "LSTMCell(3, 4, bias=False, backend=torch)"


def test_extra_repr_resolves_auto_for_the_parameter_dtype():
    resolved = select_backend("cpu", torch.bfloat16, "auto").name
    assert f"backend=auto ({resolved} on cpu)" in repr(fused_rnn.LSTM(3, 4, dtype=torch.bfloat16))


# bad arguments


@pytest.mark.parametrize("kind", ["irnn", "lstm"])
def test_wrong_input_size_raises(kind):
    rnn = fused_rnn.IRNN(4, 6, batch_first=True) if kind == "irnn" else fused_rnn.LSTM(4, 6, batch_first=True)
    with pytest.raises(ValueError, match=r"input must have input_size=4 .*\[B, T, input_size\]"):
        rnn(torch.randn(3, 5, 7))
    with pytest.raises(ValueError, match=r"input_size=4 .*\[T, input_size\]"):
        rnn(torch.randn(5, 7))
    with pytest.raises(ValueError, match="input must be 3-D"):
        rnn(torch.randn(2, 3, 5, 4))
    # a PackedSequence's data is checked as the input too (the kernel's check named w_ih)
    packed = nn.utils.rnn.pack_sequence([torch.randn(3, 7), torch.randn(2, 7)])
    with pytest.raises(ValueError, match=r"PackedSequence .*input_size=4\], got \(5, 7\)"):
        rnn(packed)
    packed = nn.utils.rnn.pack_sequence([torch.randn(3, 2, 4), torch.randn(2, 2, 4)])
    with pytest.raises(ValueError, match=r"PackedSequence .*got \(5, 2, 4\)"):
        rnn(packed)


def test_wrong_hx_shape_raises():
    rnn = fused_rnn.IRNN(4, 6, num_layers=2, bidirectional=True)
    x = torch.randn(5, 3, 4)
    with pytest.raises(ValueError, match=r"hx must have shape .*\[4, 3, 6\]"):
        rnn(x, torch.zeros(2, 3, 6))
    with pytest.raises(ValueError, match=r"hx must have shape .*\[4, 3, 6\]"):
        rnn(x, torch.zeros(4, 6))
    with pytest.raises(ValueError, match=r"hx must have shape .*\[4, 6\] for unbatched"):
        rnn(x[:, 0], torch.zeros(4, 1, 6))


def test_a_state_in_another_dtype_is_named_as_the_module_s_argument():
    """hx in another dtype than the input: the error names hx (the layer call named its
    own h0 or c0, which a module's caller never wrote)."""
    x = torch.randn(5, 3, 4)
    with pytest.raises(TypeError, match=r"hx must have the input's dtype torch.float32, got torch.float64"):
        fused_rnn.IRNN(4, 6)(x, torch.zeros(1, 3, 6, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"hx\[1\] \(c_0\) must have the input's dtype"):
        fused_rnn.LSTM(4, 6)(x, (torch.zeros(1, 3, 6), torch.zeros(1, 3, 6, dtype=torch.float64)))
    with pytest.raises(TypeError, match=r"hx\[0\] \(h\) must have the input's dtype"):
        fused_rnn.LSTMCell(4, 6)(x[0], (torch.zeros(3, 6, dtype=torch.bfloat16), torch.zeros(3, 6)))


def test_wrong_lstm_state_raises():
    rnn = fused_rnn.LSTM(4, 6)
    x = torch.randn(5, 3, 4)
    good = torch.zeros(1, 3, 6)
    with pytest.raises(ValueError, match=r"hx\[0\] \(h_0\) must have shape .*\[1, 3, 6\]"):
        rnn(x, (torch.zeros(1, 2, 6), good))
    with pytest.raises(ValueError, match=r"hx\[1\] \(c_0\) must have shape .*\[1, 3, 6\]"):
        rnn(x, (good, torch.zeros(1, 3, 5)))
    with pytest.raises(TypeError, match="hx must be a tuple"):
        rnn(x, good)


def test_wrong_cell_arguments_raise():
    cell = fused_rnn.IRNNCell(4, 6)
    with pytest.raises(ValueError, match="input_size=4"):
        cell(torch.randn(3, 5))
    with pytest.raises(ValueError, match=r"hx must have shape \[B, hidden_size\] = \[3, 6\]"):
        cell(torch.randn(3, 4), torch.zeros(3, 5))
    with pytest.raises(ValueError, match=r"hx must have shape \[hidden_size\]"):
        cell(torch.randn(4), torch.zeros(1, 6))
    lstm_cell = fused_rnn.LSTMCell(4, 6)
    with pytest.raises(ValueError, match=r"hx\[1\] \(c\) must have shape"):
        lstm_cell(torch.randn(3, 4), (torch.zeros(3, 6), torch.zeros(2, 6)))


def test_unsupported_options_raise():
    with pytest.raises(ValueError, match="proj_size"):
        fused_rnn.LSTM(4, 6, proj_size=6)
    with pytest.raises(ValueError, match="nonlinearity"):
        fused_rnn.IRNN(4, 6, nonlinearity="tanh")
    with pytest.raises(ValueError, match="hh_init"):
        fused_rnn.IRNN(4, 6, hh_init="orthogonal")
    with pytest.raises(ValueError, match="dropout"):
        fused_rnn.IRNN(4, 6, num_layers=2, dropout=1.5)
    with pytest.raises(ValueError, match="hidden_size"):
        fused_rnn.LSTM(4, 0)
    # PackedSequence input is supported (tests/test_module_options.py)


def test_irnn_accepts_relu_nonlinearity_keyword():
    assert fused_rnn.IRNN(4, 6, nonlinearity="relu").nonlinearity == "relu"


# torch.compile


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["irnn", "lstm"])
def test_module_compiles_fullgraph(kind, backend):
    torch._dynamo.reset()
    ours, _ = _make_pair(kind, backend, 4, 6, num_layers=2, bidirectional=True, batch_first=True)
    x = torch.randn(3, 4, 4, dtype=torch.float64)
    # aot_eager traces forward and backward (fake tensors, autograd) without codegen, to stay fast
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    expected = _run(ours, x, None)
    _assert_same(_run(compiled, x, None), expected, torch.float64)


@pytest.mark.parametrize("form", ["lengths", "packed"])
@pytest.mark.parametrize("kind", ["irnn", "lstm"])
def test_module_with_lengths_compiles_fullgraph(kind, form):
    """torch.compile(fullgraph=True) through sequences of different lengths, given as
    lengths= or as a PackedSequence: no data-dependent Python branch (the lengths'
    range is checked inside the graph, torch.nn's packing is not dispatched to, and
    the PackedSequence is unpacked and packed with shape-static tensor operations).
    Outputs, final states and the weights' gradients equal eager mode's (float64; eager
    may run torch.nn's kernels where the trace runs a fused one: 1e-12)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    module = (fused_rnn.IRNN if kind == "irnn" else fused_rnn.LSTM)(4, 6, num_layers=2, bidirectional=True,
                                                                    dtype=torch.float64)
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    lengths = torch.tensor([5, 2, 4])

    packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)

    def run(x, lengths, packed):
        if form == "packed":
            y, state = module(packed)
            y = y.data
        else:
            y, state = module(x, lengths=lengths)
        h = state if kind == "irnn" else state[0]
        return y, h

    outputs = {}
    for mode, fn in (("eager", run), ("compiled", torch.compile(run, fullgraph=True, backend="aot_eager"))):
        module.zero_grad()
        y, h = fn(x, lengths, packed)
        (y.square().sum() + h.sum()).backward()
        outputs[mode] = (y.detach(), h.detach(), [p.grad.clone() for p in module.parameters()])
    (y_e, h_e, g_e), (y_c, h_c, g_c) = outputs["eager"], outputs["compiled"]
    torch.testing.assert_close(y_c, y_e, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h_c, h_e, rtol=1e-12, atol=1e-12)
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_compiled_lengths_out_of_range_fail_inside_the_graph():
    """Under torch.compile the range of lengths is an assertion in the graph."""
    torch._dynamo.reset()
    module = fused_rnn.IRNN(4, 6, dtype=torch.float64)
    compiled = torch.compile(lambda x, l: module(x, lengths=l)[0], fullgraph=True, backend="aot_eager")
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    compiled(x, torch.tensor([5, 2, 4]))
    with pytest.raises(RuntimeError, match=r"lengths must lie in \[0, T\] = \[0, 5\]"):
        compiled(x, torch.tensor([5, 6, 4]))
