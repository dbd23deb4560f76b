"""Writes the CPU benchmark table (bench/results/cpu.md) and the README's summary of it.

    python bench/table.py [--out bench/results/cpu.md] [--readme] [--quick] [--json PATH] [--threads N] ...

Runs the CPU cases of the benchmark harness (bench/harness.py; `fused-rnn bench` is
the same command), prints the Markdown table and writes it to --out; with --readme it
also puts its summary into README.md (between the bench:cpu markers). The README's
numbers are this output, never typed by hand; the other bench/ scripts put their
tables into docs/ through the same `publish`.
"""

import argparse
import json
import sys
from pathlib import Path

import harness as bench  # bench/harness.py

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "bench" / "results" / "cpu.md"
README = ROOT / "README.md"
# where each generated block lives: the README keeps summaries, docs/ the full tables
DOCS = {"cpu": README, "cpu-bfloat16": ROOT / "docs" / "cpu.md", "char": ROOT / "docs" / "app.md",
        "features": ROOT / "docs" / "cpu.md",
        "cuda": ROOT / "docs" / "cuda.md", "triton": ROOT / "docs" / "triton.md", "model": ROOT / "docs" / "cuda.md",
        "split": ROOT / "docs" / "triton.md"}


def replace_block(text: str, block: str, path: Path = None) -> Path:
    """Puts `text` into `path` (default: where `block` lives) between the
    ``<!-- bench:BLOCK:start -->`` and ``<!-- bench:BLOCK:end -->`` marker lines."""
    path = DOCS[block] if path is None else path
    start, end = f"<!-- bench:{block}:start -->", f"<!-- bench:{block}:end -->"
    content = path.read_text(encoding="utf-8")
    if start not in content or end not in content:
        raise SystemExit(f"{path} has no {start} ... {end} block to replace")
    head, rest = content.split(start, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{start}\n{text.rstrip()}\n{end}{tail}", encoding="utf-8")
    return path


def publish(table: str, block: str, write: bool) -> None:
    """Prints `table` and, with `write`, puts it into its document's bench:`block` markers."""
    print(table)
    if write:
        print(f"updated {replace_block(table, block)}", file=sys.stderr)


SPEEDUPS = ROOT / "fused_rnn" / "_speedup_tables.py"


def write_section(section: str, source: str, name: str, entries: dict, path: Path = SPEEDUPS) -> None:
    """Rewrites one section of fused_rnn/_speedup_tables.py (between its ``# begin
    SECTION`` and ``# end SECTION`` lines): the source line and the table `name`."""
    text = path.read_text(encoding="utf-8")
    begin = next(line for line in text.splitlines() if line.startswith(f"# begin {section}"))
    end = f"# end {section}"
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    key_comment = next(line for line in rest.splitlines() if line.startswith("# ("))
    rows = "".join(f"    {key!r}: {value!r},\n" for key, value in sorted(entries.items()))
    # a source of several parts ("float32: ...; bfloat16: ...") one part per line
    parts = [part + "; " for part in source.split("; ")]
    parts[-1] = parts[-1][:-2]
    value = repr(source) if len(parts) == 1 else "(\n" + "".join(f"    {part!r}\n" for part in parts) + ")"
    body = f"{begin}\n{section}_SOURCE = {value}\n{key_comment}\n{name} = {{\n{rows}}}\n"
    path.write_text(head + body + end + tail, encoding="utf-8")


def _sources_by_dtype(source: str) -> dict:
    """The CPU section's source line, one part per dtype ("float32: measured ...;
    bfloat16: measured ..."; a line without dtypes is float32's)."""
    parts = {}
    for part in source.split("; "):
        names, separator, text = part.partition(": ")
        if separator and set(names.split(",")) <= set(bench.DTYPES):
            parts.update(dict.fromkeys(names.split(","), text))
        else:
            parts["float32"] = part
    return parts


def write_speedups(report_json: dict, path: Path = SPEEDUPS) -> None:
    """The CPU section of the predictions "auto" uses: the fused backend's measured
    speed-up over nn.RNN / nn.LSTM per (cell, mode, dtype, batch, hidden, steps), that
    of the package's own route to torch.nn's kernels (the "nn" backend; a run without
    that contender leaves auto's bar at CLEAR_WIN for its rows), and that of the drop-in
    module on the fused kernel ("module": a module's auto reads it instead of "cpp"). The
    report's dtypes replace theirs; the other dtypes' entries stay, with their source
    (a bfloat16 run need not measure float32 again)."""
    import runpy

    m = report_json["machine"]
    for name, meaning in (("nn", "auto's bar stays 1.3x"), ("module", "a module's auto reads the functional cpp")):
        if name not in report_json.get("backends", ()):
            print(f"note: this run did not time {name!r}: for its rows {meaning}", file=sys.stderr)
    entries = {}
    for result in report_json["results"]:
        c = result["config"]
        ratios = {name: round(value["speedup_vs_nn"], 3) for name, value in result["contenders"].items()
                  if name in ("cpp", "nn", "module") and value.get("speedup_vs_nn") is not None}
        if ratios:
            entries[(result["cell"], result["mode"], result.get("dtype", "float32"), c["B"], c["H"], c["T"])] = ratios
    measured = list(dict.fromkeys(result.get("dtype", "float32") for result in report_json["results"]))
    current = runpy.run_path(str(path))
    entries.update({key: value for key, value in current["CPU"].items() if key[2] not in measured})
    sources = {dtype: text for dtype, text in _sources_by_dtype(current["CPU_SOURCE"]).items()
               if dtype not in measured and any(key[2] == dtype for key in entries)}
    sources[",".join(measured)] = (f"measured by bench/table.py on {m['cpu_model']}, {m['torch_threads']} threads, "
                                   f"{m['date']}")
    source = "; ".join(f"{dtypes}: {text}" for dtypes, text in sources.items())
    write_section("CPU", source, "CPU", entries, path)


def summary_block(dtype: str) -> str:
    """Where the README keeps the summary of a dtype's table."""
    return "cpu" if dtype == "float32" else f"cpu-{dtype}"


def format_summary(report, dtype: str = "float32", out: Path = DEFAULT_OUT) -> str:
    """The README's summary of one dtype's rows: the cpp backend's speed-up over nn.RNN /
    nn.LSTM per cell, mode and configuration (same-run medians), and where it was
    measured."""
    m = report.machine
    rows = [r for r in report.results if r.dtype == dtype]
    configs = list(dict.fromkeys(r.config for r in rows))
    gemm = f" (the package's GEMM kernel: {m['cpu_gemm']})" if m.get("cpu_gemm") else ""
    if dtype == "bfloat16" and m.get("cpu_bf16"):
        gemm = f" (bf16 products: {m['cpu_bf16']})"
    link = out.resolve().relative_to(ROOT).as_posix() if out.resolve().is_relative_to(ROOT) else str(out)
    layers = "`nn.RNN(nonlinearity=\"relu\")` / `nn.LSTM`" + ("" if dtype == "float32" else f", all in {dtype}")
    lines = [f"CPU: {m['cpu_model']}{gemm}, {m['torch_threads']} threads, torch {m['torch_version']}, {m['date']}; "
             f"`{report.command or 'python bench/table.py --readme'}`; full table: [{link}]({link}). "
             "Speed of the fused CPU kernels (`backend=\"cpp\"`) and of the default (`auto`) over "
             f"{layers} (median of same-run ratios; above 1x is faster):", "",
             "| cell | mode | " + " | ".join(f"{c.name} (T={c.T}, B={c.B}, H={c.H}): cpp / auto" for c in configs)
             + " |", "|---|---|" + "---:|" * len(configs)]

    def ratio(result, name):
        value = result.speedup(name) if result is not None else None
        return "-" if value is None else f"{value:.2f}x"

    for cell in dict.fromkeys(r.cell for r in rows):
        for mode in dict.fromkeys(r.mode for r in rows):
            results = {r.config: r for r in rows if r.cell == cell and r.mode == mode}
            lines.append(f"| {cell} | {mode} | " + " | ".join(
                f"{ratio(results.get(c), 'cpp')} / {ratio(results.get(c), 'auto')}" for c in configs) + " |")
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="the Markdown file to write (default: bench/results/cpu.md)")
    parser.add_argument("--readme", action="store_true", help="also put the summary into README.md")
    parser.add_argument("--write-speedups", action="store_true",
                        help="also write the measured ratios as auto's CPU predictions (fused_rnn/_speedup_tables.py)")
    parser.add_argument("--speedups-from", type=Path, metavar="JSON",
                        help="only write the CPU predictions from a saved --json report, measuring nothing")
    bench.add_arguments(parser)


def run(args: argparse.Namespace, command: str) -> int:
    if args.speedups_from is not None:
        write_speedups(json.loads(args.speedups_from.read_text(encoding="utf-8")))
        print(f"wrote {SPEEDUPS} from {args.speedups_from}", file=sys.stderr)
        return 0
    report = bench.report_from_args(args, command=command)
    if args.write_speedups:
        write_speedups(report.to_json())
        print(f"wrote {SPEEDUPS}", file=sys.stderr)
    table = bench.format_markdown(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table, encoding="utf-8")
    print(table, end="")
    print(f"wrote {args.out}", file=sys.stderr)
    if args.readme and "cpp" in args.backends:
        for dtype in dict.fromkeys(r.dtype for r in report.results):
            path = replace_block(format_summary(report, dtype, args.out), summary_block(dtype))
            print(f"updated {path}", file=sys.stderr)
    return 0


def main(argv=None, prog: str = "python bench/table.py") -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv), " ".join([prog, *argv]))


if __name__ == "__main__":
    sys.exit(main())
