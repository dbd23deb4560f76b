"""A performance model of the GPU backends: predicted time per sequence step of the
persistent CUDA scans, of the Triton scans (the batch-tiled design and the
hidden-split one, both shipped) and of cuDNN's standard per-step algorithm, which
torch.nn runs. It is a MODEL, written from the kernels' structure and datasheet figures,
not a measurement; the first GPU run (bench/gpu_check.py) is compared with it and it is
recalibrated from there.

    python bench/gpu_model.py [--gpu H100] [--docs] [--write-speedups]

Per step, each design's time is the larger of its arithmetic time and its data time at
each memory level, plus its fixed latencies (kernel launches, block and grid barriers):

- cuDNN (standard algorithm): per step one GEMM h_{t-1} [B, H] x W_hh^T [H, G*H] and one
  pointwise kernel; W_hh streams from L2 (or HBM if it does not fit) every step; each
  kernel costs a launch-and-drain latency. Backward: the same per step, plus the
  weight-gradient GEMM once at the end (which every design shares and so leaves out).
- persistent CUDA scans (csrc/cuda/persistent_scan.cuh): one block per SM owns H/SMs
  units and keeps their W_hh rows in shared memory; per step it stages the exchanged
  state in passes of up to 16 rows (two block barriers each) and each warp forms its
  units' dot products on CUDA cores (instruction-issue bound: per k-iteration G weight
  loads, `rows` state loads, G*rows FMAs), then a grid barrier.
- Triton, batch-tiled (fused_rnn/triton/irnn.py, lstm.py): ceil(B/16) programs, each owning 16 rows
  and all H units, so each program reads all of W_hh from L2 and does 16 rows' worth
  of the GEMM on one SM every step (tensor cores for bf16/fp16, CUDA cores for fp32).
- Triton, hidden-split (fused_rnn/triton/split.py): the plan of fused_rnn/triton/plan.py,
  which the kernels run: a grid of unit blocks x batch groups, at most one program per
  SM; per step the busiest program reads its W_hh slice and its rows of the exchanged
  state from L2 while it multiplies them (tensor cores for bf16, CUDA cores for fp32),
  then one grid barrier (persistent), or one kernel launch (the per-step driver).

Predicted speed-ups over cuDNN at T = 256 go to bench/results/gpu-model.md (and with
--docs into docs/cuda.md), and with --write-speedups into fused_rnn/_speedup_tables.py,
from which ``backend="auto"`` decides when no measurement exists: it takes a fused
backend only when the model predicts it at least 1.3x as fast as cuDNN.
"""

import argparse
import itertools
import math
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # fused_rnn/triton/plan.py, the split scans' plan, from a checkout
OUT = ROOT / "bench" / "results" / "gpu-model.md"


@dataclass(frozen=True)
class GPU:
    """Datasheet figures (leads, not measurements) and latencies assumed for the model."""
    name: str
    sms: int
    clock_ghz: float  # sustained SM clock under load
    hbm_tb_s: float
    l2_mb: float
    l2_tb_s: float  # aggregate L2 read bandwidth
    fp32_tflops: float  # CUDA-core FMA rate (2 flops per FMA)
    tensor_tflops: float  # dense bf16/fp16 tensor-core rate
    smem_kb: int  # shared memory per block (opt-in)
    launch_us: float = 2.5  # launch-and-drain of one small kernel inside a library loop
    grid_sync_us: float = 1.5  # one cooperative-groups grid barrier
    block_sync_us: float = 0.05  # one __syncthreads of 256 threads
    l2_latency_us: float = 0.6  # first bytes of a dependent L2 read

    @property
    def l2_per_sm_gb_s(self) -> float:
        return self.l2_tb_s * 1e3 / self.sms


# A100 SXM4 80 GB, H100 SXM5 and H200 SXM (vendor datasheets; L2 bandwidths from
# published microbenchmarks, rounded down). The H200 is the H100's chip with HBM3e; the
# L2 size is what torch reported on this workplace's H200 (60 MB).
GPUS = {
    "A100": GPU("A100", 108, 1.41, 2.04, 40, 4.5, 19.5, 312, 163),
    "H100": GPU("H100", 132, 1.755, 3.35, 50, 6.0, 67, 989, 227),
    "H200": GPU("H200", 132, 1.755, 4.8, 60, 6.0, 67, 989, 227),
}
GATES = {"irnn": 1, "lstm": 4}
BYTES = {"float32": 4, "bfloat16": 2}
ROW_CHOICES = (1, 2, 4, 8, 16)  # csrc/cuda/persistent_plan.h: rows per pass, up to kMaxRows
WARPS = 8  # csrc/cuda/persistent_plan.h kWarps
TRITON_ROWS = 16  # the batch tile of the batch-tiled Triton scans (BLOCK_B)
# Efficiency of a GEMM at these skinny shapes against the unit's peak: cuBLAS reaches
# about half of it on CUDA cores and a third on tensor cores when one dimension is the
# batch; Triton's tl.dot in a loop about the same.
GEMM_EFFICIENCY = {"float32": 0.5, "bfloat16": 0.35}


def _gemm_us(gpu: GPU, dtype: str, flops: float, units: int = None) -> float:
    """Arithmetic time of `flops` on the whole GPU (or on `units` SMs)."""
    peak = gpu.fp32_tflops if dtype == "float32" else gpu.tensor_tflops
    share = 1.0 if units is None else min(units, gpu.sms) / gpu.sms
    return flops / (peak * 1e12 * share * GEMM_EFFICIENCY[dtype]) * 1e6


def _weights_bytes(cell: str, dtype: str, hidden: int) -> float:
    return GATES[cell] * hidden * hidden * BYTES[dtype]


def _stream_us(gpu: GPU, nbytes: float) -> float:
    """Reading `nbytes` spread over the GPU from L2, or from HBM when it does not fit."""
    bandwidth = gpu.l2_tb_s if nbytes <= 0.5 * gpu.l2_mb * 2 ** 20 else gpu.hbm_tb_s
    return nbytes / (bandwidth * 1e12) * 1e6 + gpu.l2_latency_us


def cudnn_step_us(gpu: GPU, cell: str, dtype: str, batch: int, hidden: int) -> float:
    """One step of cuDNN's standard algorithm: the recurrent GEMM and the pointwise kernel."""
    g = GATES[cell]
    flops = 2 * batch * hidden * g * hidden
    gemm = max(_gemm_us(gpu, dtype, flops), _stream_us(gpu, _weights_bytes(cell, dtype, hidden)))
    state = 4 * batch * g * hidden * 3 / (gpu.hbm_tb_s * 1e12) * 1e6  # pointwise: gates in, state out
    return gemm + state + 2 * gpu.launch_us


# csrc/cuda/persistent_plan.h's cost of a step in issue slots, by which it picks the rows
PASS_ISSUES = 600.0
ISSUES_PER_STAGED_BYTE = 0.019


def _plan_step_issues(g: int, hidden: int, units: int, backward: bool, batch: int, rows: int) -> float:
    per_warp = math.ceil(units / WARPS)
    k_iterations = hidden / 32.0
    dots = (g * k_iterations * (1 + 2 * rows) + rows * 10.0 if backward
            else k_iterations * (g + rows + g * rows) + g * rows * 10.0)
    staged = rows * (g if backward else 1) * hidden * 4
    return math.ceil(batch / rows) * (per_warp * (dots + 60.0) * 2.0 + PASS_ISSUES + ISSUES_PER_STAGED_BYTE * staged)


def persistent_plan(gpu: GPU, cell: str, dtype: str, hidden: int, backward: bool, batch: int = 1):
    """(units per block, blocks, rows per pass, fits): csrc/cuda/persistent_plan.h's
    arithmetic, its choice of rows included."""
    g = GATES[cell]
    spread = math.ceil(hidden / gpu.sms)
    units = spread if spread > WARPS else min(hidden, WARPS)
    blocks = math.ceil(hidden / units)
    weight = math.ceil(g * units * hidden * BYTES[dtype] / 16) * 16
    row_bytes = (g if backward else 1) * hidden * 4
    rows, best = 1, _plan_step_issues(g, hidden, units, backward, batch, 1)
    for candidate in ROW_CHOICES[1:]:
        if weight + candidate * row_bytes > gpu.smem_kb * 1024:
            break
        issues = _plan_step_issues(g, hidden, units, backward, batch, candidate)
        if issues < best:
            rows, best = candidate, issues
    return units, blocks, rows, weight + rows * row_bytes <= gpu.smem_kb * 1024 and blocks <= gpu.sms


def persistent_step_us(gpu: GPU, cell: str, dtype: str, batch: int, hidden: int, backward: bool,
                       rows: int = None) -> float:
    """One step of the persistent scan with `rows` rows per pass (default: the plan's),
    or inf where it does not fit on chip."""
    g = GATES[cell]
    units, _, planned, fits = persistent_plan(gpu, cell, dtype, hidden, backward, batch)
    rows = planned if rows is None else rows
    weight = math.ceil(g * units * hidden * BYTES[dtype] / 16) * 16
    if not fits or weight + rows * (g if backward else 1) * hidden * 4 > gpu.smem_kb * 1024:
        return math.inf
    passes = math.ceil(batch / rows)
    units_per_warp = math.ceil(units / WARPS)
    # per k-iteration of one unit: forward G weight loads + `rows` state loads + G*rows
    # FMAs over a length-H reduction; backward 1 + rows + rows over G*H
    if backward:
        instructions = (g * hidden / 32) * (1 + 2 * rows)
        reductions = rows
    else:
        instructions = (hidden / 32) * (g + rows + g * rows)
        reductions = g * rows
    instructions = units_per_warp * (instructions + reductions * 10 + 60)  # butterfly sums, cell maths
    # 8 warps on 4 schedulers: two warps' instructions per scheduler
    compute = instructions * (WARPS / 4) / (gpu.clock_ghz * 1e3)
    staged = rows * (g if backward else 1) * hidden * 4
    stage = staged / (gpu.l2_per_sm_gb_s * 1e3) + gpu.l2_latency_us
    return passes * (compute + stage + 2 * gpu.block_sync_us) + gpu.grid_sync_us


def fastest_rows(gpu: GPU, cell: str, dtype: str, batch: int, hidden: int, backward: bool) -> int:
    """The rows per pass the model predicts fastest (ties to the fewer rows)."""
    times = {rows: persistent_step_us(gpu, cell, dtype, batch, hidden, backward, rows) for rows in ROW_CHOICES}
    best = min(times.values())
    return min(rows for rows, t in times.items() if t <= best * (1 + 1e-9))


def triton_tiled_step_us(gpu: GPU, cell: str, dtype: str, batch: int, hidden: int) -> float:
    """One step of the batch-tiled Triton scans: each program does all H for 16 rows on one SM."""
    g = GATES[cell]
    programs = math.ceil(batch / TRITON_ROWS)
    flops_per_program = 2 * TRITON_ROWS * hidden * g * hidden
    compute = _gemm_us(gpu, dtype, flops_per_program, units=1)  # one program, one SM
    # every program streams all of W_hh through its SM's share of L2 bandwidth
    read = _weights_bytes(cell, dtype, hidden) / (gpu.l2_per_sm_gb_s * 1e3)
    waves = math.ceil(programs / gpu.sms)
    return waves * max(compute, read) + gpu.block_sync_us


def split_plan(gpu: GPU, cell: str, dtype: str, batch: int, hidden: int, backward: bool):
    """The hidden-split scans' plan (fused_rnn/triton/plan.py, which the kernels run)
    with a budget of one program per SM, over the BLOCK_U values the kernel has
    spill-free configs for (fused_rnn/triton/_configs.py)."""
    from fused_rnn.triton import _configs
    from fused_rnn.triton.plan import BLOCK_UNITS, on_fma_variant, plan

    name = f"{cell}_split_{'backward' if backward else 'forward'}"
    variant = {"float32": "fp32", "bfloat16": "bf16"}[dtype]
    block_units = tuple(u for u in BLOCK_UNITS if _configs.SPLIT.get((name, variant, u))) or BLOCK_UNITS
    tiles = ({u: [c[0] for c in _configs.SPLIT.get((name, variant, u), ())] for u in block_units}
             if on_fma_variant(variant) else None)  # the batch tiles of each BLOCK_U's configs
    return plan(hidden, batch, GATES[cell], BYTES[dtype], gpu.sms, block_units, backward, fma_tiles=tiles)


def triton_split_step_us(gpu: GPU, cell: str, dtype: str, batch: int, hidden: int, backward: bool = False,
                         persistent: bool = True) -> float:
    """One step of the hidden-split Triton scans: the busiest program's arithmetic or
    its reads from L2 (its W_hh slice and its rows of the exchanged state, the K loop
    overlapping them), whichever is longer, after the first dependent L2 read; then a
    grid barrier (persistent) or a kernel launch (per step, also where the plan needs
    more programs than SMs)."""
    from fused_rnn.triton.plan import program_step

    chosen = split_plan(gpu, cell, dtype, batch, hidden, backward)
    # the product multiplies every row of its padded tile (plan.padded_rows)
    read, flops = program_step(hidden, GATES[cell], BYTES[dtype], chosen.block_u, chosen.rows, backward,
                               chosen.padded)
    compute = _gemm_us(gpu, dtype, flops, units=1)
    data = read / (gpu.l2_per_sm_gb_s * 1e3)
    fixed = gpu.grid_sync_us if persistent and chosen.programs <= gpu.sms else gpu.launch_us
    return max(compute, data) + gpu.l2_latency_us + fixed


def sequence_ms(step_us: float, steps: int, launches: int = 1, gpu: GPU = None) -> float:
    return (step_us * steps + launches * gpu.launch_us) / 1e3


DESIGNS = ("cuda", "triton", "triton-split", "triton-split-step")


def predict(gpu: GPU, cell: str, dtype: str, mode: str, batch: int, hidden: int, steps: int = 256) -> dict:
    """Predicted ms per sequence of cuDNN and of each design, inference or training
    (training adds the backward scan; the GEMMs every design shares are left out)."""
    def total(forward, backward):
        return forward + (backward if mode == "training" else 0.0)

    cudnn = total(cudnn_step_us(gpu, cell, dtype, batch, hidden), cudnn_step_us(gpu, cell, dtype, batch, hidden))
    times = {
        "nn": sequence_ms(cudnn, steps, 0, gpu),
        "cuda": sequence_ms(total(persistent_step_us(gpu, cell, dtype, batch, hidden, False),
                                  persistent_step_us(gpu, cell, dtype, batch, hidden, True)), steps, 2, gpu),
        "triton": sequence_ms(total(triton_tiled_step_us(gpu, cell, dtype, batch, hidden),
                                    triton_tiled_step_us(gpu, cell, dtype, batch, hidden)), steps, 2, gpu),
        "triton-split": sequence_ms(total(triton_split_step_us(gpu, cell, dtype, batch, hidden),
                                          triton_split_step_us(gpu, cell, dtype, batch, hidden, True)), steps, 2, gpu),
        # the same kernels, one launch per step: where every program cannot be resident
        "triton-split-step": sequence_ms(total(triton_split_step_us(gpu, cell, dtype, batch, hidden, False, False),
                                               triton_split_step_us(gpu, cell, dtype, batch, hidden, True, False)),
                                         steps, 0, gpu),
    }
    return times


BATCHES = (1, 8, 64, 256, 1024)
HIDDENS = (128, 256, 512, 1024, 2048)
CELLS = ("irnn", "lstm")
MODES = ("inference", "training")


def table(gpu_names=("H100",), dtypes=("float32", "bfloat16")) -> str:
    lines = ["A MODEL, not a measurement (`python bench/gpu_model.py`): predicted speed-up over cuDNN's "
             "per-step algorithm (nn.RNN / nn.LSTM) at T = 256, one layer; above 1x is faster; `-`: does not "
             "fit (the persistent scans keep W_hh on chip). triton: the batch-tiled Triton scans; split: the "
             "hidden-split Triton scans (persistent, one grid barrier a step); split-step: the same kernels "
             "launched once a step.", ""]
    for name in gpu_names:
        gpu = GPUS[name]
        lines += [f"{name} ({gpu.sms} SMs):", "",
                  "| cell | dtype | mode | H | " + " | ".join(f"B={b}: cuda / triton / split / split-step"
                                                           for b in BATCHES) + " |",
                  "|---|---|---|---:|" + "---:|" * len(BATCHES)]
        for cell, dtype, mode, hidden in itertools.product(CELLS, dtypes, MODES, HIDDENS):
            cells = []
            for batch in BATCHES:
                t = predict(gpu, cell, dtype, mode, batch, hidden)
                cells.append(" / ".join("-" if math.isinf(t[d]) else f"{t['nn'] / t[d]:.2g}" for d in DESIGNS))
            lines.append(f"| {cell} | {dtype} | {mode} | {hidden} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def speedups() -> dict:
    """(GPU, cell, mode, dtype, batch, hidden) -> {design: predicted speed-up over nn},
    for the designs the package ships: the CUDA scans, and the Triton backend's two
    (batch-tiled "triton", hidden-split "triton-split"; the backend runs the faster)."""
    entries = {}
    for name, gpu in GPUS.items():
        for cell, dtype, mode, batch, hidden in itertools.product(CELLS, BYTES, MODES, BATCHES, HIDDENS):
            t = predict(gpu, cell, dtype, mode, batch, hidden)
            ratios = {d: round(t["nn"] / t[d], 3) for d in ("cuda", "triton", "triton-split") if not math.isinf(t[d])}
            entries[(name, cell, mode, dtype, batch, hidden)] = ratios
    return entries


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/gpu_model.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", default="H100,H200,A100", help="comma-separated: A100, H100, H200")
    parser.add_argument("--docs", action="store_true", help="also put the table into docs/cuda.md")
    parser.add_argument("--write-speedups", action="store_true",
                        help="write the predictions auto uses (fused_rnn/_speedup_tables.py, GPU section)")
    args = parser.parse_args(argv)
    text = table(tuple(g.strip() for g in args.gpu.split(",") if g.strip()))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text + "\n", encoding="utf-8")
    from table import publish, write_section  # bench/table.py

    publish(text, "model", args.docs)
    if args.write_speedups:
        write_section("GPU", "bench/gpu_model.py: a model, not a measurement", "GPU", speedups())
        print("wrote fused_rnn/_speedup_tables.py (GPU section)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
