"""GPU benchmark: the Triton scans and the persistent CUDA scans against
torch.nn.RNN(nonlinearity="relu") / torch.nn.LSTM (cuDNN), one command.

    python bench/gpu_bench.py [--out bench/results/gpu-<device>.md] [--json PATH] [--quick]
                              [--dtypes float32,bfloat16]

Cases: IRNN and LSTM, one layer, I = H, float32 and bfloat16, inference (forward under
no_grad) and training (forward + backward of a fixed random projection of y), B in
{1, 8, 64, 256}, H in {256, 512, 1024}, T in {64, 1024}. The CUDA scans run where
dispatch would take them (B <= 64 and W_hh on chip; "-" elsewhere). Before timing,
every case checks each fused backend's outputs (and in training every gradient)
against the cuDNN module holding the same weights. Times are medians of CUDA-event
timings over rounds that rotate the order of the contenders; a speed-up is the median
of the per-round ratios (nn / backend).
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
# Error allowed against cuDNN, relative to each tensor's largest entry. float32: both
# accumulate in fp32 in different orders (TF32 is disabled here on both sides); over
# 1024 steps that stays near 1e-5, so 1e-3 flags only real errors. bfloat16: cuDNN
# rounds its state to bf16 every step while the fused kernels keep it in float32, so
# the two differ by a few bf16 units (2^-8 = 4e-3 each); 5e-2 still catches any wrong
# gate or index, which errs by O(1).
TOLERANCES = {torch.float32: 1e-3, torch.bfloat16: 5e-2}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def fused_backends(cell, batch, hidden, dtype, device):
    """The fused backends that dispatch could pick for this case: Triton, and the CUDA
    scans where they take it."""
    names = ["triton"]
    if device == "cuda" and "cuda" in fused_rnn.available_backends("cuda"):
        choice = fused_rnn.select_backend(device, dtype, cell=cell, hidden=hidden, batch=batch)
        if choice.name == "cuda":
            names.append("cuda")
    return names


def make_case(cell, steps, batch, hidden, device, dtype=torch.float32, backends=("triton",)):
    """(cuDNN module, {backend: fused module with the same weights}, x, projection)."""
    torch.manual_seed(0)
    if cell == "irnn":
        reference = torch.nn.RNN(hidden, hidden, nonlinearity="relu")
    else:
        reference = torch.nn.LSTM(hidden, hidden)
    if cell == "irnn":  # a contracting recurrence, so long sequences stay finite
        with torch.no_grad():
            reference.weight_hh_l0.copy_(0.9 * torch.eye(hidden) + 0.01 * torch.randn(hidden, hidden))
    reference = reference.to(device=device, dtype=dtype)
    fused = {}
    for backend in backends:
        module = (fused_rnn.IRNN if cell == "irnn" else fused_rnn.LSTM)(hidden, hidden, backend=backend)
        module = module.to(device=device, dtype=dtype)
        module.load_state_dict(reference.state_dict())
        fused[backend] = module
    x = torch.randn(steps, batch, hidden, device=device, dtype=dtype)
    projection = torch.randn(steps, batch, hidden, device=device, dtype=dtype)
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


def check(reference, fused, x, projection, mode, name="triton"):
    want_y, want_grads = run(reference, x, projection, mode)
    got_y, got_grads = run(fused, x, projection, mode)
    worst = 0.0
    for got, want in zip([got_y, *got_grads], [want_y, *want_grads]):
        scale = max(1.0, float(want.abs().max()))
        worst = max(worst, float((got.float() - want.float()).abs().max()) / scale)
    tolerance = TOLERANCES[x.dtype]
    if not worst <= tolerance:
        raise AssertionError(f"{name} differs from cuDNN by {worst:.2e} (tolerance {tolerance:g})")
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


def measure(cell, steps, batch, hidden, mode, device, rounds, calls, dtype=torch.float32):
    backends = fused_backends(cell, batch, hidden, dtype, device)
    reference, fused, x, projection = make_case(cell, steps, batch, hidden, device, dtype, backends)
    errors = {name: check(reference, module, x, projection, mode, name) for name, module in fused.items()}
    contenders = {"nn": reference, **fused}
    for module in contenders.values():  # warm-up: compilation, autotuning, cuDNN plans
        run(module, x, projection, mode)
    times = {name: [] for name in contenders}
    names = list(contenders)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotate who goes first
            times[name].append(timed(lambda m=contenders[name]: run(m, x, projection, mode), device, calls))
    row = {"cell": cell, "mode": mode, "dtype": str(dtype).replace("torch.", ""), "T": steps, "B": batch, "H": hidden,
           "nn_ms": statistics.median(times["nn"])}
    for name in ("triton", "cuda"):
        if name in fused:
            row[f"{name}_ms"] = statistics.median(times[name])
            row[f"{name}_speedup"] = statistics.median(n / t for n, t in zip(times["nn"], times[name]))
            row[f"{name}_error"] = errors[name]
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--quick", action="store_true", help="one tiny case per cell and mode")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=5, help="calls per timed round")
    parser.add_argument("--out", type=Path, help="Markdown table (default: bench/results/gpu-<device name>.md)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated: float32, bfloat16")
    args = parser.parse_args(argv)
    dtypes = [DTYPES[name] for name in args.dtypes.split(",") if name]
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
    for dtype, cell, steps, batch, hidden, mode in itertools.product(dtypes, ("irnn", "lstm"), sizes["steps"],
                                                                     sizes["batches"], sizes["hiddens"], MODES):
        row = measure(cell, steps, batch, hidden, mode, args.device, args.rounds, args.calls, dtype)
        rows.append(row)
        print(f"{cell} {mode} {row['dtype']} T={steps} B={batch} H={hidden}: nn {row['nn_ms']:.3f} ms, "
              + ", ".join(f"{b} {row[b + '_ms']:.3f} ms ({row[b + '_speedup']:.2f}x)"
                          for b in ("triton", "cuda") if b + "_ms" in row), file=sys.stderr)
    command = " ".join(["python bench/gpu_bench.py", *(sys.argv[1:] if argv is None else argv)])
    lines = [f"## GPU benchmark: Triton and CUDA scans vs cuDNN ({name})", "",
             f"- torch {torch.__version__}, fused_rnn {fused_rnn.__version__}; command: `{command}`",
             "- TF32 off on both sides; times are medians of CUDA-event timings; speed-up = median of per-round "
             "nn / backend; error = max |backend - cuDNN| / max(1, max |cuDNN|) over outputs and gradients", "",
             "| cell | mode | dtype | T | B | H | cuDNN ms | triton ms | triton speed-up | cuda ms | cuda speed-up "
             "| max error |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def cell_of(row, key, fmt, suffix=""):
        return format(row[key], fmt) + suffix if key in row else "-"

    lines += [f"| {r['cell']} | {r['mode']} | {r['dtype']} | {r['T']} | {r['B']} | {r['H']} | {r['nn_ms']:.3f} | "
              f"{cell_of(r, 'triton_ms', '.3f')} | {cell_of(r, 'triton_speedup', '.2f', 'x')} | "
              f"{cell_of(r, 'cuda_ms', '.3f')} | {cell_of(r, 'cuda_speedup', '.2f', 'x')} | "
              f"{max(r.get('triton_error', 0.0), r.get('cuda_error', 0.0)):.1e} |" for r in rows]
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
