"""The ``fused-rnn`` / ``python -m fused_rnn`` command line.

    fused-rnn train [--model stateful-lstm|stateful-irnn|seq|nchar|3char|onehot] [--text FILE] ...
    fused-rnn sample CHECKPOINT [--seed TEXT] [--chars N] [--temperature T]
    fused-rnn bench [--quick] [--json PATH] [--backends cpp,torch] ...

(``python -m fused_rnn`` is the same command.)

Each subcommand's module provides ``add_arguments(parser)`` and
``run_command(args, command) -> exit status``; adding a subcommand is one entry in
:data:`SUBCOMMANDS`. ``bench`` runs the CPU table of the benchmark harness, which
lives in the source tree's bench/ folder, not in the installed package.
"""

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from . import sample, train

BENCH_DIR = Path(__file__).resolve().parents[2] / "bench"


class _Bench:
    """``fused-rnn bench [OPTIONS]``: a thin wrapper of bench/table.py (bench/harness.py),
    found next to the package in a source checkout; its options are table.py's
    (``fused-rnn bench --help``). Nothing of bench/ is imported unless this runs."""

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        pass  # main() hands every option after `bench`, --help included, to bench/table.py

    @staticmethod
    def run_command(options: Sequence[str]) -> int:
        if not (BENCH_DIR / "table.py").is_file():
            print("fused-rnn bench: error: the benchmarks live in the source tree's bench/ folder, which this "
                  "install does not have; run `python bench/table.py` from a checkout", file=sys.stderr)
            return 2
        sys.path.insert(0, str(BENCH_DIR))
        import table  # bench/table.py

        return table.main(list(options), prog="fused-rnn bench")


bench = _Bench

# subcommand -> (module that implements it, one-line help)
SUBCOMMANDS = {
    "train": (train, "train a character-level language model on the fused kernels"),
    "sample": (sample, "generate text with a model trained by `fused-rnn train`"),
    "bench": (bench, "time the fused CPU kernels against torch.nn.RNN / torch.nn.LSTM"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fused-rnn", description="Fused IRNN and LSTM kernels for PyTorch.")
    subcommands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        module.add_arguments(subcommands.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:
        return bench.run_command(argv[1:])
    args = build_parser().parse_args(argv)
    module, _ = SUBCOMMANDS[args.command]
    return module.run_command(args, command=" ".join(["fused-rnn", *argv]))


if __name__ == "__main__":
    sys.exit(main())
