"""The module-level import graph of salmap.pipeline and salmap.workers: no cycles, and the
floors point down (workers never imports pipeline).

Read with ``ast`` from the source files, so it checks what a module imports when it is first
loaded: imports inside functions (deferred on purpose) and under ``if TYPE_CHECKING:`` do not
count; imports under other top-level ``if``/``try`` blocks do.
"""

from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("pipeline", "workers")


def _modules() -> dict[str, str]:
    """``salmap.pipeline.x.y`` -> its file, for every module of the two packages."""
    found = {}
    for package in PACKAGES:
        for folder, _, files in os.walk(os.path.join(ROOT, package)):
            for name in files:
                if not name.endswith(".py"):
                    continue
                rel = os.path.relpath(os.path.join(folder, name), ROOT)[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                found[".".join(["salmap", *rel])] = os.path.join(folder, name)
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _top_level_imports(body: list[ast.stmt]):
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                yield from _top_level_imports(node.body)
            yield from _top_level_imports(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody,
                          *(h.body for h in node.handlers)):
                yield from _top_level_imports(block)


def import_graph() -> dict[str, set[str]]:
    """module -> the salmap modules it imports at module level."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.endswith("__init__.py")
        package = name if is_package else name.rsplit(".", 1)[0]
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        targets: set[str] = set()
        for node in _top_level_imports(tree.body):
            if isinstance(node, ast.Import):
                bases = [a.name for a in node.names]
                names: list[str] = []
            else:
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1])
                    base = f"{base}.{node.module}" if node.module else base
                else:
                    base = node.module or ""
                bases, names = [base], [a.name for a in node.names]
            for base in bases:
                submodules = {f"{base}.{item}" for item in names} & modules.keys()
                targets |= submodules  # `from package import submodule`
                if base in modules and (not names or len(submodules) < len(names)):
                    targets.add(base)
        targets.discard(name)
        graph[name] = targets
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a path that comes back to its start) per strongly connected group."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

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
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    cycles = []
    for group in groups:
        members, start = set(group), min(group)
        # shortest way back to start inside the group (breadth first)
        paths = {start: [start]}
        queue = [start]
        found: list[str] | None = None
        while queue and found is None:
            v = queue.pop(0)
            for w in sorted(graph[v] & members):
                if w == start:
                    found = paths[v] + [start]
                    break
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    queue.append(w)
        cycles.append(found or sorted(group))
    return cycles


def test_the_graph_sees_the_modules_and_their_imports():
    graph = import_graph()
    assert "salmap.pipeline.run" in graph and "salmap.workers.methods.base" in graph
    assert "salmap.pipeline.config" in graph["salmap.pipeline.run"]
    assert "salmap.workers.unit_id" in graph["salmap.workers.actor"]


def test_find_cycles_names_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_level_import_cycle():
    cycles = find_cycles(import_graph())
    assert not cycles, "module-level import cycles:\n" + "\n".join(
        " -> ".join(c) for c in cycles)


def test_workers_never_import_pipeline():
    up = sorted(f"{m} -> {t}" for m, ts in import_graph().items() if m.startswith("salmap.workers")
                for t in ts if t.startswith("salmap.pipeline"))
    assert not up, "workers imports pipeline (the floors point down only):\n" + "\n".join(up)


def test_workers_never_import_pipeline_even_inside_functions():
    up = []
    for name, path in _modules().items():
        if not name.startswith("salmap.workers"):
            continue
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                target = node.module or ""
                if "pipeline" in target.split(".") and (node.level or target.startswith("salmap")):
                    up.append(f"{name}: line {node.lineno}")
            elif isinstance(node, ast.Import):
                up += [f"{name}: line {node.lineno}" for a in node.names
                       if a.name.startswith("salmap.pipeline")]
    assert not up, "workers imports pipeline:\n" + "\n".join(up)
