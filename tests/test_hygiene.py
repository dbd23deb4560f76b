"""The test suite's own rules, checked on its source: no test may wait forever on a
process it started. Every subprocess call passes a timeout; multiprocessing workers
are joined with one (helpers.spawn_and_wait); the per-test limit comes from
pytest-timeout (pyproject.toml)."""

import ast
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
SUBPROCESS_CALLS = {"run", "call", "check_call", "check_output"}


def _calls(path):
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call)]


def _keyword(call, name):
    return next((k.value for k in call.keywords if k.arg == name), None)


def test_every_spawned_process_is_waited_for_with_a_timeout():
    offences = []
    for path in sorted(TESTS.glob("*.py")):
        for call in _calls(path):
            name = ast.unparse(call.func)
            where = f"{path.name}:{call.lineno}: {name}"
            if name.startswith("subprocess.") and name.split(".")[-1] in SUBPROCESS_CALLS:
                if _keyword(call, "timeout") is None:
                    offences.append(where + " without timeout=")
            elif name.endswith((".communicate", ".wait")) and _keyword(call, "timeout") is None and not call.args:
                offences.append(where + " without a timeout")
            elif name.endswith("spawn") and "mp" in name or name.endswith("multiprocessing.spawn"):
                join = _keyword(call, "join")
                if join is None or not (isinstance(join, ast.Constant) and join.value is False):
                    offences.append(where + " joins without a timeout (use helpers.spawn_and_wait)")
            elif name.endswith(".join") and not call.args and _keyword(call, "timeout") is None:
                receiver = ast.unparse(call.func.value)
                if not receiver.startswith(("'", '"', "os.path", "str")):
                    offences.append(where + " without a timeout")
    assert not offences, "\n".join(offences)


def test_the_suite_has_a_per_test_timeout():
    pytest.importorskip("pytest_timeout", reason="pytest-timeout is in the test extra; install .[test]")
    text = (TESTS.parent / "pyproject.toml").read_text(encoding="utf-8")
    assert "\ntimeout = " in text
