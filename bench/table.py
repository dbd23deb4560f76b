"""Writes the CPU benchmark table that the README embeds.

    python bench/table.py [--out bench/results/cpu.md] [--quick] [--json PATH] [--threads N] ...

Runs fused_rnn.bench (the same as `python -m fused_rnn bench`, whose options it takes),
prints the Markdown table and writes it to --out. The README's table is this file,
never typed by hand.
"""

import argparse
import sys
from pathlib import Path

from fused_rnn import bench

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "cpu.md"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="python bench/table.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="the Markdown file to write (default: bench/results/cpu.md)")
    bench.add_arguments(parser)
    args = parser.parse_args(argv)
    report = bench.report_from_args(args, command=" ".join(["python bench/table.py", *argv]))
    table = bench.format_markdown(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table, encoding="utf-8")
    print(table, end="")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
