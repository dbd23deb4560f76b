"""GPU resources of the Triton kernels and their launch configs, compiled ahead of time
(no GPU needed).

    python bench/triton_resources.py [--json PATH] [--docs] [--write-configs]

Every kernel, variant (fp32, fp32 with TF32, bf16, fp16 weights) and candidate
config (``CANDIDATES`` in fused_rnn/triton/irnn.py and lstm.py) is compiled with
``triton.compile`` for sm_80 and sm_90, and ``ptxas -v`` on the generated PTX reports
registers per thread and spills; Triton's metadata gives the shared memory. A config
is usable when it spills nothing and its shared memory fits a block (163 KB on sm_80,
227 KB on sm_90) on both architectures, and its PTX never loads through the
non-coherent path (ld.global.nc): every step reads what the previous one stored.
Dispatch autotunes over the usable configs only: ``--write-configs`` writes them to
fused_rnn/triton/_configs.py. The sizes T, B, H are run-time arguments that Triton
never specializes (checked here), so one binary serves every hidden size and these
resources hold for all of them.

The occupancy estimate is resident warps per SM over the SM's maximum (64 on both),
from the register file (64K 32-bit registers per SM), the shared memory per SM (164
KB on sm_80, 228 KB on sm_90) and the 32-blocks-per-SM limit. Exits non-zero if a
config dispatch uses is not usable, if a kernel has no usable config for a variant,
or if _configs.py does not match this compile (with the Triton version it was
written with). Run without TRITON_INTERPRET (the interpreter cannot compile).
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS_FILE = REPO / "fused_rnn" / "triton" / "_configs.py"
ARCHS = {  # capability -> (ptxas arch, shared memory per block, per SM, in bytes)
    80: ("sm_80", 163 * 1024, 164 * 1024),
    90: ("sm_90a", 227 * 1024, 228 * 1024),
}
REGISTERS_PER_SM, MAX_WARPS_PER_SM, MAX_BLOCKS_PER_SM = 65536, 64, 32
SIZES = ("T", "B", "H")
# per kernel: the pointer arguments in the inputs' dtype (the rest are float32 state
# buffers), and the constexpr switches fixed at the values with the most code
KERNELS = {
    "irnn_scan_forward": ({"w"}, dict(HAS_H0=True)),
    "irnn_scan_backward": ({"dy", "dh_n", "y", "w"}, {}),
    "lstm_scan_forward": ({"w"}, dict(HAS_STATE=True)),
    "lstm_scan_backward": ({"dy", "dh_n", "w"}, dict(HAS_C0=True)),
}
# the per-sequence options' arguments, and their switches: every config is compiled
# with all of them off (the plain scan) and all on, and must fit both ways
OPTION_TYPES = {"lengths": "*i64", "clip": "fp32"}
OPTION_SWITCHES = ("HAS_MASK", "HAS_LENGTHS", "HAS_CLIP")
OPTIONS_SUFFIX = "+options"  # fused_rnn.triton.common.variant()


def ptxas_path() -> str:
    for candidate in (os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"):
        path = Path(candidate, "bin", "ptxas")
        if candidate and path.is_file():
            return str(path)
    found = shutil.which("ptxas")
    if found is None:
        raise SystemExit("ptxas not found: set CUDA_HOME or put the CUDA toolkit's bin on PATH")
    return found


def _kernels():
    from fused_rnn.triton import irnn, lstm
    for module, cell in ((irnn, "irnn"), (lstm, "lstm")):
        for direction in ("forward", "backward"):
            name = f"{cell}_scan_{direction}"
            yield name, getattr(module, f"SCAN_{direction.upper()}").kernel, module.CANDIDATES


def kernel_specs():
    """(kernel name, variant, config) for every kernel, variant and candidate config."""
    from fused_rnn.triton.common import VARIANTS
    for name, fn, candidates in _kernels():
        specialized = [p.name for p in fn.params if p.name in SIZES and not p.do_not_specialize]
        if specialized:  # a size of 1 would become a constant, and B = 1 would not compile
            raise SystemExit(f"{name}: size arguments {specialized} are specialized; add them to do_not_specialize")
        for kernel_variant in VARIANTS:
            for config in candidates:
                yield name, kernel_variant, tuple(config)


def compile_one(spec, capability, with_options=False):
    """Registers, spill bytes, shared bytes and non-coherent loads of one compile."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fused_rnn.triton.common import Config

    name, kernel_variant, config = spec
    config = Config(*config)
    fn = {n: f for n, f, _ in _kernels()}[name]
    io_args, switches = KERNELS[name]
    io = "*" + ("fp32" if kernel_variant == "tf32" else kernel_variant)
    constexprs = dict(switches, TF32=kernel_variant == "tf32", UPCAST=False, **config.constexprs())
    constexprs.update({flag: with_options for flag in OPTION_SWITCHES if flag in fn.arg_names})
    signature = {p.name: ("constexpr" if p.name in constexprs else "i32" if p.name in SIZES
                          else OPTION_TYPES.get(p.name) or (io if p.name in io_args else "*fp32")) for p in fn.params}
    kernel = triton.compile(ASTSource(fn, signature, constexprs=constexprs), target=GPUTarget("cuda", capability, 32),
                            options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    arch = ARCHS[capability][0]
    with tempfile.TemporaryDirectory() as folder:
        ptx = Path(folder, "kernel.ptx")
        ptx.write_text(kernel.asm["ptx"])
        report = subprocess.run([ptxas_path(), "-v", f"-arch={arch}", str(ptx), "-o", os.devnull],
                                capture_output=True, text=True, check=True).stderr
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", report))
    return registers, spills, kernel.metadata.shared, len(re.findall(r"ld\.global\.nc", kernel.asm["ptx"]))


def _compile_job(job):
    return compile_one(*job)


def triton_version() -> str:
    import triton
    return triton.__version__


def occupancy(registers: int, shared: int, num_warps: int, shared_per_sm: int) -> float:
    threads = 32 * num_warps
    by_registers = REGISTERS_PER_SM // max(1, registers * threads)
    by_shared = shared_per_sm // shared if shared else MAX_BLOCKS_PER_SM
    blocks = min(by_registers, by_shared, MAX_BLOCKS_PER_SM, MAX_WARPS_PER_SM // num_warps)
    return blocks * num_warps / MAX_WARPS_PER_SM


def measure(jobs: int = 2):
    """One row per kernel, variant, candidate config and architecture."""
    from fused_rnn.triton.common import Config

    specs = list(kernel_specs())
    work = [(spec, capability, options) for spec in specs for capability in ARCHS for options in (False, True)]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        results = list(pool.map(_compile_job, work, chunksize=4))
    rows = []
    for (spec, capability, options), (registers, spills, shared, nc_loads) in zip(work, results):
        name, kernel_variant, config = spec
        config = Config(*config)
        _, shared_limit, shared_per_sm = ARCHS[capability]
        # the options (mask, lengths, clip) switched on are a variant of their own
        rows.append({"kernel": name, "variant": kernel_variant + (OPTIONS_SUFFIX if options else ""),
                     "arch": f"sm_{capability}", "config": str(config),
                     "config_tuple": list(config), "num_warps": config.num_warps, "registers": registers,
                     "spill_bytes": spills, "shared_bytes": shared, "shared_limit": shared_limit,
                     "occupancy": occupancy(registers, shared, config.num_warps, shared_per_sm),
                     "noncoherent_loads": nc_loads,
                     "ok": spills == 0 and shared <= shared_limit and nc_loads == 0})
    return rows


def usable_configs(rows):
    """{(kernel, variant): [config tuples usable on every architecture, with and without
    the options, in candidate order]}."""
    usable = {}
    for r in rows:
        key, config = (r["kernel"], r["variant"]), tuple(r["config_tuple"])
        usable.setdefault(key, {}).setdefault(config, True)
        usable[key][config] &= r["ok"]
    return {key: [c for c, ok in configs.items() if ok] for key, configs in usable.items()}


def write_configs(usable, path: Path = CONFIGS_FILE) -> None:
    lines = [f"    {key!r}: (" + "".join(f"{c!r}, " for c in configs).rstrip() + "),"
             for key, configs in sorted(usable.items())]
    path.write_text('''"""Launch configs the Triton scans may be dispatched with: for each (kernel,
variant), the candidates of irnn.py / lstm.py that compiled for sm_80 and sm_90 with
no register spills, shared memory within a block's limit and no non-coherent loads,
as (BLOCK_B, BLOCK_N, BLOCK_K, num_warps, num_stages). Generated by
`python bench/triton_resources.py --write-configs`: do not edit."""

TRITON_VERSION = %r

DISPATCH = {
%s
}
''' % (triton_version(), "\n".join(lines)))


def current_dispatch():
    """(DISPATCH, the Triton version it was written with) from _configs.py."""
    from fused_rnn.triton import _configs
    return {key: [tuple(c) for c in configs] for key, configs in _configs.DISPATCH.items()}, _configs.TRITON_VERSION


def problems(rows, dispatch, written_with):
    """Why dispatch's configs cannot be trusted with this compile (empty: they can)."""
    usable = usable_configs(rows)
    found = []
    for key, configs in sorted(usable.items()):
        if not configs:
            found.append(f"{key[0]} [{key[1]}]: no candidate config is usable")
        for config in dispatch.get(key, []):
            if config not in configs:
                found.append(f"{key[0]} [{key[1]}]: dispatch config {config} spills or does not fit")
        if written_with == triton_version() and dispatch.get(key, []) != configs:
            found.append(f"{key[0]} [{key[1]}]: _configs.py lists {dispatch.get(key, [])}, this compile finds "
                         f"{configs} usable; run bench/triton_resources.py --write-configs")
    return found


def format_table(rows, dispatch) -> str:
    """The configs dispatch may use, sm_80 and sm_90 side by side, and what was excluded."""
    by_key = {(r["kernel"], r["variant"], tuple(r["config_tuple"]), r["arch"]): r for r in rows}
    lines = ["| kernel | variant | config | sm_80 regs / spills / shared KB / occupancy "
             "| sm_90 regs / spills / shared KB / occupancy |", "|---|---|---|---|---|"]
    excluded = []
    seen = []
    for r in rows:
        key = (r["kernel"], r["variant"], tuple(r["config_tuple"]))
        if key in seen:
            continue
        seen.append(key)
        if list(key[2]) not in [list(c) for c in dispatch.get(key[:2], [])]:
            if not all(by_key[key + (f"sm_{c}",)]["ok"] for c in ARCHS):
                excluded.append(f"{key[0]} [{key[1]}] {r['config']}")
            continue
        cells = []
        for capability in ARCHS:
            a = by_key[key + (f"sm_{capability}",)]
            cells.append(f"{a['registers']} / {a['spill_bytes']} / {a['shared_bytes'] / 1024:.1f} / "
                         f"{a['occupancy']:.0%}")
        lines.append(f"| {key[0]} | {key[1]} | {r['config']} | {cells[0]} | {cells[1]} |")
    lines.append("")
    lines.append(f"Config: BLOCK_B x BLOCK_N x BLOCK_K / warps / stages; `{OPTIONS_SUFFIX}`: the recurrent mask, "
                 f"lengths (and clip) switched on. Excluded from dispatch (spills or does not fit on sm_80 or "
                 f"sm_90), {len(excluded)} of {len(seen)}: " + ("; ".join(excluded) if excluded else "none") + ".")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    parser.add_argument("--docs", action="store_true", help="also put the table into docs/triton.md")
    parser.add_argument("--write-configs", action="store_true",
                        help=f"write the usable configs to {CONFIGS_FILE.relative_to(REPO)} (what dispatch tunes over)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the interpreter does not compile kernels")
    rows = measure(args.jobs)
    if args.write_configs:
        write_configs(usable_configs(rows))
    dispatch, written_with = ({k: list(v) for k, v in usable_configs(rows).items()}, triton_version()) \
        if args.write_configs else current_dispatch()
    command = " ".join(["python bench/triton_resources.py", *(sys.argv[1:] if argv is None else argv)])
    table = (f"Command: `{command}` (ahead-of-time compile, Triton {triton_version()}, ptxas -v; the same at every "
             f"H, a run-time argument)\n\n" + format_table(rows, dispatch))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from table import publish  # bench/table.py
    publish(table, "triton", args.docs)
    if args.json:
        args.json.write_text(json.dumps({"triton": triton_version(), "rows": rows,
                                         "dispatch": {f"{k[0]}[{k[1]}]": v for k, v in dispatch.items()}},
                                        indent=1))
    found = problems(rows, dispatch, written_with)
    for problem in found:
        print(problem, file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
