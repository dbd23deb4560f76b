"""Layer modules: drop-in replacements for ``torch.nn.RNN(nonlinearity="relu")``,
``torch.nn.LSTM``, ``torch.nn.RNNCell(nonlinearity="relu")`` and ``torch.nn.LSTMCell``.

Each module takes the arguments of the PyTorch module it replaces, in the same order and
checked the same way, and has its parameters under the same names (``weight_ih_l0``,
``weight_hh_l0``, ``bias_ih_l0``, ``bias_hh_l0``, ``weight_hr_l0`` for an LSTM with
``proj_size``, ``..._reverse`` for the backward direction; ``weight_ih``, ... for the
cells), so ``load_state_dict`` works in both directions and, given the same weights,
outputs, gradients and second derivatives match the PyTorch module. Mistakes raise
exceptions that are instances of the class torch.nn raises for them (see
:mod:`fused_rnn._validation`). Every layer and direction runs one call of the
functional API (:func:`fused_rnn.functional.irnn` / :func:`~fused_rnn.functional.lstm`),
or, where ``auto`` keeps torch.nn's kernels for all of them, one call for the whole
stack; ``backend`` picks the kernel: a keyword-only constructor argument and a
plain attribute that can be changed at any time (``"auto"``, ``"cpp"``, ``"cuda"``,
``"triton"``, ``"torch"``; see :func:`fused_rnn.select_backend`).

What differs from PyTorch: :class:`IRNN` and :class:`IRNNCell` start from the IRNN
initialisation of Le, Jaitly & Hinton (2015) instead of ``nn.RNN``'s uniform one, and
take only ``nonlinearity="relu"``; a sequence of length 0 returns the initial state
(torch.nn raises). What they add, all keyword-only: ``recurrent_dropout`` (a
variational mask on h_{t-1}, fixed over the sequence), ``weight_dropout`` (DropConnect
on W_hh), ``hidden_clip`` for the IRNN, the initialisation options, ``backend``, and a
``lengths=`` argument of ``forward`` for padded input besides ``PackedSequence``.
"""

import itertools
import math
import numbers
import warnings
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as torch_functional
from torch.nn.utils.rnn import PackedSequence

from . import functional, nn_backend
from ._measure import measured_dispatch_enabled
from ._validation import InputError, InputTypeError, all_like
from .dispatch import BACKENDS, auto_choice, select_backend

_BACKEND_NAMES = ("auto",) + BACKENDS
_HH_INITS = ("identity", "pytorch")
_IH_INITS = ("normal", "pytorch")
# Le et al. 2015: W_ih ~ N(0, 0.001^2) in all their experiments.
_DEFAULT_IH_STD = 0.001


def _check_probability(name: str, value) -> None:
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not 0 <= value < 1:
        raise ValueError(f"{name} must be a probability in [0, 1), got {value!r}")


def _check_bool(name: str, value) -> None:
    # as torch.nn.RNNBase: batch_first="False" would otherwise silently mean True
    if not isinstance(value, bool):
        raise TypeError(f"{name} should be of type bool, got: {type(value).__name__} ({value!r})")


def _check_size(name: str, value, minimum: int) -> int:
    """An integer size (TypeError otherwise, as torch.nn) of at least `minimum`: 1 for the
    layers (ValueError, as torch.nn.RNNBase), 0 for the cells (torch.nn.RNNCell takes
    hidden_size=0; a negative size is torch's RuntimeError there)."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{name} should be of type int, got: {type(value).__name__} ({value!r})")
    if value < minimum:
        error = ValueError if minimum > 0 else InputError
        raise error(f"{name} must be " + ("greater than zero" if minimum > 0 else "non-negative") + f", got {value}")
    return int(value)


def _check_nonlinearity(owner: str, value) -> None:
    if value == "tanh":
        raise ValueError(f"{owner} is a ReLU RNN: nonlinearity must be 'relu', got 'tanh' "
                         "(use torch.nn.RNN / torch.nn.RNNCell for a tanh RNN)")
    if value != "relu":
        raise ValueError(f"Unknown nonlinearity {value!r}: {owner} takes only 'relu'")


def _packed_layout(packed: PackedSequence):
    """(T, B, offsets [T], rows [T, B] of the packed data, valid [T, B]) of a
    PackedSequence, in its sorted order, with tensor operations whose shapes are the
    input's own (no size read from the values: torch.compile(fullgraph=True) traces
    them), where torch's pad_packed_sequence / pack_padded_sequence are not traceable.
    B is the length of sorted_indices; a pack without them (enforce_sorted=True) has its
    batch size only in the values: batch_sizes[0]."""
    batch_sizes = packed.batch_sizes.to(packed.data.device)
    steps = batch_sizes.shape[0]
    if packed.sorted_indices is not None:
        batch = packed.sorted_indices.shape[0]
    else:
        batch = int(packed.batch_sizes[0]) if steps else 0
    offsets = torch.cumsum(batch_sizes, 0) - batch_sizes
    columns = torch.arange(batch, device=batch_sizes.device)
    valid = columns[None, :] < batch_sizes[:, None]
    rows = (offsets[:, None] + columns[None, :]).clamp(max=max(packed.data.shape[0] - 1, 0))
    return steps, batch, offsets, rows, valid


def _unpack(packed: PackedSequence) -> Tuple[Tensor, Tensor]:
    """(padded [T, B, *], lengths [B] int64 on the CPU), both in the batch's original
    order, zeros past each length: what pad_packed_sequence returns."""
    steps, batch, _, rows, valid = _packed_layout(packed)
    data = packed.data
    padded = data[rows.reshape(-1)].reshape(steps, batch, *data.shape[1:])
    padded = torch.where(valid.reshape(steps, batch, *([1] * (data.dim() - 1))), padded, 0)
    lengths = valid.sum(0)
    if packed.unsorted_indices is not None:
        padded, lengths = padded.index_select(1, packed.unsorted_indices), lengths[packed.unsorted_indices]
    return padded, lengths.cpu()


def _pack_like(y: Tensor, packed: PackedSequence) -> Tensor:
    """The data of y [T, B, *] (the batch's original order) packed as `packed` is: row
    p of the result is step t, sorted row p - offsets[t], for the t whose block holds p."""
    steps, batch, offsets, _, _ = _packed_layout(packed)
    if packed.sorted_indices is not None:
        y = y.index_select(1, packed.sorted_indices)
    positions = torch.arange(packed.data.shape[0], device=offsets.device)
    step = torch.searchsorted(offsets, positions, right=True) - 1
    return y.reshape(steps * batch, *y.shape[2:])[step * batch + positions - offsets[step]]


def _reverse_within_lengths(x: Tensor, lengths: Optional[Tensor]) -> Tensor:
    """x [T, B, *] with each sequence b reversed over its first lengths[b] steps and its
    padding left in place (the whole sequence flipped without lengths): its own inverse."""
    if lengths is None:
        return x.flip(0)
    steps = torch.arange(x.shape[0], device=x.device)[:, None]  # [T, 1]
    ends = lengths.to(x.device)[None, :]                          # [1, B]
    index = torch.where(steps < ends, ends - 1 - steps, steps)    # [T, B]
    return x.gather(0, index.view(*index.shape, *([1] * (x.dim() - 2))).expand_as(x))


def _check_backend(backend) -> None:
    if backend not in _BACKEND_NAMES:
        raise ValueError(f"backend must be one of {_BACKEND_NAMES}, got {backend!r}")


def _check_irnn_init(hh_init: str, hh_scale: float, ih_init: str, ih_std: float) -> None:
    if hh_init not in _HH_INITS:
        raise ValueError(f"hh_init must be one of {_HH_INITS}, got {hh_init!r}")
    if ih_init not in _IH_INITS:
        raise ValueError(f"ih_init must be one of {_IH_INITS}, got {ih_init!r}")
    if not isinstance(hh_scale, numbers.Real):
        raise ValueError(f"hh_scale must be a real number, got {hh_scale!r}")
    if not isinstance(ih_std, numbers.Real) or ih_std < 0:
        raise ValueError(f"ih_std must be a non-negative real number, got {ih_std!r}")


def _backend_repr(backend: str, weight: Tensor, options=()) -> str:
    """``backend=auto (cpp on cpu)``: what ``auto`` resolves to for the module's parameters."""
    if backend != "auto":
        return f"backend={backend}"
    resolved = select_backend(weight.device, weight.dtype, backend, options=options).name
    return f"backend=auto ({resolved} on {weight.device.type})"


def _irnn_init_repr(hh_init: str, hh_scale: float, ih_init: str, ih_std: float) -> List[str]:
    parts = []
    if hh_init != "identity":
        parts.append(f"hh_init={hh_init}")
    elif hh_scale != 1.0:
        parts.append(f"hh_scale={hh_scale}")
    if ih_init != "normal":
        parts.append(f"ih_init={ih_init}")
    elif ih_std != _DEFAULT_IH_STD:
        parts.append(f"ih_std={ih_std}")
    return parts


def _uniform_bound(hidden_size: int) -> float:
    # torch.nn's init bound 1/sqrt(H); 0 for the empty cells of hidden_size=0, as there
    return 1.0 / math.sqrt(hidden_size) if hidden_size > 0 else 0.0


@torch.no_grad()
def _init_irnn_weights(w_ih, w_hh, b_ih, b_hh, hh_init, hh_scale, ih_init, ih_std) -> None:
    """IRNN init of one layer (or cell); each bias follows its weight's scheme.

    ``identity``: W_hh = hh_scale * I, b_hh = 0.  ``normal``: W_ih ~ N(0, ih_std^2), b_ih = 0.
    ``pytorch``: uniform(-1/sqrt(H), 1/sqrt(H)) for that weight and its bias, as nn.RNN.
    """
    bound = _uniform_bound(w_hh.shape[1])
    if hh_init == "identity":
        w_hh.copy_(torch.eye(w_hh.shape[0], dtype=w_hh.dtype, device=w_hh.device) * hh_scale)
        if b_hh is not None:
            b_hh.zero_()
    else:
        w_hh.uniform_(-bound, bound)
        if b_hh is not None:
            b_hh.uniform_(-bound, bound)
    if ih_init == "normal":
        w_ih.normal_(0.0, ih_std)
        if b_ih is not None:
            b_ih.zero_()
    else:
        w_ih.uniform_(-bound, bound)
        if b_ih is not None:
            b_ih.uniform_(-bound, bound)


class _StackedRNN(nn.Module):
    """Multi-layer, optionally bidirectional stack of single-direction fused layers.

    Subclasses set ``_gates`` (1 for the IRNN, 4 for the LSTM) and ``mode`` (as
    torch.nn.RNNBase) and implement ``_run_layer(x [T, B, I], state, weights, options,
    backend) -> (y [T, B, P], final state)``, options being the keyword arguments of the
    functional call (recurrent_mask, lengths) and backend its backend; P is ``proj_size``
    or H.
    """

    _gates = 1
    # the IRNN's option, None for the LSTM: a class attribute, as a getattr default would
    # cost the LSTM nn.Module.__getattr__'s raised AttributeError on every call (5-8 us)
    hidden_clip: Optional[float] = None

    def __init__(self, input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                 proj_size, device, dtype, backend, recurrent_dropout, weight_dropout):
        super().__init__()
        # the checks of torch.nn.RNNBase, with the same exception classes
        if not isinstance(dropout, numbers.Real) or isinstance(dropout, bool) or not 0 <= dropout <= 1:
            raise ValueError(f"dropout must be a number in [0, 1] (a probability), got {dropout!r}")
        if dropout > 0 and num_layers == 1:
            warnings.warn(
                f"dropout={dropout} with num_layers=1 has no effect: as in torch.nn.RNN, dropout is "
                "applied between stacked layers only, not after the last one", stacklevel=3
            )
        _check_bool("bias", bias)
        _check_bool("batch_first", batch_first)
        _check_bool("bidirectional", bidirectional)
        input_size = _check_size("input_size", input_size, 1)
        hidden_size = _check_size("hidden_size", hidden_size, 1)
        num_layers = _check_size("num_layers", num_layers, 1)
        proj_size = _check_size("proj_size", proj_size, 0) if proj_size != 0 else 0
        if proj_size >= hidden_size:
            raise ValueError(f"proj_size has to be smaller than hidden_size, got proj_size={proj_size} "
                             f"and hidden_size={hidden_size}")
        _check_probability("recurrent_dropout", recurrent_dropout)
        _check_probability("weight_dropout", weight_dropout)
        _check_backend(backend)
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.proj_size = proj_size
        self.backend = backend
        self.recurrent_dropout = float(recurrent_dropout)
        self.weight_dropout = float(weight_dropout)
        num_directions = 2 if bidirectional else 1
        factory = {"device": device, "dtype": dtype}
        gate_size = self._gates * hidden_size
        width = self._state_width
        # names per (layer, direction), registered in nn.RNN's order so state_dicts line up
        self._all_weights: List[List[str]] = []
        for layer in range(num_layers):
            layer_input_size = input_size if layer == 0 else num_directions * width
            for direction in range(num_directions):
                suffix = f"_l{layer}" + ("_reverse" if direction == 1 else "")
                shapes = {
                    f"weight_ih{suffix}": (gate_size, layer_input_size),
                    f"weight_hh{suffix}": (gate_size, width),
                }
                if bias:
                    shapes[f"bias_ih{suffix}"] = (gate_size,)
                    shapes[f"bias_hh{suffix}"] = (gate_size,)
                if proj_size:
                    shapes[f"weight_hr{suffix}"] = (proj_size, hidden_size)
                for name, shape in shapes.items():
                    self.register_parameter(name, nn.Parameter(torch.empty(shape, **factory)))
                self._all_weights.append(list(shapes))

    def __setstate__(self, state):
        # modules pickled whole by fused_rnn 0.1.0, before proj_size and nonlinearity
        if "_weight_names" in state:
            state["_all_weights"] = [list(names) for names in state.pop("_weight_names")]
        state.setdefault("proj_size", 0)
        if self._gates == 1:
            state.setdefault("nonlinearity", "relu")
        super().__setstate__(state)

    @property
    def _state_width(self) -> int:
        """P: the width of h (the projection's, or H)."""
        return self.proj_size or self.hidden_size

    @property
    def _flat_weights_names(self) -> List[str]:
        # as torch.nn.RNNBase (code such as AWD-LSTM's WeightDrop reads these)
        return [name for names in self._all_weights for name in names]

    @property
    def _flat_weights(self) -> List[Optional[Tensor]]:
        return [getattr(self, name, None) for name in self._flat_weights_names]

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def all_weights(self) -> List[List[nn.Parameter]]:
        """Parameters per (layer, direction), in nn.RNN's order: [w_ih, w_hh, b_ih, b_hh, w_hr]
        (the biases only with bias=True, w_hr only with proj_size > 0)."""
        return [[getattr(self, name) for name in names] for names in self._all_weights]

    def flatten_parameters(self) -> None:
        """No-op, for code written against nn.RNN (no cuDNN weight buffer to compact here)."""

    def _layer_weights(self, index: int):
        # (w_ih, w_hh, b_ih, b_hh, w_hr); the biases are None when bias=False, w_hr without proj_size
        # (the names of a layer are in that order, without the ones it does not have).
        # Parameters straight from _parameters (this runs on every call; nn.Module.__getattr__ is
        # slow), anything else (a weight-dropping wrapper's plain tensor) through getattr.
        parameters = self._parameters
        values = [parameters[name] if name in parameters else getattr(self, name, None)
                  for name in self._all_weights[index]]
        b_ih, b_hh = (values[2], values[3]) if self.bias else (None, None)
        return values[0], values[1], b_ih, b_hh, (values[-1] if self.proj_size else None)

    def _check_input(self, input) -> Tuple[Tensor, bool]:
        """Returns (input as [T, B, I], whether it was batched)."""
        if not isinstance(input, Tensor):
            raise InputTypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
        layout = "[B, T, input_size]" if self.batch_first else "[T, B, input_size]"
        if input.dim() not in (2, 3):
            raise ValueError(
                f"input must be 3-D {layout} or 2-D unbatched [T, input_size], "
                f"got shape {tuple(input.shape)}"
            )
        if input.shape[-1] != self.input_size:
            expected = layout if input.dim() == 3 else "[T, input_size]"
            raise InputError(
                f"input must have input_size={self.input_size} features in its last dimension "
                f"({expected}), got shape {tuple(input.shape)}"
            )
        batched = input.dim() == 3
        if not batched:
            return input.unsqueeze(1), False
        return (input.transpose(0, 1) if self.batch_first else input), True

    def _check_state(self, name: str, state, x: Tensor, batched: bool, width: Optional[int] = None,
                     size_name: str = "hidden_size") -> Optional[Tensor]:
        """Checks one initial-state tensor of `width` (default H) units against the input
        x [T, B, I]; returns it as [L*D, B, width] (or None)."""
        if state is None:
            return None
        if not isinstance(state, Tensor):
            raise InputTypeError(f"{name} must be a torch.Tensor or None, got {type(state).__name__}")
        _check_state_dtype(name, state, x)
        batch = x.shape[1]
        width = self.hidden_size if width is None else width
        stacked = len(self._all_weights)  # num_layers * num_directions
        expected = (stacked, batch, width) if batched else (stacked, width)
        if state.shape != expected:
            if batched:
                meaning = f"[num_layers * num_directions, B, {size_name}] = {list(expected)}"
            else:
                meaning = f"[num_layers * num_directions, {size_name}] = {list(expected)} for unbatched input"
            raise InputError(f"{name} must have shape {meaning}, got shape {tuple(state.shape)}")
        return state if batched else state.unsqueeze(1)

    def _check_lengths(self, lengths, x: Tensor, batched: bool) -> Optional[Tensor]:
        if lengths is None:
            return None
        if not batched:
            raise InputError("lengths is for batched input: an unbatched sequence has one length, its own")
        lengths = torch.as_tensor(lengths)
        if lengths.dtype.is_floating_point or lengths.dtype == torch.bool or tuple(lengths.shape) != (x.shape[1],):
            raise InputError(f"lengths must be {x.shape[1]} integers (one per sequence), got {lengths!r}")
        return lengths

    def _prepare(self, input, lengths):
        """(x [T, B, I], batched, lengths or None, PackedSequence or None) from the input."""
        if isinstance(input, PackedSequence):
            if lengths is not None:
                raise ValueError("lengths is given by the PackedSequence; do not pass lengths= as well")
            data = input.data
            if not isinstance(data, Tensor) or data.dim() != 2 or data.shape[-1] != self.input_size:
                shape = tuple(data.shape) if isinstance(data, Tensor) else type(data).__name__
                raise InputError(f"a PackedSequence input must hold data of shape [sum of lengths, input_size="
                                 f"{self.input_size}], got {shape}")
            padded, lengths = _unpack(input)  # [T, B, I], in the batch's original order
            return padded, True, lengths, input
        x, batched = self._check_input(input)
        return x, batched, self._check_lengths(lengths, x, batched), None

    def _finish(self, y: Tensor, batched: bool, lengths: Optional[Tensor], packed: Optional[PackedSequence]):
        """The output in the input's form: a PackedSequence with the input's order, or the tensor layout."""
        if packed is None:
            return self._finish_output(y, batched)
        return PackedSequence(_pack_like(y, packed), packed.batch_sizes, packed.sorted_indices,
                              packed.unsorted_indices)

    def _recurrent_mask(self, x: Tensor) -> Optional[Tensor]:
        """A variational dropout mask on h_{t-1}, [B, H], drawn once per layer, direction
        and call: in training only."""
        if not self.training or self.recurrent_dropout == 0.0:
            return None
        keep = 1.0 - self.recurrent_dropout
        return x.new_empty(x.shape[1], self._state_width).bernoulli_(keep) / keep

    def _dropped(self, weights):
        """One layer's (w_ih, w_hh, b_ih, b_hh, w_hr), with DropConnect on W_hh (AWD-LSTM) in training."""
        if self.training and self.weight_dropout > 0.0:
            w_ih, w_hh, b_ih, b_hh, w_hr = weights
            return w_ih, torch_functional.dropout(w_hh, self.weight_dropout, training=True), b_ih, b_hh, w_hr
        return weights

    def _run_stack(self, x: Tensor, states: Tuple[Optional[Tensor], ...], lengths: Optional[Tensor] = None):
        """x [T, B, I]; states: initial states, each [L*D, B, H] or None; lengths [B] or None.

        Returns (y [T, B, D*H], final states, each [L*D, B, H]).
        """
        weights = [self._layer_weights(index) for index in range(len(self._all_weights))]
        whole, layer_backend = self._whole_stack_on_nn(x, states, lengths, weights)
        if whole is not None:
            return whole
        num_directions = self.num_directions
        finals: List[List[Tensor]] = [[] for _ in states]
        layer_input = x
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(num_directions):
                index = layer * num_directions + direction
                initial = [None if s is None else s[index] for s in states]
                # the reverse direction is the forward kernel on each sequence reversed
                # within its length (padding stays at the end)
                sequence = layer_input if direction == 0 else _reverse_within_lengths(layer_input, lengths)
                options = dict(recurrent_mask=self._recurrent_mask(sequence), lengths=lengths)
                y, final = self._run_layer(sequence, initial, self._dropped(weights[index]), options, layer_backend)
                outputs.append(y if direction == 0 else _reverse_within_lengths(y, lengths))
                for kept, value in zip(finals, final):
                    kept.append(value)
            layer_input = outputs[0] if num_directions == 1 else torch.cat(outputs, dim=2)
            # as nn.RNN: between layers only, and only while training
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                layer_input = torch_functional.dropout(layer_input, self.dropout, training=True)
        # copies, never views (truncated-BPTT code calls h_n.detach_(), which a view refuses)
        return layer_input, tuple([torch.stack(kept) for kept in finals])

    def _whole_stack_on_nn(self, x: Tensor, states: Tuple[Optional[Tensor], ...], lengths: Optional[Tensor],
                           weights: List[tuple]):
        """When every layer of this call would run on the "nn" backend, the whole stack in
        one call of torch.nn's kernels, as torch.nn's module makes it (layer by layer, the
        Python around each call would make `auto` slower than the module it replaces at
        small sizes). Else None: options only ours have (lengths, recurrent and weight
        dropout, hidden_clip), autocast (whose mixed precision differs from ours), a
        measured dispatch still to measure, and on a GPU a call that records gradients
        (its backward may need the second-order wrapper of a layer call) take the
        per-layer path. `weights`: each layer's _layer_weights. Returns (that result or
        None, the backend the per-layer path's layer calls take): the module's own, or
        the fused backend auto chose for a CPU call outside autocast and measured
        dispatch, which each layer call then takes by name instead of choosing again
        (as it would: 15-45 us of a module's single step)."""
        if self.backend not in ("auto", "nn"):  # a fused backend named by the caller: no choice to make
            return None, self.backend
        if lengths is not None or self.recurrent_dropout > 0 or self.hidden_clip is not None \
                or (self.training and self.weight_dropout > 0) or x.numel() == 0:
            return None, self.backend  # (a sequence of length 0 returns the initial state, where torch.nn raises)
        dtype, device = x.dtype, x.device
        tensors = [x, *states, *itertools.chain.from_iterable(weights)]
        training = functional._records_grad(tensors)
        if training and device.type != "cpu":
            return None, self.backend
        options = ("proj_size",) if self.proj_size else ()
        if self.backend == "auto":  # first the choice, which a call for a fused kernel stops at
            measured = measured_dispatch_enabled()
            choice = auto_choice(device, dtype, self._cell, self.hidden_size, x.shape[1], options, training,
                                 x.shape[0], measured, layer_route=False)
            if choice.name != "nn" and not measured and device.type == "cpu" \
                    and not functional.autocast_dtype("cpu"):
                return None, choice.name
            if choice.name != "nn" or (measured and not choice.basis.startswith("measured")):
                return None, self.backend
        if functional.autocast_dtype(device.type) or x.shape[2] != self.input_size \
                or not all_like(dtype, device, tensors):
            # autocast's mixed precision differs from ours; the per-layer path names a mistake
            return None, self.backend
        if self.backend == "nn":  # raises where torch.nn's kernels cannot run these tensors
            select_backend(device, dtype, "nn", cell=self._cell, hidden=self.hidden_size, options=options)
        if states[0] is None or states[-1] is None:
            layers, batch = len(weights), x.shape[1]
            widths = (self.proj_size or self.hidden_size, self.hidden_size)
            states = tuple(x.new_zeros(layers, batch, width) if s is None else s for s, width in zip(states, widths))
        return nn_backend.run_stack(self._cell, x, states, weights, self.num_layers, self.dropout, self.training,
                                    self.bidirectional), "nn"

    def _finish_output(self, y: Tensor, batched: bool) -> Tensor:
        if not batched:
            return y.squeeze(1)
        return y.transpose(0, 1) if self.batch_first else y

    def _run_layer(self, x, state, weights, options, backend):
        raise NotImplementedError

    def extra_repr(self) -> str:
        parts = [f"{self.input_size}, {self.hidden_size}"]
        if self.proj_size != 0:
            parts.append(f"proj_size={self.proj_size}")
        if self.num_layers != 1:
            parts.append(f"num_layers={self.num_layers}")
        if self.bias is not True:
            parts.append(f"bias={self.bias}")
        if self.batch_first is not False:
            parts.append(f"batch_first={self.batch_first}")
        if self.dropout != 0:
            parts.append(f"dropout={self.dropout}")
        if self.bidirectional is not False:
            parts.append(f"bidirectional={self.bidirectional}")
        if self.recurrent_dropout != 0:
            parts.append(f"recurrent_dropout={self.recurrent_dropout}")
        if self.weight_dropout != 0:
            parts.append(f"weight_dropout={self.weight_dropout}")
        parts.extend(self._init_repr())
        parts.append(_backend_repr(self.backend, self.weight_hh_l0, ("proj_size",) if self.proj_size else ()))
        return ", ".join(parts)

    def _init_repr(self) -> List[str]:
        return []


class IRNN(_StackedRNN):
    r"""Multi-layer IRNN: a ReLU RNN, drop-in for ``torch.nn.RNN(nonlinearity="relu")``.

    Per layer and direction, for t = 1..T:
    ``h_t = relu(x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh)``.

    Args (positional as in ``torch.nn.RNN``):
        input_size (I), hidden_size (H), num_layers, nonlinearity (only ``"relu"``), bias,
            batch_first, dropout, bidirectional, device, dtype: as in ``torch.nn.RNN``.
            ``dropout`` is applied to the outputs of every layer but the last, in
            training mode only.

    Keyword-only (the package's own):
        backend: ``"auto"`` (default), ``"cpp"``, ``"cuda"``, ``"triton"`` or ``"torch"``;
            a plain attribute that may be changed later. See :func:`fused_rnn.select_backend`.
        hh_init: ``"identity"`` (default): ``W_hh = hh_scale * I``, ``b_hh = 0``, the IRNN
            initialisation of Le, Jaitly & Hinton (2015); ``"pytorch"``: nn.RNN's
            uniform(-1/sqrt(H), 1/sqrt(H)) for ``W_hh`` and ``b_hh``.
        hh_scale: scale of the identity; 1.0 as in the paper's language and MNIST
            experiments (they used 0.01 for speech, where 1.0 was unstable).
        ih_init: ``"normal"`` (default): ``W_ih ~ N(0, ih_std^2)``, ``b_ih = 0``;
            ``"pytorch"``: uniform(-1/sqrt(H), 1/sqrt(H)) for ``W_ih`` and ``b_ih``.
        ih_std: standard deviation of ``W_ih`` for ``ih_init="normal"`` (paper: 0.001).
        recurrent_dropout: variational recurrent dropout (Gal & Ghahramani 2016, Keras'
            ``dropout_U``): in training, h_{t-1} is multiplied in the recurrent product by
            a mask of 0 and 1/(1-p) drawn once per layer, direction and call and fixed
            over time. Identity in eval mode.
        weight_dropout: DropConnect on W_hh (AWD-LSTM), redrawn per call, training only.
        hidden_clip: h_t = min(relu(z_t), hidden_clip), a bound on the activations of
            long stateful ReLU recurrences (None: no bound).

    Parameters (D = 2 if bidirectional else 1): ``weight_ih_l{k}`` [H, I] for k = 0,
    [H, D*H] for k > 0; ``weight_hh_l{k}`` [H, H]; ``bias_ih_l{k}``, ``bias_hh_l{k}`` [H];
    the backward direction's carry the suffix ``_reverse``. Kernels: float32, float64 and
    bfloat16/float16 with float32 state and accumulation (see :func:`fused_rnn.select_backend`).

    Shapes of :meth:`forward` (all tensors of the parameters' dtype and device):
        input: [T, B, I], [B, T, I] if ``batch_first``, or unbatched [T, I]; or a
            ``PackedSequence`` (sorted or not), as for ``nn.RNN``: the output is then
            packed the same way.
        hx: [num_layers * D, B, H] (unbatched: [num_layers * D, H]) or None for zeros.
        lengths: keyword-only, [B] integers (any device) for padded input: sequence b
            has lengths[b] steps; its output is zero beyond them, h_n is its state at
            its length, and the reverse direction starts at its last real step.
        returns (output, h_n): output [T, B, D*H] ([B, T, D*H] if ``batch_first``,
        [T, D*H] unbatched), the last layer's h_t of both directions concatenated;
        h_n [num_layers * D, B, H] ([num_layers * D, H] unbatched), index
        ``layer * D + direction``.
    """

    _gates = 1
    _cell = "irnn"
    mode = "RNN_RELU"

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, nonlinearity: str = "relu",
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 device=None, dtype=None, *, backend: str = "auto", hh_init: str = "identity",
                 hh_scale: float = 1.0, ih_init: str = "normal", ih_std: float = _DEFAULT_IH_STD,
                 recurrent_dropout: float = 0.0, weight_dropout: float = 0.0, hidden_clip: Optional[float] = None):
        _check_nonlinearity("IRNN", nonlinearity)
        if hidden_clip is not None and (isinstance(hidden_clip, bool) or not (isinstance(hidden_clip, numbers.Real)
                                                                               and hidden_clip > 0)):
            raise ValueError(f"hidden_clip must be a positive number or None, got {hidden_clip!r}")
        _check_irnn_init(hh_init, hh_scale, ih_init, ih_std)
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, 0,
                         device, dtype, backend, recurrent_dropout, weight_dropout)
        self.nonlinearity = nonlinearity
        self.hidden_clip = None if hidden_clip is None else float(hidden_clip)
        self.hh_init = hh_init
        self.hh_scale = float(hh_scale)
        self.ih_init = ih_init
        self.ih_std = float(ih_std)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-draws every parameter with the init chosen at construction."""
        for index in range(len(self._all_weights)):
            _init_irnn_weights(*self._layer_weights(index)[:4], self.hh_init, self.hh_scale,
                               self.ih_init, self.ih_std)

    def _run_layer(self, x, state, weights, options, backend):
        y, h_n = functional.irnn(x, state[0], *weights[:4], backend=backend, hidden_clip=self.hidden_clip,
                                 **options)
        return y, (h_n,)

    def forward(self, input, hx: Optional[Tensor] = None, *, lengths=None):
        """(input, hx) -> (output, h_n); shapes in the class docstring."""
        x, batched, lengths, packed = self._prepare(input, lengths)
        hx = self._check_state("hx", hx, x, batched)
        y, (h_n,) = self._run_stack(x, (hx,), lengths)
        return self._finish(y, batched, lengths, packed), (h_n if batched else h_n.squeeze(1))

    def _init_repr(self) -> List[str]:
        parts = _irnn_init_repr(self.hh_init, self.hh_scale, self.ih_init, self.ih_std)
        return parts + ([f"hidden_clip={self.hidden_clip}"] if self.hidden_clip is not None else [])


class LSTM(_StackedRNN):
    r"""Multi-layer LSTM, drop-in for ``torch.nn.LSTM`` (gate order i, f, g, o).

    Per layer and direction: ``gates = x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh``;
    ``i, f, o = sigmoid``, ``g = tanh`` of their quarter; ``c_t = f * c_{t-1} + i * g``;
    ``h_t = o * tanh(c_t)``, or with ``proj_size`` P > 0, ``h_t = (o * tanh(c_t)) W_hr^T``.

    Args (positional as in ``torch.nn.LSTM``):
        input_size (I), hidden_size (H), num_layers, bias, batch_first, dropout,
            bidirectional, proj_size (P), device, dtype: as in ``torch.nn.LSTM``; every
            parameter starts as uniform(-1/sqrt(H), 1/sqrt(H)), as there.

    Keyword-only: ``backend``, ``recurrent_dropout``, ``weight_dropout`` as in
    :class:`IRNN` (the mask applies to h_{t-1}, not to the cell state).

    Parameters (D = 2 if bidirectional else 1; P = proj_size, or H without one):
    ``weight_ih_l{k}`` [4H, I] for k = 0, [4H, D*P] for k > 0; ``weight_hh_l{k}`` [4H, P];
    ``bias_ih_l{k}``, ``bias_hh_l{k}`` [4H]; ``weight_hr_l{k}`` [P, H] with a projection;
    ``_reverse`` suffix for the backward direction.

    Shapes of :meth:`forward` (all tensors of the parameters' dtype and device):
        input: [T, B, I], [B, T, I] if ``batch_first``, or unbatched [T, I]; or a
            ``PackedSequence``, as for ``nn.LSTM``. ``lengths``: as in :class:`IRNN`.
        hx: tuple (h_0, c_0), h_0 [num_layers * D, B, P] and c_0 [num_layers * D, B, H]
        (unbatched: without B), or None for zeros.
        returns (output, (h_n, c_n)): output [T, B, D*P] ([B, T, D*P] if
        ``batch_first``, [T, D*P] unbatched); h_n, c_n shaped like h_0, c_0.
    """

    _gates = 4
    _cell = "lstm"
    mode = "LSTM"

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, proj_size: int = 0,
                 device=None, dtype=None, *, backend: str = "auto", recurrent_dropout: float = 0.0,
                 weight_dropout: float = 0.0):
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, proj_size,
                         device, dtype, backend, recurrent_dropout, weight_dropout)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """uniform(-1/sqrt(H), 1/sqrt(H)) for every parameter, as torch.nn.LSTM."""
        bound = _uniform_bound(self.hidden_size)
        for parameter in self.parameters():
            parameter.uniform_(-bound, bound)

    def _run_layer(self, x, state, weights, options, backend):
        h0, c0 = state
        w_ih, w_hh, b_ih, b_hh, w_hr = weights
        y, (h_n, c_n) = functional.lstm(x, (h0, c0), w_ih, w_hh, b_ih, b_hh, backend=backend, w_hr=w_hr,
                                        **options)
        return y, (h_n, c_n)

    def forward(self, input, hx: Optional[Tuple[Tensor, Tensor]] = None, *, lengths=None):
        """(input, (h_0, c_0)) -> (output, (h_n, c_n)); shapes in the class docstring."""
        x, batched, lengths, packed = self._prepare(input, lengths)
        if hx is None:
            h0, c0 = None, None
        elif isinstance(hx, (tuple, list)) and len(hx) == 2:
            h0 = self._check_state("hx[0] (h_0)", hx[0], x, batched, self._state_width,
                                   "proj_size" if self.proj_size else "hidden_size")
            c0 = self._check_state("hx[1] (c_0)", hx[1], x, batched)
        else:
            raise InputTypeError(f"hx must be a tuple (h_0, c_0) of two tensors or None, got {_describe(hx)}")
        y, (h_n, c_n) = self._run_stack(x, (h0, c0), lengths)
        if not batched:
            h_n, c_n = h_n.squeeze(1), c_n.squeeze(1)
        return self._finish(y, batched, lengths, packed), (h_n, c_n)


def _check_state_dtype(name: str, state, x: Tensor) -> None:
    """A state tensor in another dtype than the input, named as the module's caller knows
    it (the layer call would name its own h0 or c0); autocast casts both to its dtype."""
    if isinstance(state, Tensor) and isinstance(x, Tensor) and state.dtype is not x.dtype \
            and not functional.autocast_dtype("cpu" if x.is_cpu else x.device.type):
        raise InputTypeError(f"{name} must have the input's dtype {x.dtype}, got {state.dtype}")


def _describe(value) -> str:
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)}"
    return type(value).__name__


class _Cell(nn.Module):
    """One step of a single layer; parameters weight_ih [G*H, I], weight_hh [G*H, H],
    bias_ih, bias_hh [G*H] (None with bias=False), as torch.nn.RNNCellBase. Sizes may be
    0, as there."""

    _gates = 1

    def __init__(self, input_size, hidden_size, bias, device, dtype, backend):
        super().__init__()
        input_size = _check_size("input_size", input_size, 0)
        hidden_size = _check_size("hidden_size", hidden_size, 0)
        _check_bool("bias", bias)
        _check_backend(backend)
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.bias = bias
        self.backend = backend
        factory = {"device": device, "dtype": dtype}
        gate_size = self._gates * hidden_size
        self.weight_ih = nn.Parameter(torch.empty(gate_size, input_size, **factory))
        self.weight_hh = nn.Parameter(torch.empty(gate_size, hidden_size, **factory))
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(gate_size, **factory))
            self.bias_hh = nn.Parameter(torch.empty(gate_size, **factory))
        else:
            # registered as None, as nn.RNNCellBase: `cell.bias_ih` stays a valid attribute
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)

    def _weights(self):
        return self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh

    def _check_input(self, input) -> Tuple[Tensor, bool]:
        """Returns (input as [B, I], whether it was batched)."""
        if not isinstance(input, Tensor):
            raise InputTypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
        if input.dim() not in (1, 2):
            raise ValueError(f"input must be 2-D [B, input_size] or 1-D unbatched [input_size], "
                             f"got shape {tuple(input.shape)}")
        if input.shape[-1] != self.input_size:
            raise InputError(f"input must have input_size={self.input_size} features in its last dimension, "
                             f"got shape {tuple(input.shape)}")
        batched = input.dim() == 2
        return (input if batched else input.unsqueeze(0)), batched

    def _check_state(self, name: str, state, x: Tensor, batched: bool) -> Optional[Tensor]:
        """Checks one state tensor against the input x [B, I]; returns it as [B, H] (or None)."""
        if state is None:
            return None
        if not isinstance(state, Tensor):
            raise InputTypeError(f"{name} must be a torch.Tensor or None, got {type(state).__name__}")
        _check_state_dtype(name, state, x)
        batch = x.shape[0]
        if state.dim() not in (1, 2):
            raise ValueError(f"{name} must be 2-D [B, hidden_size] or 1-D unbatched [hidden_size], "
                             f"got shape {tuple(state.shape)}")
        expected = (batch, self.hidden_size) if batched else (self.hidden_size,)
        meaning = f"[B, hidden_size] = {list(expected)}" if batched else \
            f"[hidden_size] = {list(expected)} for unbatched input"
        if tuple(state.shape) != expected:
            raise InputError(f"{name} must have shape {meaning}, got shape {tuple(state.shape)}")
        return state if batched else state.unsqueeze(0)

    def extra_repr(self) -> str:
        parts = [f"{self.input_size}, {self.hidden_size}"]
        if self.bias is not True:
            parts.append(f"bias={self.bias}")
        parts.extend(self._init_repr())
        parts.append(_backend_repr(self.backend, self.weight_hh))
        return ", ".join(parts)

    def _init_repr(self) -> List[str]:
        return []


class IRNNCell(_Cell):
    r"""One IRNN step, drop-in for ``torch.nn.RNNCell(nonlinearity="relu")``:
    ``h' = relu(x W_ih^T + b_ih + h W_hh^T + b_hh)``.

    Args (positional as in ``torch.nn.RNNCell``): input_size (I), hidden_size (H), bias,
    nonlinearity (only ``"relu"``), device, dtype. Keyword-only: ``backend`` and the init
    options ``hh_init``, ``hh_scale``, ``ih_init``, ``ih_std`` of :class:`IRNN`.

    Parameters: ``weight_ih`` [H, I], ``weight_hh`` [H, H], ``bias_ih``, ``bias_hh`` [H].

    :meth:`forward`: input [B, I] or unbatched [I]; hx [B, H] ([H]) or None for zeros;
    returns h' [B, H] ([H]). Tensors of the parameters' dtype and device.
    """

    _gates = 1

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, nonlinearity: str = "relu",
                 device=None, dtype=None, *, backend: str = "auto", hh_init: str = "identity",
                 hh_scale: float = 1.0, ih_init: str = "normal", ih_std: float = _DEFAULT_IH_STD):
        _check_nonlinearity("IRNNCell", nonlinearity)
        _check_irnn_init(hh_init, hh_scale, ih_init, ih_std)
        super().__init__(input_size, hidden_size, bias, device, dtype, backend)
        self.nonlinearity = nonlinearity
        self.hh_init = hh_init
        self.hh_scale = float(hh_scale)
        self.ih_init = ih_init
        self.ih_std = float(ih_std)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-draws every parameter with the init chosen at construction."""
        _init_irnn_weights(*self._weights(), self.hh_init, self.hh_scale, self.ih_init, self.ih_std)

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tensor:
        """(input, hx) -> h'; shapes in the class docstring."""
        x, batched = self._check_input(input)
        h = self._check_state("hx", hx, x, batched)
        h_new = functional.irnn_cell(x, h, *self._weights(), backend=self.backend)
        return h_new if batched else h_new.squeeze(0)

    def _init_repr(self) -> List[str]:
        return _irnn_init_repr(self.hh_init, self.hh_scale, self.ih_init, self.ih_std)


class LSTMCell(_Cell):
    r"""One LSTM step, drop-in for ``torch.nn.LSTMCell`` (gate order i, f, g, o).

    Args (positional as in ``torch.nn.LSTMCell``): input_size (I), hidden_size (H), bias,
    device, dtype. Keyword-only: ``backend``. Every parameter starts as
    uniform(-1/sqrt(H), 1/sqrt(H)), as in PyTorch.

    Parameters: ``weight_ih`` [4H, I], ``weight_hh`` [4H, H], ``bias_ih``, ``bias_hh`` [4H].

    :meth:`forward`: input [B, I] or unbatched [I]; hx a tuple (h, c), each [B, H]
    ([H]), or None for zeros; returns (h', c'), each [B, H] ([H]).
    """

    _gates = 4

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None, *,
                 backend: str = "auto"):
        super().__init__(input_size, hidden_size, bias, device, dtype, backend)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """uniform(-1/sqrt(H), 1/sqrt(H)) for every parameter, as torch.nn.LSTMCell."""
        bound = _uniform_bound(self.hidden_size)
        for parameter in self.parameters():
            parameter.uniform_(-bound, bound)

    def forward(self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Tensor, Tensor]:
        """(input, (h, c)) -> (h', c'); shapes in the class docstring."""
        x, batched = self._check_input(input)
        if hx is None:
            h, c = None, None
        elif isinstance(hx, (tuple, list)) and len(hx) == 2:
            h = self._check_state("hx[0] (h)", hx[0], x, batched)
            c = self._check_state("hx[1] (c)", hx[1], x, batched)
        else:
            raise InputTypeError(f"hx must be a tuple (h, c) of two tensors or None, got {_describe(hx)}")
        h_new, c_new = functional.lstm_cell(x, (h, c), *self._weights(), backend=self.backend)
        if not batched:
            return h_new.squeeze(0), c_new.squeeze(0)
        return h_new, c_new
