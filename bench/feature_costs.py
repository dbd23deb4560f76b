"""What the per-sequence options cost on the fused CPU kernels, and variable-length
batches against torch.nn.LSTM with pack_padded_sequence.

    python bench/feature_costs.py [--quick] [--docs] [--json PATH]

Part 1: one layer at the char-RNN lesson's size (T = 64, B = 64, I = 42, H = 256),
float32, backend "cpp": the plain scan against the same scan with a recurrent
dropout mask (p = 0.25), with per-sequence lengths (uniform in [T/2, T]), and (IRNN)
with hidden_clip. Part 2: a batch of those variable lengths through fused_rnn.LSTM
with lengths= against torch.nn.LSTM on pack_padded_sequence (same weights), after
checking that both give the same padded outputs, final states and gradients.
Inference is the forward under no_grad; training is forward and backward. Every
ratio is the median of per-round ratios within one run, the contenders interleaved
(harness.time_interleaved), so machine noise cancels.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fused_rnn
from harness import FULL_PLAN, QUICK_PLAN, describe_machine, time_interleaved  # bench/harness.py

SHAPE = dict(steps=64, batch=64, inputs=42, hidden=256)
QUICK_SHAPE = dict(steps=8, batch=6, inputs=5, hidden=16)
DROPOUT = 0.25
# float32, T = 64: different summation orders only (as the CPU benchmark table's check)
TOLERANCE = 1e-4


def make_case(cell, steps, batch, inputs, hidden, seed=0):
    generator = torch.Generator().manual_seed(seed)
    gates = 1 if cell == "irnn" else 4
    x = torch.randn(steps, batch, inputs, generator=generator)
    w_ih = torch.randn(gates * hidden, inputs, generator=generator) / inputs ** 0.5
    if cell == "irnn":
        w_hh = 0.9 * torch.eye(hidden) + 0.01 * torch.randn(hidden, hidden, generator=generator)
    else:
        w_hh = torch.randn(gates * hidden, hidden, generator=generator) / hidden ** 0.5
    bias = 0.1 * torch.randn(gates * hidden, generator=generator)
    mask = torch.empty(batch, hidden).bernoulli_(1 - DROPOUT, generator=generator) / (1 - DROPOUT)
    lengths = torch.randint(steps // 2, steps + 1, (batch,), generator=generator)
    lengths[0] = steps
    params = [t.requires_grad_() for t in (x, w_ih, w_hh, bias)]
    return params, mask, lengths


def layer_call(cell, params, mode, **options):
    x, w_ih, w_hh, bias = params
    layer = fused_rnn.irnn if cell == "irnn" else fused_rnn.lstm

    def step():
        if mode == "inference":
            with torch.no_grad():
                return layer(x, None, w_ih, w_hh, bias, None, backend="cpp", **options)
        y = layer(x, None, w_ih, w_hh, bias, None, backend="cpp", **options)[0]
        y.sum().backward()
        return y
    return step


def option_costs(shape, plan):
    rows = []
    for cell in ("irnn", "lstm"):
        params, mask, lengths = make_case(cell, **shape)
        variants = {"plain": {}, "recurrent_mask": dict(recurrent_mask=mask), "lengths": dict(lengths=lengths)}
        if cell == "irnn":
            variants["hidden_clip"] = dict(hidden_clip=1.0)
        for mode in ("inference", "training"):
            steps = {name: layer_call(cell, params, mode, **options) for name, options in variants.items()}
            seconds = time_interleaved(steps, plan)
            for name in variants:
                if name == "plain":
                    continue
                ratios = [o / p for o, p in zip(seconds[name], seconds["plain"])]
                rows.append({"cell": cell, "mode": mode, "option": name,
                             "plain_ms": 1e3 * statistics.median(seconds["plain"]),
                             "option_ms": 1e3 * statistics.median(seconds[name]),
                             "overhead": statistics.median(ratios) - 1.0})
    return rows


def _packed_nn(module, x, lengths):
    packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
    out, (h_n, c_n) = module(packed)
    return pad_packed_sequence(out, total_length=x.shape[0])[0], h_n, c_n


def variable_length_comparison(shape, plan):
    """fused_rnn.LSTM(lengths=) against nn.LSTM on a PackedSequence, same weights."""
    (x, *_), _, lengths = make_case("lstm", **shape)
    x = x.detach()
    torch.manual_seed(0)
    reference = torch.nn.LSTM(shape["inputs"], shape["hidden"])
    fused = fused_rnn.LSTM(shape["inputs"], shape["hidden"], backend="cpp")
    fused.load_state_dict(reference.state_dict())
    results = {}
    for name, run in (("nn", lambda m, inp: _packed_nn(m, inp, lengths)),
                      ("fused", lambda m, inp: (lambda y, s: (y, *s))(*m(inp, lengths=lengths)))):
        module = reference if name == "nn" else fused
        module.zero_grad()
        inp = x.clone().requires_grad_()
        outputs = run(module, inp)
        sum(o.sum() for o in outputs).backward()
        results[name] = [*outputs, inp.grad, *(p.grad for p in module.parameters())]
    worst = max(float((a - b).detach().abs().max()) / max(1.0, float(b.detach().abs().max()))
                for a, b in zip(results["fused"], results["nn"]))
    if not worst <= TOLERANCE:
        raise AssertionError(f"fused_rnn.LSTM(lengths=) differs from packed nn.LSTM by {worst:.2e}")
    rows = []
    for mode in ("inference", "training"):
        def make(module, runner, mode=mode):
            def step():
                if mode == "inference":
                    with torch.no_grad():
                        return runner(module, x)
                outputs = runner(module, x)
                outputs[0].sum().backward()
            return step
        steps = {"nn": make(reference, lambda m, inp: _packed_nn(m, inp, lengths)),
                 "fused": make(fused, lambda m, inp: m(inp, lengths=lengths))}
        seconds = time_interleaved(steps, plan)
        ratios = [n / f for n, f in zip(seconds["nn"], seconds["fused"])]
        rows.append({"mode": mode, "nn_ms": 1e3 * statistics.median(seconds["nn"]),
                     "fused_ms": 1e3 * statistics.median(seconds["fused"]),
                     "speedup": statistics.median(ratios), "error": worst})
    return rows


def format_tables(options, packed, shape, command) -> str:
    machine = describe_machine()
    size = "T={steps} B={batch} I={inputs} H={hidden}".format(**shape)
    lines = [f"Command: `{command}`; {size}, float32, {machine['cpu_model']}, "
             f"{machine['torch_threads']} threads, torch {torch.__version__}", "",
             "| cell | mode | option | plain ms | with option ms | overhead |", "|---|---|---|---:|---:|---:|"]
    lines += [f"| {r['cell']} | {r['mode']} | {r['option']} | {r['plain_ms']:.2f} | {r['option_ms']:.2f} | "
              f"{100 * r['overhead']:+.1f}% |" for r in options]
    lines += ["", "Variable lengths (uniform in [T/2, T]): fused_rnn.LSTM(lengths=) against nn.LSTM on "
              "pack_padded_sequence, same weights:", "",
              "| mode | nn.LSTM packed ms | fused_rnn lengths= ms | speed-up | max error |",
              "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['mode']} | {r['nn_ms']:.2f} | {r['fused_ms']:.2f} | {r['speedup']:.2f}x | {r['error']:.1e} |"
              for r in packed]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few rounds (a dry run for the tests)")
    parser.add_argument("--docs", action="store_true", help="also put the tables into docs/cpu.md")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = parser.parse_args(argv)
    if "cpp" not in fused_rnn.available_backends("cpu"):
        print("feature_costs: the cpp backend is not built; nothing to measure", file=sys.stderr)
        return 0
    shape, plan = (QUICK_SHAPE, QUICK_PLAN) if args.quick else (SHAPE, FULL_PLAN)
    options = option_costs(shape, plan)
    packed = variable_length_comparison(shape, plan)
    command = " ".join(["python bench/feature_costs.py", *(sys.argv[1:] if argv is None else argv)])
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from table import publish  # bench/table.py
    publish(format_tables(options, packed, shape, command), "features", args.docs)
    if args.json:
        args.json.write_text(json.dumps({"options": options, "variable_lengths": packed}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
