"""backend="auto": torch.nn's kernels unless a fused backend is measured faster on this
device (measured dispatch, cached on disk) or predicted clearly faster (the tables of
fused_rnn._speedup_tables), and the fused kernels for options torch.nn has not."""

import itertools
import json
import multiprocessing
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fused_rnn
from fused_rnn import _measure, _speedup_tables, _speedups, dispatch

HAS_CPP = "cpp" in fused_rnn.available_backends("cpu")
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason="the cpp backend is not built")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """Measured dispatch on, with a cache of this test's own."""
    monkeypatch.setenv(_measure.CACHE_DIR_VARIABLE, str(tmp_path))
    monkeypatch.setattr(_measure, "_enabled", True)
    monkeypatch.setattr(_measure, "_memory", {})
    return tmp_path


@pytest.fixture
def predictions(monkeypatch):
    """Replace the CPU predictions with a table of the test's own."""
    def use(table):
        monkeypatch.setattr(_speedup_tables, "CPU", table)
    return use


# ---- predicted ----

@needs_cpp
def test_a_prediction_must_clear_the_margin(predictions):
    predictions({("irnn", "inference", "float32", 64, 256): {"cpp": 1.29},
                 ("irnn", "training", "float32", 64, 256): {"cpp": 1.31}})
    call = dict(cell="irnn", hidden=256, batch=64)
    choice = fused_rnn.select_backend("cpu", torch.float32, training=False, **call)
    assert choice.name == "nn" and "below the 1.3x" in choice.skipped["cpp"]
    choice = fused_rnn.select_backend("cpu", torch.float32, training=True, **call)
    assert choice.name == "cpp" and choice.basis.startswith("predicted 1.31x")
    # unknown mode: the lower of the two predictions
    assert fused_rnn.select_backend("cpu", torch.float32, **call).name == "nn"


@needs_cpp
def test_the_bar_is_the_clear_win_over_auto_s_own_route_to_torch_nn(predictions):
    """Where the table measured the functional API's route to torch.nn's kernels (the
    "nn" backend, with the argument checks and dispatch around them) clearly slower than
    torch.nn's module, a fused kernel clearly faster than that route is taken; a route
    within SLOW_ROUTE of the module's speed (noise), or faster, leaves the bar at
    CLEAR_WIN, and so does a call whose length or mode is unknown."""
    call = dict(cell="irnn", hidden=256, batch=1, steps=1, training=False)
    key = ("irnn", "inference", "float32", 1, 256, 1)
    predictions({key: {"cpp": 1.12, "nn": 0.8}})
    choice = fused_rnn.select_backend("cpu", torch.float32, **call)
    assert choice.name == "cpp" and "above the 1.04x bar" in choice.basis and "0.80x" in choice.basis
    predictions({key: {"cpp": 1.12, "nn": 0.88}})
    choice = fused_rnn.select_backend("cpu", torch.float32, **call)
    assert choice.name == "nn" and "below the 1.14x" in choice.skipped["cpp"] and "0.88x" in choice.skipped["cpp"]
    predictions({key: {"cpp": 1.25, "nn": 0.95}})  # a route within the noise: the bar stays 1.3x
    choice = fused_rnn.select_backend("cpu", torch.float32, **call)
    assert choice.name == "nn" and "below the 1.3x a prediction must show" in choice.skipped["cpp"]
    predictions({key: {"cpp": 1.35, "nn": 1.1}})  # a route faster than the module never raises the bar
    assert fused_rnn.select_backend("cpu", torch.float32, **call).name == "cpp"
    predictions({key: {"cpp": 1.12, "nn": 0.8}})
    assert fused_rnn.select_backend("cpu", torch.float32, cell="irnn", hidden=256, batch=1, steps=1).name == "nn"
    assert fused_rnn.select_backend("cpu", torch.float32, cell="irnn", hidden=256, batch=1,
                                    training=False).name == "nn"


@needs_cpp
def test_a_module_keeps_the_plain_bar(predictions, monkeypatch):
    """A module reaches torch.nn's kernels in one call for its whole stack, as fast as
    torch.nn's own module: the lowered bar of a layer call is not its own, and a call
    the functional API would give the fused kernel runs on torch.nn's kernels there."""
    from fused_rnn import nn_backend

    predictions({("irnn", "inference", "float32", 1, 256, 1): {"cpp": 1.12, "nn": 0.8}})
    calls = []
    real = nn_backend.run_stack
    monkeypatch.setattr(nn_backend, "run_stack", lambda *args: calls.append(1) or real(*args))
    module = fused_rnn.IRNN(42, 256)
    with torch.no_grad():
        module(torch.randn(1, 1, 42))
    assert calls == [1]
    assert fused_rnn.select_backend("cpu", torch.float32, cell="irnn", hidden=256, batch=1, steps=1,
                                    training=False).name == "cpp"


@needs_cpp
def test_a_module_reads_its_own_route_to_the_kernel(predictions, monkeypatch):
    """Where the table times the drop-in module on the fused kernel ("module"), a
    module's auto reads that instead of the functional call's "cpp": its per-layer path
    adds Python around each layer call, which at a single step of one row is most of it."""
    from fused_rnn import nn_backend

    calls = []
    real = nn_backend.run_stack
    monkeypatch.setattr(nn_backend, "run_stack", lambda *args: calls.append(1) or real(*args))
    key = ("irnn", "inference", "float32", 1, 256, 1)
    for via_module, whole_stack_calls in ((0.9, [1]), (1.4, [])):
        predictions({key: {"cpp": 1.45, "nn": 0.98, "module": via_module}})
        calls.clear()
        with torch.no_grad():
            fused_rnn.IRNN(42, 256)(torch.randn(1, 1, 42))
        assert calls == whole_stack_calls, via_module
        # the functional call reads "cpp" either way
        assert fused_rnn.select_backend("cpu", torch.float32, cell="irnn", hidden=256, batch=1, steps=1,
                                        training=False).name == "cpp"
    module_choice = dispatch.auto_choice(torch.device("cpu"), torch.float32, "irnn", 256, 1, (), False, 1,
                                         layer_route=False)
    assert module_choice.name == "cpp" and "through a module" in module_choice.basis


@needs_cpp
def test_a_module_chooses_once_for_its_layers(predictions, monkeypatch):
    """A module whose auto takes a fused kernel on the CPU hands each layer call that
    backend by name, so the layer calls do not choose again; under autocast (another
    dtype's choice) they do."""
    from fused_rnn import functional

    predictions({("lstm", "inference", "float32", 1, 256, 1): {"cpp": 3.0, "nn": 1.0, "module": 2.0}})
    layer_choices = []
    real = functional.auto_choice
    monkeypatch.setattr(functional, "auto_choice", lambda *args, **kw: layer_choices.append(1) or real(*args, **kw))
    module = fused_rnn.LSTM(42, 256, num_layers=2)
    x = torch.randn(1, 1, 42)
    with torch.no_grad():
        y, (h_n, c_n) = module(x)
        assert layer_choices == []
        reference = fused_rnn.LSTM(42, 256, num_layers=2, backend="cpp")
        reference.load_state_dict(module.state_dict())
        want = reference(x)
        torch.testing.assert_close((y, (h_n, c_n)), want, rtol=0, atol=0)
        with torch.autocast("cpu", torch.bfloat16):
            module(x)
    assert len(layer_choices) == 2


@needs_cpp
def test_only_a_nearby_shape_predicts(predictions):
    predictions({("lstm", "training", "float32", 64, 256): {"cpp": 2.0}})
    near = fused_rnn.select_backend("cpu", torch.float32, cell="lstm", hidden=512, batch=32, training=True)
    assert near.name == "cpp"
    far = fused_rnn.select_backend("cpu", torch.float32, cell="lstm", hidden=2048, batch=64, training=True)
    assert far.name == "nn" and "no prediction" in far.skipped["cpp"]
    other_dtype = fused_rnn.select_backend("cpu", torch.float64, cell="lstm", hidden=256, batch=64, training=True)
    assert other_dtype.name == "nn"


@needs_cpp
def test_options_torch_nn_has_not_go_to_the_fused_kernels(predictions):
    predictions({})
    for options in [("recurrent_mask",), ("hidden_clip",), ("recurrent_mask", "lengths")]:
        choice = fused_rnn.select_backend("cpu", torch.float32, cell="irnn", hidden=8, batch=2, options=options)
        assert choice.name == "cpp" and "does not implement" in choice.skipped["nn"], options
    for options in [("lengths",), ("proj_size",)]:
        assert fused_rnn.select_backend("cpu", torch.float32, cell="lstm", hidden=8, batch=2,
                                        options=options).name == "nn", options


@needs_cpp
def test_the_shipped_cpu_predictions_keep_auto_at_least_as_fast_as_torch_nn():
    """Every tabulated case where the fused kernel lost to torch.nn goes to torch.nn's
    kernels, and every clear win to the fused kernel (the CPU benchmark table, measured;
    the README's auto column is its result)."""
    for (cell, mode, dtype, batch, hidden, steps), speedups in _speedup_tables.CPU.items():
        choice = fused_rnn.select_backend("cpu", getattr(torch, dtype), cell=cell, hidden=hidden, batch=batch,
                                          training=mode == "training", steps=steps)
        route = speedups.get("nn", 1.0)
        bar = dispatch.CLEAR_WIN * (route if route <= dispatch.SLOW_ROUTE else 1.0)
        expected = "cpp" if speedups["cpp"] >= bar else "nn"
        assert choice.name == expected, (cell, mode, batch, hidden, speedups, choice)


@needs_cpp
def test_the_sequence_length_picks_the_nearest_row_and_unknown_takes_the_lower(predictions):
    """A CPU table with rows at two sequence lengths: a call takes the row nearest its
    own length; a call whose length is unknown takes the lower prediction of the two."""
    predictions({("lstm", "training", "float32", 64, 256, 8): {"cpp": 0.9},
                 ("lstm", "training", "float32", 64, 256, 64): {"cpp": 1.5}})
    call = dict(cell="lstm", hidden=256, batch=64, training=True)
    assert fused_rnn.select_backend("cpu", torch.float32, steps=10, **call).name == "nn"
    assert fused_rnn.select_backend("cpu", torch.float32, steps=100, **call).name == "cpp"
    assert fused_rnn.select_backend("cpu", torch.float32, **call).name == "nn"


# ---- measured ----

@needs_cpp
def test_measured_dispatch_times_once_and_reuses_the_winner(cache, monkeypatch):
    timed = []
    real = _measure._seconds
    monkeypatch.setattr(_measure, "_seconds", lambda step, device: timed.append(1) or real(step, device))
    x, w_ih, w_hh = torch.randn(5, 3, 4), torch.randn(6, 4), torch.eye(6)
    y_first, _ = fused_rnn.irnn(x, None, w_ih, w_hh)
    assert len(timed) == 3  # cpp, nn and the torch loop, each timed once
    files = list(cache.glob("dispatch-*.json"))
    assert len(files) == 1
    stored = json.loads(files[0].read_text())
    (key, entry), = stored["choices"].items()
    assert key.startswith("irnn|float32|inference|B4|H6|T4|") and entry["backend"] in ("cpp", "nn", "torch")
    assert stored["environment"]["fused_rnn"] == fused_rnn.__version__
    y_again, _ = fused_rnn.irnn(x, None, w_ih, w_hh)
    assert len(timed) == 3  # the cached winner, no new timing
    torch.testing.assert_close(y_again, y_first, rtol=1e-5, atol=1e-6)  # float32, any backend
    choice = fused_rnn.select_backend("cpu", torch.float32, cell="irnn", hidden=6, batch=3, training=False,
                                      steps=5)
    assert choice.name == entry["backend"] and choice.basis.startswith("measured")
    # another batch bucket, training, and another length bucket are other kinds of call
    fused_rnn.irnn(torch.randn(5, 40, 4), None, w_ih, w_hh)
    fused_rnn.irnn(x, None, w_ih.requires_grad_(), w_hh)
    fused_rnn.irnn(torch.randn(64, 3, 4), None, w_ih.detach(), w_hh)
    assert len(timed) == 12
    assert len(json.loads(files[0].read_text())["choices"]) == 4


@needs_cpp
def test_the_cache_serves_another_process_and_a_changed_environment_does_not(cache):
    fused_rnn.lstm(torch.randn(4, 2, 3), None, torch.randn(20, 3), torch.randn(20, 5))
    probe = textwrap.dedent("""
        import torch, fused_rnn
        torch.set_num_threads(1)  # as this process (conftest.py): the thread count is part of the key
        fused_rnn.set_measured_dispatch(True)
        print(fused_rnn.select_backend("cpu", torch.float32, cell="lstm", hidden=5, batch=2, training=False,
                                       steps=4).basis)
    """)
    env = dict(__import__("os").environ, **{_measure.CACHE_DIR_VARIABLE: str(cache)})
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and result.stdout.startswith("measured"), result.stdout + result.stderr
    # a new torch, Triton, driver or package version, or another device: another cache
    real = _measure.environment
    changed = dict(real(torch.device("cpu")), fused_rnn="0.0.0-other")
    _measure._memory.clear()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_measure, "environment", lambda device: changed)
        choice = fused_rnn.select_backend("cpu", torch.float32, cell="lstm", hidden=5, batch=2, training=False,
                                          steps=4)
    assert not choice.basis.startswith("measured")


@needs_cpp
def test_clear_dispatch_cache(cache):
    fused_rnn.irnn(torch.randn(3, 2, 4), None, torch.randn(5, 4), torch.eye(5))
    assert list(cache.glob("dispatch-*.json"))
    assert fused_rnn.clear_dispatch_cache() == 1
    assert not list(cache.glob("dispatch-*.json"))
    choice = fused_rnn.select_backend("cpu", torch.float32, cell="irnn", hidden=5, batch=2, training=False,
                                      steps=3)
    assert not choice.basis.startswith("measured")


def _store_many(directory, worker, keys):
    import os
    os.environ[_measure.CACHE_DIR_VARIABLE] = directory
    for k in range(keys):
        _measure._store(_measure.cache_file(torch.device("cpu")), f"key-{worker}-{k}",
                        {"backend": "nn", "timings": ""}, torch.device("cpu"))


def test_concurrent_writers_lose_nothing(cache):
    """Four processes storing measurements into the one cache file at once: the lock
    and the merge keep every entry, and the file is always valid JSON."""
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_store_many, args=(str(cache), w, 15)) for w in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=240)
        assert worker.exitcode == 0
    (path,) = cache.glob("dispatch-*.json")
    choices = json.loads(path.read_text())["choices"]
    assert set(choices) == {f"key-{w}-{k}" for w in range(4) for k in range(15)}


def test_a_backend_whose_results_disagree_is_left_out(cache):
    results = {"nn": [torch.ones(3)], "cpp": [torch.ones(3) * 2], "torch": [torch.ones(3)]}
    with pytest.warns(RuntimeWarning, match="cpp"):
        winner = _measure.measure(torch.device("cpu"), torch.float32, "irnn", 3, 2, (), False,
                                  ["nn", "cpp", "torch"], lambda name: results[name])
    assert winner in ("nn", "torch")


def test_measured_dispatch_is_off_unless_asked(monkeypatch):
    monkeypatch.setattr(_measure, "_enabled", _measure._enabled)  # restored after the test
    monkeypatch.delenv(_measure.ENVIRONMENT_VARIABLE, raising=False)
    fused_rnn.set_measured_dispatch(None)
    assert not fused_rnn.measured_dispatch_enabled()
    monkeypatch.setenv(_measure.ENVIRONMENT_VARIABLE, "1")
    assert not fused_rnn.measured_dispatch_enabled()  # the environment is read at import, and on None
    fused_rnn.set_measured_dispatch(None)
    assert fused_rnn.measured_dispatch_enabled()
    fused_rnn.set_measured_dispatch(False)
    assert not fused_rnn.measured_dispatch_enabled()
    monkeypatch.setenv(_measure.ENVIRONMENT_VARIABLE, "0")
    fused_rnn.set_measured_dispatch(None)
    assert not fused_rnn.measured_dispatch_enabled()
    # a fresh process reads it as it starts
    env = {**os.environ, _measure.ENVIRONMENT_VARIABLE: "1"}
    out = subprocess.run([sys.executable, "-c", "import fused_rnn; print(fused_rnn.measured_dispatch_enabled())"],
                         env=env, capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.strip() == "True"


@needs_cpp
def test_a_named_backend_s_memoised_answer_follows_the_install(monkeypatch):
    """A named CPU backend's eligibility is memoised with auto's choices, and made again
    when what it depends on changes (here: the compiled extension going missing)."""
    call = dict(cell="irnn", hidden=8, batch=2, steps=3, training=False)
    assert fused_rnn.select_backend("cpu", torch.float32, "cpp", **call).name == "cpp"
    monkeypatch.setattr(dispatch, "_missing_requirement", lambda name: "no kernels here" if name == "cpp" else None)
    with pytest.raises(ValueError, match="no kernels here"):
        fused_rnn.select_backend("cpu", torch.float32, "cpp", **call)


# ---- on a GPU: the model's predictions, and a refused cooperative launch ----

def test_the_model_sends_small_batches_to_the_persistent_scans(monkeypatch):
    """The shipped GPU predictions (bench/gpu_model.py, a model) on an H100: a fused
    backend where one is predicted clearly faster than cuDNN (one sequence), torch.nn's
    kernels (cuDNN) for large batches."""
    from fused_rnn import _speedups

    monkeypatch.setattr(dispatch, "_missing_requirement", lambda name: None)
    monkeypatch.setattr(dispatch, "_cuda_scan_reason", lambda *args: None)
    monkeypatch.setattr(_speedups, "gpu_class", lambda device: "H100")
    small = fused_rnn.select_backend("cuda", torch.float32, cell="lstm", hidden=256, batch=1, training=True)
    # the fastest predicted fused backend: the CUDA scans or the Triton backend's hidden-split scans
    assert small.name in ("cuda", "triton") and small.basis.startswith("predicted") and "model" in small.basis
    other = "triton" if small.name == "cuda" else "cuda"
    assert f"less than {small.name}" in small.skipped[other]
    with_mask = fused_rnn.select_backend("cuda", torch.float32, cell="lstm", hidden=256, batch=1, training=True,
                                         options=("recurrent_mask",))
    assert with_mask.name == small.name  # both designs take the options: the ranking stays
    large = fused_rnn.select_backend("cuda", torch.float32, cell="lstm", hidden=1024, batch=256, training=True)
    assert large.name == "nn" and "below the 1.3x" in large.skipped["cuda"]
    monkeypatch.setattr(_speedups, "gpu_class", lambda device: None)  # a GPU the model has no figures for
    unknown = fused_rnn.select_backend("cuda", torch.float32, cell="lstm", hidden=256, batch=1, training=True)
    assert unknown.name == "nn" and "no prediction" in unknown.skipped["cuda"]


def test_a_refused_cooperative_launch_falls_back_to_the_next_backend(monkeypatch):
    """The persistent scans need every block resident; when the device refuses the
    cooperative launch at run time, "auto" runs the call on the next backend, warns,
    and an explicit backend="cuda" still raises."""
    from fused_rnn import functional

    real = functional._irnn_on

    def refusing(name, *args):
        if name == "cuda":
            raise RuntimeError(functional.COOPERATIVE_REFUSED + " (IRNN scan): too many blocks")
        return real(name, *args)

    monkeypatch.setattr(functional, "_irnn_on", refusing)
    # as if dispatch had chosen the CUDA scans (this machine may have no GPU)
    monkeypatch.setattr(functional, "_backend_for",
                        lambda cell, backend, *rest: "cuda" if backend in ("auto", "cuda") else backend)
    x, w_ih, w_hh = torch.randn(4, 2, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64), \
        torch.eye(5, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="cooperative launch refused.*runs on backend 'nn'"):
        y, _ = fused_rnn.irnn(x, None, w_ih, w_hh)
    want, _ = fused_rnn.irnn(x, None, w_ih, w_hh, backend="torch")
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)  # float64: only the summation order differs
    with pytest.raises(RuntimeError, match="cooperative launch refused"):
        fused_rnn.irnn(x, None, w_ih, w_hh, backend="cuda")


def test_rows_per_pass_are_the_models_fastest():
    """csrc/cuda/persistent_plan.h picks the persistent scans' rows per pass by a rule;
    bench/gpu_model.py (a model) times every candidate. On each GPU the model knows, for
    both cells, fp32 and bf16, both directions and the model's batch and hidden sizes,
    the plan (fused_rnn._C, the launcher's own arithmetic) and the model agree on the
    split, and the plan's rows are the model's fastest or within 3% of it."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import gpu_model

    checked = exact = 0
    for gpu in gpu_model.GPUS.values():
        for cell, dtype, backward in itertools.product(("irnn", "lstm"), ("float32", "bfloat16"), (False, True)):
            for batch, hidden in itertools.product((1, 2, 3, 5, 8, 37, 64, 256, 1024), gpu_model.HIDDENS):
                plan = fused_rnn._C.cuda_scan_plan(gpu_model.GATES[cell], gpu_model.BYTES[dtype], hidden, backward,
                                                   gpu.sms, gpu.smem_kb * 1024, batch)
                units, blocks, rows, fits = gpu_model.persistent_plan(gpu, cell, dtype, hidden, backward, batch)
                assert (units, blocks, rows, fits) == (plan["units"], plan["blocks"], plan["rows"], plan["fits"])
                if fits:  # within 3% of the model's fastest rows (the plan's issue count is GPU-agnostic)
                    fastest = gpu_model.fastest_rows(gpu, cell, dtype, batch, hidden, backward)
                    ours = gpu_model.persistent_step_us(gpu, cell, dtype, batch, hidden, backward, rows)
                    best = gpu_model.persistent_step_us(gpu, cell, dtype, batch, hidden, backward, fastest)
                    assert ours <= 1.03 * best, (gpu.name, cell, dtype, backward, batch, hidden, rows, fastest)
                    exact += rows == fastest
                    checked += 1
    assert checked > 500 and exact >= 0.9 * checked


def test_a_row_exactly_nearest_away_still_predicts(monkeypatch):
    """A tabulated shape exactly NEAREST (4x) away in batch or hidden size stands for the
    call (the rows are kept as logarithms, whose difference may exceed log 4 by an ulp)."""
    table = {("irnn", "inference", "float32", 64, 256, 64): {"cpp": 2.0}}
    monkeypatch.setattr(_speedup_tables, "CPU", table)
    cpu = torch.device("cpu")
    for batch, hidden in ((16, 256), (256, 256), (64, 64), (64, 1024)):
        assert _speedups.predicted("cpp", cpu, torch.float32, "irnn", hidden, batch, False) == 2.0, (batch, hidden)
    for batch, hidden in ((15, 256), (257, 256), (64, 63), (64, 1025)):
        assert _speedups.predicted("cpp", cpu, torch.float32, "irnn", hidden, batch, False) is None, (batch, hidden)


def test_auto_memo_follows_a_swapped_table_and_hands_out_copies(monkeypatch):
    """auto's memoised CPU choice is made again when the table it came from is swapped,
    each caller gets its own `skipped` to change, and options may be any sequence."""
    if "cpp" not in fused_rnn.available_backends("cpu"):
        pytest.skip("the cpp backend is not built")
    call = dict(cell="irnn", hidden=256, batch=64, training=False, steps=64)
    fast = {("irnn", "inference", "float32", 64, 256, 64): {"cpp": 2.0}}
    slow = {("irnn", "inference", "float32", 64, 256, 64): {"cpp": 0.5}}
    monkeypatch.setattr(_speedup_tables, "CPU", fast)
    first = dispatch.select_backend("cpu", torch.float32, **call)
    assert first.name == "cpp"
    first.skipped.clear()
    again = dispatch.select_backend("cpu", torch.float32, **call)
    assert again.name == "cpp" and "nn" in again.skipped  # the memo kept its own copy
    monkeypatch.setattr(_speedup_tables, "CPU", slow)
    assert dispatch.select_backend("cpu", torch.float32, **call).name == "nn"
    assert dispatch.select_backend("cpu", torch.float32, options=["lengths"], **call).name in ("cpp", "nn")


def test_a_bfloat16_table_run_keeps_the_float32_predictions(tmp_path):
    """bench/table.py --write-speedups from a run of some dtypes replaces those dtypes'
    CPU predictions and keeps the others' with their source line, so a bfloat16 run
    (bench/results/cpu_bfloat16.md) need not measure float32 again, and running float32
    afterwards keeps bfloat16's."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import runpy

    import table

    path = tmp_path / "tables.py"
    path.write_text(table.SPEEDUPS.read_text(encoding="utf-8"), encoding="utf-8")
    before = runpy.run_path(str(path))

    def report(dtype, date, ratio):
        config = {"B": 64, "H": 256, "T": 64}
        return {"machine": {"cpu_model": "CPU", "torch_threads": 2, "date": date},
                "results": [{"cell": "lstm", "mode": mode, "dtype": dtype, "config": config,
                             "contenders": {"cpp": {"speedup_vs_nn": ratio}, "auto": {"speedup_vs_nn": 1.0}}}
                            for mode in ("inference", "training")]}

    table.write_speedups(report("bfloat16", "day 1", 12.0), path)
    after = runpy.run_path(str(path))
    float32 = {k: v for k, v in before["CPU"].items() if k[2] == "float32"}
    assert float32 and {k: v for k, v in after["CPU"].items() if k[2] == "float32"} == float32
    assert after["CPU"][("lstm", "training", "bfloat16", 64, 256, 64)] == {"cpp": 12.0}
    assert "bfloat16: measured by bench/table.py on CPU, 2 threads, day 1" in after["CPU_SOURCE"]
    assert table._sources_by_dtype(after["CPU_SOURCE"])["float32"] == \
        table._sources_by_dtype(before["CPU_SOURCE"])["float32"]
    table.write_speedups(report("float32", "day 2", 2.0), path)
    last = runpy.run_path(str(path))
    assert {k: v for k, v in last["CPU"].items() if k[2] == "float32"} == {
        ("lstm", mode, "float32", 64, 256, 64): {"cpp": 2.0} for mode in ("inference", "training")}
    assert last["CPU"][("lstm", "inference", "bfloat16", 64, 256, 64)] == {"cpp": 12.0}
    assert table._sources_by_dtype(last["CPU_SOURCE"]) == {
        "bfloat16": "measured by bench/table.py on CPU, 2 threads, day 1",
        "float32": "measured by bench/table.py on CPU, 2 threads, day 2"}
