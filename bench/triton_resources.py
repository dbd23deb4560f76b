"""Per-kernel GPU resources of the Triton kernels, compiled ahead of time (no GPU needed).

    python bench/triton_resources.py [--json PATH] [--hidden 64,128,256,512,1024]

Each kernel with its launch config (the one dispatch uses) is compiled with
``triton.compile`` for sm_80 and sm_90, and ``ptxas -v`` on the generated PTX reports
registers per thread and spills; Triton's metadata gives the shared memory. The
occupancy estimate is resident warps per SM over the SM's maximum (64 on both), from
the register file (64K 32-bit registers per SM), the shared memory per SM (164 KB on
sm_80, 228 KB on sm_90) and the 32-blocks-per-SM limit. Exits non-zero if a kernel
spills or needs more shared memory than a block may have (163 KB on sm_80, 227 KB on
sm_90), or if its PTX loads through the non-coherent path (ld.global.nc): every step
reads what the previous one stored. Run without TRITON_INTERPRET (the interpreter cannot compile).
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ARCHS = {  # capability -> (ptxas arch, shared memory per block, per SM, in bytes)
    80: ("sm_80", 163 * 1024, 164 * 1024),
    90: ("sm_90a", 227 * 1024, 228 * 1024),
}
REGISTERS_PER_SM, MAX_WARPS_PER_SM, MAX_BLOCKS_PER_SM = 65536, 64, 32


def ptxas_path() -> str:
    for candidate in (os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"):
        path = Path(candidate, "bin", "ptxas")
        if candidate and path.is_file():
            return str(path)
    found = shutil.which("ptxas")
    if found is None:
        raise SystemExit("ptxas not found: set CUDA_HOME or put the CUDA toolkit's bin on PATH")
    return found


def kernel_specs(hidden_sizes):
    """(kernel name, JITFunction, signature, constexprs, num_warps, num_stages, hidden) for every
    kernel and config dispatch may launch: float32 (IEEE and TF32 products), bfloat16
    and float16 weights (state buffers are float32 in every case). The kernels' loops
    run over H at run time, so the compiled code, and its resources, do not depend on
    H; it is listed per H because the issue's table asks for it and a future per-H
    config must show here."""
    from fused_rnn.triton import irnn, lstm

    import torch

    f32 = "*fp32"
    variants = [("fp32", False, ""), ("fp32", True, "[tf32]"), ("bf16", False, "[bf16]"), ("fp16", False, "[fp16]")]
    torch_dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    for hidden in hidden_sizes:
        for dtype, tf32, label in variants:
            io = f"*{dtype}"  # the inputs' / weights' / outputs' dtype
            config = irnn.CONFIGS[torch_dtypes[dtype]]
            blocks = config.constexprs()
            common = dict(TF32=tf32, UPCAST=False)
            forward = {"pre": f32, "h0": f32, "w": io, "y": f32, "T": "i32", "B": "i32", "H": "i32",
                       "HAS_H0": "constexpr", "TF32": "constexpr", "UPCAST": "constexpr", "BLOCK_B": "constexpr",
                       "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"}
            yield ("irnn_scan_forward" + label, irnn.irnn_scan_forward_kernel, forward,
                   dict(HAS_H0=True, **common, **blocks), config.num_warps, config.num_stages, hidden)
            backward = {"dy": io, "dh_n": io, "y": io, "w": io, "dz": f32, "dh0": f32, "T": "i32", "B": "i32",
                        "H": "i32", "TF32": "constexpr", "UPCAST": "constexpr", "BLOCK_B": "constexpr",
                        "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"}
            yield ("irnn_scan_backward" + label, irnn.irnn_scan_backward_kernel, backward,
                   dict(**common, **blocks), config.num_warps, config.num_stages, hidden)
            config = lstm.CONFIGS[torch_dtypes[dtype]]
            blocks = config.constexprs()
            forward = {"gates": f32, "h0": f32, "c0": f32, "w": io, "y": f32, "cells": f32, "T": "i32", "B": "i32",
                       "H": "i32", "HAS_STATE": "constexpr", "TF32": "constexpr", "UPCAST": "constexpr",
                       "BLOCK_B": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"}
            yield ("lstm_scan_forward" + label, lstm.lstm_scan_forward_kernel, forward,
                   dict(HAS_STATE=True, **common, **blocks), config.num_warps, config.num_stages, hidden)
            backward = {"dy": io, "dh_n": io, "c0": f32, "cells": f32, "gates": f32, "w": io, "dgates": f32,
                        "dc": f32, "dh0": f32, "T": "i32", "B": "i32", "H": "i32", "HAS_C0": "constexpr",
                        "TF32": "constexpr", "UPCAST": "constexpr", "BLOCK_B": "constexpr", "BLOCK_N": "constexpr",
                        "BLOCK_K": "constexpr"}
            yield ("lstm_scan_backward" + label, lstm.lstm_scan_backward_kernel, backward,
                   dict(HAS_C0=True, **common, **blocks), config.num_warps, config.num_stages, hidden)


def triton_version() -> str:
    import triton
    return triton.__version__


def occupancy(registers: int, shared: int, num_warps: int, shared_per_sm: int) -> float:
    threads = 32 * num_warps
    by_registers = REGISTERS_PER_SM // max(1, registers * threads)
    by_shared = shared_per_sm // shared if shared else MAX_BLOCKS_PER_SM
    blocks = min(by_registers, by_shared, MAX_BLOCKS_PER_SM, MAX_WARPS_PER_SM // num_warps)
    return blocks * num_warps / MAX_WARPS_PER_SM


def measure(hidden_sizes):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ptxas = ptxas_path()
    rows, compiled = [], {}
    for name, fn, signature, constexprs, num_warps, num_stages, hidden in kernel_specs(hidden_sizes):
        # compiled here with T, B, H as i32: true at run time only if Triton never turns a
        # size of 1 into a constant (it would, and B = 1 would fail to compile)
        specialized = [p.name for p in fn.params if p.name in ("T", "B", "H") and not p.do_not_specialize]
        if specialized:
            raise SystemExit(f"{name}: size arguments {specialized} are specialized; add them to do_not_specialize")
        for capability, (arch, shared_limit, shared_per_sm) in ARCHS.items():
            key = (name, capability)
            if key not in compiled:
                kernel = triton.compile(ASTSource(fn, signature, constexprs=constexprs),
                                        target=GPUTarget("cuda", capability, 32),
                                        options={"num_warps": num_warps, "num_stages": num_stages})
                with tempfile.TemporaryDirectory() as folder:
                    ptx = Path(folder, "kernel.ptx")
                    ptx.write_text(kernel.asm["ptx"])
                    report = subprocess.run([ptxas, "-v", f"-arch={arch}", str(ptx), "-o", os.devnull],
                                            capture_output=True, text=True, check=True).stderr
                # each step reads rows the previous step stored; that is only safe (after the
                # barrier) with coherent loads, never through the non-coherent .nc path
                nc_loads = len(re.findall(r"ld\.global\.nc", kernel.asm["ptx"]))
                registers = int(re.search(r"Used (\d+) registers", report).group(1))
                spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", report))
                compiled[key] = (registers, spills, kernel.metadata.shared, nc_loads)
            registers, spills, shared, nc_loads = compiled[key]
            rows.append({"kernel": name, "arch": f"sm_{capability}", "hidden": hidden, "num_warps": num_warps,
                         "block": "x".join(str(constexprs[k]) for k in ("BLOCK_B", "BLOCK_N", "BLOCK_K")),
                         "registers": registers, "spill_bytes": spills, "shared_bytes": shared,
                         "shared_limit": shared_limit,
                         "occupancy": occupancy(registers, shared, num_warps, shared_per_sm),
                         "noncoherent_loads": nc_loads,
                         "ok": spills == 0 and shared <= shared_limit and nc_loads == 0})
    return rows


def format_table(rows) -> str:
    lines = ["| kernel | arch | H | warps | BLOCK_B x N x K | registers | spills (B) | shared (KB) | occupancy |",
             "|---|---|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['kernel']} | {r['arch']} | {r['hidden']} | {r['num_warps']} | {r['block']} | "
                     f"{r['registers']} | {r['spill_bytes']} | {r['shared_bytes'] / 1024:.1f} | "
                     f"{r['occupancy']:.0%} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", default="64,128,256,512,1024", help="comma-separated hidden sizes")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    parser.add_argument("--readme", action="store_true", help="also put the table into README.md")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the interpreter does not compile kernels")
    rows = measure([int(h) for h in args.hidden.split(",") if h])
    command = " ".join(["python bench/triton_resources.py", *(sys.argv[1:] if argv is None else argv)])
    table = f"Command: `{command}` (ahead-of-time compile, Triton {triton_version()}, ptxas -v)\n\n" + format_table(rows)
    print(table)
    if args.readme:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from table import replace_readme_table  # bench/table.py
        replace_readme_table(table, start="<!-- bench:triton:start -->", end="<!-- bench:triton:end -->")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    bad = [r for r in rows if not r["ok"]]
    for r in bad:
        print(f"{r['kernel']} on {r['arch']}: {r['spill_bytes']} bytes spilled, {r['shared_bytes']} bytes shared "
              f"(limit {r['shared_limit']}), {r['noncoherent_loads']} non-coherent loads", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
