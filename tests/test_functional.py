"""fused_rnn.irnn / lstm / irnn_cell / lstm_cell: gradcheck, edge cases, bad input, dispatch."""

import math

import pytest
import torch
from torch import nn

import fused_rnn
from helpers import options_for


def irnn_args(steps=4, batch=3, inputs=2, hidden=5, dtype=torch.float64, grad=True):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(steps, batch, inputs, dtype=dtype, generator=g)
    h0 = torch.rand(batch, hidden, dtype=dtype, generator=g)
    w_ih = torch.randn(hidden, inputs, dtype=dtype, generator=g)
    w_hh = torch.eye(hidden, dtype=dtype) + 0.2 * torch.randn(hidden, hidden, dtype=dtype, generator=g)
    b_ih = 0.3 * torch.randn(hidden, dtype=dtype, generator=g)
    b_hh = 0.3 * torch.randn(hidden, dtype=dtype, generator=g)
    return [t.requires_grad_(grad) for t in (x, h0, w_ih, w_hh, b_ih, b_hh)]


def lstm_args(steps=4, batch=3, inputs=2, hidden=5, dtype=torch.float64, grad=True):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(steps, batch, inputs, dtype=dtype, generator=g)
    h0 = torch.randn(batch, hidden, dtype=dtype, generator=g)
    c0 = torch.randn(batch, hidden, dtype=dtype, generator=g)
    w_ih = torch.randn(4 * hidden, inputs, dtype=dtype, generator=g) / 2
    w_hh = torch.randn(4 * hidden, hidden, dtype=dtype, generator=g) / 2
    b_ih = torch.randn(4 * hidden, dtype=dtype, generator=g) / 2
    b_hh = torch.randn(4 * hidden, dtype=dtype, generator=g) / 2
    return [t.requires_grad_(grad) for t in (x, h0, c0, w_ih, w_hh, b_ih, b_hh)]


def lstm_flat(x, h0, c0, w_ih, w_hh, b_ih, b_hh, backend):
    y, (h, c) = fused_rnn.lstm(x, (h0, c0), w_ih, w_hh, b_ih, b_hh, backend=backend)
    return y, h, c


def torch_nn_run(cell, *args):
    """The layer through the ATen ops nn.RNN(relu) / nn.LSTM run (torch._VF), on these
    very tensors so that autograd reaches them: an oracle independent of every fused_rnn
    backend, the "torch" loop included. Returns (y, h_n) or (y, h_n, c_n)."""
    if cell == "irnn":
        x, h0, *weights = args
        y, h = torch._VF.rnn_relu(x, h0[None], weights, True, 1, 0.0, False, False, False)
        return y, h[0]
    x, h0, c0, *weights = args
    y, h, c = torch._VF.lstm(x, (h0[None], c0[None]), weights, True, 1, 0.0, False, False, False)
    return y, h[0], c[0]


# ---- float64 gradcheck on tiny shapes, every backend ----

def test_irnn_gradcheck(cpu_backend):
    assert torch.autograd.gradcheck(lambda *a: fused_rnn.irnn(*a, backend=cpu_backend), irnn_args())


def test_lstm_gradcheck(cpu_backend):
    assert torch.autograd.gradcheck(lambda *a: lstm_flat(*a, backend=cpu_backend), lstm_args())


def test_irnn_cell_gradcheck(cpu_backend):
    x, h0, *weights = irnn_args()
    assert torch.autograd.gradcheck(lambda *a: fused_rnn.irnn_cell(*a, backend=cpu_backend), (x[0], h0, *weights))


def test_lstm_cell_gradcheck(cpu_backend):
    x, h0, c0, *weights = lstm_args()

    def step(x, h, c, *w):
        return fused_rnn.lstm_cell(x, (h, c), *w, backend=cpu_backend)

    assert torch.autograd.gradcheck(step, (x[0], h0, c0, *weights))


def test_gradcheck_without_bias_and_state(cpu_backend):
    x, _, w_ih, w_hh, _, _ = irnn_args()
    assert torch.autograd.gradcheck(lambda *a: fused_rnn.irnn(a[0], None, *a[1:], backend=cpu_backend),
                                    (x, w_ih, w_hh))
    x, _, _, w_ih, w_hh, _, _ = lstm_args()
    assert torch.autograd.gradcheck(
        lambda x, wi, wh: fused_rnn.lstm(x, None, wi, wh, backend=cpu_backend)[0], (x, w_ih, w_hh))


def test_bias_grads_are_separate_tensors(cpu_backend):
    """b_ih.grad and b_hh.grad are equal but never share memory: clipping one in place
    must not scale the other."""
    args = irnn_args()
    fused_rnn.irnn(*args, backend=cpu_backend)[0].sum().backward()
    b_ih, b_hh = args[4], args[5]
    torch.testing.assert_close(b_ih.grad, b_hh.grad)
    assert b_ih.grad.data_ptr() != b_hh.grad.data_ptr()


# ---- empty inputs: T = 0 gives empty y and the initial state; B = 0 empty outputs ----

def test_zero_steps_returns_initial_state(cpu_backend):
    x, h0, *w = irnn_args(steps=0)
    y, h_n = fused_rnn.irnn(x, h0, *w, backend=cpu_backend)
    assert y.shape == (0, 3, 5)
    torch.testing.assert_close(h_n, h0)
    h_n.sum().backward()
    torch.testing.assert_close(h0.grad, torch.ones_like(h0))
    assert w[0].grad is None or torch.count_nonzero(w[0].grad) == 0

    x, h0, c0, *w = lstm_args(steps=0)
    y, (h_n, c_n) = fused_rnn.lstm(x, (h0, c0), *w, backend=cpu_backend)
    assert y.shape == (0, 3, 5)
    torch.testing.assert_close((h_n, c_n), (h0, c0))


def test_zero_batch_gives_empty_outputs(cpu_backend):
    x, h0, *w = irnn_args(batch=0)
    y, h_n = fused_rnn.irnn(x, h0, *w, backend=cpu_backend)
    assert y.shape == (4, 0, 5) and h_n.shape == (0, 5)
    y.sum().backward()
    assert torch.count_nonzero(w[1].grad) == 0
    x, h0, c0, *w = lstm_args(batch=0)
    y, (h_n, c_n) = fused_rnn.lstm(x, (h0, c0), *w, backend=cpu_backend)
    assert y.shape == (4, 0, 5) and c_n.shape == (0, 5)


# ---- NaN propagates (never crashes) and non-contiguous inputs are accepted ----

@pytest.mark.parametrize("cell", ["irnn", "lstm"])
def test_nan_propagates_like_torch_nn(cell, cpu_backend):
    args = (irnn_args if cell == "irnn" else lstm_args)(steps=6, grad=False)
    args[0][3, 1, 0] = math.nan  # batch row 1 from step 3 on
    run = fused_rnn.irnn if cell == "irnn" else (lambda x, h, c, *w, backend: fused_rnn.lstm(x, (h, c), *w,
                                                                                           backend=backend))
    y = run(*args, backend=cpu_backend)[0]
    want = torch_nn_run(cell, *args)[0]
    assert torch.equal(torch.isnan(y), torch.isnan(want))
    assert torch.isnan(y[3:, 1]).all() and not torch.isnan(y[:3]).any() and not torch.isnan(y[:, 0]).any()


def test_non_contiguous_inputs_give_the_contiguous_result(cpu_backend):
    # the compiled kernels copy strided inputs to contiguous memory: bit-identical results;
    # the torch loop and torch.nn's kernels hand strided operands to BLAS, which may sum
    # in another order (1 ulp of float64)
    exact = {"rtol": 0, "atol": 0} if cpu_backend == "cpp" else {"rtol": 1e-13, "atol": 1e-13}
    x, h0, w_ih, w_hh, b_ih, b_hh = irnn_args(grad=False)
    x_strided = x.transpose(0, 1).contiguous().transpose(0, 1)  # same values, [T, B, I] strides permuted
    w_hh_strided = w_hh.t().contiguous().t()
    assert not x_strided.is_contiguous() and not w_hh_strided.is_contiguous()
    got = fused_rnn.irnn(x_strided, h0, w_ih, w_hh_strided, b_ih, b_hh, backend=cpu_backend)
    want = fused_rnn.irnn(x, h0, w_ih, w_hh, b_ih, b_hh, backend=cpu_backend)
    torch.testing.assert_close(got, want, **exact)
    x, h0, c0, w_ih, w_hh, b_ih, b_hh = lstm_args(grad=False)
    got = fused_rnn.lstm(x[:, ::1], (h0.t().contiguous().t(), c0), w_ih, w_hh, b_ih[::1], b_hh, backend=cpu_backend)
    want = fused_rnn.lstm(x, (h0, c0), w_ih, w_hh, b_ih, b_hh, backend=cpu_backend)
    torch.testing.assert_close(got, want, **exact)


def _strided(t):
    """The same values with other strides: a matrix or sequence with its first two dims'
    strides swapped, a vector as every other element of a longer one."""
    if t.dim() == 1:
        return torch.stack([t, torch.zeros_like(t)], 1)[:, 0]
    return t.transpose(0, 1).contiguous().transpose(0, 1)


@pytest.mark.skipif("cpp" not in fused_rnn.available_backends("cpu"), reason="the cpp backend is not built")
def test_every_strided_argument_reaches_the_compiled_ops_as_its_values():
    """No Python .contiguous() runs before the C++ ops: each strided argument (the
    weights, a lone bias, the mask, w_hr, the states, the cells' inputs) gives the
    contiguous call's outputs and gradients, bit for bit (the ops copy them in C++)."""
    g = torch.Generator().manual_seed(3)

    def leaves(*shapes):
        return [torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_() for shape in shapes]

    def outputs_and_grads(run, args):
        outputs = [o for o in torch.utils._pytree.tree_leaves(run(*args)) if isinstance(o, torch.Tensor)]
        grads = torch.autograd.grad(sum((o * (k + 1)).sum() for k, o in enumerate(outputs)), args)
        return [o.detach() for o in outputs] + list(grads)

    T, B, I, H, P = 4, 3, 5, 6, 4
    mask = _strided(torch.bernoulli(torch.full((B, H), 0.5), generator=g).double() * 2)
    cases = [
        (lambda x, h0, w_ih, w_hh, b: fused_rnn.irnn(x, h0, w_ih, w_hh, b, None, backend="cpp",
                                                     recurrent_mask=mask),
         leaves((T, B, I), (B, H), (H, I), (H, H), (H,))),
        (lambda x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr: fused_rnn.lstm(
            x, (h0, c0), w_ih, w_hh, b_ih, b_hh, backend="cpp", w_hr=w_hr),
         leaves((T, B, I), (B, P), (B, H), (4 * H, I), (4 * H, P), (4 * H,), (4 * H,), (P, H))),
        (lambda x, h, w_ih, w_hh, b: fused_rnn.irnn_cell(x, h, w_ih, w_hh, b, None, backend="cpp"),
         leaves((B, I), (B, H), (H, I), (H, H), (H,))),
        (lambda x, h, c, w_ih, w_hh, b: fused_rnn.lstm_cell(x, (h, c), w_ih, w_hh, b, None, backend="cpp"),
         leaves((B, I), (B, H), (B, H), (4 * H, I), (4 * H, H), (4 * H,))),
    ]
    for run, args in cases:
        strided = [_strided(a) for a in args]
        assert not any(a.is_contiguous() for a in strided)
        want = outputs_and_grads(run, args)
        got = outputs_and_grads(run, strided)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---- bad input: clear errors naming the argument and the expectation ----

BAD_IRNN_CASES = [
    ("x rank", lambda a: [a[0][0]] + a[1:], ValueError, "x must be 3-D"),
    ("h0 shape", lambda a: [a[0], a[1][:, :2]] + a[2:], ValueError, "h0 must have shape [B, H] = [3, 5]"),
    ("w_ih cols", lambda a: a[:2] + [a[2][:, :1]] + a[3:], ValueError, "w_ih must have shape"),
    ("w_hh not square", lambda a: a[:3] + [a[3][:, :4]] + a[4:], ValueError, "w_hh must be 2-D"),
    ("bias size", lambda a: a[:4] + [a[4][:3]] + a[5:], ValueError, "b_ih must have shape [1*H] = [5]"),
    ("mixed dtype", lambda a: a[:3] + [a[3].float()] + a[4:], TypeError, "w_hh is torch.float32"),
    ("integer", lambda a: [a[0].long()] + a[1:], TypeError, "x must be a floating-point tensor"),
    ("not a tensor", lambda a: a[:2] + [a[2].tolist()] + a[3:], TypeError, "w_ih must be a torch.Tensor"),
    ("mixed device", lambda a: a[:5] + [a[5].to("meta")], ValueError, "b_hh is on meta"),
]


@pytest.mark.parametrize("name,corrupt,error,message", BAD_IRNN_CASES, ids=[c[0] for c in BAD_IRNN_CASES])
def test_bad_irnn_input_is_named(name, corrupt, error, message, cpu_backend):
    args = corrupt(irnn_args(grad=False))
    with pytest.raises(error, match=__import__("re").escape(message)):
        fused_rnn.irnn(*args, backend=cpu_backend)


def test_bad_lstm_input_is_named(cpu_backend):
    x, h0, c0, w_ih, w_hh, b_ih, b_hh = lstm_args(grad=False)
    with pytest.raises(ValueError, match=r"c0 must have shape \[B, H\] = \[3, 5\]"):
        fused_rnn.lstm(x, (h0, c0[:2]), w_ih, w_hh, b_ih, b_hh, backend=cpu_backend)
    with pytest.raises(ValueError, match=r"w_hh must be 2-D \[4\*H, H\]"):
        fused_rnn.lstm(x, (h0, c0), w_ih, w_hh[:5], b_ih, b_hh, backend=cpu_backend)
    with pytest.raises(TypeError, match=r"state must be a tuple \(h, c\)"):
        fused_rnn.lstm(x, h0, w_ih, w_hh, backend=cpu_backend)
    with pytest.raises(ValueError, match=r"x must be 2-D \[B, I\]"):
        fused_rnn.lstm_cell(x, (h0, c0), w_ih, w_hh, backend=cpu_backend)


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        fused_rnn.irnn(*irnn_args(grad=False), backend="fast")


# ---- dispatch ----

def test_auto_keeps_torch_nn_kernels_without_a_clear_predicted_win():
    """Without a shape there is no prediction, and an option torch.nn has not (the
    recurrent mask, the clip) sends the call to the fused kernels."""
    for dtype in (torch.float32, torch.float64):
        choice = fused_rnn.select_backend("cpu", dtype)
        assert choice.name == "nn" and "no prediction" in choice.skipped.get("cpp", "no prediction")
    expected = "cpp" if "cpp" in fused_rnn.available_backends("cpu") else "torch"
    choice = fused_rnn.select_backend("cpu", torch.float32, cell="irnn", options=("recurrent_mask",))
    assert choice.name == expected and "does not implement recurrent_mask" in choice.skipped["nn"]


def test_auto_falls_back_for_dtypes_the_kernels_lack():
    """bfloat16 runs on the CPU kernels (float32 state); a dtype a kernel lacks (float64
    on the GPU backends) falls back with the reason."""
    y, _ = fused_rnn.irnn(*[t.bfloat16() for t in irnn_args(grad=False)])
    assert y.dtype == torch.bfloat16
    choice = fused_rnn.select_backend("cuda", torch.float64)
    assert choice.name == "nn" and "got float64" in choice.skipped["triton"]
    with pytest.raises(ValueError, match="backend='triton' cannot run these inputs"):
        fused_rnn.select_backend("cuda", torch.float64, "triton")


def test_auto_on_cuda_tensors_uses_an_available_backend():
    assert fused_rnn.select_backend("cuda", torch.float32).name in fused_rnn.available_backends("cuda")


@pytest.mark.parametrize("cell", ["irnn", "lstm"])
def test_weight_grads_do_not_depend_on_x_needing_grad(cell, cpu_backend):
    """When x needs no gradient the scan backward skips dx; nothing else may change."""
    make = irnn_args if cell == "irnn" else lstm_args
    run = fused_rnn.irnn if cell == "irnn" else lstm_flat
    grads = []
    for x_needs_grad in (True, False):
        args = make()
        args[0].requires_grad_(x_needs_grad)
        outputs = run(*args, backend=cpu_backend)
        torch.autograd.backward(outputs, [torch.ones_like(o) for o in outputs])
        assert (args[0].grad is not None) == x_needs_grad
        grads.append([a.grad for a in args[1:]])
    for with_dx, without_dx in zip(*grads):
        torch.testing.assert_close(without_dx, with_dx, rtol=0, atol=0)


@pytest.mark.parametrize("cell", ["irnn", "lstm"])
def test_nan_gradients_follow_pytorch(cell, cpu_backend):
    """Where the input is NaN, the gradients are NaN exactly where autograd through
    torch.nn's RNN ops puts them (ReLU passes the gradient where h is NaN, as PyTorch
    does)."""
    make = irnn_args if cell == "irnn" else lstm_args
    run = fused_rnn.irnn if cell == "irnn" else lstm_flat
    masks = []
    for backend in (cpu_backend, None):
        args = make(steps=6)
        with torch.no_grad():
            args[0][3, 1, 0] = math.nan
        outputs = run(*args, backend=backend) if backend else torch_nn_run(cell, *args)
        grads = torch.autograd.grad(outputs, args, [torch.ones_like(o) for o in outputs])
        masks.append([torch.isnan(g) for g in grads])
    for got, want in zip(*masks):
        assert torch.equal(got, want)


def test_autocast_runs_the_layers_in_bfloat16(cpu_backend):
    """Under torch.autocast("cpu", bfloat16) a layer takes its float32 inputs and
    parameters in bfloat16 (the compiled kernels then keep float32 state and
    accumulation; the torch loop follows autocast op by op) and returns bfloat16;
    gradients reach the float32 parameters."""
    torch.manual_seed(0)
    layers = [fused_rnn.IRNN(5, 7, backend=cpu_backend), fused_rnn.LSTM(5, 7, backend=cpu_backend)]
    x = torch.randn(4, 3, 5)
    for layer in layers:
        want = layer(x)[0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = layer(x)[0]
        assert got.dtype == torch.bfloat16
        # bfloat16 keeps 8 significant bits (eps 7.8e-3); a few roundings over 4 steps
        torch.testing.assert_close(got.float(), want, rtol=5e-2, atol=1e-2)
        got.float().sum().backward()
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in layer.parameters())


def test_autocast_gives_the_cells_torch_nn_s_dtypes(cpu_backend):
    """Under torch.autocast("cpu", bfloat16) the cells return what nn.RNNCell and
    nn.LSTMCell return there (bfloat16, and float32 for the LSTM cell's h and c), on
    every backend: the compiled IRNN cell, which autocast passes by, returned float32."""
    torch.manual_seed(0)
    x, h, c = torch.randn(3, 5), torch.randn(3, 7), torch.randn(3, 7)
    rnn_cell, lstm_cell = nn.RNNCell(5, 7, nonlinearity="relu"), nn.LSTMCell(5, 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want_rnn = rnn_cell(x, h)
        want_lstm = lstm_cell(x, (h, c))
        got_rnn = fused_rnn.irnn_cell(x, h, *rnn_cell.parameters(), backend=cpu_backend)
        got_lstm = fused_rnn.lstm_cell(x, (h, c), *lstm_cell.parameters(), backend=cpu_backend)
    assert got_rnn.dtype == want_rnn.dtype == torch.bfloat16
    assert [t.dtype for t in got_lstm] == [t.dtype for t in want_lstm]
    # bfloat16 keeps 8 significant bits (eps 7.8e-3): one step's roundings of O(1) values
    torch.testing.assert_close(got_rnn.float(), want_rnn.float(), rtol=5e-2, atol=2e-2)
    for got, want in zip(got_lstm, want_lstm):
        torch.testing.assert_close(got.float(), want.float(), rtol=5e-2, atol=2e-2)


# ---- second derivatives (create_graph=True): float64 gradgradcheck, every backend ----
# The fused backward kernels are not differentiable themselves; under create_graph=True
# each autograd formula recomputes the layer through the torch loop (_double_backward.py).

SEQUENCE_OPTIONS = {
    "plain": {},
    "options": {"recurrent_mask": "mask", "lengths": torch.tensor([4, 1, 3])},
}


def _options(name, hidden, cell):
    options = dict(SEQUENCE_OPTIONS[name])
    if "recurrent_mask" in options:
        g = torch.Generator().manual_seed(5)
        options["recurrent_mask"] = (torch.rand(3, hidden, generator=g) > 0.3).double() / 0.7
        if cell == "irnn":
            options["hidden_clip"] = 2.5
    return options


@pytest.mark.parametrize("options", SEQUENCE_OPTIONS)
def test_irnn_gradgradcheck(cpu_backend, options):
    kwargs = options_for(cpu_backend, _options(options, 5, "irnn"))
    assert torch.autograd.gradgradcheck(lambda *a: fused_rnn.irnn(*a, backend=cpu_backend, **kwargs), irnn_args())


@pytest.mark.parametrize("options", SEQUENCE_OPTIONS)
def test_lstm_gradgradcheck(cpu_backend, options):
    kwargs = options_for(cpu_backend, _options(options, 5, "lstm"))

    def layer(x, h0, c0, *weights):
        y, (h, c) = fused_rnn.lstm(x, (h0, c0), *weights, backend=cpu_backend, **kwargs)
        return y, h, c

    assert torch.autograd.gradgradcheck(layer, lstm_args())


def test_cell_gradgradcheck(cpu_backend):
    x, h0, *weights = irnn_args()
    assert torch.autograd.gradgradcheck(lambda *a: fused_rnn.irnn_cell(*a, backend=cpu_backend), (x[0], h0, *weights))
    x, h0, c0, *weights = lstm_args()
    assert torch.autograd.gradgradcheck(lambda x, h, c, *w: fused_rnn.lstm_cell(x, (h, c), *w, backend=cpu_backend),
                                        (x[0], h0, c0, *weights))


def test_ops_gradgradcheck():
    """The fused_rnn:: ops' own autograd registrations (used when an op is called
    directly, or traced) are twice differentiable too."""
    if "cpp" not in fused_rnn.available_backends("cpu"):
        pytest.skip("the cpp backend is not built")
    ops = torch.ops.fused_rnn
    x, h0, w_ih, w_hh, b_ih, _ = irnn_args()
    mask = _options("options", 5, "irnn")["recurrent_mask"]
    assert torch.autograd.gradgradcheck(lambda *a: ops.irnn_scan_forward(*a, mask, torch.tensor([4, 2, 0]), 2.0),
                                        (x, h0, w_ih, w_hh, b_ih))
    assert torch.autograd.gradgradcheck(ops.irnn_step, (x[0], h0, w_ih, w_hh, b_ih))
    x, h0, c0, w_ih, w_hh, b_ih, _ = lstm_args()
    assert torch.autograd.gradgradcheck(lambda *a: ops.lstm_scan_forward(*a)[:3], (x, h0, c0, w_ih, w_hh, b_ih))
    assert torch.autograd.gradgradcheck(lambda *a: ops.lstm_step(*a)[:2], (x[0], h0, c0, w_ih, w_hh, b_ih))


def test_second_derivatives_are_connected_even_when_the_upstream_gradient_is_constant(cpu_backend):
    """The silent failure this guards against: with a constant grad_outputs, a backward
    that is not differentiable returned first derivatives that did not require grad, so
    a gradient penalty trained on the wrong gradient without a word."""
    x, h0, *weights = irnn_args()
    y, _ = fused_rnn.irnn(x, h0, *weights, backend=cpu_backend)
    (dx,) = torch.autograd.grad(y, x, torch.ones_like(y), create_graph=True)
    assert dx.requires_grad
    (second,) = torch.autograd.grad(dx.square().sum(), weights[1])
    y_ref, _ = torch_nn_run("irnn", x, h0, *weights)
    (dx_ref,) = torch.autograd.grad(y_ref, x, torch.ones_like(y_ref), create_graph=True)
    (second_ref,) = torch.autograd.grad(dx_ref.square().sum(), weights[1])
    assert second_ref.abs().max() > 0
    # float64; both sides differentiate the same recurrence twice, through different ops
    # (the fused backends' double backward against autograd through nn.RNN's): only the
    # order of the sums differs, ~1e-16 relative per operation over 4 steps of size 5
    torch.testing.assert_close(second, second_ref, rtol=1e-12, atol=1e-12)
