"""The ``fused-rnn`` / ``python -m fused_rnn`` command line.

    fused-rnn train [--model stateful-lstm|stateful-irnn|seq|nchar|3char|onehot] [--text FILE] ...
    fused-rnn sample CHECKPOINT [--seed TEXT] [--chars N] [--temperature T]
    fused-rnn bench [--quick] [--json PATH] [--backends cpp,torch] ...

(``python -m fused_rnn`` is the same command.)

Each subcommand's module provides ``add_arguments(parser)`` and
``run_command(args, command) -> exit status``; adding a subcommand is one entry in
:data:`SUBCOMMANDS`.
"""

import argparse
import sys
from typing import Optional, Sequence

from . import bench, sample, train

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
    args = build_parser().parse_args(argv)
    module, _ = SUBCOMMANDS[args.command]
    return module.run_command(args, command=" ".join(["fused-rnn", *argv]))


if __name__ == "__main__":
    sys.exit(main())
