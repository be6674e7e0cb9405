"""The package's module structure: no import cycles, no oversized modules.

Imports are read statically with :mod:`ast` (nothing is imported), each one resolved to the
pqcompile module it names. They are split in two kinds:

- *module-level* imports run when the module is imported (including those inside ``try``/``if``
  at the top level, but not those under ``if TYPE_CHECKING:``, which never run);
- *function-level* imports run when a function is first called.

The rule: the module-level imports among pqcompile modules form no cycle. A cycle means neither
module can be read without the other half-initialized, and an edit to either decides which
names the other sees at import time. The fix is to move the shared piece into a module both
import, not to hide the dependency inside a function. Function-level imports are allowed for
optional or heavy dependencies imported on first use (TVM, onnx, matplotlib, a solver only one
code path needs); they are listed by :func:`function_level_imports` but not part of the rule.

A second rule keeps modules small: every file in pqcompile/ is under 400 lines (at most
:data:`MAX_LINES`; split by concept instead).
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pqcompile"
MAX_LINES = 399

#: Cycles not yet removed, each with why it is still here. The test fails when a cycle is not
#: in this list, and when one in it is gone (then delete its line).
KNOWN_CYCLES: set[tuple[str, str]] = set()



def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest pqcompile module that ``name`` (a module or ``module.attribute``) names."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool,
             modules: dict[str, Path]) -> set[str]:
    """The pqcompile modules one import statement loads (``from . import x`` loads x too)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        if node.level:
            base = module.split(".")
            if not is_package:
                base = base[:-1]
            base = base[: len(base) - (node.level - 1)]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        # ``from pkg import mod`` loads the module; ``from pkg import name`` reads pkg/__init__
        names = [f"{prefix}.{alias.name}" if f"{prefix}.{alias.name}" in modules else prefix
                 for alias in node.names]
    found = {_resolve(n, modules) for n in names if n.split(".")[0] == "pqcompile"}
    found.discard(None)
    found.discard(module)
    return found


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(module-level, function-level) imports: module -> the pqcompile modules it imports.

    Importing ``pqcompile.a.b`` runs ``pqcompile/a/__init__`` first, so that package is an edge
    too (``from ..passes.fold_bn import X`` runs ``passes/__init__``, and whatever it imports),
    except the packages the importer is itself inside (already initializing) and the root
    ``pqcompile`` package (initialized before any of its modules)."""
    modules = _modules()
    top: dict[str, set[str]] = {m: set() for m in modules}
    late: dict[str, set[str]] = {m: set() for m in modules}

    for module, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"

        def visit(node: ast.AST, in_function: bool) -> None:
            if isinstance(node, ast.If) and _is_type_checking(node.test):
                for child in node.orelse:
                    visit(child, in_function)
                return
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                targets = _targets(node, module, is_package, modules)
                (late if in_function else top)[module] |= targets
                return
            inner = in_function or isinstance(
                node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            for child in ast.iter_child_nodes(node):
                visit(child, inner)

        visit(tree, False)

    for edges in (top, late):
        for module, targets in edges.items():
            for target in list(targets):
                parent = target.rpartition(".")[0]
                while parent and parent != "pqcompile":
                    if parent != module and not module.startswith(parent + "."):
                        targets.add(parent)
                    parent = parent.rpartition(".")[0]
    return top, late


def function_level_imports() -> dict[str, set[str]]:
    """The late (first-call) imports, for reading: not checked for cycles."""
    return {m: t for m, t in import_graph()[1].items() if t}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)

    cycles = []
    for component in components:
        members = set(component)
        start = component[0]
        # shortest path back to start inside the component
        paths = {start: [start]}
        frontier = [start]
        cycle = None
        while frontier and cycle is None:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v] & members):
                    if w == start:
                        cycle = paths[v] + [start]
                        break
                    if w not in paths:
                        paths[w] = paths[v] + [w]
                        nxt.append(w)
                if cycle:
                    break
            frontier = nxt
        cycles.append(cycle or component)
    return cycles


def test_the_cycle_finder_finds_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e2"}, "e2": set()}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_reads_relative_and_late_imports():
    top, late = import_graph()
    # api imports the solvers package at module level, and torch nowhere counts
    assert any(t.startswith("pqcompile.") for t in top["pqcompile.api"])
    assert all(t.startswith("pqcompile") for ts in top.values() for t in ts)
    assert any(late.values())


def test_no_import_cycles_among_module_level_imports():
    top, _ = import_graph()
    cycles = find_cycles(top)
    new = [c for c in cycles if tuple(c[:2]) not in KNOWN_CYCLES]
    assert not new, "module-level import cycles (move the shared piece into a module " \
        "both import):\n" + "\n".join(" -> ".join(c) for c in new)
    gone = KNOWN_CYCLES - {tuple(c[:2]) for c in cycles}
    assert not gone, f"these cycles are gone: delete them from KNOWN_CYCLES: {gone}"


def test_no_module_over_max_lines():
    long = {str(p.relative_to(PACKAGE.parent)): n for p in sorted(PACKAGE.rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by concept): {long}"


def test_every_public_name_resolves_where_the_package_says():
    """``pqcompile``'s lazy exports name modules by path: each must still define its name after
    modules move (an ``AttributeError`` on first use is what a stale path would give)."""
    import importlib

    import pqcompile

    for name, module in pqcompile._EXPORTS.items():
        assert getattr(importlib.import_module(module, "pqcompile"), name) is \
            getattr(pqcompile, name), name
    assert {n for n in pqcompile.__all__ if n not in pqcompile._SUBMODULES} == \
        set(pqcompile._EXPORTS)
