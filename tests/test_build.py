"""The build: setup.py's CUDA switch both ways, build_info, and import without _C."""

import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import fused_rnn

REPO = Path(__file__).resolve().parents[1]


def load_setup_module():
    spec = importlib.util.spec_from_file_location("fused_rnn_setup", REPO / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # not __main__: defines the helpers, runs no build
    return module


def fake_toolkit(root: Path) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    (root / "bin" / "nvcc").write_text("#!/bin/sh\n")
    (root / "include" / "cuda_runtime_api.h").write_text("")
    return root


def test_extension_is_loaded():
    """CI builds the extension; if it fails to import, every cpp test would quietly test
    only the torch backend, so this fails loudly instead."""
    info = fused_rnn.build_info()
    assert info["extension_loaded"], f"fused_rnn._C did not import: {info.get('import_error')}"
    assert fused_rnn.available_backends("cpu")[0] == "cpp"


def test_cuda_build_plan_both_ways():
    setup = load_setup_module()
    toolkit = Path("/opt/cuda")
    assert setup.cuda_build_plan("13.0", toolkit, skip=False, force=False) == (True, "")
    assert setup.cuda_build_plan(None, toolkit, skip=False, force=False) == (False, "torch is a CPU-only build")
    build, reason = setup.cuda_build_plan("13.0", None, skip=False, force=False)
    assert not build and "no CUDA toolkit found" in reason
    assert setup.cuda_build_plan("13.0", toolkit, skip=True, force=False)[0] is False
    build, reason = setup.cuda_build_plan("13.0", toolkit, skip=False, force=False, toolkit_version="12.8")
    assert not build and "nvcc in /opt/cuda is CUDA 12.8 but torch was built with CUDA 13.0" in reason
    assert setup.cuda_build_plan("13.0", toolkit, skip=False, force=False, toolkit_version="13.1") == (True, "")
    with pytest.raises(RuntimeError, match="FUSED_RNN_FORCE_CUDA_BUILD is set but torch is a CPU-only build"):
        setup.cuda_build_plan(None, toolkit, skip=False, force=True)


def test_find_cuda_home_follows_an_nvcc_wrapper(tmp_path, monkeypatch):
    setup = load_setup_module()
    toolkit = fake_toolkit(tmp_path / "cuda-13.0")
    wrapper_dir = tmp_path / "wrappers"
    wrapper_dir.mkdir()
    wrapper = wrapper_dir / "nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec {toolkit}/bin/nvcc "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", str(wrapper_dir))
    assert setup.find_cuda_home(default_roots=()) == toolkit
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "not-a-toolkit"))
    assert setup.find_cuda_home(default_roots=()) is None


def test_cuda_arch_flags():
    setup = load_setup_module()
    assert setup.cuda_arch_flags("80;90") == [
        "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
        "-gencode", "arch=compute_90,code=compute_90"]
    assert setup.cuda_arch_flags("sm_90") == [
        "-gencode", "arch=compute_90,code=sm_90", "-gencode", "arch=compute_90,code=compute_90"]


def test_installed_build_matches_the_machine():
    """Where torch is a CUDA build and a toolkit is found (CI here), the CUDA sources were
    compiled, for the default archs unless FUSED_RNN_CUDA_ARCHS says otherwise."""
    import torch

    setup = load_setup_module()
    cuda_home = setup.find_cuda_home()
    expect_cuda, _ = setup.cuda_build_plan(
        torch.version.cuda, cuda_home, setup._env_flag("FUSED_RNN_SKIP_CUDA_BUILD"), False,
        setup.nvcc_version(cuda_home) if cuda_home is not None else None)
    info = fused_rnn.build_info()
    assert info["cuda_compiled"] == expect_cuda
    if expect_cuda:
        archs = os.environ.get("FUSED_RNN_CUDA_ARCHS", setup.DEFAULT_CUDA_ARCHS)
        assert info["cuda_archs"] == [f"sm_{a}" for a in archs.split(";")]


@pytest.mark.slow
@pytest.mark.timeout(1800)  # the pip build below may take up to 1500 s on a loaded machine
def test_non_editable_cpu_only_install(tmp_path):
    """`pip install --no-build-isolation .` (not editable) from a copy of the source
    tree, with FUSED_RNN_SKIP_CUDA_BUILD: the build says in one line that it builds the
    CPU kernels only, and the installed package imports from where it was installed,
    reports no CUDA, runs the fused kernels, and has its command and the app."""
    source = tmp_path / "src"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True,
                             timeout=60)
    for name in filter(None, tracked.stdout.split("\0")):
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    target = tmp_path / "site"
    env = dict(os.environ, FUSED_RNN_SKIP_CUDA_BUILD="TRUE")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-v", "--no-build-isolation", "--no-deps", "--target", str(target),
         str(source)], env=env, capture_output=True, text=True, timeout=1500)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    assert "fused_rnn: building the CPU kernels only (FUSED_RNN_SKIP_CUDA_BUILD is set)" in build.stdout + build.stderr
    assert (target / "bin" / "fused-rnn").is_file()
    probe = textwrap.dedent(f"""
        import torch, fused_rnn, fused_rnn.app.models
        assert fused_rnn.__file__.startswith({str(target)!r}), fused_rnn.__file__
        info = fused_rnn.build_info()
        assert info["extension_loaded"] and info["cuda_compiled"] is False and info["cuda_archs"] == [], info
        assert torch._C._dispatch_has_kernel_for_dispatch_key("fused_rnn::lstm_scan_forward", "CPU")
        y, (h, c) = fused_rnn.lstm(torch.randn(3, 2, 4), None, torch.randn(20, 4), torch.randn(20, 5), backend="cpp")
        assert y.shape == (3, 2, 5)
        from importlib.metadata import version
        assert version("fused_rnn") == fused_rnn.__version__
        print("installed ok")
    """)
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, PYTHONPATH=str(target)), cwd=tmp_path)
    assert result.returncode == 0 and "installed ok" in result.stdout, result.stderr[-3000:]


def test_the_version_is_written_once():
    """pyproject.toml takes the version from fused_rnn.__version__ (the installed
    metadata says the same), and setup.py names none."""
    from importlib.metadata import version

    assert version("fused_rnn") == fused_rnn.__version__
    assert "\n        version=" not in (REPO / "setup.py").read_text()  # no setup(version=...)
    assert 'version = { attr = "fused_rnn._version.__version__" }' in (REPO / "pyproject.toml").read_text()


def test_import_without_extension_falls_back_with_a_warning():
    probe = textwrap.dedent("""
        import sys, warnings
        class BlockExtension:
            def find_spec(self, name, path=None, target=None):
                if name == "fused_rnn._C":
                    raise ImportError("simulated: extension not built")
        sys.meta_path.insert(0, BlockExtension())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import fused_rnn
        assert any("pip install --no-build-isolation -e ." in str(w.message) for w in caught), caught
        assert fused_rnn.available_backends("cpu") == ["nn", "torch"]
        assert fused_rnn.build_info()["extension_loaded"] is False
        import torch
        y, h = fused_rnn.irnn(torch.randn(3, 2, 4), None, torch.randn(5, 4), torch.eye(5))
        assert y.shape == (3, 2, 5)
        print("fallback ok")
    """)
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "fallback ok" in result.stdout, result.stderr[-3000:]


def _gcc_major():
    try:
        out = subprocess.run(["gcc", "-dumpversion"], capture_output=True, text=True, timeout=30).stdout
        return int(out.split(".")[0])
    except (OSError, ValueError, subprocess.SubprocessError):
        return 0


@pytest.mark.skipif(not (sys.platform == "linux" and os.uname().machine == "x86_64"), reason="x86-64 Linux only")
@pytest.mark.skipif(_gcc_major() < 12, reason="the AVX2 / AVX-512 loops need gcc >= 12 (target arch=x86-64-v3/v4)")
@pytest.mark.skipif(__import__("shutil").which("objdump") is None, reason="objdump (binutils) is not installed")
def test_cell_loops_are_vectorised_for_avx2_and_avx512():
    """The LSTM cell loops are the CPU kernels' only non-BLAS hot spot; if the compiler
    stops vectorising their AVX2 build (as an "arch=haswell" target once did, without
    any test failing) the fused LSTM loses a third of its speed. Each loop's x86-64-v3
    build (csrc/cpu/common.h's run_x86_64_v3) must use ymm registers, its x86-64-v4
    build zmm registers, and the baseline build neither."""
    library = next((REPO / "fused_rnn").glob("_C*.so"))
    disassembly = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", str(library)],
                                 capture_output=True, text=True, timeout=600).stdout
    for row in ("lstm_forward_row<float>", "lstm_backward_row<float>"):
        bodies = {"run_x86_64_v3": [], "run_x86_64_v4": [], "run_baseline": []}
        inside = None
        for line in disassembly.splitlines():
            if line.endswith(">:"):
                inside = next((isa for isa in bodies if f"{isa}<" in line and f"::{row}(" in line), None)
            elif inside:
                bodies[inside].append(line)
        for isa, body in bodies.items():
            assert body, f"no {isa} build of {row} in {library.name}"
        assert sum("ymm" in line for line in bodies["run_x86_64_v3"]) > 20, f"the AVX2 {row} is not vectorised"
        assert sum("zmm" in line for line in bodies["run_x86_64_v4"]) > 20, f"the AVX-512 {row} is not vectorised"
        assert not any("ymm" in line or "zmm" in line for line in bodies["run_baseline"]), f"baseline {row} uses AVX"


@pytest.mark.skipif(not (sys.platform == "linux" and os.uname().machine == "x86_64"), reason="x86-64 Linux only")
@pytest.mark.skipif(__import__("shutil").which("objdump") is None, reason="objdump (binutils) is not installed")
def test_bf16_kernel_is_vdpbf16ps_on_zmm_registers():
    """The bf16 GEMM (csrc/cpu/gemm_bf16.h) is written once with GCC vector types and its
    dot product in inline assembly, so nothing but the disassembly shows that the native
    build is what it claims: gemm_native must run vdpbf16ps on zmm registers (16 per
    8-row tile, 72 over the tile sizes 1..8), and the test-only emulation neither."""
    library = next((REPO / "fused_rnn").glob("_C*.so"))
    disassembly = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", str(library)],
                                 capture_output=True, text=True, timeout=600).stdout
    bodies = {"gemm_native": [], "gemm_emulated": []}
    inside = None
    for line in disassembly.splitlines():
        if line.endswith(">:"):
            inside = next((name for name in bodies if f"fused_rnn::cpu::bf16::{name}(" in line), None)
        elif inside:
            bodies[inside].append(line)
    for name, body in bodies.items():
        assert body, f"no {name} in {library.name}"
    native = [line for line in bodies["gemm_native"] if "vdpbf16ps" in line]
    assert len(native) >= 72 and all(line.count("%zmm") == 3 for line in native), "gemm_native is not vdpbf16ps"
    assert not any("vdpbf16ps" in line or "zmm" in line for line in bodies["gemm_emulated"])
