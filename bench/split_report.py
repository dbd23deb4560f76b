"""The hidden-split Triton scans on one GPU of the model, per hidden size and batch: the
plan they run (fused_rnn/triton/plan.py: BLOCK_U, grid, programs per launch), the
resources of their dispatchable configs at that BLOCK_U compiled ahead of time for the
GPU's architecture (registers per thread, spills, shared memory; ptxas -v, as
bench/triton_resources.py), and the model's time per step against cuDNN's standard
algorithm (bench/gpu_model.py: a MODEL, not a measurement).

    python bench/split_report.py [--gpu H200] [--hidden 256,1024] [--docs]

The tuner picks one of the dispatchable configs per H on the GPU itself; without a GPU
the table gives the range over all of them. Run without TRITON_INTERPRET.
"""

import argparse
import os
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import gpu_model  # noqa: E402  (bench/)
import triton_resources  # noqa: E402

BATCHES = (1, 8, 64, 256)
CAPABILITY = {"A100": 80, "H100": 90, "H200": 90}
VARIANTS = {"float32": "fp32", "bfloat16": "bf16"}


def resources(name: str, variant: str, block_u: int, capability: int) -> str:
    """'registers / spill bytes / shared bytes' over the dispatchable configs (with and
    without the options), as a range where they differ."""
    from fused_rnn.triton import _configs

    found = []
    for options in (False, True):
        key = (name, variant + ("+options" if options else ""), block_u)
        for config in _configs.SPLIT.get(key, ()):
            found.append(triton_resources.compile_one((name, variant, tuple(config), block_u), capability, options))
    if not found:
        return "no config"

    def span(values):
        low, high = min(values), max(values)
        return f"{low}" if low == high else f"{low}-{high}"

    return (f"{span([f[0] for f in found])} / {span([f[1] for f in found])} / "
            f"{span([f[2] for f in found])}")


def report(gpu_name: str, hiddens) -> str:
    gpu = gpu_model.GPUS[gpu_name]
    capability = CAPABILITY[gpu_name]
    lines = [f"Command: `python bench/split_report.py --gpu {gpu_name} --hidden {','.join(map(str, hiddens))}`. "
             f"The hidden-split Triton scans on {gpu_name} ({gpu.sms} SMs, sm_{capability}): plan (BLOCK_U, grid "
             f"= unit blocks x batch groups, programs per launch), resources of the dispatchable configs at that "
             f"BLOCK_U (registers per thread / spill bytes / shared bytes, ahead-of-time compile, with and without "
             f"the options), and the MODEL's time per step in us (persistent driver) against cuDNN's per-step "
             f"algorithm (`bench/gpu_model.py`; a model, not a measurement).", "",
             "| cell | dtype | pass | H | B | BLOCK_U | grid | programs | regs / spills / shared bytes | "
             "model split us | model cuDNN us | cuDNN / split |",
             "|---|---|---|---:|---:|---:|---|---:|---|---:|---:|---:|"]
    cache = {}
    for cell in gpu_model.CELLS:
        for dtype, variant in VARIANTS.items():
            for backward in (False, True):
                name = f"{cell}_split_{'backward' if backward else 'forward'}"
                for hidden in hiddens:
                    for batch in BATCHES:
                        plan = gpu_model.split_plan(gpu, cell, dtype, batch, hidden, backward)
                        key = (name, variant, plan.block_u)
                        if key not in cache:
                            cache[key] = resources(name, variant, plan.block_u, capability)
                        split = gpu_model.triton_split_step_us(gpu, cell, dtype, batch, hidden, backward)
                        cudnn = gpu_model.cudnn_step_us(gpu, cell, dtype, batch, hidden)
                        lines.append(f"| {cell} | {variant} | {'backward' if backward else 'forward'} | {hidden} | "
                                     f"{batch} | {plan.block_u} | {plan.unit_blocks} x {plan.groups} | "
                                     f"{plan.programs} | {cache[key]} | {split:.1f} | {cudnn:.1f} | "
                                     f"{cudnn / split:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/split_report.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", default="H200", choices=sorted(CAPABILITY))
    parser.add_argument("--hidden", default="256,1024", help="comma-separated hidden sizes")
    parser.add_argument("--docs", action="store_true", help="also put the table into docs/triton.md")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the interpreter does not compile kernels")
    hiddens = [int(h) for h in args.hidden.split(",") if h.strip()]
    from table import publish  # bench/table.py

    publish(report(args.gpu, hiddens), "split", args.docs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
