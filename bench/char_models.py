"""Training speed of the character models: fused layers against the same model on
torch.nn layers.

    python bench/char_models.py [--steps 4] [--rounds 7] [--models seq,stateful-lstm] [--out PATH] [--docs]

For each model of ``fused-rnn train`` this builds the model as the trainer does (default
sequence length, batch 64, hidden 256) and a twin whose fused IRNN / LSTM layers are
replaced by ``torch.nn.RNN(nonlinearity="relu")`` / ``torch.nn.LSTM`` holding the same
parameters, then times training steps (forward, backward, gradient clipping, Adam) on
the same batches of the default corpus. Rounds alternate between the two, and the
speed-up is the median over rounds of the per-round ratio (the machine is shared and
noisy). The stateful models run without dropout here, so that both twins run their
layer modules as they are (with recurrent dropout the fused model drops W_hh inside
its functional call, which torch.nn's modules cannot take).
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from fused_rnn.app import data
from fused_rnn.app.models import MODEL_NAMES, build_model, with_torch_nn_layers
from fused_rnn.app.train import TrainConfig, batches, train_step
from harness import cpu_model_name  # bench/harness.py
from table import replace_block  # bench/table.py

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "char_models.md"


def measure(name: str, text: str, steps: int, rounds: int) -> dict:
    config = TrainConfig(model=name, dropout=0.0).resolved()
    vocab = data.Vocab.from_text(text)
    encoded = vocab.encode(text)
    train_batches = batches(config, encoded, shuffle=True, epoch=0)[: steps * (rounds + 1)]
    torch.manual_seed(0)
    fused = build_model(name, vocab, hidden_size=config.hidden, num_layers=config.layers, context=config.seq_len,
                        dropout=0.0)
    contenders = {"fused": fused, "torch.nn": with_torch_nn_layers(fused)}
    optimizers = {k: torch.optim.Adam(m.parameters(), lr=config.lr) for k, m in contenders.items()}
    times = {k: [] for k in contenders}

    def run(key, chunk):
        model = contenders[key]
        if hasattr(model, "reset_state"):
            model.reset_state()
        began = time.perf_counter()
        for inputs, targets in chunk:
            train_step(model, optimizers[key], inputs, targets, config.clip)
        return time.perf_counter() - began

    for key in contenders:  # warm-up
        run(key, train_batches[:steps])
    for r in range(rounds):
        chunk = train_batches[(r + 1) * steps:(r + 2) * steps]
        for key in (contenders if r % 2 == 0 else reversed(list(contenders))):
            times[key].append(run(key, chunk))
    chars = sum(inputs.numel() for inputs, _ in train_batches[steps:2 * steps])
    ratios = [n / f for f, n in zip(times["fused"], times["torch.nn"])]
    return {"model": name, "seq_len": config.seq_len, "batch": config.batch_size, "hidden": config.hidden,
            "layers": config.layers, "fused_chars_per_s": chars / statistics.median(times["fused"]),
            "nn_chars_per_s": chars / statistics.median(times["torch.nn"]), "speedup": statistics.median(ratios)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODEL_NAMES), help="comma-separated (default: all)")
    parser.add_argument("--steps", type=int, default=4, help="training steps per timed round (default: 4)")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds per contender (default: 7)")
    parser.add_argument("--chars", type=int, default=300_000, help="default-corpus characters to draw batches from")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="write the Markdown table here (default: bench/results/char_models.md)")
    parser.add_argument("--docs", action="store_true", help="also put the table into docs/app.md")
    args = parser.parse_args(argv)
    names = [n for n in args.models.split(",") if n]
    unknown = set(names) - set(MODEL_NAMES)
    if unknown:
        parser.error(f"unknown model(s) {sorted(unknown)}; choose from {MODEL_NAMES}")
    text = data.default_corpus(args.chars)
    rows = []
    for name in names:
        result = measure(name, text, args.steps, args.rounds)
        rows.append(result)
        print(f"{name}: fused {result['fused_chars_per_s']:,.0f} chars/s, torch.nn "
              f"{result['nn_chars_per_s']:,.0f} chars/s, {result['speedup']:.2f}x", file=sys.stderr)
    lines = [
        f"Training speed, fused layers vs torch.nn layers (CPU: {cpu_model_name()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}; command: "
        f"`python bench/char_models.py {' '.join(argv if argv is not None else sys.argv[1:])}`)",
        "",
        "| model | seq len | batch | hidden | layers | fused chars/s | torch.nn chars/s | speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {r['model']} | {r['seq_len']} | {r['batch']} | {r['hidden']} | {r['layers']} | "
              f"{r['fused_chars_per_s']:,.0f} | {r['nn_chars_per_s']:,.0f} | {r['speedup']:.2f}x |" for r in rows]
    table = "\n".join(lines)
    print(table)
    args.out.write_text(table + "\n", encoding="utf-8")
    if args.docs:
        replace_block(table, "char")
    return 0


if __name__ == "__main__":
    sys.exit(main())
