"""The character-level models of fused_rnn.app.models: shapes, learning, fused vs torch
backend, sampling, and the stateful model's carried state."""

import pytest
import torch

import fused_rnn
from fused_rnn.app import data
from fused_rnn.app.models import (
    MODEL_NAMES,
    NCharModel,
    OneHotModel,
    SequenceModel,
    StatefulModel,
    ThreeCharModel,
    build_model,
    with_torch_nn_layers,
)
from fused_rnn.app.train import TrainConfig, batches, loss_of

TEXT = "the quick brown fox jumps over the lazy dog; (brackets) and 'quotes' close.\n" * 40
VOCAB = data.Vocab.from_text(TEXT)
SMALL = dict(hidden_size=24, embed_dim=10)
# float32 fused vs torch loop: the same maths in another summation order; over a
# <= 8-step recurrence, a 2-layer stack and the loss this stays near 1e-6 relative
# (measured < 5e-7), so 1e-5 catches any real difference.
RTOL, ATOL = 1e-5, 1e-6


def make(name, backend="auto", seed=0):
    torch.manual_seed(seed)
    return build_model(name, VOCAB, hidden_size=24, num_layers=2, context=6, embed_dim=10, dropout=0.1,
                       backend=backend)


def example_batch(name, batch=5, steps=6):
    chars = VOCAB.encode(TEXT[: batch * (steps + 1)]).view(batch, steps + 1)
    inputs = chars[:, :3] if name == "3char" else chars[:, :-1]
    targets = chars[:, 3] if name == "3char" else (chars[:, -1] if name == "nchar" else chars[:, 1:])
    return inputs, targets


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_forward_shapes(name):
    model = make(name)
    inputs, targets = example_batch(name)
    logits = model(inputs)
    assert logits.shape == targets.shape + (len(VOCAB),)


def test_window_and_sequence_models_run_on_the_irnn_layer():
    for model in (ThreeCharModel(VOCAB, **SMALL), NCharModel(VOCAB, 9, **SMALL), SequenceModel(VOCAB, **SMALL),
                  OneHotModel(VOCAB, hidden_size=24)):
        assert isinstance(model.rnn, fused_rnn.IRNN)
        assert torch.equal(model.rnn.weight_hh_l0, torch.eye(24))  # the lesson's identity "orange arrow"
    assert ThreeCharModel(VOCAB, **SMALL).context == 3
    assert NCharModel(VOCAB, 9, **SMALL).context == 8


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_a_few_steps_reduce_the_loss(name):
    model = make(name)
    config = TrainConfig(model=name, seq_len=3 if name == "3char" else 6, batch_size=16).resolved()
    encoded = VOCAB.encode(TEXT)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    train_batches = batches(config, encoded, shuffle=True, epoch=0)
    if isinstance(model, StatefulModel):
        model.reset_state()
    with torch.no_grad():
        first = float(loss_of(model, *train_batches[0]))
    for epoch in range(3):
        if isinstance(model, StatefulModel):
            model.reset_state()
        for inputs, targets in batches(config, encoded, shuffle=True, epoch=epoch):
            optimizer.zero_grad()
            loss_of(model, inputs, targets).backward()
            optimizer.step()
    if isinstance(model, StatefulModel):
        model.reset_state()
    assert float(loss_of(model, *train_batches[0])) < 0.7 * first


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_fused_and_torch_backends_agree(name):
    if "cpp" not in fused_rnn.available_backends():
        pytest.skip("the C++ extension is not built")
    results = []
    for backend in ("cpp", "torch"):
        model = make(name, backend)
        inputs, targets = example_batch(name)
        torch.manual_seed(1)  # the same dropout masks on both sides
        loss = 0.0
        for _ in range(2):    # twice: the stateful model's second call starts from its carried state
            loss = loss + loss_of(model, inputs, targets)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_cpp, grads_cpp), (loss_torch, grads_torch) = results
    torch.testing.assert_close(loss_cpp, loss_torch, rtol=RTOL, atol=ATOL)
    assert grads_cpp.keys() == grads_torch.keys()
    for key in grads_cpp:
        torch.testing.assert_close(grads_cpp[key], grads_torch[key], rtol=RTOL, atol=ATOL, msg=key)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_generate(name):
    model = make(name)
    seed = TEXT[:10]
    text = model.generate(seed, 25, temperature=0.7, generator=torch.Generator().manual_seed(3))
    assert len(text) == 25
    again = model.generate(seed, 25, temperature=0.7, generator=torch.Generator().manual_seed(3))
    assert text == again
    assert model.generate(seed, 0) == ""
    # near-zero temperature is argmax: the same text whatever the random stream
    cold = [model.generate(seed, 15, temperature=1e-8, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    assert cold[0] == cold[1]
    hot = {model.generate(seed, 15, temperature=50.0, generator=torch.Generator().manual_seed(s)) for s in range(4)}
    assert len(hot) > 1
    assert model.training  # restored after sampling
    # stream(): the same characters one at a time; the caller's code between them runs with
    # its own grad mode, and the mode comes back when the stream is done
    stream = model.stream(seed, 25, temperature=0.7, generator=torch.Generator().manual_seed(3))
    first = next(stream)
    assert torch.is_grad_enabled() and not model.training
    assert first + "".join(stream) == text and model.training
    with pytest.raises(ValueError, match="is not in the vocabulary"):
        model.generate("the quick €", 5)
    with pytest.raises(ValueError, match="temperature must be positive"):
        model.generate(seed, 5, temperature=0)
    with pytest.raises(ValueError, match="n_chars"):
        model.generate(seed, -1)


@pytest.mark.parametrize("cls", [SequenceModel, OneHotModel])
def test_sequence_models_sample_over_their_training_window(cls):
    """The sequence models were trained on windows of `context` characters from a zero
    state, and sample each character from the last `context` from a zero state: the
    text equals a loop over forward() on those windows with the same random stream. A
    state carried over the whole text instead grew without bound (here W_hh = 2 I:
    inf, then NaN probabilities and a crash within 200 characters)."""
    torch.manual_seed(0)
    kwargs = dict(hidden_size=24) if cls is OneHotModel else SMALL
    model = cls(VOCAB, context=6, **kwargs).eval()
    seed = TEXT[:10]
    text = model.generate(seed, 30, temperature=0.7, generator=torch.Generator().manual_seed(5))
    generator, chars = torch.Generator().manual_seed(5), VOCAB.encode(seed).tolist()
    for _ in range(30):
        with torch.no_grad():
            logits = model(torch.tensor([chars[-6:]]))[0, -1].double()
        chars.append(int(torch.multinomial(torch.softmax((logits - logits.max()) / 0.7, dim=-1), 1,
                                           generator=generator)))
    assert text == VOCAB.decode(chars[len(seed):])
    with torch.no_grad():
        model.rnn.weight_hh_l0.copy_(2 * torch.eye(24))
    assert len(model.generate(seed, 2000, generator=torch.Generator().manual_seed(0))) == 2000
    with torch.no_grad():
        model.output.bias.fill_(float("nan"))
    with pytest.raises(ValueError, match="logits are not finite"):
        model.generate(seed, 5)


def test_window_models_need_a_full_context():
    with pytest.raises(ValueError, match="at least 3 character"):
        ThreeCharModel(VOCAB, **SMALL).generate("th", 5)
    with pytest.raises(ValueError, match="reads 3 characters"):
        ThreeCharModel(VOCAB, **SMALL)(torch.zeros(2, 4, dtype=torch.int64))


def test_stateful_model_carries_and_truncates_state():
    model = make("stateful-lstm").eval()
    inputs, _ = example_batch("seq")
    fresh = model(inputs)
    assert model.state is not None and not any(s.requires_grad for layer in model.state for s in layer)
    carried = model(inputs)
    assert not torch.allclose(fresh, carried)      # the second call starts from the first one's state
    model.reset_state()
    torch.testing.assert_close(model(inputs), fresh)
    saved = [tuple(s.clone() for s in layer) for layer in model.state]
    model.generate("the ", 10)                     # sampling leaves the carried state alone
    assert all(torch.equal(a, b) for la, lb in zip(saved, model.state) for a, b in zip(la, lb))
    with pytest.raises(ValueError, match="reset_state"):
        model(inputs[:2])


def test_bad_arguments():
    with pytest.raises(ValueError, match="model must be one of"):
        build_model("gru", VOCAB)
    with pytest.raises(ValueError, match="cell must be"):
        StatefulModel(VOCAB, cell="gru")
    with pytest.raises(ValueError, match="recurrent_dropout"):
        StatefulModel(VOCAB, recurrent_dropout=1.0)
    with pytest.raises(TypeError, match="integer tensor"):
        SequenceModel(VOCAB, **SMALL)(torch.zeros(2, 3))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_torch_nn_twin_matches(name):
    """with_torch_nn_layers (what bench/char_models.py compares against): the same
    model on nn.RNN / nn.LSTM gives the same loss and gradients."""
    torch.manual_seed(0)
    fused = build_model(name, VOCAB, hidden_size=24, num_layers=2, context=6, embed_dim=10, dropout=0.0)
    twin = with_torch_nn_layers(fused)
    assert not any(isinstance(m, (fused_rnn.IRNN, fused_rnn.LSTM)) for m in twin.modules())
    inputs, targets = example_batch(name)
    losses = []
    for model in (fused, twin):
        loss = loss_of(model, inputs, targets) + loss_of(model, inputs, targets)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=RTOL, atol=ATOL)
    grads = dict(twin.named_parameters())
    for key, p in fused.named_parameters():
        torch.testing.assert_close(p.grad, grads[key].grad, rtol=RTOL, atol=ATOL, msg=key)
