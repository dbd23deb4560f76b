"""fused_rnn: fused IRNN (identity-initialised ReLU RNN) and LSTM kernels for PyTorch.

Quick start::

    import torch, fused_rnn
    rnn = fused_rnn.IRNN(input_size=42, hidden_size=256, batch_first=True)
    y, h_n = rnn(torch.randn(64, 100, 42))

Layers: :class:`IRNN`, :class:`LSTM` (drop-ins for ``torch.nn.RNN(nonlinearity="relu")``
and ``torch.nn.LSTM``), :class:`IRNNCell`, :class:`LSTMCell`. Functional:
:func:`irnn`, :func:`lstm`, :func:`irnn_cell`, :func:`lstm_cell`. Which kernels this
install has: :func:`available_backends`, :func:`build_info`, :func:`select_backend`.
Mistakes in the arguments raise :class:`InputError` (shapes, devices; a ``ValueError``
and a ``RuntimeError``) or :class:`InputTypeError` (types, dtypes; also a ``TypeError``).
"""

from ._extension import build_info
from ._measure import clear_dispatch_cache, measured_dispatch_enabled, set_measured_dispatch
from ._validation import InputError, InputTypeError
from ._version import __version__ as __version__
from .dispatch import available_backends, select_backend
from .functional import (
    IRNNCellFunction,
    IRNNFunction,
    LSTMCellFunction,
    LSTMFunction,
    irnn,
    irnn_cell,
    lstm,
    lstm_cell,
)
from .modules import IRNN, LSTM, IRNNCell, LSTMCell

__all__ = [
    "IRNN",
    "LSTM",
    "IRNNCell",
    "LSTMCell",
    "IRNNFunction",
    "LSTMFunction",
    "IRNNCellFunction",
    "LSTMCellFunction",
    "InputError",
    "InputTypeError",
    "available_backends",
    "clear_dispatch_cache",
    "measured_dispatch_enabled",
    "set_measured_dispatch",
    "build_info",
    "irnn",
    "irnn_cell",
    "lstm",
    "lstm_cell",
    "select_backend",
]
