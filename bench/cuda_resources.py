"""GPU resources of the CUDA kernels (csrc/cuda/persistent_scan.cu), compiled ahead of time
with nvcc (no GPU needed), and the largest hidden size each scan keeps on chip.

    python bench/cuda_resources.py [--json PATH] [--docs]

persistent_scan.cu holds every kernel and explicit instantiation the extension launches
and includes no torch header, so it is compiled here on its own, with the nvcc flags
torch's CUDAExtension adds, for sm_80 and sm_90 (``nvcc -cubin -Xptxas -v``). A kernel
passes when it spills nothing, uses no stack frame, and its registers times its block
size (the launch's kThreads, or 256 for the step kernels) fit the 64K-register file;
the scans, launched one block per SM, also need the dynamic shared memory of their
plan (csrc/cuda/persistent_plan.h, the same function the launcher sizes the buffer with)
plus their static shared memory within the per-block limit, which the second table
reports as the largest H per cell and dtype on an A100 and an H100. Exits non-zero if
a kernel fails.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "csrc" / "cuda" / "persistent_scan.cu"
ARCHS = ("sm_80", "sm_90")
REGISTERS_PER_SM = 65536
SCAN_THREADS = 256  # kThreads in csrc/cuda/persistent_plan.h (checked against the source below)
STEP_THREADS = 256  # kStepThreads in persistent_scan.cu
# (name, SMs, shared memory per block with opt-in) of the devices in docs/cuda.md's table
DEVICES = (("A100 (sm_80)", 108, 163 * 1024), ("H100 SXM (sm_90)", 132, 227 * 1024))


def cuda_home() -> Path:
    sys.path.insert(0, str(REPO))
    from setup import find_cuda_home  # the same search the build uses

    home = find_cuda_home()
    if home is None:
        raise SystemExit("no CUDA toolkit found: set CUDA_HOME")
    return Path(home)


def nvcc_flags():
    os.environ.setdefault("CUDA_HOME", str(cuda_home()))  # else torch guesses from nvcc's (wrapper) path
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

    return ["-std=c++17", "-O3", *COMMON_NVCC_FLAGS]


def compile_report(arch: str) -> str:
    home = cuda_home()
    with tempfile.TemporaryDirectory() as folder:
        command = [str(home / "bin" / "nvcc"), *nvcc_flags(), "-cubin", f"-arch={arch}", "-Xptxas", "-v",
                   "-I", str(REPO / "csrc"), str(SOURCE), "-o", str(Path(folder, "kernels.cubin"))]
        result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"nvcc failed for {arch}:\n{result.stderr}")
    return result.stderr


KERNEL_NAME = re.compile(r"\d+((?:irnn|lstm|scan)_\w+?_kernel)I(6__half|13__nv_bfloat16|f)(?:Li(\d)ELi(\d+)E)?")
DTYPE_OF_MANGLED = {"f": "fp32", "13__nv_bfloat16": "bf16", "6__half": "fp16"}


def describe(mangled: str):
    """(kernel, dtype) of a mangled name: e.g. scan_forward_kernel<__half, 4, 16> ->
    ("lstm_scan_forward r16", "fp16"), with the rows per pass (persistent_plan.h)."""
    match = KERNEL_NAME.search(mangled)
    if match is None:
        raise SystemExit(f"unexpected kernel {mangled}: update KERNEL_NAME")
    kernel, dtype, gates, rows = match.groups()
    kernel = kernel.replace("_kernel", "")
    if kernel.startswith("scan"):
        kernel = ("lstm_" if gates == "4" else "irnn_") + kernel + f" r{int(rows):02d}"
    return kernel, DTYPE_OF_MANGLED[dtype]


def parse(report: str, arch: str):
    """One row per kernel from ptxas -v output."""
    blocks = re.split(r"ptxas info\s*: Compiling entry function '", report)[1:]
    rows = []
    for block in blocks:
        kernel, dtype = describe(block.split("'", 1)[0])
        stack = int(re.search(r"(\d+) bytes stack frame", block).group(1))
        spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", block))
        registers = int(re.search(r"Used (\d+) registers", block).group(1))
        smem_match = re.search(r"(\d+) bytes smem", block)
        smem = int(smem_match.group(1)) if smem_match else 0
        threads = SCAN_THREADS if "scan" in kernel else STEP_THREADS
        rows.append({"kernel": kernel, "dtype": dtype, "arch": arch, "registers": registers,
                     "spill_bytes": spills, "stack_bytes": stack, "static_smem_bytes": smem, "threads": threads,
                     "ok": spills == 0 and stack == 0 and registers * threads <= REGISTERS_PER_SM})
    return rows


def on_chip_limits():
    """{device: {"irnn fp32": H, ...}}: the largest H whose scans fit (persistent_plan.h)."""
    from fused_rnn import _C

    limits = {}
    for device, sm_count, smem in DEVICES:
        limits[device] = {f"{cell} {dtype}": _C.cuda_max_hidden_on_chip(gates, size, sm_count, smem)
                          for cell, gates in (("irnn", 1), ("lstm", 4))
                          for dtype, size in (("fp32", 4), ("bf16/fp16", 2))}
    return limits


def format_tables(rows, limits) -> str:
    lines = ["| kernel | dtype | sm_80 registers / spills | sm_90 registers / spills |", "|---|---|---|---|"]
    by_key = {(r["kernel"], r["dtype"], r["arch"]): r for r in rows}
    for kernel, dtype in sorted({(r["kernel"], r["dtype"]) for r in rows}):
        cells = [f"{by_key[(kernel, dtype, a)]['registers']} / {by_key[(kernel, dtype, a)]['spill_bytes']}"
                 for a in ARCHS]
        lines.append(f"| {kernel} | {dtype} | {cells[0]} | {cells[1]} |")
    lines += ["", "Largest H kept on chip (forward and backward scans; above it `select_backend` skips the scans "
              "and says why):", "",
              "| device | " + " | ".join(next(iter(limits.values()))) + " |",
              "|---|" + "---:|" * len(next(iter(limits.values())))]
    for device, values in limits.items():
        lines.append(f"| {device} | " + " | ".join(str(v) for v in values.values()) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    parser.add_argument("--docs", action="store_true", help="also put the tables into docs/cuda.md")
    args = parser.parse_args(argv)
    plan = (REPO / "csrc" / "cuda" / "persistent_plan.h").read_text()
    if f"constexpr int kThreads = {SCAN_THREADS};" not in plan:
        raise SystemExit("kThreads in csrc/cuda/persistent_plan.h changed: update SCAN_THREADS here")
    rows = [row for arch in ARCHS for row in parse(compile_report(arch), arch)]
    limits = on_chip_limits()
    command = " ".join(["python bench/cuda_resources.py", *(sys.argv[1:] if argv is None else argv)])
    version = re.search(r"release (\S+),", subprocess.run([str(cuda_home() / "bin" / "nvcc"), "--version"],
                                                         capture_output=True, text=True).stdout)
    clean = sum(r["spill_bytes"] == 0 and r["stack_bytes"] == 0 for r in rows)
    table = (f"Command: `{command}` (nvcc {version.group(1) if version else '?'} -Xptxas -v; {clean} of "
             f"{len(rows)} kernel builds without spills or stack frames)\n\n" + format_tables(rows, limits))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from table import publish  # bench/table.py
    publish(table, "cuda", args.docs)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "on_chip_limits": limits}, indent=1))
    bad = [r for r in rows if not r["ok"]]
    for r in bad:
        print(f"{r['kernel']} [{r['dtype']}] on {r['arch']}: {r['registers']} registers x {r['threads']} threads, "
              f"{r['spill_bytes']} bytes spilled, {r['stack_bytes']} bytes of stack", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
