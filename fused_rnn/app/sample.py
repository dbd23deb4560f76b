"""``fused-rnn sample CHECKPOINT``: generate text with a trained character model.

    fused-rnn sample runs/char-rnn/checkpoint.pt --seed "def " --chars 500 --temperature 0.8
"""

import argparse
import sys

import torch

from .checkpoint import describe_os_error, load_checkpoint, model_from_checkpoint


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a checkpoint written by fused-rnn train (OUT/checkpoint.pt)")
    parser.add_argument("--seed", default=None,
                        help="text to start from (default: newlines, enough for the model's context)")
    parser.add_argument("--chars", type=int, default=500, help="characters to generate (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=0.8,
                        help="sampling temperature; lower is more conservative (default: %(default)s)")
    parser.add_argument("--random-seed", type=int, default=None, help="seed of the sampling RNG (reproducible text)")
    parser.add_argument("--backend", choices=("auto", "cpp", "triton", "cuda", "torch"), default=None,
                        help="kernel backend (default: the one the model was trained with)")


def run_command(args: argparse.Namespace, command: str = "") -> int:
    try:
        checkpoint = load_checkpoint(args.checkpoint)
        model = model_from_checkpoint(checkpoint, backend=args.backend)
        start = "\n" if "\n" in model.vocab.chars else model.vocab.chars[0]
        seed = args.seed if args.seed is not None else start * model.min_seed_length()
        generator = None if args.random_seed is None else torch.Generator().manual_seed(args.random_seed)
        text = model.generate(seed, args.chars, args.temperature, generator=generator)
    except ValueError as error:
        print(f"fused-rnn sample: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # no such file, permission denied, a folder given as the checkpoint, ...
        print(f"fused-rnn sample: error: {describe_os_error(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fused-rnn sample: interrupted", file=sys.stderr)
        return 130
    print(seed + text)
    return 0
