"""The code's shape, checked: no import cycle, small files and functions, layers respected.

Issue 13's "done when" as a test, so the shape cannot rot silently:

* No import cycle among the project's modules, counting imports inside functions (a lazy
  import still couples two modules; hiding a cycle in a function only defers it).
* No module over 400 lines and no function over 80.
* The package layers of DESIGN.md: ``registry`` imports none of ``merging``, ``gate``,
  ``cli``; ``merging`` does not import ``gate`` or ``cli``; ``gate`` does not import ``cli``.

The graph is built from the AST alone (nothing is imported), so the test is fast and sees
every import statement, including ones on code paths the suite never runs.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("registry", "merging", "gate", "cli")
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80
# What each top-level package may import from the project (DESIGN.md, "Packages").
ALLOWED = {
    "registry": {"registry"},
    "merging": {"registry", "merging"},
    "gate": {"registry", "merging", "gate"},
    "cli": {"registry", "merging", "gate", "cli"},
}


def project_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the project's packages."""
    modules: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The project module ``name`` refers to (itself, or its nearest enclosing package)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the project modules it imports anywhere in its body."""
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                # `from pkg import submodule` imports the submodule, not just the package.
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                           for alias in node.names]
            for target in targets:
                resolved = _resolve(target, modules)
                if resolved and resolved != name:
                    graph[name].add(resolved)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


MODULES = project_modules()
GRAPH = import_graph(MODULES)


def test_cycle_finder_finds_a_planted_cycle() -> None:
    planted = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(planted) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_graph_sees_imports_inside_functions(tmp_path: Path) -> None:
    source = tmp_path / "registry" / "x.py"
    source.parent.mkdir()
    source.write_text("def f():\n    from registry import y\n    return y\n")
    (tmp_path / "registry" / "y.py").write_text("import registry.x\n")
    modules = {"registry.x": source, "registry.y": tmp_path / "registry" / "y.py"}
    assert cycles(import_graph(modules)) == [["registry.x", "registry.y"]]


def test_no_import_cycles() -> None:
    assert cycles(GRAPH) == [], "import cycles among the project's modules"


def test_package_layers() -> None:
    crossings = sorted(f"{src} -> {dst}" for src, dsts in GRAPH.items() for dst in dsts
                       if dst.split(".")[0] not in ALLOWED[src.split(".")[0]])
    assert crossings == []


# Subpackages that must not import each other (DESIGN.md: merging.lora and merging.model
# share merging.adapter, dtypes, devices and threads, never each other).
APART = (("merging.lora", "merging.model"), ("merging.model", "merging.lora"))


def test_subpackages_kept_apart() -> None:
    crossings = sorted(f"{src} -> {dst}" for src, dsts in GRAPH.items() for dst in dsts
                       for a, b in APART if src.startswith(a + ".") and dst.startswith(b + "."))
    assert crossings == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_size(name: str) -> None:
    path = MODULES[name]
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"{path.relative_to(ROOT)} has {lines} lines"


def test_function_size() -> None:
    long_functions = []
    for path in MODULES.values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long_functions.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)")
    assert long_functions == []
