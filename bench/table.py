"""Writes the CPU benchmark table that the README embeds.

    python bench/table.py [--out bench/results/cpu.md] [--readme] [--quick] [--json PATH] [--threads N] ...

Runs the CPU cases of the benchmark harness (bench/harness.py; `fused-rnn bench` is
the same command), prints the Markdown table and writes it to --out; with --readme it
also puts its summary into README.md (between the bench:cpu markers). The README's
numbers are this output, never typed by hand.
"""

import argparse
import sys
from pathlib import Path

import harness as bench  # bench/harness.py

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "cpu.md"
README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- bench:cpu:start -->", "<!-- bench:cpu:end -->"


def replace_readme_table(table: str, readme: Path = README, start: str = START, end: str = END) -> None:
    """Puts `table` into README.md between the `start` and `end` marker lines."""
    text = readme.read_text(encoding="utf-8")
    if start not in text or end not in text:
        raise SystemExit(f"{readme} has no {start} ... {end} block to replace")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{start}\n{table.rstrip()}\n{end}{tail}", encoding="utf-8")


def publish(table: str, block: str, readme: bool) -> None:
    """Prints `table` and, with `readme`, puts it into README.md's bench:`block` markers."""
    print(table)
    if readme:
        replace_readme_table(table, start=f"<!-- bench:{block}:start -->", end=f"<!-- bench:{block}:end -->")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="the Markdown file to write (default: bench/results/cpu.md)")
    parser.add_argument("--readme", action="store_true", help="also put the table into README.md")
    bench.add_arguments(parser)


def run(args: argparse.Namespace, command: str) -> int:
    report = bench.report_from_args(args, command=command)
    table = bench.format_markdown(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table, encoding="utf-8")
    print(table, end="")
    print(f"wrote {args.out}", file=sys.stderr)
    if args.readme:
        replace_readme_table(table)
        print(f"updated {README}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="python bench/table.py", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv), " ".join(["python bench/table.py", *argv]))


if __name__ == "__main__":
    sys.exit(main())
