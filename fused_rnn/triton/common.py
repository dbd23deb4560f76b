"""What the Triton IRNN and LSTM scans share: device functions, the dtype rules, and
the host-side GEMMs before and after a scan."""

import os
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor


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
    if weight.dtype == tl.float32:
        if TF32:
            return tl.dot(state, weight, input_precision="tf32")
        else:
            return tl.dot(state, weight, input_precision="ieee")
    else:
        if UPCAST:
            if weight.dtype == tl.bfloat16:
                rounded = _round_to_bfloat16(state)
            else:
                rounded = state.to(weight.dtype).to(tl.float32)
            return tl.dot(rounded, weight.to(tl.float32), input_precision="ieee")
        else:
            return tl.dot(state.to(weight.dtype), weight)


@triton.jit
def _round_to_bfloat16(x):
    """float32 -> the nearest bfloat16 (ties to even), kept in float32, on the bits: as
    cvt.rn.bf16.f32 on a GPU. NaN stays NaN."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))  # NaN payloads can carry into inf/0


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


DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_dtype(x: Tensor) -> None:
    if x.dtype not in DTYPES:
        raise TypeError(f"the Triton kernels take float32, bfloat16 or float16, got {x.dtype}")


def upcast_dots(weight: Tensor) -> bool:
    """Whether the kernels compute low-precision dot products in float32 (see
    common.dot_state_weight): under the interpreter only."""
    return weight.dtype != torch.float32 and os.environ.get("TRITON_INTERPRET") == "1"


def input_projection(x: Tensor, w_ih: Tensor, bias: Optional[Tensor]) -> Tensor:
    """[T, B, G*H] = x W_ih^T + bias in float32, the kernels' state and accumulation dtype
    (bf16/fp16 inputs are multiplied in float32: one GEMM, outside the recurrence)."""
    steps, batch, inputs = x.shape
    x2d = x.reshape(steps * batch, inputs).float()
    w = w_ih.float().t()
    pre = torch.addmm(bias.float(), x2d, w) if bias is not None else x2d @ w
    return pre.view(steps, batch, w_ih.shape[0])


def weight_grads(dpre: Tensor, x: Tensor, h0: Optional[Tensor], y: Tensor, w_ih: Tensor, need_dx: bool):
    """The sums over time as GEMMs over all steps, in float32, returned in the
    parameters' dtype: dpre [T, B, G*H] = dL/d(pre-activation) ->
    (dx or None, dW_ih = dpre^T x, dW_hh = dpre^T h_{t-1}, dbias = sum dpre)."""
    steps, batch, inputs = x.shape
    hidden = y.shape[2]
    dpre2d = dpre.reshape(steps * batch, dpre.shape[2])
    h_first = (h0 if h0 is not None else y.new_zeros(batch, hidden)).float()
    h_prev = torch.cat([h_first.unsqueeze(0), y[:-1].float()]).reshape(steps * batch, hidden)
    dw_hh = (dpre2d.t() @ h_prev).to(x.dtype)
    dw_ih = (dpre2d.t() @ x.reshape(steps * batch, inputs).float()).to(x.dtype)
    dbias = dpre2d.sum(0).to(x.dtype)
    dx = (dpre2d @ w_ih.float()).view(x.shape).to(x.dtype) if need_dx else None
    return dx, dw_ih, dw_hh, dbias
