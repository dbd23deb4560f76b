"""The CUDA backend (csrc/cuda): without a GPU, that every op has a CUDA kernel, that
the kernels compile for sm_80/sm_90 without spills, the on-chip plan and dispatch; on a
GPU, every kernel against the NumPy reference (float32 here; bfloat16/float16 and the
modules in test_triton.py, which runs them for every GPU backend)."""

import json
import sys
from pathlib import Path

import pytest
import torch

import fused_rnn
from fused_rnn import _C
from fused_rnn.ops import OP_NAMES
from helpers import SHAPES, check_cells_against_reference, check_layer_against_reference, run_in_group

REPO = Path(__file__).resolve().parents[1]
CUDA_BUILT = bool(fused_rnn.build_info().get("cuda_compiled"))
ON_GPU = CUDA_BUILT and torch.cuda.is_available()
needs_cuda_build = pytest.mark.skipif(not CUDA_BUILT, reason="fused_rnn._C was built without CUDA")
needs_gpu = pytest.mark.skipif(not ON_GPU, reason="no CUDA device (or a CPU-only build)")

# (name, SMs, shared memory per block with opt-in): A100 and H100 SXM
DEVICES = [("A100", 108, 163 * 1024), ("H100", 132, 227 * 1024)]


@needs_cuda_build
def test_every_op_has_a_cuda_kernel():
    for name in OP_NAMES:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fused_rnn::{name}", "CUDA"), name
    assert "cuda" in fused_rnn.build_info()["backends"]


@needs_cuda_build
def test_kernels_compile_for_sm80_sm90_without_spills(tmp_path):
    """Every kernel instantiation of csrc/cuda/persistent_scan.cu (4 step kernels and 4
    scans x 5 rows per pass, x float32, bfloat16, float16), compiled with nvcc -Xptxas
    -v for sm_80 and sm_90: no spills, no stack, registers within what the block size
    allows (bench/cuda_resources.py, which docs/cuda.md's table comes from, exits
    non-zero otherwise)."""
    out = tmp_path / "resources.json"
    result = run_in_group([sys.executable, str(REPO / "bench" / "cuda_resources.py"), "--json", str(out)],
                          timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    seen = {(r["kernel"], r["dtype"], r["arch"]) for r in report["rows"]}
    kernels = [f"{cell}_{kind}" for cell in ("irnn", "lstm") for kind in ("step", "step_backward")]
    kernels += [f"{cell}_{kind} r{rows:02d}" for cell in ("irnn", "lstm") for kind in ("scan_forward", "scan_backward")
                for rows in (1, 2, 4, 8, 16)]
    assert seen == {(k, d, a) for k in kernels for d in ("fp32", "bf16", "fp16") for a in ("sm_80", "sm_90")}
    assert all(r["ok"] and r["spill_bytes"] == 0 and r["registers"] * r["threads"] <= 65536 for r in report["rows"])
    # the hidden sizes of the benchmarks (256, 512, 1024) stay on chip on an H100
    assert min(report["on_chip_limits"]["H100 SXM (sm_90)"].values()) >= 1024


@pytest.mark.parametrize("gates", [1, 4], ids=["irnn", "lstm"])
@pytest.mark.parametrize("weight_size", [4, 2], ids=["fp32", "16bit"])
@pytest.mark.parametrize("device, sm_count, smem", DEVICES, ids=[d[0] for d in DEVICES])
def test_scan_plan_covers_every_unit_within_the_limits(gates, weight_size, device, sm_count, smem):
    """The plan the launcher and dispatch share (csrc/cuda/persistent_plan.h): every hidden
    unit is owned by exactly one block, at most one block per SM, the shared memory
    holds the block's weights in the weights' dtype plus its staged rows, and the
    reported largest H is exact: it fits, the next does not."""
    largest = _C.cuda_max_hidden_on_chip(gates, weight_size, sm_count, smem)
    assert largest >= 256
    for hidden in (1, 7, 8, 37, 256, 513, largest, largest + 1):
        for backward in (False, True):
            at_one = _C.cuda_scan_plan(gates, weight_size, hidden, backward, sm_count, smem)
            for batch in (1, 3, 8, 9, 64, 300):
                plan = _C.cuda_scan_plan(gates, weight_size, hidden, backward, sm_count, smem, batch)
                assert (plan["blocks"] - 1) * plan["units"] < hidden <= plan["blocks"] * plan["units"]
                assert plan["blocks"] <= sm_count
                assert plan["weight_bytes"] >= gates * plan["units"] * hidden * weight_size
                assert plan["weight_bytes"] % 16 == 0  # the float32 staging area after it stays aligned
                # the rows per pass: a power of two up to 16, no more than the batch needs
                # (the model's choice among those: tests/test_dispatch.py)
                rows = plan["rows"]
                assert rows in (1, 2, 4, 8, 16) and (rows == 1 or rows < 2 * batch)
                assert plan["stage_bytes"] == rows * 4 * (gates if backward else 1) * hidden
                assert plan["smem_bytes"] == plan["weight_bytes"] + plan["stage_bytes"]
                assert plan["fits"] == (plan["smem_bytes"] <= smem)
                assert plan["fits"] == at_one["fits"]  # fits at batch 1 <=> fits at every batch
    fits = [_C.cuda_scan_plan(gates, weight_size, largest + 1, b, sm_count, smem)["fits"] for b in (False, True)]
    assert not all(fits)


@needs_cuda_build
def test_dispatch_of_the_cuda_backend():
    """Among the fused backends (a call with the recurrent mask, which torch.nn's kernels
    have not), "auto" takes the CUDA scans for CUDA tensors that fit on chip, else
    Triton, and says why."""
    mask = ("recurrent_mask",)
    choice = fused_rnn.select_backend("cuda", torch.float64, cell="lstm", hidden=256, batch=8)
    assert "float64" in choice.skipped["cuda"]
    choice = fused_rnn.select_backend("cuda", torch.bfloat16, cell="irnn", hidden=256, batch=8, options=mask)
    if ON_GPU:
        assert choice.name == "cuda"
        largest = _C.cuda_max_hidden_on_chip(4, 4, torch.cuda.get_device_properties(0).multi_processor_count,
                                             _smem_per_block())
        choice = fused_rnn.select_backend("cuda", torch.float32, cell="lstm", hidden=largest + 1, batch=8,
                                          options=mask)
        assert choice.name == "triton" and "largest" in choice.skipped["cuda"]
    else:
        assert choice.name == "triton" and choice.skipped["cuda"] == "no CUDA device is available"


def _smem_per_block() -> int:
    properties = torch.cuda.get_device_properties(0)
    return getattr(properties, "shared_memory_per_block_optin", 0) or 227 * 1024


# ---- on a GPU ----

@needs_gpu
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}B{}I{}H{}".format(*s))
@pytest.mark.parametrize("cell", ["irnn", "lstm"])
def test_layer_matches_reference(cell, shape, bias):
    """float32, the tolerances of test_cpu (float32 accumulation throughout); every batch
    size, as an explicit request may send any (auto takes the scans for small ones)."""
    check_layer_against_reference(cell, shape, bias, torch.float32, "cuda", device="cuda")


@needs_gpu
@pytest.mark.parametrize("used", [("recurrent_mask",), ("lengths",), ("hidden_clip",),
                                  ("recurrent_mask", "lengths", "hidden_clip")], ids="+".join)
@pytest.mark.parametrize("shape", [(1, 1, 3, 5), (9, 5, 4, 7), (20, 18, 6, 13)],
                         ids=lambda s: "T{}B{}I{}H{}".format(*s))
@pytest.mark.parametrize("cell", ["irnn", "lstm"])
def test_options_match_reference(cell, shape, used):
    """The recurrent mask, lengths and hidden clip in the CUDA scans, float32."""
    from helpers import check_options

    if used == ("hidden_clip",) and cell == "lstm":
        pytest.skip("hidden_clip is the IRNN's")
    check_options(cell, shape, torch.float32, "cuda", used, device="cuda")


@needs_gpu
@pytest.mark.parametrize("cell", ["irnn", "lstm"])
def test_cells_match_reference(cell):
    check_cells_against_reference(cell, "cuda", torch.float32, device="cuda")


@needs_gpu
def test_scan_beyond_the_on_chip_limit_is_refused_with_the_reason():
    properties = torch.cuda.get_device_properties(0)
    largest = _C.cuda_max_hidden_on_chip(1, 4, properties.multi_processor_count, _smem_per_block())
    hidden = largest + 64
    x = torch.randn(2, 1, 3, device="cuda")
    weights = (torch.randn(hidden, 3, device="cuda"), torch.eye(hidden, device="cuda"))
    with pytest.raises(RuntimeError, match="keeps W_hh on chip"):
        torch.ops.fused_rnn.irnn_scan_forward(x, torch.zeros(1, hidden, device="cuda"), *weights, None)
    choice = fused_rnn.select_backend("cuda", torch.float32, cell="irnn", hidden=hidden, batch=1)
    assert choice.name != "cuda" and "largest" in choice.skipped["cuda"]


@needs_gpu
def test_cuda_ops_opcheck():
    x, h = torch.randn(5, 3, 4, device="cuda"), torch.randn(3, 6, device="cuda")
    w_ih, w_hh, bias = torch.randn(24, 4, device="cuda"), torch.randn(24, 6, device="cuda") * 0.3, None
    c = torch.randn(3, 6, device="cuda")
    for args in [(x, h, c, w_ih, w_hh, bias), (x, h, c, w_ih.requires_grad_(), w_hh.requires_grad_(), bias)]:
        torch.library.opcheck(torch.ops.fused_rnn.lstm_scan_forward, args)
    torch.library.opcheck(torch.ops.fused_rnn.irnn_scan_forward,
                          (x, h, torch.randn(6, 4, device="cuda"), torch.eye(6, device="cuda"), None))
    torch.library.opcheck(torch.ops.fused_rnn.lstm_step, (x[0], h, c, w_ih, w_hh, bias))
