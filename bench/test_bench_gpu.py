"""pytest-benchmark: the Triton scans against cuDNN (nn.RNN / nn.LSTM) on a GPU.

    pytest bench/test_bench_gpu.py [--benchmark-save=gpu]

Skips without a GPU. Each case checks Triton against cuDNN before timing (see
bench/gpu_bench.py, which also prints the table of same-run ratios).
"""

import itertools

import pytest
import torch

from gpu_bench import BATCHES, HIDDENS, MODES, STEPS, check, make_case, run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.mark.parametrize("contender", ["cudnn", "triton"])
@pytest.mark.parametrize("cell, steps, batch, hidden, mode",
                         list(itertools.product(("irnn", "lstm"), STEPS, BATCHES, HIDDENS, MODES)))
def test_gpu(benchmark, contender, cell, steps, batch, hidden, mode):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    reference, fused, x, projection = make_case(cell, steps, batch, hidden, "cuda")
    check(reference, fused, x, projection, mode)
    module = reference if contender == "cudnn" else fused
    benchmark.group = f"{cell} {mode} T={steps} B={batch} H={hidden}"

    def call():
        run(module, x, projection, mode)
        torch.cuda.synchronize()

    call()
    benchmark(call)
