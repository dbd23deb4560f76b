"""Triton kernels: one launch per sequence (see irnn.py).

Imported lazily by dispatch, never by ``import fused_rnn``: on machines without a GPU
the kernels run under the Triton interpreter (``TRITON_INTERPRET=1`` set before this
package is imported), which is how the tests check them on CPU tensors.
"""

import os

try:
    import triton  # noqa: F401
    import triton.language  # noqa: F401
except ImportError as error:  # pragma: no cover - triton ships with CUDA builds of torch
    HAS_TRITON, TRITON_IMPORT_ERROR = False, error
else:
    HAS_TRITON, TRITON_IMPORT_ERROR = True, None


def interpreting() -> bool:
    """Whether the kernels run under the Triton interpreter (on CPU tensors, one program
    after another): TRITON_INTERPRET=1, which must be set before this package loads."""
    return os.environ.get("TRITON_INTERPRET") == "1"
