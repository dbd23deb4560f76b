"""Builds fused_rnn and its extension fused_rnn._C.

    pip install --no-build-isolation -e .

The C++ CPU kernels are always built. The CUDA sources are added when torch is a
CUDA build and a CUDA toolkit (nvcc) is found. Environment switches:

    FUSED_RNN_SKIP_CUDA_BUILD=TRUE   build the CPU kernels only, even where CUDA is available
    FUSED_RNN_FORCE_CUDA_BUILD=TRUE  fail instead of falling back when CUDA cannot be built
    FUSED_RNN_CUDA_ARCHS="80;90"     compute capabilities to compile for (default 80 and 90)
    CUDA_HOME                        the CUDA toolkit (else found from /usr/local/cuda or nvcc)
    MAX_JOBS                         parallel compile jobs (default: from cores and memory)
    NVCC_THREADS                     threads per nvcc invocation (default 2)
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
PACKAGE = "fused_rnn"
DEFAULT_CUDA_ARCHS = "80;90"
# A compile of a source that includes the torch headers peaks near 2 GB (nvcc
# higher), so each job is given this much memory when MAX_JOBS is not set.
MEMORY_PER_JOB_GB = 3


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "TRUE", "ON", "YES")


def _is_nvcc_toolkit(root: Path) -> bool:
    return (root / "bin" / "nvcc").is_file() and (root / "include" / "cuda_runtime_api.h").is_file()


def find_cuda_home(default_roots=(Path("/usr/local/cuda"),)):
    """The CUDA toolkit root, or None. CUDA_HOME/CUDA_PATH win; then /usr/local/cuda; then
    the toolkit around the `nvcc` on PATH, following wrapper scripts (torch's own guess,
    dirname(dirname(nvcc)), is wrong when nvcc is a wrapper such as /usr/local/bin/nvcc)."""
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(variable):
            root = Path(os.environ[variable])
            return root if _is_nvcc_toolkit(root) else None
    candidates = list(default_roots)
    nvcc = shutil.which("nvcc")
    if nvcc:
        resolved = Path(nvcc).resolve()
        candidates.append(resolved.parent.parent)
        try:
            # a wrapper script names the real nvcc: take each absolute path it mentions
            text = resolved.read_text(errors="ignore") if resolved.stat().st_size < 65536 else ""
        except OSError:
            text = ""
        for word in text.split():
            word = word.strip("\"'")
            if word.startswith("/") and word.endswith("/bin/nvcc"):
                candidates.append(Path(word).parent.parent)
    for root in candidates:
        if _is_nvcc_toolkit(root):
            return root
    return None


def nvcc_version(cuda_home):
    """'13.0' for the toolkit's nvcc, or None if it cannot be run."""
    try:
        out = subprocess.run([str(Path(cuda_home) / "bin" / "nvcc"), "--version"], capture_output=True, text=True,
                             timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+\.\d+)", out)
    return match.group(1) if match else None


def cuda_build_plan(torch_cuda_version, cuda_home, skip, force, toolkit_version=None):
    """(build_cuda, reason): whether to compile the CUDA sources, and why not.
    `toolkit_version` is nvcc's (e.g. "13.0"); torch refuses to build with an nvcc whose
    major version differs from the one torch was built with, so that case falls back too."""
    if skip:
        return False, "FUSED_RNN_SKIP_CUDA_BUILD is set"
    if torch_cuda_version is None:
        reason = "torch is a CPU-only build"
    elif cuda_home is None:
        reason = "no CUDA toolkit found (set CUDA_HOME, or put nvcc on PATH)"
    elif toolkit_version is not None and toolkit_version.split(".")[0] != torch_cuda_version.split(".")[0]:
        reason = f"nvcc in {cuda_home} is CUDA {toolkit_version} but torch was built with CUDA {torch_cuda_version}"
    else:
        return True, ""
    if force:
        raise RuntimeError(f"fused_rnn: FUSED_RNN_FORCE_CUDA_BUILD is set but {reason}")
    return False, reason


def default_max_jobs() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        memory_gb = MEMORY_PER_JOB_GB * cores
    return max(1, min(cores, int(memory_gb // MEMORY_PER_JOB_GB)))


def nvidia_wheel_includes():
    """Include folders of the nvidia-* wheels that a CUDA build of torch installs: torch's
    CUDA headers include cuBLAS/cuSPARSE headers that a bare toolkit may lack."""
    folders = []
    for entry in sys.path:
        nvidia = Path(entry) / "nvidia"
        if nvidia.is_dir():
            folders += sorted(str(p) for p in nvidia.glob("*/include") if p.is_dir())
    return folders


def cuda_arch_flags(archs: str):
    """SASS for each arch, plus PTX of the highest so that newer GPUs can JIT it."""
    numbers = [a.strip().replace("sm_", "").replace(".", "") for a in archs.replace(",", ";").split(";")]
    numbers = [a for a in numbers if a]
    flags = []
    for arch in numbers:
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    if numbers:
        highest = max(numbers, key=int)
        flags += ["-gencode", f"arch=compute_{highest},code=compute_{highest}"]
    return flags


def extension_modules():
    cuda_home = find_cuda_home()
    if cuda_home is not None:
        # torch.utils.cpp_extension reads CUDA_HOME when it is imported
        os.environ["CUDA_HOME"] = str(cuda_home)
    import torch
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    os.environ.setdefault("MAX_JOBS", str(default_max_jobs()))
    build_cuda, reason = cuda_build_plan(
        torch.version.cuda, cuda_home, _env_flag("FUSED_RNN_SKIP_CUDA_BUILD"), _env_flag("FUSED_RNN_FORCE_CUDA_BUILD"),
        nvcc_version(cuda_home) if cuda_home is not None else None,
    )
    archs = os.environ.get("FUSED_RNN_CUDA_ARCHS", DEFAULT_CUDA_ARCHS)
    # no -std: torch.utils.cpp_extension adds the standard its headers need (C++17 or C++20)
    # -fno-trapping-math lets GCC if-convert the clamps of the cell maths, without which
    # the pointwise loops do not vectorise; NaN and Inf semantics are unchanged (these two
    # flags are also in torch's own build).
    cxx_flags = ["-O3", "-fopenmp", "-fno-trapping-math", "-fno-math-errno", "-Wall", "-Wno-unknown-pragmas"]
    defines = [
        f'-DFUSED_RNN_TORCH_VERSION="{torch.__version__}"',
        f'-DFUSED_RNN_CXX_FLAGS="{" ".join(cxx_flags)}"',
    ]
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))
    sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cpu").glob("*.cpp"))
    if not build_cuda:
        print(f"fused_rnn: building the CPU kernels only ({reason})", flush=True)
        return [
            CppExtension(
                f"{PACKAGE}._C",
                sources,
                extra_compile_args={"cxx": cxx_flags + defines},
                extra_link_args=["-fopenmp"],
            )
        ]
    print(f"fused_rnn: building CPU and CUDA sources for sm {archs} with {cuda_home}", flush=True)
    defines += ["-DFUSED_RNN_WITH_CUDA", f'-DFUSED_RNN_CUDA_ARCHS="{archs}"']
    sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cu"))
    nvcc_flags = ["-O3", "--threads", os.environ.get("NVCC_THREADS", "2")]
    nvcc_flags += cuda_arch_flags(archs) + defines
    return [
        CUDAExtension(
            f"{PACKAGE}._C",
            sources,
            include_dirs=nvidia_wheel_includes(),
            extra_compile_args={"cxx": cxx_flags + defines, "nvcc": nvcc_flags},
            extra_link_args=["-fopenmp"],
        )
    ]


def build_ext_class():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(use_ninja=True)


if __name__ == "__main__":  # pip and `python setup.py` run it so; tests import the helpers above
    # name, version, dependencies and the fused-rnn command are in pyproject.toml's [project]
    setup(
        ext_modules=extension_modules(),
        cmdclass={"build_ext": build_ext_class()},
        zip_safe=False,
    )
