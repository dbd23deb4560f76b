"""pytest-benchmark: the Triton and CUDA scans against cuDNN (nn.RNN / nn.LSTM) on a GPU.

    pytest bench/test_bench_gpu.py [--benchmark-save=gpu]

Skips without a GPU. Each case checks the fused backend against cuDNN before timing
(see bench/gpu_bench.py, which also prints the table of same-run ratios).
"""

import itertools

import pytest
import torch

from gpu_bench import BATCHES, DTYPES, HIDDENS, MODES, STEPS, check, fused_backends, make_case, run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.mark.parametrize("contender", ["cudnn", "triton", "cuda"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("cell, steps, batch, hidden, mode",
                         list(itertools.product(("irnn", "lstm"), STEPS, BATCHES, HIDDENS, MODES)))
def test_gpu(benchmark, contender, dtype, cell, steps, batch, hidden, mode):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dtype = DTYPES[dtype]
    backends = fused_backends(cell, batch, hidden, dtype, "cuda")
    if contender != "cudnn" and contender not in backends:
        pytest.skip(f"dispatch would not use {contender} here")
    reference, fused, x, projection = make_case(cell, steps, batch, hidden, "cuda", dtype, backends)
    if contender != "cudnn":
        check(reference, fused[contender], x, projection, mode, contender)
    module = reference if contender == "cudnn" else fused[contender]
    benchmark.group = f"{cell} {mode} {dtype} T={steps} B={batch} H={hidden}"

    def call():
        run(module, x, projection, mode)
        torch.cuda.synchronize()

    call()
    benchmark(call)
