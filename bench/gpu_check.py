"""The whole GPU verification in one command: build, correctness, races, streams,
dispatch and timings, each stage in a process of its own under its own timeout.

    python bench/gpu_check.py [--skip-build] [--out-dir bench/results] [--budget-minutes 8]
    python bench/gpu_check.py --dry-run          # the same script end to end on the CPU

Stages (their times are printed; the report is written even when a stage fails or
runs out of time; the exit status is 0 only when every stage passed):

1. build: ``pip install --no-build-isolation --no-deps -e .`` with the CUDA build forced
   (a build without CUDA is refused, never silently CPU-only), for this GPU's arch;
   then the versions and ``available_backends("cuda")``.
2. correctness: every GPU backend (cuda, triton, nn) against the torch loop in float64
   on the same GPU (every option; fp32/bf16/fp16 inputs; outputs, final states and
   every gradient) on shapes that use many thread blocks (H in {1024, 2048, the largest
   H the persistent scans keep on chip}, B in {1, 5, 37, 64, 300}), against cuDNN in
   fp32 (TF32 off) where torch.nn has the call, and against the NumPy reference on a
   small shape.
3. determinism: ten repeated scans must be bitwise equal (a visibility race between
   blocks shows up as a changing result).
4. streams: a scan while a side stream runs large matrix products, and two scans on
   two streams at once, each result checked; a hang is turned into a failure by the
   stage's timeout.
5. dispatch: one Triton autotune and one measured dispatch, with what they chose.
6. timings: T = 256, inference and training, both cells, fp32 and bf16, B in {1, 8, 64,
   256}, H in {256, 1024}: every backend and auto against cuDNN (bench/harness.py: CUDA
   events, medians of same-round ratios), next to the performance model's prediction.
7. designs: the Triton backend's batch-tiled and hidden-split scans, each forced, in
   training at B in {1, 8, 64}, H in {256, 1024}, fp32 and bf16, against cuDNN and the
   model.

The report goes to OUT_DIR/gpu-<device>.md and .json. ``--dry-run`` runs every stage on
the CPU with tiny shapes (the Triton interpreter, the CUDA kernels on the CPU emulation
of tests/cuda_emulation, the nn and torch backends) and writes to a temporary folder
unless --out-dir is given: CI runs it, so that the script a GPU session depends on
cannot rot.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
# Wall-clock limits per stage, in seconds, on a GPU; their sum stays under 8 minutes
# with the build. A dry run uses its own (the interpreter and the emulation are slow).
STAGE_LIMITS = {"build": 150, "correctness": 110, "determinism": 25, "streams": 30, "dispatch": 25, "timings": 80,
                "designs": 60}
DRY_RUN_LIMITS = {"build": 30, "correctness": 240, "determinism": 60, "streams": 60, "dispatch": 120,
                  "timings": 120, "designs": 120}
STAGES = tuple(STAGE_LIMITS)


# ---------------------------------------------------------------------------
# the stages (each runs in a child process: `gpu_check.py --stage NAME`)

_STAGE_OUT = None  # the child's result file, rewritten as a stage makes progress


def save_partial(result) -> None:
    """Writes a stage's result so far: the driver reads it even if the stage then times out."""
    if _STAGE_OUT is not None:
        tmp = _STAGE_OUT.with_suffix(".tmp")
        tmp.write_text(json.dumps({"result": result}, default=str), encoding="utf-8")
        os.replace(tmp, _STAGE_OUT)

def _setup(dry_run: bool):
    if dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.path.insert(0, str(BENCH))
    sys.path.insert(0, str(ROOT / "python"))
    import torch

    import fused_rnn

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = "cpu" if dry_run else "cuda"
    return torch, fused_rnn, device


def stage_build(dry_run: bool) -> dict:
    import torch

    report = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}
    if not dry_run and not os.environ.get("FUSED_RNN_GPU_CHECK_SKIP_BUILD"):
        capability = torch.cuda.get_device_capability()
        arch = f"{capability[0]}{capability[1]}"
        env = dict(os.environ, FUSED_RNN_FORCE_CUDA_BUILD="TRUE", FUSED_RNN_CUDA_ARCHS=arch)
        build = subprocess.run([sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."],
                               cwd=ROOT, env=env, capture_output=True, text=True)
        if build.returncode != 0:
            raise RuntimeError("the build failed:\n" + (build.stdout + build.stderr)[-3000:])
    probe = subprocess.run([sys.executable, "-c", "import json, fused_rnn, triton; print(json.dumps("
                            "{'build_info': fused_rnn.build_info(), 'triton': triton.__version__, "
                            "'backends': fused_rnn.available_backends('cuda')}))"],
                           capture_output=True, text=True, cwd=tempfile.gettempdir())
    if probe.returncode != 0:
        raise RuntimeError("fused_rnn does not import: " + probe.stderr[-2000:])
    info = json.loads(probe.stdout.strip().splitlines()[-1])
    report.update(info)
    if not dry_run and not info["build_info"].get("cuda_compiled"):
        raise RuntimeError("fused_rnn was built without CUDA: refusing to check a CPU-only build on a GPU")
    if not dry_run:
        report["device"] = torch.cuda.get_device_name()
    return report


def _call(fused_rnn, cell, backend, x, state, weights, options):
    if cell == "irnn":
        return fused_rnn.irnn(x, state[0], *weights, backend=backend, **options)
    y, (h, c) = fused_rnn.lstm(x, state, *weights, backend=backend, **options)
    return y, h, c


def _problem(torch, cell, steps, batch, hidden, device, seed, inputs=None):
    g = torch.Generator().manual_seed(seed)
    gates = 1 if cell == "irnn" else 4
    inputs = inputs or min(hidden, 64)
    x = torch.randn(steps, batch, inputs, generator=g) * 0.5
    if cell == "irnn":  # a contracting recurrence
        w_hh = 0.9 * torch.eye(hidden) + torch.randn(hidden, hidden, generator=g) * (0.3 / hidden ** 0.5)
    else:
        w_hh = torch.randn(4 * hidden, hidden, generator=g) / hidden ** 0.5
    w_ih = torch.randn(gates * hidden, inputs, generator=g) / inputs ** 0.5
    b_ih, b_hh = (torch.randn(gates * hidden, generator=g) * 0.1 for _ in range(2))
    state = [torch.randn(batch, hidden, generator=g) * 0.5 for _ in range(1 if cell == "irnn" else 2)]
    mask = (torch.rand(batch, hidden, generator=g) > 0.25).float() / 0.75
    lengths = torch.randint(0, steps + 1, (batch,), generator=g)
    lengths[0] = steps
    tensors = {"x": x, "state": state, "weights": [w_ih, w_hh, b_ih, b_hh], "mask": mask, "lengths": lengths}
    return tensors


def _errors(torch, got, want):
    worst = 0.0
    for a, b in zip(got, want):
        scale = max(1.0, float(b.abs().max())) if b.numel() else 1.0
        worst = max(worst, float((a.double() - b.double()).abs().max()) / scale if b.numel() else 0.0)
    return worst


# max|got - want| / max(1, max|want|) over outputs and gradients, against the float64
# torch loop: fp32 sums in other orders (a 16-step recurrence stays near 1e-5; the
# harness's 1e-4 with margin for H = 2048 reductions); bf16/fp16 inputs and weights
# are rounded once and the kernels round the recurrent product's operands (units of
# 2^-8 and 2^-11 over 16 steps: tests/test_triton.py's measured bounds).
CHECK_TOLERANCE = {"float32": 2e-4, "bfloat16": 6e-2, "float16": 1e-2}


def stage_correctness(dry_run: bool) -> dict:
    torch, fused_rnn, device = _setup(dry_run)
    backends = ["triton", "nn"] + ([] if dry_run else ["cuda"])
    if dry_run:
        hiddens, batches, steps, dtypes = (12,), (1, 5), 3, ("float32",)
    else:
        largest = fused_rnn._C.cuda_max_hidden_on_chip(
            4, 4, torch.cuda.get_device_properties(0).multi_processor_count,
            torch.cuda.get_device_properties(0).shared_memory_per_block_optin)
        hiddens, batches, steps, dtypes = (1024, 2048, largest), (1, 5, 37, 64, 300), 16, \
            ("float32", "bfloat16", "float16")
    option_sets = {"plain": (), "mask+lengths": ("recurrent_mask", "lengths"), "clip": ("hidden_clip",)}
    rows, failures = [], []
    for cell in ("irnn", "lstm"):
        for hidden in hiddens:
            for batch in batches:
                if not dry_run and hidden >= 2048 and batch not in (1, 300):
                    continue  # the largest H at the two ends of the batch range keeps the stage in time
                p = _problem(torch, cell, steps, batch, hidden, device, seed=hidden + batch)
                for option_name, used in option_sets.items():
                    if "hidden_clip" in used and cell == "lstm":
                        continue
                    options = {}
                    if "recurrent_mask" in used:
                        options["recurrent_mask"] = p["mask"]
                    if "lengths" in used:
                        options["lengths"] = p["lengths"]
                    if "hidden_clip" in used:
                        options["hidden_clip"] = 1.0
                    # the oracle: the torch loop in float64 on the same device
                    leaves64 = [t.to(device, torch.float64).requires_grad_() for t in
                                [p["x"], *p["state"], *p["weights"]]]
                    opts64 = {k: (v.to(device, torch.float64) if k == "recurrent_mask" else v) for k, v in
                              options.items()}
                    n_state = len(p["state"])
                    want = _call(fused_rnn, cell, "torch", leaves64[0], leaves64[1:1 + n_state], leaves64[1 + n_state:],
                                 opts64)
                    want_grads = torch.autograd.grad(sum(o.sum() for o in want), leaves64)
                    for dtype_name in dtypes:
                        dtype = getattr(torch, dtype_name)
                        for backend in backends:
                            if backend == "nn" and {"recurrent_mask", "hidden_clip"} & set(used):
                                continue
                            try:
                                fused_rnn.select_backend(device, dtype, backend, cell=cell, hidden=hidden,
                                                         batch=batch, options=tuple(used))
                            except ValueError as error:
                                rows.append({"cell": cell, "H": hidden, "B": batch, "options": option_name,
                                             "dtype": dtype_name, "backend": backend, "skipped": str(error)})
                                continue
                            leaves = [t.to(device, dtype).requires_grad_() for t in [p["x"], *p["state"],
                                                                                      *p["weights"]]]
                            opts = {k: (v.to(device, dtype) if k == "recurrent_mask" else v) for k, v in
                                    options.items()}
                            try:
                                got = _call(fused_rnn, cell, backend, leaves[0], leaves[1:1 + n_state],
                                            leaves[1 + n_state:], opts)
                                grads = torch.autograd.grad(sum(o.float().sum() for o in got), leaves)
                                error = _errors(torch, [*got, *grads], [*want, *want_grads])
                                ok = error <= CHECK_TOLERANCE[dtype_name]
                            except Exception as exc:  # noqa: BLE001 - recorded as a failure
                                error, ok = None, False
                                rows.append({"error_text": f"{type(exc).__name__}: {exc}"})
                            row = {"cell": cell, "H": hidden, "B": batch, "options": option_name,
                                   "dtype": dtype_name, "backend": backend, "error": error, "ok": ok}
                            rows.append(row)
                            if not ok:
                                failures.append(row)
                save_partial({"rows": rows, "failures": failures, "complete": False})
    # cuDNN (fp32, TF32 off) and the NumPy reference as two more oracles
    import numpy as np

    import rnn_reference

    p = _problem(torch, "lstm", 7, 3, 16, device, seed=1, inputs=5)
    x64 = [t.double().numpy() for t in [p["x"], *p["state"], *p["weights"]]]
    y_ref, h_ref, c_ref, _ = rnn_reference.lstm_forward(*x64)
    module = torch.nn.LSTM(5, 16).to(device)
    with torch.no_grad():
        for name, t in zip(("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"), p["weights"]):
            getattr(module, name).copy_(t)
    y_nn, (h_nn, c_nn) = module(p["x"].to(device), tuple(s[None].to(device) for s in p["state"]))
    for backend in backends:
        got = _call(fused_rnn, "lstm", backend, p["x"].to(device), [s.to(device) for s in p["state"]],
                    [w.to(device) for w in p["weights"]], {})
        for oracle, want in (("numpy", (y_ref, h_ref, c_ref)),
                             ("cudnn" if not dry_run else "nn.LSTM", (y_nn, h_nn[0], c_nn[0]))):
            want = [torch.as_tensor(np.asarray(w.detach().cpu() if hasattr(w, "detach") else w)) for w in want]
            error = _errors(torch, [g.detach().cpu() for g in got], want)
            row = {"backend": backend, "oracle": oracle, "dtype": "float32", "error": error, "ok": error <= 1e-4}
            rows.append(row)
            if not row["ok"]:
                failures.append(row)
    # the single-step ops (cells), every dtype: one step of the same problems
    for cell in ("irnn", "lstm"):
        p = _problem(torch, cell, 1, 5 if dry_run else 37, 12 if dry_run else 1024, device, seed=11)
        leaves64 = [t.to(device, torch.float64).requires_grad_() for t in [p["x"][0], *p["state"], *p["weights"]]]
        n_state = len(p["state"])

        def step(backend, leaves, cell=cell, n_state=n_state):
            x, states, weights = leaves[0], leaves[1:1 + n_state], leaves[1 + n_state:]
            if cell == "irnn":
                return (fused_rnn.irnn_cell(x, states[0], *weights, backend=backend),)
            return fused_rnn.lstm_cell(x, tuple(states), *weights, backend=backend)

        want = step("torch", leaves64)
        want_grads = torch.autograd.grad(sum(o.sum() for o in want), leaves64)
        for dtype_name in dtypes:
            for backend in backends:
                if backend == "nn":
                    continue  # the cells' nn backend is torch.nn's own cell: the oracle's family
                leaves = [t.detach().to(dtype=getattr(torch, dtype_name)).requires_grad_() for t in leaves64]
                got = step(backend, leaves)
                grads = torch.autograd.grad(sum(o.float().sum() for o in got), leaves)
                error = _errors(torch, [*got, *grads], [*want, *want_grads])
                row = {"cell": cell + " step", "B": leaves[0].shape[0], "H": leaves[1].shape[1], "dtype": dtype_name,
                       "backend": backend, "error": error, "ok": error <= CHECK_TOLERANCE[dtype_name]}
                rows.append(row)
                if not row["ok"]:
                    failures.append(row)
    emulation = None
    if dry_run:  # the CUDA kernels have no GPU here: their CPU emulation against the NumPy reference
        # the fixed cases; the emulation's random ones (minutes) are the test suite's fuzz
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k",
                              "not random_scans", str(ROOT / "tests" / "test_cuda_emulation.py")], cwd=ROOT,
                             capture_output=True, text=True, timeout=600)
        emulation = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else run.stderr[-500:]
        if run.returncode != 0:
            failures.append({"backend": "cuda (emulated)", "log": (run.stdout + run.stderr)[-2000:]})
    if failures:
        raise AssertionError(f"{len(failures)} cases out of tolerance, first: {failures[:3]}")
    return {"cases": len([r for r in rows if "ok" in r]), "cuda_emulation": emulation, "rows": rows}


def stage_determinism(dry_run: bool) -> dict:
    torch, fused_rnn, device = _setup(dry_run)
    results = {}
    shapes = [("lstm", 3, 5, 12)] if dry_run else [("lstm", 64, 5, 1024), ("irnn", 64, 37, 2048)]
    for backend in (["triton"] if dry_run else ["cuda", "triton"]):
        for cell, steps, batch, hidden in shapes:
            p = _problem(torch, cell, steps, batch, hidden, device, seed=7)
            try:
                fused_rnn.select_backend(device, torch.float32, backend, cell=cell, hidden=hidden, batch=batch)
            except ValueError as error:
                results[f"{backend} {cell} H{hidden}"] = f"skipped: {error}"
                continue
            outputs = []
            for _ in range(10):
                y = _call(fused_rnn, cell, backend, p["x"].to(device), [s.to(device) for s in p["state"]],
                          [w.to(device) for w in p["weights"]], {})[0]
                outputs.append(y.detach().cpu())
            same = all(torch.equal(outputs[0], o) for o in outputs[1:])
            results[f"{backend} {cell} H{hidden}"] = "bitwise equal" if same else "DIFFERENT"
            if not same:
                raise AssertionError(f"{backend} {cell} H={hidden}: repeated scans differ (a race)")
    return results


def stage_streams(dry_run: bool) -> dict:
    torch, fused_rnn, device = _setup(dry_run)
    if dry_run:
        return {"skipped": "streams need a GPU"}
    report = {}
    for backend in ("cuda", "triton"):
        p = _problem(torch, "lstm", 32, 8, 1024, device, seed=3)
        args = (p["x"].cuda(), [s.cuda() for s in p["state"]], [w.cuda() for w in p["weights"]], {})
        want = _call(fused_rnn, "lstm", backend, *args)[0]
        side = torch.cuda.Stream()
        big = torch.randn(8192, 8192, device="cuda")
        with torch.cuda.stream(side):
            for _ in range(5):
                big = big @ big / 8192 ** 0.5
        got = _call(fused_rnn, "lstm", backend, *args)[0]
        torch.cuda.synchronize()
        report[f"{backend} beside matmuls"] = _errors(torch, [got], [want])
        s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
        with torch.cuda.stream(s1):
            a = _call(fused_rnn, "lstm", backend, *args)[0]
        with torch.cuda.stream(s2):
            b = _call(fused_rnn, "lstm", backend, *args)[0]
        torch.cuda.synchronize()
        report[f"{backend} two streams"] = max(_errors(torch, [a], [want]), _errors(torch, [b], [want]))
    bad = {k: v for k, v in report.items() if not v <= 1e-5}
    if bad:
        raise AssertionError(f"results changed under concurrency: {bad}")
    return report


def stage_dispatch(dry_run: bool) -> dict:
    torch, fused_rnn, device = _setup(dry_run)
    from fused_rnn.triton import irnn as triton_irnn

    report = {}
    p = _problem(torch, "irnn", 8, 4, 64 if not dry_run else 12, device, seed=5)
    if dry_run:  # the autotuner's trials under the interpreter need a stand-in timer
        triton_irnn.SCAN_FORWARD.do_bench = lambda kernel_call, quantiles: (kernel_call(), [1.0] * len(quantiles))[1]
    y = fused_rnn.irnn(p["x"].to(device), p["state"][0].to(device), *[w.to(device) for w in p["weights"]],
                       backend="triton")[0]
    tuners = list(triton_irnn.SCAN_FORWARD._autotuners.values())
    report["autotune"] = {"configs": len(tuners[0].configs) if tuners else 0,
                          "chose": str(getattr(tuners[0], "best_config", None)) if tuners else "one config"}
    with tempfile.TemporaryDirectory() as cache:
        os.environ["FUSED_RNN_CACHE_DIR"] = cache
        fused_rnn.set_measured_dispatch(True)
        y2 = fused_rnn.irnn(p["x"].to(device), p["state"][0].to(device), *[w.to(device) for w in p["weights"]])[0]
        choice = fused_rnn.select_backend(device, torch.float32, cell="irnn", hidden=p["weights"][1].shape[1],
                                          batch=p["x"].shape[1], training=False, steps=p["x"].shape[0])
        report["measured dispatch"] = {"chose": choice.name, "basis": choice.basis}
    report["agree"] = _errors(torch, [y2.detach().cpu()], [y.detach().cpu()])
    if not choice.basis.startswith("measured"):
        raise AssertionError(f"measured dispatch did not record a choice: {choice}")
    return report


def stage_timings(dry_run: bool) -> dict:
    torch, fused_rnn, device = _setup(dry_run)
    import gpu_model
    import harness

    if dry_run:
        configs = [harness.BenchConfig("T4-B2-H12", 4, 2, 12, 12, "")]
        dtypes = [torch.float32]
        plan = harness.TimingPlan(warmup_calls=1, rounds=1, min_round_seconds=0.0)
    else:
        configs = [harness.BenchConfig(f"T256-B{b}-H{h}", 256, b, h, h, "")
                   for b in (1, 8, 64, 256) for h in (256, 1024)]
        dtypes = [torch.float32, torch.bfloat16]
        plan = harness.TimingPlan(warmup_calls=2, rounds=5, min_round_seconds=0.01)
    model = gpu_model.GPUS["H100"]
    if not dry_run:
        name = torch.cuda.get_device_name().upper()
        model = gpu_model.GPUS[next((g for g in gpu_model.GPUS if g in name), "H100")]
    backends = ("cuda", "triton", "nn", "auto")
    machine, results, rows = harness.describe_machine(device), [], []
    for dtype in dtypes:  # a result per case as it comes: a stage that runs out of time keeps what it measured
        for cell in harness.CELLS:
            for config in configs:
                for mode in harness.MODES:
                    result = harness.run_case(cell, mode, config, backends, plan, device, dtype)
                    results.append(result)
                    predicted = gpu_model.predict(model, cell, result.dtype, mode, config.B, config.H,
                                                  steps=config.T)
                    rows.append({"cell": cell, "mode": mode, "dtype": result.dtype, "T": config.T, "B": config.B,
                                 "H": config.H, "measured": {n: result.speedup(n) for n in backends},
                                 "model": {n: predicted["nn"] / predicted[n] for n in ("cuda", "triton")},
                                 "cudnn_ms": result.median_ms(harness.BASELINE), "unavailable": result.unavailable})
                    report = harness.BenchReport(machine, plan, backends, tuple(results), "python bench/gpu_check.py")
                    save_partial({"table": harness.format_markdown(report), "rows": rows,
                                  "model_gpu": model.name, "complete": False})
    return {"table": harness.format_markdown(report), "rows": rows, "model_gpu": model.name, "complete": True}


def stage_designs(dry_run: bool) -> dict:
    """The Triton backend's two designs, each forced (FUSED_RNN_TRITON_DESIGN), against
    cuDNN: the batch-tiled scans and the hidden-split ones (fused_rnn/triton/split.py),
    next to the model's prediction of each."""
    torch, fused_rnn, device = _setup(dry_run)
    import gpu_model
    import harness
    from fused_rnn import _speedups

    if dry_run:
        configs, dtypes = [harness.BenchConfig("T4-B2-H12", 4, 2, 12, 12, "")], [torch.float32]
        plan = harness.TimingPlan(warmup_calls=1, rounds=1, min_round_seconds=0.0)
        model = gpu_model.GPUS["H100"]
    else:
        configs = [harness.BenchConfig(f"T256-B{b}-H{h}", 256, b, h, h, "") for b in (1, 8, 64) for h in (256, 1024)]
        dtypes = [torch.float32, torch.bfloat16]
        plan = harness.TimingPlan(warmup_calls=1, rounds=3, min_round_seconds=0.01)
        name = torch.cuda.get_device_name().upper()
        model = gpu_model.GPUS[next((g for g in gpu_model.GPUS if g in name), "H100")]
    rows = []
    for dtype in dtypes:
        for cell in harness.CELLS:
            for config in configs:
                row = {"cell": cell, "dtype": str(dtype).replace("torch.", ""), "B": config.B, "H": config.H}
                for design in ("tiled", "split"):
                    os.environ[_speedups.DESIGN_VARIABLE] = design
                    result = harness.run_case(cell, "training", config, ("triton",), plan, device, dtype)
                    row[design] = result.speedup("triton")
                predicted = gpu_model.predict(model, cell, row["dtype"], "training", config.B, config.H,
                                              steps=config.T)
                row["model"] = {"tiled": predicted["nn"] / predicted["triton"],
                                "split": predicted["nn"] / predicted["triton-split"]}
                rows.append(row)
                save_partial({"rows": rows, "complete": False})
    os.environ.pop(_speedups.DESIGN_VARIABLE, None)
    return {"rows": rows, "complete": True}


STAGE_FUNCTIONS = {"build": stage_build, "correctness": stage_correctness, "determinism": stage_determinism,
                   "streams": stage_streams, "dispatch": stage_dispatch, "timings": stage_timings,
                   "designs": stage_designs}


# ---------------------------------------------------------------------------
# the driver

def run_stage(name: str, dry_run: bool, limit: float, scratch: Path) -> dict:
    out = scratch / f"{name}.json"
    command = [sys.executable, __file__, "--stage", name, "--stage-out", str(out)] + (["--dry-run"] if dry_run else [])
    began = time.perf_counter()
    try:
        completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=limit)
        status = "passed" if completed.returncode == 0 else "FAILED"
        log = (completed.stdout + completed.stderr)[-4000:]
    except subprocess.TimeoutExpired as expired:
        status, log = "TIMED OUT", f"no result within {limit:.0f} s (a hang?)\n" + str(expired.stdout or "")[-2000:]
    seconds = time.perf_counter() - began
    result = json.loads(out.read_text()) if out.exists() else {}
    return {"stage": name, "status": status, "seconds": round(seconds, 1), "result": result.get("result"),
            "error": result.get("error") or (log if status != "passed" else None)}


def write_report(stages: list, out_dir: Path, dry_run: bool) -> Path:
    build = next((s["result"] for s in stages if s["stage"] == "build" and s["result"]), {}) or {}
    device = "cpu-dry-run" if dry_run else build.get("device", "unknown-gpu")
    slug = "".join(c if c.isalnum() else "-" for c in device.lower()).strip("-")[:40]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"gpu-{slug}.json").write_text(json.dumps(stages, indent=1, default=str) + "\n", encoding="utf-8")
    lines = [f"# GPU check: {device}", "",
             f"Command: `python bench/gpu_check.py{' --dry-run' if dry_run else ''}`; "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; torch {build.get('torch')}, "
             f"Triton {build.get('triton')}, CUDA {build.get('cuda')}", "",
             "| stage | status | seconds |", "|---|---|---:|"]
    lines += [f"| {s['stage']} | {s['status']} | {s['seconds']} |" for s in stages]
    for s in stages:
        if s["status"] != "passed" and s["error"]:
            lines += ["", f"## {s['stage']}: {s['status']}", "", "```", str(s["error"])[-3000:], "```"]
    timings = next((s["result"] for s in stages if s["stage"] == "timings" and s["result"]), None)
    if timings:
        lines += ["", timings["table"], "", "Measured against the model (speed-up over cuDNN; the model is "
                  "bench/gpu_model.py, a prediction):", "",
                  "| cell | mode | dtype | B | H | cuda measured / model | triton measured / model | auto |",
                  "|---|---|---|---:|---:|---:|---:|---:|"]
        def pair(r, name):
            m, p = r["measured"].get(name), r["model"].get(name)
            return f"{'-' if m is None else f'{m:.2f}'} / {'-' if p is None or p != p else f'{p:.2f}'}"

        for r in timings["rows"]:
            auto = r["measured"].get("auto")
            lines.append(f"| {r['cell']} | {r['mode']} | {r['dtype']} | {r['B']} | {r['H']} | {pair(r, 'cuda')} | "
                         f"{pair(r, 'triton')} | {'-' if auto is None else f'{auto:.2f}'} |")
    designs = next((s["result"] for s in stages if s["stage"] == "designs" and s["result"]), None)
    if designs:
        lines += ["", "The Triton backend's two designs, training, each forced, speed-up over cuDNN (measured / "
                  "the model's prediction):", "", "| cell | dtype | B | H | batch-tiled | hidden-split |",
                  "|---|---|---:|---:|---:|---:|"]
        for r in designs["rows"]:
            cells = [f"{'-' if r.get(d) is None else f'{r[d]:.2f}'} / {r['model'][d]:.2f}" for d in ("tiled", "split")]
            lines.append(f"| {r['cell']} | {r['dtype']} | {r['B']} | {r['H']} | {cells[0]} | {cells[1]} |")
    path = out_dir / f"gpu-{slug}.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/gpu_check.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="every stage on the CPU, tiny shapes")
    parser.add_argument("--skip-build", action="store_true", help="check the installed build as it is")
    parser.add_argument("--out-dir", type=Path, help="where the report goes (default: bench/results; a dry run: "
                                                     "a temporary folder)")
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset of " + ",".join(STAGES))
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("--stage-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stage:  # a child process: one stage, its result as JSON
        global _STAGE_OUT
        _STAGE_OUT = args.stage_out
        try:
            payload = {"result": STAGE_FUNCTIONS[args.stage](args.dry_run)}
            code = 0
        except Exception as error:  # noqa: BLE001 - reported, not raised: the driver goes on
            partial = json.loads(args.stage_out.read_text()) if args.stage_out.exists() else {}
            payload = {"result": partial.get("result"),
                       "error": f"{type(error).__name__}: {error}\n{traceback.format_exc()[-3000:]}"}
            code = 1
        args.stage_out.write_text(json.dumps(payload, default=str), encoding="utf-8")
        return code
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            print("gpu_check: torch sees no CUDA device; use --dry-run on a machine without one", file=sys.stderr)
            return 2
    limits = DRY_RUN_LIMITS if args.dry_run else STAGE_LIMITS
    wanted = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(wanted) - set(STAGES))
    if unknown:
        print(f"gpu_check: --stages: unknown stage(s) {', '.join(unknown)}; expected a subset of {','.join(STAGES)}",
              file=sys.stderr)
        return 2
    if args.skip_build or args.dry_run:
        limits = dict(limits, build=60)  # the build stage then only reads the versions
    stages = []
    with tempfile.TemporaryDirectory() as scratch:
        for name in wanted:
            if name == "build" and args.skip_build and not args.dry_run:
                os.environ["FUSED_RNN_GPU_CHECK_SKIP_BUILD"] = "1"
            stage = run_stage(name, args.dry_run, limits[name], Path(scratch))
            stages.append(stage)
            print(f"gpu_check: {name}: {stage['status']} in {stage['seconds']} s", flush=True)
            if name == "build" and stage["status"] != "passed":
                break  # nothing else can run without the build
    out_dir = args.out_dir or (Path(tempfile.mkdtemp(prefix="gpu-check-")) if args.dry_run else BENCH / "results")
    path = write_report(stages, out_dir, args.dry_run)
    print(path.read_text(encoding="utf-8")[-6000:])
    print(f"gpu_check: report written to {path}")
    return 0 if all(s["status"] == "passed" for s in stages) else 1


if __name__ == "__main__":
    sys.exit(main())
