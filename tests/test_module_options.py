"""The modules' additions to torch.nn: PackedSequence and lengths= input (against
nn.RNN / nn.LSTM with the same state_dict), variational recurrent dropout,
DropConnect on W_hh and the IRNN's hidden_clip."""

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fused_rnn

LENGTHS = [5, 2, 7, 1, 7, 4]  # unsorted, with ties and a length-1 sequence


def _pair(cell, bidirectional, dtype=torch.float64):
    torch.manual_seed(0)
    kwargs = dict(num_layers=2, bidirectional=bidirectional)
    if cell == "irnn":
        reference = torch.nn.RNN(3, 6, nonlinearity="relu", **kwargs).to(dtype)
        fused = fused_rnn.IRNN(3, 6, **kwargs, dtype=dtype)
    else:
        reference = torch.nn.LSTM(3, 6, **kwargs).to(dtype)
        fused = fused_rnn.LSTM(3, 6, **kwargs, dtype=dtype)
    fused.load_state_dict(reference.state_dict())
    return reference, fused


def _run(module, inputs, hx, lengths=None):
    kwargs = {} if lengths is None else {"lengths": lengths}
    out, state = module(inputs, hx, **kwargs)
    return out, (state if isinstance(state, tuple) else (state,))


@pytest.mark.parametrize("enforce_sorted", [False, True], ids=["unsorted", "sorted"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("cell", ["irnn", "lstm"])
def test_packed_sequence_matches_torch_nn(cell, bidirectional, enforce_sorted):
    """Same state_dict, same PackedSequence: same packed output, final states and
    gradients of every parameter, the input and the initial states (float64: the
    orders of summation differ; 1e-10 leaves a wide margin over the ~1e-15 seen)."""
    reference, fused = _pair(cell, bidirectional)
    lengths = sorted(LENGTHS, reverse=True) if enforce_sorted else LENGTHS
    padded = torch.randn(max(lengths), len(lengths), 3, dtype=torch.float64)
    directions = 2 if bidirectional else 1
    h0 = torch.randn(2 * directions, len(lengths), 6, dtype=torch.float64)
    hx = h0 if cell == "irnn" else (h0, torch.randn_like(h0))
    results = []
    for module in (reference, fused):
        module.zero_grad()
        inp = padded.clone().requires_grad_()
        state = tuple(s.clone().requires_grad_() for s in (hx if isinstance(hx, tuple) else (hx,)))
        packed = pack_padded_sequence(inp, lengths, enforce_sorted=enforce_sorted)
        out, final = _run(module, packed, state if cell == "lstm" else state[0])
        y, out_lengths = pad_packed_sequence(out)
        assert out_lengths.tolist() == list(lengths)
        (y.sin().sum() + sum((f * (k + 1)).cos().sum() for k, f in enumerate(final))).backward()
        results.append((y, final, inp.grad, [s.grad for s in state],
                        {n: p.grad for n, p in module.named_parameters()}))
    (y0, f0, dx0, ds0, dp0), (y1, f1, dx1, ds1, dp1) = results
    close = dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(y1, y0, **close)
    for a, b in zip(f1, f0):
        torch.testing.assert_close(a, b, **close)
    torch.testing.assert_close(dx1, dx0, **close)
    for a, b in zip(ds1, ds0):
        torch.testing.assert_close(a, b, **close)
    for name, grad in dp0.items():
        torch.testing.assert_close(dp1[name], grad, **close, msg=name)


@pytest.mark.parametrize("cell", ["irnn", "lstm"])
def test_lengths_argument_equals_packed_input(cell):
    reference, fused = _pair(cell, bidirectional=True)
    padded = torch.randn(max(LENGTHS), len(LENGTHS), 3, dtype=torch.float64)
    packed_out, packed_state = _run(fused, pack_padded_sequence(padded, LENGTHS, enforce_sorted=False), None)
    out, state = _run(fused, padded, None, lengths=torch.tensor(LENGTHS))
    torch.testing.assert_close(out, pad_packed_sequence(packed_out)[0], rtol=0, atol=0)
    for a, b in zip(state, packed_state):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    batch_first = fused_rnn.IRNN(3, 6, batch_first=True, dtype=torch.float64) if cell == "irnn" else \
        fused_rnn.LSTM(3, 6, batch_first=True, dtype=torch.float64)
    y, _ = batch_first(padded.transpose(0, 1), lengths=LENGTHS)
    for b, length in enumerate(LENGTHS):
        assert not y[b, length:].any()  # zero beyond each length


def test_lengths_are_checked():
    module = fused_rnn.IRNN(3, 4)
    x = torch.randn(5, 2, 3)
    with pytest.raises(ValueError, match="lengths must be 2 integers"):
        module(x, lengths=[1, 2, 3])
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, T\] = \[0, 5\]"):
        module(x, lengths=[1, 6])
    with pytest.raises(ValueError, match="do not pass lengths= as well"):
        module(pack_padded_sequence(x, [5, 3]), lengths=[5, 3])


@pytest.mark.parametrize("cell", ["irnn", "lstm"])
def test_recurrent_dropout_statistics(cell):
    """The mask on h_{t-1}: fixed over time within a call, 0 or 1/(1-p) with mean 1,
    different across calls, reproducible under a seed, off in eval mode."""
    p = 0.3
    module_class = fused_rnn.IRNN if cell == "irnn" else fused_rnn.LSTM
    module = module_class(4, 64, recurrent_dropout=p, dtype=torch.float64)
    masks = []
    original = fused_rnn.functional.irnn if cell == "irnn" else fused_rnn.functional.lstm

    def spy(*args, recurrent_mask=None, **kwargs):
        masks.append(recurrent_mask)
        return original(*args, recurrent_mask=recurrent_mask, **kwargs)

    x = torch.randn(6, 32, 4, dtype=torch.float64)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fused_rnn.functional, cell, spy)
        torch.manual_seed(1)
        module(x)
        module(x)
        torch.manual_seed(1)
        module(x)
        module.eval()
        module(x)
    first, second, repeat, evaluation = masks
    assert first.shape == (32, 64)  # one mask per sequence and unit, used at every step
    values = set(first.unique().tolist())
    assert values <= {0.0, 1.0 / (1.0 - p)} and len(values) == 2
    assert abs(float((first == 0).double().mean()) - p) < 0.05  # 2048 draws: sd 0.01
    assert abs(float(first.mean()) - 1.0) < 0.08
    assert not torch.equal(first, second) and torch.equal(first, repeat)
    assert evaluation is None


@pytest.mark.parametrize("cell", ["irnn", "lstm"])
def test_recurrent_dropout_is_the_mask_in_the_kernel(cell):
    """A module with recurrent_dropout gives what the functional layer gives with the
    mask it drew (the same random stream), on every backend that runs it."""
    module_class = fused_rnn.IRNN if cell == "irnn" else fused_rnn.LSTM
    module = module_class(4, 8, recurrent_dropout=0.5, dtype=torch.float64)
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    torch.manual_seed(3)
    y, _ = module(x)
    torch.manual_seed(3)
    mask = x.new_empty(3, 8).bernoulli_(0.5) / 0.5
    weights = module.all_weights[0]
    if cell == "irnn":
        want, _ = fused_rnn.irnn(x, None, *weights, recurrent_mask=mask, backend="torch")
    else:
        want, _ = fused_rnn.lstm(x, None, *weights, recurrent_mask=mask, backend="torch")
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    module.eval()
    plain = fused_rnn.irnn(x, None, *weights)[0] if cell == "irnn" else fused_rnn.lstm(x, None, *weights)[0]
    torch.testing.assert_close(module(x)[0], plain, rtol=0, atol=0)


def test_weight_dropout_and_hidden_clip():
    module = fused_rnn.IRNN(4, 8, weight_dropout=0.5, hidden_clip=0.05, hh_init="pytorch", ih_init="pytorch")
    x = torch.randn(5, 3, 4)
    y, _ = module(x)
    assert 0 < float(y.detach().max()) <= 0.05 + 1e-7
    y.sum().backward()
    assert module.weight_hh_l0.grad is not None
    weights = [w.detach() for w in module.all_weights[0]]
    undropped, _ = fused_rnn.irnn(x, None, *weights, hidden_clip=0.05)
    assert not torch.equal(y.detach(), undropped)  # training: W_hh had half its entries dropped
    module.eval()
    with torch.no_grad():  # eval: no dropout, so the module is the functional layer on its own weights
        torch.testing.assert_close(module(x)[0], undropped, rtol=0, atol=0)
    assert "weight_dropout=0.5" in repr(module) and "hidden_clip=0.05" in repr(module)
    with pytest.raises(ValueError, match="recurrent_dropout must be a probability"):
        fused_rnn.LSTM(2, 3, recurrent_dropout=1.0)
    with pytest.raises(ValueError, match="hidden_clip must be a positive number"):
        fused_rnn.IRNN(2, 3, hidden_clip=-1.0)
    with pytest.raises(ValueError, match="hidden_clip must be a positive number"):
        fused_rnn.IRNN(2, 3, hidden_clip=True)  # a bool is no number here
