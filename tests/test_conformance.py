"""Drop-in conformance: the behaviours PyTorch's own tests check for nn.RNN(relu),
nn.LSTM, nn.RNNCell(relu) and nn.LSTMCell, run on fused_rnn's modules next to
torch.nn's.

Written for this project; the behaviours follow PyTorch's test_nn.py RNN/LSTM tests and
the generic module tests of test_modules.py (their names in brackets): signatures and
argument checks [test_rnn_args_check, test_errors], exception classes [test_errors],
PackedSequence [test_variable_sequence], unbatched input [test_forward of the
no-batch-dim samples], all_weights and flatten_parameters, save/load/pickle/deepcopy
[test_save_load, test_pickle], .to() [test_to, test_multiple_device_transfer], meta-device
construction [test_device_ctx_init, test_factory_kwargs, test_to_empty], weight
reassignment [test_module_apply_inplace_op, test_cudnn_weight_tying], dropout
[test_RNN_dropout, test_if_train_and_eval_modes_differ, test_RNN_change_dropout], first
and second derivatives [test_grad, test_gradgrad, test_LSTM_grad_and_gradgrad], and
proj_size [test_lstm_proj].

Where fused_rnn deliberately differs from torch.nn, the test says so (DELIBERATE).

Tolerances: float64 throughout (rtol 1e-10, atol 1e-12, as tests/test_modules.py: the
two sides sum the same O(1) products in another order over at most a few dozen steps,
rounding differences stay below 1e-13), except where a test says otherwise.
"""

import copy
import inspect
import io
import pickle

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fused_rnn

BACKENDS = fused_rnn.available_backends("cpu")
F64 = dict(rtol=1e-10, atol=1e-12)
KINDS = ["irnn", "lstm"]


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def layer_pair(kind, *args, backend="auto", **kwargs):
    """(fused, torch.nn) layers built from the same arguments and holding the same weights."""
    torch.manual_seed(0)
    if kind == "irnn":
        reference = nn.RNN(*args, nonlinearity="relu", **kwargs)
        ours = fused_rnn.IRNN(*args, backend=backend, **kwargs)
    else:
        reference = nn.LSTM(*args, **kwargs)
        ours = fused_rnn.LSTM(*args, backend=backend, **kwargs)
    ours.load_state_dict(reference.state_dict())
    return ours, reference


def cell_pair(kind, *args, backend="auto", **kwargs):
    torch.manual_seed(0)
    if kind == "irnn":
        reference, ours = nn.RNNCell(*args, nonlinearity="relu", **kwargs), fused_rnn.IRNNCell(*args, backend=backend,
                                                                                              **kwargs)
    else:
        reference, ours = nn.LSTMCell(*args, **kwargs), fused_rnn.LSTMCell(*args, backend=backend, **kwargs)
    ours.load_state_dict(reference.state_dict())
    return ours, reference


def flat(output):
    """Every tensor of a module's output, in order (PackedSequence -> its data)."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, nn.utils.rnn.PackedSequence):
        return [output.data]
    return [t for part in output for t in flat(part)]


def assert_same_outputs(ours, reference, **tolerance):
    got, want = flat(ours), flat(reference)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **(tolerance or F64))


def raised(make, *args, **kwargs):
    """The exception `make(*args, **kwargs)` raises, or None."""
    try:
        make(*args, **kwargs)
    except Exception as error:  # noqa: BLE001 - the class is what is checked
        return error
    return None


# --------------------------------------------------------------------------- signatures


def test_irnn_takes_nn_rnn_positional_arguments():
    """nn.RNN(input_size, hidden_size, num_layers, nonlinearity, bias, batch_first, dropout,
    bidirectional): the same call builds the same layer. (device and dtype come next in
    nn.RNN's documented signature; its implementation would read a ninth positional
    argument as RNNBase's proj_size, so both are passed by keyword here.)"""
    args = (3, 5, 2, "relu", False, True, 0.25, True)
    ours, reference = fused_rnn.IRNN(*args, dtype=torch.float64), nn.RNN(*args, dtype=torch.float64)
    for name in ("input_size", "hidden_size", "num_layers", "nonlinearity", "bias", "batch_first", "dropout",
                 "bidirectional", "proj_size", "mode"):
        assert getattr(ours, name) == getattr(reference, name), name
    assert [(n, p.shape, p.dtype) for n, p in ours.named_parameters()] == \
        [(n, p.shape, p.dtype) for n, p in reference.named_parameters()]


def test_lstm_takes_nn_lstm_positional_arguments():
    """nn.LSTM(input_size, hidden_size, num_layers, bias, batch_first, dropout,
    bidirectional, proj_size, device, dtype)."""
    args = (3, 6, 2, False, True, 0.25, True, 4, None, torch.float64)
    ours, reference = fused_rnn.LSTM(*args), nn.LSTM(*args)
    for name in ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout", "bidirectional",
                 "proj_size", "mode"):
        assert getattr(ours, name) == getattr(reference, name), name
    assert [(n, p.shape, p.dtype) for n, p in ours.named_parameters()] == \
        [(n, p.shape, p.dtype) for n, p in reference.named_parameters()]


@pytest.mark.parametrize("kind", KINDS)
def test_cells_take_nn_cell_positional_arguments(kind):
    """nn.RNNCell(input_size, hidden_size, bias, nonlinearity, device, dtype);
    nn.LSTMCell(input_size, hidden_size, bias, device, dtype)."""
    if kind == "irnn":
        args = (3, 5, False, "relu", None, torch.float64)
        ours, reference = fused_rnn.IRNNCell(*args), nn.RNNCell(*args)
        assert ours.nonlinearity == reference.nonlinearity == "relu"
    else:
        args = (3, 5, False, None, torch.float64)
        ours, reference = fused_rnn.LSTMCell(*args), nn.LSTMCell(*args)
    assert (ours.input_size, ours.hidden_size, ours.bias) == (reference.input_size, reference.hidden_size, False)
    assert [(n, p.shape, p.dtype) for n, p in ours.named_parameters()] == \
        [(n, p.shape, p.dtype) for n, p in reference.named_parameters()]
    assert ours.bias_ih is None and ours.bias_hh is None


@pytest.mark.parametrize("module", [fused_rnn.IRNN, fused_rnn.LSTM, fused_rnn.IRNNCell, fused_rnn.LSTMCell])
def test_the_packages_own_options_are_keyword_only(module):
    """Only torch.nn's arguments are positional: backend, the IRNN init options,
    recurrent_dropout, weight_dropout and hidden_clip can never be taken for one of them."""
    own = {"backend", "hh_init", "hh_scale", "ih_init", "ih_std", "recurrent_dropout", "weight_dropout",
           "hidden_clip"}
    parameters = inspect.signature(module.__init__).parameters
    for name in own & set(parameters):
        assert parameters[name].kind is inspect.Parameter.KEYWORD_ONLY, name
    positional = [n for n, p in parameters.items() if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD][1:]
    torch_module = {fused_rnn.IRNN: nn.RNN, fused_rnn.LSTM: nn.LSTM, fused_rnn.IRNNCell: nn.RNNCell,
                    fused_rnn.LSTMCell: nn.LSTMCell}[module]
    expected = {nn.RNN: ["input_size", "hidden_size", "num_layers", "nonlinearity", "bias", "batch_first", "dropout",
                         "bidirectional", "device", "dtype"],
                nn.LSTM: ["input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
                          "bidirectional", "proj_size", "device", "dtype"]}.get(torch_module)
    if expected is None:  # the cells' signatures are explicit in torch
        expected = [n for n, p in inspect.signature(torch_module.__init__).parameters.items()][1:]
    assert positional == expected
    with pytest.raises(TypeError, match="positional argument"):  # one too many
        module(*([3, 5] + [None] * (len(positional) - 1)))


# ------------------------------------------------------------------ argument checks

# (what, arguments, the class torch.nn raises (torch 2.14); the fused modules raise an
# instance of it). The layers' checks are those of nn.RNNBase; the cells' of nn.RNNCell.
LAYER_ARGUMENT_ERRORS = [
    ("hidden_size 0", (10, 0, 1), {}, ValueError),
    ("num_layers 0", (10, 10, 0), {}, ValueError),
    ("input_size 0", (0, 5), {}, ValueError),
    ("bias=0", (3, 5), {"bias": 0}, TypeError),
    ("bias=1", (3, 5), {"bias": 1}, TypeError),
    ("bias='True'", (3, 5), {"bias": "True"}, TypeError),
    ("batch_first=0", (3, 5), {"batch_first": 0}, TypeError),
    ("batch_first='False'", (3, 5), {"batch_first": "False"}, TypeError),
    ("float input_size", (3.0, 5), {}, TypeError),
    ("str input_size", ("10", 5), {}, TypeError),
    ("float hidden_size", (3, 5.0), {}, TypeError),
    ("dropout 2", (3, 5), {"dropout": 2}, ValueError),
    ("dropout True", (3, 5), {"dropout": True}, ValueError),
    ("num_layers 1.5", (3, 5, 1.5), {}, TypeError),
]


def _torch_layer(kind, *args, **kwargs):
    return nn.RNN(*args, nonlinearity="relu", **kwargs) if kind == "irnn" else nn.LSTM(*args, **kwargs)


def _fused_layer(kind, *args, **kwargs):
    return fused_rnn.IRNN(*args, **kwargs) if kind == "irnn" else fused_rnn.LSTM(*args, **kwargs)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", LAYER_ARGUMENT_ERRORS, ids=lambda c: c[0])
def test_layer_arguments_are_checked_like_torch(kind, case):
    _, args, kwargs, expected = case
    ours = raised(_fused_layer, kind, *args, **kwargs)
    assert isinstance(ours, expected), f"{case[0]}: got {ours!r}"
    theirs = raised(_torch_layer, kind, *args, **kwargs)
    if theirs is not None:  # older torch releases check fewer arguments
        assert isinstance(ours, type(theirs)), f"{case[0]}: torch raises {theirs!r}, fused_rnn {ours!r}"


def test_proj_size_is_checked_like_torch():
    for proj_size, expected in [(6, ValueError), (7, ValueError), (-1, ValueError)]:
        theirs = raised(nn.LSTM, 3, 6, proj_size=proj_size)
        ours = raised(fused_rnn.LSTM, 3, 6, proj_size=proj_size)
        assert isinstance(theirs, expected) and isinstance(ours, type(theirs)), proj_size
    assert isinstance(raised(fused_rnn.LSTM, 3, 6, proj_size=2.0), TypeError)


def test_nonlinearity_other_than_relu_points_to_torch():
    """DELIBERATE: an IRNN is a ReLU RNN; 'tanh' is refused with a pointer to nn.RNN."""
    for make in (lambda n: fused_rnn.IRNN(3, 5, nonlinearity=n), lambda n: fused_rnn.IRNNCell(3, 5, nonlinearity=n)):
        with pytest.raises(ValueError, match="torch.nn.RNN"):
            make("tanh")
        with pytest.raises(ValueError, match="Unknown nonlinearity"):
            make("sigmoid")
    with pytest.raises(ValueError, match="Unknown nonlinearity"):  # torch.nn's class for the same mistake
        nn.RNN(3, 5, nonlinearity="sigmoid")


def test_bidirectional_must_be_a_bool():
    """DELIBERATE: torch.nn takes any value for bidirectional (bidirectional='False' makes
    a bidirectional RNN); fused_rnn checks it as torch checks bias and batch_first."""
    with pytest.raises(TypeError, match="bidirectional should be of type bool"):
        fused_rnn.LSTM(3, 5, bidirectional="False")


@pytest.mark.parametrize("kind", KINDS)
def test_cells_of_size_zero_work_as_torch(kind):
    """nn.RNNCell(10, 0) returns an empty state [test_RNN_cell_forward_zero_hidden_size]."""
    for sizes in [(10, 0), (0, 4)]:
        ours, reference = cell_pair(kind, *sizes, dtype=torch.float64)
        x = torch.randn(2, sizes[0], dtype=torch.float64)
        assert_same_outputs(ours(x), reference(x))


@pytest.mark.parametrize("kind", KINDS)
def test_cell_arguments_are_checked_like_torch(kind):
    make_ours = fused_rnn.IRNNCell if kind == "irnn" else fused_rnn.LSTMCell
    make_theirs = (lambda *a: nn.RNNCell(*a, nonlinearity="relu")) if kind == "irnn" else nn.LSTMCell
    for args in [(3, -1), (3, 2.0), ("3", 5)]:
        theirs, ours = raised(make_theirs, *args), raised(make_ours, *args)
        assert theirs is not None and isinstance(ours, type(theirs)), (args, theirs, ours)


# -------------------------------------------------------------- exception classes

def _layer_forward_mistakes(kind):
    """(what, forward arguments) of a layer built as (3, 5) (sequence first)."""
    x = torch.randn(4, 2, 3)
    hx = torch.randn(1, 2, 5)
    state = hx if kind == "irnn" else (hx, hx)

    def with_h(h):
        return h if kind == "irnn" else (h, hx)

    mistakes = [
        ("input size", (torch.randn(4, 2, 4),)),
        ("input rank 4", (torch.randn(4, 2, 3, 1),)),
        ("input rank 1", (torch.randn(3),)),
        ("input dtype", (x.double(),)),
        ("input of integers", (x.int(),)),
        ("hx hidden size", (x, with_h(torch.randn(1, 2, 6)))),
        ("hx batch", (x, with_h(torch.randn(1, 3, 5)))),
        ("hx layers", (x, with_h(torch.randn(2, 2, 5)))),
        ("hx rank for batched input", (x, with_h(torch.randn(2, 5)))),
        ("hx dtype", (x, with_h(hx.double()))),
        ("hx device", (x, with_h(torch.empty(1, 2, 5, device="meta")))),
    ]
    if kind == "lstm":
        mistakes += [("c0 size", (x, (hx, torch.randn(1, 2, 6)))), ("hx of three", (x, (hx, hx, hx)))]
    del state
    return mistakes


@pytest.mark.parametrize("kind", KINDS)
def test_layer_forward_mistakes_raise_torchs_exception_class(kind):
    """For each mistake torch.nn raises for, fused_rnn raises an instance of the same
    class (messages are fused_rnn's own, naming the argument and the expected shape)."""
    ours_layer, reference = layer_pair(kind, 3, 5)
    for what, args in _layer_forward_mistakes(kind):
        theirs, ours = raised(reference, *args), raised(ours_layer, *args)
        assert ours is not None, what
        if theirs is not None:
            assert isinstance(ours, type(theirs)), f"{what}: torch raises {theirs!r}, fused_rnn {ours!r}"


@pytest.mark.parametrize("kind", KINDS)
def test_cell_forward_mistakes_raise_torchs_exception_class(kind):
    """The error samples of torch's module tests for nn.RNNCell / nn.LSTMCell."""
    ours_cell, reference = cell_pair(kind, 10, 20)

    def hx(*shape):
        h = torch.randn(*shape)
        return h if kind == "irnn" else (h, h)

    mistakes = [
        ("input size", (torch.randn(3, 11), hx(3, 20))),
        ("hidden size", (torch.randn(3, 10), hx(3, 21))),
        ("batch", (torch.randn(3, 10), hx(5, 20))),
        ("hx rank 4", (torch.randn(3, 10), hx(3, 1, 1, 20))),
        ("input rank 3", (torch.randn(3, 10, 1),)),
        ("no broadcasting of a batch of one", (torch.randn(3, 10), hx(1, 20))),
        ("input dtype", (torch.randn(3, 10).double(), hx(3, 20))),
    ]
    for what, args in mistakes:
        theirs, ours = raised(reference, *args), raised(ours_cell, *args)
        assert theirs is not None and ours is not None, what
        assert isinstance(ours, type(theirs)), f"{what}: torch raises {theirs!r}, fused_rnn {ours!r}"


def test_exception_classes_keep_fused_rnns_own():
    """The classes derive from both sides: code that caught fused_rnn's ValueError /
    TypeError keeps working."""
    layer = fused_rnn.IRNN(3, 5)
    with pytest.raises(ValueError):
        layer(torch.randn(4, 2, 4))
    with pytest.raises(RuntimeError):
        layer(torch.randn(4, 2, 4))
    with pytest.raises(TypeError):
        layer(torch.randn(4, 2, 3).double())
    with pytest.raises(fused_rnn.InputTypeError):
        layer(torch.randn(4, 2, 3).double())
    with pytest.raises(fused_rnn.InputError):
        layer(torch.randn(4, 2, 3), torch.randn(1, 3, 5))


# ------------------------------------------------------------------ forward behaviour

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("enforce_sorted", [True, False], ids=["sorted", "unsorted"])
@pytest.mark.parametrize("kind", KINDS)
def test_packed_sequence_matches_torch(kind, enforce_sorted, backend):
    """[test_variable_sequence] outputs, their packing and the final states in the
    batch's own order, with a given hx, two layers, both directions."""
    ours, reference = layer_pair(kind, 3, 5, 2, bidirectional=True, dtype=torch.float64, backend=backend)
    lengths = torch.tensor([6, 4, 4, 1]) if enforce_sorted else torch.tensor([4, 6, 1, 4])
    x = torch.randn(6, 4, 3, dtype=torch.float64)
    h = torch.randn(4, 4, 5, dtype=torch.float64)
    hx = h if kind == "irnn" else (h, torch.randn_like(h))
    packed = pack_padded_sequence(x, lengths, enforce_sorted=enforce_sorted)
    got, want = ours(packed, hx), reference(packed, hx)
    assert torch.equal(got[0].batch_sizes, want[0].batch_sizes)
    assert (got[0].sorted_indices is None) == (want[0].sorted_indices is None)
    assert_same_outputs(got, want)
    unpacked, unpacked_lengths = pad_packed_sequence(got[0])
    assert torch.equal(unpacked_lengths, lengths)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_unbatched_input_matches_torch(kind, batch_first):
    """The no-batch-dim samples of torch's module tests: input [T, I], hx [L*D, H]."""
    ours, reference = layer_pair(kind, 2, 3, 2, batch_first=batch_first, bidirectional=True, dtype=torch.float64)
    x = torch.randn(3, 2, dtype=torch.float64)
    assert_same_outputs(ours(x), reference(x))
    h = torch.randn(4, 3, dtype=torch.float64)
    hx = h if kind == "irnn" else (h, torch.randn_like(h))
    assert_same_outputs(ours(x, hx), reference(x, hx))
    cell, reference_cell = cell_pair(kind, 5, 10, dtype=torch.float64)
    x = torch.randn(5, dtype=torch.float64)
    h = torch.randn(10, dtype=torch.float64)
    hx = h if kind == "irnn" else (h, torch.randn_like(h))
    assert_same_outputs(cell(x, hx), reference_cell(x, hx))
    assert_same_outputs(cell(x), reference_cell(x))


def test_a_sequence_of_length_zero_returns_the_initial_state():
    """DELIBERATE: torch.nn raises for T = 0 ("Expected sequence length to be larger than
    0"); fused_rnn returns an empty output and the initial state, so that an empty
    stretch of a stream needs no special case."""
    ours, reference = layer_pair("lstm", 3, 5)
    x = torch.randn(0, 2, 3)
    assert raised(reference, x) is not None
    h, c = torch.randn(1, 2, 5), torch.randn(1, 2, 5)
    y, (h_n, c_n) = ours(x, (h, c))
    assert y.shape == (0, 2, 5) and torch.equal(h_n, h) and torch.equal(c_n, c)


# ------------------------------------------------------- weights and module protocol

@pytest.mark.parametrize("options", [{}, {"num_layers": 2, "bidirectional": True, "bias": False}])
@pytest.mark.parametrize("kind", KINDS + ["lstm_proj"])
def test_all_weights_and_flat_weight_names_match_torch(kind, options):
    if kind == "lstm_proj":
        kind, options = "lstm", {**options, "proj_size": 3}
    ours, reference = layer_pair(kind, 4, 6, **options)
    assert ours._flat_weights_names == reference._flat_weights_names
    assert [[tuple(p.shape) for p in w] for w in ours.all_weights] == \
        [[tuple(p.shape) for p in w] for w in reference.all_weights]
    assert all(a is b for a, b in zip(ours._flat_weights, [getattr(ours, n) for n in ours._flat_weights_names]))
    assert list(ours.state_dict()) == list(reference.state_dict())


@pytest.mark.parametrize("kind", KINDS)
def test_flatten_parameters_is_harmless(kind):
    ours, _ = layer_pair(kind, 3, 5, 2, dtype=torch.float64)
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    before = ours(x)
    ours.flatten_parameters()
    assert_same_outputs(ours(x), before, rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_loads_both_ways_and_with_assign(kind):
    ours, reference = layer_pair(kind, 3, 5, 2, bidirectional=True, dtype=torch.float64)
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    other = _torch_layer(kind, 3, 5, 2, bidirectional=True, dtype=torch.float64)
    other.load_state_dict(ours.state_dict())  # fused -> torch.nn
    assert_same_outputs(ours(x), other(x))
    fresh = _fused_layer(kind, 3, 5, 2, bidirectional=True, dtype=torch.float64)
    fresh.load_state_dict(reference.state_dict(), assign=True)  # torch.nn -> fused, parameters replaced
    assert fresh.weight_hh_l0 is not None and isinstance(fresh.weight_hh_l0, nn.Parameter)
    assert_same_outputs(fresh(x), reference(x))


def test_modules_pickled_by_the_first_release_still_load():
    """A whole IRNN/LSTM pickled by fused_rnn 0.1.0 (weight names in _weight_names, no
    proj_size or nonlinearity attribute) unpickles into a working module."""
    for kind in KINDS:
        layer, _ = layer_pair(kind, 3, 5, 2, dtype=torch.float64)
        state = dict(layer.__dict__)
        state["_weight_names"] = [tuple(names) for names in state.pop("_all_weights")]
        del state["proj_size"]
        state.pop("nonlinearity", None)
        old = type(layer).__new__(type(layer))
        old.__setstate__(state)
        x = torch.randn(4, 2, 3, dtype=torch.float64)
        assert_same_outputs(old(x), layer(x), rtol=0, atol=0)
        assert old.proj_size == 0 and (kind == "lstm" or old.nonlinearity == "relu")


@pytest.mark.parametrize("kind", KINDS)
def test_pickle_deepcopy_and_torch_save(kind):
    """[test_save_load, test_pickle] the copies compute what the original computes and
    keep the package's own settings."""
    ours, _ = layer_pair(kind, 3, 5, 2, dtype=torch.float64, backend="torch")
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    want = ours(x)
    buffer = io.BytesIO()
    torch.save(ours, buffer)
    buffer.seek(0)
    copies = [pickle.loads(pickle.dumps(ours)), copy.deepcopy(ours), torch.load(buffer, weights_only=False)]
    for duplicate in copies:
        assert type(duplicate) is type(ours) and duplicate.backend == "torch"
        assert_same_outputs(duplicate(x), want, rtol=0, atol=0)
    cell, _ = cell_pair(kind, 3, 5, dtype=torch.float64)
    x = torch.randn(2, 3, dtype=torch.float64)
    assert_same_outputs(copy.deepcopy(cell)(x), cell(x), rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_to_dtype_and_device(kind):
    """[test_to] .double(), .to(dtype), .to(device): parameters follow, outputs in the
    new dtype match torch.nn moved the same way."""
    ours, reference = layer_pair(kind, 3, 5, 2)
    ours, reference = ours.to(torch.float64), reference.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in ours.parameters())
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    assert_same_outputs(ours(x), reference(x))
    ours.float()
    assert ours(x.float())[0].dtype == torch.float32
    moved = copy.deepcopy(ours).to("meta")
    assert all(p.device.type == "meta" for p in moved.parameters())
    y = moved(torch.empty(4, 2, 3, device="meta"))[0]  # shapes only: the torch loop on meta tensors
    assert y.device.type == "meta" and y.shape == (4, 2, 5)


@pytest.mark.parametrize("kind", KINDS)
def test_meta_device_construction_then_to_empty(kind):
    """[test_device_ctx_init, test_factory_kwargs, test_to_empty] construction on the meta
    device allocates nothing; to_empty + reset_parameters makes a working layer."""
    with torch.device("meta"):
        layer = _fused_layer(kind, 3, 5, 2)
    assert all(p.device.type == "meta" for p in layer.parameters())
    layer = _fused_layer(kind, 3, 5, 2, device="meta", dtype=torch.float64)
    assert all(p.device.type == "meta" and p.dtype == torch.float64 for p in layer.parameters())
    layer.to_empty(device="cpu")
    layer.reset_parameters()
    y = flat(layer(torch.randn(4, 2, 3, dtype=torch.float64)))[0]
    assert y.shape == (4, 2, 5) and torch.isfinite(y).all()
    cell = (fused_rnn.IRNNCell if kind == "irnn" else fused_rnn.LSTMCell)(3, 5, device="meta")
    assert cell.weight_hh.device.type == "meta"


@pytest.mark.parametrize("kind", KINDS)
def test_weight_reassignment_is_used(kind):
    """A parameter replaced after construction (weight tying, weight norm, a
    functional_call) is what the next forward uses, as in torch.nn."""
    ours, reference = layer_pair(kind, 3, 5, dtype=torch.float64)
    new = nn.Parameter(torch.randn_like(reference.weight_hh_l0))
    ours.weight_hh_l0, reference.weight_hh_l0 = new, new
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    assert_same_outputs(ours(x), reference(x))
    # a plain tensor in place of the parameter (AWD-LSTM's WeightDrop deletes and re-sets it)
    del ours.weight_ih_l0
    ours.weight_ih_l0 = reference.weight_ih_l0.detach() * 2
    with torch.no_grad():
        reference.weight_ih_l0.mul_(2)
    assert_same_outputs(ours(x), reference(x))
    params = {name: torch.randn_like(p) for name, p in reference.named_parameters()}
    assert_same_outputs(torch.func.functional_call(layer_pair(kind, 3, 5, dtype=torch.float64)[0], params, (x,)),
                        torch.func.functional_call(reference, params, (x,)))


# ----------------------------------------------------------------------- dropout

@pytest.mark.parametrize("kind", KINDS)
def test_dropout_differs_in_train_and_matches_torch_in_eval(kind):
    """[test_if_train_and_eval_modes_differ, test_RNN_dropout] dropout between layers acts
    in training only; in eval the layers equal torch.nn's; changing .dropout after
    construction takes effect [test_RNN_change_dropout]."""
    ours, reference = layer_pair(kind, 3, 5, 3, dropout=0.5, dtype=torch.float64)
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    ours.eval(), reference.eval()
    assert_same_outputs(ours(x), reference(x))
    ours.train()
    torch.manual_seed(1)
    first = flat(ours(x))[0]
    torch.manual_seed(2)
    second = flat(ours(x))[0]
    assert not torch.equal(first, second)
    ours.dropout = 0.0
    reference.train()
    reference.dropout = 0.0
    assert_same_outputs(ours(x), reference(x))


def test_dropout_zeroes_whole_fraction_between_layers():
    """p = 1 between layers: the second layer sees zeros, so its output depends on its
    biases only, as torch.nn's (dropout 1 is allowed there)."""
    ours, reference = layer_pair("irnn", 3, 5, 2, dropout=1.0, dtype=torch.float64)
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    assert_same_outputs(ours(x), reference(x))


# ------------------------------------------------------------------- derivatives

def _module_function(module, names):
    """A function of (input, hx..., *parameters) through torch.func.functional_call."""
    def run(x, *rest):
        states, params = rest[:-len(names)], rest[-len(names):]
        hx = None if not states else (states[0] if len(states) == 1 else tuple(states))
        out = torch.func.functional_call(module, dict(zip(names, params)), (x,) if hx is None else (x, hx))
        return tuple(flat(out))
    return run


MODULE_CASES = {
    "irnn": lambda b: fused_rnn.IRNN(2, 3, 2, bidirectional=True, backend=b, hh_init="pytorch", ih_init="pytorch",
                                     dtype=torch.float64),
    "lstm": lambda b: fused_rnn.LSTM(2, 3, 2, bidirectional=True, backend=b, dtype=torch.float64),
    "lstm_proj": lambda b: fused_rnn.LSTM(2, 3, 2, batch_first=True, proj_size=2, backend=b, dtype=torch.float64),
    "irnn_cell": lambda b: fused_rnn.IRNNCell(2, 3, backend=b, hh_init="pytorch", ih_init="pytorch",
                                              dtype=torch.float64),
    "lstm_cell": lambda b: fused_rnn.LSTMCell(2, 3, backend=b, dtype=torch.float64),
}


def _module_inputs(name, module):
    g = torch.Generator().manual_seed(3)
    cell = name.endswith("cell")
    x = torch.randn(*((4, 2) if cell else (3, 4, 2)), dtype=torch.float64, generator=g)  # batch of 4
    if not cell and module.batch_first:
        x = x.transpose(0, 1)
    if cell:
        states = [torch.rand(4, 3, dtype=torch.float64, generator=g) for _ in range(1 if name == "irnn_cell" else 2)]
    else:
        layers = module.num_layers * module.num_directions
        width = module.proj_size or module.hidden_size
        states = [torch.rand(layers, 4, width, dtype=torch.float64, generator=g)]
        if name.startswith("lstm"):
            states.append(torch.rand(layers, 4, module.hidden_size, dtype=torch.float64, generator=g))
    return [x, *states]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", MODULE_CASES)
def test_gradcheck_and_gradgradcheck_of_every_module(name, backend):
    """[test_grad, test_gradgrad, test_LSTM_grad_and_gradgrad] float64, through the
    inputs, the initial states and every parameter."""
    module = MODULE_CASES[name](backend)
    names = [n for n, _ in module.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in module.parameters()]
    inputs = [t.requires_grad_() for t in _module_inputs(name, module)] + params
    run = _module_function(module, names)
    assert torch.autograd.gradcheck(run, inputs)
    assert torch.autograd.gradgradcheck(run, inputs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS + ["lstm_proj"])
def test_gradient_penalty_matches_torch(kind, backend):
    """The second-order case that was silently wrong: a loss on y and on dy/dx (gradient
    penalty), trained on the gradients of both, equals torch.nn's."""
    options = {"proj_size": 2} if kind == "lstm_proj" else {}
    ours, reference = layer_pair(kind[:4], 3, 3, dtype=torch.float64, backend=backend, **options)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    results = []
    for module in (reference, ours):
        inp = x.clone().requires_grad_()
        y, _ = module(inp)
        (g,) = torch.autograd.grad(y, inp, torch.ones_like(y), create_graph=True)
        loss = y.pow(2).mean() + 10 * g.pow(2).sum()
        results.append(torch.autograd.grad(loss, [inp, *module.parameters()]))
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, **F64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", MODULE_CASES)
def test_non_reentrant_checkpointing(name, backend):
    """torch.utils.checkpoint(use_reentrant=False), first and second order: every
    backward reads its saved tensors once, as that mode requires."""
    module = MODULE_CASES[name](backend)
    x = _module_inputs(name, module)[0].requires_grad_()

    def run(x):
        return sum((t * t).sum() for t in flat(module(x)))

    loss = torch.utils.checkpoint.checkpoint(run, x, use_reentrant=False)
    (dx,) = torch.autograd.grad(loss, x, create_graph=True)
    dx.square().sum().backward()
    loss_plain = run(x)
    (dx_plain,) = torch.autograd.grad(loss_plain, x, create_graph=True)
    torch.testing.assert_close(dx, dx_plain, **F64)
    assert all(p.grad is not None for p in module.parameters())


@pytest.mark.parametrize("kind", KINDS)
def test_backward_twice_with_retain_graph(kind):
    """[test_rnn_retain_variables] a retained graph gives the same gradients twice."""
    ours, _ = layer_pair(kind, 3, 5, dtype=torch.float64)
    y = flat(ours(torch.randn(4, 2, 3, dtype=torch.float64)))[0]
    y.sum().backward(retain_graph=True)
    first = ours.weight_hh_l0.grad.clone()
    ours.zero_grad()
    y.sum().backward()
    torch.testing.assert_close(ours.weight_hh_l0.grad, first, rtol=0, atol=0)


# ---------------------------------------------------------------------- proj_size

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", [{}, {"num_layers": 2, "bidirectional": True},
                                     {"batch_first": True, "bias": False}], ids=["one", "stacked", "batch_first"])
def test_lstm_proj_matches_torch(options, backend):
    """[test_lstm_proj] h_t = W_hr (o_t * tanh(c_t)): outputs [*, D*P], h_n [L*D, B, P],
    c_n [L*D, B, H], and every gradient, batched, unbatched and packed."""
    ours, reference = layer_pair("lstm", 3, 6, proj_size=4, dtype=torch.float64, backend=backend, **options)
    layers = ours.num_layers * ours.num_directions
    sequence = torch.randn(5, 2, 3, dtype=torch.float64)  # [T, B, I]
    x = sequence.transpose(0, 1) if ours.batch_first else sequence
    hx = (torch.randn(layers, 2, 4, dtype=torch.float64), torch.randn(layers, 2, 6, dtype=torch.float64))
    for args in [(x,), (x, hx), (sequence[:, 0], tuple(h[:, 0] for h in hx)),
                 (pack_padded_sequence(x, torch.tensor([3, 5]), batch_first=ours.batch_first, enforce_sorted=False),)]:
        outputs = []
        for module in (ours, reference):
            module.zero_grad()
            out = module(*args)
            sum((t * torch.linspace(-1, 1, t.numel(), dtype=t.dtype).view_as(t)).sum() for t in flat(out)).backward()
            outputs.append(flat(out) + [p.grad for p in module.parameters()])
        assert_same_outputs(outputs[0], outputs[1])
    y, (h_n, c_n) = ours(x, hx)
    assert y.shape[-1] == 4 * ours.num_directions and h_n.shape[-1] == 4 and c_n.shape[-1] == 6
