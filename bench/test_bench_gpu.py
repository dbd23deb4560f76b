"""pytest-benchmark: the Triton and CUDA scans against cuDNN (nn.RNN / nn.LSTM) on a GPU.

    pytest bench/test_bench_gpu.py [--benchmark-save=gpu]

Skips without a GPU. Each case checks the fused backend against cuDNN before timing,
with bench/harness.py (which bench/gpu_bench.py also uses for its table of same-run
ratios).
"""

import functools
import itertools

import pytest
import torch

from gpu_bench import BATCHES, HIDDENS, STEPS, configs
from harness import (
    BASELINE,
    CELLS,
    DTYPES,
    GPU_BACKENDS,
    MODES,
    check_against_baseline,
    make_problem,
    make_step,
    unavailable_reason,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
CONFIGS = configs(STEPS, BATCHES, HIDDENS)


@functools.lru_cache(maxsize=None)
def cached_problem(cell, config, dtype):
    return make_problem(cell, config, device="cuda", dtype=DTYPES[dtype])


@pytest.mark.parametrize("contender", [BASELINE, *GPU_BACKENDS])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("cell, config, mode", list(itertools.product(CELLS, CONFIGS, MODES)),
                         ids=lambda v: v.name if hasattr(v, "name") else str(v))
def test_gpu(benchmark, contender, dtype, cell, config, mode):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    problem = cached_problem(cell, config, dtype)
    reason = unavailable_reason(contender, problem)
    if reason is not None:
        pytest.skip(reason)
    if contender != BASELINE:
        check_against_baseline(problem, contender, mode)
    benchmark.group = f"{cell} {mode} {dtype} {config.name}"
    step = make_step(problem, contender, mode)

    def call():
        step()
        torch.cuda.synchronize()

    call()
    benchmark(call)
