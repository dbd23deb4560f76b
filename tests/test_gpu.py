"""On a GPU only (skipped cleanly without one): the regimes the small shapes of
test_cuda.py and test_triton.py do not reach. The persistent scans with many thread
blocks (H >= 1024: up to one block per SM, several units per warp) and the largest H
they keep on chip; the Triton scans at the same sizes and with every option; opcheck of
every fused_rnn:: op on CUDA tensors, float32 and bfloat16."""

import pytest
import torch

import fused_rnn
from helpers import check_layer_against_reference, check_options
from test_ops import H, P, op, sample_calls

ON_GPU = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not ON_GPU, reason="no CUDA device")
GPU_BACKENDS = [b for b in ("cuda", "triton") if b in fused_rnn.available_backends("cuda")] if ON_GPU else []


def _largest_on_chip(gates: int) -> int:
    properties = torch.cuda.get_device_properties(0)
    smem = getattr(properties, "shared_memory_per_block_optin", 0) or 227 * 1024
    return fused_rnn._C.cuda_max_hidden_on_chip(gates, 4, properties.multi_processor_count, smem)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("batch", [1, 37])
@pytest.mark.parametrize("hidden", [1024, 2048, "largest"])
@pytest.mark.parametrize("cell", ["irnn", "lstm"])
def test_many_blocks_match_reference(cell, hidden, batch, backend):
    """float32, against the NumPy reference (outputs, final states, every gradient) with
    test_cpu's float32 tolerances; H = 2048 and the largest on-chip H use every SM."""
    if backend not in GPU_BACKENDS:
        pytest.skip(f"backend {backend!r} is not available")
    if hidden == "largest":
        hidden = _largest_on_chip(1 if cell == "irnn" else 4)
    if backend == "cuda":
        reason = fused_rnn.select_backend("cuda", torch.float32, "cuda", cell=cell, hidden=hidden, batch=batch)
        assert reason.name == "cuda"
    check_layer_against_reference(cell, (6, batch, 16, hidden), True, torch.float32, backend, device="cuda")


@pytest.mark.parametrize("used", [("recurrent_mask",), ("lengths",), ("hidden_clip",),
                                  ("recurrent_mask", "lengths", "hidden_clip")], ids="+".join)
@pytest.mark.parametrize("shape", [(1, 1, 3, 5), (9, 37, 4, 1024)], ids=lambda s: "T{}B{}I{}H{}".format(*s))
@pytest.mark.parametrize("cell", ["irnn", "lstm"])
def test_triton_options_on_gpu_match_reference(cell, shape, used):
    if used == ("hidden_clip",) and cell == "lstm":
        pytest.skip("hidden_clip is the IRNN's")
    check_options(cell, shape, torch.float32, "triton", used, device="cuda")


@pytest.mark.parametrize("backend", GPU_BACKENDS + ["nn"])
def test_cells_under_cuda_autocast_give_torch_nn_s_dtypes(backend):
    """Under torch.autocast("cuda", float16) the cells return what nn.RNNCell and
    nn.LSTMCell return there: CUDA's autocast runs both cells in float16 (unlike the CPU's,
    where nn.LSTMCell returns float32: tests/test_functional.py)."""
    torch.manual_seed(0)
    x, h, c = (torch.randn(3, n, device="cuda") for n in (5, 7, 7))
    rnn_cell = torch.nn.RNNCell(5, 7, nonlinearity="relu").cuda()
    lstm_cell = torch.nn.LSTMCell(5, 7).cuda()
    with torch.autocast("cuda", dtype=torch.float16):
        want_rnn, want_lstm = rnn_cell(x, h), lstm_cell(x, (h, c))
        got_rnn = fused_rnn.irnn_cell(x, h, *rnn_cell.parameters(), backend=backend)
        got_lstm = fused_rnn.lstm_cell(x, (h, c), *lstm_cell.parameters(), backend=backend)
    assert got_rnn.dtype == want_rnn.dtype
    assert [t.dtype for t in got_lstm] == [t.dtype for t in want_lstm]
    # float16 keeps 11 significant bits (eps 9.8e-4): one step's roundings of O(1) values
    torch.testing.assert_close(got_rnn.float(), want_rnn.float(), rtol=1e-2, atol=5e-3)
    for got, want in zip(got_lstm, want_lstm):
        torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=5e-3)


def _on_cuda(args, dtype):
    def move(a):
        if not isinstance(a, torch.Tensor):
            return a
        moved = a.detach().to("cuda", dtype if a.is_floating_point() else a.dtype)
        return moved.requires_grad_(a.requires_grad)
    return tuple(move(a) for a in args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("index", range(len(sample_calls(torch.float32, True))))
def test_opcheck_on_cuda(index, dtype):
    """test_ops.py's calls of every op, on CUDA tensors (the CUDA kernels have no output
    projection: those calls must be refused, by the real kernel and the fake alike)."""
    name, args = sample_calls(torch.float32, requires_grad=True)[index]
    if name.endswith("backward"):
        args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    args = _on_cuda(args, dtype)
    projected = name.startswith("lstm_scan") and isinstance(args[-1], torch.Tensor) and args[-1].shape == (P, H)
    if projected:  # the last argument is w_hr [P, H] (proj_size)
        with pytest.raises(RuntimeError, match="projection"):
            op(name)(*args)
        return
    torch.library.opcheck(op(name), args)
