"""What the Triton IRNN and LSTM scans share: device functions, the dtype rules, the
launch configs and the per-sequence options as kernel arguments. (The GEMMs before and
after a scan are fused_rnn/_host.py's, shared with the other Python-side backends.)"""

import contextlib
from typing import Dict, NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from . import interpreting


@triton.jit
def dot_state_weight(state, weight, TF32: tl.constexpr, UPCAST: tl.constexpr):
    """state [M, K] (float32) @ weight [K, N] (the weights' dtype), accumulated in float32.

    float32 weights: IEEE-precision products unless TF32. bfloat16/float16 weights: the
    state tile is rounded to the weights' dtype and the product runs on the tensor
    cores with float32 accumulation (the state itself stays float32 between steps).
    UPCAST computes the same rounded operands' product in float32 instead: the Triton
    3.8 interpreter returns garbage for bfloat16 tl.dot and does not round float32 to
    bfloat16 to nearest-even (half of all values differed from torch's rounding), so
    the rounding is done on the bits here; a product of two bf16/fp16 numbers is exact
    in float32, so only the summation order differs from the tensor-core path."""
    operand = state_operand(state, weight, UPCAST)
    if weight.dtype == tl.float32:
        if TF32:
            return tl.dot(operand, weight, input_precision="tf32")
        else:
            return tl.dot(operand, weight, input_precision="ieee")
    elif UPCAST:
        return tl.dot(operand, weight.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(operand, weight)


@triton.jit
def state_operand(state, weight, UPCAST: tl.constexpr):
    """The float32 state tile as the recurrent product multiplies it with `weight`: as it
    is for float32 weights, else rounded to the weights' dtype (under UPCAST, rounded
    on the bits and kept in float32; see dot_state_weight). The hidden-split scans
    (split.py) share it, with the operands of the product the other way round."""
    if weight.dtype == tl.float32:
        return state
    elif UPCAST:
        if weight.dtype == tl.bfloat16:
            return _round_to_bfloat16(state)
        else:
            return state.to(weight.dtype).to(tl.float32)
    else:
        return state.to(weight.dtype)


@triton.jit
def _round_to_bfloat16(x):
    """float32 -> the nearest bfloat16 (ties to even), kept in float32, on the bits: as
    cvt.rn.bf16.f32 on a GPU. NaN stays NaN."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))  # NaN payloads can carry into inf/0


@triton.jit
def row_lengths(lengths, rows, row_ok, HAS_LENGTHS: tl.constexpr, BLOCK_B: tl.constexpr):
    """[BLOCK_B] int64: the length of each of the program's rows (0 where lengths are
    off; the kernels then never read them)."""
    lens = tl.full((BLOCK_B,), 0, tl.int64)
    if HAS_LENGTHS:
        lens = tl.load(lengths + rows, mask=row_ok, other=0)
    return lens


@triton.jit
def sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def tanh(x):
    return 2.0 * sigmoid(2.0 * x) - 1.0


# ---- host side ----

# Triton compiles an integer argument equal to 1 as a constant, which has no .to() and
# would fail to compile for B = 1 (the cells, sampling) though every other size works;
# the kernels' size arguments are never specialized.
SIZE_ARGUMENTS = ("T", "B", "H")


class Config(NamedTuple):
    """A launch configuration: batch rows per program, unit (output) tile, reduction
    tile, warps, software-pipelining stages."""
    block_b: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int

    def constexprs(self):
        return dict(BLOCK_B=self.block_b, BLOCK_N=self.block_n, BLOCK_K=self.block_k)

    def triton(self) -> triton.Config:
        return triton.Config(self.constexprs(), num_warps=self.num_warps, num_stages=self.num_stages)

    def __str__(self):
        return f"{self.block_b}x{self.block_n}x{self.block_k}/w{self.num_warps}/s{self.num_stages}"


# The compiled variants of every kernel: the weights' dtype, and for float32 whether
# the products may use TF32 (a compile-time switch, so a separate binary); each also
# with the per-sequence options (recurrent mask, lengths, clip) switched on, which
# needs more registers and so may get other configs.
VARIANTS = ("fp32", "tf32", "bf16", "fp16")
OPTIONS_SUFFIX = "+options"
OPTION_FLAGS = ("HAS_MASK", "HAS_LENGTHS", "HAS_CLIP")
_VARIANT_OF_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def variant(dtype: torch.dtype, allow_tf32: bool, options: bool = False) -> str:
    name = "tf32" if dtype == torch.float32 and allow_tf32 else _VARIANT_OF_DTYPE[dtype]
    return name + (OPTIONS_SUFFIX if options else "")


def missing_configs(cell: str, dtype: torch.dtype, allow_tf32: bool = False, options: bool = False) -> Optional[str]:
    """Why the Triton scans of `cell` ("irnn", "lstm") cannot run `dtype` weights (with
    the per-sequence options if `options`): no launch config of the forward or backward
    kernel compiled without spills (None if both have one). Dispatch then falls back to
    the next backend."""
    from ._configs import DISPATCH
    kernel_variant = variant(dtype, allow_tf32, options)
    lacking = [d for d in ("forward", "backward") if not DISPATCH.get((f"{cell}_scan_{d}", kernel_variant))]
    if not lacking:
        return None
    return (f"no launch config of the Triton {cell} {' and '.join(lacking)} scan compiles without register spills "
            f"for {kernel_variant} (see bench/triton_resources.py)")


class TunedKernel:
    """A scan kernel and the launch configs dispatch may use for it.

    The configs per variant come from ``_configs.DISPATCH``: the kernel's candidates
    that compiled for sm_80 and sm_90 without spills (``python
    bench/triton_resources.py --write-configs``). On a GPU, ``triton.autotune`` times
    them on the first launch of each variant and hidden size and keeps the fastest. The
    key is H alone: the cost of a step depends on H, while T only repeats steps and B
    only changes the number of programs, and re-tuning at every batch size (the last
    batch of an epoch, generation at B = 1) would stall training for a benchmark each
    time. Buffers the kernel updates in place (``restore_value``) are restored after
    each timed trial. Under the interpreter, or when a config is given, that config
    runs (default: the first). `do_bench` replaces Triton's timing function (the tests
    use it to run the autotuner's trials under the interpreter)."""

    def __init__(self, kernel, name: str, restore_value: Tuple[str, ...] = ()):
        self.kernel, self.name, self.restore_value = kernel, name, restore_value
        self.do_bench = None
        self._autotuners: Dict[Tuple[str, object], object] = {}

    def configs(self, kernel_variant: str) -> Tuple[Config, ...]:
        from ._configs import DISPATCH
        return tuple(Config(*c) for c in DISPATCH.get((self.name, kernel_variant), ()))

    def autotuner(self, kernel_variant: str):
        """The ``triton.autotune`` wrapper for one variant (made once)."""
        key = (kernel_variant, self.do_bench)
        if key not in self._autotuners:
            configs = [c.triton() for c in self.configs(kernel_variant)]
            self._autotuners[key] = triton.autotune(configs, key=["H"], restore_value=list(self.restore_value),
                                                    do_bench=self.do_bench)(self.kernel)
        return self._autotuners[key]

    def launch(self, batch: int, weight: Tensor, *args, config: Optional[Config] = None, **constexprs):
        """Launch over `batch` rows on `weight`'s device (whatever device is current: a
        launch goes to the current device); `weight` (W_hh), ``constexprs["TF32"]`` and
        the option flags give the variant."""
        with torch.cuda.device(weight.device) if weight.is_cuda else contextlib.nullcontext():
            self._launch(batch, weight, *args, config=config, **constexprs)

    def _launch(self, batch: int, weight: Tensor, *args, config: Optional[Config] = None, **constexprs):
        kernel_variant = variant(weight.dtype, constexprs["TF32"], any(constexprs.get(f) for f in OPTION_FLAGS))
        if config is None:
            configs = self.configs(kernel_variant)
            if not configs:  # select_backend checks this first (missing_configs)
                raise RuntimeError(f"{self.name} has no spill-free launch config for {kernel_variant}")
            if len(configs) > 1 and (not interpreting() or self.do_bench is not None):
                grid = lambda meta: (triton.cdiv(batch, meta["BLOCK_B"]),)  # noqa: E731
                wrap_triton(self.autotuner(kernel_variant))[grid](*args, **constexprs)
                return
            config = configs[0]
        wrap_triton(self.kernel)[(triton.cdiv(batch, config.block_b),)](
            *args, **constexprs, **config.constexprs(), num_warps=config.num_warps, num_stages=config.num_stages)


DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_dtype(x: Tensor) -> None:
    if x.dtype not in DTYPES:
        raise TypeError(f"the Triton kernels take float32, bfloat16 or float16, got {x.dtype}")


def upcast_dots(weight: Tensor) -> bool:
    """Whether the kernels compute low-precision dot products in float32 (see
    common.dot_state_weight): under the interpreter only."""
    return weight.dtype != torch.float32 and interpreting()


class ScanOptions(NamedTuple):
    """The per-sequence options as kernel arguments: keep (the recurrent mask, float32
    [B, H]), lengths (int64 [B] on the inputs' device) and clip, with placeholders where
    an option is off, and the constexpr flags that switch them on."""
    keep: Tensor
    lengths: Tensor
    clip: float
    flags: Dict[str, bool]

    @staticmethod
    def of(x: Tensor, placeholder: Tensor, recurrent_mask: Optional[Tensor] = None, lengths: Optional[Tensor] = None,
           hidden_clip: Optional[float] = None) -> "ScanOptions":
        keep = recurrent_mask.float().contiguous() if recurrent_mask is not None else placeholder
        lens = lengths.to(device=x.device, dtype=torch.int64).contiguous() if lengths is not None else placeholder
        flags = dict(HAS_MASK=recurrent_mask is not None, HAS_LENGTHS=lengths is not None,
                     HAS_CLIP=hidden_clip is not None)
        return ScanOptions(keep, lens, float(hidden_clip) if hidden_clip is not None else 0.0, flags)

    def zero_beyond_lengths(self, y: Tensor) -> None:
        """y [T, B, H] in place: zero past each row's length (the scan stores the frozen
        state there, since y doubles as its state)."""
        if self.flags["HAS_LENGTHS"]:
            steps = torch.arange(y.shape[0], device=y.device)[:, None]
            y.masked_fill_((steps >= self.lengths[None, :])[:, :, None], 0.0)
