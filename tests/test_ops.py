"""The fused_rnn:: custom ops: registration, opcheck, and torch.compile parity."""

import pytest
import torch

import fused_rnn
from fused_rnn.ops import OP_NAMES

pytestmark = pytest.mark.skipif(
    "cpp" not in fused_rnn.available_backends("cpu"), reason="fused_rnn._C is not built"
)

T, B, I, H, P = 5, 3, 4, 6, 4


def op(name):
    return getattr(torch.ops.fused_rnn, name)


def layer_tensors(gates, dtype, requires_grad, step=False):
    g = torch.Generator().manual_seed(gates)
    shape_x = (B, I) if step else (T, B, I)

    def r(*shape, scale=0.5):
        return (scale * torch.randn(*shape, dtype=dtype, generator=g)).requires_grad_(requires_grad)

    return r(*shape_x), r(B, H), r(B, H), r(gates * H, I), r(gates * H, H), r(gates * H)


def sample_calls(dtype, requires_grad):
    """(op name, args) for every op, forward ones with and without bias."""
    calls = []
    x, h, c, w_ih, w_hh, bias = layer_tensors(1, dtype, requires_grad)
    # the second call has a transposed (non-contiguous) h0: the kernels return contiguous
    # tensors and the fake kernels must say so
    h_strided = h.detach().t().contiguous().t().requires_grad_(requires_grad)
    calls += [("irnn_scan_forward", (x, h, w_ih, w_hh, bias)), ("irnn_scan_forward", (x, h_strided, w_ih, w_hh, None))]
    with torch.no_grad():
        y, _ = op("irnn_scan_forward")(x, h, w_ih, w_hh, bias)
    calls.append(("irnn_scan_backward", (torch.randn_like(y), torch.randn_like(h), x.detach(), h.detach(),
                                         w_ih.detach(), w_hh.detach(), y)))
    xs, hs, _, w_ih_s, w_hh_s, bias_s = layer_tensors(1, dtype, requires_grad, step=True)
    calls.append(("irnn_step", (xs, hs, w_ih_s, w_hh_s, bias_s)))
    with torch.no_grad():
        h_new = op("irnn_step")(xs, hs, w_ih_s, w_hh_s, bias_s)
    calls.append(("irnn_step_backward", (torch.randn_like(h_new), xs.detach(), hs.detach(), w_ih_s.detach(),
                                         w_hh_s.detach(), h_new)))

    x, h, c, w_ih, w_hh, bias = layer_tensors(4, dtype, requires_grad)
    calls += [("lstm_scan_forward", (x, h, c, w_ih, w_hh, bias)), ("lstm_scan_forward", (x, h, c, w_ih, w_hh, None))]
    with torch.no_grad():
        y, h_n, c_n, cells, gates = op("lstm_scan_forward")(x, h, c, w_ih, w_hh, bias)
    detached = [t.detach() for t in (x, h, c, w_ih, w_hh)]
    calls.append(("lstm_scan_backward", (torch.randn_like(y), torch.randn_like(h_n), torch.randn_like(c_n),
                                         *detached, y, cells, gates)))
    # with the output projection of nn.LSTM(proj_size=P): h [B, P], w_hh [4H, P], w_hr [P, H]
    g = torch.Generator().manual_seed(7)
    hp, w_hh_p, w_hr = ((0.5 * torch.randn(*shape, dtype=dtype, generator=g)).requires_grad_(requires_grad)
                        for shape in ((B, P), (4 * H, P), (P, H)))
    calls.append(("lstm_scan_forward", (x, hp, c, w_ih, w_hh_p, bias, None, None, w_hr)))
    with torch.no_grad():
        y, h_n, c_n, cells, gates = op("lstm_scan_forward")(x, hp, c, w_ih, w_hh_p, bias, None, None, w_hr)
    detached = [t.detach() for t in (x, hp, c, w_ih, w_hh_p)]
    calls.append(("lstm_scan_backward", (torch.randn_like(y), torch.randn_like(h_n), torch.randn_like(c_n),
                                         *detached, y, cells, gates, True, None, None, w_hr.detach())))
    xs, hs, cs, w_ih_s, w_hh_s, bias_s = layer_tensors(4, dtype, requires_grad, step=True)
    calls.append(("lstm_step", (xs, hs, cs, w_ih_s, w_hh_s, bias_s)))
    with torch.no_grad():
        h_new, c_new, gates = op("lstm_step")(xs, hs, cs, w_ih_s, w_hh_s, bias_s)
    detached = [t.detach() for t in (xs, hs, cs, w_ih_s, w_hh_s)]
    calls.append(("lstm_step_backward", (torch.randn_like(h_new), torch.randn_like(c_new), *detached, c_new, gates)))
    return calls


def option_calls(dtype, requires_grad):
    """(op name, args) of the scans with every per-sequence option: the recurrent mask,
    lengths (0, partial and full) and, for the IRNN, the clip; forward and backward."""
    calls = []
    mask = (torch.rand(B, H, generator=torch.Generator().manual_seed(5)) > 0.3).to(dtype) * 1.5
    lengths = torch.tensor([T, 2, 0])
    x, h, c, w_ih, w_hh, bias = layer_tensors(1, dtype, requires_grad)
    calls.append(("irnn_scan_forward", (x, h, w_ih, w_hh, bias, mask, lengths, 0.7)))
    with torch.no_grad():
        y, _ = op("irnn_scan_forward")(x, h, w_ih, w_hh, bias, mask, lengths, 0.7)
    calls.append(("irnn_scan_backward", (torch.randn_like(y), torch.randn_like(h), x.detach(), h.detach(),
                                         w_ih.detach(), w_hh.detach(), y, True, mask, lengths, 0.7)))
    x, h, c, w_ih, w_hh, bias = layer_tensors(4, dtype, requires_grad)
    calls.append(("lstm_scan_forward", (x, h, c, w_ih, w_hh, bias, mask, lengths)))
    with torch.no_grad():
        y, h_n, c_n, cells, gates = op("lstm_scan_forward")(x, h, c, w_ih, w_hh, bias, mask, lengths)
    detached = [t.detach() for t in (x, h, c, w_ih, w_hh)]
    calls.append(("lstm_scan_backward", (torch.randn_like(y), torch.randn_like(h_n), torch.randn_like(c_n),
                                         *detached, y, cells, gates, True, mask, lengths)))
    return calls


DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def _opcheck(name, args):
    # forward ops with requires_grad inputs, so that their autograd registration is checked;
    # the backward ops have no autograd of their own (a create_graph backward recomputes
    # through the torch loop instead, tests/test_functional.py), so plain inputs
    if name.endswith("backward"):
        args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(op(name), args)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64", "bf16"])
@pytest.mark.parametrize("index", range(len(option_calls(torch.float32, True))))
def test_opcheck_with_every_option(index, dtype):
    _opcheck(*option_calls(dtype, requires_grad=True)[index])


def test_every_op_has_a_cpu_kernel():
    for name in OP_NAMES:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fused_rnn::{name}", "CPU"), name


def test_samples_cover_every_op():
    assert {name for name, _ in sample_calls(torch.float32, True)} == set(OP_NAMES)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64", "bf16"])
@pytest.mark.parametrize("index", range(len(sample_calls(torch.float32, True))))
def test_opcheck(index, dtype):
    _opcheck(*sample_calls(dtype, requires_grad=True)[index])


def test_build_info_describes_this_build():
    info = fused_rnn.build_info()
    assert info["extension_loaded"] is True
    assert "cpp" in info["backends"]
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]
    assert info["compiler"]
    if info["cuda_compiled"]:
        assert info["cuda_archs"] and all(a.startswith("sm_") for a in info["cuda_archs"])
        assert info["cuda_version"] >= 11000
    else:
        assert info["cuda_archs"] == []


class TinyCharModel(torch.nn.Module):
    """Embedding -> IRNN -> LSTM -> linear: both fused layers in one compiled graph."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(11, 6)
        self.irnn = fused_rnn.IRNN(6, 8, batch_first=True, backend="cpp")
        self.lstm = fused_rnn.LSTM(8, 7, batch_first=True, backend="cpp")
        self.head = torch.nn.Linear(7, 11)

    def forward(self, tokens):
        y, _ = self.irnn(self.embed(tokens))
        y, (h, c) = self.lstm(y)
        return self.head(y), h, c


def test_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    model = TinyCharModel()
    tokens = torch.randint(0, 11, (3, 9))
    compiled = torch.compile(model, fullgraph=True)
    eager_out = model(tokens)
    sum(o.square().sum() for o in eager_out).backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    compiled_out = compiled(tokens)
    sum(o.square().sum() for o in compiled_out).backward()
    # float32, same kernels on both sides; inductor may fuse the surrounding ops in another order
    torch.testing.assert_close(compiled_out, eager_out, rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, eager_grads[name], rtol=1e-5, atol=1e-6, msg=name)
