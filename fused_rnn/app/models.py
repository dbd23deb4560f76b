"""The character-level language models of the classic char-RNN lesson, on the fused
IRNN and LSTM layers.

Each model knows its vocabulary, maps integer character indices to logits (trained
with sparse cross-entropy on integer targets) and samples text with
``generate(seed_text, n_chars, temperature)``.

=================  ===========================================================  =========
model              reads -> predicts                                            layer
=================  ===========================================================  =========
ThreeCharModel     characters 1..3 -> character 4                               IRNN
NCharModel         characters 1..n-1 -> character n (n = 9 in the lesson)       IRNN
SequenceModel      characters 1..n-1 -> characters 2..n, zero initial state     IRNN
OneHotModel        as SequenceModel, one-hot inputs instead of an embedding     IRNN
StatefulModel      as SequenceModel, state carried from batch to batch          LSTM/IRNN
=================  ===========================================================  =========

The first four are the lesson's unrolled RNN made into one IRNN layer: character
embeddings go through the shared input layer (``weight_ih``, the lesson's "green
arrow"), the hidden-to-hidden layer starts as the identity (``weight_hh``, "orange
arrow"), a ReLU, and an output layer ("blue arrow") reads the last state (n-character
models) or every state (sequence models, Keras' TimeDistributed).
"""

import copy
from typing import Iterator, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fused_rnn import IRNN, LSTM

from .data import Vocab

MODEL_NAMES = ("stateful-lstm", "stateful-irnn", "seq", "nchar", "3char", "onehot")

EMBED_DIM = 42  # the lesson's character embedding size
HIDDEN_SIZE = 256


def _char_irnn(input_size: int, hidden_size: int, backend: str) -> IRNN:
    # Identity W_hh (the IRNN) and PyTorch's uniform input weights: inputs here are
    # learned embeddings of unit scale, which N(0, 0.001^2) input weights would mute.
    return IRNN(input_size, hidden_size, batch_first=True, backend=backend, ih_init="pytorch")


def _sample(logits: Tensor, temperature: float, generator: Optional[torch.Generator]) -> int:
    logits = logits.double()
    if not bool(torch.isfinite(logits).all()):
        raise ValueError("the model's logits are not finite (the checkpoint's weights hold NaN or inf): "
                         "nothing to sample from")
    # shifted so that the largest is 0 before the division: a tiny temperature then sends
    # the others to -inf (probability 0) instead of every logit to +-inf and NaN
    probs = torch.softmax((logits - logits.max()) / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def _check_context(context: Optional[int]) -> Optional[int]:
    if context is not None and (not isinstance(context, int) or isinstance(context, bool) or context < 1):
        raise ValueError(f"context must be a positive integer (the training windows' length) or None, "
                         f"got {context!r}")
    return context


class CharModel(nn.Module):
    """Base class: the vocabulary, argument checks and the sampling loop.

    Subclasses implement ``forward(chars)`` and, for sampling, ``_start(indices)``
    (logits after reading the seed, and the state to continue from) and
    ``_step(index, state)``."""

    def __init__(self, vocab: Vocab):
        super().__init__()
        if not isinstance(vocab, Vocab):
            raise TypeError(f"vocab must be a fused_rnn.app.data.Vocab, got {type(vocab).__name__}")
        self.vocab = vocab

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def _check_chars(self, chars: Tensor, name: str = "chars") -> None:
        if not isinstance(chars, Tensor) or chars.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{name} must be an integer tensor of character indices, got "
                            f"{getattr(chars, 'dtype', type(chars).__name__)}")
        if chars.dim() != 2 or chars.numel() == 0:
            raise ValueError(f"{name} must be a non-empty [batch, length] tensor, got shape {tuple(chars.shape)}")

    def min_seed_length(self) -> int:
        return 1

    def generate(self, seed_text: str, n_chars: int, temperature: float = 1.0,
                 generator: Optional[torch.Generator] = None) -> str:
        """``n_chars`` characters sampled after ``seed_text``, each from
        softmax(logits / temperature) (lower temperature: more conservative text).
        The model is put in eval mode for sampling and restored afterwards."""
        return "".join(self.stream(seed_text, n_chars, temperature, generator))

    def stream(self, seed_text: str, n_chars: int, temperature: float = 1.0,
               generator: Optional[torch.Generator] = None) -> Iterator[str]:
        """:meth:`generate`'s characters one at a time, as they are sampled (the
        arguments are checked at the call, before the first). The model stays in eval
        mode until the iterator is exhausted or closed."""
        if not isinstance(n_chars, int) or n_chars < 0:
            raise ValueError(f"n_chars must be a non-negative integer, got {n_chars!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature!r}")
        if len(seed_text) < self.min_seed_length():
            raise ValueError(f"seed_text must have at least {self.min_seed_length()} character(s) for "
                             f"{type(self).__name__}, got {len(seed_text)}")
        return self._stream(self.vocab.encode(seed_text), n_chars, temperature, generator)

    def _stream(self, indices: Tensor, n_chars: int, temperature: float,
                generator: Optional[torch.Generator]) -> Iterator[str]:
        device = next(self.parameters()).device
        was_training = self.training
        self.eval()
        try:
            if n_chars:
                with torch.no_grad():  # never across a yield: the caller's code runs there
                    logits, state = self._start(indices.to(device))
            for k in range(n_chars):
                index = _sample(logits.cpu(), temperature, generator)
                yield self.vocab.decode([index])
                if k + 1 < n_chars:
                    with torch.no_grad():
                        logits, state = self._step(index, state)
        finally:
            self.train(was_training)


class NCharModel(CharModel):
    """Characters 1..n-1 -> character n: [B, n-1] indices -> [B, V] logits.

    Args: vocab, n (9 in the lesson), embed_dim (42), hidden_size (256), backend."""

    def __init__(self, vocab: Vocab, n: int = 9, embed_dim: int = EMBED_DIM, hidden_size: int = HIDDEN_SIZE,
                 backend: str = "auto"):
        super().__init__(vocab)
        if not isinstance(n, int) or n < 2:
            raise ValueError(f"n must be an integer >= 2 (at least one input character), got {n!r}")
        self.n = n
        self.embedding = nn.Embedding(self.vocab_size, embed_dim)
        self.rnn = _char_irnn(embed_dim, hidden_size, backend)
        self.output = nn.Linear(hidden_size, self.vocab_size)

    @property
    def context(self) -> int:
        return self.n - 1

    def forward(self, chars: Tensor) -> Tensor:
        self._check_chars(chars)
        if chars.shape[1] != self.context:
            raise ValueError(f"{type(self).__name__} reads {self.context} characters per example, got "
                             f"chars of shape {tuple(chars.shape)}")
        _, h_n = self.rnn(self.embedding(chars))
        return self.output(h_n[-1])

    def min_seed_length(self) -> int:
        return self.context

    def _start(self, indices: Tensor):
        window = indices[-self.context:]
        return self.forward(window.unsqueeze(0))[0], window

    def _step(self, index: int, window: Tensor):
        window = torch.cat([window[1:], window.new_tensor([index])])
        return self.forward(window.unsqueeze(0))[0], window


class ThreeCharModel(NCharModel):
    """The lesson's first model: characters 1..3 -> character 4 (an IRNN of length 3)."""

    def __init__(self, vocab: Vocab, embed_dim: int = EMBED_DIM, hidden_size: int = HIDDEN_SIZE,
                 backend: str = "auto"):
        super().__init__(vocab, 4, embed_dim, hidden_size, backend)


class SequenceModel(CharModel):
    """Characters 1..n-1 -> characters 2..n ("return sequences"): [B, T] -> [B, T, V],
    from a zero initial state, one output layer applied at every step. ``context``: the
    length of the windows it was trained on (--seq-len), over which sampling reads each
    next character from a zero state, as in training; None reads the whole text in one
    state, which an IRNN trained on short windows lets grow without bound."""

    def __init__(self, vocab: Vocab, embed_dim: int = EMBED_DIM, hidden_size: int = HIDDEN_SIZE,
                 backend: str = "auto", context: Optional[int] = None):
        super().__init__(vocab)
        self.context = _check_context(context)
        self.embedding = nn.Embedding(self.vocab_size, embed_dim)
        self.rnn = _char_irnn(embed_dim, hidden_size, backend)
        self.output = nn.Linear(hidden_size, self.vocab_size)

    def _inputs(self, chars: Tensor) -> Tensor:
        return self.embedding(chars)

    def _run(self, chars: Tensor, h: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        y, h_n = self.rnn(self._inputs(chars), h)
        return self.output(y), h_n

    def forward(self, chars: Tensor) -> Tensor:
        self._check_chars(chars)
        return self._run(chars)[0]

    def _start(self, indices: Tensor):
        if self.context is not None:  # the state is the window of the last `context` characters
            window = indices[-self.context:]
            return self._run(window.unsqueeze(0))[0][0, -1], window
        logits, h = self._run(indices.unsqueeze(0))
        return logits[0, -1], h

    def _step(self, index: int, state: Tensor):
        if self.context is not None:
            window = torch.cat([state, state.new_tensor([index])])[-self.context:]
            return self._run(window.unsqueeze(0))[0][0, -1], window
        logits, h = self._run(state.new_tensor([[index]], dtype=torch.int64), state)
        return logits[0, -1], h


class OneHotModel(SequenceModel):
    """The sequence model with one-hot inputs in place of an embedding (the lesson's
    from-scratch version): the IRNN's input weights play the embedding's role."""

    def __init__(self, vocab: Vocab, hidden_size: int = HIDDEN_SIZE, backend: str = "auto",
                 context: Optional[int] = None):
        CharModel.__init__(self, vocab)
        self.context = _check_context(context)
        self.rnn = _char_irnn(self.vocab_size, hidden_size, backend)
        self.output = nn.Linear(hidden_size, self.vocab_size)

    def _inputs(self, chars: Tensor) -> Tensor:
        return F.one_hot(chars, self.vocab_size).to(self.output.weight.dtype)


class StatefulModel(CharModel):
    """The lesson's stateful model: [B, T] -> [B, T, V], the hidden state carried from
    one call to the next (so consecutive batches must continue each other's rows; see
    :func:`fused_rnn.app.data.stream_batches`) and detached at every call (truncated
    backpropagation at batch boundaries). Call :meth:`reset_state` at the start of
    each epoch and before unrelated text.

    Embedding -> batch normalisation of the embeddings -> ``num_layers`` LSTM or IRNN
    layers -> dropout -> a dense layer at every step.

    Args:
        cell: ``"lstm"`` or ``"irnn"``.
        dropout: input dropout of every recurrent layer (Keras' ``dropout_W``), one
            mask per sequence and feature, fixed over time.
        recurrent_dropout: Keras' ``dropout_U``: variational recurrent dropout, a
            mask on h_{t-1} drawn per layer and call and fixed over its steps
            (the layers' ``recurrent_dropout``, applied inside the scan).
        output_dropout: dropout before the output layer.
        irnn_hh_scale: the IRNN layers start from W_hh = irnn_hh_scale * I. Not 1:
            a state carried over a whole epoch makes an identity recurrence add up its
            inputs without bound (measured: the loss reaches 1e4-1e8 in the first
            epoch at lr 3e-3, identity with either input init), much as Le et al.
            (2015) found 1.0 unstable for speech and used 0.01.
    """

    def __init__(self, vocab: Vocab, cell: str = "lstm", num_layers: int = 2, embed_dim: int = EMBED_DIM,
                 hidden_size: int = HIDDEN_SIZE, dropout: float = 0.2, recurrent_dropout: float = 0.2,
                 output_dropout: float = 0.2, irnn_hh_scale: float = 0.5, backend: str = "auto"):
        super().__init__(vocab)
        if cell not in ("lstm", "irnn"):
            raise ValueError(f"cell must be 'lstm' or 'irnn', got {cell!r}")
        if not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers must be a positive integer, got {num_layers!r}")
        for name, p in (("dropout", dropout), ("recurrent_dropout", recurrent_dropout),
                        ("output_dropout", output_dropout)):
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {p!r}")
        self.cell = cell
        self.dropout, self.recurrent_dropout, self.output_dropout = dropout, recurrent_dropout, output_dropout
        self.embedding = nn.Embedding(self.vocab_size, embed_dim)
        self.norm = nn.BatchNorm1d(embed_dim)
        sizes = [embed_dim] + [hidden_size] * num_layers
        if cell == "lstm":
            layers = [LSTM(sizes[k], hidden_size, backend=backend, recurrent_dropout=recurrent_dropout)
                      for k in range(num_layers)]
        else:
            layers = [IRNN(sizes[k], hidden_size, backend=backend, ih_init="pytorch", hh_scale=irnn_hh_scale,
                           recurrent_dropout=recurrent_dropout) for k in range(num_layers)]
        self.layers = nn.ModuleList(layers)
        self.output = nn.Linear(hidden_size, self.vocab_size)
        self.state: Optional[List[Tuple[Tensor, ...]]] = None

    def extra_repr(self) -> str:
        return (f"cell={self.cell!r}, dropout={self.dropout}, recurrent_dropout={self.recurrent_dropout}, "
                f"output_dropout={self.output_dropout}")

    def reset_state(self) -> None:
        """Forget the carried hidden state: the next call starts from zeros."""
        self.state = None

    def _input_dropout(self, x: Tensor) -> Tensor:  # x [T, B, F]
        if not self.training or self.dropout == 0.0:
            return x
        keep = 1.0 - self.dropout
        mask = x.new_empty(1, x.shape[1], x.shape[2]).bernoulli_(keep) / keep
        return x * mask

    def _layer(self, layer: nn.Module, x: Tensor, state: Optional[Tuple[Tensor, ...]]):
        """One recurrent layer on x [T, B, F] from `state` ((h,) or (h, c), each [B, H]).
        The layer may also be a torch.nn.RNN / torch.nn.LSTM with the same parameters
        (bench/char_models.py compares the two; those have no recurrent dropout)."""
        hx = None if state is None else tuple(s.unsqueeze(0) for s in state)
        y, out = layer(x, hx if hx is None or self.cell == "lstm" else hx[0])
        return y, tuple(s.squeeze(0) for s in (out if self.cell == "lstm" else (out,)))

    def forward(self, chars: Tensor) -> Tensor:
        self._check_chars(chars)
        batch, steps = chars.shape
        if self.state is not None and self.state[0][0].shape[0] != batch:
            raise ValueError(f"the carried state is for batch size {self.state[0][0].shape[0]}, got {batch}: "
                             "call reset_state() before changing the batch size")
        x = self.embedding(chars.t())                                   # [T, B, E]
        x = self.norm(x.reshape(steps * batch, -1)).view(steps, batch, -1)
        new_state = []
        for k, layer in enumerate(self.layers):
            x, state = self._layer(layer, self._input_dropout(x), None if self.state is None else self.state[k])
            new_state.append(tuple(s.detach() for s in state))
        self.state = new_state
        x = F.dropout(x, self.output_dropout, training=self.training)
        return self.output(x).transpose(0, 1)                           # [B, T, V]

    def _with_state(self, chars: Tensor, state):
        """Logits of the last step of `chars` from `state`, and the state after it,
        leaving the carried training state as it was."""
        saved, self.state = self.state, state
        try:
            return self.forward(chars)[0, -1], self.state
        finally:
            self.state = saved

    def _start(self, indices: Tensor):
        return self._with_state(indices.unsqueeze(0), None)

    def _step(self, index: int, state):
        return self._with_state(torch.tensor([[index]], device=self.output.weight.device), state)


def build_model(name: str, vocab: Vocab, *, hidden_size: int = HIDDEN_SIZE, num_layers: int = 2,
                context: Optional[int] = None, embed_dim: int = EMBED_DIM, dropout: float = 0.2,
                backend: str = "auto") -> CharModel:
    """The model ``fused-rnn train --model NAME`` trains (names in :data:`MODEL_NAMES`).
    ``context`` is n - 1 for the n-character model; ``num_layers`` and ``dropout`` apply
    to the stateful models (the lesson's other models are one IRNN layer)."""
    if name in ("stateful-lstm", "stateful-irnn"):
        return StatefulModel(vocab, cell=name.split("-")[1], num_layers=num_layers, embed_dim=embed_dim,
                             hidden_size=hidden_size, dropout=dropout, recurrent_dropout=dropout,
                             output_dropout=dropout, backend=backend)
    if name == "nchar":
        return NCharModel(vocab, n=(8 if context is None else context) + 1, embed_dim=embed_dim,
                          hidden_size=hidden_size, backend=backend)
    if name == "3char":
        return ThreeCharModel(vocab, embed_dim=embed_dim, hidden_size=hidden_size, backend=backend)
    if name == "seq":
        return SequenceModel(vocab, embed_dim=embed_dim, hidden_size=hidden_size, backend=backend, context=context)
    if name == "onehot":
        return OneHotModel(vocab, hidden_size=hidden_size, backend=backend, context=context)
    raise ValueError(f"model must be one of {MODEL_NAMES}, got {name!r}")


def with_torch_nn_layers(model: CharModel) -> CharModel:
    """A copy of `model` whose fused IRNN / LSTM layers are replaced by the torch.nn
    layers they are drop-ins for (``nn.RNN(nonlinearity="relu")``, ``nn.LSTM``), holding
    the same parameters: the same model on PyTorch's own kernels, for comparisons.
    (A stateful model's recurrent dropout needs the fused layers; set it to 0.)"""
    twin = copy.deepcopy(model)
    for parent in twin.modules():
        for name, child in list(parent.named_children()):
            if isinstance(child, (IRNN, LSTM)):
                kwargs = dict(num_layers=child.num_layers, bias=child.bias, batch_first=child.batch_first,
                              dropout=child.dropout, bidirectional=child.bidirectional)
                if isinstance(child, IRNN):
                    layer = nn.RNN(child.input_size, child.hidden_size, nonlinearity="relu", **kwargs)
                else:
                    layer = nn.LSTM(child.input_size, child.hidden_size, **kwargs)
                layer.load_state_dict(child.state_dict())
                setattr(parent, name, layer)
    return twin
