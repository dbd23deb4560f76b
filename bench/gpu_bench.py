"""GPU benchmark: the Triton scans and the persistent CUDA scans against
torch.nn.RNN(nonlinearity="relu") / torch.nn.LSTM (cuDNN), one command.

    python bench/gpu_bench.py [--out bench/results/gpu-<device>.md] [--json PATH] [--quick]
                              [--dtypes float32,bfloat16]

Cases: IRNN and LSTM, one layer, I = H, float32 and bfloat16, inference and training,
B in {1, 8, 64, 256}, H in {256, 512, 1024}, T in {64, 1024}; each backend where
dispatch would send the case ("-" elsewhere: the CUDA scans take B <= 64 with W_hh on
chip). The method is bench/harness.py's, the CPU table's: every contender checked
against cuDNN first, then timed in rotating rounds, CUDA events, medians of same-round
ratios. Without a GPU it says so and exits 0 (nothing to measure). ``--device cpu``
with TRITON_INTERPRET=1 runs tiny cases through the interpreter: a dry run of this
script, not a benchmark (the tests use it).
"""

import argparse
import itertools
import sys
from pathlib import Path

import torch

import harness  # bench/harness.py

BATCHES, HIDDENS, STEPS = (1, 8, 64, 256), (256, 512, 1024), (64, 1024)
QUICK = dict(batches=(2,), hiddens=(16,), steps=(4,))
PLAN = harness.TimingPlan(warmup_calls=2, rounds=7, min_round_seconds=0.02)


def configs(steps, batches, hiddens):
    return [harness.BenchConfig(f"T{t}-B{b}-H{h}", t, b, h, h, "") for t, b, h in itertools.product(steps, batches,
                                                                                                    hiddens)]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="python bench/gpu_bench.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--quick", action="store_true", help="one tiny case per cell and mode")
    parser.add_argument("--rounds", type=int, default=PLAN.rounds)
    parser.add_argument("--calls", type=int, default=None, help="calls per timed round (default: rounds of 20 ms)")
    parser.add_argument("--out", type=Path, help="Markdown table (default: bench/results/gpu-<device name>.md)")
    parser.add_argument("--json", type=Path, help="also write every timing as JSON")
    parser.add_argument("--dtypes", default="float32,bfloat16", type=lambda s: harness._choices(s, harness.DTYPES),
                        help="comma-separated: float32, bfloat16")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_bench: torch sees no CUDA device; nothing to measure", file=sys.stderr)
        return 0
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    sizes = QUICK if args.quick else dict(batches=BATCHES, hiddens=HIDDENS, steps=STEPS)
    plan = harness.TimingPlan(PLAN.warmup_calls, args.rounds, 0.0 if args.calls else PLAN.min_round_seconds)
    report = harness.run_benchmarks(
        configs=configs(sizes["steps"], sizes["batches"], sizes["hiddens"]), backends=harness.GPU_BACKENDS,
        plan=plan, command=" ".join(["python bench/gpu_bench.py", *argv]), progress=harness.progress_line,
        device=args.device, dtypes=[harness.DTYPES[name] for name in args.dtypes])
    table = harness.format_markdown(report)
    if args.device == "cpu":
        table = table.replace("## CPU benchmark", "## Triton interpreter dry run (not a benchmark)", 1)
    print(table, end="")
    if args.device == "cuda" or args.out:
        name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
        out = args.out or Path(__file__).resolve().parent / "results" / (
            "gpu-" + "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")[:40] + ".md")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(table, encoding="utf-8")
    harness.write_json(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
