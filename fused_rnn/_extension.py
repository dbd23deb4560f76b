"""Loading of the compiled extension ``fused_rnn._C``.

The package must stay importable when the extension is missing (a source checkout
that was never built, or a build that failed): torch.nn's kernels (the "nn" backend)
and the torch loop then serve every call, and one warning says how to rebuild.
"""

import warnings

import torch  # noqa: F401  (loads libtorch, which fused_rnn._C links against)

REBUILD_HINT = (
    "rebuild it with `pip install --no-build-isolation -e .` from the fused_rnn "
    "source tree (set FUSED_RNN_SKIP_CUDA_BUILD=TRUE to build only the CPU kernels)"
)

try:
    from . import _C  # noqa: F401  (importing registers the fused_rnn:: ops)

    HAS_C = True
    IMPORT_ERROR = None
except ImportError as error:  # extension not built, or built against another torch
    _C = None
    HAS_C = False
    IMPORT_ERROR = error
    warnings.warn(
        f"fused_rnn: the compiled extension fused_rnn._C could not be imported ({error}); "
        f"only the 'nn' and 'torch' backends are available. To get the fused kernels, {REBUILD_HINT}.",
        RuntimeWarning,
        stacklevel=2,
    )


def build_info() -> dict:
    """What this install was built with.

    Keys: ``backends`` (compiled kernel backends, e.g. ``["cpp", "cuda"]``),
    ``cuda_archs`` (e.g. ``["sm_80", "sm_90"]``, empty without CUDA), ``cuda_version``,
    ``compiler``, ``torch_version`` (the torch the extension was compiled against),
    ``cxx_flags``, ``cpu_gemm`` (the float32 CPU scans' GEMM kernel on this CPU:
    ``"avx512"`` or ``"avx2"``, the package's own, or ``"blas"``;
    ``FUSED_RNN_CPU_ISA=avx2`` or ``=blas`` forces a lower one), ``cpu_loops`` (the
    instruction set of the CPU scans' cell and ReLU loops, which follows ``cpu_gemm``:
    ``"x86-64-v4"`` with avx512, ``"x86-64-v3"`` with avx2, ``"baseline"`` with blas),
    ``cpu_bf16`` (the products of bfloat16 layers on the CPU: ``"avx512_bf16"`` with a CPU
    that has it on the avx512 path, else ``"off"``, float32 products;
    ``FUSED_RNN_CPU_BF16=off`` turns them off, ``=emulate`` runs the bf16 kernel with its
    dot product emulated in AVX2, for the tests: ``"emulated"``); plus
    ``extension_loaded`` and, when it is not, ``import_error``.
    """
    if not HAS_C:
        return {
            "extension_loaded": False,
            "import_error": str(IMPORT_ERROR),
            "backends": [],
            "rebuild": REBUILD_HINT,
        }
    info = dict(_C.build_info())
    info["extension_loaded"] = True
    return info
