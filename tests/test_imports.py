"""The package's import graph: no cycles (function-level imports included), and the
char-RNN application (fused_rnn/app) is a user of the library's public API only."""

import ast
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "fused_rnn"
# compiled extension modules of the package, whether built here or not
EXTENSIONS = {"fused_rnn._C"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_of(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rsplit(".", 1)[0]


def imports_of(path: Path, modules: set) -> set:
    """The fused_rnn modules `path` imports, anywhere in it (a lazy import inside a
    function is still an edge: calling that function runs it)."""
    name = module_name(path)
    package = package_of(name, path)
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            named = {f"{base}.{alias.name}" for alias in node.names}
            # `from . import x` imports the submodule x when there is one (a compiled
            # extension such as _C is a leaf), else a name defined in base
            found.update(named & modules if named & (modules | EXTENSIONS) else {base})
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict:
    paths = {module_name(p): p for p in PACKAGE_DIR.rglob("*.py")}
    modules = set(paths)
    graph = {}
    for name, path in paths.items():
        # importing a module imports its parent packages first; those edges are Python's,
        # not the module's, and are left out
        graph[name] = imports_of(path, modules)
    return graph


def find_cycle(graph: dict):
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for successor in sorted(graph[node]):
            if state.get(successor) == "open":
                return stack[stack.index(successor):] + [successor]
            if successor not in state:
                cycle = visit(successor)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert "fused_rnn.functional" in graph and graph["fused_rnn.functional"]  # the walk sees the package
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_app_uses_only_the_public_api():
    """fused_rnn.app imports from the library only what ``fused_rnn.__all__`` exports
    (besides its own modules), as any training code would."""
    import fused_rnn

    public = set(fused_rnn.__all__) | {"__version__"}
    app = PACKAGE_DIR / "app"
    for path in app.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1:
                    continue  # fused_rnn.app's own modules
                assert node.level == 0, f"{path.name}: relative import out of fused_rnn.app"
                if node.module == "fused_rnn":
                    names = {alias.name for alias in node.names}
                    assert names <= public, f"{path.name} imports private names {names - public}"
                else:
                    assert not (node.module or "").startswith("fused_rnn."), f"{path.name} imports {node.module}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    assert not alias.name.startswith("fused_rnn."), f"{path.name} imports {alias.name}"
