"""``fused-rnn sample CHECKPOINT``: generate text with a trained character model.

    fused-rnn sample runs/char-rnn/checkpoint.pt --seed "def " --chars 500 --temperature 0.8
"""

import argparse
import math
import sys

import torch

from .checkpoint import describe_os_error, load_checkpoint, model_from_checkpoint, one_line


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


def _check_options(args: argparse.Namespace) -> None:
    """The options by their own names (the model's generate() names its arguments)."""
    if args.chars < 0:
        raise ValueError(f"--chars must be 0 or more, got {args.chars}")
    if not 0 < args.temperature < math.inf:
        raise ValueError(f"--temperature must be a positive number, got {args.temperature!r}")
    if args.seed is not None and not args.seed:
        raise ValueError("--seed must be at least one character (or leave it out)")
    if args.random_seed is not None and not -2 ** 63 <= args.random_seed < 2 ** 64:
        raise ValueError(f"--random-seed must be within [-2**63, 2**64), got {args.random_seed}")


def run_command(args: argparse.Namespace, command: str = "") -> int:
    started = False  # whether the text has begun on stdout (a failure then ends its line)
    try:
        _check_options(args)
        checkpoint = load_checkpoint(args.checkpoint)
        model = model_from_checkpoint(checkpoint, backend=args.backend)
        start = "\n" if "\n" in model.vocab.chars else model.vocab.chars[0]
        seed = args.seed if args.seed is not None else start * model.min_seed_length()
        generator = None if args.random_seed is None else torch.Generator().manual_seed(args.random_seed)
        characters = model.stream(seed, args.chars, args.temperature, generator=generator)
        _write(seed)
        started = True
        for count, character in enumerate(characters, 1):  # as sampled: Ctrl-C keeps what was printed
            _write(character, flush=count % 64 == 0)
        _write("\n")
    except ValueError as error:
        _write("\n" if started else "")
        print(f"fused-rnn sample: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # no such file, permission denied, a folder given as the checkpoint, ...
        print(f"fused-rnn sample: error: {describe_os_error(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _write("\n" if started else "")
        print("fused-rnn sample: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # anything else (out of memory, a kernel's error): one line, not a traceback
        _write("\n" if started else "")
        print(f"fused-rnn sample: error: {type(error).__name__}: {one_line(error)}", file=sys.stderr)
        return 1
    return 0


def _write(text: str, flush: bool = True) -> None:
    sys.stdout.write(text)
    if flush:
        sys.stdout.flush()
