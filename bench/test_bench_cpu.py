"""pytest-benchmark: the fused CPU backend and the torch loop against nn.RNN / nn.LSTM.

    pytest bench/ [-k "lesson and training"] [--benchmark-save=cpu]

One test per (cell, configuration, mode, contender); the contenders of one (cell, mode,
configuration) share a benchmark group, so pytest-benchmark's report puts them side by
side. Each test first checks its contender's outputs (and, in training mode, every
gradient) against nn.RNN / nn.LSTM with the same weights. These benchmarks are not part
of the test suite (pytest's testpaths is tests/); for the CPU table with speed-up
ratios measured in one interleaved run, use `python bench/table.py`.
"""

import functools

import pytest

from harness import (
    BASELINE,
    CELLS,
    CONFIGS,
    FUSED_BACKENDS,
    MODES,
    check_against_baseline,
    make_problem,
    make_step,
    unavailable_reason,
)

# Untimed calls before pytest-benchmark starts: the first calls pay for allocating
# buffers and starting the thread pool, which no later call does.
WARMUP_CALLS = 2


@functools.lru_cache(maxsize=None)
def cached_problem(cell, config):
    # inputs and weights are read-only for every contender, so one copy per case serves all
    return make_problem(cell, config)


@pytest.mark.parametrize("contender", [BASELINE, *FUSED_BACKENDS])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("config", CONFIGS, ids=[config.name for config in CONFIGS])
@pytest.mark.parametrize("cell", CELLS)
def test_bench_cpu(benchmark, cell, config, mode, contender):
    reason = unavailable_reason(contender)
    if reason is not None:
        pytest.skip(reason)
    problem = cached_problem(cell, config)
    if contender != BASELINE:
        check_against_baseline(problem, contender, mode)
    benchmark.group = f"{cell} {mode} {config.name} (T={config.T}, B={config.B}, I={config.I}, H={config.H})"
    benchmark.extra_info.update(cell=cell, mode=mode, contender=contender, **config._asdict())
    step = make_step(problem, contender, mode)
    for _ in range(WARMUP_CALLS):
        step()
    benchmark(step)
