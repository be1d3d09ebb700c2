"""The package's shape, as tests: imports point one way, files stay readable.

The layers (README "Architecture"): ``interp`` (the core) never imports ``analyses``;
``analyses`` (the analyses) never imports its app layer ``analyses.app`` (the command line,
report writer, plots and sections), and nothing imports the app layer from outside it. There
is no import cycle between modules: an import inside a function counts as an edge too, since
a lazy import is only a cycle that has not happened yet; imports under ``if TYPE_CHECKING:``
do not run, so they do not count.

Size limits (issue 17): a module over 500 lines, or a function over 80 lines whose docstring
does not give a reason (a sentence starting "Long because"), fails.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# bench/ is the benchmark harness of the checkout (not installed); it is held to the same rules
PACKAGES = ("interp", "analyses", "bench")
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80


def _module_files() -> dict[str, Path]:
    """Every module of the packages (and bench/), by dotted name (packages by their __init__)."""
    out: dict[str, Path] = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = _module_files()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, module: str, is_package: bool) -> Iterator[str]:
    """Dotted names of the project modules this module imports, wherever the import stands."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                # "from pkg import mod" imports module pkg.mod; "from mod import name" imports mod
                yield f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
        stack.extend(ast.iter_child_nodes(node))


def _resolve(name: str) -> str | None:
    """The project module a dotted import name executes last (its longest known prefix)."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        candidate = ".".join(parts[:i])
        if candidate in MODULES:
            return candidate
    return None


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        targets = {_resolve(n) for n in _imports(tree, module, path.name == "__init__.py")}
        graph[module] = {t for t in targets if t and t != module}
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of modules (first == last), or None; iterative DFS, three colours."""
    colour = dict.fromkeys(graph, 0)
    for start in sorted(graph):
        if colour[start]:
            continue
        path, iters = [start], [iter(sorted(graph[start]))]
        colour[start] = 1
        while path:
            nxt = next(iters[-1], None)
            if nxt is None:
                colour[path.pop()] = 2
                iters.pop()
            elif colour.get(nxt, 2) == 1:
                return path[path.index(nxt) :] + [nxt]
            elif colour.get(nxt) == 0:
                colour[nxt] = 1
                path.append(nxt)
                iters.append(iter(sorted(graph[nxt])))
    return None


def test_cycle_finder_finds_a_planted_cycle() -> None:
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_import_graph_has_no_cycle() -> None:
    cycle = _find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_layers_import_only_downwards() -> None:
    bad = []
    for module, targets in _graph().items():
        for t in targets:
            if module.startswith("interp") and t.startswith("analyses"):
                bad.append(f"{module} -> {t} (the core never imports analyses)")
            is_app = t == "analyses.app" or t.startswith("analyses.app.")
            if is_app and not module.startswith("analyses.app"):
                bad.append(f"{module} -> {t} (the app layer is imported by nothing)")
            if t.split(".")[0] == "bench" and module.split(".")[0] != "bench":
                bad.append(f"{module} -> {t} (bench is not installed: only loaded by file)")
    assert not bad, "\n".join(sorted(bad))


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_size(module: str) -> None:
    n = len(MODULES[module].read_text(encoding="utf-8").splitlines())
    assert n <= MAX_MODULE_LINES, f"{MODULES[module]} has {n} lines (limit {MAX_MODULE_LINES})"


def test_long_functions_say_why() -> None:
    bad = []
    for path in MODULES.values():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                doc = ast.get_docstring(node) or ""
                if n > MAX_FUNCTION_LINES and "Long because" not in doc:
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not bad, (
        "functions over 80 lines without 'Long because' in the docstring:\n" + "\n".join(bad)
    )
