"""Character-level language models of the classic char-RNN lesson, on the fused
kernels: see :mod:`fused_rnn.models.char_rnn`."""

from .char_rnn import (
    MODEL_NAMES,
    CharModel,
    NCharModel,
    OneHotModel,
    SequenceModel,
    StatefulModel,
    ThreeCharModel,
    build_model,
    with_torch_nn_layers,
)

__all__ = [
    "MODEL_NAMES",
    "CharModel",
    "NCharModel",
    "OneHotModel",
    "SequenceModel",
    "StatefulModel",
    "ThreeCharModel",
    "build_model",
    "with_torch_nn_layers",
]
