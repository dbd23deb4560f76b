"""Shared test setup: the NumPy reference on sys.path, one thread, and helpers."""

import os
import sys
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run under the interpreter on CPU tensors; the switch
# must be set before Triton decorates them (fused_rnn.triton is only imported lazily).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python"))

import fused_rnn  # noqa: E402

# The shapes here are small, where OpenMP fork/join costs more than it saves, and a
# second busy thread on a shared 2-core machine can stall every barrier. Tests that
# exercise the threaded paths set the thread count themselves.
torch.set_num_threads(1)
# On a GPU, cuDNN's RNNs (the torch.nn oracle) would run float32 in TF32 by default, an
# error of ~1e-3 against the float32 tolerances of these tests.
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False

CPU_BACKENDS = fused_rnn.available_backends("cpu")

# The differential fuzz's seed (tests/test_fuzz.py): a new one every run, printed in the
# report header; FUSED_RNN_FUZZ_SEED replays a run.
# pytest-xdist's workers are started after this file is imported in the controller and
# inherit its environment, so the seed set here is the one every worker uses.
FUZZ_SEED = int(os.environ.get("FUSED_RNN_FUZZ_SEED") or int.from_bytes(os.urandom(4), "little"))
os.environ["FUSED_RNN_FUZZ_SEED"] = str(FUZZ_SEED)


@pytest.fixture(autouse=True)
def _fresh_dispatch_choices():
    """auto's memoised choices (fused_rnn/dispatch.py) start and end empty in every test:
    some tests edit dispatch's tables in place, which the memo does not watch."""
    fused_rnn.dispatch._forget_choices()
    yield
    fused_rnn.dispatch._forget_choices()


@pytest.fixture
def corpus(tmp_path):
    """The application tests' training text (helpers.APP_TEXT) as a file."""
    from helpers import APP_TEXT

    path = tmp_path / "corpus.txt"
    path.write_text(APP_TEXT, encoding="utf-8")
    return path


@pytest.fixture(params=CPU_BACKENDS)
def cpu_backend(request):
    return request.param


def pytest_collection_modifyitems(config, items):
    # The slow tests (a minute or more each) first, the longest-allowed (timeout marker)
    # first among them, so that pytest-xdist's workers start them at once and the short
    # ones fill in around them, instead of one of them starting last and running alone
    # (a stable sort: the order is otherwise kept).
    def key(item):
        timeout = item.get_closest_marker("timeout")
        return item.get_closest_marker("slow") is None, -(timeout.args[0] if timeout and timeout.args else 0)
    items.sort(key=key)


def pytest_report_header(config):
    return [f"fused_rnn build: {fused_rnn.build_info()}; cpu backends: {CPU_BACKENDS}",
            f"fuzz seed: {FUZZ_SEED} (replay with FUSED_RNN_FUZZ_SEED={FUZZ_SEED})"]


def pytest_terminal_summary(terminalreporter):
    # The header above is not shown under -q (the README's and CI's test command), so the
    # seed to replay a failing fuzz case is repeated at the end of every run.
    terminalreporter.write_line(f"fuzz seed: {FUZZ_SEED} (replay with FUSED_RNN_FUZZ_SEED={FUZZ_SEED})")
