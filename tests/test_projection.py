"""The LSTM's output projection (nn.LSTM(proj_size=P), fused_rnn.lstm(w_hr=...)):
every CPU backend against the NumPy reference, with the sequence options and on
threads; the GPU backends' refusal with the reason; first and second derivatives."""

import numpy as np
import pytest
import torch

import fused_rnn
import rnn_reference as ref
from helpers import assert_matches, implements, options_for, to_torch

PROJECTION_BACKENDS = [name for name in fused_rnn.available_backends("cpu")
                       if name == "torch" or "proj_size" in fused_rnn.dispatch.OPTION_SUPPORT.get(name, ())]
SHAPES = [  # (T, B, I, H, P)
    (1, 1, 3, 5, 2),
    (17, 4, 6, 13, 7),
    (6, 20, 5, 24, 9),  # B >= 16: the backward folds dx into each step
]
OPTIONS = [(), ("recurrent_mask",), ("lengths",), ("recurrent_mask", "lengths")]


def make_projected_layer(steps, batch, inputs, hidden, width, seed):
    rng = np.random.default_rng(seed)
    arrays = {
        "x": rng.normal(0.0, 0.5, (steps, batch, inputs)),
        "h0": rng.normal(0.0, 0.5, (batch, width)),
        "c0": rng.normal(0.0, 0.5, (batch, hidden)),
        "w_ih": rng.normal(0.0, 1.0 / np.sqrt(inputs), (4 * hidden, inputs)),
        "w_hh": rng.uniform(-1, 1, (4 * hidden, width)) / np.sqrt(width),
        "b_ih": rng.normal(0.0, 0.1, 4 * hidden),
        "b_hh": rng.normal(0.0, 0.1, 4 * hidden),
        "w_hr": rng.uniform(-1, 1, (width, hidden)) / np.sqrt(hidden),
    }
    upstream = (rng.normal(size=(steps, batch, width)), rng.normal(size=(batch, width)),
                rng.normal(size=(batch, hidden)))
    mask = (rng.random((batch, width)) > 0.25) / 0.75
    lengths = rng.integers(0, steps + 1, size=batch)
    lengths[0] = steps
    return arrays, upstream, mask, lengths


def check_projection(shape, dtype, backend, used, seed=0):
    arrays, upstream, mask, lengths = make_projected_layer(*shape, seed=seed + sum(shape))
    mask = mask if "recurrent_mask" in used else None
    lengths = lengths if "lengths" in used else None
    a = arrays
    want_y, want_h, want_c, cache = ref.lstm_forward(a["x"], a["h0"], a["c0"], a["w_ih"], a["w_hh"], a["b_ih"],
                                                     a["b_hh"], recurrent_mask=mask, lengths=lengths, w_hr=a["w_hr"])
    want_grads = ref.lstm_backward(*upstream, cache)
    t = {name: to_torch(value, dtype) for name, value in arrays.items()}
    y, (h_n, c_n) = fused_rnn.lstm(
        t["x"], (t["h0"], t["c0"]), t["w_ih"], t["w_hh"], t["b_ih"], t["b_hh"], backend=backend, w_hr=t["w_hr"],
        recurrent_mask=None if mask is None else torch.tensor(mask, dtype=dtype),
        lengths=None if lengths is None else torch.tensor(lengths))
    for name, got, want in (("y", y, want_y), ("h_T", h_n, want_h), ("c_T", c_n, want_c)):
        assert_matches(name, got, want, dtype)
    torch.autograd.backward((y, h_n, c_n), [torch.tensor(u, dtype=dtype) for u in upstream])
    for name, tensor in t.items():
        assert_matches("d" + name, tensor.grad, want_grads["d" + name], dtype)


@pytest.mark.parametrize("used", OPTIONS, ids=lambda u: "+".join(u) or "plain")
@pytest.mark.parametrize("backend", PROJECTION_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}B{}I{}H{}P{}".format(*s))
def test_projection_matches_reference(shape, dtype, backend, used):
    """Tolerances of test_cpu: the projection is one more GEMM per step."""
    if not implements(backend, used):
        pytest.skip(f"{backend} does not implement {used}")
    check_projection(shape, dtype, backend, used)


def test_projection_on_threads_matches_reference():
    """Two threads, each scanning its own slice of a 40-row batch."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for backend in PROJECTION_BACKENDS:
            used = ("recurrent_mask", "lengths") if implements(backend, ("recurrent_mask",)) else ("lengths",)
            check_projection((7, 40, 5, 24, 11), torch.float64, backend, used)
    finally:
        torch.set_num_threads(threads)


def test_projection_in_bfloat16_matches_reference():
    """bfloat16 inputs and weights, float32 state and accumulation on the CPU kernels.
    bfloat16 keeps 8 significant bits (unit roundoff 3.9e-3); the inputs, the weights and
    each output are rounded once, which over these 6 steps stays within 3e-2 of the
    float64 reference relative to each tensor's scale."""
    if "cpp" not in PROJECTION_BACKENDS:
        pytest.skip("the cpp backend is not built")
    arrays, upstream, _, _ = make_projected_layer(6, 5, 4, 12, 5, seed=3)
    a = arrays
    want_y, want_h, want_c, cache = ref.lstm_forward(a["x"], a["h0"], a["c0"], a["w_ih"], a["w_hh"], a["b_ih"],
                                                     a["b_hh"], w_hr=a["w_hr"])
    t = {name: to_torch(value, torch.bfloat16) for name, value in arrays.items()}
    y, (h_n, c_n) = fused_rnn.lstm(t["x"], (t["h0"], t["c0"]), t["w_ih"], t["w_hh"], t["b_ih"], t["b_hh"],
                                   backend="cpp", w_hr=t["w_hr"])
    assert y.dtype == h_n.dtype == c_n.dtype == torch.bfloat16
    for got, want in ((y, want_y), (h_n, want_h), (c_n, want_c)):
        np.testing.assert_allclose(got.float().detach().numpy(), want, atol=3e-2 * np.abs(want).max(), rtol=0)


def test_auto_on_a_gpu_falls_back_for_the_projection(monkeypatch):
    """The GPU kernels have no projection: with every GPU backend available, a projected
    LSTM on CUDA tensors gets torch.nn's kernels (which have it), and select_backend says
    why the fused ones were not taken; with the recurrent mask too, the torch loop."""
    from fused_rnn import dispatch

    monkeypatch.setattr(dispatch, "_missing_requirement", lambda name: None)
    monkeypatch.setattr(dispatch, "_cuda_scan_reason", lambda *args: None)
    choice = dispatch.select_backend("cuda", torch.float32, cell="lstm", hidden=8, batch=2,
                                       options=("proj_size",))
    assert choice.name == "nn"
    assert "proj_size" in choice.skipped["cuda"] and "proj_size" in choice.skipped["triton"]
    choice = dispatch.select_backend("cuda", torch.float32, cell="lstm", hidden=8, batch=2,
                                     options=("proj_size", "recurrent_mask"))
    assert choice.name == "torch" and "recurrent_mask" in choice.skipped["nn"]


@pytest.mark.parametrize("backend", PROJECTION_BACKENDS)
def test_projection_gradcheck_and_gradgradcheck(backend):
    arrays, _, mask, lengths = make_projected_layer(4, 3, 2, 5, 3, seed=9)
    t = [to_torch(arrays[name], torch.float64) for name in ("x", "h0", "c0", "w_ih", "w_hh", "b_ih", "w_hr")]
    options = options_for(backend, dict(recurrent_mask=torch.tensor(mask), lengths=torch.tensor(lengths)))

    def layer(x, h0, c0, w_ih, w_hh, b_ih, w_hr):
        y, (h, c) = fused_rnn.lstm(x, (h0, c0), w_ih, w_hh, b_ih, None, backend=backend, w_hr=w_hr, **options)
        return y, h, c

    assert torch.autograd.gradcheck(layer, t)
    assert torch.autograd.gradgradcheck(layer, t)


def test_projection_shapes_are_checked():
    arrays, *_ = make_projected_layer(3, 2, 4, 6, 3, seed=1)
    t = {name: torch.tensor(value, dtype=torch.float32) for name, value in arrays.items()}
    args = (t["x"], (t["h0"], t["c0"]), t["w_ih"], t["w_hh"])
    with pytest.raises(ValueError, match=r"w_hr must have shape \[P, H\] = \[3, 6\]"):
        fused_rnn.lstm(*args, w_hr=t["w_hr"].t())
    with pytest.raises(ValueError, match=r"h0 must have shape \[B, P\] = \[2, 3\]"):
        fused_rnn.lstm(t["x"], (t["c0"], t["c0"]), t["w_ih"], t["w_hh"], w_hr=t["w_hr"])
    with pytest.raises(ValueError, match=r"w_hh must be 2-D \[4\*H, H\]"):
        fused_rnn.lstm(*args)  # a [4H, P] w_hh without its projection



@pytest.mark.parametrize("width", [4, 6], ids=["P=H", "P>H"])
def test_a_projection_as_wide_as_the_cell_never_reaches_torch_nn(width):
    """w_hr [P, H] with P >= H: the CPU kernels and the loop run it (h_t is then a
    linear map of the H-wide o * tanh(c)). nn.LSTM refuses proj_size >= hidden_size, and
    ATen's kernels, which infer the projection from h's width, fail at P = H with an
    error about ArrayRef strides that names no argument: auto never takes them for it,
    and naming them says why."""
    torch.manual_seed(0)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    w_ih, w_hh = torch.randn(16, 3, dtype=torch.float64), 0.5 * torch.randn(16, width, dtype=torch.float64)
    w_hr = 0.5 * torch.randn(width, 4, dtype=torch.float64)
    want = fused_rnn.lstm(x, None, w_ih, w_hh, w_hr=w_hr, backend="torch")
    got = fused_rnn.lstm(x, None, w_ih, w_hh, w_hr=w_hr)
    # float64, the same products in another order
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    choice = fused_rnn.select_backend("cpu", torch.float64, cell="lstm",
                                      options=("proj_size", fused_rnn.dispatch.WIDE_PROJECTION))
    assert choice.name != "nn" and "proj_size >= hidden_size" in choice.skipped["nn"]
    with pytest.raises(ValueError, match="proj_size >= hidden_size"):
        fused_rnn.lstm(x, None, w_ih, w_hh, w_hr=w_hr, backend="nn")
