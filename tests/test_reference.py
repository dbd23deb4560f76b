"""Checks of the NumPy reference ``python/rnn_reference.py``, the oracle of every backend.

Against ``torch.nn.RNN(nonlinearity="relu")`` and ``torch.nn.LSTM`` in float64 (outputs,
final states and every gradient, through autograd), and against central finite
differences of the reference's own forward, which needs no torch at all.
"""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

PYTHON_DIR = Path(__file__).resolve().parents[1] / "python"
if str(PYTHON_DIR) not in sys.path:
    sys.path.insert(0, str(PYTHON_DIR))

import rnn_reference  # noqa: E402

# float64 has unit roundoff 1.1e-16; the longest chain here (63 steps, sums of at most
# a few hundred products per entry) accumulates well under 1e-12, while a wrong formula
# is off by 1e-3 or more, so 1e-10 separates the two with room on both sides.
FLOAT64_TOLERANCE = dict(rtol=1e-10, atol=1e-10)

# (T, B, I, H, bias): T=1, odd T=63, odd H=37, B=1, and no bias.
SHAPES = [
    (1, 3, 4, 5, True),
    (63, 4, 7, 37, True),
    (10, 1, 3, 6, True),
    (8, 2, 5, 4, False),
    (5, 3, 2, 37, False),
]


def shape_id(shape):
    steps, batch, inputs, hidden, bias = shape
    return f"T{steps}-B{batch}-I{inputs}-H{hidden}-{'bias' if bias else 'nobias'}"


def random_parameters(rng, gates, inputs, hidden, bias):
    """Weights of one layer; the IRNN's recurrent matrix near 0.9 * identity so 63 steps stay bounded."""
    scale = 1.0 / np.sqrt(hidden)
    w_ih = rng.uniform(-scale, scale, size=(gates * hidden, inputs))  # [G*H, I]
    if gates == 1:
        w_hh = 0.9 * np.eye(hidden) + rng.normal(0.0, 0.1 * scale, size=(hidden, hidden))  # [H, H]
    else:
        w_hh = rng.uniform(-scale, scale, size=(gates * hidden, hidden))  # [4H, H]
    b_ih = rng.uniform(-scale, scale, size=gates * hidden) if bias else None  # [G*H]
    b_hh = rng.uniform(-scale, scale, size=gates * hidden) if bias else None  # [G*H]
    return w_ih, w_hh, b_ih, b_hh


def torch_module(module_class, parameters, inputs, hidden, **kwargs):
    """A float64 torch.nn.RNN / nn.LSTM holding the given weights."""
    w_ih, w_hh, b_ih, b_hh = parameters
    module = module_class(inputs, hidden, bias=b_ih is not None, dtype=torch.float64, **kwargs)
    with torch.no_grad():
        module.weight_ih_l0.copy_(torch.from_numpy(w_ih))
        module.weight_hh_l0.copy_(torch.from_numpy(w_hh))
        if b_ih is not None:
            module.bias_ih_l0.copy_(torch.from_numpy(b_ih))
            module.bias_hh_l0.copy_(torch.from_numpy(b_hh))
    return module


def module_parameter_grads(module):
    names = {"dw_ih": "weight_ih_l0", "dw_hh": "weight_hh_l0", "db_ih": "bias_ih_l0", "db_hh": "bias_hh_l0"}
    return {key: getattr(module, name, None) for key, name in names.items()}


def assert_grads_match(reference_grads, torch_grads):
    for name, expected in torch_grads.items():
        actual = reference_grads[name]
        if expected is None:
            assert actual is None, name
            continue
        np.testing.assert_allclose(actual, expected.numpy(), err_msg=name, **FLOAT64_TOLERANCE)


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_irnn_matches_torch_rnn_relu(shape):
    steps, batch, inputs, hidden, bias = shape
    rng = np.random.default_rng(1)
    parameters = random_parameters(rng, 1, inputs, hidden, bias)
    x = rng.normal(0.0, 1.0, size=(steps, batch, inputs))  # [T, B, I]
    h0 = rng.uniform(0.0, 0.5, size=(batch, hidden))  # [B, H]
    dy = rng.normal(size=(steps, batch, hidden))  # [T, B, H]
    dh_T = rng.normal(size=(batch, hidden))  # [B, H]

    y, h_T, cache = rnn_reference.irnn_forward(x, h0, *parameters)
    reference_grads = rnn_reference.irnn_backward(dy, dh_T, cache)

    module = torch_module(torch.nn.RNN, parameters, inputs, hidden, nonlinearity="relu")
    x_t = torch.from_numpy(x).requires_grad_()
    h0_t = torch.from_numpy(h0)[None].requires_grad_()  # [1, B, H]: one layer
    y_t, h_T_t = module(x_t, h0_t)
    module_weights = [p for p in module_parameter_grads(module).values() if p is not None]
    grads = torch.autograd.grad(
        (y_t, h_T_t),
        [x_t, h0_t, *module_weights],
        grad_outputs=(torch.from_numpy(dy), torch.from_numpy(dh_T)[None]),
    )
    torch_grads = {"dx": grads[0], "dh0": grads[1][0]}
    torch_grads.update(zip(["dw_ih", "dw_hh", "db_ih", "db_hh"], grads[2:]))
    torch_grads.setdefault("db_ih", None)
    torch_grads.setdefault("db_hh", None)

    np.testing.assert_allclose(y, y_t.detach().numpy(), **FLOAT64_TOLERANCE)
    np.testing.assert_allclose(h_T, h_T_t.detach()[0].numpy(), **FLOAT64_TOLERANCE)
    assert_grads_match(reference_grads, torch_grads)


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_lstm_matches_torch_lstm(shape):
    steps, batch, inputs, hidden, bias = shape
    rng = np.random.default_rng(2)
    parameters = random_parameters(rng, 4, inputs, hidden, bias)
    x = rng.normal(0.0, 1.0, size=(steps, batch, inputs))  # [T, B, I]
    h0 = rng.normal(0.0, 0.5, size=(batch, hidden))  # [B, H]
    c0 = rng.normal(0.0, 0.5, size=(batch, hidden))  # [B, H]
    dy = rng.normal(size=(steps, batch, hidden))  # [T, B, H]
    dh_T = rng.normal(size=(batch, hidden))  # [B, H]
    dc_T = rng.normal(size=(batch, hidden))  # [B, H]

    y, h_T, c_T, cache = rnn_reference.lstm_forward(x, h0, c0, *parameters)
    reference_grads = rnn_reference.lstm_backward(dy, dh_T, dc_T, cache)

    module = torch_module(torch.nn.LSTM, parameters, inputs, hidden)
    x_t = torch.from_numpy(x).requires_grad_()
    h0_t = torch.from_numpy(h0)[None].requires_grad_()  # [1, B, H]
    c0_t = torch.from_numpy(c0)[None].requires_grad_()  # [1, B, H]
    y_t, (h_T_t, c_T_t) = module(x_t, (h0_t, c0_t))
    module_weights = [p for p in module_parameter_grads(module).values() if p is not None]
    grads = torch.autograd.grad(
        (y_t, h_T_t, c_T_t),
        [x_t, h0_t, c0_t, *module_weights],
        grad_outputs=(torch.from_numpy(dy), torch.from_numpy(dh_T)[None], torch.from_numpy(dc_T)[None]),
    )
    torch_grads = {"dx": grads[0], "dh0": grads[1][0], "dc0": grads[2][0]}
    torch_grads.update(zip(["dw_ih", "dw_hh", "db_ih", "db_hh"], grads[3:]))
    torch_grads.setdefault("db_ih", None)
    torch_grads.setdefault("db_hh", None)

    np.testing.assert_allclose(y, y_t.detach().numpy(), **FLOAT64_TOLERANCE)
    np.testing.assert_allclose(h_T, h_T_t.detach()[0].numpy(), **FLOAT64_TOLERANCE)
    np.testing.assert_allclose(c_T, c_T_t.detach()[0].numpy(), **FLOAT64_TOLERANCE)
    assert_grads_match(reference_grads, torch_grads)


@pytest.mark.parametrize("shape", [(1, 3, 4, 5, 2, True), (17, 2, 3, 7, 3, True), (6, 1, 2, 4, 1, False)],
                         ids=lambda s: f"T{s[0]}-B{s[1]}-I{s[2]}-H{s[3]}-P{s[4]}-{'bias' if s[5] else 'nobias'}")
def test_lstm_projection_matches_torch_lstm(shape):
    """nn.LSTM(proj_size=P): h_t = (o * tanh(c_t)) @ w_hr^T feeds the recurrence and the output."""
    steps, batch, inputs, hidden, width, bias = shape
    rng = np.random.default_rng(12)
    w_ih, _, b_ih, b_hh = random_parameters(rng, 4, inputs, hidden, bias)
    scale = 1.0 / np.sqrt(hidden)
    w_hh = rng.uniform(-scale, scale, size=(4 * hidden, width))  # [4H, P]
    w_hr = rng.uniform(-scale, scale, size=(width, hidden))  # [P, H]
    x = rng.normal(size=(steps, batch, inputs))  # [T, B, I]
    h0, c0 = rng.normal(0.0, 0.5, size=(batch, width)), rng.normal(0.0, 0.5, size=(batch, hidden))
    dy, dh_T, dc_T = rng.normal(size=(steps, batch, width)), rng.normal(size=(batch, width)), rng.normal(
        size=(batch, hidden))

    y, h_T, c_T, cache = rnn_reference.lstm_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr=w_hr)
    reference_grads = rnn_reference.lstm_backward(dy, dh_T, dc_T, cache)

    module = torch.nn.LSTM(inputs, hidden, proj_size=width, bias=bias, dtype=torch.float64)
    names = {"weight_ih_l0": w_ih, "weight_hh_l0": w_hh, "weight_hr_l0": w_hr, "bias_ih_l0": b_ih, "bias_hh_l0": b_hh}
    with torch.no_grad():
        for name, value in names.items():
            if value is not None:
                getattr(module, name).copy_(torch.from_numpy(value))
    x_t, h0_t, c0_t = (torch.from_numpy(a).requires_grad_() for a in (x, h0[None], c0[None]))
    y_t, (h_T_t, c_T_t) = module(x_t, (h0_t, c0_t))
    weights = {key: getattr(module, name) for key, name in [("dw_ih", "weight_ih_l0"), ("dw_hh", "weight_hh_l0"),
                                                            ("dw_hr", "weight_hr_l0"), ("db_ih", "bias_ih_l0"),
                                                            ("db_hh", "bias_hh_l0")] if hasattr(module, name)}
    grads = torch.autograd.grad((y_t, h_T_t, c_T_t), [x_t, h0_t, c0_t, *weights.values()],
                                grad_outputs=(torch.from_numpy(dy), torch.from_numpy(dh_T)[None],
                                              torch.from_numpy(dc_T)[None]))
    torch_grads = {"dx": grads[0], "dh0": grads[1][0], "dc0": grads[2][0], **dict(zip(weights, grads[3:]))}
    torch_grads.setdefault("db_ih", None)
    torch_grads.setdefault("db_hh", None)

    assert y.shape == (steps, batch, width) and c_T.shape == (batch, hidden)
    np.testing.assert_allclose(y, y_t.detach().numpy(), **FLOAT64_TOLERANCE)
    np.testing.assert_allclose(h_T, h_T_t.detach()[0].numpy(), **FLOAT64_TOLERANCE)
    np.testing.assert_allclose(c_T, c_T_t.detach()[0].numpy(), **FLOAT64_TOLERANCE)
    assert_grads_match(reference_grads, torch_grads)


# ------------------------------------------------------------ finite differences

# Central differences have truncation error ~ eps^2 * |f'''| ~ 1e-12 and rounding error
# ~ 1e-16 / eps ~ 1e-10 at eps = 1e-6, so agreement to 1e-7 means the hand-derived
# gradient is right, while a missing or wrong term shows up at 1e-2 or more.
FINITE_DIFFERENCE_STEP = 1e-6
FINITE_DIFFERENCE_TOLERANCE = dict(rtol=1e-6, atol=1e-7)


def numerical_gradient(loss_of, arrays, name):
    """dL/d arrays[name] by central differences, one entry at a time."""
    array = arrays[name]
    gradient = np.zeros_like(array)
    for index in np.ndindex(array.shape):
        original = array[index]
        array[index] = original + FINITE_DIFFERENCE_STEP
        loss_plus = loss_of(arrays)
        array[index] = original - FINITE_DIFFERENCE_STEP
        loss_minus = loss_of(arrays)
        array[index] = original
        gradient[index] = (loss_plus - loss_minus) / (2 * FINITE_DIFFERENCE_STEP)
    return gradient


def tiny_problem(rng, gates, steps=3, batch=2, inputs=3, hidden=4):
    w_ih, w_hh, b_ih, b_hh = random_parameters(rng, gates, inputs, hidden, bias=True)
    arrays = {
        "x": rng.normal(size=(steps, batch, inputs)),  # [T, B, I]
        "h0": rng.normal(0.0, 0.5, size=(batch, hidden)),  # [B, H]
        "w_ih": w_ih,
        "w_hh": w_hh,
        "b_ih": b_ih,
        "b_hh": b_hh,
    }
    upstream = {
        "dy": rng.normal(size=(steps, batch, hidden)),  # [T, B, H]
        "dh_T": rng.normal(size=(batch, hidden)),  # [B, H]
        "dc_T": rng.normal(size=(batch, hidden)),  # [B, H]
    }
    if gates == 4:
        arrays["c0"] = rng.normal(0.0, 0.5, size=(batch, hidden))  # [B, H]
    return arrays, upstream


def test_irnn_backward_matches_finite_differences():
    arrays, upstream = tiny_problem(np.random.default_rng(3), gates=1)
    parameter_names = ["w_ih", "w_hh", "b_ih", "b_hh"]

    def loss_of(a):
        # L = <dy, y> + <dh_T, h_T>, whose gradients with respect to y and h_T are dy and dh_T
        y, h_T, _ = rnn_reference.irnn_forward(a["x"], a["h0"], *(a[n] for n in parameter_names))
        return np.sum(upstream["dy"] * y) + np.sum(upstream["dh_T"] * h_T)

    _, _, cache = rnn_reference.irnn_forward(arrays["x"], arrays["h0"], *(arrays[n] for n in parameter_names))
    # relu is not differentiable at 0: keep every pre-activation far from it compared with the step
    assert np.min(np.abs(cache.preactivations)) > 1e-3
    grads = rnn_reference.irnn_backward(upstream["dy"], upstream["dh_T"], cache)
    for name in ["x", "h0", *parameter_names]:
        np.testing.assert_allclose(
            grads["d" + name], numerical_gradient(loss_of, arrays, name), err_msg=name, **FINITE_DIFFERENCE_TOLERANCE
        )


def test_lstm_backward_matches_finite_differences():
    arrays, upstream = tiny_problem(np.random.default_rng(4), gates=4)
    parameter_names = ["w_ih", "w_hh", "b_ih", "b_hh"]

    def loss_of(a):
        y, h_T, c_T, _ = rnn_reference.lstm_forward(a["x"], a["h0"], a["c0"], *(a[n] for n in parameter_names))
        return np.sum(upstream["dy"] * y) + np.sum(upstream["dh_T"] * h_T) + np.sum(upstream["dc_T"] * c_T)

    *_, cache = rnn_reference.lstm_forward(
        arrays["x"], arrays["h0"], arrays["c0"], *(arrays[n] for n in parameter_names)
    )
    grads = rnn_reference.lstm_backward(upstream["dy"], upstream["dh_T"], upstream["dc_T"], cache)
    for name in ["x", "h0", "c0", *parameter_names]:
        np.testing.assert_allclose(
            grads["d" + name], numerical_gradient(loss_of, arrays, name), err_msg=name, **FINITE_DIFFERENCE_TOLERANCE
        )


def _options(rng, batch, hidden, steps):
    """A recurrent-dropout mask (0 or 1/(1-p)) and lengths that include 0, 1 and the full T."""
    mask = (rng.random((batch, hidden)) > 0.3) / 0.7
    lengths = np.array([steps, 0, 1, steps - 1][:batch] + [steps] * max(0, batch - 4))
    return mask, lengths


@pytest.mark.parametrize("cell", ["irnn", "lstm"])
def test_backward_with_options_matches_finite_differences(cell):
    """The recurrent mask, per-sequence lengths and (IRNN) the hidden clip, derived by
    hand in the reference, against central differences of its own forward."""
    gates = 1 if cell == "irnn" else 4
    arrays, upstream = tiny_problem(np.random.default_rng(7), gates=gates)
    steps, batch = arrays["x"].shape[:2]
    mask, lengths = _options(np.random.default_rng(8), batch, arrays["w_hh"].shape[1], steps)
    parameter_names = ["w_ih", "w_hh", "b_ih", "b_hh"]
    clip = 0.6 if cell == "irnn" else None

    def forward(a):
        params = [a[n] for n in parameter_names]
        if cell == "irnn":
            return rnn_reference.irnn_forward(a["x"], a["h0"], *params, recurrent_mask=mask, lengths=lengths,
                                              hidden_clip=clip)
        return rnn_reference.lstm_forward(a["x"], a["h0"], a["c0"], *params, recurrent_mask=mask, lengths=lengths)

    def loss_of(a):
        outputs = forward(a)[:-1]
        names = ("dy", "dh_T", "dc_T")
        return sum(np.sum(upstream[n] * out) for n, out in zip(names, outputs))

    cache = forward(arrays)[-1]
    if cell == "irnn":
        z = cache.preactivations  # keep away from relu's and the clip's kinks, compared with the step
        assert np.min(np.abs(z)) > 1e-3 and np.min(np.abs(z - clip)) > 1e-3 and (z > clip).any()
        grads = rnn_reference.irnn_backward(upstream["dy"], upstream["dh_T"], cache)
    else:
        grads = rnn_reference.lstm_backward(upstream["dy"], upstream["dh_T"], upstream["dc_T"], cache)
    names = ["x", "h0", *parameter_names] + (["c0"] if cell == "lstm" else [])
    for name in names:
        np.testing.assert_allclose(
            grads["d" + name], numerical_gradient(loss_of, arrays, name), err_msg=name, **FINITE_DIFFERENCE_TOLERANCE
        )
    y = forward(arrays)[0]
    for b, length in enumerate(lengths):
        assert not y[length:, b].any()  # outputs beyond a sequence's length are zero


def test_lstm_projection_backward_matches_finite_differences():
    """The projection's hand-derived backward, with the recurrent mask (on the projected
    h, P columns) and lengths, against central differences of the reference's forward."""
    rng = np.random.default_rng(13)
    steps, batch, inputs, hidden, width = 3, 4, 3, 4, 2
    w_ih, _, b_ih, b_hh = random_parameters(rng, 4, inputs, hidden, bias=True)
    arrays = {"x": rng.normal(size=(steps, batch, inputs)), "h0": rng.normal(0.0, 0.5, size=(batch, width)),
              "c0": rng.normal(0.0, 0.5, size=(batch, hidden)), "w_ih": w_ih,
              "w_hh": rng.uniform(-0.5, 0.5, size=(4 * hidden, width)), "b_ih": b_ih, "b_hh": b_hh,
              "w_hr": rng.uniform(-0.5, 0.5, size=(width, hidden))}
    upstream = {"dy": rng.normal(size=(steps, batch, width)), "dh_T": rng.normal(size=(batch, width)),
                "dc_T": rng.normal(size=(batch, hidden))}
    mask, lengths = _options(rng, batch, width, steps)

    def forward(a):
        return rnn_reference.lstm_forward(a["x"], a["h0"], a["c0"], a["w_ih"], a["w_hh"], a["b_ih"], a["b_hh"],
                                          recurrent_mask=mask, lengths=lengths, w_hr=a["w_hr"])

    def loss_of(a):
        y, h_T, c_T, _ = forward(a)
        return np.sum(upstream["dy"] * y) + np.sum(upstream["dh_T"] * h_T) + np.sum(upstream["dc_T"] * c_T)

    grads = rnn_reference.lstm_backward(upstream["dy"], upstream["dh_T"], upstream["dc_T"], forward(arrays)[-1])
    for name in arrays:
        np.testing.assert_allclose(
            grads["d" + name], numerical_gradient(loss_of, arrays, name), err_msg=name, **FINITE_DIFFERENCE_TOLERANCE
        )


@pytest.mark.parametrize("cell", ["irnn", "lstm"])
def test_options_match_torch_autograd(cell):
    """The same options through the torch time loop (fused_rnn's "torch" backend),
    differentiated by autograd: two independent derivations of every gradient."""
    from fused_rnn import torch_loop

    gates = 1 if cell == "irnn" else 4
    rng = np.random.default_rng(11)
    steps, batch, inputs, hidden = 6, 5, 3, 7
    a = {"x": rng.normal(size=(steps, batch, inputs)), "h0": rng.normal(size=(batch, hidden)),
         "c0": rng.normal(size=(batch, hidden)), "w_ih": rng.normal(size=(gates * hidden, inputs)) * 0.5,
         "w_hh": rng.normal(size=(gates * hidden, hidden)) * 0.4, "b_ih": rng.normal(size=gates * hidden) * 0.1}
    up = {"dy": rng.normal(size=(steps, batch, hidden)), "dh": rng.normal(size=(batch, hidden)),
          "dc": rng.normal(size=(batch, hidden))}
    mask, lengths = _options(rng, batch, hidden, steps)
    t = {k: torch.tensor(v, requires_grad=True) for k, v in a.items()}
    options = dict(recurrent_mask=torch.tensor(mask), lengths=torch.tensor(lengths))
    if cell == "irnn":
        *want_out, cache = rnn_reference.irnn_forward(a["x"], a["h0"], a["w_ih"], a["w_hh"], a["b_ih"], None,
                                                      mask, lengths, 0.8)
        outputs = torch_loop.irnn_loop(t["x"], t["h0"], t["w_ih"], t["w_hh"], t["b_ih"], None, **options,
                                       hidden_clip=0.8)
        want = rnn_reference.irnn_backward(up["dy"], up["dh"], cache)
        upstream, names = (up["dy"], up["dh"]), ["x", "h0", "w_ih", "w_hh", "b_ih"]
    else:
        *want_out, cache = rnn_reference.lstm_forward(a["x"], a["h0"], a["c0"], a["w_ih"], a["w_hh"], a["b_ih"],
                                                      None, mask, lengths)
        outputs = torch_loop.lstm_loop(t["x"], t["h0"], t["c0"], t["w_ih"], t["w_hh"], t["b_ih"], None, **options)
        want = rnn_reference.lstm_backward(up["dy"], up["dh"], up["dc"], cache)
        upstream, names = (up["dy"], up["dh"], up["dc"]), ["x", "h0", "c0", "w_ih", "w_hh", "b_ih"]
    for got, expected in zip(outputs, want_out):
        np.testing.assert_allclose(got.detach().numpy(), expected, rtol=1e-12, atol=1e-12)
    torch.autograd.backward(outputs, [torch.tensor(u) for u in upstream])
    for name in names:
        np.testing.assert_allclose(t[name].grad.numpy(), want["d" + name], rtol=1e-10, atol=1e-12, err_msg=name)


# ------------------------------------------------------------ edge cases and contract


def test_empty_sequence_returns_initial_state_and_zero_weight_grads():
    rng = np.random.default_rng(5)
    batch, inputs, hidden = 2, 3, 4
    x = np.zeros((0, batch, inputs))  # [0, B, I]
    h0 = rng.normal(size=(batch, hidden))
    c0 = rng.normal(size=(batch, hidden))
    dh_T = rng.normal(size=(batch, hidden))
    dc_T = rng.normal(size=(batch, hidden))

    y, h_T, cache = rnn_reference.irnn_forward(x, h0, *random_parameters(rng, 1, inputs, hidden, True))
    assert y.shape == (0, batch, hidden)
    np.testing.assert_array_equal(h_T, h0)
    grads = rnn_reference.irnn_backward(None, dh_T, cache)
    np.testing.assert_array_equal(grads["dh0"], dh_T)
    assert grads["dx"].shape == (0, batch, inputs)
    assert not grads["dw_hh"].any() and not grads["db_ih"].any()

    y, h_T, c_T, cache = rnn_reference.lstm_forward(x, h0, c0, *random_parameters(rng, 4, inputs, hidden, True))
    assert y.shape == (0, batch, hidden)
    np.testing.assert_array_equal(h_T, h0)
    np.testing.assert_array_equal(c_T, c0)
    grads = rnn_reference.lstm_backward(None, dh_T, dc_T, cache)
    np.testing.assert_array_equal(grads["dh0"], dh_T)
    np.testing.assert_array_equal(grads["dc0"], dc_T)
    assert not grads["dw_ih"].any()


def test_single_bias_equals_zero_other_bias():
    rng = np.random.default_rng(6)
    steps, batch, inputs, hidden = 4, 2, 3, 5
    w_ih, w_hh, b_ih, _ = random_parameters(rng, 4, inputs, hidden, True)
    x = rng.normal(size=(steps, batch, inputs))
    h0, c0 = rng.normal(size=(2, batch, hidden))
    dy = rng.normal(size=(steps, batch, hidden))

    y_one, _, _, cache_one = rnn_reference.lstm_forward(x, h0, c0, w_ih, w_hh, b_ih, None)
    y_two, _, _, cache_two = rnn_reference.lstm_forward(x, h0, c0, w_ih, w_hh, b_ih, np.zeros_like(b_ih))
    np.testing.assert_array_equal(y_one, y_two)
    grads_one = rnn_reference.lstm_backward(dy, None, None, cache_one)
    grads_two = rnn_reference.lstm_backward(dy, None, None, cache_two)
    assert grads_one["db_hh"] is None
    np.testing.assert_array_equal(grads_one["db_ih"], grads_two["db_hh"])


def test_float32_inputs_are_computed_in_float64():
    rng = np.random.default_rng(7)
    parameters = [None if p is None else p.astype(np.float32) for p in random_parameters(rng, 1, 3, 4, True)]
    x = rng.normal(size=(2, 2, 3)).astype(np.float32)
    y, h_T, cache = rnn_reference.irnn_forward(x, np.zeros((2, 4), np.float32), *parameters)
    grads = rnn_reference.irnn_backward(np.ones_like(y), None, cache)
    assert y.dtype == h_T.dtype == np.float64
    assert all(g.dtype == np.float64 for g in grads.values())


def test_reference_does_not_import_torch():
    # the oracle must stay independent of the library whose kernels it checks
    program = (
        f"import sys; sys.path.insert(0, {str(PYTHON_DIR)!r}); import rnn_reference; "
        "assert 'torch' not in sys.modules, 'rnn_reference imported torch'"
    )
    subprocess.run([sys.executable, "-c", program], check=True, timeout=120)
