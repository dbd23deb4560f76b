"""GPU benchmark: the Triton scans against torch.nn.RNN(nonlinearity="relu") /
torch.nn.LSTM (cuDNN), one command.

    python bench/gpu_bench.py [--out bench/results/gpu-<device>.md] [--json PATH] [--quick]

Cases: IRNN and LSTM, one layer, I = H, float32, inference (forward under no_grad) and
training (forward + backward of a fixed random projection of y), B in {1, 8, 64, 256},
H in {256, 512, 1024}, T in {64, 1024}. Before timing, every case checks the Triton
outputs (and in training every gradient) against the cuDNN module holding the same
weights. Times are medians of CUDA-event timings over rounds that alternate between the
two contenders; the speed-up is the median of the per-round ratios (nn / triton).
Without a GPU it says so and exits 0 (nothing to measure). ``--device cpu`` with
TRITON_INTERPRET=1 runs tiny cases through the interpreter: a dry run of this script,
not a benchmark (the tests use it).
"""

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import fused_rnn

BATCHES, HIDDENS, STEPS = (1, 8, 64, 256), (256, 512, 1024), (64, 1024)
QUICK = dict(batches=(2,), hiddens=(16,), steps=(4,))
MODES = ("inference", "training")
# float32 against cuDNN: both accumulate in fp32 in different orders (cuDNN may also
# use TF32 unless disabled, which this script does); over 1024 steps that stays near
# 1e-5 relative to each tensor's largest entry, so 1e-3 flags only real errors.
TOLERANCE = 1e-3


def make_case(cell, steps, batch, hidden, device):
    torch.manual_seed(0)
    if cell == "irnn":
        reference = torch.nn.RNN(hidden, hidden, nonlinearity="relu").to(device)
        fused = fused_rnn.IRNN(hidden, hidden, backend="triton").to(device)
    else:
        reference = torch.nn.LSTM(hidden, hidden).to(device)
        fused = fused_rnn.LSTM(hidden, hidden, backend="triton").to(device)
    if cell == "irnn":  # a contracting recurrence, so long sequences stay finite
        with torch.no_grad():
            reference.weight_hh_l0.copy_(0.9 * torch.eye(hidden) + 0.01 * torch.randn(hidden, hidden))
    fused.load_state_dict(reference.state_dict())
    x = torch.randn(steps, batch, hidden, device=device)
    projection = torch.randn(steps, batch, hidden, device=device)
    return reference, fused, x, projection


def run(module, x, projection, mode):
    if mode == "inference":
        with torch.no_grad():
            return module(x)[0], []
    module.zero_grad(set_to_none=True)
    inp = x.detach().requires_grad_()
    y = module(inp)[0]
    (y * projection).sum().backward()
    return y.detach(), [inp.grad] + [p.grad for p in module.parameters()]


def check(reference, fused, x, projection, mode):
    want_y, want_grads = run(reference, x, projection, mode)
    got_y, got_grads = run(fused, x, projection, mode)
    worst = 0.0
    for got, want in zip([got_y, *got_grads], [want_y, *want_grads]):
        scale = max(1.0, float(want.abs().max()))
        worst = max(worst, float((got - want).abs().max()) / scale)
    if not worst <= TOLERANCE:
        raise AssertionError(f"triton differs from cuDNN by {worst:.2e} (tolerance {TOLERANCE:g})")
    return worst


def timed(fn, device, calls):
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / calls
    began = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - began) * 1e3 / calls


def measure(cell, steps, batch, hidden, mode, device, rounds, calls):
    reference, fused, x, projection = make_case(cell, steps, batch, hidden, device)
    error = check(reference, fused, x, projection, mode)
    contenders = {"nn": reference, "triton": fused}
    for module in contenders.values():  # warm-up: compilation, cuDNN plans
        run(module, x, projection, mode)
    times = {name: [] for name in contenders}
    for r in range(rounds):
        order = list(contenders) if r % 2 == 0 else list(reversed(list(contenders)))
        for name in order:
            times[name].append(timed(lambda m=contenders[name]: run(m, x, projection, mode), device, calls))
    ratios = [n / t for n, t in zip(times["nn"], times["triton"])]
    return {"cell": cell, "mode": mode, "T": steps, "B": batch, "H": hidden, "error": error,
            "nn_ms": statistics.median(times["nn"]), "triton_ms": statistics.median(times["triton"]),
            "speedup": statistics.median(ratios)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--quick", action="store_true", help="one tiny case per cell and mode")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=5, help="calls per timed round")
    parser.add_argument("--out", type=Path, help="Markdown table (default: bench/results/gpu-<device name>.md)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_bench: torch sees no CUDA device; nothing to measure", file=sys.stderr)
        return 0
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        name = torch.cuda.get_device_name()
    else:
        name = "cpu (Triton interpreter dry run, not a benchmark)"
    sizes = QUICK if args.quick else dict(batches=BATCHES, hiddens=HIDDENS, steps=STEPS)
    rows = []
    for cell, steps, batch, hidden, mode in itertools.product(("irnn", "lstm"), sizes["steps"], sizes["batches"],
                                                              sizes["hiddens"], MODES):
        row = measure(cell, steps, batch, hidden, mode, args.device, args.rounds, args.calls)
        rows.append(row)
        print(f"{cell} {mode} T={steps} B={batch} H={hidden}: nn {row['nn_ms']:.3f} ms, triton "
              f"{row['triton_ms']:.3f} ms, {row['speedup']:.2f}x", file=sys.stderr)
    command = " ".join(["python bench/gpu_bench.py", *(sys.argv[1:] if argv is None else argv)])
    lines = [f"## GPU benchmark: Triton scans vs cuDNN ({name})", "",
             f"- torch {torch.__version__}, fused_rnn {fused_rnn.__version__}; command: `{command}`",
             "- float32, TF32 off on both sides; times are medians of CUDA-event timings; speed-up = median of "
             "per-round nn / triton", "",
             "| cell | mode | T | B | H | cuDNN ms | triton ms | speed-up | max error |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['cell']} | {r['mode']} | {r['T']} | {r['B']} | {r['H']} | {r['nn_ms']:.3f} | "
              f"{r['triton_ms']:.3f} | {r['speedup']:.2f}x | {r['error']:.1e} |" for r in rows]
    table = "\n".join(lines)
    print(table)
    out = args.out or Path(__file__).resolve().parent / "results" / (
        "gpu-" + "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")[:40] + ".md")
    if args.device == "cuda" or args.out:
        out.write_text(table + "\n", encoding="utf-8")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
