"""The modules' call overhead: fused_rnn.IRNN / LSTM against nn.RNN / nn.LSTM at one shape.

bench/table.py times the functional API (one layer call) against torch.nn's modules;
this times the drop-in modules themselves, where a single step is mostly Python around
the kernel: the argument checks, auto's choice, the state tensors. Each contender (the
nn module, and fused_rnn's module with backend auto, cpp and nn, all with the same
weights) runs blocks of calls of about 10 ms in turn, round after round; the report
gives each contender's median time per call and the median over rounds of the
baseline's time over its own in the same round (above 1x is faster).

    python bench/module_calls.py                      # T = 1, B = 1 (the sampling loops)
    python bench/module_calls.py --steps 3 --batch 64 --training
"""

import argparse
import statistics
import sys
import time

import torch

import fused_rnn

BACKENDS = ("auto", "cpp", "nn")


def _modules(cell: str, inputs: int, hidden: int, training: bool):
    if cell == "irnn":
        baseline = torch.nn.RNN(inputs, hidden, nonlinearity="relu")
        ours = {name: fused_rnn.IRNN(inputs, hidden, backend=name) for name in BACKENDS}
    else:
        baseline = torch.nn.LSTM(inputs, hidden)
        ours = {name: fused_rnn.LSTM(inputs, hidden, backend=name) for name in BACKENDS}
    for module in ours.values():
        module.load_state_dict(baseline.state_dict())
    modules = {"torch.nn": baseline, **ours}
    for module in modules.values():
        module.train(training)
    return modules


def measure(cell: str, steps: int, batch: int, inputs: int, hidden: int, training: bool, rounds: int):
    modules = _modules(cell, inputs, hidden, training)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(steps, batch, inputs, generator=generator)
    states = tuple(torch.randn(1, batch, hidden, generator=generator) for _ in range(1 if cell == "irnn" else 2))
    hx = states[0] if cell == "irnn" else states

    def call(module):
        if training:
            y, _ = module(x, hx)
            y.sum().backward()
        else:
            with torch.no_grad():
                module(x, hx)

    start = time.perf_counter()
    for _ in range(3):
        call(modules["torch.nn"])
    calls = max(3, int(0.01 / ((time.perf_counter() - start) / 3)))  # blocks of about 10 ms
    times = {name: [] for name in modules}
    for module in modules.values():  # warm-up
        for _ in range(calls):
            call(module)
    for _ in range(rounds):
        for name, module in modules.items():
            start = time.perf_counter()
            for _ in range(calls):
                call(module)
            times[name].append((time.perf_counter() - start) / calls * 1e6)
    base = times["torch.nn"]
    return {name: (statistics.median(t), statistics.median(b / a for a, b in zip(t, base)))
            for name, t in times.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--inputs", type=int, default=42)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--training", action="store_true", help="forward and backward (default: no_grad forward)")
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    for name in ("steps", "batch", "inputs", "hidden", "rounds", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    torch.set_num_threads(args.threads)
    mode = "training" if args.training else "inference"
    print(f"modules at T={args.steps} B={args.batch} I={args.inputs} H={args.hidden}, {mode}, "
          f"{args.threads} threads, median of {args.rounds} interleaved rounds "
          f"(us per call, and speed over torch.nn's module in the same round):")
    for cell in ("irnn", "lstm"):
        result = measure(cell, args.steps, args.batch, args.inputs, args.hidden, args.training, args.rounds)
        print(f"  {cell}: " + "  ".join(f"{name} {us:.0f} us ({ratio:.2f}x)" for name, (us, ratio) in result.items()),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
