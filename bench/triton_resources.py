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
# the hidden-split kernels (fused_rnn/triton/split.py), likewise; their grid barrier's
# counter and error flag are int32
SPLIT_KERNELS = {
    "irnn_split_forward": ({"w_hh", "y", "low"}, {}),
    "irnn_split_backward": ({"dy", "dh_n", "y", "w_hh", "low"}, {}),
    "lstm_split_forward": ({"w_hh", "y", "low"}, dict(HAS_STATE=True)),
    "lstm_split_backward": ({"dy", "dh_n", "w_hh", "low"}, {}),
}
BARRIER = ("counter", "error")
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
    """(name, kernel, candidate configs, BLOCK_U values) of every kernel: the
    batch-tiled scans (no BLOCK_U) and the hidden-split ones (each BLOCK_U plan.py may
    choose: a config must fit at the BLOCK_U it runs with)."""
    from fused_rnn.triton import irnn, lstm, plan, split
    for module, cell in ((irnn, "irnn"), (lstm, "lstm")):
        for direction in ("forward", "backward"):
            name = f"{cell}_scan_{direction}"
            yield name, getattr(module, f"SCAN_{direction.upper()}").kernel, module.CANDIDATES, (None,)
    for name, fn in split.KERNELS.items():
        yield name, fn, split.CANDIDATES, plan.BLOCK_UNITS


def kernel_specs():
    """(kernel name, variant, config, BLOCK_U) for every kernel, variant, candidate
    config and BLOCK_U."""
    from fused_rnn.triton import split
    from fused_rnn.triton.common import VARIANTS
    for name, fn, candidates, block_units in _kernels():
        specialized = [p.name for p in fn.params if p.name in _sizes(name) and not p.do_not_specialize]
        if specialized:  # a size of 1 would become a constant, and B = 1 would not compile
            raise SystemExit(f"{name}: size arguments {specialized} are specialized; add them to do_not_specialize")
        for kernel_variant in VARIANTS:
            for config in candidates:
                for block_u in block_units:
                    if block_u is None or split.runs_on(kernel_variant, config, block_u):
                        yield name, kernel_variant, tuple(config), block_u


def _sizes(name):
    from fused_rnn.triton import split
    return split.SIZES if name in split.KERNELS else SIZES


def compile_kernel(spec, capability, with_options=False, unmasked=False):
    """triton.compile of one (kernel, variant, config, BLOCK_U) for sm_<capability>,
    with the per-sequence options switched on or off (`unmasked`: all but the
    recurrent mask): the compiled kernel and its config. (tests/test_triton_split.py
    reads the split kernels' PTX from here.)"""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fused_rnn.triton import split
    from fused_rnn.triton.common import Config

    name, kernel_variant, config, block_u = spec
    fn = {n: f for n, f, _, _ in _kernels()}[name]
    io = "*" + ("fp32" if kernel_variant == "tf32" else kernel_variant)
    if name in split.KERNELS:
        config = split.SplitConfig(*config)
        io_args, switches = SPLIT_KERNELS[name]
        switches = dict(switches, BLOCK_U=block_u, SPIN=split.SPIN_LIMIT)
        if "LOW" in fn.arg_names:  # the exchange copy in the weights' dtype when 16-bit (forward: no mask)
            switches["LOW"] = kernel_variant in ("bf16", "fp16") and not (with_options and not unmasked
                                                                           and "forward" in name)
        options = {"num_warps": config.num_warps, "num_stages": split.NUM_STAGES, "maxnreg": config.max_registers}
    else:
        config = Config(*config)
        io_args, switches = KERNELS[name]
        options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    constexprs = dict(switches, TF32=kernel_variant == "tf32", UPCAST=False, **config.constexprs())
    constexprs.update({flag: with_options for flag in OPTION_SWITCHES if flag in fn.arg_names})
    if unmasked:
        constexprs["HAS_MASK"] = False
    signature = {p.name: ("constexpr" if p.name in constexprs else "i32" if p.name in _sizes(name)
                          else OPTION_TYPES.get(p.name) or (io if p.name in io_args else "*i32" if p.name in BARRIER
                                                            else "*fp32")) for p in fn.params}
    kernel = triton.compile(ASTSource(fn, signature, constexprs=constexprs), target=GPUTarget("cuda", capability, 32),
                            options=options)
    return kernel, config


def compile_one(spec, capability, with_options=False):
    """Registers, spill bytes, shared bytes and forbidden loads of one compile: through
    the non-coherent path (ld.global.nc), and for the hidden-split kernels, whose
    programs read what other SMs stored, also L1-caching asynchronous copies
    (cp.async.ca, Triton's pipeliner's; a batch-tiled program reads only what it
    stored itself, through its own SM's L1)."""
    from fused_rnn.triton import split

    if with_options and spec[0] in split.KERNELS and "forward" in spec[0] and spec[1] in ("bf16", "fp16"):
        # the 16-bit split forward exchanges h in the weights' dtype unless a mask multiplies it first:
        # the options variant covers both kernels, with the mask (float32 exchange) and without
        both = [_resources(spec, capability, True, unmasked) for unmasked in (False, True)]
        return max(b[0] for b in both), sum(b[1] for b in both), max(b[2] for b in both), sum(b[3] for b in both)
    return _resources(spec, capability, with_options)


def _resources(spec, capability, with_options, unmasked=False):
    from fused_rnn.triton import split

    kernel, config = compile_kernel(spec, capability, with_options, unmasked)
    forbidden = r"ld\.global\.nc|cp\.async\.ca" if spec[0] in split.KERNELS else r"ld\.global\.nc"
    arch = ARCHS[capability][0]
    with tempfile.TemporaryDirectory() as folder:
        ptx = Path(folder, "kernel.ptx")
        ptx.write_text(kernel.asm["ptx"])
        report = subprocess.run([ptxas_path(), "-v", f"-arch={arch}", str(ptx), "-o", os.devnull],
                                capture_output=True, text=True, check=True).stderr
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", report))
    ptx = kernel.asm["ptx"]
    return registers, spills, kernel.metadata.shared, len(re.findall(forbidden, ptx))


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
    """One row per kernel, variant, candidate config, BLOCK_U and architecture."""
    from fused_rnn.triton import split
    from fused_rnn.triton.common import Config

    specs = list(kernel_specs())
    work = [(spec, capability, options) for spec in specs for capability in ARCHS for options in (False, True)]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        results = list(pool.map(_compile_job, work, chunksize=4))
    rows = []
    for (spec, capability, options), (registers, spills, shared, nc_loads) in zip(work, results):
        name, kernel_variant, config, block_u = spec
        config = split.SplitConfig(*config) if name in split.KERNELS else Config(*config)
        _, shared_limit, shared_per_sm = ARCHS[capability]
        # the options (mask, lengths, clip) switched on are a variant of their own
        rows.append({"kernel": name, "variant": kernel_variant + (OPTIONS_SUFFIX if options else ""),
                     "block_u": block_u, "arch": f"sm_{capability}", "config": str(config),
                     "config_tuple": list(config), "num_warps": config.num_warps, "registers": registers,
                     "spill_bytes": spills, "shared_bytes": shared, "shared_limit": shared_limit,
                     "occupancy": occupancy(registers, shared, config.num_warps, shared_per_sm),
                     "noncoherent_loads": nc_loads,
                     "ok": spills == 0 and shared <= shared_limit and nc_loads == 0})
    return rows


def _key(row):
    """A row's dispatch key: (kernel, variant) for the batch-tiled scans, (kernel,
    variant, BLOCK_U) for the hidden-split ones."""
    return (row["kernel"], row["variant"]) + (() if row.get("block_u") is None else (row["block_u"],))


def usable_configs(rows):
    """{key: [config tuples usable on every architecture, with and without the options,
    in candidate order]}, keys as _key's."""
    usable = {}
    for r in rows:
        key, config = _key(r), tuple(r["config_tuple"])
        usable.setdefault(key, {}).setdefault(config, True)
        usable[key][config] &= r["ok"]
    return {key: [c for c, ok in configs.items() if ok] for key, configs in usable.items()}


def _entries(usable, split: bool) -> str:
    return "\n".join(f"    {key!r}: (" + "".join(f"{c!r}, " for c in configs).rstrip() + "),"
                     for key, configs in sorted(usable.items()) if (len(key) == 3) == split)


CONFIGS_DOC = """Launch configs the Triton scans may be dispatched with: the candidates of irnn.py /
lstm.py / split.py that compiled for sm_80 and sm_90 with no register spills, shared
memory within a block's limit, no non-coherent loads (and for the split scans no
L1-caching asynchronous copies). DISPATCH, per (kernel, variant), the batch-tiled scans' (BLOCK_B, BLOCK_N,
BLOCK_K, num_warps, num_stages); SPLIT, per (kernel, variant, BLOCK_U), the
hidden-split scans' (BLOCK_B, BLOCK_K, num_warps). Generated by
`python bench/triton_resources.py --write-configs`: do not edit."""


def write_configs(usable, path: Path = CONFIGS_FILE) -> None:
    path.write_text(f'"""{CONFIGS_DOC}"""\n\nTRITON_VERSION = {triton_version()!r}\n\n'
                    f"DISPATCH = {{\n{_entries(usable, False)}\n}}\n\nSPLIT = {{\n{_entries(usable, True)}\n}}\n")


def current_dispatch():
    """({key: configs} of DISPATCH and SPLIT, the Triton version they were written with)
    from _configs.py."""
    from fused_rnn.triton import _configs
    both = {**_configs.DISPATCH, **_configs.SPLIT}
    return {key: [tuple(c) for c in configs] for key, configs in both.items()}, _configs.TRITON_VERSION


def _name(key) -> str:
    return f"{key[0]} [{key[1]}]" + (f" BLOCK_U={key[2]}" if len(key) == 3 else "")


def problems(rows, dispatch, written_with):
    """Why dispatch's configs cannot be trusted with this compile (empty: they can). A
    split kernel's BLOCK_U without a usable config is no problem as long as another
    BLOCK_U of it has one: plan.py then never chooses it."""
    usable = usable_configs(rows)
    found = []
    for key, configs in sorted(usable.items(), key=str):
        if not configs and (len(key) == 2 or not any(usable[k] for k in usable if k[:2] == key[:2])):
            found.append(f"{_name(key)}: no candidate config is usable")
        for config in dispatch.get(key, []):
            if config not in configs:
                found.append(f"{_name(key)}: dispatch config {config} spills or does not fit")
        if written_with == triton_version() and list(dispatch.get(key, [])) != configs:
            found.append(f"{_name(key)}: _configs.py lists {dispatch.get(key, [])}, this compile finds "
                         f"{configs} usable; run bench/triton_resources.py --write-configs")
    return found


def format_table(rows, dispatch) -> str:
    """The configs dispatch may use, sm_80 and sm_90 side by side, and what was excluded."""
    by_key = {_key(r) + (tuple(r["config_tuple"]), r["arch"]): r for r in rows}
    lines = ["| kernel | variant | config | sm_80 regs / spills / shared KB / occupancy "
             "| sm_90 regs / spills / shared KB / occupancy |", "|---|---|---|---|---|"]
    excluded = []
    seen = []
    for r in rows:
        key = _key(r) + (tuple(r["config_tuple"]),)
        if key in seen:
            continue
        seen.append(key)
        label = f"{key[0]}{' U' + str(key[2]) if len(key) == 4 else ''}"
        if list(key[-1]) not in [list(c) for c in dispatch.get(key[:-1], [])]:
            if not all(by_key[key + (f"sm_{c}",)]["ok"] for c in ARCHS):
                excluded.append(f"{label} [{key[1]}] {r['config']}")
            continue
        cells = []
        for capability in ARCHS:
            a = by_key[key + (f"sm_{capability}",)]
            cells.append(f"{a['registers']} / {a['spill_bytes']} / {a['shared_bytes'] / 1024:.1f} / "
                         f"{a['occupancy']:.0%}")
        lines.append(f"| {label} | {key[1]} | {r['config']} | {cells[0]} | {cells[1]} |")
    lines.append("")
    lines.append(f"Config: batch-tiled BLOCK_B x BLOCK_N x BLOCK_K / warps / stages; hidden-split (U: BLOCK_U, the "
                 f"units a program owns) BLOCK_B x BLOCK_K / warps, one stage (the K loop is pipelined by hand) and "
                 f"one program per SM. `{OPTIONS_SUFFIX}`: the recurrent mask, lengths (and clip) switched on. "
                 f"Excluded from dispatch (spills, does not fit, or loads through the non-coherent path, or for the "
                 f"hidden-split kernels an L1-caching asynchronous copy, on sm_80 or sm_90), "
                 f"{len(excluded)} of {len(seen)}: "
                 + ("; ".join(excluded) if excluded else "none") + ".")
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
                                         "dispatch": {_name(k): v for k, v in dispatch.items()}},
                                        indent=1))
    found = problems(rows, dispatch, written_with)
    for problem in found:
        print(problem, file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
